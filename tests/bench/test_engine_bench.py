"""Smoke test of the offline engine benchmark (bench/engine.py) at tiny sizes.

Runs this engine, the bare session.run loop, the no-cache runner and PyTorch eager on the seeded
random bundle; the transformers and onnxruntime-genai runners need packages outside the test
environment and are left to ``make bench-engine``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.engine import (
    BEGIN,
    END,
    SECTION,
    Request,
    Workload,
    genai_config,
    main,
    markdown,
    mixed_workload,
    parse_args,
    run,
    write_docs,
)
from bench.engine_profile import BUCKETS, profile_steps
from service.bundle import load_bundle


@pytest.fixture(scope="module")
def checkpoint(random_model_and_bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random model as a checkpoint model.train.load_model reads."""
    model, _ = random_model_and_bundle
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    torch.save({"model_config": model.cfg.to_dict(), "model": model.state_dict()}, path)
    return path


def _args(bundle: Path, checkpoint: Path, *extra: str):
    return parse_args(
        [
            "--bundle",
            str(bundle),
            "--checkpoint",
            str(checkpoint),
            "--batches",
            "1,2",
            "--prompt-len",
            "5",
            "--new-tokens",
            "4",
            "--runners",
            "engine,ortloop,nocache,torch",
            "--repeat",
            "1",
            "--min-time",
            "0",
            *extra,
        ]
    )


def test_runners_agree_and_report(random_bundle: Path, checkpoint: Path) -> None:
    a = _args(
        random_bundle,
        checkpoint,
        "--mixed",
        "5",
        "--mixed-concurrency",
        "2",
        "--mixed-prompt",
        "3:7",
        "--mixed-output",
        "2:6",
    )
    rep = run(a, log=lambda s: None)
    got = {(m.runner, m.workload) for m in rep.measurements}
    for runner in ("engine", "ortloop", "nocache", "torch"):
        for wl in ("batch 1", "batch 2"):
            assert (runner, wl) in got
    assert ("engine", "mixed") in got and ("nocache", "mixed") not in got  # no-cache skips the mixed workload
    for m in rep.measurements:
        assert m.tokens_per_s > 0 and m.tokens_per_cpu_s > 0 and len(m.wall) == 1
    # Same model, same greedy decoding: every runner produces the engine's tokens at batch 1.
    for runner in ("ortloop", "nocache", "torch"):
        assert rep.get(runner, "batch 1").match_engine == 1.0
    assert rep.ceiling_tokens_per_s > 0
    text = markdown(rep)
    assert "| this engine (ONNX Runtime + KV cache, continuous batching) |" in text
    assert "KV cache vs full recompute, batch 1" in text


def test_main_writes_docs_plot_and_json(random_bundle: Path, checkpoint: Path, tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Serving load harness\n\nkept as is\n")
    argv = [
        "--bundle",
        str(random_bundle),
        "--checkpoint",
        str(checkpoint),
        "--batches",
        "1",
        "--prompt-len",
        "4",
        "--new-tokens",
        "3",
        "--runners",
        "engine,torch",
        "--repeat",
        "1",
        "--min-time",
        "0",
        "--out",
        str(doc),
        "--plot",
        str(tmp_path / "img" / "engine.png"),
        "--json",
        str(tmp_path / "r.json"),
    ]
    main(argv)
    main(argv)  # the second run replaces the generated block instead of adding one
    text = doc.read_text()
    assert "## Serving load harness\n\nkept as is" in text
    assert text.count(SECTION) == 1 and text.count(BEGIN) == 1 and text.count(END) == 1
    assert (tmp_path / "img" / "engine.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "r.json").read_text())
    assert {m["runner"] for m in data["measurements"]} == {"engine", "torch"}


def test_write_docs_keeps_hand_written_text(tmp_path: Path) -> None:
    doc = tmp_path / "B.md"
    doc.write_text(f"# B\n\n{SECTION}\n\nHow to run.\n\n{BEGIN}\nold\n{END}\n\nFindings.\n\n## Next\n")
    write_docs(doc, "new table\n")
    assert (
        doc.read_text()
        == f"# B\n\n{SECTION}\n\nHow to run.\n\n{BEGIN}\nnew table\n{END}\n\nFindings.\n\n## Next\n"
    )


def test_workloads_are_seeded_and_static_batches_split() -> None:
    stream = list(range(10, 60))
    a, b = mixed_workload(stream, 1, 10, 4, seed=3), mixed_workload(stream, 1, 10, 4, seed=3)
    assert a.requests == b.requests
    assert all(
        16 <= len(r.prompt) <= 128 and 16 <= r.max_tokens <= 256 and r.prompt[0] == 1 for r in a.requests
    )
    assert [len(x) for x in a.static_batches()] == [4, 4, 2]
    wl = Workload("w", [Request([1, 2], 5), Request([1], 9)], 2)
    assert wl.output_tokens == 14 and [r.max_tokens for r in wl.shortened(4).requests] == [4, 4]


def test_genai_config_names_follow_the_bundle(random_bundle: Path) -> None:
    b = load_bundle(random_bundle)
    cfg = genai_config(b, threads=1)
    dec = cfg["model"]["decoder"]
    assert cfg["model"]["type"] == "decoder" and cfg["search"]["past_present_share_buffer"] is False
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["outputs"]["present_value_names"] == "present.%d.value"
    assert dec["num_hidden_layers"] == b.num_layers and dec["head_size"] == b.head_dim
    assert dec["session_options"]["intra_op_num_threads"] == 1


def test_profile_buckets_add_up(random_bundle: Path) -> None:
    from bench.engine_profile import requests
    from service.engine import Engine

    b = load_bundle(random_bundle)
    engine = Engine(b, provider="cpu", intra_op_threads=1, max_running=2)
    res = profile_steps(engine, requests(b, 2, 5), 4, "t")
    d = res["decode_ms"]
    assert res["decode_steps"] == 3 and res["prefill_steps"] == 1
    assert d["session.run"] > 0
    assert sum(d[k] for k in BUCKETS) == pytest.approx(d["step"], rel=1e-6)
