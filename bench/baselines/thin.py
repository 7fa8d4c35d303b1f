"""The thinnest streaming server around the engine: one process, one thread, raw sockets.

    python -m bench.baselines.thin --bundle artifacts/small --port 8001 [--frontend uvicorn]

What serving over HTTP costs at the least on a machine, whatever the server: the engine steps in
the process that owns the client connections, and each step's text is written straight to its
socket (SSE ``/v1/completions`` chunks as the LitServe baselines write them, HTTP/1.1 chunked,
keep-alive). No event loop, no second process, no validation beyond what the harness sends, no
metrics. The
load generator (``bench.serve``) talks to it as to the service: ``GET /v1/models``,
``POST /tokenize``, streamed ``POST /v1/completions`` (``prompt``, ``max_tokens``,
``temperature``, ``seed``, ``ignore_eos``, ``stream_options``). ``bench.compare``'s clients
check runs it beside the service and the offline engine: what the service loses to the offline
engine beyond what this server loses is the service's own cost.

``--frontend uvicorn`` serves the same engine through uvicorn (httptools, uvloop) as a bare ASGI
app in the same single process, the engine stepping in a task of the event loop: between the two,
what an ASGI server costs; between it and the service, what the second process and the service's
own layers cost.

A benchmark baseline, not a server to deploy: one malformed request gets a 400 and its
connection closed, nothing more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import selectors
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

from bench.baselines.common import DONE, PromptEncoder, build_engine, completion_id, text_chunk, usage_chunk
from service.engine.types import SamplingParams
from service.process.heap import freeze_startup_heap

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 1 << 20
SEND_TIMEOUT_S = 30.0


@dataclass
class Conn:
    """One client connection: bytes read but not yet parsed, and the stream it is waiting on."""

    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    request_id: str | None = None  # the engine request streaming to it


@dataclass
class Stream:
    """One streamed completion: its connection (raw front end only), id, prompt size, usage wanted."""

    conn: Conn | None
    cid: str
    prompt_tokens: int
    usage: bool


def chunk(payload: str) -> bytes:
    """One HTTP/1.1 chunk."""
    data = payload.encode()
    return b"%x\r\n%s\r\n" % (len(data), data)


def response(status: str, body: dict[str, Any], close: bool = False) -> bytes:
    data = json.dumps(body).encode()
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return (head + ("Connection: close\r\n" if close else "") + "\r\n").encode() + data


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def parse_request(buf: bytearray) -> tuple[str, str, bytes, int] | None:
    """(method, path, body, bytes consumed) of the first whole request in ``buf``, or None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEADER_BYTES:
            raise ValueError(f"request headers over {MAX_HEADER_BYTES} bytes")
        return None
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    method, path, _ = head[0].split(" ", 2)
    length = 0
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    if length > MAX_BODY_BYTES:
        raise ValueError(f"body over {MAX_BODY_BYTES} bytes")
    total = end + 4 + length
    if len(buf) < total:
        return None
    return method, path.split("?", 1)[0], bytes(buf[end + 4 : total]), total


class ThinCore:
    """The engine and what both front ends do with a request's JSON and with an engine output."""

    def __init__(self, bundle: str):
        self.encoder = PromptEncoder.load(bundle)
        self.engine = build_engine(bundle)
        self.model = self.encoder.model_name
        self.next_id = 0

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model, "object": "model"}]}

    def tokenize(self, body: bytes) -> dict[str, Any]:
        ids = self.encoder.encode(json.loads(body)["text"])
        return {"tokens": ids, "count": len(ids)}

    def start(self, req: dict[str, Any]) -> tuple[str, Stream]:
        """Add a streamed completion to the engine; its request id and stream (``conn`` unset)."""
        if not req.get("stream"):
            raise ValueError("only streamed completions")
        ids = self.encoder.encode(req["prompt"])
        seed = req.get("seed")
        params = SamplingParams(
            max_tokens=int(req.get("max_tokens") or 16),
            temperature=float(req.get("temperature", 1.0)),
            seed=None if seed is None else int(seed),
            ignore_eos=bool(req.get("ignore_eos", False)),
        )
        rid = str(self.next_id)
        self.next_id += 1
        self.engine.add_request(rid, ids, params)
        usage = bool((req.get("stream_options") or {}).get("include_usage"))
        return rid, Stream(None, completion_id(), len(ids), usage)

    def frames(self, out: Any, st: Stream) -> str:
        """The SSE events of one engine output (the last one's usage and [DONE] included)."""
        frames = []
        if out.text_delta or out.finished:
            reason = out.finish_reason if out.finished else None
            frames.append(text_chunk(st.cid, self.model, out.text_delta, reason))
        if out.finished:
            if st.usage:
                frames.append(usage_chunk(st.cid, self.model, st.prompt_tokens, out.num_output_tokens))
            frames.append(DONE)
        return "".join(frames)


class ThinServer:
    """The raw-socket front end: one ``selectors`` loop over the connections and the engine."""

    def __init__(self, core: ThinCore, port: int):
        self.core, self.engine = core, core.engine
        self.listener = socket.create_server(("127.0.0.1", port), backlog=256)
        self.listener.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ)
        self.streams: dict[str, Stream] = {}
        self.stopping = False

    def serve(self) -> None:
        while not self.stopping:
            busy = self.engine.has_unfinished()
            for key, _ in self.sel.select(0 if busy else 0.5):
                if key.fileobj is self.listener:
                    self.accept()
                else:
                    self.read(key.data)
            if self.engine.has_unfinished():
                self.step()

    def accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(SEND_TIMEOUT_S)  # writes block (briefly: loopback); reads only when selected
        self.sel.register(sock, selectors.EVENT_READ, Conn(sock))

    def close(self, conn: Conn) -> None:
        if conn.request_id is not None:
            self.engine.abort(conn.request_id)
            self.streams.pop(conn.request_id, None)
        self.sel.unregister(conn.sock)
        conn.sock.close()

    def read(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        conn.buf += data
        while conn.request_id is None:
            try:
                req = parse_request(conn.buf)
            except ValueError as e:
                self.send(conn, response("400 Bad Request", {"error": {"message": str(e)}}, close=True))
                self.close(conn)
                return
            if req is None:
                return
            method, path, body, used = req
            del conn.buf[:used]
            try:
                self.handle(conn, method, path, body)
            except Exception as e:  # the engine's refusals included: a 400, and the server goes on
                self.send(conn, response("400 Bad Request", {"error": {"message": repr(e)}}))

    def handle(self, conn: Conn, method: str, path: str, body: bytes) -> None:
        if method == "GET" and path in ("/health", "/ready"):
            self.send(conn, response("200 OK", {"status": "ok"}))
        elif method == "GET" and path == "/v1/models":
            self.send(conn, response("200 OK", self.core.models()))
        elif method == "POST" and path == "/tokenize":
            self.send(conn, response("200 OK", self.core.tokenize(body)))
        elif method == "POST" and path == "/v1/completions":
            rid, st = self.core.start(json.loads(body))
            st.conn, conn.request_id, self.streams[rid] = conn, rid, st
            self.send(conn, STREAM_HEAD)
        else:
            self.send(conn, response("404 Not Found", {"error": {"message": f"{method} {path}"}}))

    def step(self) -> None:
        for out in self.engine.step():
            st = self.streams.get(out.request_id)
            if st is None:
                continue
            data = self.core.frames(out, st)
            end = b""
            if out.finished:
                del self.streams[out.request_id]
                st.conn.request_id, end = None, b"0\r\n\r\n"
            if data or end:
                self.send(st.conn, (chunk(data) if data else b"") + end)

    def send(self, conn: Conn, data: bytes) -> None:
        try:
            conn.sock.sendall(data)
        except OSError:  # the client left: its request is aborted
            if conn.sock.fileno() >= 0:
                self.close(conn)


class AsgiThin:
    """The uvicorn front end: a bare ASGI app; the engine steps in a task of the same event loop."""

    def __init__(self, core: ThinCore):
        self.core, self.engine = core, core.engine
        self.streams: dict[str, tuple[asyncio.Queue[str | None], Stream]] = {}  # None: the end
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None  # the engine loop (held: the loop keeps weak references)

    async def run_engine(self) -> None:
        while True:
            if not self.engine.has_unfinished():
                self.wake.clear()
                await self.wake.wait()
            for out in self.engine.step():
                if out.request_id not in self.streams:
                    continue
                q, st = self.streams[out.request_id]
                data = self.core.frames(out, st)
                if data:
                    q.put_nowait(data)
                if out.finished:
                    q.put_nowait(None)
                    del self.streams[out.request_id]
            await asyncio.sleep(0)  # let the handlers write what the step made

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (msg := await receive())["type"] != "lifespan.shutdown":
                if msg["type"] == "lifespan.startup":
                    self.task = asyncio.create_task(self.run_engine())
                    await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        method, path = scope["method"], scope["path"]
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        try:
            if method == "GET" and path in ("/health", "/ready"):
                await _json(send, 200, {"status": "ok"})
            elif method == "GET" and path == "/v1/models":
                await _json(send, 200, self.core.models())
            elif method == "POST" and path == "/tokenize":
                await _json(send, 200, self.core.tokenize(body))
            elif method == "POST" and path == "/v1/completions":
                await self.stream(json.loads(body), send)
            else:
                await _json(send, 404, {"error": {"message": f"{method} {path}"}})
        except Exception as e:  # the engine's refusals included: a 400, and the server goes on
            await _json(send, 400, {"error": {"message": repr(e)}})

    async def stream(self, req: dict[str, Any], send: Any) -> None:
        rid, st = self.core.start(req)
        q: asyncio.Queue[str | None] = asyncio.Queue()
        self.streams[rid] = (q, st)
        self.wake.set()
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        try:
            while (data := await q.get()) is not None:
                await send({"type": "http.response.body", "body": data.encode(), "more_body": True})
        except OSError:  # the client left
            self.engine.abort(rid)
            self.streams.pop(rid, None)
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _json(send: Any, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.baselines.thin", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--frontend", choices=("raw", "uvicorn"), default="raw",
                   help="raw sockets and selectors (default), or uvicorn with a bare ASGI app")
    a = p.parse_args(argv)
    core = ThinCore(a.bundle)
    freeze_startup_heap()  # as the service's processes do once ready
    if a.frontend == "uvicorn":
        import uvicorn

        uvicorn.run(AsgiThin(core), host="127.0.0.1", port=a.port, log_level="warning", access_log=False)
        return 0
    server = ThinServer(core, a.port)

    def stop(*_: Any) -> None:
        server.stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(f"thin server on 127.0.0.1:{server.listener.getsockname()[1]}", flush=True)
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
