"""BatchCache bookkeeping alone: joins pad to the wider group, leaves trim padding, rows stay aligned."""

from __future__ import annotations

import numpy as np

from service.engine.kv.concat_cache import BatchCache, left_pad_prompts


def kv(rows: list[list[float]], width: int) -> list[np.ndarray]:
    """One layer's key and value (B, 1, width, 1) whose entries identify the row's tokens."""
    a = np.zeros((len(rows), 1, width, 1), np.float32)
    for b, r in enumerate(rows):
        a[b, 0, width - len(r) :, 0] = r
    return [a, a.copy()]


def mask_for(rows: list[list[float]], width: int) -> np.ndarray:
    m = np.zeros((len(rows), width), np.int64)
    for b, r in enumerate(rows):
        m[b, width - len(r) :] = 1
    return m


def test_left_pad_prompts_positions_count_real_tokens() -> None:
    ids, mask, pos = left_pad_prompts([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_merge_pads_the_narrower_group_and_keep_trims() -> None:
    c = BatchCache()
    a_rows = [[1, 2, 3, 4, 5, 6]]
    c.merge(["a"], kv(a_rows, 6), mask_for(a_rows, 6), np.array([6]))
    b_rows = [[7, 8], [9]]
    c.merge(["b", "c"], kv(b_rows, 2), mask_for(b_rows, 2), np.array([2, 1]))
    assert c.row_ids == ["a", "b", "c"] and c.width == 6
    assert c.mask.tolist() == [[1] * 6, [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1]]
    assert c.past[0][1, 0, :, 0].tolist() == [0, 0, 0, 0, 7, 8]
    assert c.cached_tokens == 9 and c.allocated_tokens == 18
    c.keep(["b", "c"])  # the long row leaves: its padding goes with it
    assert c.width == 2 and c.row_ids == ["b", "c"]
    assert c.past[1][:, 0, :, 0].tolist() == [[7, 8], [0, 9]]
    assert c.next_pos.tolist() == [2, 1]


def test_decode_inputs_and_advance() -> None:
    c = BatchCache()
    rows = [[1, 2], [3]]
    c.merge(["x", "y"], kv(rows, 2), mask_for(rows, 2), np.array([2, 1]))
    ids, mask, pos = c.decode_inputs(np.array([10, 11]))
    assert ids.tolist() == [[10], [11]] and pos.tolist() == [[2], [1]]
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    presents = [np.zeros((2, 1, 3, 1), np.float32)] * 2
    c.advance(presents, mask)
    assert c.width == 3 and c.next_pos.tolist() == [3, 2]


def test_keep_nothing_empties_the_batch() -> None:
    c = BatchCache()
    rows = [[1]]
    c.merge(["only"], kv(rows, 1), mask_for(rows, 1), np.array([1]))
    c.keep([])
    assert len(c) == 0 and c.width == 0 and c.past == []


def test_released_rows_become_free_slots_and_newcomers_reuse_them() -> None:
    c = BatchCache()
    rows = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12], [13, 14, 15]]
    c.merge(list("abcde"), kv(rows, 3), mask_for(rows, 3), np.array([3] * 5))
    c.keep(list("abde"))  # 1 of 5 free: below the compaction threshold, no copy
    assert c.row_ids == ["a", "b", None, "d", "e"] and c.num_live == 4
    assert c.mask[2].tolist() == [0, 0, 0] and c.cached_tokens == 12
    _, mask, _ = c.decode_inputs(np.array([1, 1, 0, 1, 1]))
    assert mask[:, -1].tolist() == [1, 1, 0, 1, 1]  # the free slot stays fully masked
    new = [[20, 21]]
    c.merge(["f"], kv(new, 2), mask_for(new, 2), np.array([2]))
    assert c.row_ids[2] == "f" and len(c) == 5  # written in place, not appended
    assert c.past[0][2, 0, :, 0].tolist() == [0, 20, 21]
    assert c.mask[2].tolist() == [0, 1, 1] and c.next_pos[2] == 2
    wide = [[30, 31, 32, 33]]
    c.keep(list("abdef"))
    c.merge(["g"], kv(wide, 4), mask_for(wide, 4), np.array([4]))  # wider than the batch: appended
    assert c.row_ids[-1] == "g" and c.width == 4


def test_compaction_when_many_rows_are_free() -> None:
    c = BatchCache()
    rows = [[1, 2, 3, 4], [5], [6], [7]]
    c.merge(list("abcd"), kv(rows, 4), mask_for(rows, 4), np.array([4, 1, 1, 1]))
    c.keep(["b", "c", "d"])  # 1 of 4 free = 25%: compacts, and the dead padding columns go too
    assert c.row_ids == ["b", "c", "d"] and c.width == 1
