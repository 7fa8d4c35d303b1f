"""Serving load harness: drive an OpenAI-compatible endpoint, measure TTFT, ITL, TPOT and e2e.

    python -m bench.serve --url http://127.0.0.1:8000 --concurrency 8 --num-requests 200 \\
        --prompt-len 64:256 --output-len 128 --out results.json --plot-dir plots --slo ttft=0.5,tpot=0.05

Two load shapes: closed loop (``--concurrency N``: N clients, each sends its next request when
the previous one completes) and open loop (``--request-rate R``: Poisson arrivals, optionally
capped by ``--max-concurrency``). Requests stream over SSE and are timed with an aiohttp client
(``--http-client httpx`` for httpx's); the first non-empty content chunk is the first token. Python API: ``run_benchmark``.
See docs/BENCHMARKS.md, section "Serving load harness".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np

from bench.workload import (
    PromptPlan,
    RequestSpec,
    TokenCounter,
    build_prompt,
    parse_range,
    plan_prompts,
    poisson_arrivals,
    sample_requests,
)

Endpoint = Literal["completions", "chat"]
SLO_KEYS = ("ttft", "tpot", "e2e")
PERCENTILES = (50, 90, 99)


# ----------------------------------------------------------------------------- config and records


@dataclass
class BenchmarkConfig:
    """Everything a run depends on. Lengths are inclusive (min, max) token ranges."""

    url: str  # server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)
    endpoint: Endpoint = "completions"
    model: str | None = None  # None: the first id from GET /v1/models
    concurrency: int | None = None  # closed loop; 1 when request_rate is None too
    ramp_up: float = 0.0  # closed loop: client k starts at k * ramp_up / concurrency seconds
    request_rate: float | None = None  # open loop, requests/s (math.inf: all at t=0)
    max_concurrency: int | None = None  # open loop only: cap on requests in flight
    num_requests: int = 100
    duration: float | None = None  # seconds: no request is sent after this
    prompt_len: tuple[int, int] = (128, 128)
    output_len: tuple[int, int] = (128, 128)
    seed: int = 0
    temperature: float = 0.0
    ignore_eos: bool = True
    use_tokenize: bool = True  # size prompts with POST /tokenize when the server has it
    timeout: float = 600.0  # per request, seconds, from sending to the end of the stream
    slo: dict[str, float] = field(default_factory=dict)  # subset of ttft, tpot, e2e (seconds)
    api_key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    extra_body: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    # The streaming requests' HTTP client. aiohttp parses HTTP in C: on this 2-core machine it took
    # about half the CPU per streamed token of httpx (pure-Python h11) and ~5 ms less TTFT at one
    # client, time and CPU the measured server would otherwise be charged with.
    http_client: Literal["aiohttp", "httpx"] = "aiohttp"

    @property
    def mode(self) -> Literal["closed", "open"]:
        return "open" if self.request_rate is not None else "closed"

    def validate(self) -> None:
        """Raise ValueError naming the bad field and quoting its value."""
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be 'completions' or 'chat', got {self.endpoint!r}")
        if self.request_rate is not None:
            if self.concurrency is not None:
                raise ValueError("concurrency is the closed loop; with request_rate use max_concurrency")
            if not self.request_rate > 0:
                raise ValueError(f"request_rate must be > 0, got {self.request_rate}")
        elif self.max_concurrency is not None:
            raise ValueError("max_concurrency applies to the open loop only (set request_rate)")
        if self.ramp_up:
            if self.request_rate is not None:
                raise ValueError("ramp_up applies to the closed loop only (set concurrency, not request_rate)")
            if not 0 <= self.ramp_up < math.inf:
                raise ValueError(f"ramp_up must be >= 0 seconds, got {self.ramp_up}")
        for name in ("concurrency", "max_concurrency"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.duration is not None and not self.duration > 0:
            raise ValueError(f"duration must be > 0 seconds, got {self.duration}")
        for name in ("prompt_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must satisfy 1 <= min <= max, got {(lo, hi)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.http_client not in ("aiohttp", "httpx"):
            raise ValueError(f"http_client must be 'aiohttp' or 'httpx', got {self.http_client!r}")
        for k, v in self.slo.items():
            if k not in SLO_KEYS:
                raise ValueError(f"slo key must be one of {', '.join(SLO_KEYS)}, got {k!r}")
            if not v > 0:
                raise ValueError(f"slo bound {k} must be > 0 seconds, got {v}")


@dataclass
class RequestRecord:
    """One request as the client saw it. Times in seconds; ``start`` is relative to the run start."""

    start: float
    ttft: float | None  # None when no token arrived
    itl: list[float]  # one gap per output token after the first (see spread_itl)
    e2e: float
    output_tokens: int
    prompt_tokens: int | None
    ok: bool
    status: int | None  # HTTP status; None when no response arrived (connection error, timeout)
    error: str | None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass
class BenchmarkResult:
    """What ``run_benchmark`` returns and ``--out`` writes: config, summary and every request."""

    config: dict[str, Any]
    summary: dict[str, Any]
    requests: list[RequestRecord]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "summary": self.summary,
            "requests": [asdict(r) for r in self.requests],
        }

    def write_json(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchmarkResult:
        names = {f.name for f in fields(RequestRecord)}
        reqs = [RequestRecord(**{k: v for k, v in r.items() if k in names}) for r in data["requests"]]
        return cls(config=data["config"], summary=data["summary"], requests=reqs)

    @classmethod
    def load(cls, path: str | Path) -> BenchmarkResult:
        return cls.from_dict(json.loads(Path(path).read_text()))


# ----------------------------------------------------------------------------- pure measurements


def spread_itl(chunk_times: list[float], n_tokens: int, chunk_chars: list[int] | None = None) -> list[float]:
    """Inter-token latencies from the arrival times of the content chunks of one stream.

    One token per chunk: the gaps between chunks. When the usage says there were more tokens
    than chunks (``n_tokens > len(chunk_times)``: a server that sends several tokens per event),
    the tokens are shared out over the chunks (see ``tokens_per_chunk``); a chunk's gap is split
    equally among its tokens, and the extra tokens of the first chunk, which arrived with the
    first token, get gaps of 0. The result has ``n_tokens - 1`` entries and sums to the time
    from the first chunk to the last.
    """
    m = len(chunk_times)
    gaps = [b - a for a, b in itertools.pairwise(chunk_times)]
    if m == 0 or n_tokens <= m:
        return gaps
    counts = tokens_per_chunk(n_tokens, m, chunk_chars)
    itl = [0.0] * (counts[0] - 1)
    for gap, k in zip(gaps, counts[1:], strict=True):
        itl.extend([gap / k] * k)
    return itl


def tokens_per_chunk(n_tokens: int, m: int, chunk_chars: list[int] | None = None) -> list[int]:
    """An estimate of how many of ``n_tokens`` tokens each of ``m`` chunks carried (n >= m).

    A chunk's events do not say how many tokens it has, but its text does, roughly: with
    ``chunk_chars`` (characters per chunk), chunk j is expected to carry n * chars_j / chars
    tokens; each gets at least one, and the rest go by largest remainder in proportion to how
    far each expectation exceeds one (ties to the later chunk). Without it (or without text),
    evenly: ``n // m`` each, the remainder one apiece to the last chunks.
    """
    total = sum(chunk_chars) if chunk_chars else 0
    if chunk_chars is None or len(chunk_chars) != m or total <= 0:
        base, extra = divmod(n_tokens, m)
        return [base + (1 if j >= m - extra else 0) for j in range(m)]
    rest = n_tokens - m
    if rest == 0:
        return [1] * m
    want = [max(n_tokens * c / total - 1.0, 0.0) for c in chunk_chars]
    scale = rest / sum(want)  # > 0: n > m, so some chunk expects more than one token
    shares = [w * scale for w in want]
    counts = [1 + int(x) for x in shares]
    by_remainder = sorted(range(m), key=lambda j: (shares[j] - int(shares[j]), j), reverse=True)
    for j in by_remainder[: n_tokens - sum(counts)]:
        counts[j] += 1
    return counts


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    """True when the request succeeded and meets every given bound (a missing TPOT meets it)."""
    if not record.ok:
        return False
    values = {"ttft": record.ttft, "tpot": record.tpot, "e2e": record.e2e}
    for key, bound in slo.items():
        v = values[key]
        if key == "tpot" and v is None:
            continue
        if v is None or v > bound:
            return False
    return True


def goodput(records: list[RequestRecord], slo: dict[str, float], duration: float) -> float:
    """Requests per second that succeeded and met every bound of ``slo``."""
    if duration <= 0:
        return 0.0
    return sum(meets_slo(r, slo) for r in records) / duration


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    arr = np.asarray(values, dtype=float)
    out: dict[str, float | None] = {"mean": float(arr.mean())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(arr, p))
    return out


def summarize(
    records: list[RequestRecord], duration: float, slo: dict[str, float], max_in_flight: int = 0
) -> dict[str, Any]:
    """Aggregate figures over a run. Latency statistics use successful requests only."""
    ok = [r for r in records if r.ok]
    failed_by_status: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = "none" if r.status is None else str(r.status)
            failed_by_status[key] = failed_by_status.get(key, 0) + 1
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    return {
        "duration_s": duration,
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "failed_by_status": dict(sorted(failed_by_status.items())),
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(prompt_tokens + output_tokens),
        "max_in_flight": max_in_flight,
        "ttft_s": _stats([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": _stats([g for r in ok for g in r.itl]),
        # The gap before each request's last token, and the others: a request's end (final
        # chunk, usage, response close, accounting) shows here rather than in the mass of gaps.
        "itl_last_s": _stats([r.itl[-1] for r in ok if r.itl]),
        "itl_but_last_s": _stats([g for r in ok for g in r.itl[:-1]]),
        "tpot_s": _stats([t for r in ok if (t := r.tpot) is not None]),
        "e2e_s": _stats([r.e2e for r in ok]),
        "slo": dict(slo) or None,
        "goodput": goodput(records, slo, duration) if slo else None,
        "slo_attainment": (sum(meets_slo(r, slo) for r in records) / len(records))
        if slo and records
        else None,
    }


# ----------------------------------------------------------------------------- HTTP


def base_url(url: str) -> str:
    """The server root: ``http://host:port/v1/`` and ``http://host:port`` both give the latter."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _error_text(raw: bytes) -> str:
    try:
        data = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")[:500]
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data))
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err)[:500]
    return str(data)[:500]


async def fetch_model(client: httpx.AsyncClient) -> str:
    """The first model id from ``GET /v1/models``."""
    resp = await client.get("/v1/models")
    if resp.status_code != 200:
        raise RuntimeError(
            f"GET /v1/models returned {resp.status_code}: {_error_text(resp.content)}; pass --model"
        )
    data = resp.json().get("data") or []
    if not data:
        raise RuntimeError("GET /v1/models listed no models; pass --model")
    return str(data[0]["id"])


async def tokenize_counter(client: httpx.AsyncClient) -> TokenCounter | None:
    """A coroutine counting tokens with ``POST /tokenize``, or None when the server has none."""

    async def count(text: str) -> int:
        resp = await client.post("/tokenize", json={"text": text})
        if resp.status_code != 200:
            raise RuntimeError(f"POST /tokenize returned {resp.status_code}: {_error_text(resp.content)}")
        data = resp.json()
        return int(data["count"]) if "count" in data else len(data["tokens"])

    try:
        await count("the")
    except (httpx.HTTPError, RuntimeError, ValueError, KeyError, TypeError):
        return None
    return count


def request_body(config: BenchmarkConfig, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": config.ignore_eos,
    }
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    body.update(config.extra_body)
    return body


class _Stream:
    """What one streamed response said, line by line: chunk times and sizes, usage, errors."""

    def __init__(self, endpoint: Endpoint, text: list[str] | None):
        self.endpoint, self.text = endpoint, text
        self.chunk_times: list[float] = []
        self.chunk_chars: list[int] = []  # characters of text per chunk: how spread_itl shares tokens out
        self.usage: dict[str, Any] | None = None
        self.status: int | None = None
        self.error: str | None = None
        self.finished = False

    def line(self, line: str, now: float) -> bool:
        """Take one line of the stream, received at ``now``; True when the stream is over."""
        if not line.startswith("data:"):
            return False
        data = line[5:].strip()
        if data == "[DONE]":
            self.finished = True
            return True
        chunk = json.loads(data)
        if chunk.get("error"):
            self.error = f"error in stream: {_error_text(json.dumps(chunk).encode())}"
            return True
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        chars = 0
        for choice in chunk.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") if self.endpoint == "chat" else choice.get("text")
            chars += len(piece or "")
            if self.text is not None and piece:
                self.text.append(piece)
            reason = choice.get("finish_reason")
            if reason in ("error", "abort"):
                self.error = f"finish_reason {reason!r}"
            elif reason is not None:
                self.finished = True
        if chars:
            self.chunk_times.append(now)
            self.chunk_chars.append(chars)
        return self.error is not None


async def _read_httpx(client: httpx.AsyncClient, path: str, body: dict[str, Any], st: _Stream) -> None:
    async with client.stream("POST", path, json=body) as resp:
        st.status = resp.status_code
        if st.status != 200:
            st.error = _error_text(await resp.aread())
            return
        async for line in resp.aiter_lines():
            if st.line(line, time.perf_counter()):
                return


@dataclass(frozen=True)
class AiohttpStreams:
    """An aiohttp session and the server root its requests go to (``base_url``'s result)."""

    session: Any  # aiohttp.ClientSession
    root: str


async def _read_aiohttp(client: AiohttpStreams, path: str, body: dict[str, Any], st: _Stream) -> None:
    async with client.session.post(client.root + path, json=body) as resp:
        st.status = resp.status
        if st.status != 200:
            st.error = _error_text(await resp.read())
            return
        async for raw in resp.content:  # one line at a time, its newline included
            if st.line(raw.decode().rstrip("\r\n"), time.perf_counter()):
                return


def _client_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (httpx.HTTPError, httpx.StreamError)
    try:
        import aiohttp
    except ImportError:
        return errors
    return (*errors, aiohttp.ClientError)


async def send_request(
    client: Any,
    endpoint: Endpoint,
    body: dict[str, Any],
    prompt_tokens_hint: int | None,
    run_start: float,
    timeout: float = math.inf,
    text: list[str] | None = None,
) -> RequestRecord:
    """Send one streaming request and time it. Never raises for a failed request.

    ``client``: an ``httpx.AsyncClient`` with the server's root as its base URL, or ``AiohttpStreams``. ``text``: when given, the streamed pieces of text are appended to it (multi-turn
    workloads).
    """
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    st = _Stream(endpoint, text)
    read = _read_httpx if isinstance(client, httpx.AsyncClient) else _read_aiohttp
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(None if math.isinf(timeout) else timeout):
            await read(client, path, body, st)
        if st.status == 200 and st.error is None and not st.finished:
            st.error = "stream ended before [DONE] or a finish_reason"
    except TimeoutError:
        st.error = f"timed out after {timeout:g} s"
    except _client_errors() as e:
        st.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    except (ValueError, AttributeError) as e:  # malformed JSON or chunk shape
        st.error = f"malformed stream: {e}"
    end = time.perf_counter()
    # Usage counts are trusted when plausible: some servers (LitServe's OpenAISpec) send zeros.
    usage = st.usage or {}
    n_out = max(int(usage.get("completion_tokens") or 0), len(st.chunk_times))
    n_prompt = int(usage.get("prompt_tokens") or 0) or prompt_tokens_hint
    return RequestRecord(
        start=t0 - run_start,
        ttft=st.chunk_times[0] - t0 if st.chunk_times else None,
        itl=spread_itl(st.chunk_times, n_out, st.chunk_chars),
        e2e=end - t0,
        output_tokens=n_out,
        prompt_tokens=n_prompt,
        ok=st.error is None,
        status=st.status,
        error=st.error,
    )


# ----------------------------------------------------------------------------- running


class _Progress:
    """tqdm when installed, else a one-line bar on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.n, self.enabled, self._bar = total, 0, enabled, None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self) -> None:
        self.n += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.enabled:
            done = int(30 * self.n / self.total)
            print(f"\r[{'#' * done}{'.' * (30 - done)}] {self.n}/{self.total}", end="", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(file=sys.stderr)


async def _prepare(
    client: httpx.AsyncClient, config: BenchmarkConfig, specs: list[RequestSpec]
) -> tuple[list[tuple[str, int | None]], PromptPlan]:
    count = await tokenize_counter(client) if config.use_tokenize else None
    plan = await plan_prompts(count)
    sem = asyncio.Semaphore(16)

    async def one(spec: RequestSpec) -> tuple[str, int | None]:
        async with sem:
            return await build_prompt(spec, plan, count)

    return list(await asyncio.gather(*(one(s) for s in specs))), plan


@contextlib.asynccontextmanager
async def _stream_client(config: BenchmarkConfig, headers: dict[str, str], client: httpx.AsyncClient):
    """The client the streaming requests go through: ``client`` itself, or an aiohttp session."""
    if config.http_client == "httpx":
        yield client
        return
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)  # as many connections as requests in flight
    async with aiohttp.ClientSession(
        headers=headers,
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),  # send_request bounds each request itself
        read_bufsize=1 << 20,  # a chunk's line may be long (logprobs)
    ) as session:
        yield AiohttpStreams(session, base_url(config.url))


async def run_benchmark(config: BenchmarkConfig) -> BenchmarkResult:
    """Run one benchmark against ``config.url`` and return every request and the summary."""
    config.validate()
    headers = dict(config.headers)
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with (
        httpx.AsyncClient(
            base_url=base_url(config.url), headers=headers, timeout=config.timeout, limits=limits
        ) as client,
        _stream_client(config, headers, client) as streams,
    ):
        model = config.model or await fetch_model(client)
        specs = sample_requests(config.num_requests, config.prompt_len, config.output_len, config.seed)
        if config.progress:
            print(f"preparing {len(specs)} prompts", file=sys.stderr)
        prompts, plan = await _prepare(client, config, specs)
        bodies = [
            request_body(config, model, text, s.output_len)
            for s, (text, _) in zip(specs, prompts, strict=True)
        ]

        records: dict[int, RequestRecord] = {}
        in_flight = max_in_flight = 0
        progress = _Progress(config.num_requests, config.progress)
        run_start, cpu_start = time.perf_counter(), time.process_time()
        deadline = run_start + config.duration if config.duration is not None else math.inf

        async def one(i: int) -> None:
            nonlocal in_flight, max_in_flight
            in_flight += 1
            max_in_flight = max(max_in_flight, in_flight)
            try:
                records[i] = await send_request(
                    streams, config.endpoint, bodies[i], prompts[i][1], run_start, config.timeout
                )
            finally:
                in_flight -= 1
                progress.update()

        try:
            if config.mode == "closed":
                pending = iter(range(config.num_requests))

                clients = config.concurrency or 1

                async def user(k: int) -> None:
                    # A load shape, not synchronization: spread the first requests over ramp_up
                    # seconds instead of sending all of them in the same millisecond.
                    if (delay := run_start + k * config.ramp_up / clients - time.perf_counter()) > 0:
                        await asyncio.sleep(delay)
                    while time.perf_counter() < deadline and (i := next(pending, None)) is not None:
                        await one(i)

                await asyncio.gather(*(user(k) for k in range(clients)))
            else:
                assert config.request_rate is not None
                arrivals = poisson_arrivals(config.num_requests, config.request_rate, config.seed)
                cap = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None

                async def capped(i: int) -> None:
                    if cap is None:
                        return await one(i)
                    async with cap:
                        return await one(i)

                tasks = []
                for i, at in enumerate(arrivals):
                    if run_start + at >= deadline:
                        break
                    if (delay := run_start + at - time.perf_counter()) > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(capped(i)))
                await asyncio.gather(*tasks)
        finally:
            progress.close()
        duration = time.perf_counter() - run_start
        client_cpu = time.process_time() - cpu_start

    ordered = [records[i] for i in sorted(records)]
    cfg = asdict(config)
    cfg.update(
        model=model,
        mode=config.mode,
        prompt_mode=plan.mode,
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        api_key=None if config.api_key is None else "***",
    )
    summary = summarize(ordered, duration, config.slo, max_in_flight)
    # One Python process parses about 15k chunks/s; near one core of CPU, the client is the limit.
    summary["client_cpu_s"] = client_cpu
    if duration > 1 and client_cpu > 0.8 * duration:
        print(
            f"warning: the client used {client_cpu:.1f} s of CPU in {duration:.1f} s: "
            "it may be the bottleneck (run several harness processes, or fewer clients)",
            file=sys.stderr,
        )
    return BenchmarkResult(config=cfg, summary=summary, requests=ordered)


# ----------------------------------------------------------------------------- reporting


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.1f}"


def markdown_table(result: BenchmarkResult) -> str:
    """The summary as a markdown table (latencies in milliseconds)."""
    s, c = result.summary, result.config
    load = f"closed loop, {c.get('concurrency') or 1} clients"
    if c.get("ramp_up"):
        load += f" started over {c['ramp_up']:g} s"
    if c.get("mode") == "open":
        cap = c.get("max_concurrency")
        load = f"Poisson, {c.get('request_rate')} req/s" + (f", at most {cap} in flight" if cap else "")
    failed = ", ".join(f"{k}: {v}" for k, v in s["failed_by_status"].items())
    rows = [
        ("Load", load),
        ("Endpoint / model", f"{c.get('endpoint')} / {c.get('model')}"),
        ("Duration (s)", f"{s['duration_s']:.2f}"),
        ("Successful requests", str(s["completed"])),
        ("Failed requests", f"{s['failed']}" + (f" ({failed})" if failed else "")),
        ("Max in flight", str(s["max_in_flight"])),
        ("Prompt / output tokens", f"{s['total_prompt_tokens']} / {s['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{s['output_throughput']:.1f}"),
        ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.1f}"),
    ]
    if s.get("goodput") is not None:
        bounds = ", ".join(f"{k} ≤ {v:g} s" for k, v in s["slo"].items())
        rows.append(
            (
                f"Goodput (req/s; {bounds})",
                f"{s['goodput']:.2f} ({100 * s['slo_attainment']:.0f}% of requests)",
            )
        )
    lines = ["| Metric | Value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    lines += ["| Latency (ms) | mean | p50 | p90 | p99 |", "|---|---|---|---|---|"]
    for name, key in (("TTFT", "ttft_s"), ("ITL", "itl_s"), ("TPOT", "tpot_s"), ("E2E", "e2e_s")):
        st = s[key]
        lines.append(
            f"| {name} | {_ms(st['mean'])} | {_ms(st['p50'])} | {_ms(st['p90'])} | {_ms(st['p99'])} |"
        )
    return "\n".join(lines)


def plot_results(result: BenchmarkResult, plot_dir: str | Path) -> list[Path]:
    """Write PNG plots of a result; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(plot_dir)
    out.mkdir(parents=True, exist_ok=True)
    s, reqs = result.summary, result.requests
    ok = [r for r in reqs if r.ok]
    title = f"{result.config.get('model')} · {result.config.get('mode')} loop · {s['num_requests']} requests"
    paths: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)

    # Successful and failed requests, failures by status.
    labels = ["ok"] + [f"failed ({k})" for k in s["failed_by_status"]]
    counts = [s["completed"], *s["failed_by_status"].values()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(labels, counts, color=["tab:green"] + ["tab:red"] * (len(labels) - 1))
    ax.bar_label(bars)
    ax.margins(y=0.15)
    ax.set_ylabel("requests")
    save(fig, "requests.png")

    # Request and output token throughput over time (token times rebuilt from ttft + itl).
    duration = max(s["duration_s"], 1e-9)
    width = 1.0 if duration >= 20 else duration / 20
    edges = np.arange(0.0, duration + width, width)
    done_t = [r.start + r.e2e for r in ok]
    tok_t = [
        r.start + r.ttft + x
        for r in ok
        if r.ttft is not None
        for x in np.concatenate([[0.0], np.cumsum(r.itl)])
    ]
    fig, axes = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for ax, times, mean, unit in (
        (axes[0], done_t, s["request_throughput"], "requests/s"),
        (axes[1], tok_t, s["output_throughput"], "output tokens/s"),
    ):
        hist, _ = np.histogram(times, bins=edges)
        ax.stairs(hist / width, edges)
        ax.axhline(mean, color="tab:gray", ls="--", label=f"mean {mean:.1f}")
        ax.set_ylabel(unit)
        ax.legend(loc="lower right", fontsize=8)
    axes[1].set_xlabel("time since start (s)")
    save(fig, "throughput.png")

    # TTFT, ITL, TPOT, e2e: mean, p50, p90, p99, with the SLO bound where one was given.
    fig, axes = plt.subplots(2, 2, figsize=(8, 6))
    slo = s.get("slo") or {}
    for ax, (name, key, slo_key) in zip(
        axes.flat,
        (
            ("TTFT", "ttft_s", "ttft"),
            ("ITL", "itl_s", None),
            ("TPOT", "tpot_s", "tpot"),
            ("E2E", "e2e_s", "e2e"),
        ),
        strict=True,
    ):
        st = s[key]
        vals = [1000 * (st[k] or 0.0) for k in ("mean", "p50", "p90", "p99")]
        bars = ax.bar(["mean", "p50", "p90", "p99"], vals, color="tab:blue")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        if slo_key in slo:
            ax.axhline(1000 * slo[slo_key], color="tab:red", ls="--", label="SLO")
            ax.legend(fontsize=8)
        ax.set_title(name)
        ax.set_ylabel("ms")
    save(fig, "latency.png")

    # Per-request timeline: TTFT and e2e against send time; failures marked.
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter([r.start for r in ok], [1000 * r.e2e for r in ok], s=8, label="e2e")
    ax.scatter(
        [r.start for r in ok if r.ttft is not None],
        [1000 * r.ttft for r in ok if r.ttft is not None],
        s=8,
        label="TTFT",
    )
    bad = [r for r in reqs if not r.ok]
    if bad:
        ax.scatter(
            [r.start for r in bad],
            [1000 * r.e2e for r in bad],
            s=14,
            marker="x",
            color="tab:red",
            label="failed",
        )
    ax.set_xlabel("send time since start (s)")
    ax.set_ylabel("ms")
    ax.legend(fontsize=8)
    save(fig, "timeline.png")

    # Goodput against throughput, and how many requests met each bound.
    if slo:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.5))
        bars = ax1.bar(
            ["throughput", "goodput"],
            [s["request_throughput"], s["goodput"]],
            color=["tab:blue", "tab:green"],
        )
        ax1.bar_label(bars, fmt="%.2f")
        ax1.margins(y=0.15)
        ax1.set_ylabel("requests/s")
        n = max(len(reqs), 1)
        names = [*slo, "all"]
        frac = [100 * sum(meets_slo(r, {k: slo[k]}) for r in reqs) / n for k in slo] + [
            100 * s["slo_attainment"]
        ]
        bars = ax2.bar(names, frac, color="tab:green")
        ax2.bar_label(bars, fmt="%.0f%%")
        ax2.set_ylim(0, 115)
        ax2.set_ylabel("% of requests meeting the bound")
        save(fig, "goodput.png")
    return paths


# ----------------------------------------------------------------------------- command line


def parse_slo(text: str) -> dict[str, float]:
    """``"ttft=0.5,tpot=0.05,e2e=10"`` → ``{"ttft": 0.5, "tpot": 0.05, "e2e": 10.0}`` (seconds)."""
    slo: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in SLO_KEYS:
            raise ValueError(f"--slo takes KEY=SECONDS with KEY in {', '.join(SLO_KEYS)}, got {part!r}")
        try:
            slo[key.strip()] = float(value)
        except ValueError:
            raise ValueError(
                f"--slo bound for {key.strip()} must be a number of seconds, got {value!r}"
            ) from None
    return slo


def _parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise ValueError(f"--header takes 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def run_sync(config: BenchmarkConfig) -> BenchmarkResult:
    """``run_benchmark`` on uvloop when it is installed (the dev extra installs it).

    The load generator shares the machine with the server it measures: every CPU-second it spends
    parsing chunks is taken from the server. uvloop's event loop costs less per chunk.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run_benchmark(config))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run_benchmark(config))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.serve",
        description="Load-test an OpenAI-compatible text-generation server over streaming HTTP.",
    )
    p.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--endpoint", choices=["completions", "chat"], default="completions", help="default: completions"
    )
    p.add_argument("--model", default=None, help="model name (default: first id from GET /v1/models)")
    load = p.add_argument_group("load")
    load.add_argument("--concurrency", type=int, default=None, help="closed loop: N clients (default 1)")
    load.add_argument(
        "--ramp-up",
        type=float,
        default=0.0,
        help="closed loop: start the clients evenly over this many seconds (default: 0, all at once)",
    )
    load.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="open loop: Poisson arrivals, requests/s ('inf': all at once)",
    )
    load.add_argument(
        "--max-concurrency", type=int, default=None, help="open loop: cap on requests in flight"
    )
    load.add_argument("--num-requests", type=int, default=100, help="requests to send at most (default: 100)")
    load.add_argument("--duration", type=float, default=None, help="send no request after this many seconds")
    wl = p.add_argument_group("workload")
    wl.add_argument(
        "--prompt-len", default="128:128", help="prompt tokens, MIN:MAX (uniform) or N (default: 128:128)"
    )
    wl.add_argument(
        "--output-len", default="128:128", help="output tokens (max_tokens), MIN:MAX or N (default: 128:128)"
    )
    wl.add_argument("--seed", type=int, default=0, help="workload and arrival seed (default: 0)")
    wl.add_argument("--temperature", type=float, default=0.0, help="default: 0 (greedy)")
    wl.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos: true")
    wl.add_argument(
        "--no-tokenize", action="store_true", help="size prompts by words even if POST /tokenize exists"
    )
    wl.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    p.add_argument("--slo", default=None, help="goodput bounds in seconds, e.g. ttft=0.5,tpot=0.05,e2e=10")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds (default: 600)")
    p.add_argument(
        "--http-client", choices=["aiohttp", "httpx"], default="aiohttp",
        help="the streaming requests' client (default: aiohttp, the lighter on CPU)",
    )  # fmt: skip
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--header", action="append", default=[], help="extra header 'Name: value' (repeatable)")
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--plot-dir", default=None, help="write PNG plots here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    chat = p.add_argument_group(
        "multi-turn chat (bench/chat_workload.py): one system prompt, conversations that grow turn by turn"
    )
    chat.add_argument("--chat-turns", type=int, default=None,
                      help="run the chat workload with this many turns per conversation (replaces the load options)")
    chat.add_argument("--conversations", type=int, default=4, help="conversations at once (default: 4)")
    chat.add_argument("--system-len", type=int, default=1228, help="system prompt tokens (default: 1228)")
    chat.add_argument("--user-len", type=int, default=48, help="tokens per user message (default: 48)")
    chat.add_argument("--compare-cache", action="store_true",
                      help="run each round with cache_prompt false and on, and compare TTFT, tokens/s, hit rate")
    chat.add_argument("--rounds", type=int, default=2, help="--compare-cache: rounds (default: 2)")
    chat.add_argument("--prefix-block-size", type=int, default=16,
                      help="the server's prefix-cache block size, for the predicted hit rate (default: 16)")
    return p


async def run_chat_compare(config: BenchmarkConfig, work: Any, rounds: int, compare: bool = True) -> dict[str, Any]:
    """The multi-turn chat workload, with and without prefix caching (``compare``), in one run."""
    from bench.chat_workload import (
        conversation_texts,
        predicted_hits,
        prefix_counters,
        run_pass,
        token_ids,
    )

    work.validate()
    headers = dict(config.headers)
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    async with httpx.AsyncClient(base_url=base_url(config.url), headers=headers, timeout=config.timeout) as client:
        model = config.model or await fetch_model(client)
        count = await tokenize_counter(client)
        t0 = time.perf_counter()

        async def send(body: dict[str, Any], sink: list[str]) -> RequestRecord:
            return await send_request(client, "chat", body, None, t0, config.timeout, sink)

        variants = ("off", "on") if compare else ("on",)
        passes: dict[str, dict[str, Any]] = {v: {"records": [], "duration": 0.0, "sent": [],
                                                  "queries": 0.0, "hits": 0.0} for v in variants}
        # Warm-up: one short conversation outside the figures (first-run allocations, thread pools).
        warm = dataclasses.replace(work, conversations=1, turns=1, system_len=64)
        system, users = await conversation_texts(count, warm, rounds + 1)
        await run_pass(client, send, model, warm, system, users, {"cache_prompt": False})
        for r in range(rounds):
            system, users = await conversation_texts(count, work, r)
            for v in variants if r % 2 == 0 else variants[::-1]:  # alternate which goes first
                before = await prefix_counters(client)
                extra = {"ignore_eos": config.ignore_eos, "cache_prompt": v == "on", **config.extra_body}
                records, sent, dt = await run_pass(client, send, model, work, system, users, extra)
                after = await prefix_counters(client)
                p = passes[v]
                p["records"] += records
                p["sent"] += sent
                p["duration"] += dt
                if before is not None and after is not None:
                    p["queries"] += after[0] - before[0]
                    p["hits"] += after[1] - before[1]
                if config.progress:
                    print(f"round {r + 1}/{rounds}, cache {v}: {len(records)} requests in {dt:.1f} s", file=sys.stderr)
        ids = [await token_ids(client, m) for m in passes["on"]["sent"]] if count is not None else []
    hits, queries = predicted_hits(ids, work.block_size) if ids else (0, 0)
    out: dict[str, Any] = {"workload": dataclasses.asdict(work), "rounds": rounds, "model": model,
                           "predicted_hit_rate": hits / queries if queries else None}
    for v, p in passes.items():
        s = summarize(p["records"], p["duration"], config.slo)
        s["hit_rate"] = p["hits"] / p["queries"] if p["queries"] else None
        out[v] = s
    if compare:
        on, off = out["on"], out["off"]
        out["ttft_p50_speedup"] = off["ttft_s"]["p50"] / on["ttft_s"]["p50"] if on["ttft_s"]["p50"] else None
        out["output_throughput_ratio"] = (
            on["output_throughput"] / off["output_throughput"] if off["output_throughput"] else None
        )
    return out


def chat_table(result: dict[str, Any]) -> str:
    """The chat comparison as a markdown table (latencies in milliseconds)."""
    variants = [v for v in ("off", "on") if v in result]
    rows = ["| | " + " | ".join(f"cache {v}" for v in variants) + " |", "|---|" + "---:|" * len(variants)]

    def row(name: str, f: Any) -> None:
        rows.append(f"| {name} | " + " | ".join(f(result[v]) for v in variants) + " |")

    row("requests (failed)", lambda s: f"{s['completed']} ({s['failed']})")
    row("TTFT p50 / p99 (ms)", lambda s: f"{_ms(s['ttft_s']['p50'])} / {_ms(s['ttft_s']['p99'])}")
    row("ITL p50 (ms)", lambda s: _ms(s["itl_s"]["p50"]))
    row("e2e p50 (ms)", lambda s: _ms(s["e2e_s"]["p50"]))
    row("output tokens/s", lambda s: f"{s['output_throughput']:.1f}")
    row("prompt tokens", lambda s: str(s["total_prompt_tokens"]))
    row("measured hit rate", lambda s: "-" if s["hit_rate"] is None else f"{s['hit_rate']:.3f}")
    lines = rows
    pred = result.get("predicted_hit_rate")
    lines.append("")
    lines.append(f"predicted hit rate (cache on): {'-' if pred is None else f'{pred:.3f}'}")
    if "ttft_p50_speedup" in result:
        lines.append(f"TTFT p50 off / on: {result['ttft_p50_speedup']:.2f}x; "
                     f"output tokens/s on / off: {result['output_throughput_ratio']:.2f}x")
    return "\n".join(lines)


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    extra = json.loads(args.extra_body) if args.extra_body else {}
    if not isinstance(extra, dict):
        raise ValueError(f"--extra-body must be a JSON object, got {args.extra_body!r}")
    return BenchmarkConfig(
        url=args.url,
        endpoint=args.endpoint,
        model=args.model,
        concurrency=args.concurrency,
        ramp_up=args.ramp_up,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        num_requests=args.num_requests,
        duration=args.duration,
        prompt_len=parse_range(args.prompt_len, "--prompt-len"),
        output_len=parse_range(args.output_len, "--output-len"),
        seed=args.seed,
        temperature=args.temperature,
        ignore_eos=not args.no_ignore_eos,
        use_tokenize=not args.no_tokenize,
        timeout=args.timeout,
        slo=parse_slo(args.slo) if args.slo else {},
        api_key=args.api_key,
        headers=dict(_parse_header(h) for h in args.header),
        extra_body=extra,
        progress=not args.no_progress,
        http_client=args.http_client,
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0, or 1 when no request succeeded."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.chat_turns is not None:
        return _main_chat(parser, args)
    try:
        config = config_from_args(args)
        config.validate()
    except ValueError as e:
        parser.error(str(e))
    result = run_sync(config)
    print(markdown_table(result))
    if args.out:
        result.write_json(args.out)
        print(f"\nwrote {args.out}", file=sys.stderr)
    if args.plot_dir:
        for path in plot_results(result, args.plot_dir):
            print(f"wrote {path}", file=sys.stderr)
    return 0 if result.summary["completed"] > 0 else 1


def _main_chat(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from bench.chat_workload import ChatWorkload

    out_len = parse_range(args.output_len, "--output-len")[1]
    work = ChatWorkload(conversations=args.conversations, turns=args.chat_turns, system_len=args.system_len,
                        user_len=args.user_len, output_len=out_len, block_size=args.prefix_block_size,
                        seed=args.seed)
    try:
        work.validate()
        config = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    result = asyncio.run(run_chat_compare(config, work, args.rounds, compare=args.compare_cache))
    print(chat_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(
            {k: v for k, v in result.items()}, indent=2, default=str))
        print(f"\nwrote {args.out}", file=sys.stderr)
    return 0 if result["on"]["completed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
