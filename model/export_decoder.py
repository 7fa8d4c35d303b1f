"""torch.onnx export of a decoder module in the bundle's two KV layouts (shared by our GPT and imports).

A decoder module here is called ``module(input_ids, attention_mask, position_ids, past)`` and
returns ``(logits, presents)``, and has a ``kv_layout`` switch ("concat" | "inplace") that its
attention reads (model/gpt.py, model/hf/decoder.py). ``export_decoder`` exports it with torch's
dynamo exporter, with batch, sequence, past (or buffer) length dynamic; for the in-place layout
the attention op becomes ``com.microsoft.GroupQueryAttention`` (model/inplace_attention.py) and
the graph's names are those of ONNX Runtime GenAI's builder (``seqlens_k``,
``total_sequence_length``; dims batch, seq, total_len, max_len).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from model.inplace_attention import onnx_translations

OPSET = 18


@dataclass(frozen=True)
class DecoderDims:
    n_layer: int
    n_kv_head: int
    head_dim: int
    vocab_size: int
    context_length: int


class _Flat(torch.nn.Module):
    """Flat-argument wrapper: ONNX graphs take tensors, not lists of tuples."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, input_ids, attention_mask, position_ids, *past_flat):
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        logits, presents = self.module(input_ids, attention_mask, position_ids, past)
        return (logits, *[t for kv in presents for t in kv])


def io_names(n_layer: int) -> tuple[list[str], list[str]]:
    """The graph's input and output names (bundle.format.DEFAULT_IO_NAMES), in argument order."""
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(n_layer):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def _genai_names(model: Any) -> None:
    """Name the mask-derived inputs of GroupQueryAttention as GenAI's builder does (one pair, shared)."""
    for node in model.graph:
        if node.op_type == "GroupQueryAttention":
            node.inputs[5].name, node.inputs[6].name = "seqlens_k", "total_sequence_length"


def export_decoder(module: torch.nn.Module, dims: DecoderDims, out: Path, layout: Literal["concat", "inplace"],
                   dtype: torch.dtype = torch.float32) -> Path:
    """Write ``module`` in the ``layout`` KV layout to ``out`` (one .onnx file, no external data)."""
    inplace = layout == "inplace"
    B, T = 2, 3  # sample shapes; every axis below is declared dynamic
    total_len = 5 if inplace else 7  # in place: the mask spans the rows' lengths; concat: past 4 + 3 new
    past_len = 8 if inplace else total_len - T  # in place: the buffer length
    ids = torch.randint(0, dims.vocab_size, (B, T))
    mask = torch.ones(B, total_len, dtype=torch.long)
    pos = torch.arange(total_len - T, total_len).expand(B, T).contiguous()
    past = [torch.zeros(B, dims.n_kv_head, past_len, dims.head_dim, dtype=dtype) for _ in range(2 * dims.n_layer)]
    Dim = torch.export.Dim
    batch, seq = Dim("batch", max=4096), Dim("seq", max=dims.context_length)
    total = Dim("total_len", max=dims.context_length) if inplace else Dim.AUTO
    cache = Dim("max_len" if inplace else "past", max=dims.context_length)
    dyn: list[Any] = [{0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}]
    in_names, out_names = io_names(dims.n_layer)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = getattr(module, "kv_layout", "concat")
    module.kv_layout = layout
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _Flat(module).eval(), (ids, mask, pos, *past), dynamo=True, opset_version=OPSET,
                input_names=in_names, output_names=out_names,
                dynamic_shapes=(*dyn, tuple({0: batch, 2: cache} for _ in past)),  # *past_flat is one argument
                custom_translation_table=onnx_translations() if inplace else None,
                optimize=True, verbose=False, report=False,
            )
    finally:
        module.kv_layout = previous
    if inplace:
        _genai_names(program.model)
    program.save(str(out), external_data=False)
    return out
