"""The wire protocol between the HTTP processes and the inference worker: typed messages and their transport.

Both sides import this module and nothing else of each other. Five messages, each a slotted
dataclass:

    HTTP process ──▶ worker    Submit (one HTTP request: its choices' prompts and parameters)
                               Abort  (the client is gone, or the request failed at the edge)
    worker ──▶ HTTP process    Ack    (the engine accepted the request)
                               Output (what one engine step produced for one choice)
                               Refusal (the engine did not accept it: queue full, too long, ...)

A request is named by ``uid`` (the HTTP layer's id) and a choice by ``(uid, index)``; how the
worker names choices inside the engine is its own business (service/process/worker.py).

Transport: plain Unix stream sockets in Linux's abstract namespace (no file, so a read-only root
file system is fine), named after the service's random channel id. The worker listens; each HTTP
process connects once, says which one it is (``Hello``), and both directions share that
connection:

    HTTP process i ◀──▶ unix:@textgen-<id>-engine ◀──▶ inference worker

In, one frame per Submit or Abort; out, per engine iteration and HTTP process, one frame of the
Acks and Refusals of the requests just taken in (before the step, so that a stream's headers go out
while its prefill runs) and one of the step's Outputs. A frame is a 4-byte little-endian length
and one ``pickle.dumps`` of slotted dataclasses (protocol 5): one encode and one decode per hop,
however many requests the step served.

Why not LitServe's queues: they are multiprocessing-Manager proxies, so every put and every get is
a synchronous round trip through a third process (docs/BENCHMARKS.md, "Serving overhead"). Why not
ZeroMQ: its I/O threads add a thread wake-up on each side of every message; on 2 busy cores a
round trip of the same pickled messages took 1.8x as long, p99 included (bench/wire_latency.py).

Sockets are non-blocking and never drop a message: what the kernel does not take at once waits in
the sender's own buffer (a slow HTTP process queues its events; the worker never blocks on it).
The worker's end is made before it reports ready, so an HTTP process always finds it listening.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import pickle
import select
import socket
import uuid
from collections import deque
from dataclasses import dataclass, fields
from typing import Any

from service.engine.types import RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

_LEN = 4  # bytes of a frame's length prefix
_READ = 1 << 16  # bytes per recv
_BACKLOG = 64  # HTTP processes connecting at once


@dataclass(frozen=True, slots=True)
class Submit:
    """One HTTP request: ``len(params)`` choices, choice i on ``prompts[i]``."""

    rqid: int  # the HTTP process that answers it
    uid: str
    prompts: tuple[list[int], ...]  # one per choice (choices of one prompt share the list)
    params: tuple[SamplingParams, ...]
    arrival: float  # time.monotonic() at the HTTP edge (CLOCK_MONOTONIC is system-wide)
    deadline: float  # time.monotonic() after which the engine finishes it as "length"


@dataclass(frozen=True, slots=True)
class Abort:
    rqid: int
    uid: str


@dataclass(frozen=True, slots=True)
class Ack:
    uid: str


@dataclass(frozen=True, slots=True)
class Output:
    uid: str
    index: int  # the choice
    output: RequestOutput

    def __reduce__(self) -> tuple:
        # Pickled as one flat tuple: the default for slotted dataclasses goes through __getstate__
        # per object, 2.5x slower both ways (32 outputs a step: 500 µs → 200 µs, encode + decode).
        return _output, (self.uid, self.index, *_OUTPUT_FIELDS(self.output))


_OUTPUT_FIELDS = operator.attrgetter(*(f.name for f in fields(RequestOutput)))


def _output(uid: str, index: int, *values: Any) -> Output:
    return Output(uid, index, RequestOutput(*values))


@dataclass(frozen=True, slots=True)
class Refusal:
    """The engine did not accept the request; ``kind`` is a row of service.http.errors.STATUS."""

    uid: str
    kind: str
    message: str
    param: str | None = None


@dataclass(frozen=True, slots=True)
class Hello:
    """The first frame on a connection: which HTTP process it is (the channel consumes it)."""

    rqid: int


ToWorker = Submit | Abort
ToFrontend = Ack | Output | Refusal


def new_channel_id() -> str:
    """A fresh id for one running service (its socket name); made once, by the main process."""
    return uuid.uuid4().hex[:16]


def engine_address(channel_id: str) -> str:
    """The worker's socket, in the abstract namespace (the leading NUL)."""
    return f"\0textgen-{channel_id}-engine"


def encode(obj: Any) -> bytes:
    """One frame: length prefix, then the pickle."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(_LEN, "little") + data


class FrameReader:
    """Bytes in, decoded objects out: frames split across reads are kept until complete."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        buf = self._buf
        buf += data
        out, pos, end = [], 0, len(buf)
        while end - pos >= _LEN:
            n = int.from_bytes(buf[pos : pos + _LEN], "little")
            if end - pos - _LEN < n:
                break
            out.append(pickle.loads(memoryview(buf)[pos + _LEN : pos + _LEN + n]))
            pos += _LEN + n
        if pos:
            del buf[:pos]
        return out


class _Outbox:
    """What a non-blocking socket did not take yet, sent first next time (order is kept)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.pending: deque[memoryview] = deque()

    def write(self, frame: bytes) -> None:
        if self.pending:
            self.pending.append(memoryview(frame))
            self.flush()
            return
        try:
            n = self.sock.send(frame)
        except BlockingIOError:
            n = 0
        if n < len(frame):
            self.pending.append(memoryview(frame)[n:])

    def flush(self) -> None:
        """Send what waits, as far as the socket takes it."""
        while self.pending:
            head = self.pending[0]
            try:
                n = self.sock.send(head)
            except BlockingIOError:
                return
            if n < len(head):
                self.pending[0] = head[n:]
                return
            self.pending.popleft()


class _Peer:
    """One HTTP process's connection, on the worker's side."""

    def __init__(self, sock: socket.socket):
        self.sock, self.out, self.reader = sock, _Outbox(sock), FrameReader()
        self.rqid: int | None = None


class EngineChannel:
    """The inference worker's end: receives requests and aborts, sends each step's events."""

    def __init__(self, channel_id: str):
        self.channel_id = channel_id
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(engine_address(channel_id))
        self._listener.listen(_BACKLOG)
        self._listener.setblocking(False)
        self._poll = select.poll()
        self._poll.register(self._listener, select.POLLIN)
        self._peers: dict[int, _Peer] = {}  # fd -> peer
        self._by_rqid: dict[int, _Peer] = {}
        self._inbox: deque[ToWorker] = deque()

    def receive(self, timeout_s: float, max_messages: int) -> list[ToWorker]:
        """Every message waiting (at most ``max_messages``); when none waits, block up to
        ``timeout_s`` (0: do not block) for the first one."""
        if not self._inbox:
            self._pump(timeout_s)
        n = min(max_messages, len(self._inbox))
        return [self._inbox.popleft() for _ in range(n)]

    def send(self, rqid: int, events: list[ToFrontend]) -> None:
        """One frame with the events of one HTTP process; dropped if that process is gone."""
        peer = self._by_rqid.get(rqid)
        if peer is None:
            self._pump(0.0)  # its connection or hello may not have been read yet
            peer = self._by_rqid.get(rqid)
            if peer is None:
                logger.warning("no connection from HTTP process %d: %d events dropped", rqid, len(events))
                return
        try:
            peer.out.write(encode(events))
        except OSError:
            self._drop(peer)
        if peer.out.pending:
            self._poll.modify(peer.sock, select.POLLIN | select.POLLOUT)

    def _pump(self, timeout_s: float) -> None:
        """One poll: accept connections, read what arrived, write what waits."""
        for fd, mask in self._poll.poll(int(timeout_s * 1000) if timeout_s > 0 else 0):
            if fd == self._listener.fileno():
                self._accept()
                continue
            peer = self._peers.get(fd)
            if peer is None:
                continue
            if mask & select.POLLOUT:
                self._flush(peer)
            if mask & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self._read(peer)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            self._peers[sock.fileno()] = _Peer(sock)
            self._poll.register(sock, select.POLLIN)

    def _read(self, peer: _Peer) -> None:
        while True:
            try:
                data = peer.sock.recv(_READ)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the HTTP process is gone
                self._drop(peer)
                return
            for msg in peer.reader.feed(data):
                if isinstance(msg, Hello):
                    peer.rqid = msg.rqid
                    self._by_rqid[msg.rqid] = peer
                else:
                    self._inbox.append(msg)

    def _flush(self, peer: _Peer) -> None:
        try:
            peer.out.flush()
        except OSError:
            self._drop(peer)
            return
        if not peer.out.pending:
            self._poll.modify(peer.sock, select.POLLIN)

    def _drop(self, peer: _Peer) -> None:
        fd = peer.sock.fileno()
        if self._peers.pop(fd, None) is None:
            return
        self._poll.unregister(fd)
        if peer.rqid is not None and self._by_rqid.get(peer.rqid) is peer:
            del self._by_rqid[peer.rqid]
        peer.sock.close()
        logger.info("HTTP process %s disconnected from the inference worker", peer.rqid)

    def close(self) -> None:
        for peer in list(self._peers.values()):
            peer.sock.close()
        self._peers.clear()
        self._by_rqid.clear()
        self._listener.close()


class FrontendChannel:
    """An HTTP process's end: sends requests and aborts, receives its events. Made inside the
    process's running event loop, which reads the socket as soon as data arrives (no polling)."""

    def __init__(self, channel_id: str, rqid: int):
        self._loop = asyncio.get_running_loop()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(engine_address(channel_id))  # the worker listens before it reports ready
        self._sock.setblocking(False)
        self._fd = self._sock.fileno()
        self._out = _Outbox(self._sock)
        self._reader = FrameReader()
        self._inbox: deque[list[ToFrontend]] = deque()
        self._waiter: asyncio.Future | None = None
        self._writing = False
        self._closed = False
        self._loop.add_reader(self._fd, self._on_readable)
        self.send(Hello(rqid))

    def send(self, message: ToWorker | Hello) -> None:
        """Queue a message for the worker; never blocks. Raises ConnectionError once the worker is gone."""
        if self._closed:
            raise ConnectionError("the channel to the inference worker is closed")
        self._out.write(encode(message))
        if self._out.pending and not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._on_writable)

    async def receive(self) -> list[ToFrontend]:
        """The next message from the worker: one step's events for this process. Messages that
        already arrived are returned without yielding to the event loop."""
        while not self._inbox:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._inbox.popleft()

    def _on_readable(self) -> None:
        while True:
            try:
                data = self._sock.recv(_READ)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:  # the worker is gone: the supervisor fails what is pending
                logger.warning("the inference worker closed its connection")
                self._loop.remove_reader(self._fd)
                break
            self._inbox.extend(self._reader.feed(data))
            if len(data) < _READ:
                break
        if self._inbox and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _on_writable(self) -> None:
        try:
            self._out.flush()
        except OSError:
            self._out.pending.clear()
        if not self._out.pending:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
        self._sock.close()
