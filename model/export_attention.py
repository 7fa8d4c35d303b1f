"""The inspection graph: the decoder's forward pass with every layer's attention probabilities as outputs.

``model.attention.onnx`` (optional in a bundle, section ``onnx_attention`` of config.json) takes
``input_ids`` [batch, seq] (positions 0..seq-1, no padding, no KV cache) and returns ``logits``
[batch, seq, vocab] and ``attention.{i}`` [batch, heads, seq, seq] for each layer i: the softmax of
Q Kᵀ / √d over the causal mask, as ``model.gpt.MultiHeadAttention`` computes it (the module
appends its probabilities to ``attention_sink`` while this graph is traced: one implementation of
the forward pass). The service runs it for ``POST /v1/inspect`` only, outside the decode batch.
Always float32 (an fp16 or int8 bundle gets a float32 copy): it is for looking, not for speed.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.gpt import GPT

ATTENTION_FILE = "model.attention.onnx"
OPSET = 18
IO_NAMES = {"input_ids": "input_ids", "logits": "logits", "attention": "attention.{i}"}


@contextmanager
def recording_attention(model: GPT) -> Iterator[list[torch.Tensor]]:
    """Collect each layer's attention probabilities (B, H, T, S), in layer order, while inside."""
    sink: list[torch.Tensor] = []
    for block in model.blocks:
        block.attn.attention_sink = sink
    try:
        yield sink
    finally:
        for block in model.blocks:
            block.attn.attention_sink = None


def attention_forward(model: GPT, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(B, T) ids at positions 0..T-1 -> logits (B, T, V) and per layer attention (B, H, T, T).

    Goes through ``GPT.forward`` with an explicit mask (the masked attention path), never the
    fused kernel, which does not expose its probabilities.
    """
    with recording_attention(model) as sink:
        logits, _ = model(input_ids)
    return logits, list(sink)


class _AttentionGraph(torch.nn.Module):
    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        logits, attentions = attention_forward(self.model, input_ids)
        return (logits, *attentions)


def export_attention(model: GPT, out_path: Path) -> Path:
    """Export the inspection graph (float32, dynamic batch and sequence up to the context length)."""
    model = copy.deepcopy(model).float().eval().to("cpu")
    cfg = model.cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    batch, seq = torch.export.Dim("batch", max=4096), torch.export.Dim("seq", max=cfg.context_length)
    outputs = [IO_NAMES["logits"]] + [IO_NAMES["attention"].format(i=i) for i in range(cfg.n_layer)]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _AttentionGraph(model).eval(),
            (ids,),
            dynamo=True,
            opset_version=OPSET,
            input_names=[IO_NAMES["input_ids"]],
            output_names=outputs,
            dynamic_shapes=({0: batch, 1: seq},),
            optimize=True,
            verbose=False,
            report=False,
        )
    program.save(str(out_path), external_data=False)
    return out_path


def attention_config(model: GPT) -> dict[str, Any]:
    """The ``onnx_attention`` section of config.json."""
    return {
        "file": ATTENTION_FILE,
        "opset": OPSET,
        "dtype": "float32",
        "n_layer": model.cfg.n_layer,
        "n_head": model.cfg.n_head,
        "io_names": dict(IO_NAMES),
    }


@dataclass
class AttentionParity:
    max_attention_diff: float
    max_logit_diff: float
    max_row_sum_error: float
    max_above_diagonal: float

    def ok(self, tol: float) -> bool:
        return max(self.max_attention_diff, self.max_row_sum_error, self.max_above_diagonal) <= tol


def check_attention_parity(model: GPT, path: Path, prompts: list[list[int]]) -> AttentionParity:
    """Run the graph with ONNX Runtime on each prompt and compare with PyTorch."""
    import onnxruntime as ort

    model = copy.deepcopy(model).float().eval().to("cpu")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    att_d = logit_d = row_err = above = 0.0
    for prompt in prompts:
        ids = np.asarray([prompt], dtype=np.int64)
        out = sess.run(None, {IO_NAMES["input_ids"]: ids})
        with torch.no_grad():
            logits, atts = attention_forward(model, torch.from_numpy(ids))
        logit_d = max(logit_d, float(np.abs(out[0] - logits.numpy()).max()))
        T = len(prompt)
        upper = np.triu(np.ones((T, T), dtype=bool), k=1)
        for got, want in zip(out[1:], atts, strict=True):
            att_d = max(att_d, float(np.abs(got - want.numpy()).max()))
            row_err = max(row_err, float(np.abs(got.sum(-1) - 1.0).max()))
            above = max(above, float(np.abs(got[..., upper]).max()) if T > 1 else 0.0)
    return AttentionParity(att_d, logit_d, row_err, above)
