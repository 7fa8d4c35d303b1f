"""Export an imported decoder (model/hf/decoder.py) to the bundle's two ONNX graphs.

``export_generic``: model.onnx, past and new keys concatenated (docs/model-bundle.md, the
GenAI/Optimum decoder convention; past_key_values.{i}.* are (B, Hkv, P, D)).
``export_inplace``: model.kvinplace.onnx, the same module with its attention switched to
model/inplace_attention.py's op, which the exporter turns into GroupQueryAttention over one
buffer per layer, (B, Hkv, M, D), bound as past and present (interface: model/export_gqa.py).
Both with torch's dynamo exporter; batch, sequence, past and buffer length are dynamic.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from model.export import io_names
from model.hf.decoder import Decoder
from model.inplace_attention import onnx_translations

OPSET = 18


class _Flat(torch.nn.Module):
    """Flat-argument wrapper: ONNX graphs take tensors, not lists of tuples."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, attention_mask, position_ids, *past_flat):
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        logits, presents = self.decoder(input_ids, attention_mask, position_ids, past)
        return (logits, *[t for kv in presents for t in kv])


def _export(decoder: Decoder, out: Path, past_len: int, total_len: int, dtype: torch.dtype,
            translations: dict | None) -> Path:
    spec = decoder.spec
    B, T = 2, 3  # sample shapes; every axis below is declared dynamic
    ids = torch.randint(0, spec.vocab_size, (B, T))
    mask = torch.ones(B, total_len, dtype=torch.long)
    pos = torch.arange(total_len - T, total_len).expand(B, T).contiguous()
    past = [torch.zeros(B, spec.n_kv_head, past_len, spec.head_dim, dtype=dtype) for _ in range(2 * spec.n_layer)]
    Dim = torch.export.Dim
    batch, seq = Dim("batch", max=4096), Dim("seq", max=spec.context_length)
    total = Dim("total", max=spec.context_length) if translations else Dim.AUTO
    cache = Dim("max_len", max=spec.context_length) if translations else Dim("past", max=spec.context_length)
    dyn: list[Any] = [{0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}]
    in_names, out_names = io_names(spec.n_layer)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _Flat(decoder).eval(), (ids, mask, pos, *past), dynamo=True, opset_version=OPSET,
            input_names=in_names, output_names=out_names,
            dynamic_shapes=(*dyn, tuple({0: batch, 2: cache} for _ in past)),  # *past_flat is one argument
            custom_translation_table=translations, optimize=True, verbose=False, report=False,
        )
    program.save(str(out), external_data=False)
    return out


def export_generic(decoder: Decoder, out: Path, fp16: bool = False) -> Path:
    """model.onnx (concat KV layout, left padding); fp16 weights and cache with ``fp16``."""
    decoder = decoder.eval()
    decoder.kv_layout = "concat"
    dtype = torch.float16 if fp16 else torch.float32
    if fp16:
        decoder = decoder.half()
    try:
        return _export(decoder, out, past_len=4, total_len=7, dtype=dtype, translations=None)
    finally:
        decoder.float()


def export_inplace(decoder: Decoder, out: Path) -> Path:
    """model.kvinplace.onnx (GroupQueryAttention over shared float32 buffers, right padding)."""
    decoder = decoder.eval().float()
    decoder.kv_layout = "inplace"
    try:
        return _export(decoder, out, past_len=8, total_len=5, dtype=torch.float32, translations=onnx_translations())
    finally:
        decoder.kv_layout = "concat"
