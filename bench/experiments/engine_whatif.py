"""What-if measurements for proposed engine changes, without touching service/: each proposal is
a drop-in replacement patched in for one run, side by side with the engine as it is.

- ``no-detok``: the detokenizer replaced by a stub (an upper bound for any detokenizer speed-up,
  e.g. a piece table for tokens that need no byte fallback).
- ``greedy-fast``: the sampler short-circuits an all-greedy batch with no penalties and no logprobs
  to ``logits.argmax(1)``.

    python -m bench.experiments.engine_whatif --bundle artifacts/small --batches 1,64 --mixed 64

Tokens per CPU second of one thread (robust to other load); interleaved rounds, best of each.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from unittest.mock import patch

import numpy as np

from bench.engine import EngineRunner, Workload, fixed_workload, measure, mixed_workload, text_tokens


def _detok_stub(self, token_ids):
    from service.engine.detokenizer import DetokenizerUpdate

    return DetokenizerUpdate("")


def _greedy_fast(original: Callable) -> Callable:
    def sample(logits, params, rngs, prompt_ids, output_ids):
        from service.engine.sampler import SamplerOutput

        if all(
            p.temperature == 0
            and p.logprobs is None
            and p.repetition_penalty == 1.0
            and p.presence_penalty == 0.0
            and p.frequency_penalty == 0.0
            for p in params
        ):
            return SamplerOutput(logits.argmax(axis=1).astype(np.int64), None, None)
        return original(logits, params, rngs, prompt_ids, output_ids)

    return sample


def proposal(name: str) -> Iterator[Any]:
    import service.engine.engine as se
    from service.engine.detokenizer import IncrementalDetokenizer

    if name == "no-detok":
        return iter(
            [
                patch.object(IncrementalDetokenizer, "add", _detok_stub),
                patch.object(IncrementalDetokenizer, "flush", lambda self: ""),
            ]
        )
    if name == "greedy-fast":
        return iter([patch.object(se, "sample", _greedy_fast(se.sample))])
    raise ValueError(f"unknown proposal {name!r}; choose from no-detok, greedy-fast")


class PatchedEngine(EngineRunner):
    """The engine with some proposals patched in for the duration of each run."""

    def __init__(self, bundle: Path, proposals: list[str]):
        super().__init__(bundle, 1, 4096, name="+".join(proposals) or "engine")
        self.proposals = proposals

    def run(self, wl: Workload):
        with ExitStack() as stack:
            for p in self.proposals:
                for cm in proposal(p):
                    stack.enter_context(cm)
            return super().run(wl)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.experiments.engine_whatif", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=Path("artifacts/small"))
    p.add_argument("--batches", default="1,64")
    p.add_argument(
        "--mixed", type=int, default=64, metavar="N", help="mixed workload of N requests (0: none)"
    )
    p.add_argument("--proposals", default="no-detok,greedy-fast")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    from bundle.format import load_bundle

    bundle = load_bundle(a.bundle)
    stream = text_tokens(bundle.tokenizer_path)
    props = [x for x in a.proposals.split(",") if x]
    runners = [PatchedEngine(a.bundle, []), *(PatchedEngine(a.bundle, [x]) for x in props)]
    if len(props) > 1:
        runners.append(PatchedEngine(a.bundle, props))
    workloads = [fixed_workload(stream, bundle.bos_id, int(b), 32, 128) for b in a.batches.split(",")]
    if a.mixed:
        workloads.append(mixed_workload(stream, bundle.bos_id, a.mixed, 32))
    print("| variant | " + " | ".join(w.name for w in workloads) + " |")
    print("|---|" + "---:|" * len(workloads))
    table: dict[str, list[str]] = {r.name: [] for r in runners}
    for wl in workloads:
        results = measure(runners, wl, a.repeat)
        base = results[0][0].tokens_per_cpu_s
        for m, outs in results:
            assert outs == results[0][1], f"{m.runner} changed the tokens on {wl.name}"
            table[m.runner].append(f"{m.tokens_per_cpu_s:,.0f} ({m.tokens_per_cpu_s / base:.2f}x)")
        print(f"done {wl.name}", file=sys.stderr)
    for name, cells in table.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
