"""One decoder forward pass for the imported families (GPT-2, Llama, Mistral, Qwen2, Gemma).

The family's choices come from a DecoderSpec (model/hf/spec.py); weights come from the Hugging
Face module (``load_hf_weights``). The same module exports both bundle graphs: with
``kv_layout = "concat"`` attention concatenates the past and new keys (model.onnx, left padding);
with ``"inplace"`` it is model/inplace_attention.py's op, which exports to GroupQueryAttention
over one shared past/present buffer per layer (model.kvinplace.onnx, right padding). RoPE, norms
and projections are the same code in both. Shapes: B batch, T new tokens, P past, S = P + T,
H query heads, Hkv key/value heads, D head dim, C hidden size, M buffer length.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.hf.spec import DecoderSpec
from model.inplace_attention import group_query_attention

KVLayout = Literal["concat", "inplace"]


class Norm(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.kind, self.eps = spec.norm, spec.norm_eps
        self.weight = nn.Parameter(torch.ones(spec.hidden_size))
        self.bias = nn.Parameter(torch.zeros(spec.hidden_size)) if spec.norm == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # RMSNorm, in float32 as HF does
        if self.kind == "rmsnorm_unit_offset":  # Gemma: (x * (1 + w)), cast after
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


def _act(kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if kind == "gelu_tanh" else "none")


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        C, F_, b = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        self.kind, self.act = spec.mlp, spec.activation
        if spec.mlp == "glu":
            self.gate, self.up = nn.Linear(C, F_, bias=b), nn.Linear(C, F_, bias=b)
        else:
            self.up = nn.Linear(C, F_, bias=b)
        self.down = nn.Linear(F_, C, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "glu":
            return self.down(_act(self.act, self.gate(x)) * self.up(x))
        return self.down(_act(self.act, self.up(x)))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        C, H, Hkv, D = spec.hidden_size, spec.n_head, spec.n_kv_head, spec.head_dim
        self.H, self.Hkv, self.D, self.scale = H, Hkv, D, spec.attention_scale
        self.q = nn.Linear(C, H * D, bias=spec.qkv_bias)
        self.k = nn.Linear(C, Hkv * D, bias=spec.qkv_bias)
        self.v = nn.Linear(C, Hkv * D, bias=spec.qkv_bias)
        self.o = nn.Linear(H * D, C, bias=spec.o_bias)

    def forward(self, x, rope, mask, attention_mask, past, layout: KVLayout):
        B, T, _ = x.shape
        H, Hkv, D = self.H, self.Hkv, self.D  # config integers, not tensor shapes: keeps the export static
        q = self.q(x).view(B, T, H, D)
        k = self.k(x).view(B, T, Hkv, D)
        v = self.v(x).view(B, T, Hkv, D)
        if rope is not None:
            cos, sin = rope  # (B, T, 1, D)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if layout == "inplace":
            y, pk, pv = group_query_attention(q.reshape(B, T, H * D), k.reshape(B, T, Hkv * D),
                                              v.reshape(B, T, Hkv * D), past[0], past[1], attention_mask,
                                              H, Hkv, self.scale)
            return self.o(y), (pk, pv)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, T, D)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, Hkv, S, D)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        if Hkv != H:  # grouped-query attention: each key/value head serves H / Hkv query heads
            S = k.shape[2]
            k = k[:, :, None].expand(B, Hkv, H // Hkv, S, D).reshape(B, H, S, D)
            v = v[:, :, None].expand(B, Hkv, H // Hkv, S, D).reshape(B, H, S, D)
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, T, S)
        # A finite minimum, not -inf: a fully masked row (a padding query) stays finite, not NaN.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        y = (F.softmax(scores.float(), dim=-1).to(q.dtype) @ v).transpose(1, 2).reshape(B, T, H * D)
        return self.o(y), present


class Layer(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.norm1, self.attn = Norm(spec), Attention(spec)
        self.norm2, self.mlp = Norm(spec), MLP(spec)

    def forward(self, x, rope, mask, attention_mask, past, layout: KVLayout):
        a, present = self.attn(self.norm1(x), rope, mask, attention_mask, past, layout)
        x = x + a
        return x + self.mlp(self.norm2(x)), present


class Decoder(nn.Module):
    """The imported decoder. ``kv_layout`` picks the attention used at export (and in PyTorch runs)."""

    def __init__(self, spec: DecoderSpec, inv_freq: torch.Tensor | None = None, rope_scaling: float = 1.0):
        super().__init__()
        self.spec = spec
        self.kv_layout: KVLayout = "concat"
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.pos_embed = nn.Embedding(spec.context_length, spec.hidden_size) if spec.positions == "learned" else None
        self.layers = nn.ModuleList(Layer(spec) for _ in range(spec.n_layer))
        self.norm_f = Norm(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tied_embeddings:
            self.lm_head.weight = self.embed.weight
        if spec.positions == "rope":
            if inv_freq is None:
                raise ValueError("a RoPE decoder needs inv_freq (D/2,)")
            self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.rope_scaling = rope_scaling  # cos/sin multiplier of scaled RoPE variants (YaRN); 1 otherwise

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # (B, T, 1, D)
        return emb.cos() * self.rope_scaling, emb.sin() * self.rope_scaling

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None):
        """
        Args:
            input_ids, position_ids: (B, T) int64; attention_mask: (B, S) int64, 1 = a real token.
            past_key_values: per layer (key, value). concat: each (B, Hkv, P, D), None for P = 0;
                inplace: the buffers, each (B, Hkv, M, D), rows right padded.
        Returns:
            logits (B, T, V) float32 and the per-layer present (key, value).
        """
        T = input_ids.shape[1]
        x = self.embed(input_ids)
        if self.spec.embed_scale != 1.0:
            x = x * torch.tensor(self.spec.embed_scale, dtype=x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)
        rope = None
        if self.spec.positions == "rope":
            cos, sin = self._rope(position_ids)
            rope = (cos.to(x.dtype), sin.to(x.dtype))
        mask = None
        if self.kv_layout == "concat":
            P = attention_mask.shape[1] - T
            key_idx = torch.arange(attention_mask.shape[1])
            causal = key_idx[None, :] <= (torch.arange(T) + P)[:, None]  # (T, S)
            mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
        presents = []
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            x, present = layer(x, rope, mask, attention_mask, past, self.kv_layout)
            presents.append(present)
        return self.lm_head(self.norm_f(x)).float(), presents


def _conv1d(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous()  # GPT-2's Conv1D stores (in, out); nn.Linear wants (out, in)


def load_hf_weights(decoder: Decoder, hf_state: dict[str, torch.Tensor]) -> None:
    """Copy a Hugging Face ``*ForCausalLM`` state dict into ``decoder`` (strict: every tensor used once)."""
    spec = decoder.spec
    ours: dict[str, torch.Tensor] = {}
    if spec.model_type == "gpt2":
        C = spec.hidden_size
        ours["embed.weight"] = hf_state["transformer.wte.weight"]
        ours["pos_embed.weight"] = hf_state["transformer.wpe.weight"][: spec.context_length]
        for i in range(spec.n_layer):
            p, o = f"transformer.h.{i}.", f"layers.{i}."
            for a, b in (("ln_1", "norm1"), ("ln_2", "norm2")):
                ours[o + b + ".weight"], ours[o + b + ".bias"] = hf_state[p + a + ".weight"], hf_state[p + a + ".bias"]
            w, bias = _conv1d(hf_state[p + "attn.c_attn.weight"]), hf_state[p + "attn.c_attn.bias"]
            for j, name in enumerate("qkv"):
                ours[o + f"attn.{name}.weight"] = w[j * C : (j + 1) * C]
                ours[o + f"attn.{name}.bias"] = bias[j * C : (j + 1) * C]
            for a, b in (("attn.c_proj", "attn.o"), ("mlp.c_fc", "mlp.up"), ("mlp.c_proj", "mlp.down")):
                ours[o + b + ".weight"] = _conv1d(hf_state[p + a + ".weight"])
                ours[o + b + ".bias"] = hf_state[p + a + ".bias"]
        ours["norm_f.weight"], ours["norm_f.bias"] = hf_state["transformer.ln_f.weight"], hf_state["transformer.ln_f.bias"]
    else:
        names = {"self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
                 "self_attn.o_proj": "attn.o", "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up",
                 "mlp.down_proj": "mlp.down", "input_layernorm": "norm1", "post_attention_layernorm": "norm2"}
        ours["embed.weight"] = hf_state["model.embed_tokens.weight"]
        ours["norm_f.weight"] = hf_state["model.norm.weight"]
        for i in range(spec.n_layer):
            for hf_name, name in names.items():
                for kind in ("weight", "bias"):
                    key = f"model.layers.{i}.{hf_name}.{kind}"
                    if key in hf_state:
                        ours[f"layers.{i}.{name}.{kind}"] = hf_state[key]
    if not spec.tied_embeddings:
        ours["lm_head.weight"] = hf_state["lm_head.weight"]
    expected = set(decoder.state_dict()) - ({"lm_head.weight"} if spec.tied_embeddings else set())
    missing, extra = expected - set(ours), set(ours) - expected
    if missing or extra:
        raise ValueError(f"weights do not map onto the {spec.model_type} decoder: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(extra)[:5]}")
    with torch.no_grad():
        state = decoder.state_dict()
        for name, t in ours.items():
            if state[name].shape != t.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)}, decoder {tuple(state[name].shape)}")
            state[name].copy_(t)
