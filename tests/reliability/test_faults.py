"""Faults: the inference worker dies; the service is stopped with SIGTERM under load.

What the service implements (service/process/lifecycle.py) and these tests pin:

- Worker death: a supervisor thread in the main process notices within 0.1 s; the phase turns
  "dead" (/ready 503 at once), every pending request fails fast (503 JSON, or an SSE
  ``event: error`` on a stream that had started), and the whole service shuts down and exits
  with status 1, so that the container / pod is restarted. It does not restart the worker
  in place.
- SIGTERM: /ready turns 503 and new generation requests get 503 + Retry-After while the
  requests already accepted (running or waiting) finish; then every process stops and the
  main process exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import psutil
from relkit import error_field, get, inference_worker, ready, tree, wait_until
from traffic import ROUTES, Call, Result, prompt_body, send

EXIT_DEADLINE_S = 20.0


def long_call(i: int, max_tokens: int = 200) -> Call:
    route = ROUTES[i % 3]
    body = {**prompt_body(route, "Now is the winter"), "max_tokens": max_tokens, "ignore_eos": True}
    body.update(temperature=0.8, seed=i, stream=i % 2 == 0)
    return Call(route, body)


def wait_exit(proc, timeout: float) -> int:
    return wait_until(lambda: proc.poll() is not None, timeout, "the server to exit") and proc.returncode


def gone(procs: list[psutil.Process], timeout: float = 10.0) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


def test_worker_killed_fails_fast_and_exits_nonzero(servers, record):
    # 4 running at a time: the 16 requests take 4 rounds of 200 tokens, so the moment when all are
    # in flight and 4 run lasts long enough to be seen however fast the engine is.
    srv = servers.launch(TEXTGEN_MAX_RUNNING="4", TEXTGEN_MAX_WAITING="64")
    children = tree(srv.proc.pid)[1:]
    worker = inference_worker(srv.proc.pid)
    calls = [long_call(i) for i in range(16)]

    async def scenario() -> tuple[list[Result | BaseException], dict]:
        t: dict = {}
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=30) as http:
            tasks = [asyncio.create_task(send(http, c)) for c in calls]
            await asyncio.to_thread(
                wait_until,
                lambda: (
                    (g := ready(srv.base_url))["inflight"] + sum(x.done() for x in tasks) == len(calls)
                    and g["running"] == 4
                ),
                30,
                "every request sent and 4 running",
                0.002,
            )
            worker.kill()
            t["kill"] = time.monotonic()

            def not_ready() -> bool:
                r = get(srv.url("/ready"))
                t["ready_status"], t["ready_body"] = r.status_code, r.json()
                return r.status_code != 200

            await asyncio.to_thread(wait_until, not_ready, 2, "/ready to turn 503", 0.005)
            t["not_ready"] = time.monotonic()
            results = []
            for task in tasks:
                try:
                    results.append(await task)
                except httpx.HTTPError as e:
                    results.append(e)
                t.setdefault("ends", []).append(time.monotonic())
        return results, t

    results, t = asyncio.run(scenario())
    assert t["ready_status"] == 503 and t["ready_body"]["status"] == "dead", t
    ready_after = t["not_ready"] - t["kill"]
    failed_after = max(t["ends"]) - t["kill"]
    # Nothing hangs: every request ended (an error for those not finished) within seconds.
    assert failed_after < 5.0, failed_after
    transport = [r for r in results if isinstance(r, BaseException)]
    assert not transport, f"requests cut off without an answer: {transport}"
    # A request either finished before the kill, or failed with "unavailable": a 503 (with
    # Retry-After), or an SSE error event that ends a stream which had started.
    failed = 0
    for r in results:
        if r.status == 200 and r.problem is None:
            continue
        failed += 1
        if r.call.stream and r.status == 200:
            assert r.body.errors and not r.body.done, r.body
            assert error_field(r.body.errors[0])["code"] == "unavailable"
        else:
            assert r.status == 503, (r.status, r.body)
            assert error_field(r.body)["code"] == "unavailable" and "retry-after" in r.headers
    # 4 were running (200 tokens each; one may have been at its last) and the rest waiting.
    assert failed >= 4, f"only {failed} requests were in flight when the worker died"

    code = wait_exit(srv.proc, EXIT_DEADLINE_S)
    exited_after = time.monotonic() - t["kill"]
    assert code == 1, f"exit status {code}\n{srv.log()[-3000:]}"
    left = gone(children)
    assert not left, f"processes left behind: {left}"
    assert f"(pid {worker.pid}) exited with code -9" in srv.log()
    record(
        "faults-worker-killed",
        in_flight=failed,
        ready_503_after_s=ready_after,
        all_failed_after_s=failed_after,
        exit_code=code,
        exited_after_s=exited_after,
    )


def test_sigterm_under_load_drains_and_exits_0(servers, record):
    srv = servers.launch(TEXTGEN_MAX_RUNNING="8", TEXTGEN_MAX_WAITING="64", TEXTGEN_DRAIN_TIMEOUT_S="60")
    children = tree(srv.proc.pid)[1:]
    calls = [long_call(i, max_tokens=120) for i in range(24)]

    async def scenario() -> tuple[list[Result], list[Result], dict]:
        t: dict = {}
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as http:
            tasks = [asyncio.create_task(send(http, c)) for c in calls]
            await asyncio.to_thread(
                wait_until,
                lambda: ready(srv.base_url)["inflight"] + sum(x.done() for x in tasks) == len(calls),
                30,
                "every request accepted",
                0.002,
            )
            srv.proc.send_signal(signal.SIGTERM)
            t["term"] = time.monotonic()
            await asyncio.to_thread(
                wait_until,
                lambda: ready(srv.base_url)["status"] == "draining",
                5,
                "/ready to report draining",
                0.005,
            )
            t["draining"] = time.monotonic()
            refused = [await send(http, long_call(100 + i, 4)) for i in range(3)]
            results = list(await asyncio.gather(*tasks))
            t["drained"] = time.monotonic()
        return results, refused, t

    results, refused, t = asyncio.run(scenario())
    bad = [(r.status, r.call.body, r.problem) for r in results if r.status != 200 or r.problem]
    assert not bad, f"accepted requests not completed during the drain: {bad}"
    for r in refused:
        assert r.status == 503, (r.status, r.body)
        assert error_field(r.body)["code"] == "unavailable" and "retry-after" in r.headers
    code = wait_exit(srv.proc, EXIT_DEADLINE_S)
    exited_after = time.monotonic() - t["term"]
    assert code == 0, f"exit status {code}\n{srv.log()[-3000:]}"
    left = gone(children)
    assert not left, f"processes left behind: {left}"
    record(
        "faults-sigterm",
        in_flight=len(calls),
        completed=sum(r.status == 200 for r in results),
        refused_503_while_draining=len(refused),
        draining_after_s=t["draining"] - t["term"],
        drained_after_s=t["drained"] - t["term"],
        exited_after_s=exited_after,
    )
