"""The thinnest streaming server around the engine: one process, one thread, raw sockets.

    python -m bench.baselines.thin --bundle artifacts/small --port 8001

What serving over HTTP costs at the least on a machine, whatever the server: the engine steps in
the process that owns the client connections, and each step's text is written straight to its
socket as the service frames it (SSE ``/v1/completions`` chunks, HTTP/1.1 chunked, keep-alive). No
event loop, no second process, no validation beyond what the harness sends, no metrics. The
load generator (``bench.serve``) talks to it as to the service: ``GET /v1/models``,
``POST /tokenize``, streamed ``POST /v1/completions`` (``prompt``, ``max_tokens``,
``temperature``, ``seed``, ``ignore_eos``, ``stream_options``). ``bench.compare``'s clients
check runs it beside the service and the offline engine: what the service loses to the offline
engine beyond what this server loses is the service's own cost.

A benchmark baseline, not a server to deploy: one malformed request gets a 400 and its
connection closed, nothing more.
"""

from __future__ import annotations

import argparse
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
    conn: Conn
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


class ThinServer:
    def __init__(self, bundle: str, port: int):
        self.encoder = PromptEncoder.load(bundle)
        self.engine = build_engine(bundle)
        self.model = self.encoder.model_name
        self.listener = socket.create_server(("127.0.0.1", port), backlog=256)
        self.listener.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ)
        self.streams: dict[str, Stream] = {}
        self.next_id = 0
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
            except (ValueError, KeyError, TypeError) as e:
                self.send(conn, response("400 Bad Request", {"error": {"message": repr(e)}}))

    def handle(self, conn: Conn, method: str, path: str, body: bytes) -> None:
        if method == "GET" and path in ("/health", "/ready"):
            self.send(conn, response("200 OK", {"status": "ok"}))
        elif method == "GET" and path == "/v1/models":
            self.send(conn, response("200 OK", {"object": "list", "data": [{"id": self.model, "object": "model"}]}))
        elif method == "POST" and path == "/tokenize":
            ids = self.encoder.encode(json.loads(body)["text"])
            self.send(conn, response("200 OK", {"tokens": ids, "count": len(ids)}))
        elif method == "POST" and path == "/v1/completions":
            self.start(conn, json.loads(body))
        else:
            self.send(conn, response("404 Not Found", {"error": {"message": f"{method} {path}"}}))

    def start(self, conn: Conn, req: dict[str, Any]) -> None:
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
        self.streams[rid] = Stream(conn, completion_id(), len(ids), usage)
        conn.request_id = rid
        self.send(conn, STREAM_HEAD)

    def step(self) -> None:
        for out in self.engine.step():
            st = self.streams.get(out.request_id)
            if st is None:
                continue
            frames = []
            if out.text_delta or out.finished:
                reason = out.finish_reason if out.finished else None
                frames.append(text_chunk(st.cid, self.model, out.text_delta, reason))
            if out.finished:
                if st.usage:
                    frames.append(usage_chunk(st.cid, self.model, st.prompt_tokens, out.num_output_tokens))
                frames.append(DONE)
                del self.streams[out.request_id]
                st.conn.request_id = None
            data = b"".join(chunk(f) for f in frames) + (b"0\r\n\r\n" if out.finished else b"")
            if data:
                self.send(st.conn, data)

    def send(self, conn: Conn, data: bytes) -> None:
        try:
            conn.sock.sendall(data)
        except OSError:  # the client left: its request is aborted
            if conn.sock.fileno() >= 0:
                self.close(conn)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.baselines.thin", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args(argv)
    server = ThinServer(a.bundle, a.port)

    def stop(*_: Any) -> None:
        server.stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    freeze_startup_heap()  # as the service's processes do once ready
    print(f"thin server on 127.0.0.1:{server.listener.getsockname()[1]}", flush=True)
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
