"""Fixtures of the reliability suite: the real service on the tiny bundle, and a figures report.

Each test (or module) starts ``python -m service --model <tiny bundle>`` on an ephemeral
127.0.0.1 port with the TEXTGEN_* settings it needs, through tests/service/server_harness.py
(readiness polled on /ready with a deadline, the log in a file). At teardown a server that is
still running gets SIGTERM and must exit 0 leaving no child process behind.

The figures the tests measure (requests, errors, latencies, memory) are printed in a summary at
the end of the run, and written as JSON to ``$RELIABILITY_FIGURES`` when that is set.
Tests that compare greedy outputs (load, disconnects) serve ``random_bundle`` (tests/conftest.py:
the tiny tokenizer with seeded random weights, same size as the tiny model) because the barely
trained tiny model answers most prompts greedily with the same run of newlines.
``RELIABILITY_BUNDLE=DIR`` / ``RELIABILITY_RANDOM_BUNDLE=DIR`` serve existing bundles instead of
building them (quicker while developing).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "service"))  # server_harness, as tests/service imports it

import server_harness  # noqa: E402
from relkit import terminate  # noqa: E402

# Settings of every server here: the CPU provider and one ONNX Runtime thread (the machine has
# two cores, and the test's own clients need one).
BASE_ENV = {"TEXTGEN_PROVIDER": "cpu", "TEXTGEN_INTRA_OP_THREADS": "1", "TEXTGEN_LOG_LEVEL": "info"}

FIGURES = pytest.StashKey[dict[str, dict]]()


@pytest.fixture(scope="session")
def bundle(request: pytest.FixtureRequest) -> Path:
    override = os.environ.get("RELIABILITY_BUNDLE")
    if override:
        return Path(override).resolve()
    return request.getfixturevalue("tiny_bundle")


@pytest.fixture(scope="session")
def greedy_bundle(request: pytest.FixtureRequest) -> Path:
    """A bundle whose greedy continuations differ from prompt to prompt."""
    override = os.environ.get("RELIABILITY_RANDOM_BUNDLE")
    if override:
        return Path(override).resolve()
    return request.getfixturevalue("random_bundle")


class Servers:
    """Starts servers; stops the ones still running at teardown and checks how they exit."""

    def __init__(self, bundle: Path, workdir: Path):
        self.bundle, self.workdir = bundle, workdir
        self.started: list[server_harness.Server] = []

    def launch(self, wait: bool = True, bundle: Path | None = None, **env: str) -> server_harness.Server:
        log = self.workdir / f"server-{len(self.started)}.log"
        srv = server_harness.launch(bundle or self.bundle, log, fake=False, **{**BASE_ENV, **env})
        self.started.append(srv)
        if wait:
            srv.wait_ready()
        return srv

    def close(self) -> None:
        problems = []
        for srv in self.started:
            if srv.proc.poll() is not None:
                continue
            code, left = terminate(srv.proc)
            if code != 0 or left:
                problems.append(f"port {srv.port}: exit {code}, children left {left}\n{srv.log()[-3000:]}")
        assert not problems, "\n".join(problems)


@pytest.fixture
def servers(bundle: Path, tmp_path: Path) -> Iterator[Servers]:
    s = Servers(bundle, tmp_path)
    yield s
    s.close()


@pytest.fixture(scope="module")
def module_servers(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    s = Servers(bundle, tmp_path_factory.mktemp("servers"))
    yield s
    s.close()


@pytest.fixture(scope="session")
def record(request: pytest.FixtureRequest):
    """``record(section, **figures)``: keep measured figures for the end-of-run summary."""

    def _record(section: str, **values) -> None:
        request.config.stash.setdefault(FIGURES, {}).setdefault(section, {}).update(values)

    return _record


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    figures = config.stash.get(FIGURES, {})
    if not figures:
        return
    terminalreporter.section("reliability figures")
    for section, values in figures.items():
        line = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        terminalreporter.write_line(f"{section}: {line}")
    out = os.environ.get("RELIABILITY_FIGURES")
    if out:
        Path(out).write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
