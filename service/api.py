"""The HTTP API on LitServe: routes, checks before anything reaches the worker, and the wiring.

LitServe provides the processes (uvicorn HTTP processes, one spawned inference worker) and the
queues between them. Its own request handlers are not used: our routes (plain FastAPI routes on
LitServe's app, running in every HTTP process) check the API key, the body size, the JSON and
the request's fields, tokenize, and only then submit a job to the worker (service.frontend).
LitServe's "/", "/health" and "/info" routes are replaced (its /health is not a liveness probe
and LIT_SERVER_API_KEY would protect it).

    GET  /health               liveness: 200 while this HTTP process answers
    GET  /ready                200 when the engine is loaded and stepping; 503 otherwise
    GET  /metrics              Prometheus exposition, merged over processes
    GET  /v1/models            the served model                                       (key)
    POST /tokenize, /detokenize                                                       (key)
    POST /v1/completions, /v1/chat/completions, /generate                             (key)
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import chat_template, handlers, metrics, serving
from service import protocol as p
from service.engine_loop import ENGINE_PATH
from service.errors import REJECT_REASON, ApiError, error_from_status
from service.frontend import Frontend
from service.settings import Settings
from service.shared_state import SharedState

logger = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]
LITSERVE_ROUTES = {"/", "/health", "/info", ENGINE_PATH}
_FIRST_KEY = re.compile(rb'\s*\{\s*"([A-Za-z_][A-Za-z0-9_]{0,63})"\s*:')


class HttpApi:
    def __init__(self, settings: Settings, state: SharedState, model: serving.ModelInfo, frontend: Frontend):
        self.settings, self.state, self.model, self.fe = settings, state, model, frontend
        key = settings.api_key
        self._key = key.get_secret_value().encode() if key is not None else None

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
        for path, (fn, request_model, response_model) in posts.items():
            generation = path in ("/v1/completions", "/v1/chat/completions", "/generate")
            app.add_api_route(
                path,
                self._wrap(path, fn, record_success=not generation),
                methods=["POST"],
                openapi_extra={"requestBody": _request_body(request_model, schemas)},
                responses=_responses(response_model, stream=generation),
            )
        ctx = self.model.context_length
        _apply_model_limits(schemas, {"max_tokens": ctx, "max_completion_tokens": ctx}, self.model.vocab_size)
        _add_schemas(app, schemas)
        app.add_exception_handler(StarletteHTTPException, _http_exception)
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
            try:
                if auth:
                    self._check_key(request)
                response = await fn(request)
                if record_success:
                    self._record(route, response.status_code)
                return response
            except ApiError as e:
                self._record(route, e.status, e.kind)
                return e.response()
            except Exception:
                logger.exception("%s failed", route)
                self._record(route, 500)
                return ApiError("internal", "internal server error").response()

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
            return model.model_validate(data)
        except ValidationError as e:
            message, param = p.describe_validation_error(e)
            raise ApiError("validation", message, param) from None

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
    async def models(self, request: Request) -> Response:
        m = self.model
        card = p.ModelCard(id=m.name, created=m.created, max_model_len=m.context_length)
        return handlers.json_response(p.ModelList(data=[card]))

    async def tokenize(self, request: Request) -> Response:
        req: p.TokenizeRequest = await self._read(request, p.TokenizeRequest)
        if (req.text is None) == (req.messages is None):
            raise ApiError("validation", "exactly one of text and messages must be given", "text")
        text = req.text if req.text is not None else chat_template.render(req.messages or [])
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
        return handlers.json_response(p.DetokenizeResponse(text=self.model.tokenizer.decode(req.tokens)))

    # -- generation routes --------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        req = await self._read(request, p.CompletionRequest)
        job = serving.build_completion(req, self.model)
        return await handlers.generate(self.fe, request, "/v1/completions", job, "completion")

    async def chat_completions(self, request: Request) -> Response:
        req = await self._read(request, p.ChatCompletionRequest)
        job = serving.build_chat(req, self.model)
        return await handlers.generate(self.fe, request, "/v1/chat/completions", job, "chat")

    async def generate(self, request: Request) -> Response:
        req = await self._read(request, p.GenerateRequest)
        job = serving.build_generate(req, self.model)
        return await handlers.generate(self.fe, request, "/generate", job, "generate")


def _request_body(model: type[BaseModel], schemas: dict[str, Any]) -> dict:
    """OpenAPI request body of a route that reads its body itself (to control size and errors)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"required": True, "content": {"application/json": {"schema": ref}}}


def _responses(model: type[BaseModel], stream: bool = False) -> dict:
    errors = {code: {"model": p.ErrorResponse} for code in (400, 401, 413, 422, 429, 503)}
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
    length, token ids (marked "x-token-id" by service.protocol) below the vocabulary size."""
    if isinstance(node, list):
        for item in node:
            _apply_model_limits(item, limits, vocab_size)
        return
    if not isinstance(node, dict):
        return
    if node.get("x-token-id"):
        node["maximum"] = vocab_size - 1
    for name, limit in limits.items():
        field = node.get("properties", {}).get(name)
        for branch in field.get("anyOf", [field]) if isinstance(field, dict) else []:
            if branch.get("type") == "integer":
                branch["maximum"] = limit
    for value in node.values():
        _apply_model_limits(value, limits, vocab_size)


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
        add_bos=bool(bundle.config.get("tokenizer", {}).get("add_bos", False)),
        created=int(time.time()),
    )
