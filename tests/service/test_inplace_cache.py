"""The in-place cache's slot bookkeeping, alone: joins, leaves, moves, decode inputs."""

from __future__ import annotations

import random

import numpy as np
import pytest

from service.engine.kv.inplace_cache import (
    MASK_WIDTH_STEP,
    DecodeBuffers,
    InplaceCache,
    Move,
    decode_inputs,
    right_pad_prompts,
)


def step_inputs(c: InplaceCache, last_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inputs of a decode step of the cache's live slots, as the runner builds them."""
    n = len(c)
    return decode_inputs(DecodeBuffers(n, c.max_len), last_tokens, c.lengths[:n], c.max_len)


def test_newcomers_take_the_next_slots_and_a_leaver_is_replaced_by_the_last_slot() -> None:
    c = InplaceCache(num_slots=4, max_len=10)
    assert c.join(["a", "b"], [3, 5]) == 0
    assert c.join(["c"], [2]) == 2
    assert c.live_ids == ["a", "b", "c"] and c.cached_tokens == 10
    assert c.remove("a") == Move(src=2, dst=0, length=2)  # c fills the hole, copying its 2 tokens
    assert c.live_ids == ["c", "b"] and c.slot("c") == 0 and list(c.lengths) == [2, 5, 0, 0]
    assert c.remove("b") is None  # the last slot leaves: nothing moves
    assert c.live_ids == ["c"] and "b" not in c
    c.check_invariants()


def test_keep_fills_holes_from_the_top_so_each_survivor_moves_at_most_once() -> None:
    c = InplaceCache(num_slots=8, max_len=10)
    c.join(list("abcdefg"), [1, 2, 3, 4, 5, 6, 7])
    moves = c.keep(["a", "c", "e", "g"])  # b (slot 1), d (3) and f (5) leave: 4 remain
    assert moves == [Move(src=4, dst=1, length=5), Move(src=6, dst=3, length=7)]  # e and g fill the holes
    assert c.live_ids == ["a", "e", "c", "g"] and list(c.lengths[:5]) == [1, 5, 3, 7, 0]
    c.check_invariants()
    assert c.keep(c.live_ids) == []


def test_decode_inputs_are_right_padded_from_the_lengths() -> None:
    c = InplaceCache(num_slots=4, max_len=10)
    c.join(["a", "b", "c"], [3, 1, 5])
    ids, mask, pos = step_inputs(c, np.array([7, 8, 9]))
    assert ids.tolist() == [[7], [8], [9]] and ids.dtype == np.int64
    assert pos.tolist() == [[3], [1], [5]]  # each new token goes to position = its row's length
    # The width is the longest row after the step (6) rounded up to MASK_WIDTH_STEP, at most max_len.
    assert mask.dtype == np.int64 and mask.shape == (3, 10)
    assert mask.tolist() == [[1] * 4 + [0] * 6, [1] * 2 + [0] * 8, [1] * 6 + [0] * 4]
    c.advance()
    assert list(c.lengths[:3]) == [4, 2, 6] and c.lengths[3] == 0


def test_decode_mask_width_changes_only_every_mask_width_step_positions() -> None:
    """A stable width keeps the runner's binding: it rebinds the mask only when the shape changes."""
    c = InplaceCache(num_slots=2, max_len=3 * MASK_WIDTH_STEP)
    c.join(["a", "b"], [1, MASK_WIDTH_STEP - 2])
    widths = []
    for _ in range(2 * MASK_WIDTH_STEP + 1):
        _, mask, _ = step_inputs(c, np.zeros(2, np.int64))
        assert (mask.sum(axis=1) == c.lengths[:2] + 1).all()
        widths.append(mask.shape[1])
        c.advance()
    assert sorted(set(widths)) == [MASK_WIDTH_STEP, 2 * MASK_WIDTH_STEP, 3 * MASK_WIDTH_STEP]
    assert widths.index(2 * MASK_WIDTH_STEP) == 2  # the longest row reaches 65 positions at its third step


def test_errors_name_the_problem() -> None:
    c = InplaceCache(num_slots=2, max_len=4)
    c.join(["a"], [4])
    with pytest.raises(ValueError, match="already holds slot 0"):
        c.join(["a"], [1])
    with pytest.raises(ValueError, match="outside"):
        c.join(["b"], [5])
    with pytest.raises(ValueError, match="exceeds the 2 slots"):
        c.join(["b", "c"], [1, 1])
    with pytest.raises(ValueError, match="exceed the cache's 4 positions"):
        step_inputs(c, np.array([1]))
    with pytest.raises(ValueError, match="num_slots"):
        InplaceCache(0, 4)


def test_right_pad_prompts() -> None:
    ids, mask, pos = right_pad_prompts([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert pos.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_thousands_of_random_joins_finishes_and_aborts_keep_every_row_with_its_data() -> None:
    """A fake buffer holds each request's token ids; after every move each request still finds its own."""
    rng = random.Random(3)
    num_slots, max_len = 12, 40
    c = InplaceCache(num_slots, max_len)
    buf = np.full((num_slots, max_len), -1, np.int64)  # stands for one key buffer (N, M)
    tokens: dict[str, list[int]] = {}
    served = 0
    for step in range(5000):
        # leaves: some finish, some are aborted; both go through keep() as the engine does
        live = c.live_ids
        leaving = {r for r in live if rng.random() < 0.15 or len(tokens[r]) >= max_len - 1}
        for m in c.keep([r for r in live if r not in leaving]):
            buf[m.dst, : m.length] = buf[m.src, : m.length]
        for r in leaving:
            del tokens[r]
        # decode: every live row writes its next token at position = its length
        if len(c):
            _, mask, pos = step_inputs(c, np.zeros(len(c), np.int64))
            assert int(c.lengths[: len(c)].max()) + 1 <= mask.shape[1] <= max_len
            assert (mask.sum(axis=1) == c.lengths[: len(c)] + 1).all()
            for i, r in enumerate(c.live_ids):
                tok = step * 1000 + i
                buf[i, pos[i, 0]] = tok
                tokens[r].append(tok)
            c.advance()
        # joins: newcomers take the next slots
        k = rng.randrange(0, min(4, num_slots - len(c)) + 1)
        new = [f"s{served + j}" for j in range(k)]
        lengths = [rng.randrange(1, 20) for _ in new]
        start = c.join(new, lengths)
        for j, (r, n) in enumerate(zip(new, lengths, strict=True)):
            tokens[r] = [-(served + j) * 100 - t for t in range(n)]  # the prefill writes n tokens
            buf[start + j, :n] = tokens[r]
        served += k
        c.check_invariants()
        assert set(c.live_ids) == set(tokens)
        for r in c.live_ids:
            s = c.slot(r)
            assert c.lengths[s] == len(tokens[r])
            assert buf[s, : c.lengths[s]].tolist() == tokens[r], f"request {r} lost its cache at step {step}"
    assert served > 1000
    c.clear()
    c.check_invariants()
    assert len(c) == 0 and c.cached_tokens == 0


def test_chunk_inputs_cover_one_slot_and_advance_keeps_what_the_caller_says() -> None:
    c = InplaceCache(num_slots=2, max_len=10)
    c.join(["a"], [4])
    ids, mask, pos = c.chunk_inputs(np.array([7, 8, 9]))
    assert ids.tolist() == [[7, 8, 9]] and pos.tolist() == [[4, 5, 6]]
    assert mask.shape == (1, 7) and mask.all()
    c.advance(2)  # two of the three positions kept: the third is overwritten by the next run
    assert c.lengths[0] == 6
    with pytest.raises(ValueError, match="exceed"):
        c.chunk_inputs(np.arange(5))
    c.join(["b"], [1])
    with pytest.raises(ValueError, match="exactly one live slot"):
        c.chunk_inputs(np.array([1]))
