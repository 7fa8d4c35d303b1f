"""Export an imported decoder (model/hf/decoder.py) to the bundle's two ONNX graphs.

``export_generic``: model.onnx, past and new keys concatenated (docs/model-bundle.md, the
GenAI/Optimum decoder convention; past_key_values.{i}.* are (B, Hkv, P, D)).
``export_inplace``: model.kvinplace.onnx, the same module with its attention switched to
model/inplace_attention.py's op, which the exporter turns into GroupQueryAttention over one
buffer per layer, (B, Hkv, M, D), bound as past and present (model/export_decoder.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.export_decoder import DecoderDims, export_decoder
from model.hf.decoder import Decoder


def dims(decoder: Decoder) -> DecoderDims:
    s = decoder.spec
    return DecoderDims(s.n_layer, s.n_kv_head, s.head_dim, s.vocab_size, s.context_length)


def export_generic(decoder: Decoder, out: Path, fp16: bool = False) -> Path:
    """model.onnx (concat KV layout, left padding); fp16 weights and cache with ``fp16``."""
    decoder = decoder.eval()
    if not fp16:
        return export_decoder(decoder, dims(decoder), out, "concat")
    try:
        return export_decoder(decoder.half(), dims(decoder), out, "concat", torch.float16)
    finally:
        decoder.float()


def export_inplace(decoder: Decoder, out: Path) -> Path:
    """model.kvinplace.onnx (GroupQueryAttention over shared float32 buffers, right padding)."""
    return export_decoder(decoder.eval().float(), dims(decoder), out, "inplace")
