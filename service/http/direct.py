"""The generation routes answered in front of FastAPI's routing.

A generation request is where a client waits for its first token, and FastAPI's per-request
machinery (the exception middleware, the router's match over every route, the route's body
limit, exit stack and dependency solving) does nothing for these endpoints: they read and check
their own bodies and answer every error themselves (service.http.api). ``DirectRoutes`` sits
among the app's middleware, inside CORS and LitServe's middleware and outside FastAPI's routing,
and hands ``POST`` on exactly these paths to the endpoint. Everything else, including another
method on the same path (405 with ``Allow``), a trailing slash and a ``root_path`` deployment,
takes the usual way. The routes stay registered with FastAPI for the OpenAPI schema.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

Endpoint = Callable[[Request], Awaitable[Response]]


class DirectRoutes:
    """ASGI middleware: ``POST path`` → ``endpoints[path]``; anything else → ``app``."""

    def __init__(self, app: Any, endpoints: dict[str, Endpoint]):
        self.app, self.endpoints = app, endpoints

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        endpoint = None
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            endpoint = self.endpoints.get(scope["path"])
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        response = await endpoint(Request(scope, receive, send))
        await response(scope, receive, send)
