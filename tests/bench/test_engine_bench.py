"""Smoke test of the offline engine benchmark (bench/engine.py) at tiny sizes.

Runs this engine (on the in-place decoder and, as ``engine-concat``, on model.onnx), the bare
session.run loop, the no-cache runner and PyTorch eager on the seeded random bundle, which carries
both files. The onnxruntime-genai runners run when ``.venv-genai`` exists (``make bench-env``);
the transformers runner is left to ``make bench-engine``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bench.engine import (
    BEGIN,
    END,
    SECTION,
    Request,
    Workload,
    build_runners,
    genai_config,
    main,
    markdown,
    mixed_workload,
    parse_args,
    run,
    write_docs,
)
from bench.engine_profile import PHASES, profile_steps
from bundle.format import load_bundle


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
            "engine,engine-concat,ortloop,nocache,torch",
            "--repeat",
            "1",
            "--min-time",
            "0",
            *extra,
        ]
    )


GENAI_PYTHON = Path(__file__).resolve().parents[2] / ".venv-genai" / "bin" / "python"


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
    for runner in ("engine", "engine-concat", "ortloop", "nocache", "torch"):
        for wl in ("batch 1", "batch 2"):
            assert (runner, wl) in got
    assert ("engine", "mixed") in got and ("nocache", "mixed") not in got  # no-cache skips the mixed workload
    assert ("engine-concat", "mixed") in got
    for m in rep.measurements:
        assert m.tokens_per_s > 0 and m.tokens_per_cpu_s > 0 and len(m.wall) == 1
    # Same model, same greedy decoding: every runner produces the engine's tokens at batch 1.
    for runner in ("engine-concat", "ortloop", "nocache", "torch"):
        assert rep.get(runner, "batch 1").match_engine == 1.0
    assert rep.get("engine-concat", "mixed").match_engine == 1.0  # both layouts batch alike
    assert rep.ceiling_tokens_per_s > 0
    # The engine ran the in-place file, engine-concat model.onnx; the report says so.
    assert "engine: KV cache layout inplace (model.kvinplace.onnx)." in rep.notes
    assert "engine-concat: KV cache layout concat (model.onnx)." in rep.notes
    text = markdown(rep)
    assert "| this engine (ONNX Runtime + KV cache, continuous batching) |" in text
    assert "| this engine on model.onnx (concat KV cache, kv_inplace=off) |" in text
    assert "KV cache vs full recompute, batch 1" in text
    for wl in ("batch 1", "batch 2", "mixed"):
        assert f"| in-place vs concat KV cache (this engine), {wl} |" in text


@pytest.mark.skipif(not GENAI_PYTHON.is_file(), reason=".venv-genai not found (make bench-env)")
def test_genai_runs_the_engines_file_and_matches_its_tokens(random_bundle: Path, checkpoint: Path) -> None:
    a = _args(random_bundle, checkpoint, "--genai-python", str(GENAI_PYTHON))
    a.runners = ["engine", "genai", "genai-concat"]
    rep = run(a, log=lambda s: None)
    assert 'genai: model.kvinplace.onnx, genai_config `"past_present_share_buffer": true`.' in rep.notes
    assert 'genai-concat: model.onnx, genai_config `"past_present_share_buffer": false`.' in rep.notes
    for runner in ("genai", "genai-concat"):
        for wl in ("batch 1", "batch 2"):  # equal prompt lengths: no padding
            assert rep.get(runner, wl).match_engine == 1.0, (runner, wl)
    assert "onnxruntime_genai" in rep.versions
    assert "| vs onnxruntime-genai (same ONNX file), batch 1 |" in markdown(rep)


def test_concat_runners_need_the_inplace_file(random_bundle: Path, checkpoint: Path, tmp_path: Path) -> None:
    """Without model.kvinplace.onnx the engine runs model.onnx: engine-concat would repeat it."""
    bundle = tmp_path / "concat-only"
    shutil.copytree(random_bundle, bundle)
    cfg = json.loads((bundle / "config.json").read_text())
    file = cfg.pop("onnx_kv_inplace")["file"]
    cfg.get("files", {}).pop(file, None)
    (bundle / "config.json").write_text(json.dumps(cfg))
    (bundle / file).unlink()
    a = _args(bundle, checkpoint)
    a.runners = ["engine", "engine-concat", "genai-concat"]
    notes: list[str] = []
    runners = build_runners(a, load_bundle(bundle), notes, log=lambda s: None)
    assert [r.name for r in runners] == ["engine"]
    assert notes == [
        f"{name}: skipped, the bundle has no in-place decoder: the engine runs model.onnx."
        for name in ("engine-concat", "genai-concat")
    ]


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
    assert dec["filename"] == "model.onnx"
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["outputs"]["present_value_names"] == "present.%d.value"
    assert dec["num_hidden_layers"] == b.num_layers and dec["head_size"] == b.head_dim
    assert dec["session_options"]["intra_op_num_threads"] == 1
    # The in-place decoder: the same names, one buffer as past and present.
    cfg = genai_config(b, threads=1, inplace=True)
    dec = cfg["model"]["decoder"]
    assert dec["filename"] == "model.kvinplace.onnx" and cfg["search"]["past_present_share_buffer"] is True
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"


def test_profile_buckets_add_up(random_bundle: Path) -> None:
    from bench.engine_profile import requests
    from service.engine.config import EngineConfig
    from service.engine.engine import Engine

    b = load_bundle(random_bundle)
    engine = Engine(b, EngineConfig(provider="cpu", intra_op_threads=1, max_running=2))
    res = profile_steps(engine, requests(b, 2, 5), 4, "t")
    d = res["decode_ms"]
    assert res["decode_steps"] == 3 and res["prefill_steps"] == 1
    assert d["model"] > 0 and d["tokens"] == 2  # two rows share each step: one token each
    assert sum(d[k] for k in PHASES) == pytest.approx(d["step"], rel=1e-6)


@pytest.mark.skipif(not GENAI_PYTHON.is_file(), reason=".venv-genai not found (make bench-env)")
def test_engine_and_genai_in_one_process(random_bundle: Path, tmp_path: Path) -> None:
    """bench.engine_genai runs the engine, the bare loop and genai in genai's environment and
    checks their tokens against genai's: a mismatch would exit non-zero."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "runs.json"
    proc = subprocess.run(
        [str(GENAI_PYTHON), "-m", "bench.engine_genai", "--bundle", str(random_bundle), "--batches", "1,2",
         "--prompt-len", "5", "--new-tokens", "4", "--rounds", "2", "--work-dir", str(tmp_path / "genai"),
         "--json", str(out)],
        cwd=root, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}, capture_output=True, text=True,
        timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "every runner's tokens equal genai's" in proc.stdout
    assert "| this engine, one token per step |" in proc.stdout
    assert "| ÷ onnxruntime-genai (fastest / median run) | batch 1 | batch 2 |" in proc.stdout
    runs = json.loads(out.read_text())
    assert set(runs) == {"1", "2"}
    for per_runner in runs.values():
        assert set(per_runner) == {"engine-nospec", "engine", "ortloop-inplace", "genai"}
        assert all(len(r["wall"]) == 2 and min(r["wall"]) > 0 for r in per_runner.values())
