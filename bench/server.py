"""A server as a subprocess on an ephemeral 127.0.0.1 port: the one start-up harness of the
tests (tests/service/server_harness.py, the observability stack) and the benchmarks
(bench.compare).

The server runs in its own session, so signals from the terminal running pytest or a benchmark
do not reach it, and its output goes to a log file that errors quote. Readiness is polled on a
path with a deadline, never a fixed sleep. ``stop`` signals it, waits, and then kills whatever is
left of its process tree.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90.0


def free_port() -> int:
    """A port the kernel considers free now (the server binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(
    settings: Mapping[str, str] | None = None, *, inherit_settings: bool = False, pythonpath: Iterable[Path] = ()
) -> dict[str, str]:
    """This process's environment for a server, plus ``settings``.

    Without ``inherit_settings`` the service's own variables (``TEXTGEN_*``,
    ``PROMETHEUS_MULTIPROC_DIR``) are dropped first, so that a developer's shell does not leak
    into a test; a benchmark inherits them on purpose. ``pythonpath`` and the repository go first
    on PYTHONPATH.
    """
    own = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")
    env = {k: v for k, v in os.environ.items() if inherit_settings or not (k.startswith("TEXTGEN_") or k in own)}
    path = [*map(str, pythonpath), str(REPO), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in (settings or {}).items()})
    return env


def service_argv(bundle: Path, port: int, module: str = "service") -> list[str]:
    """``python -m service`` (or a module with the same flags) on ``bundle`` at 127.0.0.1:``port``."""
    return [sys.executable, "-m", module, "--model", str(bundle), "--host", "127.0.0.1", "--port", str(port)]


def thin_argv(bundle: Path, port: int, frontend: str = "raw") -> list[str]:
    """``python -m bench.baselines.thin`` (the thinnest server around the engine) at 127.0.0.1:``port``."""
    module = [sys.executable, "-m", "bench.baselines.thin"]
    return [*module, "--bundle", str(bundle), "--port", str(port), "--frontend", frontend]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: Path
    ready_path: str = "/ready"
    name: str = "service"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 4000) -> str:
        return f"--- end of {self.name} log ({self.log_path}) ---\n{self.log()[-chars:]}"

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Poll ``ready_path`` until it answers 200; raises RuntimeError with the log if the server
        exits first or the deadline passes (then it is killed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url(self.ready_path), timeout=2).status_code == 200:
                    return
            time.sleep(0.05)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the main process; wait for it; kill whatever is left. Returns its exit code."""
        children = self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        _, alive = psutil.wait_procs(children, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        # Anything else it started is in its session, whose id is its pid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return code


def launch(
    argv: list[str], log_path: Path, *, port: int, env: Mapping[str, str], ready_path: str = "/ready",
    name: str = "service",
) -> Server:  # fmt: skip
    """Start ``argv`` (a server that listens on ``port``) without waiting for it."""
    with log_path.open("w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            argv, cwd=REPO, env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(proc, port, log_path, ready_path, name)


def start_service(
    bundle: Path, log_path: Path, settings: Mapping[str, str] | None = None, *, port: int | None = None,
    timeout: float = START_TIMEOUT_S,
) -> Server:  # fmt: skip
    """``python -m service`` on ``bundle`` with ``settings`` (the shell's own dropped); returns once
    it is ready."""
    port = port or free_port()
    server = launch(service_argv(bundle, port), log_path, port=port, env=server_env(settings))
    server.wait_ready(timeout)
    return server
