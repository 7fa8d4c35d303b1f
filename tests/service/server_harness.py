"""Run the real service (``python -m service``) as a subprocess on an ephemeral port.

Readiness is polled on /ready with a deadline (never a fixed sleep); the log goes to a file
that is shown when start-up fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

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
            p.kill()
        return code

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} while starting:\n{self.log()}")
            try:
                if httpx.get(self.url("/ready"), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")


def server_env(fake: bool, **settings: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TEXTGEN_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO), env.get("PYTHONPATH", "")])
    env["TEXTGEN_LOG_LEVEL"] = "info"
    if fake:
        env["TEXTGEN_ENGINE_CLASS"] = "fakes:FakeEngine"
    env.update({k: str(v) for k, v in settings.items()})
    return env


def launch(bundle: Path, log_path: Path, *, fake: bool, port: int | None = None, **settings: str) -> Server:
    """Start the service without waiting for it."""
    port = port or free_port()
    env = server_env(fake, **settings)
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--model", str(bundle), "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # signals from the terminal running pytest do not reach it
    )
    return Server(proc, port, log_path)


def start(bundle: Path, log_path: Path, *, fake: bool, **settings: str) -> Server:
    server = launch(bundle, log_path, fake=fake, **settings)
    server.wait_ready()
    return server
