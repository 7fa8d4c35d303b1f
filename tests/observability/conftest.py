"""Fixtures of the observability tests: the real service and a real Prometheus scraping it.

One stack per module: ``python -m service`` (two uvicorn processes and one spawned engine
worker, all writing to one PROMETHEUS_MULTIPROC_DIR) on an ephemeral loopback port, and
``/usr/bin/prometheus`` scraping it every second with the project's alert rules loaded.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from obs_harness import ROOT, Prometheus, http_get, wait_until

from bench.server import Server, free_port, start_service

ALERT_RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"

# Small limits so that a burst of concurrent requests fills the running batch and the waiting
# queue: the scheduler gauges move, and some requests may be refused with 429.
SERVICE_ENV = {
    "TEXTGEN_HTTP_WORKERS": "2",
    "TEXTGEN_MAX_RUNNING": "4",
    "TEXTGEN_MAX_WAITING": "6",
    "TEXTGEN_PROVIDER": "cpu",
    "TEXTGEN_INTRA_OP_THREADS": "1",
    "TEXTGEN_LOG_LEVEL": "warning",
}


@dataclass
class Stack:
    service: Server
    base_url: str  # http://127.0.0.1:PORT
    metrics_dir: Path
    prometheus: Prometheus
    workdir: Path

    def metrics_text(self) -> bytes:
        status, body, _ = http_get(self.base_url + "/metrics")
        assert status == 200, f"GET /metrics: HTTP {status}: {body[:500]!r}"
        return body


@pytest.fixture(scope="module")
def stack(tiny_bundle, tmp_path_factory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("observability")
    metrics_dir = workdir / "prometheus-multiproc"
    port = free_port()
    service = start_service(
        Path(tiny_bundle), workdir / "service.log", {**SERVICE_ENV, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
        port=port, timeout=180,
    )
    prometheus = None
    try:
        prometheus = Prometheus.start(f"127.0.0.1:{port}", workdir, [ALERT_RULES])
        wait_until(
            lambda: prometheus.value('up{job="textgen"}') == 1.0,
            60,
            "Prometheus to scrape the service successfully",
            interval=0.25,
            on_timeout=lambda: prometheus.proc.log_tail() + "\n" + service.log_tail(),
        )
        yield Stack(service, f"http://127.0.0.1:{port}", metrics_dir, prometheus, workdir)
    finally:
        if prometheus is not None:
            prometheus.stop()
        service.stop(signal.SIGINT, 20)
