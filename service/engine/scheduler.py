"""A pure continuous-batching scheduler: no model, no I/O, no threads, no clock.

The engine calls ``schedule()`` once per step. Each step it learns which waiting requests to
prefill (``admitted``), which running ones to drop (``aborted``) and which keep decoding
(``running``). It reports ends with ``finish()``.

Memory: every admitted request reserves ``num_prompt_tokens + max_tokens`` cached tokens of
``kv_budget_tokens`` until it finishes or its abort is reported, so an admitted sequence never
needs preemption.

Admission is strict FIFO with head-of-line blocking: the first waiting request that does not
fit (slots or budget) stops admission, so a big request is never overtaken by smaller ones.
Prefill interleaving: one step admits newcomers only while their prompt tokens sum to at most
``max_prefill_tokens``, but always at least one if it fits otherwise, so a long prompt cannot
starve and running streams get a decode step every call.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from service.engine.types import InvalidRequestError, QueueFullError


@dataclass(slots=True)
class SchedulerOutput:
    admitted: list[str]  # waiting requests to prefill this step, FIFO order
    aborted: list[str]  # running requests to drop from the batch this step (aborted since last schedule)
    running: list[str]  # requests that stay in the running batch this step (decode), admission order


@dataclass(slots=True)
class _Request:
    num_prompt_tokens: int
    max_tokens: int

    @property
    def need(self) -> int:
        return self.num_prompt_tokens + self.max_tokens


class Scheduler:
    def __init__(self, *, max_running: int, max_waiting: int, kv_budget_tokens: int, max_prefill_tokens: int):
        for name, value in (
            ("max_running", max_running),
            ("max_waiting", max_waiting),
            ("kv_budget_tokens", kv_budget_tokens),
            ("max_prefill_tokens", max_prefill_tokens),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.kv_budget_tokens = kv_budget_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self._waiting: OrderedDict[str, _Request] = OrderedDict()  # FIFO
        self._running: dict[str, _Request] = {}  # admission order; includes aborts not yet reported
        self._aborting: dict[str, None] = {}  # running ids aborted since the last schedule(), in order
        self._reserved = 0

    # -- requests in ---------------------------------------------------------------------------

    def add_request(self, request_id: str, num_prompt_tokens: int, max_tokens: int) -> None:
        """Queue a request.

        Raises:
            InvalidRequestError: duplicate id, non-positive sizes, or a request larger than the whole budget.
            QueueFullError: ``max_waiting`` requests already wait.
        """
        if request_id in self._waiting or request_id in self._running:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if num_prompt_tokens < 1:
            raise InvalidRequestError(f"num_prompt_tokens must be >= 1, got {num_prompt_tokens}")
        if max_tokens < 0:  # 0: a scoring request, which ends at its prefill
            raise InvalidRequestError(f"max_tokens must be >= 0, got {max_tokens}")
        req = _Request(num_prompt_tokens, max_tokens)
        if req.need > self.kv_budget_tokens:
            raise InvalidRequestError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {req.need} exceeds "
                f"the KV cache budget of {self.kv_budget_tokens} tokens"
            )
        if len(self._waiting) >= self.max_waiting:
            raise QueueFullError(self.max_waiting)
        self._waiting[request_id] = req

    def abort(self, request_id: str) -> bool:
        """Abort a request. Returns False when the id is unknown, finished or already aborted.

        A waiting request is removed at once; a running one keeps its slot and reservation until
        the next ``schedule()``, which reports it in ``aborted`` so the engine drops it from the batch.
        """
        if self._waiting.pop(request_id, None) is not None:
            return True
        if request_id in self._running and request_id not in self._aborting:
            self._aborting[request_id] = None
            return True
        return False

    def finish(self, request_id: str) -> None:
        """The engine says a running sequence ended: free its slot and reservation at once."""
        req = self._running.pop(request_id, None)
        if req is None:
            raise ValueError(f"finish: request {request_id!r} is not running")
        self._reserved -= req.need
        self._aborting.pop(request_id, None)  # it ended on its own before its abort was reported

    # -- one step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """One step: release reported aborts, then admit waiting requests (FIFO, head-of-line)."""
        aborted, self._aborting = list(self._aborting), {}
        for request_id in aborted:
            self._reserved -= self._running.pop(request_id).need
        running = list(self._running)

        admitted: list[str] = []
        prefill_tokens = 0
        while self._waiting:
            request_id, req = next(iter(self._waiting.items()))
            if len(self._running) >= self.max_running or self._reserved + req.need > self.kv_budget_tokens:
                break  # head-of-line: nobody overtakes the first request that does not fit
            if admitted and prefill_tokens + req.num_prompt_tokens > self.max_prefill_tokens:
                break
            self._waiting.popitem(last=False)
            self._running[request_id] = req
            self._reserved += req.need
            prefill_tokens += req.num_prompt_tokens
            admitted.append(request_id)
        return SchedulerOutput(admitted=admitted, aborted=aborted, running=running)

    # -- state ---------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        """Sequences holding a slot, including aborted ones not yet reported by ``schedule()``."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def reserved_tokens(self) -> int:
        return self._reserved

    @property
    def kv_usage(self) -> float:
        """Reserved fraction of the cached-token budget, 0..1."""
        return self._reserved / self.kv_budget_tokens

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def check_invariants(self) -> None:
        """Assert that the bookkeeping is consistent (tests and debug mode)."""
        assert not self._waiting.keys() & self._running.keys(), "a request is both waiting and running"
        assert len(self._waiting) <= self.max_waiting, (len(self._waiting), self.max_waiting)
        assert len(self._running) <= self.max_running, (len(self._running), self.max_running)
        assert self._reserved == sum(r.need for r in self._running.values()), self._reserved
        assert 0 <= self._reserved <= self.kv_budget_tokens, (self._reserved, self.kv_budget_tokens)
        assert self._aborting.keys() <= self._running.keys(), "an aborted request is not running"


def size_kv_budget(*, max_running: int, context_length: int, bytes_per_token: int, cache_bytes: int,
                   tokens: int = 0) -> int:
    """The cached-token budget: ``tokens`` when given (TEXTGEN_KV_BUDGET_TOKENS); otherwise the tokens
    ``cache_bytes`` holds at the model's ``bytes_per_token``, and never more than ``max_running`` full
    contexts (more could not be used). At least 1.
    """
    if tokens > 0:
        return tokens
    return max(1, min(max_running * context_length, cache_bytes // max(1, bytes_per_token)))
