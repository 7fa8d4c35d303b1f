"""From validated request to engine job, and from engine outputs to response bodies.

Pure functions and plain state (no sockets, no processes), used by the HTTP process:

- ``build_*`` renders the prompt (chat template), tokenizes it, checks the limits that depend on
  the model (context length, vocabulary) and builds one ``SamplingParams`` per choice;
- ``Choice`` accumulates one choice's engine outputs (``merge_outputs`` joins queued ones);
- ``*_body`` / ``*_chunk`` write the OpenAI and native response shapes.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from service import chat_template
from service.errors import ApiError
from service.protocol import (
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    NamedToolChoice,
    OpenAIFields,
    SamplingFields,
    StructureFields,
)
from service.structured import Compiled, GrammarError, Structure
from service.tokenizer import Tokenizer
from service.types import InvalidRequestError, PromptTooLongError, RequestOutput, SamplingParams

LogprobsStyle = Literal["completion", "chat", "native"]
DEFAULT_MAX_TOKENS = 16  # /v1/completions and /generate (OpenAI's default); chat: the rest of the context


@dataclass(frozen=True)
class ModelInfo:
    name: str
    context_length: int
    tokenizer: Tokenizer
    add_bos: bool  # the bundle's tokenizer.add_bos: text prompts start with bos
    created: int = field(default_factory=lambda: int(time.time()))
    max_choices: int = MAX_CHOICES  # prompts x n per request; at most the engine's waiting queue
    compiler: Any = None  # service.structured.GrammarCompiler, for structured output (None: refused)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text)
        if add_special_tokens and self.add_bos and self.tokenizer.bos_id >= 0:
            return [self.tokenizer.bos_id, *ids]
        return ids


@dataclass(frozen=True)
class ToolMode:
    """How a constrained chat output becomes a tool call.

    ``name`` set (a named function): the output is that function's arguments. ``name`` None
    (``tool_choice: "required"``): the output is ``{"name": ..., "arguments": {...}}``.
    """

    name: str | None


@dataclass(frozen=True)
class Job:
    """What one HTTP request asks of the engine, and how to answer it.

    A request has one or more prompts (a list ``prompt`` on /v1/completions) and ``n`` choices per
    prompt; choice ``i`` (OpenAI's ``index``) continues prompt ``prompt_index[i]`` = i // n.
    """

    id: str
    prompts: tuple[list[int], ...]
    params: tuple[SamplingParams, ...]  # one per choice
    prompt_index: tuple[int, ...]  # one per choice
    stream: bool = False
    include_usage: bool = False
    logprobs: LogprobsStyle | None = None
    details: bool = False
    echo: tuple[str, ...] | None = None  # /v1/completions echo: each prompt's text, put before its choices
    prompt_texts: tuple[str | None, ...] = ()  # for logging only (TEXTGEN_LOG_PROMPTS)
    structure: Compiled | None = None  # structured output: what constrains every choice
    tool: ToolMode | None = None  # chat tool calls: the output is a call, not content

    def prompt_of(self, choice: int) -> list[int]:
        return self.prompts[self.prompt_index[choice]]

    @property
    def num_prompt_tokens(self) -> int:
        """Usage counts each prompt once, however many choices continue it (as OpenAI does)."""
        return sum(len(p) for p in self.prompts)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def build_completion(req: CompletionRequest, m: ModelInfo) -> Job:
    _check_model(req, m)
    if req.max_tokens == 0 and not req.echo:
        raise ApiError(
            "validation", "max_tokens: 0 is allowed only with echo (scoring the prompt), otherwise >= 1",
            "max_tokens",
        )
    if len(req.prompt) * req.n > m.max_choices:
        raise ApiError(
            "validation",
            f"n: {len(req.prompt)} prompts x n={req.n} = {len(req.prompt) * req.n} choices exceeds the limit "
            f"of {m.max_choices} per request",
            "n",
        )
    prompts, texts = [], []
    for k, prompt in enumerate(req.prompt):
        param = "prompt" if len(req.prompt) == 1 else f"prompt.{k}"
        if isinstance(prompt, str):
            prompts.append(m.encode_prompt(prompt))
            texts.append(prompt)
        else:
            prompts.append(_check_ids(prompt, m, param))
            texts.append(None)
    max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    # echo shows the prompt's logprobs when logprobs are asked for; scoring alone needs them too
    prompt_lp = req.logprobs if req.echo else None
    if max_tokens == 0 and prompt_lp is None:
        prompt_lp = 0
    structure = compile_structure(req, m)
    params: list[SamplingParams] = []
    for ids in prompts:
        params += _params(
            req, m, len(ids), max_tokens, req.n, req.logprobs, (), prompt_logprobs=prompt_lp, structure=structure
        )
    echo = None
    if req.echo:
        echo = tuple(t if t is not None else m.tokenizer.decode(ids) for t, ids in zip(texts, prompts, strict=True))
    return Job(
        new_id("cmpl"),
        tuple(prompts),
        tuple(params),
        tuple(i // req.n for i in range(len(params))),
        stream=req.stream,
        include_usage=_include_usage(req),
        logprobs="completion" if req.logprobs is not None else None,
        echo=echo,
        prompt_texts=tuple(texts),
        structure=structure,
    )


def build_chat(req: ChatCompletionRequest, m: ModelInfo) -> Job:
    _check_model(req, m)
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError("validation", "top_logprobs: requires logprobs to be true", "top_logprobs")
    text = chat_template.render(req.messages)
    ids = m.encode_prompt(text)
    max_tokens = req.max_completion_tokens or req.max_tokens or max(1, m.context_length - len(ids))
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    tool, tool_structure = tool_mode(req)
    structure = compile_structure(req, m, tool_structure)
    params = _params(
        req, m, len(ids), max_tokens, req.n, logprobs, chat_template.STOP, "messages", structure=structure
    )
    return Job(
        new_id("chatcmpl"),
        (ids,),
        params,
        (0,) * len(params),
        stream=req.stream,
        include_usage=_include_usage(req),
        logprobs="chat" if req.logprobs else None,
        prompt_texts=(text,),
        structure=structure,
        tool=tool,
    )


def build_generate(req: GenerateRequest, m: ModelInfo) -> Job:
    if (req.text is None) == (req.input_ids is None):
        raise ApiError("validation", "exactly one of text and input_ids must be given", "text")
    if req.text is not None:
        ids, text = m.encode_prompt(req.text), req.text
    else:
        ids, text = _check_ids(req.input_ids or [], m, "input_ids"), None
    logprobs = req.logprobs if req.logprobs is not None else (0 if req.details else None)
    structure = compile_structure(req, m)
    params = _params(req, m, len(ids), req.max_tokens or DEFAULT_MAX_TOKENS, 1, logprobs, (), structure=structure)
    return Job(
        new_id("gen"),
        (ids,),
        params,
        (0,),
        stream=req.stream,
        logprobs="native" if logprobs is not None else None,
        details=req.details,
        prompt_texts=(text,),
        structure=structure,
    )


def requested_structure(req: StructureFields) -> tuple[str, Structure] | None:
    """The one structure a request asks for (field name, structure), or None; 400 for several."""
    found: list[tuple[str, Structure]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", Structure("json_object", None)))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.json_schema is None:
            raise ApiError(
                "invalid_structure", "response_format: json_schema needs json_schema.schema", "response_format"
            )
        found.append(("response_format", Structure("json_schema", rf.json_schema.json_schema)))
    so = req.structured_outputs
    if so is not None:
        given = [(k, v) for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                     ("grammar", so.grammar)) if v is not None]
        if len(given) != 1:
            raise ApiError(
                "invalid_structure",
                "structured_outputs: exactly one of json, regex, choice and grammar must be given",
                "structured_outputs",
            )
        key, value = given[0]
        kind = {"json": "json_schema"}.get(key, key)
        found.append((f"structured_outputs.{key}", Structure(kind, value)))
    for key, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                      ("guided_grammar", "grammar")):
        value = getattr(req, key)
        if value is not None:
            found.append((key, Structure(kind, value)))
    if len(found) > 1:
        names = ", ".join(f for f, _ in found)
        raise ApiError("invalid_structure", f"{found[1][0]}: one structure per request, got {names}", found[1][0])
    return found[0] if found else None


def tool_mode(req: ChatCompletionRequest) -> tuple[ToolMode | None, tuple[str, Structure] | None]:
    """Tool calls as constrained generation: ``tool_choice`` "required" or a named function."""
    choice = req.tool_choice
    if not req.tools or choice == "none":
        if isinstance(choice, NamedToolChoice) or choice == "required":
            raise ApiError("validation", "tool_choice: no tools were given", "tool_choice")
        return None, None
    if choice in (None, "auto"):
        raise ApiError(
            "validation",
            "tool_choice: 'auto' (the default with tools) needs a model-specific tool-call parser, which "
            "this server does not have; send tool_choice 'required' or name a function",
            "tool_choice",
        )
    params = {t.function.name: _schema_object(t.function.parameters, "tools") for t in req.tools}
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in params:
            raise ApiError(
                "validation", f"tool_choice: no tool named {name!r} among {sorted(params)}", "tool_choice"
            )
        return ToolMode(name), ("tools", Structure("tool", params[name]))
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": n}, "arguments": schema},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for n, schema in params.items()
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return ToolMode(None), ("tools", Structure("tool", schema))


def _schema_object(schema: Any, param: str) -> dict:
    """A schema given as an object or as JSON text, as an object (none: any object)."""
    if schema is None:
        return {"type": "object"}
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ApiError("invalid_structure", f"{param}: the schema is not valid JSON: {e}", param) from None
    if not isinstance(schema, dict):
        raise ApiError("invalid_structure", f"{param}: a schema must be a JSON object", param)
    return schema


def compile_structure(
    req: StructureFields, m: ModelInfo, extra: tuple[str, Structure] | None = None
) -> Compiled | None:
    """The request's structure as a validated grammar; 400 naming the field and the problem."""
    asked = requested_structure(req)
    if asked is not None and extra is not None:
        raise ApiError("validation", f"{asked[0]}: cannot be combined with tool calls", asked[0])
    asked = asked or extra
    if asked is None:
        return None
    field_name, structure = asked
    if m.compiler is None:
        raise ApiError("validation", f"{field_name}: structured output is not available", field_name)
    try:
        return m.compiler.compile(structure)
    except GrammarError as e:
        raise ApiError("invalid_structure", f"{field_name}: {e}", field_name.split(".")[0]) from None


def _check_model(req: OpenAIFields, m: ModelInfo) -> None:
    if req.model is not None and req.model != m.name:
        raise ApiError(
            "model_not_found", f"model: the model {req.model!r} does not exist; this server serves {m.name!r}",
            "model",
        )


def _include_usage(req: OpenAIFields) -> bool:
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)


def _check_ids(ids: list[int], m: ModelInfo, param: str) -> list[int]:
    for t in ids:
        if not 0 <= t < m.vocab_size:
            raise ApiError(
                "validation", f"{param}: token id {t} is outside the vocabulary [0, {m.vocab_size})", param
            )
    return list(ids)


def _params(
    req: SamplingFields,
    m: ModelInfo,
    prompt_len: int,
    max_tokens: int,
    n: int,
    logprobs: int | None,
    extra_stop: tuple[str, ...],
    prompt_param: str = "prompt",
    prompt_logprobs: int | None = None,
    structure: Compiled | None = None,
) -> tuple[SamplingParams, ...]:
    ctx = m.context_length
    if max_tokens > ctx:
        raise ApiError(
            "validation", f"max_tokens: must be <= {ctx} (the context length), got {max_tokens}", "max_tokens"
        )
    if prompt_len + max_tokens > ctx:
        raise ApiError(
            "context_length_exceeded", str(PromptTooLongError(prompt_len, max_tokens, ctx)), prompt_param
        )
    for t in req.stop_token_ids:
        if not 0 <= t < m.vocab_size:
            raise ApiError(
                "validation",
                f"stop_token_ids: {t} is outside the vocabulary [0, {m.vocab_size})",
                "stop_token_ids",
            )
    base = SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        seed=req.seed,
        stop_token_ids=tuple(req.stop_token_ids),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        stop=tuple(dict.fromkeys([*req.stop, *extra_stop])),
        logit_bias=req.logit_bias,
        prompt_logprobs=prompt_logprobs,
        grammar=structure.grammar if structure is not None else None,
        cache_prompt=req.cache_prompt,
    )
    try:
        base.validate(m.vocab_size)
    except InvalidRequestError as e:
        raise ApiError("validation", str(e), str(e).split(" ", 1)[0].rstrip(":")) from None
    # Choice i of a seeded request uses seed + i: reproducible, and the choices differ.
    return tuple(
        base if req.seed is None else _replace_seed(base, (req.seed + i) % (2**63)) for i in range(n)
    )


def _replace_seed(p: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace

    return replace(p, seed=seed)


# ---------------------------------------------------------------------------------------------
# Accumulating outputs


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
            self.finish_reason = "length" if out.finish_reason == "length" else "stop"
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


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_bytes(tok: Tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for (SentencePiece's ▁ is a space, <0xNN> a raw byte)."""
    if token_id in tok.special_ids:
        return b""
    piece = tok.id_to_piece(token_id)
    m = _BYTE_PIECE.match(piece)
    return bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode()


def token_str(tok: Tokenizer, token_id: int) -> str:
    return token_bytes(tok, token_id).decode("utf-8", errors="backslashreplace")


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
