"""Where an engine step's time goes, from the engine's own step stats: scheduling, the model run,
and the rest (sampling, sequence updates, detokenizer, outputs).

Reads ``Engine.last_step_stats`` after every ``step()`` (``schedule_time``, ``model_time``,
``step_time``: time.monotonic, so wall time); nothing in service/ is patched. Runs B requests of
a fixed shape all admitted at once and reports milliseconds per decode step (steps that admit
nobody; the admission step is reported apart), best of --repeat runs; ``--mixed N`` also runs
bench.engine's mixed workload. A finer split (detokenizer, stop checks, KV bookkeeping) and ONNX
Runtime's kernel profile, measured once with timers patched into private functions, are in
docs/BENCHMARKS.md ("Where an engine step goes").

    python -m bench.engine_profile --bundle artifacts/small --batches 1,64 --mixed 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

PHASES = {
    "schedule": "scheduler, the running batch's bookkeeping, speculative drafts",
    "model": "the model run: ONNX Runtime and the KV layout's inputs around it",
    "rest": "sampling, sequence updates, detokenizer, stop checks, outputs",
}


def requests(bundle: Any, batch: int, prompt_len: int) -> list[list[int]]:
    """``batch`` prompts of ``prompt_len`` tokens from the benchmark passage, seeded by the batch size."""
    from bench.engine import make_prompt, text_tokens

    stream = text_tokens(bundle.tokenizer_path)
    offsets = np.random.default_rng([0, batch]).integers(0, len(stream), size=batch)
    return [make_prompt(stream, int(o), prompt_len, bundle.bos_id) for o in offsets]


def breakdown(steps: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Mean milliseconds per step of each phase and of the whole step, and tokens emitted per step."""
    n = max(len(steps), 1)
    out = {k: sum(p[k] for _, p in steps) / n * 1e3 for k in (*PHASES, "step")}
    out["tokens"] = sum(t for t, _ in steps) / n
    return out


def profile_steps(
    engine: Any, prompts: list[list[int]], new_tokens: int | list[int], tag: str
) -> dict[str, Any]:
    """Run the requests through ``engine.step()``; per-step breakdown of decode steps (steps that
    admit nobody) and of admission steps (prefill plus the decode of the running rows)."""
    from service.engine.types import SamplingParams

    lengths = new_tokens if isinstance(new_tokens, list) else [new_tokens] * len(prompts)
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        engine.add_request(f"{tag}-{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    decode: list[tuple[int, dict[str, float]]] = []
    prefill: list[tuple[int, dict[str, float]]] = []
    while engine.has_unfinished():
        tokens = sum(len(o.new_token_ids) for o in engine.step())
        s = engine.last_step_stats
        phases = {"schedule": s.schedule_time, "model": s.model_time, "step": s.step_time,
                  "rest": s.step_time - s.schedule_time - s.model_time}  # fmt: skip
        (prefill if s.num_prefill_tokens else decode).append((tokens, phases))
    return {
        "decode_steps": len(decode),
        "decode_ms": breakdown(decode),
        "prefill_steps": len(prefill),
        "prefill_ms": breakdown(prefill),
        "steps": len(decode) + len(prefill),
        "total_s": sum(p["step"] for _, p in decode + prefill),
        "all_ms": breakdown(decode + prefill),
    }


def print_table(best: dict[str, Any], mixed: bool) -> None:
    if not mixed:
        d = best["decode_ms"]
        print("| part | ms per decode step | share |\n|---|---:|---:|")
        for k, desc in PHASES.items():
            print(f"| {k}: {desc} | {d[k]:.3f} | {100 * d[k] / d['step']:.1f}% |")
        return
    print("| part | ms per step (all steps) | share | ms per admission step | ms per decode-only step |")
    print("|---|---:|---:|---:|---:|")
    for k, desc in [*PHASES.items(), ("step", "")]:
        a = best["all_ms"]
        name = f"{k}: {desc}" if desc else k
        print(f"| {name} | {a[k]:.3f} | {100 * a[k] / a['step']:.1f}% | {best['prefill_ms'][k]:.3f} "
              f"| {best['decode_ms'][k]:.3f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from bench.engine import add_workload_args

    p = argparse.ArgumentParser(prog="python -m bench.engine_profile", description=__doc__.split("\n\n")[0])
    add_workload_args(p, [1, 64])
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1; 0: all cores)")
    p.add_argument("--repeat", type=int, default=3, help="runs per batch size; the fastest is reported")
    p.add_argument("--mixed", type=int, default=0, metavar="N",
                   help="also profile bench.engine's mixed workload: N requests, --mixed-concurrency in flight")
    p.add_argument("--mixed-concurrency", type=int, default=32)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    from bundle.format import load_bundle
    from service.engine.config import EngineConfig
    from service.engine.engine import Engine

    threads = a.threads or os.cpu_count() or 1
    print(f"{threads} ONNX Runtime thread(s), wall clock")
    bundle = load_bundle(a.bundle)
    results: dict[str, Any] = {}
    for batch in a.batches:
        config = EngineConfig(provider="cpu", intra_op_threads=threads, max_running=batch,
                              max_prefill_tokens=max(4096, batch * a.prompt_len))  # fmt: skip
        engine = Engine(bundle, config)
        prompts = requests(bundle, batch, a.prompt_len)
        profile_steps(engine, prompts, 4, f"warm{batch}")
        runs = [profile_steps(engine, prompts, a.new_tokens, f"b{batch}r{i}") for i in range(a.repeat)]
        best = min(runs, key=lambda r: r["decode_ms"]["step"])
        d = best["decode_ms"]
        print(
            f"\nbatch {batch}: {best['decode_steps']} decode steps, {d['step']:.3f} ms and {d['tokens']:.2f} "
            f"tokens per step ({d['tokens'] / d['step'] * 1e3:,.0f} tokens/s in decode); "
            f"admission step {best['prefill_ms']['step']:.2f} ms"
        )
        print_table(best, mixed=False)
        results[f"batch {batch}"] = best
    if a.mixed:
        from bench.engine import mixed_workload, text_tokens

        wl = mixed_workload(text_tokens(bundle.tokenizer_path), bundle.bos_id, a.mixed, a.mixed_concurrency)
        config = EngineConfig(provider="cpu", intra_op_threads=threads, max_running=a.mixed_concurrency,
                              max_waiting=4096, max_prefill_tokens=4096)  # fmt: skip
        engine = Engine(bundle, config)
        prompts, lengths = [r.prompt for r in wl.requests], [r.max_tokens for r in wl.requests]
        profile_steps(engine, prompts[:2], 4, "warm-mixed")
        runs = [profile_steps(engine, prompts, lengths, f"mixed{i}") for i in range(a.repeat)]
        best = min(runs, key=lambda r: r["total_s"])
        print(
            f"\nmixed: {a.mixed} requests, {a.mixed_concurrency} in flight: {best['steps']} steps in "
            f"{best['total_s']:.2f} s ({wl.output_tokens / best['total_s']:,.0f} tokens/s); "
            f"{best['prefill_steps']} steps admit requests"
        )
        print_table(best, mixed=True)
        results["mixed"] = best
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
