"""Process life: disconnects free their slot, SIGTERM/SIGINT drain and exit 0 leaving no process,
a dead inference worker fails what is pending and makes the service exit 1, start-up errors.

Fake engine with slow steps, so requests are still running when the test acts.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
from fakes import make_fake_bundle
from server_harness import REPO, launch, server_env, start

STEP_S = 0.05


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_fake_bundle(tmp_path_factory.mktemp("lifecycle") / "bundle")


@pytest.fixture
def slow_server(bundle, tmp_path):
    srv = start(bundle, tmp_path / "server.log", fake=True, TEXTGEN_FAKE_STEP_S=str(STEP_S))
    yield srv
    srv.stop()


def ready(server) -> httpx.Response:
    return httpx.get(server.url("/ready"), timeout=5)


def wait_for(predicate, timeout: float, what: str) -> float:
    """Poll until ``predicate()``; return the time it took."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.01)
    return time.monotonic() - t0


def idle(server) -> bool:
    body = ready(server).json()
    return body["running"] == 0 and body["waiting"] == 0 and body["inflight"] == 0


class Stream:
    """A streaming completion read in a thread: the events it got, how it ended."""

    def __init__(self, server, max_tokens: int, read_events: int | None = None):
        self.events: list[dict | str] = []
        self.first = threading.Event()
        self.done = threading.Event()
        body = {
            "prompt": "x",
            "max_tokens": max_tokens,
            "stream": True,
            "temperature": 0,
            "stream_options": {"include_usage": True},
        }
        self._args = (server.url("/v1/completions"), body, read_events)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.first.wait(10), "the stream did not start"

    def _run(self) -> None:
        url, body, read_events = self._args
        try:
            with httpx.stream("POST", url, json=body, timeout=30) as r:
                self.status = r.status_code
                event = None
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        data = line[6:]
                        self.events.append(data if data == "[DONE]" else {"event": event, **json.loads(data)})
                        self.first.set()
                        if read_events is not None and len(self.events) >= read_events:
                            return  # leaving the block closes the connection
        except httpx.HTTPError as e:
            self.events.append(f"transport error: {e!r}")
        finally:
            self.first.set()
            self.done.set()

    def tokens(self) -> int:
        """completion_tokens of the usage chunk."""
        return next(
            e["usage"]["completion_tokens"] for e in self.events if isinstance(e, dict) and e.get("usage")
        )


def test_disconnect_mid_stream_frees_the_slot(slow_server):
    s = Stream(slow_server, max_tokens=100, read_events=3)
    assert s.done.wait(10)
    took = wait_for(lambda: idle(slow_server), 5, "the aborted stream to leave the engine")
    assert took < 10 * STEP_S
    metrics = httpx.get(slow_server.url("/metrics")).text
    assert 'textgen_num_requests_running{model="fake-tiny"} 0.0' in metrics
    assert 'textgen_requests_finished_total{finish_reason="abort",model="fake-tiny"} 1.0' in metrics


def test_disconnect_while_waiting_for_a_whole_response(slow_server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_server.url("/v1/completions"), json={"prompt": "x", "max_tokens": 100}, timeout=0.3)
    took = wait_for(lambda: idle(slow_server), 5, "the abandoned request to leave the engine")
    assert took < 10 * STEP_S


def test_sigterm_drains_running_streams_then_exits_0(slow_server):
    s = Stream(slow_server, max_tokens=30)
    children = slow_server.descendants()
    assert len(children) >= 3  # manager, inference worker, HTTP process
    os.kill(slow_server.proc.pid, signal.SIGTERM)
    wait_for(lambda: ready(slow_server).status_code == 503, 5, "/ready to report draining")
    assert ready(slow_server).json()["status"] == "draining"
    r = httpx.post(slow_server.url("/v1/completions"), json={"prompt": "x"})
    assert r.status_code == 503 and r.headers["retry-after"]
    assert s.done.wait(20)
    assert s.events[-1] == "[DONE]" and s.tokens() == 30
    assert slow_server.proc.wait(30) == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left behind: {alive}"


def test_signal_to_the_whole_process_group_still_drains(slow_server):
    """``timeout``, systemd and some init systems signal every process of the group."""
    s = Stream(slow_server, max_tokens=20)
    children = slow_server.descendants()
    os.killpg(slow_server.proc.pid, signal.SIGTERM)
    assert s.done.wait(20)
    assert s.events[-1] == "[DONE]" and s.tokens() == 20
    assert slow_server.proc.wait(30) == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive


def test_drain_timeout_fails_what_is_left(bundle, tmp_path):
    srv = start(
        bundle,
        tmp_path / "server.log",
        fake=True,
        TEXTGEN_FAKE_STEP_S=str(STEP_S),
        TEXTGEN_DRAIN_TIMEOUT_S="0.3",
    )
    s = Stream(srv, max_tokens=100)
    os.kill(srv.proc.pid, signal.SIGTERM)
    assert s.done.wait(20)
    assert s.events[-1]["event"] == "error" and s.events[-1]["error"]["code"] == "unavailable"
    assert srv.proc.wait(30) == 0


def test_sigint_when_idle_exits_0_quickly(slow_server):
    children = slow_server.descendants()
    t0 = time.monotonic()
    os.kill(slow_server.proc.pid, signal.SIGINT)
    assert slow_server.proc.wait(30) == 0
    assert time.monotonic() - t0 < 10
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive


def _inference_worker(server) -> psutil.Process:
    for p in server.descendants():
        cmd = " ".join(p.cmdline())
        if "spawn_main" in cmd and "resource_tracker" not in cmd:
            return p
    raise AssertionError("no inference worker process found")


def test_worker_death_fails_pending_requests_and_exits_1(slow_server):
    stream = Stream(slow_server, max_tokens=100)
    unary: dict = {}
    t = threading.Thread(
        target=lambda: unary.setdefault(
            "r",
            httpx.post(
                slow_server.url("/v1/completions"), json={"prompt": "x", "max_tokens": 100}, timeout=30
            ),
        )
    )
    t.start()
    wait_for(lambda: ready(slow_server).json()["running"] == 2, 5, "both requests to run")
    children = slow_server.descendants()
    _inference_worker(slow_server).kill()
    assert stream.done.wait(10)
    last = stream.events[-1]
    assert last["event"] == "error" and last["error"]["code"] == "unavailable", last
    t.join(10)
    assert unary["r"].status_code == 503, unary["r"].text
    assert slow_server.proc.wait(30) == 1
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive


# -- start-up errors -----------------------------------------------------------------------------


def _run_main(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_missing_bundle_exits_2_naming_it(tmp_path):
    r = _run_main(["--model", str(tmp_path / "nope")], server_env(fake=True))
    assert r.returncode == 2 and str(tmp_path / "nope") in r.stderr


def test_bad_setting_exits_2_naming_the_variable(bundle):
    r = _run_main(["--model", str(bundle)], server_env(fake=True, TEXTGEN_MAX_WAITING="-1"))
    assert r.returncode == 2 and "TEXTGEN_MAX_WAITING" in r.stderr


def test_port_in_use_exits_2(bundle):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _run_main(["--model", str(bundle), "--port", str(port)], server_env(fake=True))
    assert r.returncode == 2 and f"127.0.0.1:{port}" in r.stderr


def test_engine_that_cannot_load_exits_1(bundle, tmp_path):
    srv = launch(bundle, tmp_path / "server.log", fake=True, TEXTGEN_ENGINE_CLASS="fakes:NoSuchEngine")
    assert srv.proc.wait(60) == 1
    assert "failed to load the engine" in srv.log()


def test_idle_worker_does_not_spin(slow_server):
    worker = _inference_worker(slow_server)
    before = sum(worker.cpu_times()[:2])
    time.sleep(1.0)
    assert sum(worker.cpu_times()[:2]) - before < 0.1  # LitServe's ContinuousBatchingLoop used a whole core


def test_two_http_processes_share_one_engine(bundle, tmp_path):
    srv = start(
        bundle, tmp_path / "server.log", fake=True, TEXTGEN_FAKE_STEP_S="0.01", TEXTGEN_HTTP_WORKERS="2"
    )
    try:
        body = {"prompt": "x", "max_tokens": 20, "temperature": 0}
        with cf.ThreadPoolExecutor(8) as pool:
            rs = list(
                pool.map(lambda _: httpx.post(srv.url("/v1/completions"), json=body, timeout=30), range(16))
            )
        assert all(r.status_code == 200 for r in rs)
        assert len({r.json()["choices"][0]["text"] for r in rs}) == 1
        metrics = httpx.get(srv.url("/metrics")).text
        assert (
            'textgen_http_requests_total{model="fake-tiny",route="/v1/completions",status="200"} 16.0'
            in metrics
        )
        s = Stream(srv, max_tokens=20)
        children = srv.descendants()
    finally:
        code = srv.stop()
    assert code == 0 and s.done.wait(10) and s.events[-1] == "[DONE]"
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
