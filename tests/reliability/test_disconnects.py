"""Disconnects: 100 clients go away mid-queue and mid-stream; the others are not disturbed.

``textgen_requests_finished_total{finish_reason="abort"}`` must rise by exactly the number of
clients dropped. A request that finishes on its own just before its client leaves is rightly
counted as "length", and a client cannot tell: the server runs ahead of what the client has
read (TCP buffers hold a whole response of this size). So the test makes finishing first
impossible, on the server's side:

- 20 greedy "holder" requests of 16 choices, 200 tokens each, are five generations of 64
  sequences for the 64 running slots (TEXTGEN_MAX_RUNNING=64): while at least 4 of them are
  unfinished, no request queued behind them can start.
- Behind them queue 50 mid-queue clients (40 streaming, 10 not), 50 mid-stream clients and
  14 greedy keepers. The test drops the 50 mid-queue clients while it can see 4 holders still
  unfinished (it fails saying "machine too slow" otherwise, never miscounts).
- When the holders end, the 64 queued requests start within a few steps; the moment ``/ready``
  shows none waiting and at least 50 running (so no mid-stream request has finished: each asks
  for 200 tokens, and the keepers started with them ask for 16-42), the 50 mid-stream clients
  leave; the test checks that they left before half of their 200 steps could have run (the
  step time is measured from the holders' generations).
- Nothing else is aborted: the holders and keepers finish with "length", checked too.

Clients that stay must get exactly the text they get when they run alone (greedy), and once
everything ended the gauges return to 0. A last part measures the abort latency: a request
alone, its client leaves at its first token, time until the engine's running count is 0.
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
HOLDERS, HOLDER_N = 20, 16  # 20 greedy requests of 16 choices: 5 generations of 64 sequences
HOLD_TOKENS = 200  # ... of 200 steps each (context 256)
DROP_TOKENS = 200  # no dropped request can finish before its client leaves
QUEUE_STREAMING, QUEUE_UNARY = 40, 10  # dropped while waiting
MID_STREAM = 50  # dropped while generating
KEEPERS = MAX_RUNNING - MID_STREAM  # start with the mid-stream clients and stay
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
            if key(call) in refs:
                continue
            c = Call(call.route, {k: v for k, v in call.body.items() if k != "n"} | {"stream": False})
            r = http.post(c.route, json=c.body)
            assert r.status_code == 200, r.text
            refs[key(call)] = check(c, r.json())[0]
    return refs


class Stream:
    """A streaming client that reads token chunks and can be told to go away. It leaves after
    ``drop_after`` chunks, or when told; with ``follow=False`` it stops reading after its first
    chunk (it keeps the client's event loop free, so that it leaves at once when told)."""

    def __init__(self, http: httpx.AsyncClient, call: Call, drop_after: int | None, follow: bool = True):
        self.http, self.call, self.drop_after, self.follow = http, call, drop_after, follow
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
                if not self.follow:
                    await self.go.wait()
                    return False
        return True


async def in_thread(fn, *args):
    return await asyncio.to_thread(fn, *args)


async def drop_queued_then_running(
    base_url: str, refs: dict, holders: list[Call], keepers: list[Call]
) -> dict:
    limits = httpx.Limits(max_connections=250)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as http:
        hold_tasks = [asyncio.create_task(send(http, c)) for c in holders]
        hold_ends: list[float] = []
        for t in hold_tasks:
            t.add_done_callback(lambda _: hold_ends.append(time.monotonic()))
        await in_thread(
            wait_until,
            lambda: (g := ready(base_url))["running"] + g["waiting"] == HOLDERS * HOLDER_N,
            30,
            "the holders to run and wait",
            0.002,
        )

        def holding() -> bool:
            """While 4 holders (64 sequences) are unfinished, nothing queued behind them started."""
            unfinished = sum(not t.done() for t in hold_tasks)
            assert unfinished * HOLDER_N >= MAX_RUNNING, (
                f"only {unfinished} holders left before the drop: the machine is too slow for this test"
            )
            return True

        async def wait_queued(n: int) -> None:
            """Until the engine holds n requests behind the holders (a finished holder's 16
            sequences leave the count at once, its response reaches us a moment later)."""
            while True:
                g = await in_thread(ready, base_url)
                unfinished = sum(not t.done() for t in hold_tasks)
                if g["running"] + g["waiting"] - unfinished * HOLDER_N >= n:
                    return
                assert holding()
                await asyncio.sleep(0.002)  # polling interval

        # The non-streaming clients first: once the engine holds them and then acknowledged a
        # streaming request sent after them (its headers), their acknowledgements reached the
        # HTTP process too, so the service knows they were accepted when their clients leave.
        unary = [
            asyncio.create_task(http.post(c.route, json=c.body))
            for c in (doomed(200 + i, stream=False) for i in range(QUEUE_UNARY))
        ]
        await wait_queued(QUEUE_UNARY)
        queued = [Stream(http, doomed(i), drop_after=1) for i in range(QUEUE_STREAMING)]
        running = [Stream(http, doomed(100 + i), None, follow=False) for i in range(MID_STREAM)]
        tasks = [asyncio.create_task(s.run()) for s in queued + running]
        keep_tasks = [asyncio.create_task(send(http, c)) for c in keepers]
        await asyncio.wait_for(asyncio.gather(*(s.acked.wait() for s in queued + running)), 60)
        await wait_queued(QUEUE_UNARY + QUEUE_STREAMING + MID_STREAM + len(keepers))
        assert holding()
        t_drop = time.monotonic()
        for s in queued:
            s.go.set()
        for t in unary:
            t.cancel()
        kinds_queued = await asyncio.gather(*tasks[:QUEUE_STREAMING])
        await asyncio.gather(*unary, return_exceptions=True)
        while True:  # the dropped requests leave the engine's queue
            g = await in_thread(ready, base_url)
            unfinished = sum(not t.done() for t in hold_tasks)
            if g["running"] + g["waiting"] - unfinished * HOLDER_N <= MID_STREAM + len(keepers):
                break
            assert time.monotonic() - t_drop < 10, f"the dropped requests are still queued: {g}"
            await asyncio.sleep(0.002)  # polling interval
        queue_freed_s = time.monotonic() - t_drop

        # Mid-stream: the holders end and the 64 queued requests start within a few steps. Once
        # none waits and at least 50 run, no mid-stream request has finished (it would need 200
        # steps, by which time every keeper, <= 42 tokens, would have ended too).
        await in_thread(
            wait_until,
            lambda: (g := ready(base_url))["waiting"] == 0 and g["running"] >= MID_STREAM,
            60,
            "the mid-stream clients and keepers to run",
            0.001,
        )
        t_started = time.monotonic()
        for s in running:
            s.go.set()
        kinds_running = await asyncio.gather(*tasks[QUEUE_STREAMING:])
        left_after = max(s.closed_at for s in running) - t_started
        # The holders' generations ended one after the other: 4 generations x 200 steps apart.
        step_s = (max(hold_ends) - min(hold_ends)) / (4 * HOLD_TOKENS)
        assert left_after < 0.5 * DROP_TOKENS * step_s, (
            f"the mid-stream clients left {left_after:.2f} s after their requests started, more than "
            f"half of their 200 steps of {step_s * 1000:.1f} ms: the machine is too slow for this test"
        )
        held = await asyncio.gather(*hold_tasks)
        kept = await asyncio.gather(*keep_tasks)
    assert all(k in ("queue", "stream") for k in kinds_queued + kinds_running), kinds_queued + kinds_running
    wrong = [
        r.call.body
        for r in held
        if r.status != 200 or r.problem or any(t != refs[key(r.call)] for t in r.texts)
    ]
    wrong += [r.call.body for r in kept if r.status != 200 or r.problem or r.texts[0] != refs[key(r.call)]]
    assert not wrong, f"clients that stayed got a different answer than alone: {wrong}"
    return {
        "dropped": QUEUE_STREAMING + QUEUE_UNARY + MID_STREAM,
        "dropped_mid_queue": QUEUE_STREAMING + QUEUE_UNARY,
        "dropped_mid_stream": MID_STREAM,
        "mid_stream_with_tokens_read": sum(s.tokens > 0 for s in running),
        "queue_freed_s": queue_freed_s,
        "mid_stream_left_after_start_s": left_after,
        "step_at_batch_64_s": step_s,
    }


async def abort_latency(base_url: str) -> tuple[list[float], float]:
    """Alone: the client leaves at its first token; seconds until the engine's running count is 0.
    And the decode step time, from a lone 200-token request."""
    latencies = []
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        t0 = time.monotonic()
        r = await send(http, Call("/generate", {"text": "x", "max_tokens": 200, "ignore_eos": True}))
        step_s = (time.monotonic() - t0) / 200
        assert r.status == 200 and r.problem is None
        for i in range(ABORT_PROBES):
            s = Stream(http, doomed(300 + i), drop_after=1)
            assert await s.run() == "stream"
            await in_thread(
                wait_until, lambda: ready(base_url)["running"] == 0, 5, "the slot to be freed", 0.001
            )
            latencies.append(time.monotonic() - s.closed_at)
    return latencies, step_s


def test_disconnects_abort_exactly_and_spare_the_others(servers, greedy_bundle, record):
    srv = servers.launch(
        bundle=greedy_bundle, TEXTGEN_MAX_RUNNING=str(MAX_RUNNING), TEXTGEN_MAX_WAITING="512"
    )
    holders = [greedy(i, HOLD_TOKENS, stream=False, n=HOLDER_N) for i in range(HOLDERS)]
    keepers = [greedy(i, 16 + 2 * i, stream=i % 2 == 1) for i in range(KEEPERS)]
    refs = alone(srv.base_url, holders + keepers)

    m0 = scrape(srv.base_url)
    out = asyncio.run(drop_queued_then_running(srv.base_url, refs, holders, keepers))
    m1 = wait_idle(srv.base_url)
    expected = {"abort": out["dropped"], "length": HOLDERS * HOLDER_N + len(keepers), "stop": 0, "error": 0}
    # Finishes are recorded at the HTTP response edge, just after the engine frees the slot that
    # wait_idle watches: poll the counters until they settle (bounded), then compare exactly.
    deadline = time.monotonic() + 10
    while True:
        counts = {r: finished(m1, r) - finished(m0, r) for r in ("abort", "length", "stop", "error")}
        if counts == expected or time.monotonic() > deadline:
            break
        m1 = scrape(srv.base_url)
    assert counts == expected, out

    latencies, step_s = asyncio.run(abort_latency(srv.base_url))
    m2 = wait_idle(srv.base_url)
    # (not asserted exact: alone, a request may be generated to its end before its client has
    # read a first chunk; the exact count is the part above)
    assert finished(m2, "abort") - finished(m1, "abort") >= ABORT_PROBES // 2
    record(
        "disconnects",
        dropped=out["dropped"],
        dropped_mid_queue=out["dropped_mid_queue"],
        dropped_mid_stream=out["dropped_mid_stream"],
        mid_stream_with_tokens_read=out["mid_stream_with_tokens_read"],
        abort_counted=counts["abort"],
        kept_clients=len(holders) + len(keepers),
        kept_sequences=HOLDERS * HOLDER_N + len(keepers),
        queue_freed_s=out["queue_freed_s"],
        mid_stream_left_after_start_s=out["mid_stream_left_after_start_s"],
        step_at_batch_64_s=out["step_at_batch_64_s"],
        abort_latency_p50_s=percentile(latencies, 50),
        abort_latency_max_s=max(latencies),
        decode_step_s=step_s,
    )
    assert max(latencies) < ABORT_LATENCY_MAX_S, latencies
