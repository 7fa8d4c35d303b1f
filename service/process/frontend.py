"""The HTTP process's side of the engine: submit jobs, route events back, abort, fail, observe.

One ``Frontend`` exists per uvicorn process (created in the main process, started in each
forked uvicorn process by the app's lifespan). It talks to the inference worker in
service.process.wire's messages: jobs and aborts go out on the worker's socket, and each engine iteration's
events for this process come back as one message on this process's own socket, which
``_dispatch`` fans out to the waiting requests. When the process fell behind, messages queue in
the socket and are dispatched back to back, so a stream's handler finds several outputs of a
choice queued and sends them as one event (``Pending``).

A request ends exactly once, in ``finish``: it leaves ``pending``, gives back its in-flight
count (what a drain waits for), and, if it ended early (client gone, error), tells the worker
to abort it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from service.engine.types import RequestOutput
from service.http.choices import Choice, merge_outputs
from service.http.errors import ApiError
from service.http.jobs import Job, ModelInfo
from service.process.heap import freeze_startup_heap
from service.process.shared_state import Phase, SharedState
from service.process.wire import Abort, Ack, FrontendChannel, Output, Refusal, Submit
from service.settings import Settings

logger = logging.getLogger(__name__)

WATCHDOG_PERIOD_S = 0.1


class ClientGone(Exception):
    """The client closed the connection."""


@dataclass(frozen=True, slots=True)
class Fail:
    """Local event: the request cannot finish (worker dead, shutting down)."""

    error: ApiError


@dataclass(frozen=True, slots=True)
class Gone:
    """Local event: the client disconnected."""


Event = Ack | Output | Refusal | Fail | Gone


class Pending:
    """One submitted job, as seen by the HTTP handler answering it.

    With ``max_tokens_per_event`` > 1 (streams), an output is joined with the later outputs of
    the same choice that are already queued, up to that many tokens: when the HTTP side fell
    behind the engine, one chunk carries what several steps produced. Nothing waits for a token
    that has not arrived, so a handler that keeps up still sends each step's output at once.
    """

    def __init__(self, job: Job, arrival: float, max_tokens_per_event: int = 1):
        self.job = job
        self.arrival = arrival  # time.monotonic() when the HTTP request arrived
        self.max_tokens_per_event = max_tokens_per_event
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._ahead: deque[Event] = deque()  # events taken off ``events`` early, still in order
        self.choices = [Choice(i) for i in range(len(job.params))]
        self.complete = False  # every choice finished
        self.ended = False  # finish() ran
        self.acked = False  # the engine accepted it
        self.error: ApiError | None = None
        self.request_id = job.id  # the HTTP layer sets the X-Request-Id it answers with

    def put(self, event: Event) -> None:
        self.events.put_nowait(event)

    def ready(self) -> bool:
        """Whether ``next_event`` has an event at hand (it will not wait)."""
        return bool(self._ahead) or not self.events.empty()

    async def next_event(self) -> tuple[Choice, RequestOutput] | None:
        """The next output with its choice, or None for the ack; raises ApiError or ClientGone."""
        ev = self._ahead.popleft() if self._ahead else await self.events.get()
        match ev:
            case Output(index=index, output=out):
                if _failed(out):
                    raise ApiError(
                        "generation_error", out.error or f"the engine ended the request ({out.finish_reason})"
                    )
                if self.max_tokens_per_event > 1 and not out.finished:
                    out = self._join_queued(index, out)
                choice = self.choices[index]
                choice.add(out, time.monotonic())
                if all(c.finished for c in self.choices):
                    self.complete = True
                return choice, out
            case Ack():
                self.acked = True
                return None
            case Refusal(kind=kind, message=message, param=param):
                raise ApiError(kind, message, param)
            case Fail(error=error):
                raise error
            case Gone():
                raise ClientGone()
        raise RuntimeError(f"unexpected event {ev!r}")

    def _join_queued(self, index: int, out: RequestOutput) -> RequestOutput:
        """``out`` merged with the queued outputs of choice ``index`` that follow it.

        The other choices' events keep their order; the scan stops at the first event that is
        not a plain output (an error, a failure, a client gone): nothing is moved past it.
        """
        while not self.events.empty():
            self._ahead.append(self.events.get_nowait())
        outs, tokens = [out], len(out.new_token_ids)
        skipped: deque[Event] = deque()
        while self._ahead:
            ev = self._ahead[0]
            if not isinstance(ev, Output) or _failed(ev.output):
                break
            if ev.index != index:
                skipped.append(self._ahead.popleft())
                continue
            nxt = ev.output
            if tokens + len(nxt.new_token_ids) > self.max_tokens_per_event:
                break
            self._ahead.popleft()
            outs.append(nxt)
            tokens += len(nxt.new_token_ids)
            if nxt.finished:
                break
        if skipped:
            skipped.extend(self._ahead)
            self._ahead = skipped
        return merge_outputs(outs)

    def ttft(self, c: Choice) -> float | None:
        """Arrival → first token sent: its first chunk when streaming, its arrival here otherwise."""
        t = c.first_sent_t if c.first_sent_t is not None else c.first_token_t
        return None if t is None else t - self.arrival

    async def outputs(self) -> AsyncIterator[tuple[Choice, Any]]:
        """Every output until all choices finished (acks are skipped)."""
        while not self.complete:
            ev = await self.next_event()
            if ev is not None:
                yield ev


def _failed(out: RequestOutput) -> bool:
    return out.finished and out.finish_reason in ("error", "abort")


class Frontend:
    def __init__(self, server: Any, settings: Settings, state: SharedState, model: ModelInfo):
        self.server, self.settings, self.state, self.model = server, settings, state, model
        self.pending: dict[str, Pending] = {}
        self.rqid = 0
        self.metrics: Any = None
        self.channel: FrontendChannel | None = None
        self._tasks: list[asyncio.Task] = []

    # -- lifecycle (per uvicorn process) ------------------------------------------------------
    async def start(self, app: Any) -> None:
        from service.metrics import Metrics

        self.rqid = app.response_queue_id or 0
        self.metrics = Metrics(self.model.name)
        self.channel = FrontendChannel(self.state.channel_id, self.rqid)
        self._tasks = [
            asyncio.create_task(self._dispatch(self.channel), name="textgen-dispatch"),
            asyncio.create_task(self._watchdog(), name="textgen-watchdog"),
        ]
        freeze_startup_heap()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        self._fail_all(ApiError("unavailable", "the server is shutting down"))
        if self.channel is not None:
            self.channel.close()

    # -- submitting ---------------------------------------------------------------------------
    def submit(self, job: Job, arrival: float) -> Pending:
        """Hand a job to the engine; raises ApiError("unavailable") when it cannot run."""
        self.state.add_inflight(self.rqid, 1)  # before the phase check: a drain sees it
        status = self.state.status()
        if status != "ready":
            self.state.add_inflight(self.rqid, -1)
            raise ApiError("unavailable", f"the server is not ready ({status})")
        p = Pending(job, arrival, self.settings.max_tokens_per_event if job.stream else 1)
        deadline = p.arrival + self.settings.request_timeout_s
        prompts = tuple(job.prompt_of(i) for i in range(len(job.params)))  # shared lists: pickled once
        msg = Submit(self.rqid, job.id, prompts, job.params, p.arrival, deadline)
        self.pending[job.id] = p
        try:
            self.channel.send(msg)
        except Exception as e:  # the channel is closed: we are shutting down
            self.pending.pop(job.id, None)
            self.state.add_inflight(self.rqid, -1)
            raise ApiError("unavailable", "the inference worker is unreachable") from e
        return p

    def finish(self, p: Pending) -> None:
        """End a request (idempotent); abort it in the engine unless it completed."""
        if p.ended:
            return
        p.ended = True
        self.pending.pop(p.job.id, None)
        self.state.add_inflight(self.rqid, -1)
        if not p.complete and self.state.phase in (Phase.SERVING, Phase.DRAINING):
            try:
                self.channel.send(Abort(self.rqid, p.job.id))
            except Exception:
                logger.debug("could not send abort for %s", p.job.id)

    # -- background tasks ---------------------------------------------------------------------
    async def _dispatch(self, channel: FrontendChannel) -> None:
        """Fan the worker's per-step event lists out to the requests they belong to. Messages
        that queued while this process was busy are taken back to back (an await on a waiting
        message does not yield), so the streams then find several steps' outputs at once."""
        while True:
            try:
                events = await channel.receive()
                for ev in events:
                    p = self.pending.get(ev.uid)
                    if p is not None:
                        p.put(ev)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad message must not stop every request's delivery
                logger.exception("dropping a malformed message from the inference worker")

    async def _watchdog(self) -> None:
        """Fail what can no longer finish (worker dead, grace period over); exit if orphaned or
        if event delivery stopped (this process is then restarted with the service)."""
        while True:
            await asyncio.sleep(WATCHDOG_PERIOD_S)
            phase = self.state.phase
            if phase == Phase.DEAD:
                self._fail_all(
                    ApiError("unavailable", "the inference worker died; the service is restarting")
                )
            elif phase == Phase.STOPPING:
                self._fail_all(ApiError("unavailable", "the server is shutting down"))
            if os.getppid() != self.state.main_pid:
                logger.error("the main process is gone; this HTTP process exits")
                self.state.phase = Phase.STOPPING  # the main process, its only writer, is dead
                os.kill(os.getpid(), signal.SIGTERM)
                return
            if phase == Phase.SERVING and self._tasks and self._tasks[0].done():
                logger.error("event delivery from the inference worker stopped: failing pending requests")
                self._fail_all(ApiError("unavailable", "the server lost its inference worker link"))
                await asyncio.sleep(0.5)
                os._exit(1)  # the supervisor sees an HTTP process die: the service restarts

    def _fail_all(self, err: ApiError) -> None:
        for p in list(self.pending.values()):
            p.put(Fail(err))
