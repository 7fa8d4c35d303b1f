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

Prefix cache (optional, service/engine/prefix_cache.py): cached blocks share the same budget, so
``reserved + cached <= kv_budget_tokens`` always. A newcomer's leading blocks found in the cache
are pinned at admission (reported in ``SchedulerOutput.cached``; the engine releases them after
the prefill copied them) and do not count towards ``max_prefill_tokens``. When a newcomer's
reservation does not fit, unpinned cached blocks are evicted (least recently used first) before
admission gives up: a running request is never displaced for the cache's sake.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from service.engine.prefix_cache import BlockIndex
from service.engine.types import InvalidRequestError, QueueFullError


@dataclass(slots=True)
class SchedulerOutput:
    admitted: list[str]  # waiting requests to prefill this step, FIFO order
    aborted: list[str]  # running requests to drop from the batch this step (aborted since last schedule)
    running: list[str]  # requests that stay in the running batch this step (decode), admission order
    # admitted request -> the ids of its leading cached blocks, pinned until the engine releases them
    cached: dict[str, list[int]] = field(default_factory=dict)


@dataclass(slots=True)
class _Request:
    num_prompt_tokens: int
    max_tokens: int
    block_hashes: tuple[bytes, ...] = ()  # the prompt blocks it may take from the prefix cache

    @property
    def need(self) -> int:
        return self.num_prompt_tokens + self.max_tokens


class Scheduler:
    def __init__(self, *, max_running: int, max_waiting: int, kv_budget_tokens: int, max_prefill_tokens: int,
                 prefix_cache: BlockIndex | None = None, block_size: int = 16):
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
        if prefix_cache is not None and block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.prefix_cache, self.block_size = prefix_cache, block_size

    # -- requests in ---------------------------------------------------------------------------

    def add_request(self, request_id: str, num_prompt_tokens: int, max_tokens: int,
                    block_hashes: tuple[bytes, ...] = ()) -> None:
        """Queue a request; ``block_hashes``: its leading prompt blocks to look up in the prefix cache.

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
        req = _Request(num_prompt_tokens, max_tokens, block_hashes if self.prefix_cache is not None else ())
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
        cached: dict[str, list[int]] = {}
        prefill_tokens = 0
        cache = self.prefix_cache
        while self._waiting:
            request_id, req = next(iter(self._waiting.items()))
            if len(self._running) >= self.max_running:
                break  # head-of-line: nobody overtakes the first request that does not fit
            hit = cache.match(req.block_hashes) if cache is not None and req.block_hashes else []
            cost = req.num_prompt_tokens - len(hit) * self.block_size
            if admitted and prefill_tokens + cost > self.max_prefill_tokens:
                break
            if not self._make_room(req.need, hit):
                break
            self._waiting.popitem(last=False)
            self._running[request_id] = req
            self._reserved += req.need
            prefill_tokens += cost
            admitted.append(request_id)
            if hit:
                cached[request_id] = hit
        return SchedulerOutput(admitted=admitted, aborted=aborted, running=running, cached=cached)

    def _make_room(self, need: int, hit: list[int]) -> bool:
        """Whether ``need`` tokens fit next to the reservations, evicting unpinned cached blocks if
        that makes them fit. On success the ``hit`` blocks are pinned (the caller admits)."""
        cache = self.prefix_cache
        if cache is None:
            return self._reserved + need <= self.kv_budget_tokens
        cache.acquire(hit)  # first, so that making room cannot evict the newcomer's own hits
        short = self._reserved + need + self.cached_tokens - self.kv_budget_tokens
        if short > 0 and self._reserved + need + cache.num_pinned * self.block_size <= self.kv_budget_tokens:
            cache.evict(-(-short // self.block_size))
        if self._reserved + need + self.cached_tokens > self.kv_budget_tokens:
            cache.release(hit)
            return False
        return True

    def cache_blocks(self, block_hashes: list[bytes]) -> list[tuple[int, int]]:
        """Make room in the prefix cache for a prefilled prompt's blocks within what the
        reservations leave of the budget (older blocks are evicted, least recently used first).
        Returns (position in block_hashes, block id) of the new blocks, for the engine to fill."""
        if self.prefix_cache is None:
            return []
        room = (self.kv_budget_tokens - self._reserved) // self.block_size
        return self.prefix_cache.insert(block_hashes, room)

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
    def cached_tokens(self) -> int:
        """Tokens held by the prefix cache's blocks (0 without one)."""
        return 0 if self.prefix_cache is None else self.prefix_cache.num_blocks * self.block_size

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
        assert self._reserved + self.cached_tokens <= self.kv_budget_tokens, (self._reserved, self.cached_tokens)
        if self.prefix_cache is not None:
            self.prefix_cache.check_invariants()


def size_kv_budget(*, max_running: int, context_length: int, bytes_per_token: int, cache_bytes: int,
                   tokens: int = 0) -> int:
    """The cached-token budget: ``tokens`` when given (TEXTGEN_KV_BUDGET_TOKENS); otherwise the tokens
    ``cache_bytes`` holds at the model's ``bytes_per_token``, and never more than ``max_running`` full
    contexts (more could not be used). At least 1.
    """
    if tokens > 0:
        return tokens
    return max(1, min(max_running * context_length, cache_bytes // max(1, bytes_per_token)))
