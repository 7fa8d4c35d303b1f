"""Greedy decoding with onnxruntime-genai, for bench/engine.py; runs in its own environment.

onnxruntime-genai needs the CPU ``onnxruntime`` package, which clashes with the project's
``onnxruntime-gpu``, so this script runs under ``.venv-genai/bin/python`` (``make bench-env``)
and imports nothing from the project: only numpy and onnxruntime_genai.

    .venv-genai/bin/python bench/genai_runner.py JOB.json RESULT.json

JOB.json::

    {"model_dir": "folder with genai_config.json and the ONNX file it names", "pad_id": 0, "repeat": 1,
     "batches": [{"prompts": [[1, 5, 9], [1, 7]], "max_tokens": [128, 64]}, ...]}

The folder is bench.engine.genai_config's: ``model.onnx``, or the in-place decoder
``model.kvinplace.onnx`` with ``"past_present_share_buffer": true`` (genai then binds one
buffer per layer as past and present); this script is the same for both.

Each batch is one static batch: prompts left padded with ``pad_id`` to the longest (genai
derives the attention mask and position ids from the padding), decoded until every row has
``max(max_tokens)`` new tokens; row i keeps its first ``max_tokens[i]``. ``min_length`` is
set to ``max_length``, so EOS never ends a row early (the other runners use ``ignore_eos``).
One warm-up batch runs first; the time is the best of ``repeat`` passes over all batches.

genai numbers positions by column: a row with k pads starts at position k, where the other
runners start every row at 0. Rows of equal prompt length are unaffected; in a padded batch
(bench.engine's mixed workload) a padded row's logits differ slightly, and its greedy tokens can
part from the engine's at a near tie.

RESULT.json: ``{"seconds": wall, "cpu_seconds": process CPU time, "outputs": [[token ids] per request, in job order],
"onnxruntime_genai": version, "onnxruntime": version}``.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import onnxruntime_genai as og


def run_batch(
    model: og.Model, prompts: list[list[int]], max_tokens: list[int], pad_id: int
) -> list[list[int]]:
    """Decode one static batch; return each row's new tokens (its first max_tokens[i])."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int32)  # (B, T) left padded
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = p
    max_length = width + max(max_tokens)
    params = og.GeneratorParams(model)
    params.set_search_options(
        do_sample=False, max_length=max_length, min_length=max_length, batch_size=len(prompts)
    )
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    outputs = []
    for b, n in enumerate(max_tokens):
        seq = np.asarray(generator.get_sequence(b))
        outputs.append(seq[width : width + n].tolist())
    del generator
    return outputs


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: genai_runner.py JOB.json RESULT.json")
    with open(argv[0], encoding="utf-8") as f:
        job = json.load(f)
    model = og.Model(job["model_dir"])
    pad_id = int(job.get("pad_id", 0))
    batches = job["batches"]
    first = batches[0]
    run_batch(model, first["prompts"], [min(4, n) for n in first["max_tokens"]], pad_id)  # warm-up
    best, best_cpu, outputs = float("inf"), float("inf"), []
    for _ in range(int(job.get("repeat", 1))):
        t0, c0 = time.perf_counter(), time.process_time()
        outs = [tok for b in batches for tok in run_batch(model, b["prompts"], b["max_tokens"], pad_id)]
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        best_cpu = min(best_cpu, cpu)
        if elapsed < best:
            best, outputs = elapsed, outs
    import onnxruntime

    result = {
        "seconds": best,
        "cpu_seconds": best_cpu,
        "outputs": outputs,
        "onnxruntime_genai": og.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    with open(argv[1], "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])
