"""From validated request to engine job, and from engine outputs to response bodies.

Pure functions and plain state (no sockets, no processes), used by the HTTP process:

- ``build_*`` renders the prompt (chat template), tokenizes it, checks the limits that depend on
  the model (context length, vocabulary) and builds one ``SamplingParams`` per choice;
- ``Choice`` accumulates one choice's engine outputs (``merge_outputs`` joins queued ones);
- ``*_body`` / ``*_chunk`` write the OpenAI and native response shapes.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from bundle.tokenizer import Tokenizer
from service.engine import rules
from service.engine.structured import Compiled, GrammarError, Structure
from service.engine.types import InvalidRequestError, PromptTooLongError, SamplingParams
from service.http import chat_template
from service.http.errors import ApiError, engine_refusal
from service.http.generation_defaults import GenerationDefaults
from service.http.protocol import (
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    NamedToolChoice,
    OpenAIFields,
    SamplingFields,
    StructureFields,
)

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
    compiler: Any = None  # service.engine.structured.GrammarCompiler, for structured output (None: refused)
    # the bundle's chat template: chat_template.SCRIPT or a jinja_template.JinjaChatTemplate
    chat_template: Any = chat_template.SCRIPT
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)  # the bundle's generation defaults

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
    max_tokens = m.defaults.max_tokens(req.max_tokens, DEFAULT_MAX_TOKENS, m.context_length - max(map(len, prompts)))
    # echo shows the prompt's logprobs when logprobs are asked for; scoring alone needs them too
    prompt_lp = req.logprobs if req.echo else None
    if max_tokens == 0 and prompt_lp is None:
        prompt_lp = 0
    structure = compile_structure(req, m)
    params: list[SamplingParams] = []
    for ids in prompts:
        params += _params(req, m, len(ids), req.n, max_tokens=max_tokens, logprobs=req.logprobs,
                          prompt_logprobs=prompt_lp, grammar=_grammar(structure))
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
    chat = m.chat_template
    text = chat.render(req.messages, [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None)
    ids = m.encode_prompt(text, chat.add_special_tokens)
    room = max(1, m.context_length - len(ids))
    max_tokens = m.defaults.max_tokens(req.max_completion_tokens or req.max_tokens, room, room)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    tool, tool_structure = tool_mode(req)
    structure = compile_structure(req, m, tool_structure)
    params = _params(req, m, len(ids), req.n, "messages", max_tokens=max_tokens, logprobs=logprobs,
                     stop=tuple(dict.fromkeys([*req.stop, *chat.stop])), grammar=_grammar(structure))
    if chat.end_of_turn:  # a Jinja template's end-of-turn token that is not an eos id
        params = tuple(replace(p, stop_token_ids=(*p.stop_token_ids, *chat.end_of_turn)) for p in params)
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
    max_tokens = m.defaults.max_tokens(req.max_tokens, DEFAULT_MAX_TOKENS, m.context_length - len(ids))
    params = _params(req, m, len(ids), 1, max_tokens=max_tokens, logprobs=logprobs, grammar=_grammar(structure))
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


def _grammar(structure: Compiled | None) -> str | None:
    return structure.grammar if structure is not None else None


def _check_model(req: OpenAIFields, m: ModelInfo) -> None:
    if req.model is not None and req.model != m.name:
        raise ApiError(
            "model_not_found", f"model: the model {req.model!r} does not exist; this server serves {m.name!r}",
            "model",
        )


def _include_usage(req: OpenAIFields) -> bool:
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)


def _check_ids(ids: list[int], m: ModelInfo, param: str) -> list[int]:
    try:
        rules.check_token_ids(ids, m.vocab_size, param)
    except InvalidRequestError as e:
        raise engine_refusal(e) from None
    return list(ids)


# SamplingParams fields a request model carries under the same name, copied as they are; the
# others (max_tokens, logprobs, stop, ...) are decided per endpoint and passed to _params.
_SHARED = tuple(f.name for f in fields(SamplingParams) if f.name in SamplingFields.model_fields)


def _params(req: SamplingFields, m: ModelInfo, prompt_len: int, n: int, prompt_param: str = "prompt",
            **decided: Any) -> tuple[SamplingParams, ...]:
    """One SamplingParams per choice, checked against service.engine.rules (ApiError when a rule fails)."""
    values = {name: getattr(req, name) for name in _SHARED} | decided
    base = SamplingParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    try:
        rules.check(base, prompt_len=prompt_len, vocab_size=m.vocab_size, context_length=m.context_length,
                    prompt_param=prompt_param)
    except (InvalidRequestError, PromptTooLongError) as e:
        raise engine_refusal(e) from None
    # Choice i of a seeded request uses seed + i: reproducible, and the choices differ.
    return tuple(base if req.seed is None else replace(base, seed=(req.seed + i) % (2**63)) for i in range(n))
