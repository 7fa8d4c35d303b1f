"""The engine offline: no HTTP, no processes; a closed loop of N sequences over the same workload.

    python -m bench.baselines.offline --bundle artifacts/small --concurrency 32 --num-requests 128 \\
        --prompt-len 16:128 --output-len 16:256 --seed 0 --out offline.json

The same requests as ``bench.serve`` sends for the same seed and lengths (prompts are built
by ``bench.workload`` with a local token counter that counts as the service's ``/tokenize``).
N requests are added at the start; each time one finishes, the next is added before the next
step. Times are taken as the harness takes them on the client: TTFT from before ``add_request`` to
the first output with text (the prefill step's output), ITL from the outputs with text (``bench.serve.spread_itl``), e2e to
the final output. The result is a ``bench.serve.BenchmarkResult`` (its summary adds
``cpu_s.offline``, the CPU seconds of this process during the run): the ceiling the HTTP
servers are compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.baselines.common import PromptEncoder, build_engine, engine_config
from bench.serve import BenchmarkResult, RequestRecord, spread_itl, summarize
from bench.workload import build_prompt, parse_range, plan_prompts, sample_requests
from service.engine.types import SamplingParams


def build_prompts(
    encoder: PromptEncoder, n: int, prompt_len: tuple[int, int], output_len: tuple[int, int], seed: int
) -> list[tuple[list[int], int]]:
    """``(prompt_ids, max_tokens)`` of the workload, identical to what the servers receive."""

    async def count(text: str) -> int:
        return len(encoder.encode(text))

    async def prepare() -> list[str]:
        plan = await plan_prompts(count)
        specs = sample_requests(n, prompt_len, output_len, seed)
        return [(await build_prompt(s, plan, count))[0] for s in specs]

    specs = sample_requests(n, prompt_len, output_len, seed)
    texts = asyncio.run(prepare())
    return [(encoder.encode(t), s.output_len) for t, s in zip(texts, specs, strict=True)]


@dataclass
class _Live:
    start: float
    prompt_tokens: int
    chunk_times: list[float] = field(default_factory=list)


def run_offline(
    engine: Any,
    requests: list[tuple[list[int], int]],
    concurrency: int,
    progress: bool = False,
    temperature: float = 0.0,
    seed: int = 0,
) -> tuple[list[RequestRecord], float]:
    """Closed loop of ``concurrency`` sequences over ``requests``; (records, duration in s)."""
    records: dict[int, RequestRecord] = {}
    live: dict[str, _Live] = {}
    pending = iter(enumerate(requests))
    t0 = time.perf_counter()

    def admit() -> None:
        while len(live) < concurrency and (nxt := next(pending, None)) is not None:
            i, (ids, max_tokens) = nxt
            rid = str(i)
            params = SamplingParams(
                max_tokens=max_tokens, temperature=temperature, seed=seed + i, ignore_eos=True
            )
            start = time.perf_counter()  # the engine's own intake counts, as it does for a served request
            engine.add_request(rid, ids, params)
            live[rid] = _Live(start, len(ids))

    admit()
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            s = live[out.request_id]
            if out.text_delta:
                s.chunk_times.append(now)
            if out.finished:
                del live[out.request_id]
                ok = out.finish_reason in ("length", "stop")
                records[int(out.request_id)] = RequestRecord(
                    start=s.start - t0,
                    ttft=s.chunk_times[0] - s.start if s.chunk_times else None,
                    itl=spread_itl(s.chunk_times, out.num_output_tokens),
                    e2e=now - s.start,
                    output_tokens=out.num_output_tokens,
                    prompt_tokens=s.prompt_tokens,
                    ok=ok,
                    status=200 if ok else None,
                    error=None if ok else (out.error or f"finish_reason {out.finish_reason!r}"),
                )
                if progress:
                    print(f"\r{len(records)}/{len(requests)}", end="", file=sys.stderr)
        admit()
    if progress:
        print(file=sys.stderr)
    return [records[i] for i in sorted(records)], time.perf_counter() - t0


def benchmark_offline(
    bundle_dir: str | Path,
    concurrency: int,
    num_requests: int,
    prompt_len: tuple[int, int],
    output_len: tuple[int, int],
    seed: int = 0,
    warmup: int = 4,
    progress: bool = False,
    temperature: float = 0.0,
) -> BenchmarkResult:
    """Build the engine as the service would, warm it up, run the workload; the harness's result."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    encoder = PromptEncoder.load(bundle_dir)
    requests = build_prompts(encoder, num_requests, prompt_len, output_len, seed)
    engine = build_engine(bundle_dir, max_running=None)
    if engine.scheduler.max_running < concurrency:
        engine = build_engine(bundle_dir, max_running=concurrency)
    if warmup:  # on prompts of their own: the measured ones must not find their blocks in the prefix cache
        others = build_prompts(encoder, warmup, prompt_len, output_len, seed + 1)
        run_offline(engine, [(ids, 8) for ids, _ in others], warmup)
    cpu0 = time.process_time()
    records, duration = run_offline(engine, requests, concurrency, progress, temperature, seed)
    cpu = time.process_time() - cpu0
    config = {
        "url": None,
        "endpoint": "offline",
        "model": encoder.model_name,
        "concurrency": concurrency,
        "num_requests": num_requests,
        "prompt_len": list(prompt_len),
        "output_len": list(output_len),
        "seed": seed,
        "temperature": temperature,
        "ignore_eos": True,
        "mode": "closed",
        "engine": asdict(engine_config(bundle_dir, max_running=engine.scheduler.max_running)),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    summary = summarize(records, duration, {}, concurrency)
    summary["cpu_s"] = {"offline": cpu}  # this process's CPU during the run (ONNX Runtime threads included)
    return BenchmarkResult(config=config, summary=summary, requests=records)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.baselines.offline",
        description="Run the engine in-process (no HTTP) on the serving workload: the ceiling.",
    )
    p.add_argument("--bundle", required=True, help="model bundle folder")
    p.add_argument("--concurrency", type=int, default=32, help="sequences in flight (default: 32)")
    p.add_argument("--num-requests", type=int, default=128, help="default: 128")
    p.add_argument("--prompt-len", default="16:128", help="MIN:MAX tokens (default: 16:128)")
    p.add_argument("--output-len", default="16:256", help="MIN:MAX tokens (default: 16:256)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    p.add_argument("--out", default=None, help="write the JSON result here")
    args = p.parse_args(argv)
    try:
        result = benchmark_offline(
            args.bundle,
            args.concurrency,
            args.num_requests,
            parse_range(args.prompt_len, "--prompt-len"),
            parse_range(args.output_len, "--output-len"),
            args.seed,
            progress=True,
        )
    except ValueError as e:
        p.error(str(e))
    from bench.serve import markdown_table

    print(markdown_table(result))
    s = result.summary
    cpu = s["cpu_s"]["offline"]
    print(
        f"\nCPU: {cpu:.1f} s in {s['duration_s']:.1f} s ({cpu / s['duration_s']:.2f} cores); "
        f"{s['total_output_tokens'] / cpu:.0f} output tokens per CPU-second"
    )
    if args.out:
        result.write_json(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
