"""The main process: LitServe's server, with start-up, drain and worker-death handling fixed.

Processes (all started by ``LitServer.run``): a multiprocessing Manager (LitServe's queues), one
spawned inference worker (service.process.worker), ``TEXTGEN_HTTP_WORKERS`` forked uvicorn processes
(service.http.api). The main process only supervises. What this subclass changes in LitServe:

- SIGTERM and SIGINT start a drain: phase "draining" (/ready → 503, new generation requests →
  503), running requests finish for up to TEXTGEN_DRAIN_TIMEOUT_S, then phase "stopping"
  (leftovers get 503 or an SSE error) and LitServe's shutdown stops every child process; the
  main process exits 0. A second signal skips the wait. LitServe alone dies on SIGTERM leaving
  its children serving. Children ignore SIGINT (a terminal's Ctrl+C reaches the whole process
  group) so that the drain is the main process's decision.
- Worker death: a supervisor thread checks the children every 0.1 s. If the inference worker
  (or an HTTP process) dies, the phase becomes "dead" at once (/ready → 503, pending requests
  fail with 503 or an SSE error), and the service shuts down and exits with status 1 so that
  the orchestrator restarts it. LitServe's monitor would restart nothing (restart_workers is
  off) and keep the process alive in a broken state.
- Start-up: a worker that dies while loading the model is reported at once (LitServe waits
  forever for a worker that crashed before reporting).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from multiprocessing.managers import SyncManager
from typing import Any

import litserve as ls
import litserve.server
import uvicorn
from litserve.server import _Server
from litserve.transport.process_transport import MPQueueTransport
from litserve.utils import WorkerSetupStatus

from service.process.shared_state import Phase, SharedState, child_signal_handlers
from service.settings import Settings

logger = logging.getLogger(__name__)

SUPERVISE_PERIOD_S = 0.1
FAIL_FLUSH_S = 0.5  # after "dead"/"stopping": time for HTTP processes to answer what is pending
UVICORN_GRACE_S = 3  # uvicorn's own graceful shutdown, once no generation request is left


class StartupAborted(Exception):
    """A stop signal arrived while the model was loading."""


class _HttpServer(_Server):
    """A uvicorn server for a forked HTTP process, with child_signal_handlers."""

    state: SharedState

    @contextlib.contextmanager
    def capture_signals(self):
        child_signal_handlers(self.state, lambda: self.handle_exit(signal.SIGTERM, None))
        yield


def _manager_init(parent_pid: int) -> None:
    """In LitServe's Manager process: signals are the main process's business; exit with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="textgen-orphan-watch", daemon=True).start()


class TextGenServer(ls.LitServer):
    def __init__(self, api: ls.LitAPI, settings: Settings, state: SharedState):
        super().__init__(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=False)
        self.settings, self.state = settings, state
        self.exit_code = 0
        self.uvicorn_graceful_timeout = UVICORN_GRACE_S
        self._stop_requested = threading.Event()
        self._force = threading.Event()

    # -- signals and drain --------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._stop_requested.is_set():
            logger.warning("%s again: stopping without waiting for running requests", name)
            self._force.set()
            return
        self._stop_requested.set()
        threading.Thread(target=self._drain, args=(name,), name="textgen-drain", daemon=True).start()

    def _drain(self, signame: str) -> None:
        timeout = self.settings.drain_timeout_s
        if self.state.phase == Phase.SERVING:
            self.state.phase = Phase.DRAINING
            logger.info(
                "%s: draining (up to %.0f s for %d running requests)", signame, timeout, self.state.inflight()
            )
            deadline = time.monotonic() + timeout
            while self.state.inflight() > 0 and time.monotonic() < deadline and not self._force.is_set():
                time.sleep(0.05)
            left = self.state.inflight()
            if left:
                logger.warning("drain timeout: %d requests still running are failed", left)
        self._shutdown(Phase.STOPPING, exit_code=0)

    def _shutdown(self, phase: Phase, exit_code: int) -> None:
        if self.state.phase in (Phase.STOPPING, Phase.DEAD):
            return
        self.state.phase = phase
        self.exit_code = exit_code
        if self.state.inflight() > 0:
            time.sleep(FAIL_FLUSH_S)
        while self._shutdown_event is None:  # a signal during LitServer.run's first lines
            time.sleep(0.05)
        self._shutdown_event.set()  # LitServer.run wakes up and stops every child process

    # -- start-up -----------------------------------------------------------------------------
    def _init_manager(self, num_api_servers: int):
        """LitServe's, but its Manager process ignores our signals and exits if orphaned. LitServe's
        queues stay for its own bookkeeping; requests and events travel over service.process.wire."""
        manager = SyncManager()
        manager.start(_manager_init, (os.getpid(),))
        self.transport_config.manager = manager
        self.transport_config.num_consumers = num_api_servers
        self.workers_setup_status = manager.dict()
        self._shutdown_event = manager.Event()
        for lit_api in self.litapi_connector:
            self.litapi_request_queues[lit_api.api_path] = manager.Queue()
        self._transport = MPQueueTransport(manager, [manager.Queue() for _ in range(num_api_servers)])
        return manager

    def verify_worker_status(self) -> None:
        """Wait until the inference worker has loaded the engine; fail fast if it cannot."""
        while True:
            statuses = list(self.workers_setup_status.values())
            if any(s == WorkerSetupStatus.READY for s in statuses):
                return
            if any(s == WorkerSetupStatus.ERROR for s in statuses):
                raise RuntimeError("the inference worker failed to load the engine (see the error above)")
            for proc in self.inference_workers:
                if not proc.is_alive():
                    raise RuntimeError(
                        f"the inference worker exited with code {proc.exitcode} while starting"
                    )
            if self._stop_requested.is_set():
                raise StartupAborted()
            time.sleep(0.05)

    def _start_server(self, port, num_uvicorn_servers, log_level, sockets, uvicorn_worker_type, **kwargs):
        """LitServe's, with our uvicorn subclass (signals) and forked processes only."""
        workers = {}
        for rqid in range(num_uvicorn_servers):
            self.app.response_queue_id = rqid
            if litserve.server._MCP_AVAILABLE:  # as LitServe does: its lifespan expects it
                from litserve.mcp import _LitMCPServerConnector

                self.mcp_server = _LitMCPServerConnector()
                self.mcp_server.connect_mcp_server(self.litapi_connector.get_mcp_tools(), self.app)
            app = copy.copy(self.app)
            config = uvicorn.Config(
                app=app,
                host=self.settings.host,
                port=port,
                log_level=log_level,
                timeout_keep_alive=self.settings.keep_alive_s,  # uvicorn's 5 s races clients' pools
                timeout_graceful_shutdown=self.uvicorn_graceful_timeout,
                **kwargs,
            )
            server = _HttpServer(config=config)
            server.state = self.state
            w = mp.get_context("fork").Process(
                target=server.run, args=(rqid, sockets), name=f"textgen-http-{rqid}"
            )
            w.start()
            workers[rqid] = w
        return workers

    # -- supervision --------------------------------------------------------------------------
    def _start_worker_monitoring(self, manager: Any, uvicorn_workers: dict) -> None:
        """Called by LitServer.run once everything runs: start serving and supervising."""
        if not self._stop_requested.is_set():
            self.state.phase = Phase.SERVING
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "::") else self.settings.host
        url = f"http://{host}:{self.settings.http_port}"
        logger.info(
            "serving on %s — try:\n  curl %s/v1/completions -H 'Content-Type: application/json' "
            "-d '{\"prompt\": \"ROMEO.\\n\", \"max_tokens\": 48, \"temperature\": 0.8}'",
            url,
            url,
        )
        threading.Thread(
            target=self._supervise, args=(uvicorn_workers,), name="textgen-supervisor", daemon=True
        ).start()

    def _supervise(self, uvicorn_workers: dict) -> None:
        children = [("inference worker", p) for p in self.inference_workers]
        children += [("HTTP process", p) for p in uvicorn_workers.values()]
        while self.state.phase not in (Phase.STOPPING, Phase.DEAD):
            for what, proc in children:
                if not proc.is_alive() and self.state.phase not in (Phase.STOPPING, Phase.DEAD):
                    self._child_died(what, proc)
                    return
            time.sleep(SUPERVISE_PERIOD_S)

    def _child_died(self, what: str, proc: Any) -> None:
        logger.error(
            "%s %s (pid %s) exited with code %s: failing pending requests and exiting with status 1 "
            "so that the service is restarted",
            what,
            proc.name,
            proc.pid,
            proc.exitcode,
        )
        from service.metrics import mark_process_dead

        mark_process_dead(proc.pid)
        self._shutdown(Phase.DEAD, exit_code=1)
