"""N-gram drafts (service/engine/ngram.py): pure logic, no model."""

from __future__ import annotations

import random

import pytest

from service.engine.ngram import NgramIndex


def brute_force(tokens: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """The definition: the longest suffix (max_n..min_n) that occurred before; its latest earlier
    occurrence; the k tokens after it."""
    for n in range(max_n, min_n - 1, -1):
        if len(tokens) <= n:
            continue
        suffix = tokens[-n:]
        for end in range(len(tokens) - 2, n - 2, -1):  # end index of an earlier occurrence
            if tokens[end - n + 1 : end + 1] == suffix:
                return tokens[end + 1 : end + 1 + k]
    return []


def test_longest_suffix_and_latest_occurrence_win() -> None:
    # "1 2 3" occurred twice before the end; "2 3" once more; the latest "1 2 3" is followed by 9.
    idx = NgramIndex([1, 2, 3, 7, 5, 1, 2, 3, 9, 8, 4, 2, 3, 6, 1, 2, 3], max_n=3)
    assert idx.propose(3) == [9, 8, 4]
    assert idx.propose(1) == [9]
    assert idx.propose(0) == []


def test_no_match_and_min_n() -> None:
    assert NgramIndex([5, 6, 7, 8]).propose(4) == []
    idx = NgramIndex([5, 6, 7, 5], max_n=3, min_n=1)  # only the single token 5 repeats
    assert idx.propose(2) == [6, 7]
    assert NgramIndex([5, 6, 7, 5], max_n=3, min_n=2).propose(2) == []


def test_a_draft_never_runs_past_the_end() -> None:
    idx = NgramIndex([4, 4])  # the latest earlier "4" is followed by the last token only
    assert idx.propose(5) == [4]


def test_incremental_appends_equal_the_definition() -> None:
    rng = random.Random(0)
    for max_n, min_n in ((3, 1), (2, 2), (4, 2)):
        idx = NgramIndex([], max_n=max_n, min_n=min_n)
        tokens: list[int] = []
        for _ in range(400):
            t = rng.randrange(6)  # a small alphabet: many repeats
            tokens.append(t)
            idx.append(t)
            k = rng.randrange(1, 6)
            assert idx.propose(k) == brute_force(tokens, k, max_n, min_n), tokens[-8:]
        assert len(idx) == len(tokens)


def test_bad_n_is_refused() -> None:
    with pytest.raises(ValueError, match="min_n"):
        NgramIndex([], max_n=2, min_n=3)
    with pytest.raises(ValueError, match="min_n"):
        NgramIndex([], max_n=3, min_n=0)
