"""Engine outputs → response bodies and stream chunks, in the shapes of service.http.protocol.

One formatter per endpoint (``COMPLETION``, ``CHAT``, ``GENERATE``), each answering the same
four questions: what opens a stream, what one output becomes, the usage chunk, the whole body.
A new endpoint is a route (service/http/api.py), a protocol model and a formatter here. Logprobs and
token texts are rendered here too.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel

from bundle.tokenizer import Tokenizer
from service.engine.types import RequestOutput
from service.http import protocol as p
from service.http.choices import Choice, usage
from service.http.jobs import Job, ModelInfo

if TYPE_CHECKING:
    from service.process.frontend import Pending

DONE = "data: [DONE]\n\n"
_SENTINEL = "@@textgen-chunk-text@@"
_json_str = json.JSONEncoder(ensure_ascii=False).encode  # a str's JSON as pydantic writes it (UTF-8, not \\u)


def sse(model) -> str:
    return f"data: {model.model_dump_json()}\n\n"


def _text_chunk(job: Job, m: ModelInfo, c: Choice, chunk: type[BaseModel], choice: Callable[[str], BaseModel],
                text: str) -> str:
    """The SSE event of a ``chunk`` model holding the one choice ``choice(text)``, a chunk whose
    only variable part is its text.

    Most chunks of a stream are such a chunk (no logprobs, not the last). Pydantic builds and
    dumps the first of a choice with a placeholder text; the JSON around the placeholder is kept
    (``Choice.text_frame``) and every later chunk is that frame around the text's JSON string,
    byte for byte what pydantic would write, for a fraction of the cost.
    """
    def build(text: str) -> BaseModel:
        return chunk(id=job.id, created=m.created, model=m.name, choices=[choice(text)])

    frame = c.text_frame
    if frame is None:
        dump, quoted = build(_SENTINEL).model_dump_json(), f'"{_SENTINEL}"'
        head, _, tail = dump.partition(quoted)
        frame = c.text_frame = (head, tail) if dump.count(quoted) == 1 else ()
    if not frame:  # another string of the chunk is the placeholder itself (a model of that name)
        return sse(build(text))
    return f"data: {frame[0]}{_json_str(text)}{frame[1]}\n\n"


def _usage(job: Job, choices: list[Choice]) -> p.Usage:
    return p.Usage(**usage(job.num_prompt_tokens, choices))


def completion_body(job: Job, m: ModelInfo, choices: list[Choice]) -> p.CompletionResponse:
    return p.CompletionResponse(
        id=job.id,
        created=m.created,
        model=m.name,
        choices=[
            p.CompletionChoice(
                index=c.index,
                text=_echo(job, c) + "".join(c.text),
                logprobs=_completion_lp_echoed(job, m, c, c.token_ids, c.logprobs, c.top_logprobs, 0),
                finish_reason=c.finish_reason,
            )
            for c in choices
        ],
        usage=_usage(job, choices),
    )


def _echo(job: Job, c: Choice) -> str:
    """The prompt text echoed before choice ``c`` (echo on /v1/completions), else ""."""
    return job.echo[job.prompt_index[c.index]] if job.echo is not None else ""


def _completion_lp_echoed(job: Job, m: ModelInfo, c: Choice, ids, lps, tops, offset: int):
    """Completion logprobs of the new tokens; with echo, the prompt's tokens first (the first with
    null logprob and alternatives), the new tokens' offsets counted after the prompt's text."""
    echo = _echo(job, c)
    out = _completion_lp(job, m, ids, lps, tops, len(echo) + offset)
    if job.echo is None or out is None or c.prompt_logprobs is None:
        return out
    prompt_tops = [None, *(c.prompt_top_logprobs or [])[1:]]
    head = completion_logprobs(m.tokenizer, job.prompt_of(c.index), c.prompt_logprobs, prompt_tops, 0)
    return p.CompletionLogprobs(
        tokens=head["tokens"] + out.tokens,
        token_logprobs=head["token_logprobs"] + out.token_logprobs,
        top_logprobs=head["top_logprobs"] + (out.top_logprobs or [{} for _ in out.tokens]),
        text_offset=head["text_offset"] + out.text_offset,
    )


def chat_body(job: Job, m: ModelInfo, choices: list[Choice]) -> p.ChatCompletionResponse:
    out = []
    for c in choices:
        message, finish = _chat_message(job, c)
        lp = _chat_lp(job, m, c.token_ids, c.logprobs, c.top_logprobs)
        out.append(p.ChatChoice(index=c.index, message=message, logprobs=lp, finish_reason=finish))
    return p.ChatCompletionResponse(
        id=job.id, created=m.created, model=m.name, choices=out, usage=_usage(job, choices)
    )


def _chat_message(job: Job, c: Choice) -> tuple[p.ChatMessageOut, str | None]:
    """The assistant message of a finished choice: its text, or the tool call it holds."""
    text = "".join(c.text)
    call = _tool_call(job, c, text) if job.tool is not None and c.finish_reason == "stop" else None
    if call is None:  # no tools, or cut off by max_tokens: the text as it is
        return p.ChatMessageOut(content=text), c.finish_reason
    return p.ChatMessageOut(content=None, tool_calls=[call]), "tool_calls"


def _tool_call(job: Job, c: Choice, text: str, index: int | None = None) -> p.ToolCall | None:
    """The call in a complete constrained output: a named function's arguments, or the
    ``{"name", "arguments"}`` object of ``tool_choice: "required"``."""
    if job.tool.name is not None:
        name, arguments = job.tool.name, text
    else:
        try:
            obj = json.loads(text)
            name, arguments = obj["name"], json.dumps(obj["arguments"])
        except (ValueError, KeyError, TypeError):
            return None
    return p.ToolCall(
        index=index, id=_call_id(c), type="function", function=p.FunctionCall(name=name, arguments=arguments)
    )


def _call_id(c: Choice) -> str:
    if c.tool_call_id is None:
        c.tool_call_id = f"call_{uuid.uuid4().hex[:24]}"
    return c.tool_call_id


def generate_details(
    job: Job, m: ModelInfo, c: Choice, ttft_s: float | None, e2e_s: float
) -> p.GenerateDetails:
    t = c.output.timings if c.output is not None else None
    tops = c.top_logprobs if job.params[0].logprobs else None
    return p.GenerateDetails(
        token_ids=c.token_ids,
        logprobs=c.logprobs,
        top_logprobs=[{str(tid): lp for tid, lp in alts} for alts in tops] if tops else None,
        timings=p.GenerateTimings(
            queue_s=t.queue_time if t else None,
            prefill_s=t.prefill_time if t else None,
            decode_s=t.decode_time if t else None,
            ttft_s=ttft_s,
            e2e_s=e2e_s,
        ),
    )


def generate_body(job: Job, m: ModelInfo, c: Choice, details: p.GenerateDetails | None) -> p.GenerateResponse:
    return p.GenerateResponse(
        id=job.id,
        text="".join(c.text),
        finish_reason=c.finish_reason,
        usage=_usage(job, [c]),
        details=details,
    )


# -- streaming --------------------------------------------------------------------------------


def completion_chunk(job: Job, m: ModelInfo, c: Choice, out: RequestOutput, offset: int) -> str | None:
    first = job.echo is not None and not c.echo_sent  # with echo, a choice's first chunk carries the prompt
    if not first and not out.finished and job.logprobs != "completion":  # text only
        if not out.text_delta:
            return None
        return _text_chunk(job, m, c, p.CompletionResponse,
                           lambda text: p.CompletionChoice(index=c.index, text=text, logprobs=None, finish_reason=None),
                           out.text_delta)
    if first:
        c.echo_sent = True
        lp = _completion_lp_echoed(job, m, c, out.new_token_ids, out.new_logprobs, _tops(out), offset)
        text = _echo(job, c) + out.text_delta
    else:
        lp = _completion_lp(job, m, out.new_token_ids, out.new_logprobs, _tops(out), len(_echo(job, c)) + offset)
        text = out.text_delta
    if not text and not out.finished and lp is None:
        return None
    choice = p.CompletionChoice(
        index=c.index,
        text=text,
        logprobs=lp,
        finish_reason=c.finish_reason if out.finished else None,
    )
    return sse(p.CompletionResponse(id=job.id, created=m.created, model=m.name, choices=[choice]))


def chat_role_chunk(job: Job, m: ModelInfo, index: int) -> str:
    choice = p.ChatChunkChoice(index=index, delta=p.ChatDelta(role="assistant", content=""))
    return sse(p.ChatCompletionChunk(id=job.id, created=m.created, model=m.name, choices=[choice]))


def chat_chunk(job: Job, m: ModelInfo, c: Choice, out: RequestOutput) -> str | None:
    if job.tool is None and not out.finished and job.logprobs != "chat":  # text only
        if not out.text_delta:
            return None
        return _text_chunk(job, m, c, p.ChatCompletionChunk,
                           lambda text: p.ChatChunkChoice(index=c.index, delta=p.ChatDelta(content=text)),
                           out.text_delta)
    lp = _chat_lp(job, m, out.new_token_ids, out.new_logprobs, _tops(out))
    if job.tool is not None:
        return _tool_chunk(job, m, c, out, lp)
    if not out.text_delta and not out.finished and lp is None:
        return None
    choice = p.ChatChunkChoice(
        index=c.index,
        delta=p.ChatDelta(content=out.text_delta) if out.text_delta else p.ChatDelta(),
        logprobs=lp,
        finish_reason=c.finish_reason if out.finished else None,
    )
    return sse(p.ChatCompletionChunk(id=job.id, created=m.created, model=m.name, choices=[choice]))


def _tool_chunk(job: Job, m: ModelInfo, c: Choice, out: RequestOutput, lp) -> str | None:
    """Tool calls streamed as OpenAI streams them: a named function's call opens with its id and
    name and then grows by argument fragments; a "required" call (whose name is in the output)
    is sent whole when it is complete. A choice cut off by max_tokens ends as plain content."""
    finish = None
    delta = p.ChatDelta()
    if job.tool.name is not None:
        first = c.tool_call_id is None
        if out.text_delta or first:
            call = p.ToolCall(index=0, function=p.FunctionCall(arguments=out.text_delta))
            if first:
                call.id, call.type, call.function.name = _call_id(c), "function", job.tool.name
            delta = p.ChatDelta(tool_calls=[call])
        if out.finished:
            finish = "tool_calls" if c.finish_reason == "stop" else c.finish_reason
    elif out.finished:
        text = "".join(c.text)
        call = _tool_call(job, c, text, index=0) if c.finish_reason == "stop" else None
        delta = p.ChatDelta(tool_calls=[call]) if call is not None else p.ChatDelta(content=text)
        finish = "tool_calls" if call is not None else c.finish_reason
    if delta == p.ChatDelta() and finish is None and lp is None:
        return None
    choice = p.ChatChunkChoice(index=c.index, delta=delta, logprobs=lp, finish_reason=finish)
    return sse(p.ChatCompletionChunk(id=job.id, created=m.created, model=m.name, choices=[choice]))


def usage_chunk(job: Job, m: ModelInfo, choices: list[Choice], chat: bool) -> str:
    cls = p.ChatCompletionChunk if chat else p.CompletionResponse
    return sse(cls(id=job.id, created=m.created, model=m.name, choices=[], usage=_usage(job, choices)))


def generate_chunk(job: Job, c: Choice, out: RequestOutput, details: p.GenerateDetails | None) -> str:
    final = out.finished
    chunk = p.GenerateChunk(
        id=job.id,
        text=out.text_delta,
        token_ids=out.new_token_ids,
        finish_reason=c.finish_reason if final else None,
        usage=_usage(job, [c]) if final else None,
        details=details if final else None,
    )
    return sse(chunk)


def _tops(out: RequestOutput):
    if out.new_top_logprobs is None:
        return None
    return [[(t.token_id, t.logprob) for t in alts] for alts in out.new_top_logprobs]


def _completion_lp(job: Job, m: ModelInfo, ids, lps, tops, offset: int) -> p.CompletionLogprobs | None:
    if job.logprobs != "completion" or lps is None:
        return None
    return p.CompletionLogprobs(**completion_logprobs(m.tokenizer, list(ids), list(lps), tops, offset))


def _chat_lp(job: Job, m: ModelInfo, ids, lps, tops) -> p.ChatLogprobs | None:
    if job.logprobs != "chat" or lps is None:
        return None
    return p.ChatLogprobs(**chat_logprobs(m.tokenizer, list(ids), list(lps), tops))


# -- logprobs and token texts ------------------------------------------------------------------

def token_bytes(tok: Tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for (SentencePiece's ▁ is a space, <0xNN> a raw byte, GPT-2's byte alphabet)."""
    return tok.token_bytes(token_id)


def token_str(tok: Tokenizer, token_id: int) -> str:
    return tok.token_text(token_id)


def completion_logprobs(tok: Tokenizer, ids: list[int], lps: list, tops, offset: int) -> dict:
    """OpenAI's legacy logprobs of ``ids``, whose text starts at character ``offset``; a ``None``
    logprob or alternatives entry (the first token of an echoed prompt) stays null."""
    tokens = [token_str(tok, t) for t in ids]
    offsets, pos = [], offset
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    return {
        "tokens": tokens,
        "token_logprobs": lps,
        "top_logprobs": [None if alts is None else {token_str(tok, t): lp for t, lp in alts} for alts in tops]
        if tops
        else None,
        "text_offset": offsets,
    }


def chat_logprobs(tok: Tokenizer, ids: list[int], lps: list[float], tops) -> dict:
    def entry(t: int, lp: float) -> dict:
        b = token_bytes(tok, t)
        return {"token": b.decode("utf-8", errors="backslashreplace"), "logprob": lp, "bytes": list(b)}

    content = []
    for k, (t, lp) in enumerate(zip(ids, lps, strict=False)):
        alts = tops[k] if tops and k < len(tops) else []
        content.append({**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in alts]})
    return {"content": content}


# -- one formatter per endpoint ---------------------------------------------------------------


@dataclass(frozen=True)
class Formatter:
    """How one endpoint answers: its whole body, its stream chunks (``None``: nothing to send),
    the chunks a stream opens with, and the usage chunk (``stream_options.include_usage``)."""

    body: Callable[[Pending, ModelInfo], BaseModel]
    chunk: Callable[[Pending, ModelInfo, Choice, RequestOutput], str | None]
    chat: bool = False  # chat streams open with the assistant role, one chunk per choice

    def opening(self, job: Job, m: ModelInfo) -> Iterable[str]:
        return [chat_role_chunk(job, m, i) for i in range(len(job.params))] if self.chat else ()

    def usage_chunk(self, job: Job, m: ModelInfo, choices: list[Choice]) -> str:
        return usage_chunk(job, m, choices, chat=self.chat)


def _details(pending: Pending, m: ModelInfo, c: Choice) -> p.GenerateDetails | None:
    if not pending.job.details:
        return None
    return generate_details(pending.job, m, c, pending.ttft(c), time.monotonic() - pending.arrival)


COMPLETION = Formatter(
    body=lambda pd, m: completion_body(pd.job, m, pd.choices),
    chunk=lambda pd, m, c, out: completion_chunk(pd.job, m, c, out, c.prev_text_len),
)
CHAT = Formatter(
    body=lambda pd, m: chat_body(pd.job, m, pd.choices),
    chunk=lambda pd, m, c, out: chat_chunk(pd.job, m, c, out),
    chat=True,
)
GENERATE = Formatter(
    body=lambda pd, m: generate_body(pd.job, m, pd.choices[0], _details(pd, m, pd.choices[0])),
    chunk=lambda pd, m, c, out: generate_chunk(pd.job, c, out, _details(pd, m, c) if out.finished else None),
)
