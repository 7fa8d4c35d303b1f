"""A few numbers shared by every process of the service, in one lock-free shared-memory array.

Created by the main process before it starts anything; the inference worker (spawned) gets it
pickled with the LitAPI, the uvicorn processes (forked) inherit it. Each slot has one writer:

- the main process writes ``phase`` (starting → serving → draining → stopping, or dead);
- the inference worker writes its heartbeat, pid and the engine gauges after every iteration;
- HTTP process ``i`` writes ``inflight[i]``, the generation requests it is answering.

Aligned 8-byte stores are atomic on the platforms we run on, so readers see whole values.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import time
from collections.abc import Callable
from enum import IntEnum
from typing import Any

from service.process.wire import new_channel_id

logger = logging.getLogger(__name__)


class Phase(IntEnum):
    STARTING = 0  # the engine is loading
    SERVING = 1
    DRAINING = 2  # SIGTERM/SIGINT: no new requests, running ones finish
    STOPPING = 3  # the grace period is over: whatever still runs is failed, processes exit
    DEAD = 4  # the inference worker died: everything pending fails, the service exits non-zero


# A worker that has not finished an iteration for this long is not "stepping" (/ready → 503).
HEARTBEAT_STALE_S = 10.0

_PHASE, _HEARTBEAT, _WORKER_PID, _RUNNING, _WAITING, _KV, _MAIN_PID = range(7)
_INFLIGHT = 7


class SharedState:
    def __init__(self, http_workers: int, main_pid: int):
        self.http_workers = http_workers
        self.channel_id = new_channel_id()  # names the sockets between the processes (service.process.wire)
        self._a = mp.get_context("spawn").RawArray("d", _INFLIGHT + http_workers)
        self._a[_MAIN_PID] = main_pid

    @property
    def phase(self) -> Phase:
        return Phase(int(self._a[_PHASE]))

    @phase.setter
    def phase(self, value: Phase) -> None:
        self._a[_PHASE] = int(value)

    @property
    def main_pid(self) -> int:
        return int(self._a[_MAIN_PID])

    # -- written by the inference worker ------------------------------------------------------
    def beat(self, pid: int, running: int, waiting: int, kv_cache_usage: float) -> None:
        a = self._a
        a[_WORKER_PID], a[_RUNNING], a[_WAITING], a[_KV] = pid, running, waiting, kv_cache_usage
        a[_HEARTBEAT] = time.monotonic()

    def heartbeat_age(self) -> float:
        """Seconds since the worker's last iteration; infinite before its first."""
        last = self._a[_HEARTBEAT]
        return float("inf") if last == 0 else time.monotonic() - last

    def engine_gauges(self) -> dict[str, float]:
        a = self._a
        return {"running": int(a[_RUNNING]), "waiting": int(a[_WAITING]), "kv_cache_usage": a[_KV]}

    # -- written by the HTTP processes --------------------------------------------------------
    def add_inflight(self, slot: int, delta: int) -> None:
        self._a[_INFLIGHT + slot] += delta

    def inflight(self) -> int:
        return int(sum(self._a[_INFLIGHT : _INFLIGHT + self.http_workers]))

    def status(self) -> str:
        """What /ready reports: "ready" or why not."""
        phase = self.phase
        if phase != Phase.SERVING:
            return phase.name.lower()
        if self.heartbeat_age() > HEARTBEAT_STALE_S:
            return "starting" if self._a[_HEARTBEAT] == 0 else "stalled"
        return "ready"


def child_signal_handlers(state: SharedState, on_exit: Callable[[], None]) -> None:
    """Signals in a child process (HTTP process or inference worker).

    SIGINT is ignored: a terminal's Ctrl+C reaches the whole process group, and the drain is the
    main process's decision. SIGTERM is ignored while the service serves or drains (``timeout``,
    ``systemd`` and some init systems signal every process of the group at once), and ends the
    child otherwise: the main process sends it once the phase is "stopping" or "dead".
    """

    def on_sigterm(signum: int, frame: Any) -> None:
        if state.phase in (Phase.SERVING, Phase.DRAINING):
            logger.info("SIGTERM ignored: the main process stops this process after the drain")
            return
        on_exit()

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_sigterm)
