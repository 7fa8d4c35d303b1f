"""The training budget: a timing probe picks how many steps fit, and leaves the run itself unchanged."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from model.config import PRESETS, GPTConfig, TrainConfig
from model.train import steps_for_budget, train

# Dropout on, so a probe that used torch's random stream without restoring it would change the run.
MC = GPTConfig(vocab_size=64, context_length=32, n_layer=1, n_head=2, n_embd=32, dropout=0.1)
TC = TrainConfig(max_steps=4, batch_size=2, block_size=32, warmup_steps=1, eval_interval=100, optimizer="muon")


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(0).integers(4, 64, size=4000).astype(np.int64)


@pytest.mark.parametrize(
    ("step_s", "want"),
    [
        (1.0, 100),  # 105 s projected for 100 steps: over 100 s, so the preset's own count
        (0.6, 150),  # 1.5x: 94.5 s fits; 1.75x: 110.25 s does not
        (0.5, 175),  # 1.75x: 91.9 s fits; 2x: 105 s does not
        (0.3, 300),  # 3x: 94.5 s fits, 4x: 126 s does not
        (0.01, 400),  # capped at the largest multiple
    ],
)
def test_steps_for_budget_picks_the_largest_multiple_that_fits(step_s: float, want: int) -> None:
    assert steps_for_budget(100, step_s, 100.0) == want


def test_a_slow_machine_keeps_the_preset_steps_rather_than_training_less() -> None:
    assert steps_for_budget(830, 10.0, 420.0) == 830


def test_the_probe_picks_the_step_count_and_leaves_the_run_unchanged(data: np.ndarray, tmp_path) -> None:
    # A budget no machine can miss: the largest multiple (4 x 4 steps).
    torch.manual_seed(0)
    budgeted = train(MC, dataclasses.replace(TC, budget_s=1e6), data, data[:600], 1000, tmp_path / "a", device="cpu")
    assert budgeted.steps == 16
    # The same 16 steps asked for directly: the probe (a copy of the model, its own batches, torch's
    # random state restored) changed nothing in the run.
    pinned = train(MC, dataclasses.replace(TC, max_steps=16), data, data[:600], 1000, tmp_path / "b", device="cpu")
    assert pinned.steps == 16
    assert budgeted.val_loss == pinned.val_loss
    ck = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    assert ck["train_config"]["max_steps"] == 16  # the checkpoint (and the bundle) record what ran


def test_resuming_a_budgeted_run_keeps_its_planned_steps(data: np.ndarray, tmp_path) -> None:
    tc = dataclasses.replace(TC, budget_s=1e6, time_limit_s=0.0)
    first = train(MC, dataclasses.replace(tc, eval_interval=8), data, data[:600], 1000, tmp_path, device="cpu")
    assert first.steps == 16
    # Resuming a finished run with a budget: no new probe, the planned 16 steps stand (nothing to do).
    again = train(MC, tc, data, data[:600], 1000, tmp_path, resume=True, device="cpu")
    assert again.steps == 16


def test_small_preset_trains_to_a_budget_and_an_explicit_step_count_pins_it() -> None:
    from model.cli import _configs

    assert PRESETS["small"].train.budget_s > 0
    assert PRESETS["tiny"].train.budget_s == 0  # tests' model: the same steps everywhere

    class Args:
        preset, vocab_size, max_steps = "small", None, None

    _, tc = _configs(Args())
    assert tc.budget_s == PRESETS["small"].train.budget_s
    Args.max_steps = 830
    _, tc = _configs(Args())
    assert (tc.budget_s, tc.max_steps) == (0.0, 830)


def test_context_length_flag_overrides_the_preset_and_keeps_the_training_block() -> None:
    from model.cli import _configs

    class Args:
        preset, vocab_size, max_steps, context_length = "small", None, None, 2048

    mc, tc = _configs(Args())
    assert mc.context_length == 2048 and tc.block_size == PRESETS["small"].train.block_size
    Args.context_length = None
    assert _configs(Args())[0].context_length == PRESETS["small"].model.context_length


@pytest.mark.parametrize(("bf16_s", "want_bf16"), [(0.5, True), (0.95, False)])
def test_cpu_bf16_is_kept_only_where_the_probe_finds_it_clearly_faster(
    data: np.ndarray, tmp_path, monkeypatch: pytest.MonkeyPatch, bf16_s: float, want_bf16: bool
) -> None:
    import json

    import model.train as T

    monkeypatch.setattr(T, "cpu_native_bf16", lambda: True)  # as on an AVX512_BF16 / AMX machine
    seen = []

    def fake_probe(*args, bf16: bool = False, **kw) -> float:
        seen.append(bf16)
        return bf16_s if bf16 else 1.0

    monkeypatch.setattr(T, "time_train_step", fake_probe)
    tc = dataclasses.replace(TC, cpu_bf16=True)
    res = train(MC, tc, data, data[:600], 1000, tmp_path, device="cpu")
    assert seen == [False, True]
    assert res.steps == 4 and np.isfinite(res.val_loss)
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["bf16_autocast"] is want_bf16


def test_no_bf16_probe_without_native_bf16_or_the_setting(data: np.ndarray, tmp_path, monkeypatch) -> None:
    import model.train as T

    def no_probe(*a, **k) -> float:
        raise AssertionError("probed")

    monkeypatch.setattr(T, "time_train_step", no_probe)
    monkeypatch.setattr(T, "cpu_native_bf16", lambda: False)
    train(MC, dataclasses.replace(TC, cpu_bf16=True), data, data[:600], 1000, tmp_path / "a", device="cpu")
    monkeypatch.setattr(T, "cpu_native_bf16", lambda: True)
    train(MC, TC, data, data[:600], 1000, tmp_path / "b", device="cpu")  # cpu_bf16 off (the default)


def test_the_probe_times_bf16_steps_for_real(data: np.ndarray) -> None:
    from model.gpt import GPT
    from model.train import time_train_step

    torch.manual_seed(0)
    m = GPT(MC)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert time_train_step(m, TC, data, 32, "cpu", steps=2, skip=1, bf16=True) > 0
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # a copy was trained
