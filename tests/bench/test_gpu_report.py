"""The pure parts of the GPU benchmark: step floors, target verdicts, the base build's report."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench.gpu_base import build_command
from bench.gpu_base import report as base_report
from bench.gpu_floors import ModelShape, step_bytes, step_floor, step_flops
from bench.gpu_report import summarize, targets

SMALL = ModelShape(num_parameters=2_559_360, n_layer=4, n_head=4, head_dim=48)


def test_floor_is_memory_bound_at_batch_1_and_compute_bound_at_large_batch() -> None:
    # 2.56M fp16 parameters = 5.1 MB; batch 1, 96 cached positions add 4*2*4*96*48*2 bytes of cache.
    assert step_bytes(SMALL, 1, 96, 2, 2) == 2_559_360 * 2 + 4 * 2 * 4 * 96 * 48 * 2
    assert step_flops(SMALL, 2, 96) == 2 * 2_559_360 * 2 + 4 * 2 * 4 * 96 * 192
    bw, rate = 4e12, 500e12  # an H200-like machine
    small = step_floor(SMALL, 1, 96, 2, 2, bw, rate)
    assert small.bound == "memory" and small.seconds == pytest.approx(step_bytes(SMALL, 1, 96, 2, 2) / bw)
    big = step_floor(SMALL, 4096, 96, 2, 2, bw, rate / 1000)
    assert big.bound == "compute"
    with pytest.raises(ValueError, match="must be > 0"):
        step_floor(SMALL, 1, 96, 2, 2, 0, rate)


def _report(rows: list[dict], served: float | None = None, checks: str = "ok") -> dict:
    steps: dict = {
        "checks": {"status": checks, "result": {"graphs": {}, "ok": checks == "ok"}},
        "floors": {"status": "ok", "result": {"copy_bandwidth_bytes_per_s": 4e12, "copy_bytes": 1 << 30,
                                              "matmul_n": 8192,
                                              "matmul_flops_per_s": {"float16": 5e14, "float32": 5e13}}},
        "decode": {"status": "ok", "result": {"prompt_len": 32, "new_tokens": 128, "rows": rows, "runners": {},
                                              "model": {"num_parameters": 2_559_360, "n_layer": 4, "n_head": 4,
                                                        "head_dim": 48}}},
    }
    if served is not None:
        steps["serve"] = {"status": "ok", "result": {"served_over_offline": served,
                                                     "served": {"output_throughput": 700.0},
                                                     "offline": {"output_throughput": 1000.0}}}
    return {"steps": steps, "dry_run": False}


def _row(runner: str, batch: int, step_ms: float, tps: float) -> dict:
    return {"runner": runner, "batch": batch, "step_ms": step_ms, "tokens_per_s": tps}


def test_targets_judge_the_best_engine_against_its_floor_and_the_alternatives() -> None:
    rows = [_row("engine-fp16-graph", 1, 0.05, 15000), _row("engine-fp32", 1, 0.4, 2000),
            _row("torch-fp16", 1, 2.0, 400), _row("engine-fp16-graph", 64, 0.3, 200000),
            _row("hf-fp16", 64, 5.0, 100000)]
    rep = _report(rows, served=0.75)
    got = {t["target"]: t for t in targets(rep, summarize(rep)["decode_rows"])}
    itl = got["batch-1 inter-token latency"]
    assert itl["value"] == 0.05 and itl["met"] is True  # 40x faster than eager, though above 2x its floor
    assert "engine-fp16-graph" in itl["detail"]
    assert got["batch 64: tokens/s over transformers generate()"]["value"] == pytest.approx(2.0)
    assert got["batch 64: tokens/s over transformers generate()"]["met"] is True
    assert got["served over the offline engine (same concurrency)"]["met"] is True
    assert got["provider checked, host copies per step = logits only"]["met"] is True


def test_targets_missing_or_failing_inputs_are_never_met() -> None:
    rows = [_row("engine-fp32", 1, 10.0, 100), _row("torch-fp32", 1, 12.0, 80)]
    rep = _report(rows, served=0.5, checks="failed")
    got = {t["target"]: t for t in targets(rep, summarize(rep)["decode_rows"])}
    assert got["batch-1 inter-token latency"]["met"] is False  # 1.2x eager, far above its floor
    assert got["batch 64: tokens/s over transformers generate()"]["met"] is None  # not measured
    assert got["served over the offline engine (same concurrency)"]["met"] is False
    assert got["provider checked, host copies per step = logits only"]["met"] is False
    del rep["steps"]["checks"]
    got = {t["target"]: t for t in targets(rep, [])}
    assert got["provider checked, host copies per step = logits only"]["met"] is None


def test_base_report_and_command() -> None:
    summary = {"steps": 6000, "train_seconds": 200.0, "val_loss": 3.5, "val_bpc": 1.75, "parameters": 27_000_000,
               "tokens_seen": 196_608_000, "device": "cuda", "bf16_autocast": True}
    r = base_report(summary, 260.0, "NVIDIA H200", "base")
    assert r["met"] is True and r["train_tokens_per_s"] == pytest.approx(983_040)
    assert base_report({**summary, "val_bpc": 1.9}, 260.0, "NVIDIA H200", "base")["met"] is False
    a = argparse.Namespace(dry_run=False, data_dir=Path("d"), work_dir=Path("/w"), time_limit_s=420.0)
    cmd = build_command(a)
    assert cmd[cmd.index("--preset") + 1] == "base" and cmd[cmd.index("--device") + 1] == "cuda"
    assert cmd[cmd.index("--time-limit-s") + 1] == "420.0"
    a.dry_run = True
    cmd = build_command(a)
    assert cmd[cmd.index("--preset") + 1] == "tiny" and "--max-steps" in cmd and "--time-limit-s" not in cmd


def test_pack_splits_an_archive_that_joins_back_to_its_sha256(tmp_path: Path) -> None:
    import hashlib
    import tarfile

    from bench.gpu_pack import ARCHIVE, pack

    stage = tmp_path / "stage"
    (stage / "wheels").mkdir(parents=True)
    (stage / "wheels" / "a.whl").write_bytes(bytes(range(256)) * 9000)  # 2.3 MB
    (stage / "small.pt").write_bytes(b"weights" * 1000)
    out = tmp_path / "out"
    out.mkdir()
    parts = pack(stage, out, part_mib=1)
    assert [p.name for p in parts] == [f"{ARCHIVE}.part-{i:02d}" for i in range(3)]
    assert all(p.stat().st_size <= 1 << 20 for p in parts)
    joined = tmp_path / ARCHIVE
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))  # what `cat part-*` does
    digest, name = (out / "SHA256").read_text().split()
    assert name == ARCHIVE and hashlib.sha256(joined.read_bytes()).hexdigest() == digest
    with tarfile.open(joined) as tar:
        assert sorted(tar.getnames()) == ["small.pt", "wheels", "wheels/a.whl"]
