"""Every Prometheus object of the service: names, help texts, units, buckets and labels.

The engine and the HTTP layer never touch ``prometheus_client`` themselves: they hand plain
data (``service.engine.types.StepStats``, request timings, counts) to a ``Metrics`` object, and the
HTTP layer serves ``render()`` on ``GET /metrics``. Names follow vLLM's (``vllm:`` becomes
``textgen_``); every series carries a ``model`` label; times are in seconds.

Multiprocess mode
-----------------
LitServe answers HTTP in uvicorn processes (forked from the main process) and runs the engine
in spawned worker processes. A metric recorded in a worker lives in that worker's memory, so
``prometheus_client`` is put in *multiprocess mode*: each process writes its values to
memory-mapped files ``<kind>_<pid>.db`` in one shared directory, and ``render()`` merges every
file of the directory (``MultiProcessCollector``) into one exposition. Counters and histograms
are summed over processes, dead ones included (a counter must never go backwards); gauges use
``live*`` modes, whose files ``mark_process_dead(pid)`` deletes, so a dead worker's gauges
vanish instead of freezing at their last value.

Ordering (important): ``prometheus_client`` chooses how a metric stores its value (in memory or
in an mmap file) from ``PROMETHEUS_MULTIPROC_DIR`` *when it is first imported*, and a metric
keeps the storage it was created with. Therefore:

1. The main process calls ``init_multiprocess()`` before it spawns or forks anything and before
   any ``Metrics`` is created. It exports ``PROMETHEUS_MULTIPROC_DIR`` (spawned workers inherit
   it and import ``prometheus_client`` in multiprocess mode) and switches this process's value
   class too, in case ``prometheus_client`` was imported earlier. Creating a ``Metrics`` first
   and calling ``init_multiprocess()`` afterwards raises ``RuntimeError``.
2. Workers need not call ``init_multiprocess()``; a call in a process that inherited the
   prepared directory (or a second call in the main process) leaves the directory as it is.
3. Without ``init_multiprocess()`` and without ``PROMETHEUS_MULTIPROC_DIR`` everything runs in
   single-process mode (tests, scripts) and ``render()`` serves the default registry.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import prometheus_client
from prometheus_client import values as _values
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.multiprocess import mark_process_dead as _mark_process_dead

from service.engine.types import StepStats

__all__ = [
    "E2E_BUCKETS",
    "FINISH_REASONS",
    "ITL_BUCKETS",
    "REJECT_REASONS",
    "TTFT_BUCKETS",
    "Metrics",
    "init_multiprocess",
    "mark_process_dead",
    "render",
]

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
# Set by init_multiprocess to the directory it emptied, so that later calls (in the same process
# or in processes that inherit the environment) leave it as it is.
ENV_PREPARED = "TEXTGEN_PROMETHEUS_PREPARED_DIR"

FINISH_REASONS = ("stop", "length", "abort", "error")
REJECT_REASONS = ("queue_full", "validation", "auth")

# vLLM's TTFT buckets; they include the alert threshold (p99 TTFT > 1 s) and its neighbours.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
# vLLM's inter-token buckets, with four finer ones below 10 ms: a decode step of a small model
# on a CPU takes 2-20 ms, which vLLM's first bucket (10 ms) would not resolve.
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
# vLLM's request latency buckets (from 0.3 s), with finer ones below for short requests and
# for the queue/prefill/decode phases, which are milliseconds on an idle server.
E2E_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0,
    10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# vLLM's build_1_2_5_buckets, up to a context length far beyond ours.
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)

prometheus_client.disable_created_metrics()  # no `_created` series: same output in both modes


def _multiprocess() -> bool:
    return bool(os.environ.get(ENV_DIR))


def _storage_is_multiprocess() -> bool:
    return bool(getattr(_values.ValueClass, "_multiprocess", False))


def observe_many(histogram: prometheus_client.Histogram, amounts: Sequence[float]) -> None:
    """``histogram.observe(a)`` for every ``a``, with one update per touched bucket and one of the sum.

    A request's inter-token latencies are observed when it ends, in the HTTP process, right after
    its last chunk: one by one (a locked write to a memory-mapped file per bucket and per sum,
    4 µs each) the 127 gaps of a 128-token reply took 0.65 ms, in the way of the next request and
    of the client reading that last chunk. Same buckets as ``observe`` (``a <= bound``, first
    match); no exemplars. Relies on ``prometheus_client``'s Histogram internals (pinned version);
    without them, falls back to ``observe``.
    """
    bounds, buckets, total = (getattr(histogram, a, None) for a in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None:
        for a in amounts:
            histogram.observe(a)
        return
    if not amounts:
        return
    histogram._raise_if_not_observable()
    for i, n in Counter(bisect_left(bounds, a) for a in amounts).items():
        buckets[i].inc(n)
    total.inc(sum(amounts))


def init_multiprocess(dir: str | None = None) -> str:
    """Prepare the shared metrics directory; call in the main process before anything else.

    Args:
        dir: the directory to use. Default: ``$PROMETHEUS_MULTIPROC_DIR``, else a fresh
            temporary directory.

    Returns:
        The directory, exported as ``PROMETHEUS_MULTIPROC_DIR``: emptied, unless this process
        or one it inherited its environment from already prepared it (then left as it is).

    Raises:
        RuntimeError: a ``Metrics`` object already exists in this process with other storage.
    """
    env_dir = os.environ.get(ENV_DIR)
    env_dir = str(Path(env_dir).resolve()) if env_dir else None
    path = str(Path(dir or env_dir or tempfile.mkdtemp(prefix="textgen-prometheus-")).resolve())
    if _families is not None and not (_storage_is_multiprocess() and env_dir == path):
        raise RuntimeError(
            "init_multiprocess() was called after Metrics(...) was created in this process; "
            "call it first, before any metric exists and before workers are started"
        )
    if not (env_dir == path and os.environ.get(ENV_PREPARED) == path):
        # Values left by a previous run would be added to this run's counters.
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        for entry in p.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        os.environ[ENV_PREPARED] = path
    os.environ[ENV_DIR] = path
    if not _storage_is_multiprocess():
        # prometheus_client was imported before the variable existed: switch this process too,
        # so metrics created here (and in processes forked from here) write to the directory.
        _values.ValueClass = _values.get_value_class()
    return path


def render() -> tuple[bytes, str]:
    """The body and content type of ``GET /metrics``.

    In multiprocess mode, the merge of every process's files (and nothing else, so each value
    appears exactly once); otherwise the default registry of this process.
    """
    if _multiprocess():
        registry = prometheus_client.CollectorRegistry(auto_describe=True)
        MultiProcessCollector(registry)
        return prometheus_client.generate_latest(registry), prometheus_client.CONTENT_TYPE_LATEST
    return prometheus_client.generate_latest(
        prometheus_client.REGISTRY
    ), prometheus_client.CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Forget the live gauges of a process that exited (call from its parent). A no-op in
    single-process mode. Its counters and histograms are kept: totals never go backwards."""
    if _multiprocess():
        _mark_process_dead(pid, os.environ[ENV_DIR])


@dataclass(frozen=True)
class _Families:
    """The metric families, created once per process (a name can be registered only once)."""

    ttft: prometheus_client.Histogram
    itl: prometheus_client.Histogram
    e2e: prometheus_client.Histogram
    queue: prometheus_client.Histogram
    prefill: prometheus_client.Histogram
    decode: prometheus_client.Histogram
    prompt_tokens_hist: prometheus_client.Histogram
    generation_tokens_hist: prometheus_client.Histogram
    batch_size: prometheus_client.Histogram
    prompt_tokens: prometheus_client.Counter
    generation_tokens: prometheus_client.Counter
    draft_tokens: prometheus_client.Counter
    accepted_tokens: prometheus_client.Counter
    prefix_queries: prometheus_client.Counter
    prefix_hits: prometheus_client.Counter
    finished: prometheus_client.Counter
    rejected: prometheus_client.Counter
    http: prometheus_client.Counter
    ignored_fields: prometheus_client.Counter
    structured: prometheus_client.Counter
    compile_time: prometheus_client.Histogram
    mask_time: prometheus_client.Histogram
    running: prometheus_client.Gauge
    waiting: prometheus_client.Gauge
    capacity: prometheus_client.Gauge
    kv_cache: prometheus_client.Gauge
    prefix_blocks: prometheus_client.Gauge
    prefix_usage: prometheus_client.Gauge
    info: prometheus_client.Gauge


GRAMMAR_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
MAX_IGNORED_FIELD_LABELS = 64
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")
_ignored_labels: set[str] = set()

_families: _Families | None = None
_families_lock = threading.Lock()


def _get_families() -> _Families:
    with _families_lock:
        return _families or _create_families()


def _create_families() -> _Families:
    global _families
    H, C, G = prometheus_client.Histogram, prometheus_client.Counter, prometheus_client.Gauge
    m = ("model",)
    _families = _Families(
        ttft=H(
            "textgen_time_to_first_token_seconds",
            "Time from the arrival of a request to its first generated token, in seconds.",
            m,
            buckets=TTFT_BUCKETS,
        ),
        itl=H(
            "textgen_inter_token_latency_seconds",
            "Time between two consecutive token outputs of a request, in seconds.",
            m,
            buckets=ITL_BUCKETS,
        ),
        e2e=H(
            "textgen_e2e_request_latency_seconds",
            "Time from the arrival of a request to the end of its response, in seconds.",
            m,
            buckets=E2E_BUCKETS,
        ),
        queue=H(
            "textgen_request_queue_time_seconds",
            "Time a request waited before it was scheduled (WAITING phase), in seconds.",
            m,
            buckets=E2E_BUCKETS,
        ),
        prefill=H(
            "textgen_request_prefill_time_seconds",
            "Time from scheduling to the first token (PREFILL phase), in seconds.",
            m,
            buckets=E2E_BUCKETS,
        ),
        decode=H(
            "textgen_request_decode_time_seconds",
            "Time from the first token to the last (DECODE phase), in seconds.",
            m,
            buckets=E2E_BUCKETS,
        ),
        prompt_tokens_hist=H(
            "textgen_request_prompt_tokens",
            "Number of prompt tokens per finished request.",
            m,
            buckets=TOKEN_BUCKETS,
        ),
        generation_tokens_hist=H(
            "textgen_request_generation_tokens",
            "Number of generated tokens per finished request.",
            m,
            buckets=TOKEN_BUCKETS,
        ),
        batch_size=H(
            "textgen_iteration_batch_size",
            "Number of sequences that produced a token in one engine step.",
            m,
            buckets=BATCH_SIZE_BUCKETS,
        ),
        prompt_tokens=C("textgen_prompt_tokens", "Prompt tokens of finished requests.", m),
        generation_tokens=C("textgen_generation_tokens", "Generated tokens of finished requests.", m),
        # vLLM's spec_decode counters: accepted / draft is the acceptance rate of speculative steps.
        draft_tokens=C(
            "textgen_spec_decode_num_draft_tokens",
            "Draft tokens checked by speculative (n-gram) decode steps.",
            m,
        ),
        accepted_tokens=C(
            "textgen_spec_decode_num_accepted_tokens",
            "Draft tokens that speculative decode steps kept (each saved a model run).",
            m,
        ),
        # vLLM's prefix-cache counters, in tokens: hits / queries is the hit rate.
        prefix_queries=C(
            "textgen_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache (requests that ask for prompt logprobs or set "
            "cache_prompt false are not looked up).",
            m,
        ),
        prefix_hits=C(
            "textgen_prefix_cache_hits",
            "Prompt tokens found in the prefix cache, whose prefill was skipped.",
            m,
        ),
        finished=C(
            "textgen_requests_finished",
            "Requests that left the engine, by finish reason.",
            (*m, "finish_reason"),
        ),
        rejected=C(
            "textgen_requests_rejected",
            "Requests refused before reaching the engine, by reason.",
            (*m, "reason"),
        ),
        http=C("textgen_http_requests", "HTTP responses, by route and status code.", (*m, "route", "status")),
        structured=C(
            "textgen_structured_requests",
            "Requests with structured output, by kind (json_object, json_schema, regex, choice, grammar, tool).",
            (*m, "kind"),
        ),
        compile_time=H(
            "textgen_structured_compile_seconds",
            "Time to compile a structure into a grammar (cache misses only), in seconds.",
            m,
            buckets=GRAMMAR_BUCKETS,
        ),
        mask_time=H(
            "textgen_structured_mask_seconds",
            "Time one engine step spent computing the token masks of its constrained rows, in seconds.",
            m,
            buckets=GRAMMAR_BUCKETS,
        ),
        ignored_fields=C(
            "textgen_ignored_request_fields",
            "Unknown request fields accepted and ignored, by field name (at most "
            f"{MAX_IGNORED_FIELD_LABELS} names per process; the rest count as 'other').",
            (*m, "field"),
        ),
        # Gauges: live* modes, so that a dead process's values disappear (mark_process_dead).
        # Sums where each engine process contributes a part of the total; max for a ratio.
        running=G(
            "textgen_num_requests_running", "Requests in the running batch.", m, multiprocess_mode="livesum"
        ),
        waiting=G(
            "textgen_num_requests_waiting",
            "Requests waiting to be scheduled.",
            m,
            multiprocess_mode="livesum",
        ),
        capacity=G(
            "textgen_waiting_queue_capacity",
            "Size of the bounded waiting queue (beyond it requests get HTTP 429).",
            m,
            multiprocess_mode="livesum",
        ),
        kv_cache=G(
            "textgen_kv_cache_usage_perc",
            "Fraction (0..1) of the KV-cache token budget in use; the most loaded engine.",
            m,
            multiprocess_mode="livemax",
        ),
        prefix_blocks=G(
            "textgen_prefix_cache_blocks",
            "Blocks held by the prefix cache (in use by newcomers or kept for later ones).",
            m,
            multiprocess_mode="livesum",
        ),
        prefix_usage=G(
            "textgen_prefix_cache_usage_perc",
            "Fraction (0..1) of the KV-cache token budget held by prefix-cache blocks; the most loaded engine.",
            m,
            multiprocess_mode="livemax",
        ),
        info=G(
            "textgen_model_info",
            "Model being served; the value is always 1.",
            (*m, "parameters", "provider"),
            multiprocess_mode="livemax",
        ),
    )
    return _families


class Metrics:
    """Records the service's measurements for one served model.

    Cheap to create (the metric families are shared per process); every method is safe to call
    from any thread and any process of the service.
    """

    def __init__(self, model_name: str):
        if not model_name:
            raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
        self.model_name = model_name
        f = self._f = _get_families()
        n = model_name
        self._ttft, self._itl, self._e2e = f.ttft.labels(n), f.itl.labels(n), f.e2e.labels(n)
        self._queue, self._prefill, self._decode = f.queue.labels(n), f.prefill.labels(n), f.decode.labels(n)
        self._prompt_hist = f.prompt_tokens_hist.labels(n)
        self._generation_hist = f.generation_tokens_hist.labels(n)
        self._batch_size = f.batch_size.labels(n)
        self._prompt_tokens = f.prompt_tokens.labels(n)
        self._generation_tokens = f.generation_tokens.labels(n)
        self._draft_tokens, self._accepted_tokens = f.draft_tokens.labels(n), f.accepted_tokens.labels(n)
        self._prefix_queries, self._prefix_hits = f.prefix_queries.labels(n), f.prefix_hits.labels(n)
        self._prefix_blocks, self._prefix_usage = f.prefix_blocks.labels(n), f.prefix_usage.labels(n)
        # Label values that must exist at zero so that rate() and ratios have data from the start.
        self._finished = {r: f.finished.labels(n, r) for r in FINISH_REASONS}
        self._rejected = {r: f.rejected.labels(n, r) for r in REJECT_REASONS}
        self._running, self._waiting = f.running.labels(n), f.waiting.labels(n)
        self._capacity, self._kv_cache = f.capacity.labels(n), f.kv_cache.labels(n)

    def observe_request(
        self,
        *,
        prompt_tokens: int,
        generation_tokens: int,
        finish_reason: str,
        ttft_s: float | None,
        itl_s: Sequence[float],
        e2e_s: float,
        queue_s: float | None,
        prefill_s: float | None,
        decode_s: float | None,
    ) -> None:
        """Record one finished request (any finish reason). ``None`` times are not observed
        (no first token, never scheduled); token counts go to the counters whatever the reason."""
        counter = self._finished.get(finish_reason)
        if counter is None:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {finish_reason!r}")
        counter.inc()
        self._prompt_tokens.inc(prompt_tokens)
        self._generation_tokens.inc(generation_tokens)
        self._prompt_hist.observe(prompt_tokens)
        self._generation_hist.observe(generation_tokens)
        self._e2e.observe(e2e_s)
        if ttft_s is not None:
            self._ttft.observe(ttft_s)
        observe_many(self._itl, itl_s)
        if queue_s is not None:
            self._queue.observe(queue_s)
        if prefill_s is not None:
            self._prefill.observe(prefill_s)
        if decode_s is not None:
            self._decode.observe(decode_s)

    def observe_step(self, stats: StepStats) -> None:
        """Record one engine step: the batch size histogram, the speculative-decoding and
        prefix-cache counters, and the scheduler and prefix-cache gauges."""
        self.observe_steps([stats])

    def observe_steps(self, steps: Sequence[StepStats]) -> None:
        """Record engine steps in order, as ``observe_step`` each would, with one update per
        histogram bucket and counter touched; the gauges take the last step's values.

        The worker publishes its steps in batches (service/process/worker.py): one by one, a
        step's dozen locked writes to memory-mapped files cost ~25 µs, 3-4% of a decode step at
        batch 1.
        """
        if not steps:
            return
        observe_many(self._batch_size, [s.batch_size for s in steps if s.batch_size > 0])
        constrained = [s.mask_time for s in steps if s.num_constrained]
        if constrained:
            observe_many(self._f.mask_time.labels(self.model_name), constrained)
        for counter, amount in (
            (self._draft_tokens, sum(s.num_draft_tokens for s in steps)),
            (self._accepted_tokens, sum(s.num_accepted_draft_tokens for s in steps)),
            (self._prefix_queries, sum(s.prefix_cache_queries for s in steps)),
            (self._prefix_hits, sum(s.prefix_cache_hits for s in steps)),
        ):
            if amount:
                counter.inc(amount)
        last = steps[-1]
        self.set_load(last.num_running, last.num_waiting, last.kv_cache_usage)
        self._prefix_blocks.set(last.prefix_cache_blocks)
        self._prefix_usage.set(last.prefix_cache_usage)

    def set_load(self, running: int, waiting: int, kv_cache_usage: float) -> None:
        """The scheduler's gauges alone (e.g. after aborts emptied the batch without a step)."""
        self._running.set(running)
        self._waiting.set(waiting)
        self._kv_cache.set(kv_cache_usage)

    def observe_rejected(self, reason: str) -> None:
        """Count a request refused before the engine ran it: "queue_full", "validation", "auth"."""
        counter = self._rejected.get(reason)
        if counter is None:
            raise ValueError(f"reason must be one of {REJECT_REASONS}, got {reason!r}")
        counter.inc()

    def observe_http(self, route: str, status: int) -> None:
        """Count one HTTP response. ``route`` is the route template (``/v1/completions``), never
        a raw path, to keep the number of series bounded."""
        self._f.http.labels(self.model_name, route, str(int(status))).inc()

    def observe_structured(self, kind: str, compile_s: float | None) -> None:
        """Count one request with structured output; ``compile_s`` when its grammar was compiled
        for it (None: it came from the cache)."""
        self._f.structured.labels(self.model_name, kind).inc()
        if compile_s is not None:
            self._f.compile_time.labels(self.model_name).observe(compile_s)

    def observe_ignored_field(self, name: str) -> None:
        """Count one unknown request field that was ignored. The label is the field's name while
        it looks like one and fewer than MAX_IGNORED_FIELD_LABELS names were seen, else "other":
        clients choose these names, and the number of series must stay bounded."""
        if name not in _ignored_labels:
            if len(_ignored_labels) >= MAX_IGNORED_FIELD_LABELS or not _FIELD_NAME.match(name):
                name = "other"
            else:
                _ignored_labels.add(name)
        self._f.ignored_fields.labels(self.model_name, name).inc()

    def set_model_info(self, *, parameters: int, provider: str, waiting_capacity: int) -> None:
        """Publish what is served. Call once per engine process (the worker's setup): the
        capacity gauge sums over engine processes, like the waiting gauge it is compared to."""
        self._f.info.labels(self.model_name, str(int(parameters)), provider).set(1)
        self._capacity.set(waiting_capacity)
