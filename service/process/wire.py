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

Transport: ZeroMQ sockets. Why not LitServe's queues: they are multiprocessing-Manager proxies,
so every put and every get is a synchronous round trip through a third process, each item
pickled on the way; at one client that cost more than the model's own step
(docs/BENCHMARKS.md, "Serving overhead"). Here the two sides talk directly over Unix sockets in
Linux's abstract namespace (no file, so a read-only root file system is fine), named after the
service's random channel id:

    HTTP process i ──PUSH──▶ ipc://@textgen-<id>-engine ──PULL──▶ inference worker
    HTTP process i ◀──PULL── ipc://@textgen-<id>-http-<i> ◀──PUSH── inference worker

In, one message per Submit or Abort; out, one message per engine iteration and HTTP process:
the list of that process's Ack/Output/Refusal of the iteration. Each message is one
``pickle.dumps`` of slotted dataclasses (protocol 5): one encode and one decode per hop, however
many requests the step served.

Sockets are created lazily in the process that uses them (never before a fork), never drop a
message (no high-water mark) and never block the sender: a slow HTTP process queues its events.
"""

from __future__ import annotations

import logging
import pickle
import uuid
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from service.engine.types import RequestOutput, SamplingParams

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True, slots=True)
class Refusal:
    """The engine did not accept the request; ``kind`` is a row of service.http.errors.STATUS."""

    uid: str
    kind: str
    message: str
    param: str | None = None


ToWorker = Submit | Abort
ToFrontend = Ack | Output | Refusal


def new_channel_id() -> str:
    """A fresh id for one running service (its socket names); made once, by the main process."""
    return uuid.uuid4().hex[:16]


def engine_address(channel_id: str) -> str:
    return f"ipc://@textgen-{channel_id}-engine"


def http_address(channel_id: str, rqid: int) -> str:
    return f"ipc://@textgen-{channel_id}-http-{rqid}"


def _encode(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _configure(sock: zmq.Socket) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, 0)  # closing never waits for a peer that is gone
    sock.setsockopt(zmq.SNDHWM, 0)  # no high-water mark: nothing is dropped, a send never blocks
    sock.setsockopt(zmq.RCVHWM, 0)
    return sock


class EngineChannel:
    """The inference worker's end: receives requests and aborts, sends each step's events."""

    def __init__(self, channel_id: str):
        self.channel_id = channel_id
        self._ctx = zmq.Context()
        self._in = _configure(self._ctx.socket(zmq.PULL))
        self._in.bind(engine_address(channel_id))
        self._out: dict[int, zmq.Socket] = {}  # rqid -> PUSH to that HTTP process

    def receive(self, timeout_s: float, max_messages: int) -> list[ToWorker]:
        """Every message waiting (at most ``max_messages``); when none waits, block up to
        ``timeout_s`` (0: do not block) for the first one."""
        items: list[ToWorker] = []
        if timeout_s > 0 and not self._in.poll(int(timeout_s * 1000)):
            return items
        while len(items) < max_messages:
            try:
                items.append(pickle.loads(self._in.recv(zmq.NOBLOCK)))
            except zmq.Again:
                break
        return items

    def send(self, rqid: int, events: list[ToFrontend]) -> None:
        """One message with the events of one HTTP process."""
        sock = self._out.get(rqid)
        if sock is None:
            sock = self._out[rqid] = _configure(self._ctx.socket(zmq.PUSH))
            sock.connect(http_address(self.channel_id, rqid))
        sock.send(_encode(events), zmq.NOBLOCK)

    def close(self) -> None:
        self._ctx.destroy(linger=0)


class FrontendChannel:
    """An HTTP process's end: sends requests and aborts, receives its events (asyncio)."""

    def __init__(self, channel_id: str, rqid: int):
        self._ctx = zmq.asyncio.Context()
        self._out = _configure(self._ctx.socket(zmq.PUSH))
        self._out.connect(engine_address(channel_id))
        self._in = _configure(self._ctx.socket(zmq.PULL))
        self._in.bind(http_address(channel_id, rqid))

    def send(self, message: ToWorker) -> None:
        """Queue a message for the worker; never blocks (it is sent by ZeroMQ's I/O thread)."""
        self._out.send(_encode(message), zmq.NOBLOCK)

    async def receive(self) -> list[ToFrontend]:
        """The next message from the worker: one step's events for this process."""
        return pickle.loads(await self._in.recv())

    def close(self) -> None:
        self._ctx.destroy(linger=0)
