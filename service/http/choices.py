"""A request's choices as the HTTP process accumulates them from the engine's outputs.

``Choice`` gathers one choice's text, tokens, logprobs, finish reason and arrival times (for
the latency metrics); ``merge_outputs`` joins outputs that queued up into one; ``usage`` counts
tokens the way OpenAI does. The response formatters (service/http/formatting.py) render from these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from service.engine import finishing
from service.engine.types import RequestOutput


@dataclass
class Choice:
    """One choice's outputs so far, and the times they reached the HTTP process."""

    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    output: RequestOutput | None = None  # the final one
    first_token_t: float | None = None  # the first token reached the HTTP process
    first_sent_t: float | None = None  # streaming: the first chunk with a token was sent
    last_token_t: float | None = None
    itl: list[float] = field(default_factory=list)
    text_len: int = 0  # characters of text so far
    prev_text_len: int = 0  # characters before the last delta (text_offset of its tokens)
    prompt_logprobs: list[float | None] | None = None  # params.prompt_logprobs: one per prompt token
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    echo_sent: bool = False  # streaming echo: the prompt went out with the first chunk
    tool_call_id: str | None = None  # chat tool calls: this choice's call id (the same in every chunk)
    text_frame: tuple[str, ...] | None = None  # streaming: the JSON around a text-only chunk's text (formatting)

    def add(self, out: RequestOutput, now: float) -> None:
        self.prev_text_len = self.text_len
        self.text_len += len(out.text_delta)
        k = len(out.new_token_ids)
        if k:  # one inter-token gap per token after the first
            if self.first_token_t is None:
                self.first_token_t = now
                self.itl.extend([0.0] * (k - 1))
            else:
                self.itl.extend([(now - self.last_token_t) / k] * k)
            self.last_token_t = now
        self.text.append(out.text_delta)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
            self.prompt_top_logprobs = [[(t.token_id, t.logprob) for t in alts] for alts in out.prompt_top_logprobs or []]
        self.token_ids.extend(out.new_token_ids)
        if out.new_logprobs is not None:
            self.logprobs.extend(out.new_logprobs)
        if out.new_top_logprobs is not None:
            self.top_logprobs.extend([(t.token_id, t.logprob) for t in tops] for tops in out.new_top_logprobs)
        self.num_prompt_tokens = out.num_prompt_tokens or self.num_prompt_tokens
        self.num_output_tokens = max(self.num_output_tokens, out.num_output_tokens)
        if out.finished:
            self.finish_reason = finishing.api_finish_reason(out.finish_reason)
            self.output = out

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def merge_outputs(outs: Sequence[RequestOutput]) -> RequestOutput:
    """One output standing for several consecutive outputs of one choice, oldest first.

    Token ids, logprobs and top logprobs are concatenated and the text deltas joined, so a
    stream chunk of the merged output carries one logprobs entry per token; the counts, the
    finish fields and the timings are the last output's (``num_output_tokens`` is a running
    total). Logprobs are ``None`` only when every output had none.
    """
    if len(outs) == 1:
        return outs[0]
    last = outs[-1]
    lps = [o.new_logprobs for o in outs]
    tops = [o.new_top_logprobs for o in outs]
    return RequestOutput(
        request_id=last.request_id,
        new_token_ids=[t for o in outs for t in o.new_token_ids],
        text_delta="".join(o.text_delta for o in outs),
        finished=last.finished,
        finish_reason=last.finish_reason,
        stop_reason=last.stop_reason,
        new_logprobs=None if all(x is None for x in lps) else [v for x in lps for v in x or ()],
        new_top_logprobs=None if all(x is None for x in tops) else [v for x in tops for v in x or ()],
        num_prompt_tokens=next((o.num_prompt_tokens for o in reversed(outs) if o.num_prompt_tokens), 0),
        prompt_logprobs=next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None),
        prompt_top_logprobs=next((o.prompt_top_logprobs for o in outs if o.prompt_top_logprobs is not None), None),
        num_output_tokens=max(o.num_output_tokens for o in outs),
        timings=last.timings,
        error=last.error,
    )


def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(c.num_output_tokens for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
