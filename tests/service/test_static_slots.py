"""The static decode path's bookkeeping (service/engine/kv/static_cache.py): buckets, slots, fixed-shape inputs."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine.kv.static_cache import StaticSlots, bucket_for, contiguous_runs, decode_buckets


def test_buckets_are_powers_of_two_capped_by_the_cache() -> None:
    assert decode_buckets(1) == (1,)
    assert decode_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert decode_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    with pytest.raises(ValueError, match="max_running must be >= 1"):
        decode_buckets(0)


def test_bucket_for_is_the_smallest_that_fits() -> None:
    b = decode_buckets(48)
    assert [bucket_for(n, b) for n in (1, 2, 3, 5, 32, 33, 48)] == [1, 2, 4, 8, 32, 48, 48]
    with pytest.raises(ValueError, match="49 slots does not fit"):
        bucket_for(49, b)
    with pytest.raises(ValueError, match="0 slots"):
        bucket_for(0, b)


def test_contiguous_runs() -> None:
    assert contiguous_runs([]) == []
    assert contiguous_runs([3]) == [(3, 4, [0])]
    assert contiguous_runs([0, 1, 4, 5, 6, 9]) == [(0, 2, [0, 1]), (4, 7, [2, 3, 4]), (9, 10, [5])]


def test_sequences_keep_their_slots_and_newcomers_fill_the_lowest_holes() -> None:
    s = StaticSlots(num_slots=8, max_len=16)
    assert s.join(["a", "b", "c", "d"], [3, 5, 2, 4]) == [0, 1, 2, 3]
    s.keep(["a", "d"])  # b and c leave: nothing moves
    assert s.live_ids == ["a", "d"] and s.live_slots == [0, 3] and s.top == 4
    assert s.lengths.tolist() == [3, 0, 0, 4, 0, 0, 0, 0]
    assert s.join(["e", "f", "g"], [1, 2, 6]) == [1, 2, 4]  # the holes first, then above
    assert s.live_ids == ["a", "e", "f", "d", "g"] and s.top == 5
    assert s.cached_tokens == 3 + 1 + 2 + 4 + 6
    s.check_invariants()
    s.keep([])
    assert len(s) == 0 and s.top == 0
    s.check_invariants()


def test_join_refuses_what_does_not_fit() -> None:
    s = StaticSlots(num_slots=2, max_len=8)
    s.join(["a"], [2])
    with pytest.raises(ValueError, match="1 live \\+ 2 joining exceeds the 2 slots"):
        s.join(["b", "c"], [1, 1])
    with pytest.raises(ValueError, match="already holds slot 0"):
        s.join(["a"], [1])
    with pytest.raises(ValueError, match="length 9 is outside"):
        s.join(["b"], [9])
    assert s.live_ids == ["a"]


def test_decode_inputs_have_the_bucket_shape_and_padding_rows_are_harmless() -> None:
    s = StaticSlots(num_slots=8, max_len=6)
    s.join(["a", "b", "c"], [3, 1, 2])
    s.keep(["a", "c"])  # slot 1 is a hole below the top: a padding row
    ids, mask, pos = s.decode_inputs(np.array([11, 33]), pad_id=0)
    assert ids.shape == (4, 1) and mask.shape == (4, 6) and pos.shape == (4, 1)  # top 3 -> bucket 4
    assert ids[:, 0].tolist() == [11, 0, 33, 0]
    assert pos[:, 0].tolist() == [3, 0, 2, 0]  # the new token's position = cached tokens
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    s.advance()
    assert s.lengths.tolist()[:4] == [4, 0, 3, 0]  # free slots stay empty


def test_decode_inputs_refuse_a_full_row_and_a_wrong_count() -> None:
    s = StaticSlots(num_slots=2, max_len=4)
    s.join(["a"], [4])
    with pytest.raises(ValueError, match="exceed the cache's 4 positions"):
        s.decode_inputs(np.array([1]), pad_id=0)
    with pytest.raises(ValueError, match="1 live slots but 2 tokens"):
        s.decode_inputs(np.array([1, 2]), pad_id=0)


def test_settings_name_the_static_path_variables() -> None:
    from service.settings import Settings, SettingsError

    s = Settings.from_env({})
    assert (s.static_decode, s.cuda_graph) == ("auto", True)
    s = Settings.from_env({"TEXTGEN_STATIC_DECODE": "off", "TEXTGEN_CUDA_GRAPH": "false"})
    assert (s.static_decode, s.cuda_graph) == ("off", False)
    with pytest.raises(SettingsError, match="TEXTGEN_STATIC_DECODE"):
        Settings.from_env({"TEXTGEN_STATIC_DECODE": "yes"})
