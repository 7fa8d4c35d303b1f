"""Bits per character of a bundle on the held-out text, computed with ONNX Runtime."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from bundle.format import load_bundle
from bundle.tokenizer import Tokenizer


def evaluate_bundle(bundle_dir: Path, val_works: list[str], block: int = 256, batch: int = 8) -> dict[str, float]:
    """Total validation nats / characters / ln 2, with the same sliding windows as training."""
    b = load_bundle(bundle_dir)
    tok = Tokenizer.load(b.tokenizer_path)
    stream: list[int] = []
    for text in val_works:
        stream += [b.bos_id, *tok.encode(text)]
    data = np.asarray(stream, dtype=np.int64)
    chars = sum(len(t) for t in val_works)
    block = min(block, b.context_length, len(data) - 1)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(b.onnx_path), so, providers=["CPUExecutionProvider"])
    kv_dtype = np.float16 if b.dtype == "float16" else np.float32
    stride = max(1, block // 2)
    last = len(data) - block - 1
    starts = [*range(0, last, stride), last]
    total, count, scored_until = 0.0, 0, 0
    for i0 in tqdm(range(0, len(starts), batch), desc="evaluate", unit="batch", file=sys.stderr):
        s = starts[i0 : i0 + batch]
        x = np.stack([data[i : i + block] for i in s])
        y = np.stack([data[i + 1 : i + 1 + block] for i in s])
        feed = {"input_ids": x, "attention_mask": np.ones_like(x), "position_ids": np.broadcast_to(np.arange(block), x.shape).copy()}
        for layer in range(b.num_layers):
            shape = (len(s), b.num_kv_heads, 0, b.head_dim)
            feed[f"past_key_values.{layer}.key"] = np.zeros(shape, kv_dtype)
            feed[f"past_key_values.{layer}.value"] = np.zeros(shape, kv_dtype)
        logits = sess.run(["logits"], feed)[0].astype(np.float32)  # (B, T, V)
        m = logits.max(-1, keepdims=True)
        logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
        nll = logz - np.take_along_axis(logits, y[..., None], -1)[..., 0]  # (B, T)
        for row, i in enumerate(s):
            first = max(0, scored_until - i)
            total += float(nll[row, first:].sum())
            count += block - first
            scored_until = max(scored_until, i + block)
    return {"val_loss": total / count, "val_bpc": total / chars / math.log(2), "tokens": count, "chars": chars}
