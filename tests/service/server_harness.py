"""Run the real service (``python -m service``) as a subprocess on an ephemeral port, for tests.

The harness itself is bench/server.py, shared with the benchmarks: readiness polled on /ready
with a deadline (never a fixed sleep), the log in a file shown when start-up fails. Here it gets
the tests' defaults: no ``TEXTGEN_*`` variable from the developer's shell, ``TEXTGEN_LOG_LEVEL=info``,
and with ``fake=True`` the fake engine of fakes.py (this folder goes on the server's PYTHONPATH).
"""

from __future__ import annotations

from pathlib import Path

from bench import server as harness
from bench.server import REPO, START_TIMEOUT_S, Server, free_port, service_argv

__all__ = ["REPO", "START_TIMEOUT_S", "Server", "free_port", "launch", "server_env", "start"]

HERE = Path(__file__).resolve().parent


def server_env(fake: bool, **settings: str) -> dict[str, str]:
    extra = {"TEXTGEN_LOG_LEVEL": "info", **({"TEXTGEN_ENGINE_CLASS": "fakes:FakeEngine"} if fake else {})}
    return harness.server_env({**extra, **settings}, pythonpath=[HERE])


def launch(bundle: Path, log_path: Path, *, fake: bool, port: int | None = None, **settings: str) -> Server:
    """Start the service without waiting for it."""
    port = port or free_port()
    return harness.launch(service_argv(bundle, port), log_path, port=port, env=server_env(fake, **settings))


def start(bundle: Path, log_path: Path, *, fake: bool, **settings: str) -> Server:
    server = launch(bundle, log_path, fake=fake, **settings)
    server.wait_ready()
    return server
