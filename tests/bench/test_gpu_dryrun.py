"""bench/gpu.py's dry run on the CPU: every step runs and lands in gpu.json and gpu.md, and a provider
other than the requested one fails the check loudly (the GPU run itself needs a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from bench.gpu_checks import ProviderMismatch, check_provider

ROOT = Path(__file__).resolve().parents[2]
# The tiny build, an fp16 export and two runs of the script: minutes on a busy 2-core machine.
pytestmark = pytest.mark.timeout(1800)


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def fp16_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's --fp16 export (float16 model.onnx and model.kvinplace.onnx), verified by the export."""
    work = tmp_path_factory.mktemp("fp16-export")
    r = _run(["-m", "model", "export", "--fp16", "--checkpoint", str(tiny_checkpoint), "--out", str(work / "bundle"),
              "--work-dir", str(work / "work"), "--no-attention"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "verified model.kvinplace.onnx" in r.stderr  # the float16 in-place decoder passed parity on the CPU
    cfg = json.loads((work / "bundle" / "config.json").read_text())
    assert cfg["onnx_kv_inplace"]["kv_dtype"] == "float16" and cfg["dtype"] == "float16"
    return work / "bundle"


def test_check_provider_refuses_a_silent_fallback(tiny_bundle: Path) -> None:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(tiny_bundle / "model.onnx"), so, providers=["CPUExecutionProvider"])
    assert check_provider(sess, "CPUExecutionProvider", "model.onnx") == "CPUExecutionProvider"
    with pytest.raises(ProviderMismatch, match="runs CPUExecutionProvider, not CUDAExecutionProvider"):
        check_provider(sess, "CUDAExecutionProvider", "model.onnx")


def test_dry_run_writes_every_step(tiny_bundle: Path, tiny_checkpoint: Path, fp16_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    r = _run(["-m", "bench.gpu", "--dry-run", "--bundle", str(tiny_bundle), "--fp16-bundle", str(fp16_bundle),
              "--checkpoint", str(tiny_checkpoint), "--out", str(out)], timeout=900)
    report = json.loads((out / "gpu.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["env", "checks", "parity", "floors", "decode", "serve"], r.stderr[-2000:]
    assert {k: v["status"] for k, v in steps.items()} == dict.fromkeys(steps, "ok"), json.dumps(steps)[:3000]
    assert r.returncode == 0
    assert report["dry_run"] is True and report["plan"]["device"] == "cpu"

    checks = steps["checks"]["result"]["graphs"]
    assert set(checks) == {"fp32 model.onnx", "fp16 model.onnx", "fp16 model.kvinplace.onnx"}
    for g in checks.values():
        assert g["provider"] == g["requested"] == "CPUExecutionProvider"
        assert g["kernel_runs_by_provider"]["CPUExecutionProvider"] > 0  # the profile was read
    parity = steps["parity"]["result"]
    assert parity["fp32_model_onnx_vs_torch"]["max_abs_diff"] <= 1e-3
    assert parity["fp16_static_path_vs_generic"]["layout"] == "static"

    dec = steps["decode"]["result"]
    runners = {"engine-fp16-graph", "engine-fp32", "torch-fp16", "hf-fp16", "engine-fp16", "engine-fp16-static",
               "torch-fp32", "hf-fp32"}
    assert set(dec["runners"]) == runners and {v["status"] for v in dec["runners"].values()} == {"ok"}
    assert {(row["runner"], row["batch"]) for row in dec["rows"]} == {(n, b) for n in runners for b in (1, 4)}
    assert all(row["tokens"] == row["batch"] * dec["new_tokens"] and row["tokens_per_s"] > 0 for row in dec["rows"])
    assert dec["runners"]["engine-fp16-graph"]["layout"] == "static"
    assert dec["runners"]["engine-fp16-graph"]["cuda_graph"] is False  # no graphs on the CPU

    rows = report["summary"]["decode_rows"]
    assert all(row["floor_ms"] > 0 and row["floor_bound"] in ("memory", "compute") for row in rows)
    serve = steps["serve"]["result"]
    assert serve["served"]["completed"] == serve["requests"] and serve["served"]["failed"] == 0
    assert serve["served_over_offline"] > 0

    md = (out / "gpu.md").read_text()
    for heading in ("## GPU (dry run", "### Targets", "### Providers and host copies", "### Parity on the device",
                    "### Decode", "### Served"):
        assert heading in md
    assert "| this engine, fp16, static path + CUDA graphs |" in md
    assert {t["target"] for t in report["summary"]["targets"]} >= {"batch-1 inter-token latency",
                                                                   "served over the offline engine (same concurrency)"}


def test_a_provider_that_is_not_the_requested_one_fails_loudly(tiny_bundle: Path, tiny_checkpoint: Path,
                                                               fp16_bundle: Path, tmp_path: Path) -> None:
    # No GPU here: asking for CUDA gets the CPU (ONNX Runtime falls back without an exception).
    out = tmp_path / "gpu"
    r = _run(["-m", "bench.gpu", "--dry-run", "--provider", "cuda", "--steps", "checks", "--bundle", str(tiny_bundle),
              "--fp16-bundle", str(fp16_bundle), "--checkpoint", str(tiny_checkpoint), "--out", str(out)],
             timeout=300)
    assert r.returncode == 1
    report = json.loads((out / "gpu.json").read_text())
    checks = report["steps"]["checks"]
    assert checks["status"] == "failed"
    for name, g in checks["result"]["graphs"].items():
        assert not g["ok"], name
        assert "CPUExecutionProvider" in " ".join(g["problems"]), g
    target = next(t for t in report["summary"]["targets"] if t["target"].startswith("provider"))
    assert target["met"] is False
    assert "**" in (out / "gpu.md").read_text()  # the failure stands out in the table
