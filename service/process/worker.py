"""The inference worker: LitServe's worker process runs the engine's continuous batching here.

``TextGenAPI.setup`` builds the engine in LitServe's spawned inference worker, and LitServe then
hands control to ``EngineLoop.run``, a loop of our own that replaces LitServe's
ContinuousBatchingLoop and fixes its faults:

- one thread owns the engine: requests, aborts and steps are serialized on it;
- idle, it blocks on the request queue (with a timeout), it never spins;
- every request is handed to the engine as soon as it arrives, so nothing waits outside the
  engine's own bounded FIFO queue (no admission delay, no overtaking); a full queue is the
  engine's ``QueueFullError``, answered as HTTP 429;
- an ``Abort`` (client gone) is applied before the next step;
- every request carries its deadline (arrival + TEXTGEN_REQUEST_TIMEOUT_S); past it the engine
  finishes it with ``finish_reason="length"``; one still waiting for a slot a second later is
  aborted here and finished the same way.

Messages in and out are service.process.wire's (Unix sockets, not LitServe's queues): in, one
``Submit`` or ``Abort`` per request or abort, FIFO; out, per engine iteration, one list of
``Ack`` / ``Output`` / ``Refusal`` per HTTP process. Each choice of a request is one engine
request, named by the worker (``_Active.engine_ids``); outputs are routed back by that name.
"""

from __future__ import annotations

import heapq
import importlib
import logging
import os
import sys
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Protocol

import litserve as ls
from litserve.loops.base import LitLoop

from service.engine import finishing
from service.engine.types import (
    QueueFullError,
    RequestOutput,
    StepStats,
)
from service.http.errors import engine_refusal
from service.process.heap import freeze_startup_heap
from service.process.shared_state import SharedState, child_signal_handlers
from service.process.wire import Abort, Ack, EngineChannel, Output, Refusal, Submit, ToFrontend, ToWorker
from service.settings import LOG_FORMAT, Settings

__all__ = ["EngineWorker", "TextGenAPI"]

logger = logging.getLogger(__name__)

ENGINE_PATH = "/_textgen/engine"  # LitServe's api path for the worker; it has no HTTP route
IDLE_WAIT_S = 0.5  # idle: how long one blocking receive waits
MAX_INTAKE = 1024  # messages taken from the channel per iteration
EXPIRY_GRACE_S = 1.0  # after a request's deadline, before the loop (not the engine) finishes it
# While the engine is busy, its step metrics and the heartbeat (with the load gauges) are published
# at most this often: one by one they cost ~35 µs a step, 4-5% of a decode step at batch 1. When it
# is idle they are published at once, so what a scrape or /health reads is exact whenever nothing
# runs and at most this old while something does (Prometheus scrapes every few seconds).
PUBLISH_EVERY_S = 0.05


def import_string(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class TextGenAPI(ls.LitAPI):
    """Owns the engine inside LitServe's inference worker."""

    def __init__(self, settings: Settings, state: SharedState, model_name: str):
        super().__init__(max_batch_size=1, stream=True, api_path=ENGINE_PATH, loop=EngineLoop())
        self.settings, self.state, self.model_name = settings, state, model_name

    def setup(self, device: str) -> None:
        child_signal_handlers(self.state, lambda: os._exit(0))
        logging.basicConfig(level=self.settings.log_level.upper(), format=LOG_FORMAT)
        from bundle.format import load_bundle
        from service.metrics import Metrics

        s = self.settings
        bundle = load_bundle(s.model_dir, verify_hashes=False)  # the main process verified it
        self.engine = import_string(s.engine_class)(bundle, s.engine_config())
        self.metrics = Metrics(self.model_name)
        self.metrics.set_model_info(
            parameters=self.engine.num_parameters,
            provider=self.engine.provider,
            waiting_capacity=s.max_waiting,
        )
        # Listening before LitServe reports this worker ready: HTTP processes start after that and connect at once.
        self.channel = EngineChannel(self.state.channel_id)
        freeze_startup_heap()
        logger.info("engine ready on %s (pid %d)", self.engine.provider, os.getpid())

    def predict(self, x: Any) -> Any:  # LitAPI's abstract hook; EngineLoop never calls it
        raise NotImplementedError

    def has_active_requests(self) -> bool:
        return self.engine.has_unfinished()


class EngineLoop(LitLoop):
    """LitServe loop hook: ``run`` serves until the main process goes away."""

    def run(self, lit_api: TextGenAPI, device, worker_id, request_queue, transport, *args, **kwargs) -> None:
        # LitServe's request queue and transport go unused: our own channel replaces them.
        channel = lit_api.channel
        try:
            EngineWorker(lit_api, channel).serve()
        finally:
            channel.close()
        sys.exit(0)


class Channel(Protocol):
    """What the worker needs of its channel (service.process.wire.EngineChannel; tests use a fake)."""

    def receive(self, timeout_s: float, max_messages: int) -> list[ToWorker]: ...

    def send(self, rqid: int, events: list[ToFrontend]) -> None: ...


@dataclass
class _Active:
    """A submitted HTTP request while any of its choices is unfinished."""

    rqid: int  # the HTTP process answering it
    uid: str
    engine_ids: list[str]  # the engine's request id of each choice
    num_prompt: list[int]  # prompt tokens, per choice
    unfinished: set[int]  # choice indices
    counts: list[int]  # output tokens so far, per choice


def engine_id(uid: str, index: int) -> str:
    """The engine's name for choice ``index`` of request ``uid`` (unique while the request runs)."""
    return f"{uid}#{index}"


class EngineWorker:
    def __init__(self, api: TextGenAPI, channel: Channel):
        self.engine, self.metrics, self.state = api.engine, api.metrics, api.state
        self.channel = channel
        self.active: dict[str, _Active] = {}
        self.choice_of: dict[str, tuple[_Active, int]] = {}  # engine request id -> (request, choice)
        self.outbox: dict[int, list[ToFrontend]] = defaultdict(list)
        self.deadlines: list[tuple[float, str]] = []  # heap of (deadline + grace, uid)
        self.deferred: deque[tuple[ToWorker, bool]] = deque()  # (message, retried) for the next iteration
        self.max_running = api.settings.max_running
        self._published: tuple | None = None  # engine gauges last sent to metrics
        self._last_stats: StepStats | None = None
        self._unpublished: list[StepStats] = []  # steps not yet in the metrics
        self._last_publish = float("-inf")  # time.monotonic() of the last heartbeat

    # -- main loop ----------------------------------------------------------------------------
    def serve(self) -> None:
        parent = os.getppid()
        while os.getppid() == parent:  # the main process died: exit rather than linger
            idle = not self.engine.has_unfinished() and not self.deferred
            items = self.channel.receive(IDLE_WAIT_S if idle else 0.0, MAX_INTAKE)
            self._handle_all(items)
            self._expire(time.monotonic())
            # Acks and refusals leave before the step: an HTTP process answers the status line and
            # headers of a stream while the prefill runs, not after it (TTFT at one client -1 ms).
            self._flush()
            if self.engine.has_unfinished():
                self._step()
            self._beat()

    def _handle_all(self, items: list[ToWorker]) -> None:
        """Messages deferred by the last iteration first, then the new ones, in order (FIFO)."""
        batch = [*self.deferred, *((item, False) for item in items)]
        self.deferred.clear()
        for k, (item, retried) in enumerate(batch):
            if not self._handle(item, retried):
                self.deferred.append((item, True))
                self.deferred.extend(batch[k + 1 :])  # what came after it waits too: no overtaking
                return

    def _handle(self, msg: ToWorker, retried: bool = False) -> bool:
        """Apply one message; False: retry it after the next step (see _submit)."""
        if isinstance(msg, Submit):
            return self._submit(msg, retried)
        if isinstance(msg, Abort):
            self._abort(msg.uid)
        else:
            logger.warning("ignoring unexpected message %r", type(msg).__name__)
        return True

    def _submit(self, msg: Submit, retried: bool = False) -> bool:
        """Add a request's choices to the engine; False when it should be retried after a step.

        The engine counts a new request as waiting until its next step moves waiting requests
        into free running slots, so a burst larger than TEXTGEN_MAX_WAITING would be refused
        at an idle server. A request refused for a full queue while running slots are free is
        therefore retried once, after the next step; refused again, it gets its 429.
        """
        uid, n = msg.uid, len(msg.params)
        ids = [engine_id(uid, i) for i in range(n)]
        for i, params in enumerate(msg.params):
            try:
                self.engine.add_request(ids[i], msg.prompts[i], params, arrival_time=msg.arrival,
                                        deadline=msg.deadline)
            except Exception as e:
                for j in range(i):
                    self.engine.abort(ids[j])
                if (
                    isinstance(e, QueueFullError)
                    and not retried
                    and self.engine.load().num_running < self.max_running
                ):
                    return False
                self.outbox[msg.rqid].append(Refusal(uid, *_classify(e)))
                return True
        act = _Active(msg.rqid, uid, ids, [len(p) for p in msg.prompts], set(range(n)), [0] * n)
        self.active[uid] = act
        self.choice_of.update((eid, (act, i)) for i, eid in enumerate(ids))
        heapq.heappush(self.deadlines, (msg.deadline + EXPIRY_GRACE_S, uid))
        self.outbox[msg.rqid].append(Ack(uid))
        return True

    def _forget(self, act: _Active) -> None:
        del self.active[act.uid]
        for eid in act.engine_ids:
            self.choice_of.pop(eid, None)

    def _abort(self, uid: str) -> None:
        act = self.active.get(uid)
        if act is not None:
            self._forget(act)
            for i in act.unfinished:
                self.engine.abort(act.engine_ids[i])

    def _expire(self, now: float) -> None:
        """Backstop of the engine's deadline, which it checks on running requests only: a request
        still unfinished EXPIRY_GRACE_S after its deadline (e.g. it waited in the queue all
        along) is aborted and finished with finish_reason "length"."""
        while self.deadlines and self.deadlines[0][0] <= now:
            _, uid = heapq.heappop(self.deadlines)
            act = self.active.get(uid)
            if act is None:
                continue
            self._forget(act)
            for i in sorted(act.unfinished):
                self.engine.abort(act.engine_ids[i])
                out = RequestOutput(
                    request_id=act.engine_ids[i],
                    new_token_ids=[],
                    text_delta="",
                    finished=True,
                    finish_reason=finishing.DEADLINE.reason,
                    stop_reason=finishing.DEADLINE.stop_reason,
                    num_prompt_tokens=act.num_prompt[i],
                    num_output_tokens=act.counts[i],
                )
                self.outbox[act.rqid].append(Output(uid, i, out))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            logger.exception("engine step failed; failing every request and exiting")
            for uid, act in self.active.items():
                self.outbox[act.rqid].append(Refusal(uid, "generation_error", "the engine failed"))
            self._flush()
            os._exit(1)  # the supervisor sees the worker die: /ready 503, exit non-zero
        for out in outputs:
            found = self.choice_of.get(out.request_id)
            if found is None:  # aborted meanwhile
                continue
            act, i = found
            act.counts[i] = out.num_output_tokens
            self.outbox[act.rqid].append(Output(act.uid, i, out))
            if out.finished:
                act.unfinished.discard(i)
                if not act.unfinished:
                    self._forget(act)
        self._flush()
        stats = self.engine.last_step_stats
        if stats is not None and stats is not self._last_stats:  # a failed step sets none
            self._last_stats = stats
            self._unpublished.append(stats)

    def _beat(self) -> None:
        """The heartbeat, the load gauges and the steps' metrics: at once when the engine is
        idle, else at most every PUBLISH_EVERY_S."""
        now = time.monotonic()
        if self.engine.has_unfinished() and now - self._last_publish < PUBLISH_EVERY_S:
            return
        self._last_publish = now
        gauges = tuple(self.engine.load())
        self.state.beat(os.getpid(), *gauges)
        if self._unpublished:
            last = self._unpublished[-1]
            self.metrics.observe_steps(self._unpublished)
            self._unpublished = []
            self._published = (last.num_running, last.num_waiting, last.kv_cache_usage)
        if gauges != self._published:  # e.g. aborts emptied the batch without a step
            self.metrics.set_load(*gauges)
            self._published = gauges

    def _flush(self) -> None:
        for rqid, events in self.outbox.items():
            if events:
                self.channel.send(rqid, events)
        self.outbox.clear()


def _classify(e: Exception) -> tuple[str, str, str | None]:
    """(error kind, message, param) of an engine refusal; see service.http.errors.STATUS."""
    err = engine_refusal(e)
    if err.kind == "internal":
        logger.error("engine.add_request failed", exc_info=e)
    return err.kind, err.message, err.param
