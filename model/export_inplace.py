"""The decoder with an in-place KV cache: ``com.microsoft.GroupQueryAttention`` over a preallocated buffer.

``model.onnx`` (model/export.py) concatenates past and new keys into a new ``present`` every call,
so ONNX Runtime copies the whole cache each step. This graph instead takes, per layer, one key
and one value buffer of ``max_len`` positions per row and writes the new positions into it: bind
``past_key_values.{i}.*`` and ``present.{i}.*`` to the same memory (IO binding) and nothing is
copied. Rows are RIGHT padded: row b's tokens occupy buffer positions 0..len_b-1, and each row
attends over its own length only.

The interface is that of ONNX Runtime GenAI's model builder with ``past_present_share_buffer``:

    inputs   input_ids (B, T) int64; attention_mask (B, total_len) int64, 1 = a real token, rows
             right padded; position_ids (B, T) int64; past_key_values.{i}.key/value (B, H, M, D)
    outputs  logits (B, T, V) float32; present.{i}.key/value (B, H, M, D), the same buffer

The graph is derived from model/gpt.py's module (``kv_layout = "inplace"``), and inside it, as
GenAI's builder does: seqlens_k = ReduceSum(attention_mask, 1) - 1 as
int32 (B,), total_sequence_length = Shape(attention_mask)[1] as an int32 scalar.

What ONNX Runtime's CPU GroupQueryAttention (1.31) does with it (model.verify.check_parity_kv_inplace,
run by ``python -m model verify`` and tests/model): a first prompt (T = total_len, empty past) with
right-padded rows of different lengths is exact at every real position (a padding query attends
to padding keys: finite values nobody reads); a decode step (T = 1) with a different length per
row is exact. A prompt over a non-empty past (1 < T < total_len) is refused for batch > 1
("batch_size must be 1 when sequence_length > 1 and past context is given"): the service never
chunks prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bundle.format import DEFAULT_IO_NAMES
from model.gpt import GPT
from model.inplace_attention import GQA_OP

KV_INPLACE_FILE = "model.kvinplace.onnx"
OPSET = 18


def build_kv_inplace(model: GPT, out: Path) -> Path:
    """Write the GroupQueryAttention decoder of ``model`` (fp32 weights) to ``out``; return ``out``.

    The graph is exported from ``model`` itself with its attention in the in-place layout
    (model/inplace_attention.py's op, translated to GroupQueryAttention; model/export_decoder.py),
    so it is the same forward pass as model.onnx, not a second implementation.

    Args:
        model: the trained GPT (pre-LN, sinusoidal positions, tied head), any device.
        out: the .onnx file to write (one file, no external data).
    """
    from model.export_decoder import DecoderDims, export_decoder

    cfg = model.cfg
    model = model.eval().float().to("cpu")
    dims = DecoderDims(cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.vocab_size, cfg.context_length)
    return export_decoder(model, dims, out, "inplace")


def kv_inplace_config(model: GPT, file: str = KV_INPLACE_FILE, dtype: str = "float32") -> dict[str, Any]:
    """The ``onnx_kv_inplace`` section of config.json (docs/model-bundle.md)."""
    return {
        "file": file,
        "opset": OPSET,
        "op": GQA_OP,
        "kv_dtype": dtype,
        "past_present_share_buffer": True,
        "padding": "right",
        "max_len": model.cfg.context_length,
        "io_names": dict(DEFAULT_IO_NAMES),
    }
