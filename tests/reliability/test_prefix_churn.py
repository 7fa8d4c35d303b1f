"""Prefix caching under churn: 1,000 requests with random shared prefixes, random aborts and a KV
budget small enough that cached blocks are evicted all the time, on both KV layouts.

Engine level (no HTTP: the server adds nothing to what is checked here). At the end: every
request finished once, the bookkeeping invariants hold, nothing is pinned or reserved, the
running/waiting/KV gauges are back to zero, the cache holds no more than the budget; and a sample
of the finished requests re-run on an engine without the cache gives the same tokens.
"""

from __future__ import annotations

import random
import time

import pytest
from test_engine import KV_INPLACE, make_engine, run_to_completion

from service.engine.types import SamplingParams

N = 1000
BS = 8
BUDGET = 1200  # about 8 requests' reservations: cached blocks compete with running ones


@pytest.mark.parametrize("layout", list(KV_INPLACE))
def test_a_thousand_requests_with_shared_prefixes_aborts_and_eviction(random_bundle, layout) -> None:
    t0 = time.monotonic()
    kw = dict(max_running=12, max_waiting=64, kv_budget_tokens=BUDGET, max_prefill_tokens=256)
    engine = make_engine(random_bundle, layout, prefix_block_size=BS, **kw)
    rng = random.Random(11)
    systems = [[rng.randrange(3, 500) for _ in range(rng.randrange(8, 90))] for _ in range(12)]
    requests: dict[str, tuple[list[int], SamplingParams]] = {}
    finished: dict[str, tuple[str, list[int]]] = {}
    tokens: dict[str, list[int]] = {}
    live: set[str] = set()
    hits = queries = evictions = 0
    last_blocks = 0
    submitted = 0
    while submitted < N or engine.has_unfinished():
        while submitted < N and engine.load().num_waiting < 24 and rng.random() < 0.8:
            rid = f"p{submitted:04d}"
            prompt = rng.choice(systems) + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 40))]
            params = SamplingParams(
                max_tokens=rng.randrange(1, 10),
                temperature=rng.choice([0.0, 0.8]),
                seed=rng.randrange(1000),
                ignore_eos=True,
                cache_prompt=rng.random() > 0.05,
            )
            requests[rid] = (prompt, params)
            engine.add_request(rid, prompt, params)
            live.add(rid)
            submitted += 1
        for rid in rng.sample(sorted(live), k=min(len(live), int(rng.random() < 0.3))):
            engine.abort(rid)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                assert out.request_id not in finished, "a request finished twice"
                finished[out.request_id] = (out.finish_reason, tokens.pop(out.request_id))
                live.discard(out.request_id)
        st = engine.last_step_stats
        hits, queries = hits + st.prefix_cache_hits, queries + st.prefix_cache_queries
        evictions += st.prefix_cache_blocks < last_blocks
        last_blocks = st.prefix_cache_blocks
        engine.scheduler.check_invariants()  # reserved + cached <= budget; the index is consistent
        assert engine.prefix_cache.num_pinned == 0  # pins last one step
        assert engine._batch.num_live == engine.load().num_running
        if layout == "inplace":
            engine._batch.slots.check_invariants()

    assert len(finished) == N
    reasons = [r for r, _ in finished.values()]
    assert set(reasons) == {"length", "abort"}
    st = engine.last_step_stats
    assert (st.num_running, st.num_waiting, st.kv_cache_usage) == (0, 0, 0.0)
    assert engine.scheduler.reserved_tokens == 0 and engine.prefix_cache.num_pinned == 0
    assert 0 < st.prefix_cache_usage <= 1 and st.prefix_cache_blocks * BS <= BUDGET
    assert 0.2 < hits / queries < 1, (hits, queries)  # shared prefixes do hit; eviction keeps it below 1
    assert evictions > 10, evictions

    # A sample re-run without the cache: the same tokens (seeded and greedy alike).
    off = make_engine(random_bundle, layout, prefix_caching=False, **kw)
    sample = rng.sample(sorted(r for r, (reason, _) in finished.items() if reason == "length"), 60)
    schedule = {i // 6: [] for i in range(len(sample))}
    for i, rid in enumerate(sample):
        schedule[i // 6].append(lambda rid=rid: off.add_request(rid, *requests[rid]))
    again = run_to_completion(off, schedule)
    for rid in sample:
        assert again[rid]["tokens"] == finished[rid][1], rid
    print(
        f"\n{layout}: {N} requests, hit rate {hits / queries:.2f}, {evictions} steps evicted, "
        f"{time.monotonic() - t0:.1f} s"
    )
