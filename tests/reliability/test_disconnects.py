"""Disconnects: 100 clients go away mid-queue and mid-stream; the others are not disturbed.

"Exactly" in ``textgen_requests_finished_total{finish_reason="abort"}`` rises by exactly the
number of clients dropped: a dropped request must not be able to finish before its client goes
away, or it would rightly count as "length". The test makes that impossible by construction:

- every dropped request asks for 200 tokens with ignore_eos, and its client closes the
  connection before it can have received them: mid-queue clients while they wait behind the
  running "holders" (4 greedy requests of 16 choices fill TEXTGEN_MAX_RUNNING=64, so nothing
  else can run; the test checks that the holders are still running when it drops the clients),
  streaming clients at their first or third token;
- nothing else is aborted: the requests that stay (holders, keepers) finish with "length".

Clients that stay must get exactly the text they get when they run alone (greedy), and once
everything ended the gauges return to 0. A last part measures the abort latency: a request
alone, its client leaves after 3 tokens, time until the engine's running count is 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
from relkit import finished, percentile, ready, scrape, wait_idle, wait_until
from traffic import PROMPTS, ROUTES, Call, check, prompt_body, send

MAX_RUNNING = 64
HOLDERS, HOLDER_N = 4, 16  # 4 greedy requests of 16 choices take the 64 slots
HOLD_TOKENS = 200  # ... for 200 steps (context 256)
DROP_TOKENS = 200  # no dropped request can finish before its client leaves
QUEUE_STREAMING, QUEUE_UNARY = 40, 10  # dropped while waiting
MID_STREAM = 50  # dropped while generating
KEEPERS = 12
ABORT_PROBES = 10
ABORT_LATENCY_MAX_S = 0.5


def greedy(i: int, max_tokens: int, stream: bool, n: int = 1) -> Call:
    route = ROUTES[i % 2] if n > 1 else ROUTES[i % 3]  # /generate has no n
    body = {**prompt_body(route, PROMPTS[i % len(PROMPTS)]), "max_tokens": max_tokens, "temperature": 0}
    body.update(ignore_eos=True, stream=stream)
    if n > 1:
        body["n"] = n
    return Call(route, body)


def doomed(i: int, stream: bool = True) -> Call:
    route = ("/v1/completions", "/generate")[i % 2]  # token chunks only (chat sends a role chunk first)
    body = {**prompt_body(route, PROMPTS[i % len(PROMPTS)]), "max_tokens": DROP_TOKENS}
    body.update(ignore_eos=True, temperature=1.0, seed=i, stream=stream)
    return Call(route, body)


def key(call: Call) -> str:
    """The request, streaming or not, one choice or many."""
    body = {k: v for k, v in call.body.items() if k not in ("stream", "n")}
    return call.route + json.dumps(body, sort_keys=True)


def alone(base_url: str, calls: list[Call]) -> dict[str, str]:
    """What each greedy call answers when it runs alone (non-streaming, one after the other)."""
    refs = {}
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for call in calls:
            c = Call(call.route, {k: v for k, v in call.body.items() if k != "n"} | {"stream": False})
            r = http.post(c.route, json=c.body)
            assert r.status_code == 200, r.text
            refs[key(call)] = check(c, r.json())[0]
    return refs


class Stream:
    """A streaming client that reads token chunks and can be told to go away."""

    def __init__(self, http: httpx.AsyncClient, call: Call, drop_after: int | None):
        self.http, self.call, self.drop_after = http, call, drop_after
        self.acked = asyncio.Event()  # response headers received: the engine accepted it
        self.first_token = asyncio.Event()
        self.go = asyncio.Event()  # leave now
        self.tokens = 0  # data chunks received
        self.lines: list[str] = []
        self.closed_at = 0.0

    async def run(self) -> str:
        """'queue' (left before any token), 'stream' (left after tokens) or 'complete'."""
        async with self.http.stream("POST", self.call.route, json=self.call.body) as r:
            assert r.status_code == 200, await r.aread()
            self.acked.set()
            reader = asyncio.create_task(self._read(r))
            leave = asyncio.create_task(self.go.wait())
            await asyncio.wait({reader, leave}, return_when=asyncio.FIRST_COMPLETED)
            leave.cancel()
            complete = reader.done() and reader.result()
            if not complete:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
        self.closed_at = time.monotonic()  # leaving the block closed the connection
        return "complete" if complete else ("stream" if self.tokens else "queue")

    async def _read(self, r: httpx.Response) -> bool:
        """True once the stream ended; returns False when the client decides to leave."""
        async for line in r.aiter_lines():
            self.lines.append(line)
            if line.startswith("data:") and "[DONE]" not in line:
                self.tokens += 1
                self.first_token.set()
                if self.drop_after is not None and self.tokens >= self.drop_after:
                    return False
        return True


async def in_thread(fn, *args):
    return await asyncio.to_thread(fn, *args)


async def phase_mid_queue(base_url: str, refs: dict, holders: list[Call], behind: list[Call]) -> dict:
    """The holders take every slot; 50 doomed clients and 4 keepers queue behind them; the
    doomed ones leave while they wait; the keepers stay."""
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as http:
        hold_tasks = [asyncio.create_task(send(http, c)) for c in holders]
        await in_thread(
            wait_until, lambda: ready(base_url)["running"] == MAX_RUNNING, 30, "the holders to run", 0.002
        )
        waiting = [Stream(http, doomed(i), drop_after=1) for i in range(QUEUE_STREAMING)]
        wait_tasks = [asyncio.create_task(s.run()) for s in waiting]
        unary_tasks = [
            asyncio.create_task(http.post(c.route, json=c.body))
            for c in (doomed(100 + i, stream=False) for i in range(QUEUE_UNARY))
        ]
        keep_tasks = [asyncio.create_task(send(http, c)) for c in behind]
        await asyncio.wait_for(asyncio.gather(*(s.acked.wait() for s in waiting)), 30)
        queued = QUEUE_STREAMING + QUEUE_UNARY + len(behind)
        await in_thread(
            wait_until,
            lambda: (g := ready(base_url))["running"] + g["waiting"] == MAX_RUNNING + queued,
            30,
            f"{queued} requests queued behind the holders",
            0.002,
        )
        # Precondition of the exact count: the holders still hold every slot, so no doomed
        # request has started (let alone produced its 200 tokens) before its client leaves.
        assert not any(t.done() for t in hold_tasks), (
            "a holder finished before the doomed clients left: the machine is too slow for this test"
        )
        t_drop = time.monotonic()
        for s in waiting:
            s.go.set()
        for t in unary_tasks:
            t.cancel()
        kinds = await asyncio.gather(*wait_tasks)
        await asyncio.gather(*unary_tasks, return_exceptions=True)
        # The doomed requests leave the waiting queue; the holders still run, the keepers wait.
        await in_thread(
            wait_until,
            lambda: ready(base_url)["waiting"] <= len(behind),
            5,
            "the dropped requests to leave the waiting queue",
            0.002,
        )
        queue_freed_s = time.monotonic() - t_drop
        assert all(k != "complete" for k in kinds), kinds
        held = await asyncio.gather(*hold_tasks)
        kept = await asyncio.gather(*keep_tasks)
    wrong = [
        r.call.body
        for r in held
        if r.status != 200 or r.problem or any(t != refs[key(r.call)] for t in r.texts)
    ]
    wrong += [r.call.body for r in kept if r.status != 200 or r.problem or r.texts[0] != refs[key(r.call)]]
    assert not wrong, f"clients that stayed got a different answer than alone: {wrong}"
    return {
        "dropped": QUEUE_STREAMING + QUEUE_UNARY,
        "dropped_without_tokens": kinds.count("queue") + QUEUE_UNARY,
        "queue_freed_s": queue_freed_s,
    }


async def phase_mid_stream(base_url: str, refs: dict, keepers: list[Call]) -> dict:
    """50 streaming clients leave at their third token while greedy keepers run beside them."""
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as http:
        leaving = [Stream(http, doomed(200 + i), drop_after=3) for i in range(MID_STREAM)]
        tasks = [asyncio.create_task(s.run()) for s in leaving]
        keep = [asyncio.create_task(send(http, c)) for c in keepers]
        kinds = await asyncio.gather(*tasks)
        kept = await asyncio.gather(*keep)
    assert kinds == ["stream"] * MID_STREAM, kinds
    wrong = [r.call.body for r in kept if r.status != 200 or r.problem or r.texts[0] != refs[key(r.call)]]
    assert not wrong, f"clients that stayed got a different answer than alone: {wrong}"
    return {"dropped": MID_STREAM}


async def abort_latency(base_url: str) -> tuple[list[float], float]:
    """Alone: the client leaves after 3 tokens; seconds until the engine's running count is 0.
    And the decode step time, from a lone 200-token request."""
    latencies = []
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        t0 = time.monotonic()
        r = await send(http, Call("/generate", {"text": "x", "max_tokens": 200, "ignore_eos": True}))
        step_s = (time.monotonic() - t0) / 200
        assert r.status == 200 and r.problem is None
        for i in range(ABORT_PROBES):
            s = Stream(http, doomed(300 + i), drop_after=3)
            assert await s.run() == "stream"
            await in_thread(
                wait_until, lambda: ready(base_url)["running"] == 0, 5, "the slot to be freed", 0.001
            )
            latencies.append(time.monotonic() - s.closed_at)
    return latencies, step_s


def test_disconnects_abort_exactly_and_spare_the_others(servers, greedy_bundle, record):
    srv = servers.launch(
        bundle=greedy_bundle, TEXTGEN_MAX_RUNNING=str(MAX_RUNNING), TEXTGEN_MAX_WAITING="256"
    )
    holders = [greedy(i, HOLD_TOKENS, stream=False, n=HOLDER_N) for i in range(HOLDERS)]
    behind = [greedy(i, 24, stream=i % 2 == 0) for i in range(4)]
    keepers = [greedy(i, 16 + 4 * i, stream=i % 2 == 1) for i in range(KEEPERS - len(behind))]
    refs = alone(srv.base_url, holders + behind + keepers)

    m0 = scrape(srv.base_url)
    q = asyncio.run(phase_mid_queue(srv.base_url, refs, holders, behind))
    m1 = wait_idle(srv.base_url)
    assert finished(m1, "abort") - finished(m0, "abort") == q["dropped"]
    assert finished(m1, "length") - finished(m0, "length") == HOLDERS * HOLDER_N + len(behind)

    s = asyncio.run(phase_mid_stream(srv.base_url, refs, keepers))
    m2 = wait_idle(srv.base_url)
    assert finished(m2, "abort") - finished(m1, "abort") == s["dropped"]
    assert finished(m2, "length") - finished(m1, "length") == len(keepers)
    assert finished(m2, "error") == finished(m0, "error")

    latencies, step_s = asyncio.run(abort_latency(srv.base_url))
    m3 = wait_idle(srv.base_url)
    assert finished(m3, "abort") - finished(m2, "abort") == ABORT_PROBES
    record(
        "disconnects",
        dropped=q["dropped"] + s["dropped"],
        dropped_mid_queue=q["dropped_without_tokens"],
        dropped_mid_stream=q["dropped"] - q["dropped_without_tokens"] + s["dropped"],
        abort_counted=finished(m2, "abort") - finished(m0, "abort"),
        kept_clients=len(holders) + len(behind) + len(keepers),
        kept_sequences=HOLDERS * HOLDER_N + len(behind) + len(keepers),
        queue_freed_s=q["queue_freed_s"],
        abort_latency_p50_s=percentile(latencies, 50),
        abort_latency_max_s=max(latencies),
        decode_step_s=step_s,
    )
    assert max(latencies) < ABORT_LATENCY_MAX_S, latencies
