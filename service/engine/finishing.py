"""Why a sequence ends: the one place that decides, and how each ending is reported over HTTP.

The others report what they saw and ask here: the engine, for every sampled token, passes what
the sampler picked, what the grammar matcher said and what the detokenizer matched
(``after_token``); the engine and the worker ask ``past_deadline``/``DEADLINE`` for the
server-side time limit; the HTTP layer maps an ending to the API's ``finish_reason``
(``api_finish_reason``).

The endings, in the order they win when several happen on one token:

    a stop string in the text         "stop"    stop_reason = the string (the text ends before it)
    end of sequence or a stop token   "stop"    stop_reason = the token id (never rendered)
    grammar error                     "error"   (cannot happen: the mask allowed the token)
    the grammar's structure complete  "stop"    stop_reason = None (nothing may follow)
    max_tokens reached                "length"
    the request's deadline passed     "length"  stop_reason = "timeout"
    aborted (client gone)             "abort"
    the engine failed                 "error"

A stop token is checked before the detokenizer sees the token, since it is not rendered.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

from service.engine.types import FinishReason, SamplingParams

TIMEOUT = "timeout"  # stop_reason of a request cut by its deadline


@dataclass(frozen=True, slots=True)
class Ending:
    reason: FinishReason
    stop_reason: str | int | None = None


DEADLINE = Ending("length", TIMEOUT)
ABORTED = Ending("abort")


def stop_token(token_id: int, params: SamplingParams, eos_ids: Container[int]) -> Ending | None:
    """The token itself ends the sequence (end of sequence unless ``ignore_eos``, or a stop token)."""
    if (token_id in eos_ids and not params.ignore_eos) or token_id in params.stop_token_ids:
        return Ending("stop", token_id)
    return None


def after_token(
    token_ending: Ending | None,
    num_output_tokens: int,
    params: SamplingParams,
    *,
    stop_string: str | None = None,
    grammar_error: bool = False,
    grammar_complete: bool = False,
    past_deadline: bool = False,
) -> Ending | None:
    """How the sequence ends with the token just appended (``num_output_tokens`` includes it), or None.

    Args:
        token_ending: ``stop_token``'s answer for the token.
        stop_string: the stop string the detokenizer matched in the token's text, if any.
        grammar_error, grammar_complete: what the grammar matcher said after consuming the token.
        past_deadline: the request's deadline has passed.
    """
    if stop_string is not None:
        return Ending("stop", stop_string)
    if token_ending is not None:
        return token_ending
    if grammar_error:
        return Ending("error")
    if grammar_complete:
        return Ending("stop")
    if num_output_tokens >= params.max_tokens:
        return Ending("length")
    if past_deadline:
        return DEADLINE
    return None


def past_deadline(deadline: float | None, now: float) -> bool:
    return deadline is not None and now >= deadline


def api_finish_reason(reason: FinishReason | None) -> str | None:
    """The OpenAI ``finish_reason`` of an engine ending: "length" for a cut, "stop" otherwise.

    ("abort" and "error" never reach a response: the HTTP layer answers them as errors.)
    """
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"
