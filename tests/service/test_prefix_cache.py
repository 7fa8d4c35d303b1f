"""The prefix-cache index, the block pool and the scheduler's use of them: pure logic, no model."""

from __future__ import annotations

import random

import numpy as np
import pytest

from service.engine.kv.prefix_pool import BlockPool, as_tokens
from service.engine.prefix_cache import BlockIndex, block_hashes, lookup_blocks
from service.engine.scheduler import Scheduler

SALT = b"model-a"


def H(tokens: list[int], bs: int = 4, salt: bytes = SALT) -> list[bytes]:
    return block_hashes(tokens, bs, salt)


# ---- hashing -------------------------------------------------------------------------------------
def test_hashes_name_full_blocks_and_everything_before_them() -> None:
    a = H(list(range(10)))
    assert len(a) == 2  # 10 tokens: two full blocks of 4, the last 2 tokens are no block
    b = H([*range(8), 99, 99, 99, 99])
    assert b[:2] == a and len(b) == 3  # the same first two blocks: the same names
    c = H([0, 1, 2, 3, 9, 5, 6, 7])
    assert c[0] == a[0] and c[1] != a[1]  # block 1 differs
    d = H([9, 1, 2, 3, 4, 5, 6, 7])
    assert d[0] != a[0] and d[1] != a[1]  # same tokens in block 1, different past: a different block
    assert H(list(range(8)), salt=b"model-b")[0] != a[0]  # another model never shares
    assert block_hashes(list(range(10)), 4, SALT, num_blocks=1) == a[:1]
    assert H([1, 2, 3]) == []


def test_lookup_leaves_the_last_prompt_token_to_compute() -> None:
    assert lookup_blocks(16, 16) == 0  # a one-block prompt: its last token needs logits
    assert lookup_blocks(17, 16) == 1
    assert lookup_blocks(32, 16) == 1
    assert lookup_blocks(33, 16) == 2
    assert lookup_blocks(1, 16) == 0


# ---- the index -----------------------------------------------------------------------------------
def test_insert_match_and_lru_eviction_tail_first() -> None:
    idx = BlockIndex(8)
    a = H(list(range(12)))  # 3 blocks
    new = idx.insert(a, max_blocks=8)
    assert [p for p, _ in new] == [0, 1, 2]
    assert idx.match(a) == [i for _, i in new]
    assert idx.match(H([*range(8), 7, 7, 7, 7])) == [new[0][1], new[1][1]]  # the common leading blocks
    assert idx.insert(a, max_blocks=8) == []  # held already: nothing new
    assert idx.evict(1) == 1
    assert len(idx.match(a)) == 2  # the tail went first; the head still matches
    idx.check_invariants()


def test_least_recently_used_chain_goes_first() -> None:
    idx = BlockIndex(4)
    a, b = H([1] * 8), H([2] * 8)
    idx.insert(a, 4)
    idx.insert(b, 4)
    idx.insert(a, 4)  # touch a: b is now the least recently used
    c = H([3] * 8)
    new = idx.insert(c, 4)  # full: evicts b's two blocks
    assert len(new) == 2
    assert len(idx.match(a)) == 2 and idx.match(b) == [] and len(idx.match(c)) == 2
    idx.check_invariants()


def test_pinned_blocks_are_never_evicted() -> None:
    idx = BlockIndex(4)
    a = H([1] * 8)
    idx.insert(a, 4)
    ids = idx.match(a)
    idx.acquire(ids)
    assert idx.evict(10) == 0
    assert idx.insert(H([2] * 8), 2) == []  # no room: both held blocks are pinned
    idx.acquire(ids)  # two newcomers share them
    idx.release(ids)
    assert idx.evict(10) == 0  # still pinned once
    idx.release(ids)
    assert idx.num_pinned == 0 and idx.evict(10) == 2
    with pytest.raises(ValueError, match="not pinned"):
        idx.release(ids)
    idx.check_invariants()


def test_forget_drops_blocks_whose_data_was_not_written() -> None:
    idx = BlockIndex(8)
    a = H(list(range(12)))
    new = idx.insert(a, 8)
    idx.forget([i for _, i in new[1:]])
    assert len(idx.match(a)) == 1 and idx.num_blocks == 1
    idx.acquire(idx.match(a))
    with pytest.raises(ValueError, match="pinned"):
        idx.forget(idx.match(a))
    idx.check_invariants()


def test_insert_stops_at_the_first_block_without_room_and_never_evicts_its_own() -> None:
    idx = BlockIndex(8)
    new = idx.insert(H(list(range(40))), max_blocks=3)  # 10 blocks, room for 3
    assert [p for p, _ in new] == [0, 1, 2]
    assert idx.num_blocks == 3
    idx.check_invariants()


def test_random_operations_keep_the_bookkeeping_consistent() -> None:
    rng = random.Random(0)
    idx = BlockIndex(32)
    prefixes = [[rng.randrange(50) for _ in range(40)] for _ in range(5)]
    pinned: list[list[int]] = []
    for _ in range(3000):
        op = rng.random()
        tokens = rng.choice(prefixes)[: rng.randrange(0, 41)] + [
            rng.randrange(50) for _ in range(rng.randrange(8))
        ]
        if op < 0.4:
            idx.insert(H(tokens), max_blocks=rng.randrange(0, 33))
        elif op < 0.7:
            ids = idx.match(H(tokens))
            idx.acquire(ids)
            pinned.append(ids)
        elif op < 0.9 and pinned:
            idx.release(pinned.pop(rng.randrange(len(pinned))))
        else:
            idx.evict(rng.randrange(5))
        idx.check_invariants()
    for ids in pinned:
        idx.release(ids)
    assert idx.num_pinned == 0
    idx.evict(10**6)
    assert idx.num_blocks == 0
    idx.check_invariants()


# ---- the pool ------------------------------------------------------------------------------------
def test_pool_round_trips_blocks_of_a_row() -> None:
    pool = BlockPool(num_layers=2, num_heads=3, head_dim=5, num_blocks=6, block_size=4)
    rng = np.random.default_rng(0)
    row = [rng.standard_normal((3, 14, 5)).astype(np.float32) for _ in range(4)]  # 14 tokens: 3 full blocks
    pool.write([(0, 5), (2, 1)], row)  # blocks 0 and 2 of the row into ids 5 and 1
    got = [as_tokens(b) for b in pool.read([5, 1])]
    for g, r in zip(got, row, strict=True):
        assert g.shape == (3, 8, 5)
        np.testing.assert_array_equal(g[:, :4], r[:, 0:4])
        np.testing.assert_array_equal(g[:, 4:], r[:, 8:12])
    with pytest.raises(ValueError, match="holds 14 tokens"):
        pool.write([(3, 0)], row)


# ---- the scheduler with a cache ------------------------------------------------------------------
def sched(budget: int, bs: int = 4, **kw) -> Scheduler:
    kw.setdefault("max_running", 8)
    kw.setdefault("max_waiting", 64)
    kw.setdefault("max_prefill_tokens", 1000)
    return Scheduler(kv_budget_tokens=budget, prefix_cache=BlockIndex(budget // bs), block_size=bs, **kw)


def test_admission_pins_hits_and_counts_only_the_rest_as_prefill() -> None:
    s = sched(budget=200, max_prefill_tokens=20)
    p = list(range(40))
    s.add_request("a", 40, 4, tuple(H(p)[: lookup_blocks(40, 4)]))
    out = s.schedule()
    assert out.admitted == ["a"] and out.cached == {}
    assert len(s.cache_blocks(H(p))) == 10
    s.finish("a")
    s.add_request("b", 40, 4, tuple(H(p)[: lookup_blocks(40, 4)]))  # 9 blocks hit: 4 tokens to prefill
    s.add_request("c", 40, 4, tuple(H(p)[: lookup_blocks(40, 4)]))
    out = s.schedule()
    assert out.admitted == ["b", "c"]  # 4 + 4 computed tokens fit the prefill budget of 20
    assert [len(v) for v in out.cached.values()] == [9, 9]
    assert s.prefix_cache.num_pinned == 9
    for ids in out.cached.values():
        s.prefix_cache.release(ids)
    s.check_invariants()


def test_newcomers_evict_cached_blocks_but_never_pinned_ones_or_running_requests() -> None:
    s = sched(budget=64)
    s.add_request("a", 32, 8, ())
    s.schedule()
    assert len(s.cache_blocks(H(list(range(32))))) == 6  # 64 - 40 reserved = 24 tokens: 6 blocks
    s.finish("a")
    assert s.cached_tokens == 24
    s.add_request("b", 40, 10, ())  # needs 50: 40 free, so 3 blocks (12 tokens) are evicted
    out = s.schedule()
    assert out.admitted == ["b"]
    assert s.reserved_tokens + s.cached_tokens <= 64
    assert s.cached_tokens == 12  # evicted just enough: 50 + 12 = 62
    s.add_request("c", 30, 10, ())  # does not fit beside b even with an empty cache: waits
    assert s.schedule().admitted == []
    assert s.cached_tokens == 12  # and evicted nothing for it
    s.check_invariants()


def test_a_hit_that_cannot_be_admitted_is_unpinned() -> None:
    s = sched(budget=64)
    p = list(range(20))
    s.add_request("a", 20, 4, ())
    s.schedule()
    s.cache_blocks(H(p))
    s.add_request("b", 20, 30, tuple(H(p)[:4]))  # 50 + 24 running > 64, eviction cannot help
    assert s.schedule().admitted == []
    assert s.prefix_cache.num_pinned == 0
    s.check_invariants()
