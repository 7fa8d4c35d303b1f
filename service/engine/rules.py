"""The rules a generation request follows, in one table, checked at the HTTP edge and by the engine.

``BOUNDS`` holds the range of every numeric sampling parameter. The HTTP models
(service/http/protocol.py) take their field constraints, and so the served OpenAPI schema, from it
(``constraints``); ``check`` applies it to a ``SamplingParams`` together with the rules that
depend on the model (vocabulary size, context length). ``Engine.add_request`` calls ``check``
too, so a request that reaches the engine by another road (a benchmark, a test, a future
endpoint) meets the same rules with the same messages.

Adding a sampling parameter: its field in ``SamplingParams`` (service/engine/types.py) and in the
protocol model, its row here, and its use in the sampler. Nothing else copies it.

Pure: no I/O, no model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from service.engine.types import InvalidRequestError, PromptTooLongError, SamplingParams

MAX_LOGPROBS = 20  # alternatives per token, generated or prompt (OpenAI's chat limit)
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: [-100, 100]
MAX_SEED = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Bound:
    """A closed or half-open range; ``None`` is unbounded on that side."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is refused
    note: str = ""  # what a special value means, for the message ("0 disables it")

    def ok(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or v <= self.hi

    def describe(self) -> str:
        if self.hi is None:
            text = f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        else:
            text = f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}]"
        return f"{text} ({self.note})" if self.note else text

    def constraints(self) -> dict[str, float]:
        """The bound as pydantic ``Field`` keywords."""
        out: dict[str, float] = {}
        if self.lo is not None:
            out["gt" if self.lo_open else "ge"] = self.lo
        if self.hi is not None:
            out["le"] = self.hi
        return out


def _num(x: float | None) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


BOUNDS: dict[str, Bound] = {
    "temperature": Bound(0.0, 2.0, note="0 is greedy"),
    "top_p": Bound(0.0, 1.0, lo_open=True),
    "top_k": Bound(0, note="0 disables it"),
    "min_p": Bound(0.0, 1.0),
    "repetition_penalty": Bound(0.0, 10.0, lo_open=True),
    "presence_penalty": Bound(-2.0, 2.0),
    "frequency_penalty": Bound(-2.0, 2.0),
    "seed": Bound(0, MAX_SEED),
    "logprobs": Bound(0, MAX_LOGPROBS),
    "prompt_logprobs": Bound(0, MAX_LOGPROBS),
    "logit_bias": Bound(-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS),  # each bias
}


def constraints(name: str) -> dict[str, Any]:
    """Field keywords of the parameter ``name`` (``Field(1.0, **constraints("temperature"))``)."""
    return BOUNDS[name].constraints()


def _bad(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param}: {message}", param=param)


def check(params: SamplingParams, *, prompt_len: int, vocab_size: int, context_length: int,
          prompt_param: str = "prompt") -> None:
    """Raise InvalidRequestError (naming the field and the limit) or PromptTooLongError.

    ``prompt_param`` names the field that holds the prompt, for PromptTooLongError.param.
    """
    for name, bound in BOUNDS.items():
        if name == "logit_bias":
            continue
        v = getattr(params, name)
        if v is not None and not bound.ok(v):
            raise _bad(name, f"must be {bound.describe()}, got {v}")
    if params.max_tokens < 0 or (params.max_tokens == 0 and params.prompt_logprobs is None):
        raise _bad("max_tokens", f"must be >= 1 (0 only to score the prompt), got {params.max_tokens}")
    if params.max_tokens > context_length:
        raise _bad("max_tokens", f"must be <= {context_length} (the context length), got {params.max_tokens}")
    if prompt_len + params.max_tokens > context_length:
        raise PromptTooLongError(prompt_len, params.max_tokens, context_length, param=prompt_param)
    for t in params.stop_token_ids:
        if not 0 <= t < vocab_size:
            raise _bad("stop_token_ids", f"{t} is outside the vocabulary [0, {vocab_size})")
    bias = BOUNDS["logit_bias"]
    for t, b in params.logit_bias:
        if not 0 <= t < vocab_size:
            raise _bad("logit_bias", f"token id {t} is outside the vocabulary [0, {vocab_size})")
        if not bias.ok(b):
            raise _bad("logit_bias", f"the bias of token {t} must be {bias.describe()}, got {b}")


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    """Every id of a prompt given as token ids lies in the vocabulary."""
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise _bad(param, f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
