"""Plain data shared by the engine, the scheduler, the sampler and the HTTP layer.

Nothing here does I/O. The engine takes token ids in and gives token ids and text deltas out:
it owns detokenization and stop strings (service/engine/engine.py says why); the HTTP layer owns
prompt text (tokenization, chat templates) and response formatting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

FinishReason = Literal["stop", "length", "abort", "error"]


class EngineError(Exception):
    """Base class of errors the engine raises for a single request."""


class PromptTooLongError(EngineError, ValueError):
    """The prompt plus the requested new tokens do not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int, param: str = "prompt"):
        self.param = param  # the request field that holds the prompt
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length
        super().__init__(
            f"prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
            f"{prompt_tokens} + {max_tokens} = {prompt_tokens + max_tokens} exceeds the context length "
            f"of {context_length} tokens"
        )


class QueueFullError(EngineError):
    """The bounded waiting queue is full; the caller should retry later (HTTP 429)."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        super().__init__(f"the waiting queue is full ({max_waiting} requests); retry later")


class InvalidRequestError(EngineError, ValueError):
    """A request the engine cannot run (bad token ids, bad parameters); ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        self.param = param
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request decoding parameters. service.engine.rules checks them; the sampler assumes valid values."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy (argmax), whatever the other knobs say
    top_p: float = 1.0  # 1 disables nucleus sampling
    top_k: int = 0  # 0 disables top-k
    min_p: float = 0.0  # 0 disables min-p
    repetition_penalty: float = 1.0  # 1 disables; applies to prompt and generated tokens (HF/vLLM semantics)
    presence_penalty: float = 0.0  # OpenAI semantics; applies to generated tokens
    frequency_penalty: float = 0.0  # OpenAI semantics; applies to generated tokens
    seed: int | None = None  # None: drawn from the engine's generator
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; n >= 0: chosen token logprob plus top-n alternatives
    stop: tuple[str, ...] = ()  # stop strings, matched by the detokenizer
    # Added to the logits before everything else (penalties, logprobs, sampling): (token id, bias).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # None: no prompt logprobs; n >= 0: each prompt token's logprob (the first has none) plus top-n
    # alternatives, from the model's raw distribution. With max_tokens 0 the request only scores.
    prompt_logprobs: int | None = None
    # An llguidance grammar (service.engine.structured): every sampled token keeps the output a valid prefix.
    grammar: str | None = None
    # False: the prompt neither reuses nor leaves behind prefix-cache blocks (llama.cpp's name).
    cache_prompt: bool = True


@dataclass(slots=True)
class RequestTimings:
    """Monotonic timestamps (time.monotonic seconds) of one request's life in the engine."""

    arrival: float
    scheduled: float | None = None  # admitted to the running batch (prefill starts)
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per generated token

    @property
    def queue_time(self) -> float | None:
        return None if self.scheduled is None else self.scheduled - self.arrival

    @property
    def prefill_time(self) -> float | None:
        if self.scheduled is None or self.first_token is None:
            return None
        return self.first_token - self.scheduled

    @property
    def decode_time(self) -> float | None:
        if self.first_token is None or self.finished is None:
            return None
        return self.finished - self.first_token


@dataclass(slots=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(slots=True)
class RequestOutput:
    """What one engine step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str  # UTF-8 safe; the concatenation of deltas is the final text
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it, if any
    new_logprobs: list[float] | None = None  # logprob of each new token (when params.logprobs is not None)
    new_top_logprobs: list[list[TopLogprob]] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # total so far
    # First output only, when params.prompt_logprobs is set: one entry per prompt token, the first None.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[TopLogprob]] | None = None
    timings: RequestTimings | None = None  # set on the final output
    error: str | None = None  # set when finish_reason == "error"


class EngineLoad(NamedTuple):
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1 of the cached-token budget, reserved


@dataclass(slots=True)  # not frozen: a frozen dataclass takes 5x as long to build, once per step
class StepStats:
    """Plain data about one engine step, for the metrics layer (treat as read-only)."""

    batch_size: int  # sequences that produced a token this step
    num_prefill_tokens: int
    num_running: int  # after the step
    num_waiting: int  # after the step
    kv_cache_usage: float  # 0..1 of the configured cached-token budget
    step_time: float  # seconds
    num_draft_tokens: int = 0  # speculative tokens checked this step (service/engine/ngram.py)
    num_accepted_draft_tokens: int = 0  # of which kept
    num_constrained: int = 0  # rows whose tokens a grammar constrained this step (service/engine/structured.py)
    mask_time: float = 0.0  # seconds spent computing their token masks
    # Where step_time went (for profiling: bench/engine_profile.py); the rest of it is sampling,
    # updating the sequences, detokenizing and building the outputs.
    schedule_time: float = 0.0  # seconds: scheduler, the batch's bookkeeping, drafts
    model_time: float = 0.0  # seconds: the model run (ONNX Runtime and the KV layout around it)
    # Prefix cache (service/engine/prefix_cache.py), vLLM's names: prompt tokens of this step's newcomers
    # that were looked up, and of those the tokens found cached (their prefill was skipped).
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_blocks: int = 0  # blocks held after the step (pinned or evictable)
    prefix_cache_usage: float = 0.0  # their tokens as a fraction (0..1) of the KV budget
