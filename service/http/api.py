"""The HTTP API on LitServe: routes, checks before anything reaches the worker, and the wiring.

LitServe provides the processes (uvicorn HTTP processes, one spawned inference worker) and the
queues between them. Its own request handlers are not used: our routes (plain FastAPI routes on
LitServe's app, running in every HTTP process) check the API key, the body size, the JSON and
the request's fields, tokenize, and only then submit a job to the worker (service.process.frontend).
LitServe's "/", "/health" and "/info" routes are replaced (its /health is not a liveness probe
and LIT_SERVER_API_KEY would protect it).

    GET  /health               liveness: 200 while this HTTP process answers
    GET  /ready                200 when the engine is loaded and stepping; 503 otherwise
    GET  /metrics              Prometheus exposition, merged over processes
    GET  /v1/models            the served model                                       (key)
    GET  /v1/models/{id}       the served model by name (404 for another)             (key)
    POST /tokenize, /detokenize                                                       (key)
    POST /v1/completions, /v1/chat/completions, /generate                             (key)
    GET, POST /v1/inspect      attention and next-token probabilities (service/http/inspection.py)  (key)
    GET  /, /playground/{file} the browser playground (service/http/playground.py)
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import metrics
from service.engine.structured import GrammarCompiler
from service.http import formatting as fmt
from service.http import handlers, playground
from service.http import jobs as serving
from service.http import protocol as p
from service.http.direct import DirectRoutes
from service.http.errors import REJECT_REASON, ApiError, error_from_status
from service.http.generation_defaults import GenerationDefaults
from service.http.jinja_template import load_chat_template
from service.process.frontend import Frontend
from service.process.shared_state import SharedState
from service.process.worker import ENGINE_PATH
from service.settings import Settings

logger = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]
LITSERVE_ROUTES = {"/", "/health", "/info", ENGINE_PATH}
_FIRST_KEY = re.compile(rb'\s*\{\s*"([A-Za-z_][A-Za-z0-9_]{0,63})"\s*:')


class HttpApi:
    def __init__(self, settings: Settings, state: SharedState, model: serving.ModelInfo, frontend: Frontend):
        self.settings, self.state, self.model, self.fe = settings, state, model, frontend
        key = settings.api_key
        self._key = key.get_secret_value().encode() if key is not None else None
        self._ignored_seen: set[str] = set()  # unknown field names already logged by this process

    def install(self, app: FastAPI) -> None:
        """Replace LitServe's routes with ours, and start the frontend with each HTTP process."""
        app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in LITSERVE_ROUTES]
        text = {
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"}
        }
        open_routes = {
            "/health": (self.health, None),
            "/ready": (self.ready, None),
            "/metrics": (self.metrics, text),
        }
        for path, (fn, responses) in open_routes.items():
            app.add_api_route(path, self._wrap(path, fn, auth=False), methods=["GET"], responses=responses)
        app.add_api_route(
            "/v1/models",
            self._wrap("/v1/models", self.models),
            methods=["GET"],
            responses=_responses(p.ModelList),
        )
        app.add_api_route(
            "/v1/models/{model_id:path}",
            self._wrap("/v1/models/{model_id}", self.model_card),
            methods=["GET"],
            responses=_responses(p.ModelCard),
            openapi_extra={  # the served name is the only one that exists
                "parameters": [
                    {
                        "name": "model_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": [self.model.name]},
                    }
                ]
            },
        )
        app.add_api_route(
            "/tokenizer_info",
            self._wrap("/tokenizer_info", self.tokenizer_info),
            methods=["GET"],
            responses=_responses(p.TokenizerInfo),
        )
        posts = {
            "/tokenize": (self.tokenize, p.TokenizeRequest, p.TokenizeResponse),
            "/detokenize": (self.detokenize, p.DetokenizeRequest, p.DetokenizeResponse),
            "/v1/completions": (self.completions, p.CompletionRequest, p.CompletionResponse),
            "/v1/chat/completions": (
                self.chat_completions,
                p.ChatCompletionRequest,
                p.ChatCompletionResponse,
            ),
            "/generate": (self.generate, p.GenerateRequest, p.GenerateResponse),
        }
        schemas: dict[str, Any] = {}
        direct: dict[str, Endpoint] = {}  # answered in front of FastAPI's routing (service/http/direct.py)
        for path, (fn, request_model, response_model) in posts.items():
            generation = path in ("/v1/completions", "/v1/chat/completions", "/generate")
            endpoint = self._wrap(path, fn, record_success=not generation)
            app.add_api_route(
                path,
                endpoint,
                methods=["POST"],
                openapi_extra={"requestBody": _request_body(request_model, schemas)},
                responses=_responses(response_model, stream=generation),
            )
            if generation:
                direct[path] = endpoint
        playground.install(self, app)  # GET /, its files, and /v1/inspect
        ctx = self.model.context_length
        _apply_model_limits(schemas, {"max_tokens": ctx, "max_completion_tokens": ctx}, self.model.vocab_size)
        _apply_model_name(schemas, self.model.name)
        _add_schemas(app, schemas)
        app.add_exception_handler(StarletteHTTPException, _http_exception)
        app.add_middleware(DirectRoutes, endpoints=direct)  # added before CORS: CORS wraps it
        origins = Settings.split(self.settings.cors_allow_origins)
        if origins:  # off unless configured: a browser page of another origin gets no access
            app.add_middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_methods=Settings.split(self.settings.cors_allow_methods),
                allow_headers=Settings.split(self.settings.cors_allow_headers),
                expose_headers=["X-Request-Id", "Retry-After"],
            )
        original = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(a: Any):
            async with original(a) as maybe_state:
                await self.fe.start(a)
                try:
                    yield maybe_state
                finally:
                    await self.fe.stop()

        app.router.lifespan_context = lifespan

    # -- common checks ------------------------------------------------------------------------
    def _wrap(self, route: str, fn: Endpoint, *, auth: bool = True, record_success: bool = True) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            request.state.arrival = time.monotonic()  # TTFT and e2e count from here
            request.state.request_id = rid = request_id(request.headers.get("x-request-id"))
            try:
                if auth:
                    self._check_key(request)
                response = await fn(request)
                if record_success:
                    self._record(route, response.status_code)
            except ApiError as e:
                self._record(route, e.status_on(route), e.kind)
                logger.info("%s %s status=%d %s", rid, route, e.status_on(route), e.message[:200])
                response = e.response(route)
            except Exception:
                logger.exception("%s %s failed", rid, route)
                self._record(route, 500)
                response = ApiError("internal", "internal server error").response()
            response.headers["X-Request-Id"] = rid
            return response

        endpoint.__name__ = route.strip("/").replace("/", "_") or "root"
        return endpoint

    def _record(self, route: str, status: int, kind: str | None = None) -> None:
        m = self.fe.metrics
        if m is None:
            return
        m.observe_http(route, status)
        if kind in REJECT_REASON:
            m.observe_rejected(REJECT_REASON[kind])

    def _check_key(self, request: Request) -> None:
        """Bearer key check; constant-time, and before the body is even read."""
        if self._key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
            raise ApiError("unauthorized", "missing or invalid API key: send 'Authorization: Bearer <key>'")

    async def _read(self, request: Request, model: type[BaseModel]) -> Any:
        """Body → validated request: 413 over the size limit, 400 bad JSON, 422 bad fields."""
        limit = self.settings.max_body_bytes
        too_large = ApiError(
            "payload_too_large",
            f"the request body exceeds the limit of {limit} bytes (TEXTGEN_MAX_BODY_BYTES)",
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        body = b"".join(chunks)
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError("invalid_json", f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            key = _FIRST_KEY.match(body[:1000])  # name the field when the body is an object
            field = key.group(1).decode() if key else None
            message = "the request body nests JSON arrays or objects too deeply"
            raise ApiError("invalid_json", f"{field}: {message}" if field else message, field) from None
        if not isinstance(data, dict):
            raise ApiError("invalid_json", "the request body must be a JSON object")
        try:
            req = model.model_validate(data)
        except ValidationError as e:
            message, param = p.describe_validation_error(e)
            raise ApiError("validation", message, param) from None
        for name in p.ignored_fields(req):
            self._ignored(request, name)
        return req

    def _ignored(self, request: Request, name: str) -> None:
        """An unknown field: accepted and ignored (as vLLM does); logged once per name, counted."""
        if name not in self._ignored_seen and len(self._ignored_seen) < 1000:
            self._ignored_seen.add(name)
            logger.warning(
                "%s %s: ignoring the unknown request field %r (logged once per field name)",
                request.state.request_id, request.url.path, name[:100],
            )
        if self.fe.metrics is not None:
            self.fe.metrics.observe_ignored_field(name)

    # -- open routes --------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        status = self.state.status()
        body = {"status": status, **self.state.engine_gauges(), "inflight": self.state.inflight()}
        return JSONResponse(body, status_code=200 if status == "ready" else 503)

    async def metrics(self, request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # -- model routes -------------------------------------------------------------------------
    def _card(self) -> p.ModelCard:
        m = self.model
        return p.ModelCard(id=m.name, created=m.created, root=m.name, max_model_len=m.context_length,
                           generation_defaults=m.defaults.reported())

    async def models(self, request: Request) -> Response:
        return handlers.json_response(p.ModelList(data=[self._card()]))

    async def model_card(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        if model_id != self.model.name:
            raise ApiError(
                "model_not_found",
                f"model: the model {model_id!r} does not exist; this server serves {self.model.name!r}",
                "model",
            )
        return handlers.json_response(self._card())

    async def tokenizer_info(self, request: Request) -> Response:
        """vLLM's /tokenizer_info: what a client needs to tokenize as the server does (lm-eval's
        ``tokenizer_backend=remote`` reads ``eos_token`` here, then calls /tokenize)."""
        tok = self.model.tokenizer

        def piece(i: int) -> str | None:
            return tok.id_to_piece(i) if i >= 0 else None

        info = p.TokenizerInfo(
            tokenizer_class="SentencePiece" if tok.kind == "sentencepiece" else "PreTrainedTokenizerFast",
            eos_token=tok.eos_token,
            bos_token=tok.bos_token,
            pad_token=piece(tok.pad_id),
            eos_token_id=tok.eos_id if tok.eos_id >= 0 else None,
            bos_token_id=tok.bos_id if tok.bos_id >= 0 else None,
            add_bos_token=self.model.add_bos,
            vocab_size=tok.vocab_size,
            model_max_length=self.model.context_length,
        )
        return handlers.json_response(info)

    async def tokenize(self, request: Request) -> Response:
        req: p.TokenizeRequest = await self._read(request, p.TokenizeRequest)
        given = [f for f in ("text", "prompt", "messages") if getattr(req, f) is not None]
        if len(given) != 1:
            raise ApiError(
                "validation", f"exactly one of text, prompt and messages must be given, got {given or 'none'}",
                "text",
            )
        text = req.text if req.text is not None else req.prompt
        if text is None:
            chat = self.model.chat_template
            text = chat.render(req.messages or [])
            ids = self.model.encode_prompt(text, req.add_special_tokens and chat.add_special_tokens)
        else:
            ids = self.model.encode_prompt(text, req.add_special_tokens)
        out = p.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.model.context_length)
        return handlers.json_response(out)

    async def detokenize(self, request: Request) -> Response:
        req: p.DetokenizeRequest = await self._read(request, p.DetokenizeRequest)
        vocab = self.model.vocab_size
        for t in req.tokens:
            if not 0 <= t < vocab:
                raise ApiError(
                    "validation", f"tokens: token id {t} is outside the vocabulary [0, {vocab})", "tokens"
                )
        text = self.model.tokenizer.decode(req.tokens)
        return handlers.json_response(p.DetokenizeResponse(text=text, prompt=text))

    # -- generation routes --------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        req = self.model.defaults.apply(await self._read(request, p.CompletionRequest))
        job = self._observed(serving.build_completion(req, self.model))
        return await handlers.generate(self.fe, request, "/v1/completions", job, fmt.COMPLETION)

    async def chat_completions(self, request: Request) -> Response:
        req = self.model.defaults.apply(await self._read(request, p.ChatCompletionRequest))
        job = self._observed(serving.build_chat(req, self.model))
        return await handlers.generate(self.fe, request, "/v1/chat/completions", job, fmt.CHAT)

    async def generate(self, request: Request) -> Response:
        req = self.model.defaults.apply(await self._read(request, p.GenerateRequest))
        job = self._observed(serving.build_generate(req, self.model))
        return await handlers.generate(self.fe, request, "/generate", job, fmt.GENERATE)

    def _observed(self, job: serving.Job) -> serving.Job:
        """Structured-output metrics of a job about to be submitted."""
        s = job.structure
        if s is not None and self.fe.metrics is not None:
            self.fe.metrics.observe_structured(s.kind, None if s.cached else s.compile_s)
        return job


def _request_body(model: type[BaseModel], schemas: dict[str, Any]) -> dict:
    """OpenAPI request body of a route that reads its body itself (to control size and errors)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"required": True, "content": {"application/json": {"schema": ref}}}


def _responses(model: type[BaseModel], stream: bool = False) -> dict:
    errors = {code: {"model": p.ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503)}
    ok: dict[str, Any] = {"model": model}
    if stream:  # "stream": true answers server-sent events
        events = (
            "server-sent events: `data: {chunk}` with the new tokens (several when the stream fell behind), "
            "then `data: [DONE]` (docs/api.md)"
        )
        ok["content"] = {"text/event-stream": {"schema": {"description": events}}}
    return {200: ok, **errors}


def _apply_model_limits(node: Any, limits: dict[str, int], vocab_size: int) -> None:
    """Write the served model's limits into the request schemas: max_tokens up to the context
    length, token ids (marked "x-token-id" by service.http.protocol) below the vocabulary size."""
    if isinstance(node, list):
        for item in node:
            _apply_model_limits(item, limits, vocab_size)
        return
    if not isinstance(node, dict):
        return
    if node.get("x-token-id"):
        node["maximum"] = vocab_size - 1
    keys = node.get("patternProperties")
    if isinstance(keys, dict) and "^[0-9]{1,12}$" in keys:  # logit_bias: token ids as strings
        keys[below_pattern(vocab_size)] = keys.pop("^[0-9]{1,12}$")
    for name, limit in limits.items():
        field = node.get("properties", {}).get(name)
        for branch in field.get("anyOf", [field]) if isinstance(field, dict) else []:
            if branch.get("type") == "integer":
                branch["maximum"] = limit
    for value in node.values():
        _apply_model_limits(value, limits, vocab_size)


def below_pattern(n: int) -> str:
    """A regular expression of the decimal numbers 0..n-1 (no leading zeros), for JSON Schema keys."""
    if n <= 10:
        return f"^[0-{max(n, 1) - 1}]$"
    top = str(n - 1)
    alts = ["[0-9]"] + ["[1-9]" + "[0-9]" * (w - 1) for w in range(2, len(top))]  # shorter numbers
    for i, d in enumerate(top):  # n - 1's width: a prefix of it, a smaller digit, then anything
        low = 1 if i == 0 else 0
        if int(d) > low:
            digit = str(low) if int(d) - 1 == low else f"[{low}-{int(d) - 1}]"
            alts.append(top[:i] + digit + "[0-9]" * (len(top) - i - 1))
    alts.append(top)
    return "^(" + "|".join(alts) + ")$"


def _add_schemas(app: FastAPI, schemas: dict[str, Any]) -> None:
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


async def _http_exception(request: Request, exc: StarletteHTTPException) -> Response:
    err = error_from_status(exc.status_code, str(exc.detail))
    err.headers.update(exc.headers or {})  # e.g. Allow on 405
    return err.response()


def model_info(settings: Settings, bundle: Any, tokenizer: Any) -> serving.ModelInfo:
    return serving.ModelInfo(
        name=settings.model_name or bundle.name,
        context_length=bundle.context_length,
        tokenizer=tokenizer,
        add_bos=bundle.add_bos,
        created=int(time.time()),
        # every choice is one engine request: more than the waiting queue holds would never fit
        max_choices=min(p.MAX_CHOICES, settings.max_waiting),
        compiler=GrammarCompiler(tokenizer, timeout_s=settings.grammar_compile_timeout_s),
        chat_template=load_chat_template(bundle, tokenizer),
        defaults=GenerationDefaults.from_bundle(bundle.generation_defaults),
    )


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")


def request_id(given: str | None) -> str:
    """The client's X-Request-Id when it is a sane token (kept as given, for tracing across
    gateways), else a new one: a header a log line or a response cannot carry safely is replaced."""
    return given if given is not None and _REQUEST_ID.match(given) else uuid.uuid4().hex


def _apply_model_name(schemas: dict[str, Any], name: str) -> None:
    """``model`` in the request schemas: the served name (or null), as the server checks it."""
    for schema in schemas.values():
        field = schema.get("properties", {}).get("model") if isinstance(schema, dict) else None
        if isinstance(field, dict) and "anyOf" in field:
            field["anyOf"] = [{"type": "string", "enum": [name]}, {"type": "null"}]
