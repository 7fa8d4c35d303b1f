"""The serving load harness against a tiny OpenAI-compatible stub on an ephemeral loopback port.

The stub streams SSE with configured delays, counts requests in flight and fails chosen
requests, so the harness's counts, timings, failures and load shapes can be checked exactly.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bench.serve import (
    BenchmarkConfig,
    BenchmarkResult,
    RequestRecord,
    goodput,
    main,
    meets_slo,
    parse_slo,
    run_benchmark,
    spread_itl,
    summarize,
    tokens_per_chunk,
)
from bench.workload import parse_range, poisson_arrivals, sample_requests

MODEL = "stub-gpt"


def stub_count(text: str) -> int:
    """The stub's tokenizer: whitespace-local, ceil(len/3) tokens per word ("the" is one)."""
    return sum(math.ceil(len(w) / 3) for w in text.split())


@dataclass
class Stub:
    """Behaviour and observations of the stub server."""

    ttft: float = 0.0  # before the first content chunk
    chunk_delay: float = 0.0  # between content chunks
    tokens_per_chunk: int = 1
    tokenize: bool = True
    failures: dict[int, int | str] = field(
        default_factory=dict
    )  # arrival index % period -> 429/500/"truncate"
    period: int = 1
    # observations
    arrivals: list[float] = field(default_factory=list)
    bodies: list[dict] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


def make_app(stub: Stub) -> Starlette:
    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def tokenize(request: Request) -> Response:
        if not stub.tokenize:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        text = (await request.json())["text"]
        n = stub_count(text)
        return JSONResponse({"tokens": list(range(n)), "count": n})

    async def generate(request: Request) -> Response:
        chat = request.url.path.endswith("/chat/completions")
        body = await request.json()
        index = len(stub.arrivals)
        stub.arrivals.append(time.perf_counter())
        stub.bodies.append(body)
        failure = stub.failures.get(index % stub.period)
        if isinstance(failure, int):
            return JSONResponse({"error": {"message": f"stub failure {failure}"}}, status_code=failure)
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        n_out = body["max_tokens"]

        def event(piece: str | None, finish: str | None = None, usage: dict | None = None) -> str:
            if usage is not None:
                choices = []
            elif chat:
                choices = [{"index": 0, "delta": {"content": piece}, "finish_reason": finish}]
            else:
                choices = [{"index": 0, "text": piece, "finish_reason": finish}]
            return "data: " + json.dumps({"object": "chunk", "choices": choices, "usage": usage}) + "\n\n"

        async def stream() -> AsyncIterator[str]:
            stub.in_flight += 1
            stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
            try:
                if chat:
                    yield event("")  # the role chunk: no content, must not count as the first token
                await asyncio.sleep(stub.ttft)
                sent = 0
                while sent < n_out:
                    if sent:
                        await asyncio.sleep(stub.chunk_delay)
                    k = min(stub.tokens_per_chunk, n_out - sent)
                    sent += k
                    if failure == "truncate" and sent > 2:
                        return  # HTTP 200 with a cut body, as LitServe does on a streaming error
                    yield event(" tok" * k, "length" if sent == n_out else None)
            finally:
                # Before [DONE]: a closed-loop client cannot send its next request earlier.
                stub.in_flight -= 1
            usage = {"prompt_tokens": stub_count(prompt), "completion_tokens": n_out}
            yield event(None, usage=usage | {"total_tokens": usage["prompt_tokens"] + n_out})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/v1/completions", generate, methods=["POST"]),
            Route("/v1/chat/completions", generate, methods=["POST"]),
        ]
    )


@pytest.fixture
def serve_stub():
    """Start a stub on 127.0.0.1:<ephemeral>; returns (stub, url)."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**kwargs) -> tuple[Stub, str]:
        stub = Stub(**kwargs)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(make_app(stub), log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "stub server did not start"
            time.sleep(0.01)
        return stub, f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=5)


def run(**kwargs) -> BenchmarkResult:
    return asyncio.run(run_benchmark(BenchmarkConfig(progress=False, **kwargs)))


def test_counts_requests_and_tokens_exactly(serve_stub):
    stub, url = serve_stub()
    result = run(url=url, concurrency=3, num_requests=10, prompt_len=(20, 60), output_len=(5, 15), seed=3)
    specs = sample_requests(10, (20, 60), (5, 15), seed=3)

    assert len(stub.bodies) == 10
    assert result.config["model"] == MODEL and result.config["prompt_mode"] == "exact"
    assert [r.output_tokens for r in result.requests] == [s.output_len for s in specs]
    # Prompts sized with /tokenize hit the wanted length exactly (as the stub counts tokens).
    assert [r.prompt_tokens for r in result.requests] == [s.prompt_len for s in specs]
    assert all(r.ok and r.status == 200 and r.error is None for r in result.requests)
    assert all(len(r.itl) == r.output_tokens - 1 for r in result.requests)
    s = result.summary
    assert (s["completed"], s["failed"]) == (10, 0)
    assert s["total_output_tokens"] == sum(x.output_len for x in specs)
    assert s["total_prompt_tokens"] == sum(x.prompt_len for x in specs)
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / s["duration_s"])
    body = stub.bodies[0]
    assert body["model"] == MODEL and body["stream"] is True and body["ignore_eos"] is True
    assert body["temperature"] == 0 and body["stream_options"] == {"include_usage": True}
    assert sorted(b["max_tokens"] for b in stub.bodies) == sorted(x.output_len for x in specs)


def test_ttft_and_itl_match_the_stub_delays(serve_stub):
    ttft, gap = 0.08, 0.03
    _, url = serve_stub(ttft=ttft, chunk_delay=gap)
    result = run(url=url, concurrency=2, num_requests=4, prompt_len=(16, 16), output_len=(6, 6))
    for r in result.requests:
        assert ttft - 0.005 <= r.ttft <= ttft + 0.1
        assert len(r.itl) == 5 and all(gap - 0.015 <= g <= gap + 0.1 for g in r.itl)
        assert r.e2e >= r.ttft + sum(r.itl) - 1e-9
    assert gap - 0.005 <= result.summary["itl_s"]["mean"] <= gap + 0.03
    assert result.summary["tpot_s"]["p50"] == pytest.approx(result.summary["itl_s"]["p50"], abs=0.02)


def test_multi_token_chunks_spread_evenly(serve_stub):
    _, url = serve_stub(chunk_delay=0.04, tokens_per_chunk=2)
    result = run(url=url, num_requests=2, prompt_len=(8, 8), output_len=(10, 10))
    for r in result.requests:
        assert r.output_tokens == 10 and len(r.itl) == 9
        assert r.itl[0] == 0.0  # the second token came with the first
        assert sum(r.itl) == pytest.approx(0.16, abs=0.05)
        assert all(0.01 <= g <= 0.06 for g in r.itl[1:])


def test_spread_itl_arithmetic():
    assert spread_itl([], 0) == []
    assert spread_itl([1.0, 1.5, 2.5], 3) == [0.5, 1.0]
    assert spread_itl([1.0, 2.0], 5) == [0.0, 1 / 3, 1 / 3, 1 / 3]  # 2 tokens, then 3
    assert spread_itl([1.0], 3) == [0.0, 0.0]


def test_tokens_are_shared_out_by_text_length():
    # 10 tokens over chunks of 2, 2, 14 and 2 characters: expected 1, 1, 7 and 1 tokens
    assert tokens_per_chunk(10, 4, [2, 2, 14, 2]) == [1, 1, 7, 1]
    assert tokens_per_chunk(10, 4, [3, 3, 12, 3]) == [1, 1, 6, 2]  # 1.43, 1.43, 5.71, 1.43
    assert tokens_per_chunk(5, 2, [4, 4]) == tokens_per_chunk(5, 2) == [2, 3]  # equal: as evenly
    assert tokens_per_chunk(6, 3, [0, 0, 0]) == [2, 2, 2]  # no text: evenly
    for n, chars in ((7, [1, 9, 2]), (50, [5, 1, 1, 30, 2]), (4, [1, 1, 1, 1])):
        counts = tokens_per_chunk(n, len(chars), chars)
        assert sum(counts) == n and min(counts) >= 1
    # a stream of one-token chunks with one joined chunk of 4 tokens: its gap is split 4 ways
    itl = spread_itl([0.0, 0.1, 0.2, 0.6, 0.7], 8, [4, 4, 4, 16, 4])
    assert itl == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])


def test_chat_endpoint_skips_the_role_chunk(serve_stub):
    stub, url = serve_stub(ttft=0.06)
    result = run(url=url, endpoint="chat", num_requests=2, prompt_len=(8, 8), output_len=(3, 3))
    assert all(r.ok and r.output_tokens == 3 and r.ttft >= 0.055 for r in result.requests)
    assert stub.bodies[0]["messages"][0]["role"] == "user"


def test_failures_are_counted_with_their_status(serve_stub):
    _, url = serve_stub(failures={1: 429, 2: 500, 3: "truncate"}, period=4)
    result = run(url=url, concurrency=1, num_requests=16, prompt_len=(8, 8), output_len=(5, 5))
    s = result.summary
    assert (s["num_requests"], s["completed"], s["failed"]) == (16, 4, 12)
    assert s["failed_by_status"] == {"200": 4, "429": 4, "500": 4}
    statuses = [r.status for r in result.requests]
    assert statuses == [200, 429, 500, 200] * 4
    for r in result.requests:
        assert r.ok == (r.error is None)
        if r.status in (429, 500):
            assert f"stub failure {r.status}" in r.error and r.ttft is None
        elif not r.ok:
            assert "[DONE]" in r.error  # truncated stream
    assert s["total_output_tokens"] == 4 * 5


def test_timeouts_and_refused_connections_fail(serve_stub):
    _, url = serve_stub(ttft=2.0)
    result = run(url=url, num_requests=2, timeout=0.2, prompt_len=(8, 8), output_len=(3, 3))
    assert [(r.ok, r.status, r.error) for r in result.requests] == [(False, 200, "timed out after 0.2 s")] * 2
    assert all(0.19 <= r.e2e < 1.0 for r in result.requests)

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    result = run(url=closed, model=MODEL, num_requests=2, prompt_len=(8, 8), output_len=(3, 3))
    assert result.summary["failed_by_status"] == {"none": 2}
    refused = ("ClientConnectorError", "ConnectError")  # aiohttp's name, httpx's
    assert all(r.status is None and r.error.startswith(refused) for r in result.requests)


def test_poisson_schedule_is_reproducible_and_followed(serve_stub):
    rate, n, seed = 40.0, 16, 7
    schedule = poisson_arrivals(n, rate, seed)
    assert schedule == poisson_arrivals(n, rate, seed) != poisson_arrivals(n, rate, seed + 1)
    assert all(b > a for a, b in itertools.pairwise(schedule))
    stub, url = serve_stub(chunk_delay=0.005)
    result = run(url=url, request_rate=rate, num_requests=n, seed=seed, prompt_len=(8, 8), output_len=(4, 4))
    assert len(stub.arrivals) == n and result.summary["completed"] == n
    for r, at in zip(result.requests, schedule, strict=True):
        assert at - 0.002 <= r.start <= at + 0.05
    assert poisson_arrivals(3, math.inf, 0) == [0.0, 0.0, 0.0]


def test_closed_loop_never_exceeds_concurrency(serve_stub):
    stub, url = serve_stub(ttft=0.01, chunk_delay=0.005)
    result = run(url=url, concurrency=3, num_requests=12, prompt_len=(8, 8), output_len=(5, 5))
    assert len(stub.bodies) == 12
    assert stub.max_in_flight == 3 and result.summary["max_in_flight"] == 3


def test_ramp_up_starts_the_clients_evenly(serve_stub):
    stub, url = serve_stub(ttft=0.01, chunk_delay=0.1)  # a request lasts longer than the ramp-up
    result = run(url=url, concurrency=4, ramp_up=0.3, num_requests=8, prompt_len=(8, 8), output_len=(5, 5))
    assert result.summary["completed"] == 8 == len(stub.bodies)
    first = sorted(r.start for r in result.requests)[:4]  # each client's first request
    for k, start in enumerate(first):
        assert k * 0.075 - 0.002 <= start <= k * 0.075 + 0.05
    assert result.summary["max_in_flight"] == 4


def test_open_loop_max_concurrency_caps_in_flight(serve_stub):
    stub, url = serve_stub(ttft=0.02, chunk_delay=0.005)
    result = run(
        url=url,
        request_rate=math.inf,
        max_concurrency=2,
        num_requests=8,
        prompt_len=(8, 8),
        output_len=(3, 3),
    )
    assert result.summary["completed"] == 8
    assert stub.max_in_flight == 2 and result.summary["max_in_flight"] == 2


def test_duration_bounds_the_run(serve_stub):
    stub, url = serve_stub(ttft=0.05, chunk_delay=0.01)
    result = run(url=url, concurrency=2, num_requests=50, duration=0.3, prompt_len=(8, 8), output_len=(3, 3))
    assert 2 <= result.summary["num_requests"] <= 12
    assert len(stub.bodies) == result.summary["num_requests"] == result.summary["completed"]
    assert max(r.start for r in result.requests) < 0.3


def test_without_tokenize_prompts_are_sized_by_words(serve_stub):
    stub, url = serve_stub(tokenize=False)
    result = run(url=url, num_requests=3, prompt_len=(40, 40), output_len=(2, 2))
    assert result.config["prompt_mode"] == "words"
    assert all(len(b["prompt"].split()) == 30 for b in stub.bodies)  # 0.75 words per token
    assert all(r.ok for r in result.requests)


def test_goodput_arithmetic_on_a_hand_made_result():
    def rec(ttft, e2e, n, ok=True):
        return RequestRecord(0.0, ttft, [], e2e, n, 10, ok, 200 if ok else 500, None if ok else "x")

    records = [
        rec(0.2, 0.2 + 9 * 0.04, 10),  # meets both: tpot 0.04
        rec(0.7, 0.7 + 9 * 0.01, 10),  # ttft too slow
        rec(0.1, 0.1 + 9 * 0.06, 10),  # tpot too slow
        rec(0.1, 0.2, 10, ok=False),  # failed: never good
        rec(0.3, 0.3, 1),  # one token: no tpot, meets
    ]
    slo = parse_slo("ttft=0.5,tpot=0.05")
    assert [meets_slo(r, slo) for r in records] == [True, False, False, False, True]
    assert goodput(records, slo, duration=2.0) == pytest.approx(1.0)
    assert goodput(records, parse_slo("e2e=0.35"), duration=2.0) == pytest.approx(0.5)  # 0.3 and 0.19
    s = summarize(records, 2.0, slo)
    assert s["goodput"] == pytest.approx(1.0) and s["slo_attainment"] == pytest.approx(0.4)
    assert s["request_throughput"] == pytest.approx(2.0) and s["failed_by_status"] == {"500": 1}


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="--slo"):
        parse_slo("latency=1")
    with pytest.raises(ValueError, match="--prompt-len"):
        parse_range("64:32", "--prompt-len")
    assert parse_range("64", "--output-len") == (64, 64)
    with pytest.raises(ValueError, match="max_concurrency"):
        BenchmarkConfig(url="http://127.0.0.1:1", concurrency=2, request_rate=1.0).validate()
    with pytest.raises(ValueError, match="ramp_up"):
        BenchmarkConfig(url="http://127.0.0.1:1", request_rate=1.0, ramp_up=1.0).validate()
    with pytest.raises(ValueError, match="ramp_up"):
        BenchmarkConfig(url="http://127.0.0.1:1", concurrency=2, ramp_up=-1.0).validate()


def test_cli_writes_json_table_and_plots(serve_stub, tmp_path, capsys):
    _, url = serve_stub(ttft=0.01, chunk_delay=0.002, failures={2: 503}, period=3)
    out, plots = tmp_path / "results.json", tmp_path / "plots"
    argv = ["--url", url + "/v1", "--concurrency", "2", "--num-requests", "6", "--prompt-len", "8:16"]
    argv += [
        "--output-len",
        "4",
        "--slo",
        "ttft=1,tpot=0.5,e2e=5",
        "--out",
        str(out),
        "--plot-dir",
        str(plots),
    ]
    assert main([*argv, "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "| TTFT |" in stdout and "Goodput" in stdout

    data = json.loads(out.read_text())
    assert set(data) == {"config", "summary", "requests"}
    keys = {"start", "ttft", "itl", "e2e", "output_tokens", "prompt_tokens", "ok", "status", "error"}
    assert all(set(r) == keys for r in data["requests"])
    assert data["summary"]["failed_by_status"] == {"503": 2} and data["summary"]["completed"] == 4
    assert BenchmarkResult.load(out).summary == data["summary"]
    for name in ("requests", "throughput", "latency", "timeline", "goodput"):
        assert (plots / f"{name}.png").stat().st_size > 1000


@pytest.mark.parametrize("http_client", ["aiohttp", "httpx"])
def test_both_http_clients_count_and_time_the_same_streams(serve_stub, http_client):
    ttft, gap = 0.05, 0.02
    _, url = serve_stub(ttft=ttft, chunk_delay=gap)
    result = run(url=url, concurrency=2, num_requests=4, prompt_len=(16, 16), output_len=(5, 5),
                 http_client=http_client)  # fmt: skip
    assert result.config["http_client"] == http_client
    assert [r.output_tokens for r in result.requests] == [5] * 4 and all(r.ok for r in result.requests)
    assert all(ttft - 0.005 <= r.ttft <= ttft + 0.1 for r in result.requests)
    assert all(len(r.itl) == 4 and all(gap - 0.015 <= g <= gap + 0.1 for g in r.itl) for r in result.requests)


def test_an_unknown_http_client_is_refused_by_name():
    with pytest.raises(ValueError, match="http_client"):
        BenchmarkConfig(url="http://x", http_client="curl").validate()


def test_the_last_gap_of_each_request_is_summarized_apart():
    def rec(itl, ok=True):
        return RequestRecord(0.0, 0.1, itl, 0.1 + sum(itl), len(itl) + 1, 10, ok, 200 if ok else 500, None)

    records = [rec([0.01, 0.01, 0.05]), rec([0.02, 0.06]), rec([]), rec([0.01, 0.9], ok=False)]
    s = summarize(records, 1.0, {})
    assert s["itl_last_s"]["p50"] == pytest.approx(0.055)  # 0.05 and 0.06: failed requests and no gap left out
    assert s["itl_but_last_s"]["mean"] == pytest.approx((0.01 + 0.01 + 0.02) / 3)
    assert s["itl_s"]["mean"] == pytest.approx((0.01 + 0.01 + 0.05 + 0.02 + 0.06) / 5)
