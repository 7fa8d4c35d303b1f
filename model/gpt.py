"""A decoder-only GPT, written from first principles.

token embedding * sqrt(d) + sinusoidal positional encoding -> N x [pre-LN multi-head causal
self-attention + residual, pre-LN position-wise feed-forward + residual] -> LayerNorm -> output
head tied to the token embedding.

The forward pass takes ``input_ids``, ``attention_mask`` (over past + new positions) and
``position_ids``, plus an optional past key/value cache, and returns the logits and the
present cache. Rows of different lengths batch with left padding: a padded position has
attention_mask 0 and is never attended to. Shape comments: B batch, T new tokens,
P past tokens, S = P + T, H heads, D head dim, C = H * D model width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import GPTConfig
from model.inplace_attention import group_query_attention

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (key, value), each (B, H, P, D)


def sinusoidal_table(n_positions: int, d: int) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d)). Shape (n_positions, d)."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float32) / d)
    table = torch.zeros(n_positions, d)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.resid_drop = nn.Dropout(cfg.dropout)
        # Set to a list only by model/export_attention.py: the masked path appends its attention
        # probabilities (B, H, T, S) to it, so the inspection graph has this forward pass, not a copy.
        self.attention_sink: list[torch.Tensor] | None = None

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, past: tuple[torch.Tensor, torch.Tensor] | None,
        inplace_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, C = x.shape
        H, D = self.n_head, self.head_dim  # config integers, not tensor shapes: keeps the export static
        q, k, v = self.qkv(x).split(C, dim=2)
        if inplace_mask is not None:  # the in-place KV layout: past = the buffers (B, H, M, D), rows right padded
            y, pk, pv = group_query_attention(q, k, v, past[0], past[1], inplace_mask, H, H, 1.0 / math.sqrt(D))
            return self.resid_drop(self.proj(y)), (pk, pv)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, H, D).transpose(1, 2)
        v = v.view(B, T, H, D).transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, H, S, D)
            v = torch.cat([past[1], v], dim=2)
        if mask is None:  # training: no cache, no padding; torch's fused kernel computes the same formula
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0,
                                               is_causal=True)
            return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C))), (k, v)
        # Scaled dot-product attention: softmax(Q K^T / sqrt(d_k)) V, masked.
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))  # (B, H, T, S)
        # A finite minimum, not -inf: a fully masked row (a padding query) stays finite, not NaN.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        att = self.attn_drop(F.softmax(scores, dim=-1))
        if self.attention_sink is not None:
            self.attention_sink.append(att)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y)), (k, v)


def relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


ACTIVATION_FNS = {"gelu": F.gelu, "relu": F.relu, "relu2": relu2}


class FeedForward(nn.Module):
    """Position-wise feed-forward: Linear(d, 4d) -> activation -> Linear(4d, d)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.ffn_mult * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.ffn_mult * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.act = ACTIVATION_FNS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = MultiHeadAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.ffn = FeedForward(cfg)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, past: tuple[torch.Tensor, torch.Tensor] | None,
        inplace_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a, present = self.attn(self.ln1(x), mask, past, inplace_mask)
        x = x + a
        x = x + self.ffn(self.ln2(x))
        return x, present


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.register_buffer("pe", sinusoidal_table(cfg.context_length, cfg.n_embd), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied output head
        # "concat": past and new keys concatenated (model.onnx); "inplace": attention writes into
        # per-layer buffers (model/inplace_attention.py; model.kvinplace.onnx is exported from this module).
        self.kv_layout = "concat"
        self.apply(self._init_weights)
        # As in the original transformer: embeddings ~ N(0, 1/d), scaled by sqrt(d) in forward, so token
        # vectors have unit magnitude like the sinusoids. With std 0.02 the sinusoids drowned the tokens:
        # 300-step validation loss 4.97 vs 4.56 nats/token (measured, tiny scale).
        nn.init.normal_(self.wte.weight, mean=0.0, std=cfg.n_embd**-0.5)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied weight counts once

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """
        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, P + T), 1 for real tokens, 0 for padding. Default: all ones.
            position_ids: (B, T) absolute positions. Default: P, P+1, ... for every row.
            past_key_values: per layer (key, value), each (B, H, P, D); None for P = 0.
        Returns:
            logits (B, T, V) and the present cache, per layer (key, value) each (B, H, P + T, D).
        """
        if self.kv_layout == "inplace":  # past_key_values are the buffers; attention_mask right padded
            return self._forward(input_ids, None, position_ids, past_key_values, inplace_mask=attention_mask)
        B, T = input_ids.shape
        P = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(B, P + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(P, P + T, device=input_ids.device).expand(B, T)
        # Causal: new token t (absolute index P + t in the key axis) sees keys 0..P+t; padding is never seen.
        key_idx = torch.arange(P + T, device=input_ids.device)
        query_idx = torch.arange(T, device=input_ids.device) + P
        causal = key_idx[None, :] <= query_idx[:, None]  # (T, S)
        mask = causal[None, None, :, :] & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
        return self._forward(input_ids, mask, position_ids, past_key_values)

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor,
                 past_key_values: KVCache | None, inplace_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:

        x = self.wte(input_ids) * math.sqrt(self.cfg.n_embd) + self.pe[position_ids]  # (B, T, C)
        x = self.drop(x)
        presents: KVCache = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, mask, None if past_key_values is None else past_key_values[i], inplace_mask)
            presents.append(present)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        return logits, presents

    def causal_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, V) for whole sequences starting at position 0 (no cache, no padding)."""
        B, T = input_ids.shape
        logits, _ = self._forward(input_ids, None, torch.arange(T, device=input_ids.device).expand(B, T), None)
        return logits

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy in nats, for training: (B, T) ids and targets.

        Full causal sequences without padding or cache, so attention takes the fused causal kernel.
        """
        logits = self.causal_logits(input_ids)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def left_pad_batch(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad prompts of different lengths. Returns input_ids, attention_mask, position_ids, each (B, T)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@torch.inference_mode()
def generate_greedy(model: GPT, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Reference greedy decoding of one prompt with the KV cache (used by parity tests)."""
    model.eval()
    ids = torch.tensor([prompt], dtype=torch.long)
    logits, past = model(ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        pos = torch.tensor([[len(prompt) + len(out) - 1]])
        logits, past = model(torch.tensor([[nxt]]), position_ids=pos, past_key_values=past)
    return out
