"""Tests for service.engine.scheduler, in the style of vLLM's tests/v1/core: helper factories, no model."""

from __future__ import annotations

import random

import pytest

from service.engine.scheduler import Scheduler, SchedulerOutput
from service.engine.types import InvalidRequestError, QueueFullError


def create_scheduler(
    max_running: int = 4, max_waiting: int = 8, kv_budget_tokens: int = 1000, max_prefill_tokens: int = 10_000
) -> Scheduler:
    return Scheduler(
        max_running=max_running,
        max_waiting=max_waiting,
        kv_budget_tokens=kv_budget_tokens,
        max_prefill_tokens=max_prefill_tokens,
    )


def add_requests(
    s: Scheduler, n: int, prompt: int = 10, max_tokens: int = 10, prefix: str = "r"
) -> list[str]:
    ids = [f"{prefix}{i}" for i in range(n)]
    for request_id in ids:
        s.add_request(request_id, prompt, max_tokens)
    s.check_invariants()
    return ids


def step(s: Scheduler) -> SchedulerOutput:
    out = s.schedule()
    s.check_invariants()
    return out


def test_empty_schedule() -> None:
    s = create_scheduler()
    assert step(s) == SchedulerOutput(admitted=[], aborted=[], running=[])
    assert not s.has_unfinished()


def test_admission_limited_by_max_running() -> None:
    s = create_scheduler(max_running=2)
    ids = add_requests(s, 3)
    out = step(s)
    assert out.admitted == ids[:2] and out.running == []
    out = step(s)
    assert out.admitted == [] and out.running == ids[:2]
    assert s.num_running == 2 and s.num_waiting == 1
    s.finish(ids[0])
    out = step(s)
    assert out.admitted == [ids[2]] and out.running == [ids[1]]


def test_admission_limited_by_kv_budget() -> None:
    s = create_scheduler(kv_budget_tokens=100)
    ids = add_requests(s, 3, prompt=30, max_tokens=15)  # 45 each: two fit in 100
    assert step(s).admitted == ids[:2]
    assert s.reserved_tokens == 90 and s.kv_usage == pytest.approx(0.9)
    assert step(s).admitted == []
    s.finish(ids[1])
    assert s.reserved_tokens == 45
    assert step(s).admitted == [ids[2]]


def test_fifo_no_overtaking() -> None:
    s = create_scheduler(kv_budget_tokens=100)
    s.add_request("first", 50, 10)
    s.add_request("big", 60, 30)
    s.add_request("small", 1, 1)
    assert step(s).admitted == ["first"]  # "big" does not fit, and "small" must not overtake it
    assert step(s).admitted == []
    assert s.num_waiting == 2
    s.finish("first")
    assert step(s).admitted == ["big", "small"]


def test_queue_full_is_rejected() -> None:
    s = create_scheduler(max_waiting=2)
    add_requests(s, 2)
    with pytest.raises(QueueFullError):
        s.add_request("extra", 10, 10)
    step(s)  # both admitted: room again
    s.add_request("extra", 10, 10)
    s.check_invariants()


def test_invalid_requests_are_rejected() -> None:
    s = create_scheduler(kv_budget_tokens=100)
    with pytest.raises(InvalidRequestError, match="101 exceeds"):
        s.add_request("huge", 90, 11)
    s.add_request("exact", 90, 10)  # exactly the budget is fine
    with pytest.raises(InvalidRequestError, match="already in use"):
        s.add_request("exact", 1, 1)
    step(s)
    with pytest.raises(InvalidRequestError, match="already in use"):  # running ids too
        s.add_request("exact", 1, 1)
    with pytest.raises(InvalidRequestError, match="num_prompt_tokens"):
        s.add_request("empty", 0, 1)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        s.add_request("negative", 1, -1)
    s.add_request("scoring", 1, 0)  # max_tokens 0: prompt scoring, reserves the prompt only
    with pytest.raises(ValueError, match="max_running"):
        create_scheduler(max_running=0)


def test_abort_waiting_is_immediate() -> None:
    s = create_scheduler(max_running=1)
    ids = add_requests(s, 3)
    assert s.abort(ids[1])
    assert s.num_waiting == 2
    assert not s.abort(ids[1])
    assert not s.abort("unknown")
    assert step(s).admitted == [ids[0]]
    s.finish(ids[0])
    out = step(s)
    assert out.admitted == [ids[2]] and out.aborted == []


def test_abort_running_is_reported_next_schedule_and_frees_then() -> None:
    s = create_scheduler(max_running=2, kv_budget_tokens=40)
    ids = add_requests(s, 3)  # 20 each
    assert step(s).admitted == ids[:2]
    assert s.abort(ids[0])
    assert not s.abort(ids[0])  # already aborted
    s.check_invariants()
    assert s.num_running == 2 and s.reserved_tokens == 40  # still held until the next schedule
    out = step(s)
    assert out.aborted == [ids[0]]
    assert out.running == [ids[1]]
    assert out.admitted == [ids[2]]  # the freed slot is reused in the same step
    assert step(s) == SchedulerOutput(admitted=[], aborted=[], running=[ids[1], ids[2]])
    with pytest.raises(ValueError, match="not running"):
        s.finish(ids[0])


def test_finish_after_abort_before_schedule_is_not_reported_twice() -> None:
    s = create_scheduler()
    ids = add_requests(s, 1)
    step(s)
    s.abort(ids[0])
    s.finish(ids[0])  # it ended on its own in the same step
    s.check_invariants()
    assert step(s) == SchedulerOutput(admitted=[], aborted=[], running=[])
    assert s.reserved_tokens == 0


def test_finish_frees_immediately() -> None:
    s = create_scheduler(max_running=1)
    ids = add_requests(s, 2)
    step(s)
    s.finish(ids[0])
    s.check_invariants()
    assert s.num_running == 0 and s.reserved_tokens == 0 and s.kv_usage == 0.0
    with pytest.raises(ValueError, match="not running"):
        s.finish(ids[1])  # still waiting


def test_prefill_token_cap_with_at_least_one_rule() -> None:
    s = create_scheduler(max_running=10, kv_budget_tokens=10_000, max_prefill_tokens=100)
    s.add_request("long", 500, 10)  # longer than the cap on its own
    for i in range(5):
        s.add_request(f"s{i}", 40, 10)
    out = step(s)
    assert out.admitted == ["long"]  # alone, but admitted: no starvation
    out = step(s)
    assert out.admitted == ["s0", "s1"] and out.running == ["long"]  # 40 + 40 <= 100 < 120
    out = step(s)
    assert out.admitted == ["s2", "s3"] and out.running == ["long", "s0", "s1"]
    out = step(s)
    assert out.admitted == ["s4"]


def test_at_least_one_rule_still_needs_room() -> None:
    s = create_scheduler(max_running=1, kv_budget_tokens=1000, max_prefill_tokens=10)
    add_requests(s, 2, prompt=100)
    assert step(s).admitted == ["r0"]
    assert step(s).admitted == []  # no slot: the cap exception does not bypass max_running


def test_randomized_soak_keeps_invariants() -> None:
    rnd = random.Random(1234)
    s = create_scheduler(max_running=8, max_waiting=16, kv_budget_tokens=2000, max_prefill_tokens=300)
    waiting: set[str] = set()
    running: set[str] = set()
    aborting: set[str] = set()  # running, aborted, not yet reported by schedule()
    admission: dict[str, int] = {}  # request id -> admission rank
    next_id = 0
    for _ in range(20_000):
        op = rnd.random()
        if op < 0.35:
            request_id = f"q{next_id}"
            next_id += 1
            try:
                s.add_request(request_id, rnd.randint(1, 600), rnd.randint(1, 600))
                waiting.add(request_id)
            except QueueFullError:
                assert len(waiting) == s.max_waiting
            except InvalidRequestError:
                pass  # larger than the whole budget
        elif op < 0.45 and (waiting or running - aborting):
            request_id = rnd.choice(sorted(waiting | (running - aborting)))
            assert s.abort(request_id)
            if request_id in waiting:
                waiting.remove(request_id)
            else:
                aborting.add(request_id)
        elif op < 0.70 and running:
            request_id = rnd.choice(sorted(running))
            s.finish(request_id)
            running.remove(request_id)
            aborting.discard(request_id)
        else:
            out = s.schedule()
            assert set(out.aborted) == aborting and len(out.aborted) == len(aborting)
            running -= aborting
            aborting.clear()
            assert set(out.running) == running
            assert out.running == sorted(out.running, key=admission.__getitem__)  # admission order
            assert out.admitted == sorted(out.admitted, key=lambda r: int(r[1:]))  # FIFO
            assert set(out.admitted) <= waiting
            waiting -= set(out.admitted)
            running |= set(out.admitted)
            admission.update((r, len(admission)) for r in out.admitted)
        s.check_invariants()
        assert s.num_waiting == len(waiting) and s.num_running == len(running)
    assert len(admission) > 1000  # the soak really exercised admission
    # Drain: abort everything and let schedule report it.
    for request_id in sorted(waiting | running):
        s.abort(request_id)
        s.check_invariants()
    step(s)
    assert s.num_running == s.num_waiting == s.reserved_tokens == 0
    assert s.kv_usage == 0.0 and not s.has_unfinished()


def test_kv_budget_is_sized_from_the_models_bytes_per_token() -> None:
    from service.engine.scheduler import size_kv_budget

    # Qwen2-0.5B-like: 24 layers x 2 x 2 KV heads x 64 x 4 bytes = 24,576 bytes per token, 32k context
    qwen = dict(max_running=64, context_length=32768, bytes_per_token=24 * 2 * 2 * 64 * 4)
    assert size_kv_budget(**qwen, cache_bytes=4096 * 2**20) == 174762  # 4 GiB, not 64 x 32k = 2.1M tokens
    assert size_kv_budget(**qwen, cache_bytes=4096 * 2**20, tokens=1000) == 1000  # an explicit budget wins
    # a small model: the cache never needs more than max_running full contexts
    assert size_kv_budget(max_running=64, context_length=512, bytes_per_token=6144, cache_bytes=4096 * 2**20) == 64 * 512
    assert size_kv_budget(max_running=4, context_length=512, bytes_per_token=10**9, cache_bytes=1) == 1


def test_bundle_bytes_per_token_counts_kv_heads_and_dtype() -> None:
    from pathlib import Path

    from bundle.format import Bundle

    arch = {"n_layer": 24, "n_head": 14, "n_kv_head": 2, "head_dim": 64}
    assert Bundle(Path("."), {"architecture": arch}).kv_bytes_per_token == 24 * 2 * 2 * 64 * 4
    half = {"architecture": arch, "onnx": {"kv_dtype": "float16"}}
    assert Bundle(Path("."), half).kv_bytes_per_token == 24 * 2 * 2 * 64 * 2
