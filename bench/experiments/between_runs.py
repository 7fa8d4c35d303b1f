"""What the Python between two decode runs costs, and whether a second thread can hide it.

Two measurements on the bare in-place loop (the engine's runner, no scheduler or sampler), batch
1 by default, every variant once per round, interleaved, medians of the rounds:

- ``touch``: the loop touches N bytes of memory between runs (as an engine step's bookkeeping
  does): the run itself gets slower, not only the step (time inside ``run_with_iobinding`` is
  reported apart).
- ``thread``: the run goes to a second thread (ONNX Runtime releases the GIL while it runs)
  while this thread does ``--work-us`` of Python, as an engine overlapping its bookkeeping with
  the next run would; against doing the same work in line. ``--switch-interval`` sets
  ``sys.setswitchinterval`` (how long a thread waiting for the GIL lets the holder run).

    python -m bench.experiments.between_runs --bundle artifacts/small --batch 1 --rounds 15
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> None:
    from bundle.format import load_bundle
    from service.engine.kv.inplace_batch import InplaceBatch, InplaceRunner

    p = argparse.ArgumentParser(prog="python -m bench.experiments.between_runs")
    p.add_argument("--bundle", type=Path, default=Path("artifacts/small"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--work-us", type=float, default=100.0)
    p.add_argument("--switch-interval", type=float, default=0.005)
    a = p.parse_args(argv)
    sys.setswitchinterval(a.switch_interval)

    bundle = load_bundle(a.bundle)
    runner = InplaceRunner(bundle, a.batch, 1)
    batch = InplaceBatch(runner, bundle.pad_id)
    prompts = [[bundle.bos_id, *range(5, 36)] for _ in range(a.batch)]
    in_run = [0.0]
    session_run = runner.session.run_with_iobinding

    class TimedSession:  # the runner's session, with the time inside run_with_iobinding counted
        def __getattr__(self, name: str):
            return getattr(runner.session_inner, name)

        def run_with_iobinding(self, binding) -> None:
            t = time.perf_counter()
            session_run(binding)
            in_run[0] += time.perf_counter() - t

    runner.session_inner, runner.session = runner.session, TimedSession()

    def busy(us: float) -> None:
        end = time.perf_counter() + us * 1e-6
        x = 0
        while time.perf_counter() < end:
            x += sum(range(50))

    def loop(between: Callable[[], None]) -> float:
        t0 = time.perf_counter()
        nxt = batch.prefill([str(i) for i in range(a.batch)], prompts).argmax(axis=1)
        for _ in range(a.steps - 1):
            nxt = batch.decode(nxt).argmax(axis=1)
            between()
        batch.clear()
        return time.perf_counter() - t0

    junk = {n: np.ones(n // 8) for n in (1 << 18, 1 << 20, 8 << 20)}
    variants: dict[str, Callable[[], float]] = {"touch 0": lambda: loop(lambda: None)}
    def touching(arr: np.ndarray) -> Callable[[], float]:
        return lambda: loop(lambda: arr.__iadd__(1.0))

    for n, arr in junk.items():
        variants[f"touch {n >> 10} KiB"] = touching(arr)

    jobs: queue.SimpleQueue = queue.SimpleQueue()
    done: queue.SimpleQueue = queue.SimpleQueue()

    def model_thread() -> None:
        while True:
            done.put(jobs.get()())

    threading.Thread(target=model_thread, daemon=True).start()

    def threaded() -> float:
        t0 = time.perf_counter()
        nxt = batch.prefill([str(i) for i in range(a.batch)], prompts).argmax(axis=1)
        for _ in range(a.steps - 1):
            lengths = batch.slots.lengths[: a.batch]
            jobs.put(lambda nxt=nxt, lengths=lengths: runner.decode(nxt, lengths))
            busy(a.work_us)  # the bookkeeping this thread would overlap with the run
            logits = done.get()
            batch.slots.advance()
            nxt = logits.argmax(axis=1)
        batch.clear()
        return time.perf_counter() - t0

    variants[f"work {a.work_us:g} us in line"] = lambda: loop(lambda: busy(a.work_us))
    variants[f"work {a.work_us:g} us beside a run on a second thread"] = threaded

    walls: dict[str, list[float]] = {k: [] for k in variants}
    runs: dict[str, list[float]] = {k: [] for k in variants}
    for f in variants.values():
        f()  # warm-up
    for _ in range(a.rounds):
        for k, f in variants.items():
            in_run[0] = 0.0
            walls[k].append(f())
            runs[k].append(in_run[0])
    steps = a.steps
    print(f"batch {a.batch}, {a.rounds} interleaved rounds, {steps} tokens per row, switch interval "
          f"{a.switch_interval * 1e6:g} µs; medians of the rounds, per step:\n")
    print("| variant | step (µs) | inside run_with_iobinding (µs) | tokens/s |")
    print("|---|---:|---:|---:|")
    for k in variants:
        w, r = statistics.median(walls[k]), statistics.median(runs[k])
        print(f"| {k} | {w / steps * 1e6:,.0f} | {r / steps * 1e6:,.0f} | {a.batch * steps / w:,.0f} |")


if __name__ == "__main__":
    main()
