"""This engine against onnxruntime-genai on the same file, in one process.

``python -m bench.engine`` runs onnxruntime-genai in a subprocess of its own environment (the
project's ``onnxruntime-gpu`` and genai's ``onnxruntime`` cannot share one), so the two sides
differ in more than their code: process, moment, allocator state. On a shared machine whose
speed swings 2x between identical runs, that leaves the ratio within ±20%. Here everything runs
in genai's environment (``make bench-env`` installs the engine's few imports there as well), in
one process, over one ONNX Runtime library: the engine without speculation, the engine as
configured by default, the bare in-place loop over the engine's runner, and genai, interleaved
round by round on the same prompts (bench.engine's workloads). Every runner's tokens are
checked against genai's (greedy, equal prompt lengths: they must be identical).

    .venv-genai/bin/python -m bench.engine_genai --bundle artifacts/small --batches 1,8,32

Prints a markdown table (fastest run and median run per runner and batch, and their ratios to
genai); ``--json`` keeps every run's time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.engine import (
    EngineRunner,
    InplaceLoopRunner,
    Measurement,
    Stopwatch,
    Timing,
    Workload,
    add_workload_args,
    fixed_workload,
    measure,
    text_tokens,
    write_genai_model,
)

RUNNERS = ("engine-nospec", "engine", "ortloop-inplace", "genai")
LABELS = {
    "engine-nospec": "this engine, one token per step",
    "engine": "this engine (default: n-gram speculation at batch 1)",
    "ortloop-inplace": "bare loop over the engine's runner",
    "genai": "onnxruntime-genai",
}


class GenAIInProcess:
    """onnxruntime-genai's Generator over the bundle's in-place decoder, in this process."""

    name = "genai"

    def __init__(self, bundle: Any, model_dir: Path, threads: int):
        import onnxruntime_genai as og

        folder = write_genai_model(bundle, threads, True, model_dir)
        self.model, self.pad_id = og.Model(str(folder)), bundle.pad_id

    def run(self, wl: Workload) -> tuple[Timing, list[list[int]]]:
        from bench.genai_runner import run_batch

        clock = Stopwatch()
        outputs = [
            tok
            for b in wl.static_batches()
            for tok in run_batch(self.model, [r.prompt for r in b], [r.max_tokens for r in b], self.pad_id)
        ]
        return clock.stop(), outputs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.engine_genai", description=__doc__.split("\n\n")[0])
    add_workload_args(p, [1, 8, 32])  # genai allows batches of at most 32
    p.add_argument("--rounds", type=int, default=15, help="timed rounds, every runner once per round (default 15)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every session (default 1)")
    p.add_argument("--runners", default=",".join(RUNNERS), help=f"default {','.join(RUNNERS)}")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/textgen-engine-genai"))
    p.add_argument("--json", type=Path, help="write every run's wall and CPU time here")
    a = p.parse_args(argv)
    a.runners = [x for x in a.runners.split(",") if x]
    unknown = set(a.runners) - set(RUNNERS)
    if unknown or "genai" not in a.runners:
        p.error(f"--runners: choose from {', '.join(RUNNERS)}, genai included (got {a.runners})")
    return a


def build(a: argparse.Namespace, bundle: Any) -> list[Any]:
    runners: list[Any] = []
    for name in a.runners:
        if name == "engine-nospec":
            runners.append(EngineRunner(a.bundle, a.threads, 4096, name=name, speculative_tokens=0))
        elif name == "engine":
            runners.append(EngineRunner(a.bundle, a.threads, 4096, name=name))
        elif name == "ortloop-inplace":
            runners.append(InplaceLoopRunner(a.bundle, a.threads))
        else:
            runners.append(GenAIInProcess(bundle, a.work_dir, a.threads))
    return runners


def table(results: dict[int, dict[str, Measurement]], runners: list[str]) -> str:
    batches = sorted(results)
    head = "| runner | " + " | ".join(f"batch {b}: fastest / median tok/s" for b in batches) + " |"
    lines = [head, "|---|" + "---:|" * len(batches)]
    for r in runners:
        cells = []
        for b in batches:
            m = results[b][r]
            cells.append(f"{m.output_tokens / min(m.wall):,.0f} / {m.output_tokens / statistics.median(m.wall):,.0f}")
        lines.append(f"| {LABELS[r]} | " + " | ".join(cells) + " |")
    lines += ["", "| ÷ onnxruntime-genai (fastest / median run) | " + " | ".join(f"batch {b}" for b in batches) + " |",
              "|---|" + "---:|" * len(batches)]
    for r in runners:
        if r == "genai":
            continue
        cells = []
        for b in batches:
            m, g = results[b][r], results[b]["genai"]
            cells.append(f"{min(g.wall) / min(m.wall):.2f}x / {statistics.median(g.wall) / statistics.median(m.wall):.2f}x")
        lines.append(f"| {LABELS[r]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bundle.format import load_bundle

    a = parse_args(argv)
    bundle = load_bundle(a.bundle)
    if bundle.kv_inplace_path is None:
        sys.exit(f"{a.bundle}: no in-place decoder (model.kvinplace.onnx): genai and the engine would run different files")
    stream = text_tokens(bundle.tokenizer_path)
    runners = build(a, bundle)
    results: dict[int, dict[str, Measurement]] = {}
    for b in a.batches:
        wl = fixed_workload(stream, bundle.bos_id, b, a.prompt_len, a.new_tokens)
        measured = measure(runners, wl, repeat=a.rounds)
        reference = dict((m.runner, outs) for m, outs in measured)["genai"]
        for m, outs in measured:
            if outs != reference:
                same = sum(o == g for o, g in zip(outs, reference, strict=True))
                raise SystemExit(f"{m.runner} at batch {b}: {same}/{len(outs)} requests match genai's tokens")
        results[b] = {m.runner: m for m, _ in measured}
        print(f"batch {b}: done", file=sys.stderr)
    import onnxruntime
    import onnxruntime_genai

    print(f"onnxruntime {onnxruntime.__version__}, onnxruntime-genai {onnxruntime_genai.__version__}, "
          f"{a.threads} intra-op thread(s), {a.rounds} interleaved rounds, {a.prompt_len} prompt + "
          f"{a.new_tokens} new tokens per request, greedy; every runner's tokens equal genai's.\n")
    print(table(results, a.runners))
    if a.json:
        a.json.write_text(json.dumps({str(b): {r: {"wall": m.wall, "cpu": m.cpu, "output_tokens": m.output_tokens}
                                               for r, m in ms.items()} for b, ms in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
