"""Where an engine step's time goes: scheduler, session.run, sampler, KV bookkeeping, detokenizer.

Wraps the engine's collaborators with ``time.perf_counter`` timers (nothing in service/ changes),
runs B requests of a fixed shape all admitted at once, and reports milliseconds per decode step
(the prefill step is reported apart). With ``--ort``, the same run again with ONNX Runtime's
profiler: kernel time by operator type against the wall time of ``session.run``.

    python -m bench.experiments.engine_profile --bundle artifacts/small --batches 1,64 --ort

Each wrapped call costs about a microsecond of timer overhead, charged to its own bucket; at
batch 64, the per-row buckets (check_stop, detokenizer) are called 64 times a step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

BUCKETS = {  # concat KV layout: BatchCache; inplace: SlotCache + InplaceRunner
    "schedule": "scheduler.schedule()",
    "decode_inputs": "BatchCache / SlotCache .decode_inputs (mask, ids)",
    "session.run": "InferenceSession.run / run_with_iobinding",
    "runner_rest": "runner.run minus session.run (feed dict or binding, logits slice copy)",
    "advance": "BatchCache / SlotCache .advance",
    "keep": "BatchCache.keep (drop finished rows, trim) / SlotCache.keep + InplaceRunner.apply (fill holes)",
    "merge": "BatchCache.merge + left_pad_prompts / SlotCache.join + right_pad_prompts",
    "sample": "sampler.sample",
    "check_stop": "sampler.check_stop (per row)",
    "detokenize": "IncrementalDetokenizer.add/flush (per row)",
    "other": "the rest of step(): per-row Python loop, outputs, timings, stats",
}


CLOCK: Callable[[], float] = time.perf_counter  # set by --clock


class Timers:
    def __init__(self) -> None:
        self.acc: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable) -> Callable:
        acc, clock = self.acc, CLOCK

        def timed(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[name] += clock() - t0

        return timed


@contextmanager
def patched(obj: Any, attr: str, new: Any):
    old = getattr(obj, attr)
    setattr(obj, attr, new)
    try:
        yield
    finally:
        setattr(obj, attr, old)


def instrument(engine: Any, timers: Timers):
    """Context managers that route the engine's collaborators through timers."""
    import service.engine.engine as se
    import service.engine.kv.concat_batch as sr
    import service.engine.kv.inplace_batch as sri
    from service.engine.detokenizer import IncrementalDetokenizer
    from service.engine.kv.concat_cache import BatchCache
    from service.engine.kv.inplace_cache import SlotCache

    w = timers.wrap
    sess = engine.runner.session
    return [
        patched(engine.scheduler, "schedule", w("schedule", engine.scheduler.schedule)),
        patched(sess, "run", w("session.run", sess.run)),
        patched(sess, "run_with_iobinding", w("session.run", sess.run_with_iobinding)),
        patched(engine.runner, "run", w("runner", engine.runner.run)),
        patched(se, "sample", w("sample", se.sample)),
        patched(se, "check_stop", w("check_stop", se.check_stop)),
        patched(sr, "left_pad_prompts", w("merge", sr.left_pad_prompts)),
        patched(sri, "right_pad_prompts", w("merge", sri.right_pad_prompts)),
        patched(SlotCache, "join", w("merge", SlotCache.join)),
        patched(SlotCache, "decode_inputs", w("decode_inputs", SlotCache.decode_inputs)),
        patched(SlotCache, "advance", w("advance", SlotCache.advance)),
        patched(SlotCache, "keep", w("keep", SlotCache.keep)),
        patched(sri.InplaceRunner, "apply", w("keep", sri.InplaceRunner.apply)),
        patched(IncrementalDetokenizer, "add", w("detokenize", IncrementalDetokenizer.add)),
        patched(IncrementalDetokenizer, "flush", w("detokenize", IncrementalDetokenizer.flush)),
        patched(BatchCache, "decode_inputs", w("decode_inputs", BatchCache.decode_inputs)),
        patched(BatchCache, "advance", w("advance", BatchCache.advance)),
        patched(BatchCache, "keep", w("keep", BatchCache.keep)),
        patched(BatchCache, "merge", w("merge", BatchCache.merge)),
    ]


def requests(bundle: Any, batch: int, prompt_len: int) -> list[list[int]]:
    from bench.engine import make_prompt, text_tokens

    stream = text_tokens(bundle.tokenizer_path)
    offsets = np.random.default_rng([0, batch]).integers(0, len(stream), size=batch)
    return [make_prompt(stream, int(o), prompt_len, bundle.bos_id) for o in offsets]


def profile_steps(
    engine: Any, prompts: list[list[int]], new_tokens: int | list[int], tag: str
) -> dict[str, Any]:
    """Run the requests through engine.step() under timers; per-step breakdown of decode steps
    (steps that admit nobody) and of admission steps (prefill plus the decode of the running rows)."""
    from contextlib import ExitStack

    from service.engine.types import SamplingParams

    timers = Timers()
    steps: list[tuple[bool, float, dict[str, float]]] = []  # (prefill step?, wall, buckets)
    with ExitStack() as stack:
        for cm in instrument(engine, timers):
            stack.enter_context(cm)
        lengths = new_tokens if isinstance(new_tokens, list) else [new_tokens] * len(prompts)
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
            engine.add_request(
                f"{tag}-{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            )
        while engine.has_unfinished():
            before = dict(timers.acc)
            t0 = CLOCK()
            engine.step()
            wall = CLOCK() - t0
            delta = {k: v - before.get(k, 0.0) for k, v in timers.acc.items()}
            stats = engine.last_step_stats
            steps.append((stats is not None and stats.num_prefill_tokens > 0, wall, delta))
    decode = [(w, d) for pre, w, d in steps if not pre]
    prefill = [(w, d) for pre, w, d in steps if pre]

    def breakdown(rows: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
        n = max(len(rows), 1)
        tot = {k: sum(d.get(k, 0.0) for _, d in rows) / n * 1e3 for k in (*BUCKETS, "runner")}
        tot["runner_rest"] = tot.pop("runner") - tot["session.run"]
        wall = sum(w for w, _ in rows) / n * 1e3
        tot["other"] = wall - sum(v for k, v in tot.items() if k != "other")
        tot["step"] = wall
        return tot

    total = sum(w for _, w, _ in steps)
    return {
        "decode_steps": len(decode),
        "decode_ms": breakdown(decode),
        "prefill_steps": len(prefill),
        "prefill_ms": breakdown(prefill),
        "total_s": total,
        "all_ms": breakdown([(w, d) for _, w, d in steps]),
        "steps": len(steps),
    }


def ort_profile(
    engine: Any, prompts: list[list[int]], new_tokens: int, threads: int, tag: str
) -> dict[str, Any]:
    """Kernel time by op type vs session.run wall time, over the decode steps (ONNX Runtime profiler)."""
    from contextlib import ExitStack

    import onnxruntime as ort

    from service.engine.types import SamplingParams

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = f"/tmp/ort-profile-{os.getpid()}-{tag}"
    path = engine.bundle.kv_inplace_path if engine.kv_layout == "inplace" else engine.bundle.onnx_path
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    with ExitStack() as stack:
        stack.enter_context(patched(engine.runner, "session", sess))
        if engine.kv_layout == "inplace":  # the in-place runner's IO binding belongs to its session
            stack.enter_context(patched(engine.runner, "_binding", sess.io_binding()))
            stack.enter_context(patched(engine.runner, "_bound", None))
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        for i, p in enumerate(prompts):
            engine.add_request(f"{tag}-{i}", p, params)
        while engine.has_unfinished():
            engine.step()
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink(missing_ok=True)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    # The first run is the prefill: skip it and the nodes inside it.
    first_end = runs[0]["ts"] + runs[0]["dur"] if runs else 0
    decode_runs = runs[1:]
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_end:
            by_op[e["args"].get("op_name", "?")] += e["dur"]
    n = max(len(decode_runs), 1)
    run_us = sum(e["dur"] for e in decode_runs) / n
    kernel_us = sum(by_op.values()) / n
    return {
        "runs": len(decode_runs),
        "model_run_us": run_us,
        "kernel_us": kernel_us,
        "by_op_us": dict(sorted(((k, v / n) for k, v in by_op.items()), key=lambda kv: -kv[1])),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.experiments.engine_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=Path("artifacts/small"))
    p.add_argument("--batches", default="1,64", help="batch sizes (default 1,64)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1; 0: all cores)")
    p.add_argument("--repeat", type=int, default=3, help="runs per batch size; the fastest is reported")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default=None,
        help="wall: perf_counter; cpu: the thread's CPU time, robust to other load but blind to "
        "ONNX Runtime's worker threads (default: cpu with one thread, else wall)",
    )
    p.add_argument("--ort", action="store_true", help="also profile ONNX Runtime kernels by op type")
    p.add_argument(
        "--mixed",
        type=int,
        default=0,
        metavar="N",
        help="also profile bench.engine's mixed workload: N requests, --mixed-concurrency in flight",
    )
    p.add_argument("--mixed-concurrency", type=int, default=32)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    from bundle.format import load_bundle
    from service.engine.config import EngineConfig
    from service.engine.engine import Engine

    threads = a.threads or os.cpu_count() or 1
    global CLOCK
    clock = a.clock or ("cpu" if threads == 1 else "wall")
    CLOCK = time.thread_time if clock == "cpu" else time.perf_counter
    print(f"{threads} ONNX Runtime thread(s), {clock} clock")
    bundle = load_bundle(a.bundle)
    results: dict[str, Any] = {}
    for batch in [int(x) for x in a.batches.split(",")]:
        engine = Engine(
            bundle,
            EngineConfig(
                provider="cpu",
                intra_op_threads=threads,
                max_running=batch,
                max_prefill_tokens=max(4096, batch * a.prompt_len),
            ),
        )
        prompts = requests(bundle, batch, a.prompt_len)
        profile_steps(engine, prompts, 4, f"warm{batch}")
        runs = [profile_steps(engine, prompts, a.new_tokens, f"b{batch}r{i}") for i in range(a.repeat)]
        best = min(runs, key=lambda r: r["decode_ms"]["step"])
        d = best["decode_ms"]
        print(
            f"\nbatch {batch}: {best['decode_steps']} decode steps, {d['step']:.3f} ms per step "
            f"({batch / d['step'] * 1e3:,.0f} tokens/s in decode); prefill step {best['prefill_ms']['step']:.2f} ms"
        )
        print("| part | ms per decode step | share |\n|---|---:|---:|")
        for k, desc in BUCKETS.items():
            print(f"| {k}: {desc} | {d[k]:.3f} | {100 * d[k] / d['step']:.1f}% |")
        results[f"batch {batch}"] = best
        if a.ort:
            o = ort_profile(engine, prompts, a.new_tokens, threads, f"b{batch}")
            top = ", ".join(f"{k} {v:.0f}" for k, v in list(o["by_op_us"].items())[:8])
            print(
                f"ONNX Runtime profiler, decode runs: model_run {o['model_run_us']:.0f} µs, kernels "
                f"{o['kernel_us']:.0f} µs ({100 * o['kernel_us'] / o['model_run_us']:.0f}%); by op (µs): {top}"
            )
            results[f"batch {batch}"]["ort"] = o
    if a.mixed:
        from bench.engine import mixed_workload, text_tokens

        wl = mixed_workload(text_tokens(bundle.tokenizer_path), bundle.bos_id, a.mixed, a.mixed_concurrency)
        engine = Engine(
            bundle,
            EngineConfig(
                provider="cpu",
                intra_op_threads=threads,
                max_running=a.mixed_concurrency,
                max_waiting=4096,
                max_prefill_tokens=4096,
            ),
        )
        prompts, lengths = [r.prompt for r in wl.requests], [r.max_tokens for r in wl.requests]
        profile_steps(engine, prompts[:2], 4, "warm-mixed")
        runs = [profile_steps(engine, prompts, lengths, f"mixed{i}") for i in range(a.repeat)]
        best = min(runs, key=lambda r: r["total_s"])
        print(
            f"\nmixed: {a.mixed} requests, {a.mixed_concurrency} in flight: {best['steps']} steps in "
            f"{best['total_s']:.2f} s ({wl.output_tokens / best['total_s']:,.0f} tokens/s); "
            f"{best['prefill_steps']} steps admit requests"
        )
        print("| part | ms per step (all steps) | share | ms per admission step | ms per decode-only step |")
        print("|---|---:|---:|---:|---:|")
        for k, desc in BUCKETS.items():
            print(
                f"| {k}: {desc} | {best['all_ms'][k]:.3f} | {100 * best['all_ms'][k] / best['all_ms']['step']:.1f}% "
                f"| {best['prefill_ms'][k]:.3f} | {best['decode_ms'][k]:.3f} |"
            )
        print(
            f"| step | {best['all_ms']['step']:.3f} | 100% | {best['prefill_ms']['step']:.3f} | "
            f"{best['decode_ms']['step']:.3f} |"
        )
        results["mixed"] = best
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
