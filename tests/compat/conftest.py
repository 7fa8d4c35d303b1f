"""Fixtures of the compatibility tests: the real service on the tiny bundle.

One server per module: ``python -m service --model <tiny bundle>`` on an ephemeral 127.0.0.1 port,
started through tests/service/server_harness.py (readiness polled on /ready with a deadline, the
log in a file); at teardown it gets SIGTERM and must exit 0.
``COMPAT_SERVER_URL=http://HOST:PORT`` runs the tests against a server that is already up instead
(for example `make serve` with the small model), without building or starting anything.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "service"))  # server_harness, as tests/service imports it

import server_harness  # noqa: E402


@dataclass
class RunningServer:
    """A server started outside the tests (``COMPAT_SERVER_URL``): the part of Server the tests use."""

    base_url: str

    def url(self, path: str) -> str:
        return self.base_url + path

    def log(self) -> str:
        return f"(the server at {self.base_url} was started outside the tests: see its own log)"


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[server_harness.Server | RunningServer]:
    url = os.environ.get("COMPAT_SERVER_URL")
    if url:
        yield RunningServer(url.rstrip("/"))
        return
    bundle = request.getfixturevalue("tiny_bundle")
    log = tmp_path_factory.mktemp("compat") / "server.log"
    # One ONNX Runtime thread: the machine may have two cores, and the client (lm-eval) needs one.
    srv = server_harness.start(bundle, log, fake=False, TEXTGEN_PROVIDER="cpu", TEXTGEN_INTRA_OP_THREADS="1")
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]
