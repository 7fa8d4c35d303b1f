"""Load: thousands of mixed requests from 64 concurrent clients, then back to idle.

Every request must get a complete, well-formed 200 (traffic.check), greedy ones the same text
as when they run alone; afterwards the scheduler gauges and the KV cache return to 0, the
finish counters add up, and the resident memory of the server's process tree (measured after a
warm-up) has grown by less than 50 MB. ``--soak`` runs a ten times longer version.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest
from relkit import finished, percentile, rss_mb, scrape, wait_idle
from traffic import Call, Result, make_call, reference_texts, send

CONCURRENCY = 64
REQUESTS = 2000
WARMUP = 256
SOAK_REQUESTS = int(os.environ.get("RELIABILITY_SOAK_REQUESTS", "20000"))
MAX_RSS_GROWTH_MB = 50.0


@dataclass
class Run:
    results: list[Result]
    errors: list[str]  # transport errors (connection reset, timeout)
    seconds: float
    peak: Counter = field(default_factory=Counter)  # highest running / waiting seen on /ready


async def drive(base_url: str, calls: list[Call], concurrency: int) -> Run:
    """``concurrency`` clients, each sending the next call as soon as its previous one ended."""
    todo = iter(calls)
    results: list[Result] = []
    errors: list[str] = []
    peak: Counter = Counter()
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(http: httpx.AsyncClient) -> None:
        for call in todo:
            try:
                results.append(await send(http, call))
            except httpx.HTTPError as e:
                errors.append(f"{call.route} {call.body}: {type(e).__name__}: {e}")

    async def sampler() -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
            while not done.is_set():
                body = (await http.get("/ready")).json()
                for key in ("running", "waiting"):
                    peak[key] = max(peak[key], body[key])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), 0.05)

    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as http:
        watch = asyncio.create_task(sampler())
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        done.set()
        await watch
    return Run(results, errors, time.monotonic() - t0, peak)


def assert_all_good(run: Run, refs: dict) -> None:
    statuses = Counter(r.status for r in run.results)
    assert not run.errors, f"{len(run.errors)} transport errors, e.g. {run.errors[:3]}"
    assert statuses == Counter({200: len(run.results)}), f"statuses {dict(statuses)}"
    bad = [(r.call.route, r.call.body, r.problem) for r in run.results if r.problem]
    assert not bad, f"{len(bad)} incomplete or malformed answers, e.g. {bad[:3]}"
    differ = [
        (r.call.greedy_key, r.call.stream, r.texts[0], refs[r.call.greedy_key])
        for r in run.results
        if r.call.greedy_key is not None and r.texts[0] != refs[r.call.greedy_key]
    ]
    assert not differ, f"{len(differ)} greedy outputs differ from the lone request's, e.g. {differ[:3]}"


def load_test(servers, bundle, record, requests: int, section: str) -> None:
    srv = servers.launch(bundle=bundle)
    pid = srv.proc.pid
    refs = reference_texts(srv.base_url)
    rng = random.Random(20261122)

    warm = asyncio.run(drive(srv.base_url, [make_call(rng) for _ in range(WARMUP)], CONCURRENCY))
    assert_all_good(warm, refs)
    wait_idle(srv.base_url)
    rss_before = rss_mb(pid)
    before = scrape(srv.base_url)

    calls = [make_call(rng) for _ in range(requests)]
    run = asyncio.run(drive(srv.base_url, calls, CONCURRENCY))
    assert len(run.results) + len(run.errors) == requests
    assert_all_good(run, refs)

    after = wait_idle(srv.base_url)  # running, waiting and KV-cache usage back to 0
    rss_after = rss_mb(pid)
    choices = sum(c.n for c in calls)
    ended = {r: finished(after, r) - finished(before, r) for r in ("stop", "length", "abort", "error")}
    assert ended["abort"] == 0 and ended["error"] == 0, ended
    assert ended["stop"] + ended["length"] == choices, (ended, choices)
    server_errors = {
        (dict(labels)["route"], dict(labels)["status"]): v for (name, labels), v in after.samples.items()
        if name == "textgen_http_requests_total" and dict(labels)["status"].startswith("5") and v
        and dict(labels)["route"] != "/ready"  # 503 while the server was starting
    }  # fmt: skip
    assert not server_errors, f"5xx responses counted by the server: {server_errors}\n{srv.log()[-5000:]}"

    latencies = [r.latency for r in run.results]
    record(
        section,
        requests=requests,
        concurrency=CONCURRENCY,
        streaming=sum(c.stream for c in calls),
        greedy_checked=sum(c.greedy_key is not None for c in calls),
        errors=len(run.errors) + sum(r.status != 200 or r.problem is not None for r in run.results),
        seconds=round(run.seconds, 1),
        requests_per_s=round(requests / run.seconds, 1),
        latency_p50_s=percentile(latencies, 50),
        latency_p99_s=percentile(latencies, 99),
        peak_running=run.peak["running"],
        peak_waiting=run.peak["waiting"],
        rss_after_warmup_mb=round(rss_before, 1),
        rss_growth_mb=round(rss_after - rss_before, 1),
    )
    print(
        f"\n{section}: {requests} requests in {run.seconds:.1f} s, RSS {rss_before:.0f} → {rss_after:.0f} MB"
    )
    assert rss_after - rss_before < MAX_RSS_GROWTH_MB, f"RSS grew {rss_before:.0f} → {rss_after:.0f} MB"


def test_load_64_clients_mixed_requests(servers, greedy_bundle, record):
    load_test(servers, greedy_bundle, record, REQUESTS, "load")


@pytest.mark.slow
def test_load_soak(servers, greedy_bundle, record):
    load_test(servers, greedy_bundle, record, SOAK_REQUESTS, "load-soak")
