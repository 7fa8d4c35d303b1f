"""`docker-compose up` of the CPU stack for real (``make test-docker``; skipped by ``make test``).

docker-compose.yml + docker-compose.cpu.yml + tests/deploy/compose/docker-compose.test.yml (the
image under test; Prometheus from Debian's package): textgen-cpu and prometheus come up under a
unique project name on ephemeral loopback ports, and a PromQL query through that Prometheus
returns the service's series, scraped over the compose network as ``textgen:8000``. Grafana's
image cannot be had here; its provisioning is checked statically (test_compose.py,
test_grafana_dashboard.py).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import httpx
import pytest
from containers import RUN_ID, docker, image_under_test, wait_for
from deploytools import REPO, describe, require_tool
from test_compose import compose_env

IMAGE = image_under_test()
FILES = [
    REPO / "docker-compose.yml",
    REPO / "docker-compose.cpu.yml",
    REPO / "tests/deploy/compose/docker-compose.test.yml",
]
PROJECT = "tgtest" + "".join(c for c in RUN_ID.lower() if c.isalnum())
PROMETHEUS_IMAGE = "textgen-test/prometheus:debian-bookworm"  # as in docker-compose.test.yml


class Compose:
    def __init__(self) -> None:
        self.exe = require_tool("docker-compose")
        self.env = compose_env() | {
            "TEXTGEN_TEST_IMAGE": IMAGE,
            "TEXTGEN_TEST_RUN": RUN_ID,
            "BIND_ADDRESS": "127.0.0.1",
            # Empty: Docker picks a free loopback port for each (read back with `port`).
            "TEXTGEN_PUBLISHED_PORT": "",
            "PROMETHEUS_PUBLISHED_PORT": "",
            "GRAFANA_PUBLISHED_PORT": "",
            # Compose v1 would build through the `docker` CLI first on PATH, which may lack buildx:
            # the image is built beforehand (`prometheus_image`), and `up` never builds.
            "COMPOSE_DOCKER_CLI_BUILD": "0",
            "DOCKER_BUILDKIT": "0",
        }

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [self.exe, "--ansi", "never", "-p", PROJECT]
        for f in FILES:
            cmd += ["-f", str(f)]
        proc = subprocess.run(
            [*cmd, *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check:
            assert proc.returncode == 0, describe(proc)
        return proc

    def container(self, service: str) -> str:
        return self("ps", "-q", service).stdout.strip()

    def url(self, service: str, port: int) -> str:
        hostport = self("port", service, str(port)).stdout.strip()
        assert hostport.startswith("127.0.0.1:"), hostport
        return f"http://{hostport}"


def prometheus_image() -> None:
    """Build the Prometheus stand-in (Debian's package; a minute, then cached) with BuildKit."""
    compose_dir = REPO / "tests/deploy/compose"
    docker(
        "build", "--label", "textgen.test=prometheus", "-f", str(compose_dir / "prometheus.Dockerfile"),
        "-t", PROMETHEUS_IMAGE, str(compose_dir), timeout=900,
    )  # fmt: skip


@pytest.fixture(scope="module")
def stack() -> Iterator[Compose]:
    compose = Compose()
    prometheus_image()
    try:
        compose("up", "-d", "--no-build", "textgen-cpu", "prometheus", timeout=600)
        yield compose
    finally:
        print(compose("logs", "--tail", "40", check=False).stdout[-6000:])
        compose("down", "-v", "--remove-orphans", "--timeout", "45", check=False, timeout=180)


def health(container: str) -> str:
    return docker("inspect", "-f", "{{.State.Health.Status}}", container).stdout.strip()


def test_prometheus_scrapes_the_service_over_the_compose_network(stack: Compose):
    textgen = stack.container("textgen-cpu")
    wait_for(
        "textgen-cpu to turn healthy (compose health check)", lambda: health(textgen) == "healthy", 240, 1
    )
    api = stack.url("textgen-cpu", 8000)
    (model,) = [m["id"] for m in httpx.get(api + "/v1/models", timeout=30).json()["data"]]
    r = httpx.post(
        api + "/v1/completions",
        json={"model": model, "prompt": "ROMEO.\n", "max_tokens": 6, "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text

    prometheus = stack.url("prometheus", 9090)
    wait_for("prometheus to turn healthy", lambda: health(stack.container("prometheus")) == "healthy", 120, 1)

    def query(expr: str) -> list[dict] | None:
        resp = httpx.get(prometheus + "/api/v1/query", params={"query": expr}, timeout=10)
        body = resp.json()
        assert body["status"] == "success", body
        return body["data"]["result"] or None

    # One scrape every 15 s (deploy/prometheus/prometheus.yml): the token count lands within two.
    expr = f'sum by (instance, job) (textgen_generation_tokens_total{{model="{model}"}}) >= 6'
    (series,) = wait_for(f"`{expr}` through Prometheus", lambda: query(expr), 90, 2)
    assert series["metric"] == {"instance": "textgen:8000", "job": "textgen"}, series
    (up,) = query('up{job="textgen"}')
    assert up["value"][1] == "1"
    names = {s["metric"]["__name__"] for s in query('{__name__=~"textgen_.+", job="textgen"}')}
    assert {
        "textgen_model_info",
        "textgen_num_requests_running",
        "textgen_time_to_first_token_seconds_bucket",
    } <= names


def test_compose_stop_drains_and_exits_zero(stack: Compose):
    textgen = stack.container("textgen-cpu")
    stack("stop", "--timeout", "45", "textgen-cpu", timeout=120)
    state = docker("inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", textgen).stdout.split()
    assert state == ["false", "0"], state
