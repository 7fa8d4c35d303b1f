"""Tools of the reliability tests: polling with deadlines, /metrics, memory, SSE, response checks.

Nothing here sleeps to "let things settle": every wait polls a condition until a deadline and
fails naming what it waited for. The server itself is run by tests/service/server_harness.py.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

T = TypeVar("T")

GAUGES = ("textgen_num_requests_running", "textgen_num_requests_waiting", "textgen_kv_cache_usage_perc")


# ---------------------------------------------------------------------------------------------
# Polling


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy and return that; exceptions count as
    "not yet". Raises AssertionError naming ``what`` (and the last value or error) at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except Exception as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what} (last: {last!r})")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Quick GETs for polling (a new httpx.Client costs ~30 ms: it builds an SSL context)

_local = threading.local()


def get(url: str) -> httpx.Response:
    """GET with a client kept per thread."""
    client = getattr(_local, "client", None)
    if client is None:
        client = _local.client = httpx.Client(timeout=10)
    return client.get(url)


def ready(base_url: str) -> dict:
    """The /ready body: status, running, waiting, kv_cache_usage, inflight."""
    return get(base_url + "/ready").json()


# ---------------------------------------------------------------------------------------------
# /metrics


@dataclass(frozen=True)
class Scrape:
    """One /metrics exposition: sample name + labels → value."""

    samples: dict[tuple[str, frozenset], float]
    text: str

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
        want = set(labels.items())
        return sum(v for (n, lab), v in self.samples.items() if n == name and want <= lab)

    def gauges(self) -> dict[str, float]:
        return {g: self.value(g) for g in GAUGES}


def scrape(base_url: str) -> Scrape:
    r = get(base_url + "/metrics")
    r.raise_for_status()
    samples: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return Scrape(samples, r.text)


def idle(base_url: str) -> Scrape | None:
    """The scrape if running, waiting and KV-cache usage are all 0, else None."""
    m = scrape(base_url)
    return m if all(v == 0 for v in m.gauges().values()) else None


def wait_idle(base_url: str, timeout: float = 15.0) -> Scrape:
    return wait_until(lambda: idle(base_url), timeout, "running/waiting/KV-cache gauges to return to 0")


def finished(m: Scrape, reason: str) -> float:
    return m.value("textgen_requests_finished_total", finish_reason=reason)


def rejected(m: Scrape, reason: str) -> float:
    return m.value("textgen_requests_rejected_total", reason=reason)


# ---------------------------------------------------------------------------------------------
# Processes


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (those alive now)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def rss_mb(pid: int) -> float:
    """Resident memory of a process tree (the server: main, HTTP processes, inference worker)."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total / 1e6


def inference_worker(pid: int) -> psutil.Process:
    """The inference worker: the server's child started by multiprocessing's spawn method
    (HTTP processes are forked and keep the server's command line; the resource tracker is not
    spawned with ``spawn_main``)."""
    found = [p for p in psutil.Process(pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    assert len(found) == 1, f"expected one inference worker, found {[(p.pid, p.cmdline()) for p in found]}"
    return found[0]


def terminate(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60.0):
    """Signal the server and wait for it. Returns (exit code, descendants still alive 10 s after
    it exited); whatever is left is then killed so that nothing outlives the test."""
    children = tree(proc.pid)[1:] if proc.poll() is None else []
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    _, alive = psutil.wait_procs(children, timeout=10)
    for p in alive:
        p.kill()
    return code, alive


# ---------------------------------------------------------------------------------------------
# Responses


@dataclass
class Sse:
    """A parsed text/event-stream body."""

    data: list[dict] = field(default_factory=list)  # every `data:` JSON payload
    done: bool = False  # ended with `data: [DONE]`
    errors: list[dict] = field(default_factory=list)  # `event: error` payloads


def parse_sse(lines: Iterable[str]) -> Sse:
    out, event = Sse(), None
    for line in lines:
        if not line:
            event = None
            continue
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            payload = line.split(":", 1)[1].strip()
            assert not out.done, f"data after [DONE]: {payload!r}"
            if payload == "[DONE]":
                out.done = True
            elif event == "error":
                out.errors.append(json.loads(payload))
            else:
                out.data.append(json.loads(payload))
    return out


def error_field(body: Any) -> dict:
    """The OpenAI error object of an error body; asserts its shape."""
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"], err
    return err


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]
