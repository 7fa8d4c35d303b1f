"""The HTTP process's side of the engine: submit jobs, route events back, abort, fail, observe.

One ``Frontend`` exists per uvicorn process (created in the main process, started in each
forked uvicorn process by the app's lifespan). It talks to the inference worker through
LitServe's own queues: jobs go on LitServe's request queue (FIFO, shared by all HTTP
processes), events come back through LitServe's transport into LitServe's response buffer
under one mailbox key per process, from which ``_dispatch`` hands them to the waiting requests.

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
from typing import Any

from litserve.utils import LitAPIStatus, ResponseBufferItem

from service.engine_loop import ENGINE_PATH, MAILBOX, Abort, Submit
from service.errors import ApiError
from service.serving import Choice, Job, ModelInfo
from service.settings import Settings
from service.shared_state import Phase, SharedState

logger = logging.getLogger(__name__)

WATCHDOG_PERIOD_S = 0.1


class ClientGone(Exception):
    """The client closed the connection."""


class Pending:
    """One submitted job, as seen by the HTTP handler answering it."""

    def __init__(self, job: Job, arrival: float):
        self.job = job
        self.arrival = arrival  # time.monotonic() when the HTTP request arrived
        self.events: asyncio.Queue[tuple] = asyncio.Queue()
        self.choices = [Choice(i) for i in range(len(job.params))]
        self.complete = False  # every choice finished
        self.ended = False  # finish() ran
        self.acked = False  # the engine accepted it
        self.error: ApiError | None = None

    def put(self, event: tuple) -> None:
        self.events.put_nowait(event)

    async def next_event(self) -> tuple:
        """The next event: ("ack",) | ("out", Choice, RequestOutput); raises ApiError or ClientGone."""
        ev = await self.events.get()
        kind = ev[0]
        if kind == "out":
            _, _, index, out = ev
            if out.finished and out.finish_reason in ("error", "abort"):
                raise ApiError(
                    "generation_error", out.error or f"the engine ended the request ({out.finish_reason})"
                )
            choice = self.choices[index]
            choice.add(out, time.monotonic())
            if all(c.finished for c in self.choices):
                self.complete = True
            return ("out", choice, out)
        if kind == "ack":
            self.acked = True
            return ("ack",)
        if kind == "err":
            _, _, err_kind, message, param = ev
            raise ApiError(err_kind, message, param)
        if kind == "fail":
            raise ev[1]
        if kind == "gone":
            raise ClientGone()
        raise RuntimeError(f"unexpected event {kind!r}")

    async def outputs(self) -> AsyncIterator[tuple[Choice, Any]]:
        """Every output until all choices finished (acks are skipped)."""
        while not self.complete:
            ev = await self.next_event()
            if ev[0] == "out":
                yield ev[1], ev[2]


class Frontend:
    def __init__(self, server: Any, settings: Settings, state: SharedState, model: ModelInfo):
        self.server, self.settings, self.state, self.model = server, settings, state, model
        self.pending: dict[str, Pending] = {}
        self.rqid = 0
        self.metrics: Any = None
        self._tasks: list[asyncio.Task] = []
        self._delivery: asyncio.Task | None = None

    # -- lifecycle (per uvicorn process) ------------------------------------------------------
    async def start(self, app: Any) -> None:
        from service.metrics import Metrics

        self.rqid = app.response_queue_id or 0
        self.metrics = Metrics(self.model.name)
        mailbox = ResponseBufferItem(event=asyncio.Event(), response_queue=deque())
        self.server.response_buffer[MAILBOX] = mailbox
        self._tasks = [
            asyncio.create_task(self._dispatch(mailbox), name="textgen-dispatch"),
            asyncio.create_task(self._watchdog(), name="textgen-watchdog"),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        self._fail_all(ApiError("unavailable", "the server is shutting down"))

    # -- submitting ---------------------------------------------------------------------------
    def submit(self, job: Job, arrival: float) -> Pending:
        """Hand a job to the engine; raises ApiError("unavailable") when it cannot run."""
        self.state.add_inflight(self.rqid, 1)  # before the phase check: a drain sees it
        status = self.state.status()
        if status != "ready":
            self.state.add_inflight(self.rqid, -1)
            raise ApiError("unavailable", f"the server is not ready ({status})")
        p = Pending(job, arrival)
        deadline = p.arrival + self.settings.request_timeout_s
        msg = Submit(job.prompt_ids, job.params, p.arrival, deadline)
        self.pending[job.id] = p
        try:
            self._queue().put((self.rqid, job.id, p.arrival, msg))
        except Exception as e:  # the manager is gone: we are shutting down
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
                self._queue().put((self.rqid, p.job.id, time.monotonic(), Abort(p.job.id)))
            except Exception:
                logger.debug("could not send abort for %s", p.job.id)

    def _queue(self) -> Any:
        return self.server._get_request_queue(ENGINE_PATH)

    # -- background tasks ---------------------------------------------------------------------
    async def _dispatch(self, mailbox: ResponseBufferItem) -> None:
        """Fan the worker's per-step event lists out to the requests they belong to."""
        while True:
            await mailbox.event.wait()
            mailbox.event.clear()
            while mailbox.response_queue:
                try:
                    events, status = mailbox.response_queue.popleft()
                    if status != LitAPIStatus.OK:
                        continue
                    for ev in events:
                        p = self.pending.get(ev[1])
                        if p is not None:
                            p.put(ev)
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
            if phase == Phase.SERVING and not self._delivery_alive():
                logger.error("LitServe's response task stopped: failing pending requests and exiting")
                self._fail_all(ApiError("unavailable", "the server lost its inference worker link"))
                await asyncio.sleep(0.5)
                os._exit(1)  # the supervisor sees an HTTP process die: the service restarts

    def _delivery_alive(self) -> bool:
        """Whether LitServe's task that moves worker messages into the response buffer runs."""
        if self._delivery is None:
            name = f"response_queue_to_buffer-{self.rqid}"
            self._delivery = next((t for t in asyncio.all_tasks() if t.get_name() == name), None)
        return self._delivery is None or not self._delivery.done()

    def _fail_all(self, err: ApiError) -> None:
        for p in list(self.pending.values()):
            p.put(("fail", err))
