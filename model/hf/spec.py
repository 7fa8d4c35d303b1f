"""What the importer needs to know about a Hugging Face decoder, read from its config (pure logic).

``decoder_spec(config)`` turns a ``transformers`` config (any object with the usual attributes)
into a ``DecoderSpec``: the shapes and the per-family choices (norm, activation, positions,
biases, tied head) that model/hf/decoder.py builds one forward pass from. A family not listed in
SUPPORTED is refused with a message naming its ``model_type`` and the supported list.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2", "gemma")
# RoPE variants whose frequencies are fixed at load (the ones that change with the sequence length,
# "dynamic" and "longrope", would need a graph per length range).
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class UnsupportedModel(ValueError):
    """A checkpoint the importer cannot convert (family, option or size)."""


@dataclass(frozen=True)
class DecoderSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    intermediate_size: int
    context_length: int
    norm: Literal["layernorm", "rmsnorm", "rmsnorm_unit_offset"]  # unit offset: x * (1 + w), Gemma
    norm_eps: float
    mlp: Literal["glu", "plain"]  # glu: down(act(gate(x)) * up(x)); plain: proj(act(fc(x)))
    activation: Literal["silu", "gelu_tanh", "gelu"]
    positions: Literal["rope", "learned"]
    rope_type: str | None
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tied_embeddings: bool
    embed_scale: float  # token embeddings are multiplied by this (Gemma: sqrt(hidden))
    attention_scale: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unsupported_family(model_type: object) -> str:
    return (f"model_type {model_type!r} is not supported by the importer; supported: {', '.join(SUPPORTED)}"
            " (docs/models.md says how to add a family)")


def _activation(name: str) -> Literal["silu", "gelu_tanh", "gelu"]:
    if name in ("silu", "swish"):
        return "silu"
    if name in _GELU_TANH:
        return "gelu_tanh"
    if name == "gelu":
        return "gelu"
    raise UnsupportedModel(f"activation {name!r} is not supported (silu, gelu, {', '.join(_GELU_TANH)})")


def _rope_type(cfg: Any) -> str:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModel(f"RoPE type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    return rope_type


def context_length(max_positions: int, sliding_window: int | None, cap: int | None) -> int:
    """The bundle's context: the model's positions, at most its sliding window (within the window,
    sliding-window attention is plain causal attention), at most ``cap``."""
    n = max_positions
    if sliding_window:
        n = min(n, int(sliding_window))
    if cap:
        n = min(n, cap)
    return n


def decoder_spec(cfg: Any, max_context: int | None = None) -> DecoderSpec:
    """The DecoderSpec of a ``transformers`` config; raises UnsupportedModel naming what is not supported.

    Args:
        cfg: a config as ``transformers.AutoConfig`` loads it (attributes, not a dict).
        max_context: cap on the bundle's context length (None: the model's own).
    """
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED:
        raise UnsupportedModel(unsupported_family(mt))
    if mt == "gpt2":
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "reorder_and_upcast_attn", False):
            raise UnsupportedModel("gpt2 with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn is not supported")
        C, H = cfg.n_embd, cfg.n_head
        D = C // H
        return DecoderSpec(
            model_type=mt, vocab_size=cfg.vocab_size, hidden_size=C, n_layer=cfg.n_layer, n_head=H, n_kv_head=H,
            head_dim=D, intermediate_size=cfg.n_inner or 4 * C,
            context_length=context_length(cfg.n_positions, None, max_context),
            norm="layernorm", norm_eps=cfg.layer_norm_epsilon, mlp="plain",
            activation=_activation(cfg.activation_function), positions="learned", rope_type=None,
            qkv_bias=True, o_bias=True, mlp_bias=True, tied_embeddings=True, embed_scale=1.0,
            attention_scale=1.0 / math.sqrt(D) if cfg.scale_attn_weights else 1.0,
        )
    rope_type = _rope_type(cfg)
    C, H = cfg.hidden_size, cfg.num_attention_heads
    D = getattr(cfg, "head_dim", None) or C // H
    sliding = getattr(cfg, "sliding_window", None) if mt in ("mistral", "qwen2") else None
    if mt == "qwen2" and not getattr(cfg, "use_sliding_window", False):
        sliding = None
    act = getattr(cfg, "hidden_activation", None) if mt == "gemma" else None
    return DecoderSpec(
        model_type=mt, vocab_size=cfg.vocab_size, hidden_size=C, n_layer=cfg.num_hidden_layers, n_head=H,
        n_kv_head=getattr(cfg, "num_key_value_heads", None) or H, head_dim=D,
        intermediate_size=cfg.intermediate_size,
        context_length=context_length(cfg.max_position_embeddings, sliding, max_context),
        norm="rmsnorm_unit_offset" if mt == "gemma" else "rmsnorm", norm_eps=cfg.rms_norm_eps, mlp="glu",
        activation=_activation(act or cfg.hidden_act), positions="rope", rope_type=rope_type,
        qkv_bias=True if mt == "qwen2" else bool(getattr(cfg, "attention_bias", False)),
        o_bias=False if mt == "qwen2" else bool(getattr(cfg, "attention_bias", False)),
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        embed_scale=math.sqrt(C) if mt == "gemma" else 1.0,
        attention_scale=D**-0.5,
    )
