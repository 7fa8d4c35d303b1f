"""service.metrics: values recorded in several real processes reach /metrics exactly once.

The multiprocess tests spawn real processes (as LitServe spawns its inference workers) that
share one PROMETHEUS_MULTIPROC_DIR, and read the merged exposition in the parent, which never
creates a metric itself (like the HTTP process serving /metrics).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import metrics
from service.engine.types import StepStats

MODEL = "tiny"
SPAWN = mp.get_context("spawn")

# What each fake engine process records. Times are chosen away from bucket edges.
REQUESTS = {
    "a": [
        dict(prompt_tokens=5, generation_tokens=10, finish_reason="stop", ttft_s=0.03, itl_s=[0.004] * 9,
             e2e_s=0.07, queue_s=0.002, prefill_s=0.02, decode_s=0.04),
        dict(prompt_tokens=7, generation_tokens=16, finish_reason="length", ttft_s=0.3, itl_s=[0.02] * 15,
             e2e_s=0.6, queue_s=0.2, prefill_s=0.09, decode_s=0.3),
        dict(prompt_tokens=3, generation_tokens=1, finish_reason="stop", ttft_s=1.7, itl_s=[],
             e2e_s=1.7, queue_s=1.6, prefill_s=0.09, decode_s=0.0),
    ],
    "b": [
        dict(prompt_tokens=11, generation_tokens=4, finish_reason="stop", ttft_s=0.07, itl_s=[0.006] * 3,
             e2e_s=0.09, queue_s=0.003, prefill_s=0.06, decode_s=0.02),
        dict(prompt_tokens=2, generation_tokens=0, finish_reason="abort", ttft_s=None, itl_s=[],
             e2e_s=0.4, queue_s=None, prefill_s=None, decode_s=None),
    ],
}  # fmt: skip
STEPS = {
    "a": [StepStats(4, 12, 4, 6, 0.125, 0.01, prefix_cache_queries=60, prefix_cache_hits=0, prefix_cache_blocks=5,
                    prefix_cache_usage=0.0625),
          StepStats(3, 0, 3, 2, 0.25, 0.01, prefix_cache_blocks=3, prefix_cache_usage=0.05)],
    "b": [StepStats(1, 11, 1, 0, 0.5, 0.01, prefix_cache_queries=40, prefix_cache_hits=32, prefix_cache_blocks=9,
                    prefix_cache_usage=0.5),
          StepStats(1, 0, 1, 0, 0.5, 0.001, num_draft_tokens=3, num_accepted_draft_tokens=2),
          StepStats(1, 0, 1, 0, 0.5, 0.001, num_draft_tokens=2, num_accepted_draft_tokens=0,
                    prefix_cache_blocks=2, prefix_cache_usage=0.25)],
}
REJECTED = {"a": ["queue_full"], "b": ["validation", "validation"]}
HTTP = {"a": [("/v1/completions", 200)] * 3, "b": [("/v1/completions", 200), ("/v1/chat/completions", 422)]}
CAPACITY = {"a": 64, "b": 32}


def _fake_engine(name: str, ready, stop) -> None:
    """A spawned process recording what a worker (engine) and an HTTP process would record."""
    m = metrics.Metrics(MODEL)
    m.set_model_info(parameters=2_200_000, provider="CPUExecutionProvider", waiting_capacity=CAPACITY[name])
    for r in REQUESTS[name]:
        m.observe_request(**r)
    for s in STEPS[name]:
        m.observe_step(s)
    for reason in REJECTED[name]:
        m.observe_rejected(reason)
    for route, status in HTTP[name]:
        m.observe_http(route, status)
    ready.set()
    stop.wait(60)


def _samples(body: bytes) -> dict[tuple[str, frozenset], float]:
    out: dict[tuple[str, frozenset], float] = {}
    seen: Counter = Counter()
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            seen[key] += 1
            out[key] = s.value
    dup = [k for k, n in seen.items() if n > 1]
    assert not dup, f"series exposed more than once: {dup}"
    return out


def _get(samples, name: str, **labels) -> float | None:
    return samples.get((name, frozenset({"model": MODEL, **labels}.items())))


def _expected_histogram(values: list[float], le: float) -> int:
    return sum(v <= le for v in values)


def _all(key: str, names=("a", "b")) -> list:
    return [r[key] for n in names for r in REQUESTS[n] if r[key] is not None]


def run_promtool(body: bytes) -> None:
    """`promtool check metrics` on an exposition; skipped without promtool unless CI=true."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("promtool is required under CI (Debian package `prometheus`)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert r.returncode == 0, f"promtool check metrics failed:\n{r.stdout.decode()}{r.stderr.decode()}"


@pytest.fixture
def multiproc_dir(tmp_path, monkeypatch):
    """A shared directory, exported the way init_multiprocess exports it; restored afterwards."""
    d = tmp_path / "prom"
    d.mkdir()
    monkeypatch.setenv(metrics.ENV_DIR, str(d))
    return d


def _start(name: str):
    ready, stop = SPAWN.Event(), SPAWN.Event()
    p = SPAWN.Process(target=_fake_engine, args=(name, ready, stop), name=f"fake-engine-{name}")
    p.start()
    assert ready.wait(60), f"process {name} did not record its metrics"
    return p, stop


def test_two_processes_sum_exactly_and_dead_gauges_vanish(multiproc_dir):
    procs = {n: _start(n) for n in ("a", "b")}
    try:
        body, content_type = metrics.render()
        assert content_type.startswith("text/plain")
        s = _samples(body)

        # Counters: the exact sums over both processes; zero-initialized labels present.
        reqs = REQUESTS["a"] + REQUESTS["b"]
        for reason in metrics.FINISH_REASONS:
            n = sum(r["finish_reason"] == reason for r in reqs)
            assert _get(s, "textgen_requests_finished_total", finish_reason=reason) == n, reason
        assert _get(s, "textgen_prompt_tokens_total") == sum(r["prompt_tokens"] for r in reqs)
        assert _get(s, "textgen_generation_tokens_total") == sum(r["generation_tokens"] for r in reqs)
        assert _get(s, "textgen_spec_decode_num_draft_tokens_total") == 5
        assert _get(s, "textgen_spec_decode_num_accepted_tokens_total") == 2
        assert _get(s, "textgen_prefix_cache_queries_total") == 100
        assert _get(s, "textgen_prefix_cache_hits_total") == 32
        assert _get(s, "textgen_requests_rejected_total", reason="queue_full") == 1
        assert _get(s, "textgen_requests_rejected_total", reason="validation") == 2
        assert _get(s, "textgen_requests_rejected_total", reason="auth") == 0
        assert _get(s, "textgen_http_requests_total", route="/v1/completions", status="200") == 4
        assert _get(s, "textgen_http_requests_total", route="/v1/chat/completions", status="422") == 1

        # Histograms: counts, sums and cumulative buckets over both processes.
        hists = {
            "textgen_time_to_first_token_seconds": _all("ttft_s"),
            "textgen_inter_token_latency_seconds": [x for v in _all("itl_s") for x in v],
            "textgen_e2e_request_latency_seconds": _all("e2e_s"),
            "textgen_request_queue_time_seconds": _all("queue_s"),
            "textgen_request_prefill_time_seconds": _all("prefill_s"),
            "textgen_request_decode_time_seconds": _all("decode_s"),
            "textgen_request_prompt_tokens": _all("prompt_tokens"),
            "textgen_request_generation_tokens": _all("generation_tokens"),
            "textgen_iteration_batch_size": [st.batch_size for n in STEPS for st in STEPS[n]],
        }
        for name, vals in hists.items():
            assert _get(s, name + "_count") == len(vals), name
            assert _get(s, name + "_sum") == pytest.approx(sum(vals)), name
            assert _get(s, name + "_bucket", le="+Inf") == len(vals), name
        ttft = hists["textgen_time_to_first_token_seconds"]
        for le in (0.04, 0.1, 0.25, 0.5, 1.0, 2.5):
            got = _get(s, "textgen_time_to_first_token_seconds_bucket", le=str(le))
            assert got == _expected_histogram(ttft, le), le
        itl = hists["textgen_inter_token_latency_seconds"]
        for le in (0.005, 0.0075, 0.01, 0.025):
            assert _get(s, "textgen_inter_token_latency_seconds_bucket", le=str(le)) == _expected_histogram(
                itl, le
            )

        # Gauges: running/waiting/capacity sum over live processes, the KV-cache ratio takes the max.
        assert _get(s, "textgen_num_requests_running") == 3 + 1
        assert _get(s, "textgen_num_requests_waiting") == 2 + 0
        assert _get(s, "textgen_kv_cache_usage_perc") == 0.5
        assert _get(s, "textgen_prefix_cache_blocks") == 3 + 2  # each engine's last step
        assert _get(s, "textgen_prefix_cache_usage_perc") == 0.25
        assert _get(s, "textgen_waiting_queue_capacity") == 64 + 32
        info = dict(parameters="2200000", provider="CPUExecutionProvider")
        assert _get(s, "textgen_model_info", **info) == 1

        # No pid label leaks out of the merge.
        assert all("pid" not in dict(labels) for _, labels in s)

        run_promtool(body)

        # Worker b exits; its parent marks it dead: its live gauges vanish, its totals stay.
        p, stop = procs.pop("b")
        stop.set()
        p.join(30)
        assert p.exitcode == 0
        metrics.mark_process_dead(p.pid)
        s2 = _samples(metrics.render()[0])
        assert _get(s2, "textgen_num_requests_running") == 3
        assert _get(s2, "textgen_num_requests_waiting") == 2
        assert _get(s2, "textgen_kv_cache_usage_perc") == 0.25
        assert _get(s2, "textgen_waiting_queue_capacity") == 64
        assert _get(s2, "textgen_model_info", **info) == 1
        for key, value in s.items():
            if key[0].endswith(("_total", "_bucket", "_count", "_sum")):
                assert s2[key] == value, key
    finally:
        for p, stop in procs.values():
            stop.set()
            p.join(30)


def test_all_dead_leaves_no_gauges_but_keeps_totals(multiproc_dir):
    p, stop = _start("b")
    stop.set()
    p.join(30)
    metrics.mark_process_dead(p.pid)
    s = _samples(metrics.render()[0])
    assert _get(s, "textgen_num_requests_running") is None
    assert _get(s, "textgen_kv_cache_usage_perc") is None
    assert _get(s, "textgen_requests_finished_total", finish_reason="abort") == 1
    assert _get(s, "textgen_requests_finished_total", finish_reason="error") == 0


def _init_scenario(root: str) -> None:
    """Runs in a fresh spawned process: prometheus_client is imported before the directory is set."""
    import prometheus_client  # noqa: F401 - imported first on purpose

    from service import metrics as m

    assert m.ENV_DIR not in os.environ
    stale = Path(root, "prom")
    stale.mkdir()
    (stale / "counter_999999.db").write_bytes(b"stale")
    d = m.init_multiprocess(str(stale))
    assert d == str(stale.resolve()) and os.environ[m.ENV_DIR] == d
    assert list(stale.iterdir()) == [], "init_multiprocess must empty the directory"

    met = m.Metrics(MODEL)
    met.observe_rejected("auth")
    assert any(f.name.startswith("counter_") for f in stale.iterdir()), "values must go to the files"
    body = m.render()[0].decode()
    assert f'textgen_requests_rejected_total{{model="{MODEL}",reason="auth"}} 1.0' in body, body
    assert m.init_multiprocess(None) == d  # idempotent in the owner process
    try:
        m.init_multiprocess(str(Path(root, "other")))
    except RuntimeError:
        pass
    else:
        raise AssertionError("switching the directory after metrics exist must raise")

    # A spawned child inheriting the directory does not empty it when it calls init_multiprocess.
    child = SPAWN.Process(target=_init_child, args=(d,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    body = m.render()[0].decode()
    assert f'textgen_requests_rejected_total{{model="{MODEL}",reason="auth"}} 2.0' in body, body


def _init_child(d: str) -> None:
    from service import metrics as m

    assert m.init_multiprocess(None) == d
    m.Metrics(MODEL).observe_rejected("auth")


def test_init_multiprocess_ordering_and_ownership(tmp_path, monkeypatch):
    monkeypatch.delenv(metrics.ENV_DIR, raising=False)
    monkeypatch.delenv(metrics.ENV_PREPARED, raising=False)
    p = SPAWN.Process(target=_init_scenario, args=(str(tmp_path),))
    p.start()
    p.join(120)
    assert p.exitcode == 0, "scenario failed; see captured stderr"


def test_init_multiprocess_picks_a_temp_dir(monkeypatch):
    monkeypatch.delenv(metrics.ENV_DIR, raising=False)
    monkeypatch.delenv(metrics.ENV_PREPARED, raising=False)
    code = (
        "import os; from service import metrics as m; d = m.init_multiprocess(None); "
        "assert os.path.isdir(d) and os.environ['PROMETHEUS_MULTIPROC_DIR'] == d; print(d)"
    )
    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    shutil.rmtree(r.stdout.strip(), ignore_errors=True)


def _single_process_scenario() -> None:
    """Runs in a fresh spawned process without a multiprocess directory."""
    from service import metrics as m

    assert m.ENV_DIR not in os.environ
    m1, m2 = m.Metrics("single-a"), m.Metrics("single-b")  # families are shared per process
    m1.observe_rejected("queue_full")
    m2.observe_http("/v1/models", 200)
    body, _ = m.render()
    s = {
        (x.name, frozenset(x.labels.items())): x.value
        for f in text_string_to_metric_families(body.decode())
        for x in f.samples
    }
    assert (
        s[
            (
                "textgen_requests_rejected_total",
                frozenset({"model": "single-a", "reason": "queue_full"}.items()),
            )
        ]
        == 1
    )
    assert (
        s[
            (
                "textgen_http_requests_total",
                frozenset({"model": "single-b", "route": "/v1/models", "status": "200"}.items()),
            )
        ]
        == 1
    )
    assert (
        s[
            (
                "textgen_requests_finished_total",
                frozenset({"model": "single-b", "finish_reason": "error"}.items()),
            )
        ]
        == 0
    )
    assert not any(name.endswith("_created") for name, _ in s), "no _created series"
    for call, needle in [
        (lambda: m1.observe_rejected("timeout"), "'timeout'"),
        (
            lambda: m1.observe_request(
                prompt_tokens=1,
                generation_tokens=1,
                finish_reason="eos",
                ttft_s=None,
                itl_s=[],
                e2e_s=0.1,
                queue_s=None,
                prefill_s=None,
                decode_s=None,
            ),
            "'eos'",
        ),
        (lambda: m.Metrics(""), "model_name"),
    ]:
        try:
            call()
        except ValueError as e:
            assert needle in str(e), e
        else:
            raise AssertionError(f"expected ValueError mentioning {needle}")
    m.mark_process_dead(os.getpid())  # a no-op without a directory


def test_single_process_mode_and_validation(monkeypatch):
    monkeypatch.delenv(metrics.ENV_DIR, raising=False)
    p = SPAWN.Process(target=_single_process_scenario)
    p.start()
    p.join(120)
    assert p.exitcode == 0, "scenario failed; see captured stderr"


def test_observe_many_counts_like_observe_one_by_one():
    """A request's inter-token gaps are observed in one go (service.metrics.observe_many): the
    buckets, count and sum must be those of observing them one by one, bounds included."""
    import prometheus_client

    from service.metrics import ITL_BUCKETS, observe_many

    amounts = [0.0, ITL_BUCKETS[0], ITL_BUCKETS[0] * 1.0001, ITL_BUCKETS[3], 0.0123, 7.0, 1e9, *[0.002] * 50]

    def exposition(fill) -> dict:
        reg = prometheus_client.CollectorRegistry()
        h = prometheus_client.Histogram("h", "h", ["model"], buckets=ITL_BUCKETS, registry=reg)
        fill(h.labels("m"))
        return {s.name + str(sorted(s.labels.items())): s.value for m in reg.collect() for s in m.samples
                if not s.name.endswith("_created")}

    one_by_one = exposition(lambda child: [child.observe(a) for a in amounts])
    batched = exposition(lambda child: observe_many(child, amounts))
    assert batched.keys() == one_by_one.keys()
    for k, v in one_by_one.items():
        assert batched[k] == pytest.approx(v, rel=1e-12), k
    assert one_by_one["h_count[('model', 'm')]"] == len(amounts)
    assert exposition(lambda child: observe_many(child, [])) == exposition(lambda child: None)


def test_observe_steps_records_what_observe_step_one_by_one_does():
    """The worker publishes its steps in batches (Metrics.observe_steps): the histograms,
    counters and gauges must end as if every step had been observed alone, in order."""
    import prometheus_client

    steps = [*STEPS["a"], *STEPS["b"], StepStats(0, 0, 3, 2, 0.75, 0.0, prefix_cache_blocks=5),
             StepStats(4, 64, 4, 1, 0.5, 0.002, num_constrained=2, mask_time=0.0004, prefix_cache_queries=64,
                       prefix_cache_hits=32, prefix_cache_blocks=6, prefix_cache_usage=0.125)]  # fmt: skip

    def exposition(model: str) -> dict:
        return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model"))): s.value
                for fam in prometheus_client.REGISTRY.collect() for s in fam.samples
                if s.labels.get("model") == model and not s.name.endswith("_created")}  # fmt: skip

    one, batched = metrics.Metrics("steps-one-by-one"), metrics.Metrics("steps-batched")
    for s in steps:
        one.observe_step(s)
    batched.observe_steps(steps)
    a, b = exposition("steps-one-by-one"), exposition("steps-batched")
    assert a.keys() == b.keys() and a
    for k, v in a.items():
        assert b[k] == pytest.approx(v, rel=1e-12), k
    assert a[("textgen_num_requests_running", ())] == 4 and a[("textgen_prefix_cache_blocks", ())] == 6
    assert a[("textgen_iteration_batch_size_count", ())] == sum(1 for s in steps if s.batch_size)
