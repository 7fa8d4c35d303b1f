"""int8 variants of a bundle's ONNX file, side by side: decode-step time, engine tokens/s, bits/char.

Variants (ONNX Runtime quantization tools, weights only; activations quantized on the fly or
not at all):

- ``dynamic``: ``quantize_dynamic`` of MatMul/Gemm, int8 weights per tensor (QOperator:
  DynamicQuantizeLinear + MatMulInteger, fused by ORT into DynamicQuantizeMatMul);
- ``dynamic-pc``: the same, per output channel;
- ``dynamic-u8``: uint8 weights;
- ``folded``: ``quant_pre_process`` first (shape inference and ORT's basic, hardware-independent
  optimizations: constant folding), so the tied output head, a Transpose of the embedding in the
  exported graph, becomes a constant that quantize_dynamic also quantizes; then ``dynamic``;
- ``folded-pc``: ``folded`` per channel;
- ``nbits8-b32`` / ``nbits8-b128``: MatMulNBits 8-bit blocks of 32/128 (``matmul_nbits_quantizer``),
  accuracy level 4 (int8 compute);
- ``nbits4-b32``: MatMulNBits 4-bit (for scale: below int8 quality).

    python -m bench.engine_int8 --bundle artifacts/small --bpc

Times are per thread CPU time (one ONNX Runtime thread): robust to other load on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _dynamic(src: Path, dst: Path, per_channel: bool = False, unsigned: bool = False) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QUInt8 if unsigned else QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=per_channel,
    )


def _folded(src: Path, dst: Path, per_channel: bool = False) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_suffix(".pre.onnx")
    quant_pre_process(
        str(src), str(pre), skip_symbolic_shape=True
    )  # symbolic inference gives up on this graph
    _dynamic(pre, dst, per_channel=per_channel)
    pre.unlink()


def _nbits(src: Path, dst: Path, bits: int, block: int) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(
        onnx.load(str(src)), bits=bits, block_size=block, is_symmetric=True, accuracy_level=4
    )
    q.process()
    q.model.save_model_to_file(str(dst), False)


VARIANTS: dict[str, Callable[[Path, Path], None]] = {
    "dynamic": _dynamic,
    "dynamic-pc": lambda s, d: _dynamic(s, d, per_channel=True),
    "dynamic-u8": lambda s, d: _dynamic(s, d, unsigned=True),
    "folded": _folded,
    "folded-pc": lambda s, d: _folded(s, d, per_channel=True),
    "nbits8-b32": lambda s, d: _nbits(s, d, 8, 32),
    "nbits8-b128": lambda s, d: _nbits(s, d, 8, 128),
    "nbits4-b32": lambda s, d: _nbits(s, d, 4, 32),
}


def variant_bundle(bundle_dir: Path, onnx_file: Path, out: Path) -> Path:
    """A copy of the bundle with another model.onnx (file hashes dropped from its config)."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_file, out / "model.onnx")
    shutil.copyfile(bundle_dir / "tokenizer.model", out / "tokenizer.model")
    config = json.loads((bundle_dir / "config.json").read_text())
    config.pop("files", None)
    config["name"] = out.name
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def step_times(
    files: dict[str, Path], bundle, batch: int, past: int = 96, rounds: int = 5
) -> dict[str, float]:
    """Thread CPU ms of one decode session.run per file (batch rows, `past` cached tokens), interleaved."""
    import onnxruntime as ort

    def session(p: Path):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
        return ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])

    names = bundle.io_names
    feed = {
        names["input_ids"]: np.ones((batch, 1), np.int64),
        names["attention_mask"]: np.ones((batch, past + 1), np.int64),
        names["position_ids"]: np.full((batch, 1), past, np.int64),
    }
    rng = np.random.default_rng(0)
    for i in range(bundle.num_layers):
        for k in ("past_key", "past_value"):
            feed[names[k].format(i=i)] = rng.standard_normal(
                (batch, bundle.num_kv_heads, past, bundle.head_dim), dtype=np.float32
            )
    sessions = {k: session(p) for k, p in files.items()}
    n = max(2, 64 // batch)
    best = {k: float("inf") for k in files}
    for _ in range(rounds):
        for k, s in sessions.items():
            s.run(None, feed)
            t0 = time.thread_time()
            for _ in range(n):
                s.run(None, feed)
            best[k] = min(best[k], (time.thread_time() - t0) / n * 1e3)
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.engine_int8", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=Path("artifacts/small"), help="fp32 bundle")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"default {','.join(VARIANTS)}")
    p.add_argument(
        "--bpc", action="store_true", help="bits/char of each variant on the held-out works (~30 s each)"
    )
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=5, help="interleaved rounds; the least CPU time counts")
    p.add_argument("--keep", type=Path, default=None, help="keep the variant bundles in this folder")
    a = p.parse_args(argv)
    from bench.engine import EngineRunner, fixed_workload, measure, text_tokens
    from bundle.format import load_bundle

    bundle = load_bundle(a.bundle)
    work = a.keep or Path(tempfile.mkdtemp(prefix="int8-variants-"))
    work.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {"fp32": bundle.onnx_path}
    for name in [v for v in a.variants.split(",") if v]:
        dst = work / f"{name}.onnx"
        VARIANTS[name](bundle.onnx_path, dst)
        files[name] = dst
        print(f"built {name}", file=sys.stderr)
    bundles = {
        k: (a.bundle if k == "fp32" else variant_bundle(a.bundle, f, work / f"bundle-{k}"))
        for k, f in files.items()
    }
    import onnx

    rows: dict[str, dict[str, float | str]] = {}
    for k, f in files.items():
        m = onnx.load(str(f))
        ops = Counter(n.op_type for n in m.graph.node)
        quant = ", ".join(
            f"{op} {c}" for op, c in ops.items() if "Quant" in op or "Integer" in op or "NBits" in op
        )
        rows[k] = {"MB": f.stat().st_size / 1e6, "nodes": len(m.graph.node), "ops": quant or "-"}
    for batch in (1, 64):
        for k, v in step_times(files, bundle, batch, rounds=a.repeat).items():
            rows[k][f"step{batch}"] = v
    stream = text_tokens(bundle.tokenizer_path)
    wl = fixed_workload(stream, bundle.bos_id, 1, 32, a.new_tokens)
    runners = [EngineRunner(b, 1, 4096, name=k) for k, b in bundles.items()]
    for m_, _ in measure(runners, wl, a.repeat):
        rows[m_.runner]["engine1"] = m_.tokens_per_cpu_s
    if a.bpc:
        from bench.engine import measure_bpc

        for k, b in bundles.items():
            rows[k]["bpc"] = measure_bpc(b, None, lambda s: None)["fp32"]
    base = rows["fp32"]
    print(
        f"\nOne thread, per-thread CPU time; decode step with 96 cached tokens; engine: 1 request, 32 prompt "
        f"+ {a.new_tokens} new tokens, tokens per CPU second.\n"
    )
    print(
        "| variant | MB | nodes | quantized ops | step B=1 ms | vs fp32 | step B=64 ms | vs fp32 | engine B=1 tok/s "
        "| vs fp32 |" + (" bits/char | Δ |" if a.bpc else "")
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if a.bpc else ""))
    for k, r in rows.items():
        line = (
            f"| {k} | {r['MB']:.1f} | {r['nodes']} | {r['ops']} | {r['step1']:.3f} | "
            f"{base['step1'] / r['step1']:.2f}x | {r['step64']:.2f} | {base['step64'] / r['step64']:.2f}x | "
            f"{r['engine1']:,.0f} | {r['engine1'] / base['engine1']:.2f}x |"
        )
        if a.bpc:
            line += f" {r['bpc']:.4f} | {r['bpc'] - base['bpc']:+.4f} |"
        print(line)
    if a.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
