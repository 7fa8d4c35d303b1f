"""Prefix caching in the engine: the same tokens with the cache as without, on both KV layouts.

Every scenario runs twice, on an engine with the prefix cache and on one without, with the same
requests at the same steps; the tokens (and logprobs) must be equal, and the cache must have hit.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from test_engine import KV_INPLACE, make_engine, run_to_completion

from service.engine.types import SamplingParams, StepStats

GREEDY = SamplingParams(
    max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0
)  # logprobs: a sharper check
BS = 8  # small blocks: prompts of a few dozen tokens span several


@pytest.fixture(scope="module", params=list(KV_INPLACE))
def layout(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def engines(random_bundle, layout):
    """(with cache, without cache) on the same bundle and layout."""
    on = make_engine(random_bundle, layout, max_running=8, max_prefill_tokens=512, prefix_block_size=BS)
    off = make_engine(random_bundle, layout, max_running=8, max_prefill_tokens=512, prefix_caching=False)
    return on, off


def prompt(seed: int, n: int, prefix: list[int] | None = None) -> list[int]:
    rng = random.Random(seed)
    head = list(prefix or [])
    return head + [rng.randrange(3, 500) for _ in range(n - len(head))]


class Recorder:
    """Steps an engine through a scenario and sums its prefix-cache stats."""

    def __init__(self, engine):
        self.engine, self.queries, self.hits = engine, 0, 0
        self._step = engine.step

    def step(self):
        outs = self._step()
        st: StepStats = self.engine.last_step_stats
        self.queries += st.prefix_cache_queries
        self.hits += st.prefix_cache_hits
        return outs


def run_both(engines, scenario) -> tuple[dict, dict, Recorder]:
    """``scenario(engine) -> schedule`` for run_to_completion, on both engines; returns both results
    and the cached engine's recorder."""
    results = []
    rec = None
    for engine in engines:
        r = Recorder(engine)
        engine.step = r.step  # the instance attribute shadows the method for run_to_completion
        try:
            results.append(run_to_completion(engine, scenario(engine)))
        finally:
            del engine.step
        rec = rec or r
        engine.scheduler.check_invariants()
        assert engine.prefix_cache is None or engine.prefix_cache.num_pinned == 0
        assert not engine.has_unfinished() and engine.scheduler.reserved_tokens == 0
    return results[0], results[1], rec


def same_tokens(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for rid in a:
        assert a[rid]["tokens"] == b[rid]["tokens"], rid
        assert a[rid]["finish"] == b[rid]["finish"], rid
        np.testing.assert_allclose(a[rid]["logprobs"], b[rid]["logprobs"], atol=1e-4)


def uid(engine, name: str) -> str:
    return f"{name}-{id(engine)}-{random.random()}"


def test_a_later_prompt_with_the_same_beginning_reuses_its_blocks(engines) -> None:
    system = prompt(1, 41)  # 5 full blocks of 8
    first, second = prompt(2, 60, system), prompt(3, 52, system)

    def scenario(e):
        a, b = uid(e, "a"), uid(e, "b")
        return {
            0: [lambda: e.add_request(a, first, dataclasses.replace(GREEDY, logprobs=2))],
            3: [lambda: e.add_request(b, second, dataclasses.replace(GREEDY, logprobs=2))],
        }

    on, off, rec = run_both(engines, scenario)
    same_tokens(_by_order(on), _by_order(off))
    assert rec.queries == 60 + 52
    assert rec.hits == 5 * BS  # the common 41 tokens: 5 full blocks


def test_seeded_sampling_with_hits_while_the_first_request_runs(engines) -> None:
    system = prompt(4, 70)
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True, logprobs=0)

    def scenario(e):
        ids = [uid(e, f"r{i}") for i in range(4)]
        return {i: [lambda i=i: e.add_request(ids[i], prompt(10 + i, 90, system), seeded)] for i in range(4)}

    on, off, rec = run_both(engines, scenario)
    same_tokens(_by_order(on), _by_order(off))
    assert rec.hits == 3 * (70 // BS) * BS  # requests 1..3 reuse request 0's blocks


def test_a_fully_cached_prompt_still_computes_its_last_token(engines) -> None:
    p = prompt(5, 6 * BS)  # exactly 6 blocks

    def scenario(e):
        a, b, c = uid(e, "a"), uid(e, "b"), uid(e, "c")
        return {
            0: [lambda: e.add_request(a, p, GREEDY)],
            2: [lambda: e.add_request(b, p, GREEDY)],
            3: [lambda: e.add_request(c, p[: 3 * BS + 1], GREEDY)],
        }  # one token past block 3

    on, off, rec = run_both(engines, scenario)
    same_tokens(_by_order(on), _by_order(off))
    assert rec.hits == 5 * BS + 3 * BS  # b: all but the last block; c: its three full blocks
    a, b, _ = _by_order(on).values()
    assert a["tokens"] == b["tokens"]


def test_blocks_of_an_aborted_request_serve_a_later_one(engines) -> None:
    system = prompt(6, 48)

    def scenario(e):
        a, b = uid(e, "a"), uid(e, "b")
        return {
            0: [lambda: e.add_request(a, prompt(7, 60, system), GREEDY)],
            2: [lambda: e.abort(a)],
            4: [lambda: e.add_request(b, prompt(8, 56, system), GREEDY)],
        }

    on, off, rec = run_both(engines, scenario)
    same_tokens(_by_order(on), _by_order(off))
    assert [r["finish"] for r in _by_order(on).values()] == ["abort", "length"]
    assert rec.hits == 48


def test_two_requests_with_the_same_prefix_in_one_step(engines) -> None:
    system = prompt(9, 64)

    def scenario(e):
        ids = [uid(e, f"r{i}") for i in range(3)]
        return {
            0: [
                lambda: e.add_request(ids[0], prompt(20, 80, system), GREEDY),
                lambda: e.add_request(ids[1], prompt(21, 75, system), GREEDY),
            ],
            1: [lambda: e.add_request(ids[2], prompt(22, 70, system), GREEDY)],
        }

    on, off, rec = run_both(engines, scenario)
    same_tokens(_by_order(on), _by_order(off))
    assert rec.hits == 64  # the pair computes its prefix twice (neither was cached yet); the third hits


def test_prompt_logprobs_are_computed_whole_and_equal(engines) -> None:
    system = prompt(11, 50)
    # max_tokens 1: the prompt logprobs come with the first output, which is then the final one
    scoring = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=3, logprobs=1)

    def scenario(e):
        a, b = uid(e, "a"), uid(e, "b")
        return {
            0: [lambda: e.add_request(a, prompt(12, 60, system), GREEDY)],
            2: [lambda: e.add_request(b, prompt(13, 64, system), scoring)],
        }

    on, off, rec = run_both(engines, scenario)
    same_tokens(_by_order(on), _by_order(off))
    b_on, b_off = list(_by_order(on).values())[1]["out"], list(_by_order(off).values())[1]["out"]
    assert rec.hits == 0 and rec.queries == 60  # the scoring request looked nothing up
    assert b_on.prompt_logprobs[0] is None
    np.testing.assert_allclose(b_on.prompt_logprobs[1:], b_off.prompt_logprobs[1:], atol=1e-4)


def test_cache_prompt_false_neither_reads_nor_writes(engines) -> None:
    on = engines[0]
    on.prefix_cache.evict(10**6)
    p = prompt(14, 40)
    opt_out = dataclasses.replace(GREEDY, cache_prompt=False)
    rec = Recorder(on)
    on.step = rec.step
    try:
        run_to_completion(
            on,
            {
                0: [lambda: on.add_request(uid(on, "a"), p, opt_out)],
                2: [lambda: on.add_request(uid(on, "b"), p, opt_out)],
            },
        )
    finally:
        del on.step
    assert rec.queries == 0 and rec.hits == 0 and on.prefix_cache.num_blocks == 0


def test_eviction_under_pressure_mid_burst(random_bundle, layout) -> None:
    """A budget that holds about three requests: blocks are evicted as the burst arrives, and
    requests that find their prefix gone recompute it; no output changes."""
    kw = dict(max_running=8, max_prefill_tokens=256, kv_budget_tokens=400)
    on = make_engine(random_bundle, layout, prefix_block_size=BS, **kw)
    off = make_engine(random_bundle, layout, prefix_caching=False, **kw)
    systems = [prompt(30 + k, 64) for k in range(4)]
    rng = random.Random(3)
    plan = [
        (step, k, prompt(100 + i, 64 + rng.randrange(1, 40), systems[k]))
        for i, (step, k) in enumerate((rng.randrange(30), rng.randrange(4)) for _ in range(24))
    ]
    blocks_seen: list[int] = []

    def scenario(e):
        sched: dict[int, list] = {}
        for i, (step, _, p) in enumerate(plan):
            sched.setdefault(step, []).append(
                lambda i=i, p=p: e.add_request(
                    f"r{i:02d}-{id(e)}", p, dataclasses.replace(GREEDY, max_tokens=8)
                )
            )
        return sched

    orig = on.step

    def step():
        outs = orig()
        blocks_seen.append(on.prefix_cache.num_blocks)
        on.scheduler.check_invariants()
        return outs

    on.step = step
    a, b, rec = run_both((on, off), scenario)
    same_tokens(_by_order(a), _by_order(b))
    assert rec.hits > 0
    assert max(blocks_seen) * BS <= 400
    assert min(blocks_seen[blocks_seen.index(max(blocks_seen)) :]) < max(blocks_seen)  # evicted mid-burst


def _by_order(results: dict) -> dict:
    """Results keyed by the order of their ids' names (engine-specific suffixes dropped)."""
    return {k.split("-")[0]: results[k] for k in sorted(results, key=lambda k: k.split("-")[0])}


def test_a_hit_row_holds_the_cache_a_whole_prefill_computes(engines) -> None:
    """The sharpest check: right after the prefill, the row of a request that reused blocks holds
    the same keys and values, position by position, as the row of the same prompt computed whole
    (a random model's near-uniform attention would forgive blocks in the wrong order)."""
    system = prompt(40, 5 * BS + 3)
    rows, hits = [], []
    for engine in engines:
        a, b = uid(engine, "a"), uid(engine, "b")
        engine.add_request(a, prompt(41, 60, system), GREEDY)
        engine.step()
        engine.add_request(b, prompt(42, 70, system), GREEDY)
        engine.step()
        hits.append(engine.last_step_stats.prefix_cache_hits)
        rows.append(engine._batch.row_kv([b])[b])
        run_to_completion(engine)
    assert hits == [5 * BS, 0]
    for got, want in zip(*rows, strict=True):
        assert got.shape == want.shape == (want.shape[0], 70, want.shape[2])
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_failed_step_leaves_no_block_without_data(engines, monkeypatch) -> None:
    """The step fails while the prefilled prompts' blocks are copied: the blocks indexed for them
    are dropped (nothing names unwritten data), nothing stays pinned, and the engine serves on."""
    on, off = engines
    system = prompt(50, 56)
    calls = []

    def broken(request_ids):
        calls.append(request_ids)
        raise RuntimeError("copy failed")

    before = on.prefix_cache.num_blocks
    monkeypatch.setattr(on._batch, "row_kv", broken)
    on.add_request("fails", prompt(51, 64, system), GREEDY)
    (out,) = on.step()
    assert calls and out.finish_reason == "error"
    assert on.prefix_cache.num_blocks == before and on.prefix_cache.num_pinned == 0
    monkeypatch.undo()
    got = run_to_completion(on, {0: [lambda: on.add_request("after", prompt(52, 60, system), GREEDY)]})
    want = run_to_completion(off, {0: [lambda: off.add_request("after", prompt(52, 60, system), GREEDY)]})
    assert got["after"]["tokens"] == want["after"]["tokens"]
    on.scheduler.check_invariants()
