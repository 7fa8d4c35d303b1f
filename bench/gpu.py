"""The GPU check in one command: providers, parity, decode speed against its floor and the
alternatives, and the served service, written to DIR/gpu.json and DIR/gpu.md.

    python -m bench.gpu --bundle B --fp16-bundle B16 --checkpoint W --out DIR [--dry-run]

Steps, each in its own subprocess with a hard time limit, so that a hung or failed step is
recorded in gpu.json and the others still run (a GPU window is short):

1. ``checks``: ONNX Runtime runs the requested provider for model.onnx (fp32, fp16) and the fp16
   model.kvinplace.onnx (no silent CPU fallback: provider list, profiled node placement), and a
   decode step copies only the logits to the host (bench/gpu_checks.py);
2. ``parity``: fp32 bundle against the PyTorch model on the same device, fp16 bundle, and the
   static path's tokens against the generic path's (bench/gpu_parity.py);
3. ``floors``: device copy bandwidth and matrix rates (bench/gpu_device.py), for each decode
   step's floor (bench/gpu_floors.py);
4. ``decode``: the engine (fp32, fp16; concat, static, static + CUDA graphs), PyTorch eager and
   transformers generate() at batch 1, 8, 32, 64, 128 (bench/gpu_decode.py);
5. ``serve``: ``python -m service`` under bench/serve.py at 64 clients, and the offline engine at
   the same concurrency (bench/gpu_serve.py).

It never trains and never downloads: the bundles and the checkpoint's weights come with it
(bench/gpu_pack.py prepares them; docs/gpu.md has the whole procedure). ``--dry-run`` runs every
step on the CPU with the CPU provider at small sizes, so the test suite runs this script.
The exit status is 0 when every step ran and passed its checks, else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("env", "checks", "parity", "floors", "decode", "serve")


@dataclass
class Plan:
    """Sizes and time limits; ``for_args`` picks the GPU or the dry-run ones."""

    device: str
    batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    repeats: int
    parity_steps: int
    serve_concurrency: int
    serve_requests: int
    serve_prompt_len: int
    serve_new_tokens: int
    copy_bytes: int
    matmul_n: int
    budget_s: float
    step_limits_s: dict[str, float] = field(default_factory=dict)

    @classmethod
    def for_args(cls, a: argparse.Namespace) -> Plan:
        if a.dry_run:
            plan = cls(device=a.provider or "cpu", batches=(1, 4), prompt_len=16, new_tokens=8, repeats=1,
                       parity_steps=4, serve_concurrency=4, serve_requests=8, serve_prompt_len=16,
                       serve_new_tokens=8, copy_bytes=16 << 20, matmul_n=256, budget_s=300.0,
                       step_limits_s={"env": 60, "checks": 90, "parity": 120, "floors": 60, "decode": 180,
                                      "serve": 180})
        else:
            plan = cls(device=a.provider or "cuda", batches=(1, 8, 32, 64, 128), prompt_len=32, new_tokens=128,
                       repeats=2, parity_steps=16, serve_concurrency=64, serve_requests=256, serve_prompt_len=64,
                       serve_new_tokens=128, copy_bytes=1 << 30, matmul_n=8192, budget_s=330.0,
                       step_limits_s={"env": 45, "checks": 60, "parity": 60, "floors": 30, "decode": 150,
                                      "serve": 120})
        if a.batches:
            plan.batches = tuple(int(x) for x in a.batches.split(","))
        if a.budget_s:
            plan.budget_s = a.budget_s
        return plan


# ---- steps (each runs in a child process: python -m bench.gpu --child STEP) ---------------------


def step_env(a: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    from bench.gpu_device import environment

    return environment(plan.device)


def step_checks(a: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    from bench.gpu_checks import ProviderMismatch, check_graph
    from service.engine.kv.concat_batch import ProviderError

    graphs: dict[str, Any] = {}
    for name, bundle, kind in (("fp32 model.onnx", a.bundle, "concat"), ("fp16 model.onnx", a.fp16_bundle, "concat"),
                               ("fp16 model.kvinplace.onnx", a.fp16_bundle, "static")):
        try:
            graphs[name] = check_graph(bundle, kind, plan.device)
        except (ProviderMismatch, ProviderError) as e:  # loud: the point of this step
            graphs[name] = {"ok": False, "problems": [str(e)], "error": "ProviderMismatch"}
        except Exception as e:
            graphs[name] = {"ok": False, "problems": [f"{type(e).__name__}: {e}"], "error": traceback.format_exc()}
    return {"graphs": graphs, "ok": all(g["ok"] for g in graphs.values())}


def step_parity(a: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    from bench.gpu_parity import parity

    return parity(a.bundle, a.fp16_bundle, a.checkpoint, plan.device, steps=plan.parity_steps)


def step_floors(a: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    from bench.gpu_device import copy_bandwidth, matmul_rate

    return {"copy_bandwidth_bytes_per_s": copy_bandwidth(plan.device, plan.copy_bytes),
            "copy_bytes": plan.copy_bytes,
            "matmul_flops_per_s": {dt: matmul_rate(plan.device, plan.matmul_n, dt) for dt in ("float16", "float32")},
            "matmul_n": plan.matmul_n}


def decode_runners(a: argparse.Namespace, plan: Plan) -> list[tuple[str, Any]]:
    """(name, factory) in the order they run: what the targets need first."""
    from bench.gpu_decode import EngineDecode, HFDecode, TorchDecode
    from bundle.format import load_bundle
    from model.train import load_model

    dev, top = plan.device, max(plan.batches)
    b = load_bundle(a.bundle, verify_hashes=False)
    arch = b.arch

    def torch_model(dtype: str):
        return lambda: TorchDecode(f"torch-{dtype_short(dtype)}", load_model(a.checkpoint)[0], b.pad_id, dev, dtype)

    def hf(dtype: str):
        return lambda: HFDecode(f"hf-{dtype_short(dtype)}", arch, b.bos_id, b.eos_id, b.pad_id, dev, dtype)

    return [
        ("engine-fp16-graph", lambda: EngineDecode("engine-fp16-graph", a.fp16_bundle, dev, top,
                                                   static_decode="on", cuda_graph=True)),
        ("engine-fp32", lambda: EngineDecode("engine-fp32", a.bundle, dev, top, static_decode="off")),
        ("torch-fp16", torch_model("float16")),
        ("hf-fp16", hf("float16")),
        ("engine-fp16", lambda: EngineDecode("engine-fp16", a.fp16_bundle, dev, top, static_decode="off")),
        ("engine-fp16-static", lambda: EngineDecode("engine-fp16-static", a.fp16_bundle, dev, top,
                                                    static_decode="on", cuda_graph=False)),
        ("torch-fp32", torch_model("float32")),
        ("hf-fp32", hf("float32")),
    ]


def dtype_short(dtype: str) -> str:
    return {"float16": "fp16", "float32": "fp32"}[dtype]


def step_decode(a: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    from bench.gpu_decode import make_batch, measure

    deadline = time.monotonic() + a.child_deadline_s
    from bundle.format import load_bundle

    batches = {B: make_batch(a.bundle, B, plan.prompt_len, plan.new_tokens) for B in plan.batches}
    rows: list[dict[str, Any]] = []
    runners: dict[str, Any] = {}
    b = load_bundle(a.bundle, verify_hashes=False)
    model = {"num_parameters": b.num_parameters, "n_layer": b.num_layers, "n_head": b.num_kv_heads,
             "head_dim": b.head_dim}
    result = {"prompt_len": plan.prompt_len, "new_tokens": plan.new_tokens, "model": model, "runners": runners,
              "rows": rows}
    for name, factory in decode_runners(a, plan):
        if time.monotonic() > deadline:
            runners[name] = {"status": "skipped", "why": "out of time"}
            continue
        try:
            r = factory()
            info: dict[str, Any] = {"status": "ok"}
            for attr in ("layout", "cuda_graph", "graph_fallback"):
                if hasattr(r, attr):
                    info[attr] = getattr(r, attr)
            for batch in batches.values():
                if time.monotonic() > deadline:
                    info["status"] = "partial (out of time)"
                    break
                rows.append(measure(r, batch, plan.repeats, deadline))
            runners[name] = info
            del r
        except Exception as e:
            runners[name] = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        _free_device(plan.device)
        _save_partial(a, {**result, "ok": False})  # what a hard timeout would otherwise lose
    return {**result, "ok": all(v["status"] == "ok" for v in runners.values())}


def _save_partial(a: argparse.Namespace, data: dict[str, Any]) -> None:
    """Write a step's result so far (replaced atomically): the parent reports it if the step is killed."""
    tmp = a.out / f".step-{a.child}.json.tmp"
    tmp.write_text(json.dumps(data, default=_jsonable))
    tmp.replace(a.out / f".step-{a.child}.json")


def _free_device(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def step_serve(a: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    from bench.gpu_serve import serve_vs_offline

    res = serve_vs_offline(a.fp16_bundle if plan.device == "cuda" else a.bundle, plan.device,
                           plan.serve_concurrency, plan.serve_requests, plan.serve_prompt_len,
                           plan.serve_new_tokens, a.out / "service.log", start_timeout_s=90.0)
    res["ok"] = res["served"]["failed"] == 0 and res["served"]["completed"] == plan.serve_requests
    return res


STEP_FUNCS = {"env": step_env, "checks": step_checks, "parity": step_parity, "floors": step_floors,
              "decode": step_decode, "serve": step_serve}


# ---- the parent: time-boxed children, then the report -----------------------------------------


def run_step(name: str, argv: list[str], limit_s: float, out: Path) -> dict[str, Any]:
    """Run one step in a child process; its result, or why there is none (error, timeout)."""
    result_file = out / f".step-{name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.gpu", *argv, "--child", name, "--child-deadline-s", str(max(1.0, limit_s - 15))]
    t0 = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with (out / f"step-{name}.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(limit_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            partial = json.loads(result_file.read_text()) if result_file.is_file() else None
            result_file.unlink(missing_ok=True)
            return {"status": "timeout", "seconds": round(time.monotonic() - t0, 1), "limit_s": limit_s,
                    "log_tail": _tail(out / f"step-{name}.log"), **({"result": partial} if partial else {})}
    seconds = round(time.monotonic() - t0, 1)
    if code != 0 or not result_file.is_file():
        return {"status": "error", "exit_code": code, "seconds": seconds, "log_tail": _tail(out / f"step-{name}.log")}
    data = json.loads(result_file.read_text())
    result_file.unlink()
    if "exception" in data:
        return {"status": "error", "seconds": seconds, "error": data["exception"], "traceback": data["traceback"]}
    status = "ok" if data.get("ok", True) else "failed"
    return {"status": status, "seconds": seconds, "result": data}


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


def child(a: argparse.Namespace) -> int:
    plan = Plan.for_args(a)
    out = a.out / f".step-{a.child}.json"
    try:
        data = STEP_FUNCS[a.child](a, plan)
    except Exception as e:
        data = {"exception": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    out.write_text(json.dumps(data, indent=2, default=_jsonable))
    return 0


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serializable: {type(v).__name__}")


def parent(a: argparse.Namespace, argv: list[str]) -> int:
    from bench.gpu_report import markdown, summarize

    plan = Plan.for_args(a)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    steps: dict[str, Any] = {}
    for name in a.steps.split(",") if a.steps else STEPS:
        left = plan.budget_s - (time.monotonic() - t0)
        limit = min(plan.step_limits_s[name], left)
        if limit < 10:
            steps[name] = {"status": "skipped", "why": f"{left:.0f} s of the {plan.budget_s:.0f} s budget left"}
        else:
            print(f"[bench.gpu] {name} (limit {limit:.0f} s) ...", file=sys.stderr, flush=True)
            steps[name] = run_step(name, argv, limit, a.out)
            print(f"[bench.gpu] {name}: {steps[name]['status']} in {steps[name].get('seconds', 0)} s",
                  file=sys.stderr, flush=True)
    report = {
        "command": " ".join(["python -m bench.gpu", *argv, *(["--steps", a.steps] if a.steps else [])]),
        "dry_run": a.dry_run,
        "plan": {k: v for k, v in vars(plan).items()},
        "inputs": {"bundle": str(a.bundle), "fp16_bundle": str(a.fp16_bundle), "checkpoint": str(a.checkpoint)},
        "seconds": round(time.monotonic() - t0, 1),
        "steps": steps,
    }
    report["summary"] = summarize(report)
    (a.out / "gpu.json").write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    (a.out / "gpu.md").write_text(markdown(report))
    print(f"[bench.gpu] wrote {a.out / 'gpu.json'} and {a.out / 'gpu.md'} in {report['seconds']} s", file=sys.stderr)
    return 0 if all(s["status"] == "ok" for s in steps.values()) else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="the fp32 bundle (python -m model build/export)")
    p.add_argument("--fp16-bundle", type=Path, required=True,
                   help="its --fp16 export (float16 model.onnx and model.kvinplace.onnx)")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="the model's weights for PyTorch (a checkpoint, or bench/gpu_pack.py's weights.pt)")
    p.add_argument("--out", type=Path, required=True, help="folder for gpu.json, gpu.md and the step logs")
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU at small sizes (tests the script)")
    p.add_argument("--provider", choices=["cpu", "cuda"], default=None,
                   help="the provider every step requests (default: cuda; cpu with --dry-run)")
    p.add_argument("--steps", default=None, help=f"comma-separated subset of {','.join(STEPS)} (default: all)")
    p.add_argument("--batches", default=None, help="decode batch sizes (default: 1,8,32,64,128; dry run 1,4)")
    p.add_argument("--budget-s", type=float, default=None, help="time for all steps (default: 330; dry run 300)")
    p.add_argument("--child", choices=STEPS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-deadline-s", type=float, default=0.0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps and (bad := [s for s in a.steps.split(",") if s not in STEPS]):
        p.error(f"--steps: unknown {bad}; choose from {','.join(STEPS)}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    for name in ("bundle", "fp16_bundle", "checkpoint", "out"):
        setattr(a, name, getattr(a, name).resolve())  # children run from the repository root
    if a.child:
        return child(a)
    return parent(a, child_argv(a))


def child_argv(a: argparse.Namespace) -> list[str]:
    """The parent's settings as arguments for its children (absolute paths)."""
    argv = ["--bundle", str(a.bundle), "--fp16-bundle", str(a.fp16_bundle), "--checkpoint", str(a.checkpoint),
            "--out", str(a.out)]
    argv += ["--dry-run"] if a.dry_run else []
    for flag, value in (("--provider", a.provider), ("--batches", a.batches), ("--budget-s", a.budget_s)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


if __name__ == "__main__":
    sys.exit(main())
