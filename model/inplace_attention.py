"""Attention over a shared past/present buffer, as one PyTorch op that exports to GroupQueryAttention.

``group_query_attention(q, k, v, past_k, past_v, attention_mask, ...)`` is a custom op
(``torch.ops.textgen.group_query_attention``) with an eager PyTorch implementation of the
semantics of ONNX Runtime's ``com.microsoft.GroupQueryAttention`` with
``past_present_share_buffer``, and a translation (``ONNX_TRANSLATIONS``, passed to
``torch.onnx.export(custom_translation_table=...)``) that emits that operator. A decoder written
with it exports its in-place graph from the same PyTorch module as its generic graph: only the
attention call differs (docs/model-bundle.md, "The in-place decoder").

Interface (the in-place graph's, as ONNX Runtime GenAI's builder writes it):
    q (B, T, H*D), k and v (B, T, Hkv*D) with positions already applied; past_k, past_v
    (B, Hkv, M, D), the buffers; attention_mask (B, total_len) int64, rows RIGHT padded.
    Returns the attention output (B, T, H*D) and the buffers with the new positions written.
Inside the graph, as GenAI's builder does: seqlens_k = ReduceSum(attention_mask, 1) - 1 (int32),
total_sequence_length = Shape(attention_mask)[1] (int32 scalar). A first prompt (T = total_len)
writes positions 0..T-1 of every row; a later call writes row b's T tokens just before its length.
"""

from __future__ import annotations

import torch

OP_NAME = "textgen::group_query_attention"
GQA_OP = "com.microsoft.GroupQueryAttention"


@torch.library.custom_op(OP_NAME, mutates_args=())
def group_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
    attention_mask: torch.Tensor, num_heads: int, kv_num_heads: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager reference (a loop over rows: for tests and PyTorch runs, not for speed)."""
    B, T, _ = q.shape
    D = past_k.shape[-1]
    first_prompt = attention_mask.shape[1] == T
    lengths = attention_mask.sum(1)  # (B,) real tokens per row, the new ones included
    present_k, present_v = past_k.clone(), past_v.clone()
    qh = q.view(B, T, num_heads, D).transpose(1, 2)  # (B, H, T, D)
    kh = k.view(B, T, kv_num_heads, D).transpose(1, 2)  # (B, Hkv, T, D)
    vh = v.view(B, T, kv_num_heads, D).transpose(1, 2)
    out = torch.zeros(B, num_heads, T, D, dtype=q.dtype)
    rep = num_heads // kv_num_heads
    for b in range(B):
        n = int(lengths[b])
        start = 0 if first_prompt else n - T
        present_k[b, :, start : start + T] = kh[b]
        present_v[b, :, start : start + T] = vh[b]
        keys = present_k[b, :, :n].repeat_interleave(rep, 0)  # (H, n, D)
        values = present_v[b, :, :n].repeat_interleave(rep, 0)
        scores = (qh[b] @ keys.transpose(-2, -1)) * scale  # (H, T, n)
        causal = torch.arange(n)[None, :] <= (torch.arange(T) + start)[:, None]  # (T, n)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        out[b] = torch.softmax(scores, -1) @ values
    return out.transpose(1, 2).reshape(B, T, num_heads * D), present_k, present_v


@group_query_attention.register_fake
def _(q, k, v, past_k, past_v, attention_mask, num_heads, kv_num_heads, scale):
    return torch.empty_like(q), torch.empty_like(past_k), torch.empty_like(past_v)


def _gqa_schema():
    """An OpSchema for the contrib op: onnxscript emits only ops whose schema it knows."""
    from onnx.defs import OpSchema

    param, attr = OpSchema.FormalParameter, OpSchema.Attribute
    return OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[param(n, "T") for n in ("query", "key", "value", "past_key", "past_value")]
        + [param("seqlens_k", "M"), param("total_sequence_length", "M")],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[attr("num_heads", OpSchema.AttrType.INT, ""), attr("kv_num_heads", OpSchema.AttrType.INT, ""),
                    attr("scale", OpSchema.AttrType.FLOAT, "")],
    )


def onnx_translations() -> dict:
    """``custom_translation_table`` for torch.onnx.export (dynamo): the op becomes GroupQueryAttention."""
    from onnxscript import opset18 as op
    from onnxscript import values

    gqa = values.Op(values.Opset("com.microsoft", 1), "GroupQueryAttention", _gqa_schema())

    def onnx_group_query_attention(q, k, v, past_k, past_v, attention_mask, num_heads: int, kv_num_heads: int,
                                   scale: float):
        lengths = op.ReduceSum(attention_mask, op.Constant(value_ints=[1]), keepdims=0)  # (B,)
        seqlens_k = op.Cast(op.Sub(lengths, op.Constant(value_int=1)), to=6)  # int32
        total = op.Cast(op.Gather(op.Shape(attention_mask), op.Constant(value_int=1), axis=0), to=6)
        return gqa(q, k, v, past_k, past_v, seqlens_k, total, num_heads=num_heads, kv_num_heads=kv_num_heads,
                   scale=scale)

    return {torch.ops.textgen.group_query_attention.default: onnx_group_query_attention}

