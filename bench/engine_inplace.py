"""The in-place KV cache decoder (model.kvinplace.onnx, com.microsoft.GroupQueryAttention) against the
exported graph whose attention concatenates past and new keys every step, one decode step each.

The exported decoder copies the whole cache into a new ``present`` at every step (an ONNX
``Concat`` per key and value per layer): at batch 32-64 that Concat is the largest kernel. ONNX
Runtime's GroupQueryAttention can instead write the new key/value into a preallocated buffer
(``past`` and ``present`` bound to the same memory through IO binding, one buffer of
``max_len`` positions per row) and attend over each row's own length (``seqlens_k``), so nothing
is copied and rows need no left padding.

This script builds that graph from a checkpoint with the production builder
(model.export_inplace.build_kv_inplace, the file `python -m model export` puts in the bundle), checks
its logits against the bundle's model.onnx, and times one decode step of both at the same batch
size and cached length (thread CPU time).

    python -m bench.engine_inplace --bundle artifacts/small --batches 1,32,64 --past 96
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np


def _session(path: Path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class InplaceDecoder:
    """Decode steps of the in-place graph with one preallocated cache buffer per layer and kind."""

    def __init__(self, path: Path, n_layer: int, n_head: int, head_dim: int, threads: int = 1):
        self.sess = _session(path, threads)
        self.L, self.H, self.D = n_layer, n_head, head_dim
        self.names = [f"{{}}.{i}.{k}" for i in range(n_layer) for k in ("key", "value")]

    def alloc(self, batch: int, max_len: int) -> list[Any]:
        import onnxruntime as ort

        return [
            ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, self.H, max_len, self.D), np.float32))
            for _ in self.names
        ]

    def step(self, ids: np.ndarray, pos: np.ndarray, lengths: np.ndarray, cache: list[Any]) -> np.ndarray:
        """ids, pos (B, T); lengths (B,) total tokens per row after this step. Returns logits (B, T, V)."""
        b = self.sess.io_binding()
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("attention_mask", (np.arange(lengths.max()) < lengths[:, None]).astype(np.int64))
        b.bind_cpu_input("position_ids", pos)
        b.bind_output("logits")  # first: get_outputs() follows the binding order
        for n, v in zip(self.names, cache, strict=True):
            b.bind_ortvalue_input(n.format("past_key_values"), v)
            b.bind_ortvalue_output(n.format("present"), v)  # the same memory: written in place
        self.sess.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()


def decode_feed(bundle: Any, batch: int, past: int) -> dict[str, np.ndarray]:
    """One decode step of the exported graph: batch rows with `past` cached tokens (random cache)."""
    names = bundle.io_names
    rng = np.random.default_rng(0)
    feed = {
        names["input_ids"]: np.ones((batch, 1), np.int64),
        names["attention_mask"]: np.ones((batch, past + 1), np.int64),
        names["position_ids"]: np.full((batch, 1), past, np.int64),
    }
    for i in range(bundle.num_layers):
        for k in ("past_key", "past_value"):
            feed[names[k].format(i=i)] = rng.standard_normal(
                (batch, bundle.num_kv_heads, past, bundle.head_dim), dtype=np.float32
            )
    return feed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.engine_inplace", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=Path("artifacts/small"))
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="default: artifacts/.work/<preset>/checkpoint.pt"
    )
    p.add_argument("--batches", default="1,32,64")
    p.add_argument("--past", type=int, default=96, help="cached tokens per row for the timed step")
    p.add_argument("--max-len", type=int, default=0, help="buffer length per row (default: the context)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("/tmp/gpt_inplace.onnx"))
    a = p.parse_args(argv)
    from bundle.format import load_bundle
    from model.export_inplace import build_kv_inplace
    from model.train import load_model

    bundle = load_bundle(a.bundle)
    ckpt = a.checkpoint or Path("artifacts/.work") / bundle.config["training"]["preset"] / "checkpoint.pt"
    model, _ = load_model(ckpt)
    build_kv_inplace(model, a.out)
    cfg = model.cfg
    max_len = a.max_len or cfg.context_length
    gqa = InplaceDecoder(a.out, cfg.n_layer, cfg.n_head, cfg.head_dim)
    ref = _session(bundle.onnx_path)

    # Parity: prefill 3 rows of 20 tokens, then 8 greedy steps, against the exported graph.
    B, T = 3, 20
    ids = np.random.default_rng(1).integers(4, cfg.vocab_size, (B, T))
    pos = np.broadcast_to(np.arange(T), (B, T)).copy()
    cache = gqa.alloc(B, max_len)
    got = gqa.step(ids, pos, np.full(B, T), cache)
    feed = {"input_ids": ids, "attention_mask": np.ones((B, T), np.int64), "position_ids": pos}
    feed |= {
        n.format(i=i): np.zeros((B, cfg.n_head, 0, cfg.head_dim), np.float32)
        for i in range(cfg.n_layer)
        for n in ("past_key_values.{i}.key", "past_key_values.{i}.value")
    }
    want, *presents = ref.run(None, feed)
    diff = float(np.abs(got - want).max())
    nxt = want[:, -1].argmax(-1)
    for t in range(8):
        L = T + t + 1
        got = gqa.step(nxt[:, None], np.full((B, 1), L - 1), np.full(B, L), cache)
        feed = {
            "input_ids": nxt[:, None],
            "attention_mask": np.ones((B, L), np.int64),
            "position_ids": np.full((B, 1), L - 1, np.int64),
        }
        feed |= {
            f"past_key_values.{i}.{k}": presents[2 * i + j]
            for i in range(cfg.n_layer)
            for j, k in enumerate(("key", "value"))
        }
        want, *presents = ref.run(None, feed)
        diff = max(diff, float(np.abs(got - want).max()))
        nxt = want[:, -1].argmax(-1)
    print(f"parity with {bundle.onnx_path}: max |logit diff| {diff:.2e} over prefill + 8 steps")

    from model.export import quantize_int8

    tmp = Path(tempfile.mkdtemp(prefix="inplace-"))
    ref_int8 = _session(quantize_int8(bundle.onnx_path, tmp / "exported-int8.onnx"))
    gqa_int8 = InplaceDecoder(quantize_int8(a.out, tmp / "gqa-int8.onnx"), cfg.n_layer, cfg.n_head, cfg.head_dim)
    print(
        f"\nOne decode step, {a.past} cached tokens per row, 1 thread, thread CPU time in ms (best of {a.repeat}); "
        "int8: model.export.quantize_int8 of each graph:\n"
    )
    print(
        "| batch | exported (Concat) | exported int8 | GQA in place | GQA int8 | GQA vs exported | "
        "int8 vs fp32: exported | int8 vs fp32: GQA |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch in [int(x) for x in a.batches.split(",")]:
        feed = decode_feed(bundle, batch, a.past)
        caches = {"gqa": gqa.alloc(batch, max_len), "gqa8": gqa_int8.alloc(batch, max_len)}
        ids1, pos1 = np.ones((batch, 1), np.int64), np.full((batch, 1), a.past, np.int64)
        lengths = np.full(batch, a.past + 1)
        fns = {
            "ref": partial(ref.run, None, feed),
            "ref8": partial(ref_int8.run, None, feed),
            "gqa": partial(gqa.step, ids1, pos1, lengths, caches["gqa"]),
            "gqa8": partial(gqa_int8.step, ids1, pos1, lengths, caches["gqa8"]),
        }
        n = max(3, 64 // batch)
        best = dict.fromkeys(fns, float("inf"))
        for _ in range(a.repeat):
            for name, fn in fns.items():
                fn()
                t0 = time.thread_time()
                for _ in range(n):
                    fn()
                best[name] = min(best[name], (time.thread_time() - t0) / n * 1e3)
        r, r8, g, g8 = best["ref"], best["ref8"], best["gqa"], best["gqa8"]
        print(
            f"| {batch} | {r:.3f} | {r8:.3f} | {g:.3f} | {g8:.3f} | {r / g:.2f}x | {r / r8:.2f}x | {g / g8:.2f}x |"
        )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
