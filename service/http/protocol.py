"""Request and response bodies of the HTTP API (OpenAI-compatible and native), as pydantic models.

Requests are validated strictly where it matters: a wrong type (``"max_tokens": "5"``) or a value
out of range is refused with a message naming the field and the limit, and so is a field we know
but cannot honour (``suffix``, ``tools``, ``best_of`` > 1). A field we do not know is accepted and
ignored, as OpenAI-compatible servers do (``ignored_fields`` names them, for a log line and a
metric). Limits that depend on the model (``max_tokens`` against the context, token ids against
the vocabulary) are checked by ``service.http.jobs`` once the model is known. docs/api.md documents
every field.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    model_serializer,
)

from service.engine.rules import BOUNDS, constraints

# Limits on what one request may ask for (documented in docs/api.md).
MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts per /v1/completions request
MAX_CHOICES = 128  # prompts x n per request (each is one engine request)
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 64  # characters per stop string
MAX_STOP_TOKEN_IDS = 16
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions
MAX_MESSAGES = 256
# The bounds of the sampling parameters are service.engine.rules.BOUNDS, shared with the engine.


def _integral(v: Any) -> Any:
    """JSON has one number type: 5.0 is the integer 5 (JSON Schema agrees); 5.5 stays refused."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _unicode(v: str) -> str:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate such as \\ud800)") from None
    return v


def integer(**constraints: Any) -> Any:
    """An integer field type that also takes integral floats (5.0), never strings or booleans."""
    return Annotated[int, Field(**constraints), BeforeValidator(_integral)]


# Token ids: the upper bound (the vocabulary size) is checked per model, and written into the
# served OpenAPI schema (the "x-token-id" mark) by service.http.api.
TokenId = integer(ge=0, json_schema_extra={"x-token-id": True})
Text = Annotated[str, AfterValidator(_unicode)]

_TOKEN_ID_SCHEMA = {"type": "integer", "minimum": 0, "x-token-id": True}
_STOP_STRING_SCHEMA = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}


class _Strict(BaseModel):
    # extra="allow": unknown fields are kept aside (model_extra), reported by ignored_fields, not refused.
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


def ignored_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted names of the unknown fields a request carried, nested ones included (``messages.foo``)."""
    names = [f"{prefix}{k}" for k in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, BaseModel):
                names += ignored_fields(item, f"{prefix}{name}.")
    return list(dict.fromkeys(names))


_BIAS = BOUNDS["logit_bias"]


def _parse_logit_bias(v: Any) -> Any:
    """{"token id": bias} (JSON keys are strings) → ((id, bias), ...), in key order."""
    if v is None:
        return ()
    if not isinstance(v, dict):
        raise ValueError("must be an object mapping token ids to biases")
    if len(v) > MAX_LOGIT_BIAS_ENTRIES:
        raise ValueError(f"at most {MAX_LOGIT_BIAS_ENTRIES} entries are allowed, got {len(v)}")
    out = []
    for key, bias in v.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 12):
            raise ValueError(f"keys must be token ids written as decimal strings, got {key!r}")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise ValueError(f"the bias of token {key} must be a number, got {bias!r}")
        if not _BIAS.ok(bias):  # NaN and infinities fail this too
            raise ValueError(f"the bias of token {key} must be {_BIAS.describe()}, got {bias}")
        out.append((int(key), float(bias)))
    return tuple(out)


LogitBias = Annotated[
    tuple[tuple[int, float], ...],
    BeforeValidator(_parse_logit_bias),
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "object",
                    "patternProperties": {"^[0-9]{1,12}$": {"type": "number", "minimum": _BIAS.lo, "maximum": _BIAS.hi}},
                    "additionalProperties": False,
                    "maxProperties": MAX_LOGIT_BIAS_ENTRIES,
                },
                {"type": "null"},
            ],
            "description": "Token id (as a string) -> bias in [-100, 100], added to the logits.",
        }
    ),
]


def _refuse_unless(ok: Any, message: str, schema: dict) -> Any:
    """A field we know but cannot honour: accepted only with a value that changes nothing."""

    def check(v: Any) -> Any:
        if not ok(v):
            raise ValueError(message)
        return v

    return Annotated[Any, AfterValidator(check), WithJsonSchema({**schema, "description": message})]


_NULL = {"type": "null"}


def _normalize_stop(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ValueError("must be a string or a list of strings")
    if len(v) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings are allowed, got {len(v)}")
    for s in v:
        if not s:
            raise ValueError("stop strings must not be empty")
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"each stop string must have at most {MAX_STOP_CHARS} characters, got {len(s)}")
    return list(dict.fromkeys(v))


def _none_is_empty(v: Any) -> Any:
    return [] if v is None else v


Stop = Annotated[
    list[Text],
    BeforeValidator(_normalize_stop),
    WithJsonSchema(
        {
            "anyOf": [
                _STOP_STRING_SCHEMA,
                {"type": "array", "items": _STOP_STRING_SCHEMA, "maxItems": MAX_STOP},
                {"type": "null"},
            ],
            "description": f"A string or up to {MAX_STOP} strings of 1..{MAX_STOP_CHARS} characters.",
        }
    ),
]
StopTokenIds = Annotated[
    list[TokenId],
    BeforeValidator(_none_is_empty),
    Field(max_length=MAX_STOP_TOKEN_IDS),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "array", "items": _TOKEN_ID_SCHEMA, "maxItems": MAX_STOP_TOKEN_IDS},
                {"type": "null"},
            ]
        }
    ),
]


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Strict):
    """Decoding parameters shared by every generation endpoint (OpenAI names + extensions)."""

    max_tokens: integer(ge=1) | None = Field(None, description="New tokens; at most the context length.")
    temperature: float = Field(1.0, **constraints("temperature"), description="0 = greedy.")
    top_p: float = Field(1.0, **constraints("top_p"))
    stop: Stop = Field(default_factory=list)
    seed: integer(**constraints("seed")) | None = None
    presence_penalty: float = Field(0.0, **constraints("presence_penalty"))
    frequency_penalty: float = Field(0.0, **constraints("frequency_penalty"))
    user: str | None = Field(None, max_length=256, description="Accepted and ignored.")
    # Extensions (vLLM names); with the openai client, pass them in extra_body.
    logit_bias: LogitBias = Field(default_factory=tuple)
    top_k: integer(**constraints("top_k")) = Field(0, description="0 disables top-k.")
    min_p: float = Field(0.0, **constraints("min_p"))
    repetition_penalty: float = Field(1.0, **constraints("repetition_penalty"))
    ignore_eos: bool = False
    stop_token_ids: StopTokenIds = Field(default_factory=list)
    cache_prompt: bool = Field(
        True,
        description="llama.cpp's name: reuse the cached KV of the prompt's leading blocks and leave this "
        "prompt's blocks for later requests (the output is the same either way); false = neither.",
    )


class OpenAIFields(SamplingFields):
    model: str | None = Field(None, description="Must name the served model when given.")
    n: integer(ge=1, le=MAX_N) = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


_NO_FUNCTIONS = "the deprecated functions API is not supported: use tools"
MAX_SCHEMA_CHARS = 100_000  # a JSON schema, regular expression or grammar, as text
MAX_CHOICE_STRINGS = 256
MAX_TOOLS = 128
_SCHEMA_OBJECT = {"type": "object", "description": "A JSON Schema."}


def _empty(v: Any) -> bool:
    return v is None or v == []


def _bounded_text(v: Any) -> Any:
    if isinstance(v, str) and len(v) > MAX_SCHEMA_CHARS:
        raise ValueError(f"must have at most {MAX_SCHEMA_CHARS} characters, got {len(v)}")
    return v


def _bounded_schema(v: Any) -> Any:
    """A JSON schema given as an object, or as a string holding one (parsed when it is compiled,
    where bad JSON is a 400 like any other bad structure), at most MAX_SCHEMA_CHARS."""
    if isinstance(v, str):
        return _bounded_text(v)
    if not isinstance(v, dict):
        raise ValueError("must be a JSON schema (an object, or a string holding one)")
    if len(json.dumps(v)) > MAX_SCHEMA_CHARS:
        raise ValueError(f"must have at most {MAX_SCHEMA_CHARS} characters as JSON")
    return v


Schema = Annotated[Any, AfterValidator(_bounded_schema), WithJsonSchema({"anyOf": [_SCHEMA_OBJECT, {"type": "string"}]})]
BoundedText = Annotated[Text, AfterValidator(_bounded_text), Field(min_length=1)]
Choices = Annotated[list[Text], Field(min_length=1, max_length=MAX_CHOICE_STRINGS)]


class JsonSchemaFormat(_Strict):
    name: str = Field("response", min_length=1, max_length=64)
    description: str | None = None
    json_schema: Schema = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's ``response_format``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs``: exactly one of these."""

    json_: Schema = Field(None, alias="json")
    regex: BoundedText | None = None
    choice: Choices | None = None
    grammar: BoundedText | None = None


class StructureFields(_Strict):
    """Structured output (docs/api.md): at most one of these per request."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: Schema = None
    guided_regex: BoundedText | None = None
    guided_choice: Choices | None = None
    guided_grammar: BoundedText | None = None


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: Schema = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


_TOKEN_IDS_SCHEMA = {"type": "array", "items": _TOKEN_ID_SCHEMA, "minItems": 1}
_PROMPT_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        _TOKEN_IDS_SCHEMA,
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_PROMPTS},
        {"type": "array", "items": _TOKEN_IDS_SCHEMA, "minItems": 1, "maxItems": MAX_PROMPTS},
    ],
    "description": f"Text, a list of token ids, or a list of up to {MAX_PROMPTS} of either.",
}


def _normalize_prompts(v: Any) -> Any:
    """Any of OpenAI's four prompt shapes → a list of prompts, each a string or a list of token ids."""
    if isinstance(v, str) or (isinstance(v, list) and v and all(_is_int(_integral(x)) for x in v)):
        v = [v]
    if not isinstance(v, list) or not v:
        raise ValueError("must be a non-empty string, a list of token ids, or a list of those")
    if len(v) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} prompts per request are allowed, got {len(v)}")
    out = []
    for k, x in enumerate(v):
        where = f"prompt {k}" if len(v) > 1 else "the prompt"
        if isinstance(x, list):
            x = [_integral(t) for t in x]
            if not all(_is_int(t) for t in x):
                raise ValueError(f"{where} must be a string or a list of token ids (integers)")
        elif not isinstance(x, str):
            raise ValueError("must be a string, a list of token ids, or a list of those")
        if not x:
            raise ValueError(f"{where} must not be empty")
        out.append(x)
    return out


Prompts = Annotated[list[Text | list[TokenId]], BeforeValidator(_normalize_prompts), WithJsonSchema(_PROMPT_SCHEMA)]


class CompletionRequest(OpenAIFields, StructureFields):
    """POST /v1/completions."""

    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"max_tokens": {"const": 0}}, "required": ["max_tokens"]},
            "then": {"properties": {"echo": {"const": True}}, "required": ["echo"]},
        }
    )

    prompt: Prompts
    max_tokens: integer(ge=0) | None = Field(
        None, description="New tokens; at most the context length; 0 with echo scores the prompt only."
    )
    echo: bool = Field(False, description="Put the prompt before the completion (text and logprobs).")
    logprobs: integer(ge=0, le=MAX_COMPLETION_LOGPROBS) | None = None
    best_of: _refuse_unless(
        lambda v: v is None or v == 1,
        "only 1 is supported (server-side best-of sampling is not implemented)",
        {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 1}, _NULL]},
    ) = None
    suffix: _refuse_unless(
        lambda v: v is None or v == "",
        "text insertion (a suffix) is not supported",
        {"anyOf": [{"type": "string", "maxLength": 0}, _NULL]},
    ) = None


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: str | None = Field(None, max_length=64)

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(OpenAIFields, StructureFields):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"top_logprobs": {"type": "integer"}}, "required": ["top_logprobs"]},
            "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
        }
    )

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: integer(ge=1) | None = Field(None, description="Alias of max_tokens.")
    logprobs: bool = False
    top_logprobs: integer(**constraints("logprobs")) | None = None
    parallel_tool_calls: bool | None = Field(None, description="Accepted and ignored (no tools).")
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    functions: _refuse_unless(
        _empty, _NO_FUNCTIONS, {"anyOf": [{"type": "array", "maxItems": 0}, _NULL]}
    ) = None
    function_call: _refuse_unless(
        lambda v: v in (None, "none", "auto"),
        f"only 'none' or 'auto'; {_NO_FUNCTIONS}",
        {"anyOf": [{"type": "string", "enum": ["none", "auto"]}, _NULL]},
    ) = None
    modalities: _refuse_unless(
        lambda v: v is None or v == ["text"],
        "only ['text'] is supported",
        {"anyOf": [{"type": "array", "items": {"type": "string", "enum": ["text"]}, "minItems": 1, "maxItems": 1}, _NULL]},
    ) = None
    audio: _refuse_unless(lambda v: v is None, "audio output is not supported", _NULL) = None
    prediction: _refuse_unless(
        lambda v: v is None, "predicted outputs are not supported", _NULL
    ) = None
    web_search_options: _refuse_unless(
        lambda v: v is None, "web search is not supported", _NULL
    ) = None


def _exactly_one(*fields: str) -> dict:
    return {"oneOf": [{"required": [f]} for f in fields]}


class GenerateRequest(SamplingFields, StructureFields):
    """POST /generate (native): exactly one of ``text`` and ``input_ids``."""

    model_config = ConfigDict(json_schema_extra=_exactly_one("text", "input_ids"))

    text: Text = Field(None, min_length=1)  # type: ignore[assignment]  # absent: None
    input_ids: list[TokenId] = Field(None, min_length=1)  # type: ignore[assignment]
    stream: bool = False
    details: bool = Field(False, description="Return token ids, their logprobs and timings.")
    logprobs: integer(**constraints("logprobs")) | None = Field(
        None, description="Top alternatives per token."
    )


class TokenizeRequest(_Strict):
    """POST /tokenize: exactly one of ``text`` (or vLLM's name for it, ``prompt``) and ``messages``."""

    model_config = ConfigDict(json_schema_extra=_exactly_one("text", "prompt", "messages"))

    text: Text = None  # type: ignore[assignment]  # absent: None
    prompt: Text = Field(None, description="vLLM's name for text.")  # type: ignore[assignment]
    messages: list[ChatMessage] = Field(None, min_length=1, max_length=MAX_MESSAGES)  # type: ignore[assignment]
    add_special_tokens: bool = Field(True, description="Prepend bos when the bundle asks for it.")


class DetokenizeRequest(_Strict):
    tokens: list[TokenId]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------------
# Responses (OpenAI shapes; ``None`` fields are serialized as null, like OpenAI does).


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape; with echo the prompt's tokens come first, the very first with nulls."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = Field(default_factory=list)


class _Envelope(BaseModel):
    """The fields a completion, a chat completion and a chat stream chunk share, in OpenAI's order;
    each sets its ``object`` and the type of its choices (a redeclared field keeps its place)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[Any]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class TopLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatLogprobEntry(TopLogprobEntry):
    top_logprobs: list[TopLogprobEntry] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobEntry] = Field(default_factory=list)


FinishReason = Literal["stop", "length", "tool_calls"]


class FunctionCall(BaseModel):
    name: str | None = None
    arguments: str

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: Any) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class ToolCall(BaseModel):
    index: int | None = None  # stream chunks only
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: Any) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: Any) -> dict:  # {"content": "x"}, not {"role": null, ...}
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class GenerateTimings(BaseModel):
    """Seconds. queue/prefill/decode come from the engine; ttft and e2e from the HTTP edge."""

    queue_s: float | None = None
    prefill_s: float | None = None
    decode_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float


class GenerateDetails(BaseModel):
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    timings: GenerateTimings


class GenerateResponse(BaseModel):
    id: str
    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage
    details: GenerateDetails | None = None


class GenerateChunk(BaseModel):
    id: str
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"] | None = None
    usage: Usage | None = None
    details: GenerateDetails | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "textgen"
    root: str | None = None  # vLLM's field: the model the served name stands for
    max_model_len: int  # the context length: prompt + output tokens
    generation_defaults: dict[str, float | int] = Field(
        default_factory=dict,
        description="What a request gets for a field it leaves out (from the model's generation_config.json).",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizerInfo(BaseModel):
    """GET /tokenizer_info (vLLM's route)."""

    tokenizer_class: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    eos_token_id: int | None
    bos_token_id: int | None
    add_bos_token: bool
    vocab_size: int
    model_max_length: int


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    text: str
    prompt: str  # the same text, under vLLM's name


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str


class ErrorResponse(BaseModel):
    error: ErrorBody


def describe_validation_error(error: ValidationError) -> tuple[str, str | None]:
    """One message naming every bad field (``max_tokens: Input should be ...``), and the first
    field's name (OpenAI's ``param``)."""
    parts, first = [], None
    seen: set[str] = set()
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p)) or "body"
        if loc in seen:
            continue
        seen.add(loc)
        first = first or loc
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts), first


def _is_union_tag(p: Any) -> bool:
    return isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool", "list", "dict"))
