"""The generation routes, answered in front of FastAPI's routing (service/http/direct.py) and
streamed straight to the ASGI ``send`` (service/http/handlers.py): what a client sees must be
what FastAPI's route and Starlette's StreamingResponse gave it.

The real server on the random bundle, with CORS configured (CORS must still wrap these routes).
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from server_harness import start

ORIGIN = "https://app.example"
BODY = {"prompt": "Shall I compare thee", "max_tokens": 5, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(random_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("direct")
    srv = start(random_bundle, tmp / "server.log", fake=False, TEXTGEN_CORS_ALLOW_ORIGINS=ORIGIN)
    yield srv
    assert srv.stop() == 0, srv.log()


def _raw_post(port: int, path: str, body: dict, headers: dict[str, str]) -> bytes:
    """One HTTP/1.1 request on a fresh connection, read until the server closes it: the bytes as sent."""
    data = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            f"Content-Length: {len(data)}", "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def _dechunk(body: bytes) -> bytes:
    out, pos = b"", 0
    while True:
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end], 16)
        if size == 0:
            assert body[end + 2 :] == b"\r\n", "the chunked body ends with its terminator"
            return out
        out += body[end + 2 : end + 2 + size]
        assert body[end + 2 + size : end + 4 + size] == b"\r\n"
        pos = end + 4 + size


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/generate"])
def test_stream_headers_and_body_are_a_streaming_responses(server, path):
    body = {**BODY, "stream": True}
    if path == "/v1/chat/completions":
        body = {**{k: v for k, v in body.items() if k != "prompt"}, "messages": [{"role": "user", "content": "Hi"}]}
    elif path == "/generate":
        body = {**{k: v for k, v in body.items() if k != "prompt"}, "text": BODY["prompt"]}
    raw = _raw_post(server.port, path, body, {"X-Request-Id": "direct-1"})
    head, _, rest = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines)
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
    assert headers["x-request-id"] == "direct-1" and headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers
    events = _dechunk(rest).decode().split("\n\n")
    assert events[-1] == "" and all(e.startswith("data: ") for e in events[:-1])
    if path != "/generate":
        assert events[-2] == "data: [DONE]"
    json.loads(events[0][len("data: "):])  # every event but [DONE] is one JSON document


def test_cors_still_wraps_the_generation_routes(server):
    r = httpx.post(server.url("/v1/completions"), json=BODY, headers={"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    refused = httpx.post(server.url("/v1/completions"), json={"prompt": 5}, headers={"Origin": ORIGIN})
    assert refused.status_code == 400 and refused.headers["access-control-allow-origin"] == ORIGIN


def test_other_methods_and_paths_take_fastapis_routing(server):
    get = httpx.get(server.url("/v1/completions"))
    assert get.status_code == 405 and get.headers["allow"] == "POST"
    assert get.json()["error"]["type"]  # the API's error body, not Starlette's plain text
    slash = httpx.post(server.url("/v1/completions/"), json=BODY)
    assert slash.status_code == 307 and slash.headers["location"].endswith("/v1/completions")
