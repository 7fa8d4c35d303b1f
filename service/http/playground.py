"""GET /: the browser playground (service/http/static/, plain files: no build step, no other origin).

The page is open (it holds the API key field itself) and calls only the public API with
``Authorization: Bearer <key>``: /openapi.json for the request limits, /v1/models, the completion
routes and /v1/inspect (service/http/inspection.py). Its Content-Security-Policy lets it load and
call nothing but this origin. ``TEXTGEN_PLAYGROUND=false`` leaves GET / a 404. docs/playground.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from service.http import inspection
from service.http.errors import ApiError

STATIC = Path(__file__).resolve().parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _files() -> dict[str, Path]:
    return {f.name: f for f in STATIC.iterdir() if f.is_file() and f.suffix in MEDIA_TYPES}


def _file_response(path: Path) -> Response:
    return Response(path.read_bytes(), media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


def install(api: Any, app: FastAPI) -> None:
    """Add GET / and GET /playground/{file} (unless turned off), and GET/POST /v1/inspect."""
    routes = inspection.InspectRoutes(api)
    app.add_api_route(
        "/v1/inspect",
        api._wrap("/v1/inspect", routes.get),
        methods=["GET"],
        responses=inspection.responses(inspection.InspectInfo, (401, 404)),
    )
    app.add_api_route(
        "/v1/inspect",
        api._wrap("/v1/inspect", routes.post),
        methods=["POST"],
        openapi_extra=inspection.request_body(),
        responses=inspection.responses(inspection.InspectResponse, (400, 401, 404, 413, 429)),
    )
    if not api.settings.playground:
        return
    files = _files()

    async def page(request: Request) -> Response:
        return _file_response(files["index.html"])

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in files:
            raise ApiError("not_found", f"no such playground file: {name[:100]!r}")
        return _file_response(files[name])

    app.add_api_route("/", api._wrap("/", page, auth=False), methods=["GET"], include_in_schema=False)
    app.add_api_route(
        "/playground/{name}",
        api._wrap("/playground", static, auth=False),
        methods=["GET"],
        include_in_schema=False,
    )
