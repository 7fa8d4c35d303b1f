"""What the sampler costs per decode step at real vocabulary sizes (32k to 152k), by batch size.

    python -m bench.sampler_vocab [--vocab 32000 152064] [--batch 1 8 32] [--repeats 30]

One ``service.engine.sampler.sample`` call per step over (batch, vocab) float32 logits, for the settings a
request can ask: greedy, temperature with top-k, top-p, top-p with penalties (repetition, presence,
frequency over 512 seen tokens), and logprobs (5 alternatives). Two kinds of logits: "peaked"
(a trained model's: a few tokens hold most of the mass, the nucleus is small) and "flat" (a random
model's: top-p 0.95 keeps most of the vocabulary, the worst case for the nucleus search).
For scale, the last row times the output head alone, ``hidden @ W`` for a model of width
``--width`` (768: a ~100M-parameter model), part of every decode step of a model with that
vocabulary. Prints a markdown table of median milliseconds per step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from service.engine.sampler import sample
from service.engine.types import SamplingParams

SETTINGS: dict[str, SamplingParams] = {
    "greedy": SamplingParams(temperature=0.0),
    "temp 0.8 + top-k 50": SamplingParams(temperature=0.8, top_k=50),
    "top-p 0.95": SamplingParams(temperature=1.0, top_p=0.95),
    "top-k 20 + top-p 0.8 + penalties": SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.1,
                                                       presence_penalty=0.5, frequency_penalty=0.5),
    "top-p 0.95 + penalties": SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.1,
                                             presence_penalty=0.5, frequency_penalty=0.5),
    "top-p 0.95 + logprobs 5": SamplingParams(temperature=1.0, top_p=0.95, logprobs=5),
}


def logits_of(kind: str, batch: int, vocab: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "flat":
        return rng.standard_normal((batch, vocab), dtype=np.float32)
    # peaked: a Zipf-like head, as trained models produce (the top token ~30-60% of the mass)
    ranks = np.arange(1, vocab + 1, dtype=np.float32)
    base = -1.1 * np.log(ranks) * 3.0
    return np.stack([rng.permutation(base) + 0.3 * rng.standard_normal(vocab, dtype=np.float32) for _ in range(batch)])


def time_step(logits: np.ndarray, params: SamplingParams, repeats: int, rng: np.random.Generator) -> float:
    B = len(logits)
    prompts = [rng.integers(0, logits.shape[1], 384).tolist() for _ in range(B)]
    outputs = [rng.integers(0, logits.shape[1], 128).tolist() for _ in range(B)]
    rngs = [np.random.default_rng(i) for i in range(B)]
    sample(logits, [params] * B, rngs, prompts, outputs)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sample(logits, [params] * B, rngs, prompts, outputs)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--kinds", nargs="+", default=["peaked", "flat"])
    ap.add_argument("--width", type=int, default=768, help="model width for the output-head row")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    cols = [(v, b) for v in a.vocab for b in a.batch]
    print("| setting | logits | " + " | ".join(f"V={v // 1000}k B={b}" for v, b in cols) + " |")
    print("|---|---|" + "---:|" * len(cols))
    for kind in a.kinds:
        data = {(v, b): logits_of(kind, b, v, rng) for v, b in cols}
        for name, params in SETTINGS.items():
            ms = [time_step(data[c], params, a.repeats, rng) for c in cols]
            print(f"| {name} | {kind} | " + " | ".join(f"{x:.2f}" for x in ms) + " |", flush=True)
    heads = []
    for v, b in cols:
        w = rng.standard_normal((a.width, v), dtype=np.float32)
        h = rng.standard_normal((b, a.width), dtype=np.float32)
        heads.append(_median_ms(lambda h=h, w=w: h @ w, max(3, a.repeats // 3)))
    print(f"| output head matmul, width {a.width} (part of any step) | - | " + " | ".join(f"{x:.2f}" for x in heads) + " |")


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


if __name__ == "__main__":
    main()
