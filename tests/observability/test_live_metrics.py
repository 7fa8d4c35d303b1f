"""End to end: a burst of OpenAI-client requests against the real service, scraped by a real
Prometheus; every count matches what the client saw, latencies agree within bucket resolution,
and every expression of the Grafana dashboard and of the alert rules works on the result.
"""

from __future__ import annotations

import importlib.util
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
from obs_harness import (
    ROOT,
    data_bearing_parts,
    parse_exposition,
    require_binary,
    selectors,
    total,
    wait_until,
)

from service.metrics import E2E_BUCKETS, FINISH_REASONS, ITL_BUCKETS, TTFT_BUCKETS

openai = pytest.importorskip("openai")

N_REQUESTS = 24
PROMPTS = [
    "To be, or not to be, that is the question:",
    "Shall I compare thee to a summer's day?",
    "Now is the winter of our discontent",
    "If music be the food of love, play on;",
]
ROUTES = {"completion": "/v1/completions", "chat": "/v1/chat/completions", "generate": "/generate"}


@dataclass
class ClientRecord:
    """One request as the client saw it."""

    kind: str  # completion | chat | generate
    stream: bool
    status: int  # 200, or the error's HTTP status
    start: float  # time.monotonic()
    end: float
    ttft: float | None = None  # streaming: first chunk with text (generate: with tokens)
    chunk_times: list[float] = field(default_factory=list)  # streaming: arrival of those chunks
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    server: dict | None = None  # generate with details: the server's own timings of the request

    @property
    def route(self) -> str:
        return ROUTES[self.kind]

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def ok(self) -> bool:
        return self.status == 200


def _one(client, model: str, i: int) -> ClientRecord:
    """Burst request ``i``: completion/chat x non-streaming/streaming in turn, varied lengths,
    the last one invalid (max_tokens=0)."""
    kind = "chat" if i % 4 >= 2 else "completion"
    stream = i % 2 == 1
    invalid = i == N_REQUESTS - 1  # one request the service must refuse (validation)
    max_tokens = 0 if invalid else 6 + (i * 5) % 27
    prompt = PROMPTS[i % len(PROMPTS)]
    rec = ClientRecord(kind, stream, 0, time.monotonic(), 0.0)
    common = dict(model=model, max_tokens=max_tokens, temperature=0.8, seed=i, stream=stream)
    if stream:
        common["stream_options"] = {"include_usage": True}
    try:
        if kind == "completion":
            resp = client.completions.create(prompt=prompt, **common)
        else:
            resp = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
        if stream:
            for chunk in resp:
                for c in chunk.choices:
                    text = c.text if kind == "completion" else (c.delta.content or "")
                    if text:
                        rec.chunk_times.append(time.monotonic())
                        if rec.ttft is None:
                            rec.ttft = rec.chunk_times[0] - rec.start
                    if c.finish_reason:
                        rec.finish_reason = c.finish_reason
                if chunk.usage is not None:
                    rec.prompt_tokens = chunk.usage.prompt_tokens
                    rec.completion_tokens = chunk.usage.completion_tokens
        else:
            rec.finish_reason = resp.choices[0].finish_reason
            rec.prompt_tokens = resp.usage.prompt_tokens
            rec.completion_tokens = resp.usage.completion_tokens
        rec.status = 200
    except openai.APIStatusError as e:
        rec.status = e.status_code
    rec.end = time.monotonic()
    return rec


def _calm_one(http: httpx.Client, i: int) -> ClientRecord:
    """Calm-phase request: streaming POST /generate with details, which returns the server's
    own TTFT and e2e of the request in its final chunk."""
    body = {
        "text": PROMPTS[i % len(PROMPTS)],
        "max_tokens": 6 + (i * 7) % 40,
        "stream": True,
        "details": True,
    }
    rec = ClientRecord("generate", True, 0, time.monotonic(), 0.0)
    with http.stream("POST", "/generate", json=body) as r:
        rec.status = r.status_code
        for line in r.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("token_ids"):
                rec.chunk_times.append(time.monotonic())
            if chunk.get("usage"):
                rec.prompt_tokens = chunk["usage"]["prompt_tokens"]
                rec.completion_tokens = chunk["usage"]["completion_tokens"]
                rec.finish_reason = chunk["finish_reason"]
                rec.server = chunk["details"]["timings"]
    rec.end = time.monotonic()
    rec.ttft = rec.chunk_times[0] - rec.start if rec.chunk_times else None
    return rec


N_CALM = 8
HISTOGRAMS = (
    "textgen_time_to_first_token_seconds",
    "textgen_inter_token_latency_seconds",
    "textgen_e2e_request_latency_seconds",
)


@dataclass
class Burst:
    """Phase 1: N_REQUESTS concurrent OpenAI-client requests (some may get 429). Phase 2
    ("calm"): N_CALM streaming /generate requests one after the other on an idle server, each
    answered with the server's own timings, so that latencies can be compared request by request."""

    model: str  # from /v1/models
    burst: list[ClientRecord]
    calm: list[ClientRecord]
    t_start: float  # wall clock, for Prometheus
    t_end: float
    direct: dict  # /metrics as served after both phases
    before_calm: dict[str, dict[float, float]]  # Prometheus: cumulative buckets after phase 1
    after_calm: dict[str, dict[float, float]]  # ... and after phase 2
    calm_sums: dict[str, float]  # Prometheus: the histograms' _sum gained in phase 2

    @property
    def records(self) -> list[ClientRecord]:
        return self.burst + self.calm

    @property
    def ok(self) -> list[ClientRecord]:
        return [r for r in self.records if r.ok]

    def calm_histogram(self, hist: str) -> dict[float, float]:
        """The server's histogram of the calm phase alone: a difference of cumulative counts."""
        return {le: n - self.before_calm[hist].get(le, 0.0) for le, n in self.after_calm[hist].items()}


def _settle(stack, n_finished: int, after: float) -> tuple[dict, float]:
    """Wait until /metrics shows ``n_finished`` finished requests and an idle engine, and
    Prometheus has scraped that at least twice after ``after`` (rate() needs two samples of a
    series that appeared during the phase). Returns the exposition and the last scrape time."""
    direct = wait_until(
        lambda: (
            s
            if total(s := parse_exposition(stack.metrics_text()), "textgen_requests_finished_total")
            == n_finished
            and total(s, "textgen_num_requests_running") == 0
            else None
        ),
        30,
        f"/metrics to show {n_finished} finished requests and an idle engine",
    )
    prom = stack.prometheus

    def scraped() -> float | None:
        t = prom.value('timestamp(up{job="textgen"})') or 0.0
        ok = (
            t > after + 2.5  # scrape interval 1 s
            and prom.value("sum(textgen_requests_finished_total)", at=t) == n_finished
            and prom.value("sum(textgen_num_requests_running)", at=t) == 0
        )
        return t if ok else None

    return direct, wait_until(
        scraped, 30, "Prometheus to scrape the service twice after the phase", interval=0.25
    )


def _buckets(prom, hist: str, at: float) -> dict[float, float]:
    res = prom.query(f"sum by (le) ({hist}_bucket)", at=at)
    return {float(r["metric"]["le"]): float(r["value"][1]) for r in res}


@pytest.fixture(scope="module")
def burst(stack) -> Burst:
    client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    before = parse_exposition(stack.metrics_text())
    assert total(before, "textgen_requests_finished_total") == 0, "the service must start with zero counts"
    prom = stack.prometheus

    t_start = time.time()
    with ThreadPoolExecutor(N_REQUESTS) as pool:
        burst = list(pool.map(lambda i: _one(client, model, i), range(N_REQUESTS)))
    t_burst = time.time()
    unexpected = [r for r in burst if r.status not in (200, 400, 422, 429)]
    assert not unexpected, f"unexpected HTTP statuses: {[(r.route, r.status) for r in unexpected]}"
    n_ok = sum(r.ok for r in burst)
    assert n_ok >= 8, f"too few successes to compare: {[r.status for r in burst]}"
    _, t1 = _settle(stack, n_ok, t_burst)
    before_calm = {h: _buckets(prom, h, t1) for h in HISTOGRAMS}
    sums1 = {h: prom.value(f"sum({h}_sum)", at=t1) for h in HISTOGRAMS}

    with httpx.Client(base_url=stack.base_url, timeout=120) as http:
        calm = [_calm_one(http, i) for i in range(N_CALM)]
    t_end = time.time()
    assert all(r.ok for r in calm), [r.status for r in calm]
    direct, t2 = _settle(stack, n_ok + N_CALM, t_end)
    after_calm = {h: _buckets(prom, h, t2) for h in HISTOGRAMS}
    calm_sums = {h: prom.value(f"sum({h}_sum)", at=t2) - sums1[h] for h in HISTOGRAMS}
    return Burst(model, burst, calm, t_start, t_end, direct, before_calm, after_calm, calm_sums)


# ---------------------------------------------------------------------------------------------
# Counts: exact
# ---------------------------------------------------------------------------------------------


def _expected_counts(b: Burst) -> dict[tuple[str, tuple], float]:
    ok = b.ok
    exp: dict[tuple[str, tuple], float] = {
        ("textgen_prompt_tokens_total", ()): sum(r.prompt_tokens for r in ok),
        ("textgen_generation_tokens_total", ()): sum(r.completion_tokens for r in ok),
        ("textgen_request_prompt_tokens_sum", ()): sum(r.prompt_tokens for r in ok),
        ("textgen_request_generation_tokens_sum", ()): sum(r.completion_tokens for r in ok),
        ("textgen_e2e_request_latency_seconds_count", ()): len(ok),
        ("textgen_time_to_first_token_seconds_count", ()): sum(r.completion_tokens > 0 for r in ok),
        ("textgen_inter_token_latency_seconds_count", ()): sum(max(r.completion_tokens - 1, 0) for r in ok),
        ("textgen_request_prompt_tokens_count", ()): len(ok),
        ("textgen_requests_rejected_total", (("reason", "queue_full"),)): sum(
            r.status == 429 for r in b.records
        ),
        ("textgen_requests_rejected_total", (("reason", "validation"),)): sum(
            r.status in (400, 422) for r in b.records
        ),
        ("textgen_requests_rejected_total", (("reason", "auth"),)): 0,
    }
    for reason in FINISH_REASONS:
        exp["textgen_requests_finished_total", (("finish_reason", reason),)] = sum(
            r.finish_reason == reason for r in ok
        )
    for kind, route in ROUTES.items():
        for status in sorted({r.status for r in b.records}):
            n = sum(r.kind == kind and r.status == status for r in b.records)
            if n:
                exp["textgen_http_requests_total", (("route", route), ("status", str(status)))] = n
    return exp


def test_counts_on_metrics_endpoint_match_the_client_exactly(burst):
    for (name, labels), want in _expected_counts(burst).items():
        got = total(burst.direct, name, **dict(labels))
        assert got == want, f"/metrics {name}{dict(labels)}: {got}, the client saw {want}"


def test_counts_in_prometheus_match_the_client_exactly(stack, burst):
    prom = stack.prometheus
    for (name, labels), want in _expected_counts(burst).items():
        sel = ",".join(f'{k}="{v}"' for k, v in labels)
        got = prom.value(f"sum({name}{{{sel}}})")
        assert got == want, f"Prometheus sum({name}{{{sel}}}) = {got}, the client saw {want}"
    assert prom.value("count(textgen_model_info == 1)") == 1
    assert prom.value(f'count(textgen_model_info{{model="{burst.model}"}})') == 1


def test_every_scrape_shows_the_same_merge(stack, burst):
    """Two uvicorn processes answer /metrics in turn: each must render the same totals."""
    probes = {("route", r) for r in ("/metrics", "/ready", "/health")}  # Prometheus scrapes meanwhile
    keys = [
        k
        for k in burst.direct
        if k[0].endswith(("_total", "_count", "_sum", "_bucket")) and not (k[1] & probes)
    ]
    assert keys
    for _ in range(6):
        again = parse_exposition(stack.metrics_text())
        diff = {k: (burst.direct[k], again.get(k)) for k in keys if again.get(k) != burst.direct[k]}
        assert not diff, f"a scrape disagrees with the first one: {diff}"
    pids = {p.stem.rsplit("_", 1)[-1] for p in stack.metrics_dir.glob("*.db")}
    assert len(pids) >= 2, f"values from one process only in {stack.metrics_dir}: {sorted(pids)}"


# ---------------------------------------------------------------------------------------------
# Latency: consistent with the client within the histogram's resolution
# ---------------------------------------------------------------------------------------------


def _client_quantile(values: list[float], q: float) -> float:
    """The smallest value with at least a fraction q of the values at or below it (the rank
    Prometheus's histogram_quantile estimates)."""
    v = np.sort(values)
    return float(v[max(int(np.ceil(q * len(v))) - 1, 0)])


def test_server_latencies_never_exceed_what_the_client_measured(stack, burst):
    """Per request, the server's TTFT and e2e are sub-intervals of the client's wall time
    (non-streaming: the client's e2e bounds the TTFT), so every cumulative bucket of the server
    histogram counts at least as many requests as the client's values would: exact, both phases."""
    ok = [r for r in burst.ok if r.completion_tokens > 0]
    cases = {
        "textgen_time_to_first_token_seconds": [r.ttft if r.ttft is not None else r.e2e for r in ok],
        "textgen_e2e_request_latency_seconds": [r.e2e for r in burst.ok],
    }
    for hist, client in cases.items():
        cum = burst.after_calm[hist]
        assert cum[float("inf")] == len(client), hist
        for le, n in cum.items():
            need = sum(v <= le for v in client)
            assert n >= need, f"{hist}: {n} requests at or below {le} s, but the client saw {need} that fast"
    # The same, on the sums: the mean HTTP overhead is >= 0 (and small).
    prom = stack.prometheus
    for hist, client in cases.items():
        server_sum = prom.value(f"sum({hist}_sum)")
        overhead = (sum(client) - server_sum) / len(client)
        assert 0 <= overhead < 1.0, f"{hist}: mean client - server = {overhead:.4f} s"


def _server_quantile(stack, buckets: dict[float, float], q: float) -> float:
    """histogram_quantile evaluated by Prometheus itself on the given cumulative buckets."""
    series = " or ".join(f'label_replace(vector({n}), "le", "{le:g}", "", "")' for le, n in buckets.items())
    return stack.prometheus.value(f"histogram_quantile({q}, {series})")


def test_calm_histograms_hold_exactly_what_the_server_reported(burst):
    """Each calm request's TTFT as the server reported it in its response (details.timings)
    lands in the same bucket of the Prometheus histogram: bucket by bucket, the histogram of
    the calm phase is the server's own values, counted once. The e2e is recorded when the
    stream has been sent, just after the response's e2e was written: never less."""
    ttft = burst.calm_histogram("textgen_time_to_first_token_seconds")
    server_ttft = [r.server["ttft_s"] for r in burst.calm]
    assert ttft == {le: float(sum(v <= le for v in server_ttft)) for le in ttft}
    e2e = burst.calm_histogram("textgen_e2e_request_latency_seconds")
    server_e2e = [r.server["e2e_s"] for r in burst.calm]
    assert e2e[float("inf")] == len(server_e2e)
    for le, n in e2e.items():
        assert n <= sum(v <= le for v in server_e2e), le


def test_calm_server_timings_are_inside_the_client_timings(burst):
    """Per request: the server's TTFT and e2e (from the response) never exceed the client's."""
    for r in burst.calm:
        assert 0 <= r.server["ttft_s"] <= r.ttft, (r.server, r.ttft)
        assert 0 <= r.server["e2e_s"] <= r.e2e, (r.server, r.e2e)
    over = [r.ttft - r.server["ttft_s"] for r in burst.calm]
    print(f"client - server TTFT per request (ms): {[round(x * 1e3, 1) for x in over]}")


@pytest.mark.parametrize("q", [0.5, 0.9])
@pytest.mark.parametrize(
    ("hist", "edges", "server_key", "client_key"),
    [
        ("textgen_time_to_first_token_seconds", TTFT_BUCKETS, "ttft_s", "ttft"),
        ("textgen_e2e_request_latency_seconds", E2E_BUCKETS, "e2e_s", "e2e"),
    ],
    ids=["ttft", "e2e"],
)
def test_calm_quantiles_agree_with_the_client_within_bucket_resolution(
    stack, burst, q, hist, edges, server_key, client_key
):
    """Per request the server's value lies in [client - overhead, client], the overhead being
    measured for that request (client time minus the time the server reported). So the server's
    quantile lies in [client quantile - largest overhead, client quantile], and
    histogram_quantile, which stays inside the bucket of the true quantile, must land between
    the buckets of those two bounds. The e2e histogram is recorded once the stream has been
    sent, a moment after the e2e written in the response: one bucket of slack above."""
    client = [getattr(r, client_key) for r in burst.calm]
    max_over = max(getattr(r, client_key) - r.server[server_key] for r in burst.calm)
    c = _client_quantile(client, q)
    s = _server_quantile(stack, burst.calm_histogram(hist), q)
    lo, hi = int(np.searchsorted(edges, c - max_over)), int(np.searchsorted(edges, c))
    if client_key == "e2e":
        hi += 1
    b = int(np.searchsorted(edges, s))
    assert lo <= b <= hi, (
        f"p{q * 100:g}: server {s:.5f} s, client {c:.5f} s, largest per-request overhead {max_over:.5f} s "
        f"(buckets {lo}..{hi}, got {b}; edges {edges})"
    )


def test_calm_inter_token_latency_agrees_with_the_client(stack, burst):
    """The median gap between token chunks as the client saw them and the server's median
    inter-token latency fall within one bucket of each other (the gaps are not sub-intervals
    of one another: delivery jitter moves them either way)."""
    gaps = [g for r in burst.calm for g in np.diff(r.chunk_times)]
    c = _client_quantile(gaps, 0.5)
    s = _server_quantile(stack, burst.calm_histogram("textgen_inter_token_latency_seconds"), 0.5)
    bs, bc = int(np.searchsorted(ITL_BUCKETS, s)), int(np.searchsorted(ITL_BUCKETS, c))
    assert abs(bs - bc) <= 1, f"ITL p50: server {s:.5f} s, client {c:.5f} s (n={len(gaps)})"


def test_inter_token_gaps_are_counted_once_per_token(stack, burst):
    """Each choice contributes (tokens - 1) gaps, and its gaps fit in the client's e2e."""
    prom = stack.prometheus
    n = prom.value("sum(textgen_inter_token_latency_seconds_count)")
    assert n == sum(max(r.completion_tokens - 1, 0) for r in burst.ok)
    assert prom.value("sum(textgen_inter_token_latency_seconds_sum)") <= sum(r.e2e for r in burst.ok)


def test_engine_phases_fit_inside_the_request_latency(stack, burst):
    """queue + prefill (engine) is inside the TTFT and queue + prefill + decode inside the e2e
    (both measured by the HTTP process around the engine's work): true per request, so for sums."""
    v = {
        k: stack.prometheus.value(f"sum(textgen_{k}_sum)")
        for k in (
            "request_queue_time_seconds",
            "request_prefill_time_seconds",
            "request_decode_time_seconds",
            "time_to_first_token_seconds",
            "e2e_request_latency_seconds",
        )
    }
    queue, prefill, decode = (v[f"request_{k}_time_seconds"] for k in ("queue", "prefill", "decode"))
    assert min(queue, prefill, decode) > 0
    assert queue + prefill <= v["time_to_first_token_seconds"]
    assert queue + prefill + decode <= v["e2e_request_latency_seconds"]


# ---------------------------------------------------------------------------------------------
# The dashboard and the alert rules
# ---------------------------------------------------------------------------------------------


def _deploy_exprs() -> list[tuple[str, str]]:
    path = ROOT / "tests" / "deploy" / "promql.py"
    spec = importlib.util.spec_from_file_location("textgen_deploy_promql", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    exprs = mod.dashboard_and_alert_exprs()
    assert exprs, "no expressions found in the dashboard and the alert rules"
    return exprs


def test_every_dashboard_and_alert_expression_has_data(stack, burst):
    """Each expression must be valid PromQL; every metric it names must exist in Prometheus
    with every label it matches on; and each part that carries the data (the operands of
    or/and/unless, both sides of a threshold comparison, the argument of absent()) must return
    series. The only accepted exception: a part whose emptiness is explained by a label matcher
    that no series matches yet (e.g. status=~"5.." after a burst without server errors)."""
    prom = stack.prometheus
    t0, now = burst.t_start - 60, time.time()
    problems, explained = [], []
    for where, expr in _deploy_exprs():
        try:
            prom.query(expr)  # valid, and evaluable
        except AssertionError as e:
            problems.append(f"{where}: invalid: {e}")
            continue
        for sel in selectors(expr):
            if not sel.name:
                continue
            series = prom.series(sel.name, t0, now)
            if not series:
                problems.append(f"{where}: metric {sel.name} does not exist")
                continue
            labels = set().union(*(s.keys() for s in series))
            missing = {k for k, _, _ in sel.matchers} - labels
            if missing:
                problems.append(
                    f"{where}: {sel.name} has no label {sorted(missing)} (it has {sorted(labels)})"
                )
        for part in data_bearing_parts(expr):
            if prom.query(part):
                continue
            empty = [
                s for s in selectors(part) if s.name and s.matchers and not prom.series(s.promql(), t0, now)
            ]
            if empty:
                explained.append(f"{where}: {part!r} is empty: no series match {[s.promql() for s in empty]}")
            else:
                problems.append(f"{where}: {part!r} returned no data")
    print("\n".join(explained))
    assert not problems, "\n".join(problems)


def test_alert_rules_load_and_evaluate_without_errors(stack, burst):
    """Prometheus loaded deploy/prometheus/alerts.yml and evaluated every rule (every second)
    without an error; none fires on a healthy service after a short burst."""

    def evaluated():
        groups = stack.prometheus.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return groups if rules and all(r["health"] != "unknown" for r in rules) else None

    groups = wait_until(evaluated, 30, "every rule to be evaluated")
    rules = [r for g in groups for r in g["rules"]]
    assert rules
    bad = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
    firing = [r["name"] for r in rules if r.get("state") == "firing"]
    assert not firing, firing


def test_promtool_accepts_the_live_metrics(stack, burst):
    import subprocess

    promtool = require_binary("promtool")
    r = subprocess.run(
        [promtool, "check", "metrics"], input=stack.metrics_text(), capture_output=True, timeout=60
    )
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


def test_report_plots_the_live_prometheus(stack, burst, tmp_path):
    """bench.report's PromQL returns data on the live server and the figures are written."""
    from bench import report

    start, end = burst.t_start - 5, time.time()
    rep = report.report_from_prometheus(stack.prometheus.url, start, end, 1.0, "10s")
    for name in ("ttft", "itl", "e2e", "requests_per_s", "tokens_per_s"):
        series = getattr(rep, name)
        assert any(np.isfinite(s.y).any() for s in series), f"no data for {name}"
    paths = report.plot(rep, tmp_path)
    assert [p.name for p in paths] == ["ttft.png", "itl.png", "e2e.png", "throughput.png", "overview.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
