"""Why a sequence ends (service.engine.finishing): pure, no model."""

from __future__ import annotations

import pytest

from service.engine import finishing
from service.engine.types import SamplingParams


def check_stop(token: int, n: int, params: SamplingParams, eos_token_id: int | None) -> tuple:
    """(finish reason, stop reason) after appending ``token`` as output token ``n``, or (None, None)."""
    eos = () if eos_token_id is None else (eos_token_id,)
    end = finishing.after_token(finishing.stop_token(token, params, eos), n, params)
    return (None, None) if end is None else (end.reason, end.stop_reason)


@pytest.mark.parametrize(
    ("token", "n", "params", "expected"),
    [
        (2, 1, SamplingParams(max_tokens=5), ("stop", 2)),  # eos
        (2, 1, SamplingParams(max_tokens=5, ignore_eos=True), (None, None)),
        (2, 5, SamplingParams(max_tokens=5, ignore_eos=True), ("length", None)),
        (7, 1, SamplingParams(max_tokens=5, stop_token_ids=(7,)), ("stop", 7)),
        (7, 1, SamplingParams(max_tokens=5, stop_token_ids=(7,), ignore_eos=True), ("stop", 7)),
        (7, 5, SamplingParams(max_tokens=5, stop_token_ids=(7,)), ("stop", 7)),  # stop wins over length
        (9, 4, SamplingParams(max_tokens=5), (None, None)),
        (9, 5, SamplingParams(max_tokens=5), ("length", None)),
        (9, 1, SamplingParams(max_tokens=1), ("length", None)),
    ],
)
def test_check_stop(token: int, n: int, params: SamplingParams, expected: tuple) -> None:
    assert check_stop(token, n, params, eos_token_id=2) == expected


def test_check_stop_without_eos() -> None:
    assert check_stop(2, 1, SamplingParams(), eos_token_id=None) == (None, None)


def test_a_stop_string_wins_over_everything_else():
    p = SamplingParams(max_tokens=1)
    end = finishing.after_token(None, 1, p, stop_string="\n", grammar_complete=True, past_deadline=True)
    assert end == finishing.Ending("stop", "\n")


def test_a_complete_grammar_stops_before_the_length_limit_and_an_error_before_that():
    p = SamplingParams(max_tokens=1)
    assert finishing.after_token(None, 1, p, grammar_complete=True) == finishing.Ending("stop")
    assert finishing.after_token(None, 1, p, grammar_error=True, grammar_complete=True).reason == "error"


def test_the_deadline_finishes_as_length_with_timeout_only_when_nothing_else_ends_it():
    p = SamplingParams(max_tokens=5)
    assert finishing.after_token(None, 1, p, past_deadline=True) == finishing.DEADLINE
    assert finishing.Ending("length", "timeout") == finishing.DEADLINE
    assert finishing.after_token(None, 5, p, past_deadline=True) == finishing.Ending("length")
    assert not finishing.past_deadline(None, 1e18) and finishing.past_deadline(1.0, 1.0)


@pytest.mark.parametrize(("reason", "api"), [("stop", "stop"), ("length", "length"), (None, None)])
def test_api_finish_reason(reason, api):
    assert finishing.api_finish_reason(reason) == api
