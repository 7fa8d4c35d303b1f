"""The engine step that prefills newcomers sharing a cached prefix, with the prefix cache and without.

    python -m bench.engine_prefix --bundle artifacts/ctx2k --prefix 1392 --suffix 96 --newcomers 4

With the cache, each newcomer is prefilled in a run of its own over its cached blocks (the
in-place layout's attention kernel takes a multi-token run over a past for one row only);
without it, all newcomers are prefilled whole in one batched run. Both KV layouts; medians.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from bundle.format import load_bundle
from service.engine.engine import Engine
from service.engine.types import SamplingParams


def measure(bundle_dir: str, layout: str, cache: bool, prefix: int, suffix: int, newcomers: int, reps: int,
            threads: int) -> float:
    """Median seconds of the step that admits ``newcomers`` prompts of prefix + suffix tokens."""
    rng = random.Random(0)
    shared = [rng.randrange(5, 1000) for _ in range(prefix)]
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine = Engine(load_bundle(bundle_dir), provider="cpu", kv_inplace="auto" if layout == "inplace" else "off",
                    intra_op_threads=threads, max_running=newcomers + 1, max_prefill_tokens=10**6,
                    prefix_caching=cache)
    times = []
    for rep in range(reps + 1):  # the first repetition warms up (and caches the prefix)
        engine.add_request(f"first{rep}", shared + [rng.randrange(5, 1000) for _ in range(suffix)], params)
        while engine.has_unfinished():
            engine.step()
        for k in range(newcomers):
            engine.add_request(f"r{rep}.{k}", shared + [rng.randrange(5, 1000) for _ in range(suffix)], params)
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
        while engine.has_unfinished():
            engine.step()
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.engine_prefix", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="model bundle folder")
    p.add_argument("--prefix", type=int, default=1392, help="shared prompt tokens (default: 1392)")
    p.add_argument("--suffix", type=int, default=96, help="tokens of each newcomer after the prefix (default: 96)")
    p.add_argument("--newcomers", type=int, default=4, help="prompts admitted in the measured step (default: 4)")
    p.add_argument("--reps", type=int, default=3, help="measured repetitions (default: 3)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default: 1)")
    a = p.parse_args(argv)
    for layout in ("inplace", "concat"):
        ms = {c: 1000 * measure(a.bundle, layout, c, a.prefix, a.suffix, a.newcomers, a.reps, a.threads)
              for c in (True, False)}
        print(f"{layout}: {ms[True]:.1f} ms with the cache, {ms[False]:.1f} ms without "
              f"({ms[False] / ms[True]:.1f}x), step prefilling {a.newcomers} x ({a.prefix} + {a.suffix}) tokens")


if __name__ == "__main__":
    main()
