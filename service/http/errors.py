"""One table from error kind to HTTP status, and the one error body every endpoint returns.

Every error, whichever layer finds it (HTTP checks, request validation, the engine in the
worker, shutdown), becomes an ``ApiError`` of a kind below and leaves as the OpenAI error shape
``{"error": {"message", "type", "param", "code"}}``: as an HTTP response when nothing was
sent yet, or as one SSE ``event: error`` when a stream had started.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from fastapi.responses import JSONResponse

ErrorKind = Literal[
    "invalid_json",
    "invalid_request",
    "validation",
    "invalid_structure",
    "chat_template",
    "context_length_exceeded",
    "unauthorized",
    "not_found",
    "model_not_found",
    "method_not_allowed",
    "payload_too_large",
    "queue_full",
    "unavailable",
    "generation_error",
    "internal",
]

# kind -> (HTTP status, OpenAI error type)
STATUS: dict[str, tuple[int, str]] = {
    "invalid_json": (400, "invalid_request_error"),
    "invalid_request": (400, "invalid_request_error"),
    "validation": (400, "invalid_request_error"),  # 422 on the native routes (NATIVE_STATUS)
    "context_length_exceeded": (400, "invalid_request_error"),
    # a JSON schema, regex or grammar we cannot serve: 400 on every route (no JSON Schema can say it)
    "invalid_structure": (400, "invalid_request_error"),
    "chat_template": (400, "invalid_request_error"),  # the model's Jinja template refused the messages
    "unauthorized": (401, "authentication_error"),
    "not_found": (404, "not_found_error"),
    "model_not_found": (404, "invalid_request_error"),  # OpenAI's type and code for a wrong model
    "method_not_allowed": (405, "invalid_request_error"),
    "payload_too_large": (413, "invalid_request_error"),
    "queue_full": (429, "rate_limit_error"),
    "unavailable": (503, "service_unavailable_error"),
    "generation_error": (500, "server_error"),
    "internal": (500, "server_error"),
}
# The native routes keep TGI's status for a request that parses but breaks a rule (docs/api.md).
NATIVE_ROUTES = frozenset({"/generate", "/tokenize", "/detokenize"})
NATIVE_STATUS = {"validation": 422}
RETRY_AFTER_S = {"queue_full": 1, "unavailable": 5}
# kind -> reason of the textgen_requests_rejected counter (service.metrics.REJECT_REASONS)
REJECT_REASON = {
    "unauthorized": "auth",
    "queue_full": "queue_full",
    "validation": "validation",
    "model_not_found": "validation",
    "invalid_json": "validation",
    "invalid_request": "validation",
    "context_length_exceeded": "validation",
    "invalid_structure": "validation",
    "chat_template": "validation",
    "payload_too_large": "validation",
}


@dataclass(eq=False)
class ApiError(Exception):
    kind: str
    message: str
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in STATUS:
            raise ValueError(f"unknown error kind {self.kind!r}")
        super().__init__(self.message)

    @property
    def status(self) -> int:
        return STATUS[self.kind][0]

    def status_on(self, route: str | None) -> int:
        """The HTTP status on ``route``: the native routes answer 422 where /v1 answers 400."""
        if route in NATIVE_ROUTES:
            return NATIVE_STATUS.get(self.kind, self.status)
        return self.status

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": STATUS[self.kind][1],
                "param": self.param,
                "code": self.kind,
            }
        }

    def response(self, route: str | None = None) -> JSONResponse:
        headers = dict(self.headers)
        if self.kind in RETRY_AFTER_S:
            headers.setdefault("Retry-After", str(RETRY_AFTER_S[self.kind]))
        if self.kind == "unauthorized":
            headers.setdefault("WWW-Authenticate", "Bearer")
        return JSONResponse(self.body(), status_code=self.status_on(route), headers=headers)

    def sse(self) -> str:
        """The SSE event that ends a stream which had already started."""
        return f"event: error\ndata: {json.dumps(self.body())}\n\n"


def error_from_status(status: int, detail: str) -> ApiError:
    """An ApiError for a Starlette/FastAPI HTTPException (unknown route, wrong method)."""
    kind = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 400: "invalid_request"}
    return ApiError(kind.get(status, "internal" if status >= 500 else "invalid_request"), detail)


def engine_refusal(e: Exception) -> ApiError:
    """The ApiError of an engine's refusal of a request (service.engine.types' EngineError family)."""
    from service.engine.types import InvalidRequestError, PromptTooLongError, QueueFullError

    if isinstance(e, QueueFullError):
        return ApiError("queue_full", str(e))
    if isinstance(e, PromptTooLongError):
        return ApiError("context_length_exceeded", str(e), e.param)
    if isinstance(e, InvalidRequestError):
        return ApiError("validation", str(e), e.param)
    return ApiError("internal", "the engine could not accept the request")
