"""docker-compose.yml (GPU) and docker-compose.cpu.yml (CPU override): valid, and wired as documented."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import yaml
from deploytools import REPO, describe, require_tool, run

BASE = REPO / "docker-compose.yml"
CPU = REPO / "docker-compose.cpu.yml"

# Keys in which textgen-cpu (docker-compose.cpu.yml) may differ from textgen (docker-compose.yml).
CPU_DIFFERENCES = {"build", "image", "environment", "deploy", "profiles", "networks"}


def compose_env() -> dict[str, str]:
    """The environment without the variables the files interpolate, so defaults are what is tested."""
    text = BASE.read_text() + CPU.read_text()
    used = set(re.findall(r"\$\{(\w+)", text)) | set(re.findall(r"^\s+(\w+):\s*$", text, re.MULTILINE))
    return {k: v for k, v in os.environ.items() if k not in used}


def compose_command() -> list[str]:
    """`docker-compose` (v1, or v2 standalone), else the `docker compose` plugin; neither needs an engine for `config`."""
    exe = shutil.which("docker-compose")
    if exe:
        return [exe]
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    return [require_tool("docker-compose")]


def compose_config(*files) -> dict:
    args = compose_command()
    for f in files:
        args += ["-f", str(f)]
    check = run([*args, "config", "-q"], env=compose_env())
    assert check.returncode == 0, describe(check)
    proc = run([*args, "config"], env=compose_env())
    assert proc.returncode == 0, describe(proc)
    return yaml.safe_load(proc.stdout)


@pytest.fixture(scope="module")
def gpu_config() -> dict:
    return compose_config(BASE)


@pytest.fixture(scope="module")
def cpu_config() -> dict:
    return compose_config(BASE, CPU)


def mounts(service: dict) -> dict[str, str]:
    """target -> source of a service's volumes (short syntax from Compose v1, long from v2)."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = v["source"]
        else:
            source, target = v.split(":")[:2]
            out[target] = source
    return out


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration))


def test_config_gpu(gpu_config: dict):
    services = gpu_config["services"]
    assert set(services) == {"textgen", "prometheus", "grafana"}
    textgen = services["textgen"]
    (device,) = textgen["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
    assert textgen["build"]["args"]["RUNTIME"] == "cuda"
    assert textgen["environment"]["TEXTGEN_PROVIDER"] == "cuda"


def test_textgen_service_is_production_shaped(gpu_config: dict):
    textgen = gpu_config["services"]["textgen"]
    assert textgen["restart"] == "unless-stopped"
    assert textgen["read_only"] is True
    assert "/tmp" in textgen["tmpfs"]
    # Docker mounts tmpfs owned by root: the metrics folder must be the image user's (10001), or the
    # server cannot write it (PermissionError at start-up, a restart loop).
    user = re.search(r"^USER (\d+)", (REPO / "Dockerfile").read_text(), re.MULTILINE).group(1)
    (metrics,) = [m for m in textgen["tmpfs"] if m.split(":")[0] == "/run/textgen/metrics"]
    options = dict(o.split("=", 1) for o in metrics.partition(":")[2].split(",") if "=" in o)
    assert options.get("uid") == user and options.get("gid") == user, metrics
    assert textgen["stop_signal"] == "SIGTERM"
    drain = float(textgen["environment"]["TEXTGEN_DRAIN_TIMEOUT_S"])
    assert seconds(textgen["stop_grace_period"]) > drain, "SIGKILL must come after the drain timeout"
    health = " ".join(textgen["healthcheck"]["test"])
    assert "urllib" in health and ("/ready" in health or "/health" in health)
    assert textgen["environment"].get("TEXTGEN_API_KEY") in (None, ""), "no secret in the compose file"
    for name in textgen["environment"]:
        assert name != "TEXTGEN_PORT" and not name.endswith("_SERVICE_HOST"), name


def test_ports_bind_to_loopback_by_default(gpu_config: dict, cpu_config: dict):
    services = gpu_config["services"] | cpu_config["services"]
    for name in ("textgen", "textgen-cpu", "prometheus", "grafana"):
        for port in services[name]["ports"]:
            text = str(port) if not isinstance(port, dict) else f"{port.get('host_ip')}:{port['published']}"
            assert text.startswith("127.0.0.1:"), f"{name}: {port}"


def test_observability_wiring(gpu_config: dict):
    services = gpu_config["services"]
    grafana, prometheus = services["grafana"], services["prometheus"]
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert prometheus["healthcheck"]["test"] and grafana["healthcheck"]["test"]
    assert any("3000" in str(p) for p in grafana["ports"])
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    volumes = mounts(prometheus) | mounts(grafana)
    assert volumes["/etc/prometheus"] == str(REPO / "deploy" / "prometheus")
    assert volumes["/etc/grafana/provisioning"] == str(REPO / "deploy" / "grafana" / "provisioning")
    assert volumes["/etc/grafana/dashboards"] == str(REPO / "deploy" / "grafana" / "dashboards")
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    # The dashboard provider reads the folder compose mounts.
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/textgen.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (REPO / "deploy/grafana/dashboards" / home.removeprefix("/etc/grafana/dashboards/")).is_file()


def test_prometheus_scrapes_the_compose_service():
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "textgen"]
    assert job["static_configs"][0]["targets"] == ["textgen:8000"]


def test_config_cpu_override(cpu_config: dict):
    services = cpu_config["services"]
    # Compose v1 lists the profiled service; v2 leaves inactive profiles out of `config`.
    if "textgen" in services:
        assert services["textgen"]["profiles"] == ["gpu"], "the GPU service is off unless --profile gpu"
    assert yaml.safe_load(CPU.read_text())["services"]["textgen"] == {"profiles": ["gpu"]}
    cpu = services["textgen-cpu"]
    assert "profiles" not in cpu, "textgen-cpu starts by default"
    assert "deploy" not in cpu, "no GPU reservation on CPU"
    assert cpu["build"]["args"]["RUNTIME"] == "cpu"
    assert cpu["environment"]["TEXTGEN_PROVIDER"] == "cpu"
    assert cpu["networks"]["default"]["aliases"] == ["textgen"], "Prometheus scrapes textgen:8000"


def test_cpu_service_mirrors_gpu_service():
    """textgen-cpu is a copy of textgen but for the GPU-specific keys: catch one edited without the other."""
    gpu = yaml.safe_load(BASE.read_text())["services"]["textgen"]
    cpu = yaml.safe_load(CPU.read_text())["services"]["textgen-cpu"]
    for key in set(gpu) | set(cpu):
        if key not in CPU_DIFFERENCES:
            assert gpu.get(key) == cpu.get(key), f"textgen and textgen-cpu differ in {key!r}"
    assert {k: v for k, v in gpu["build"]["args"].items() if k != "RUNTIME"} == {
        k: v for k, v in cpu["build"]["args"].items() if k != "RUNTIME"
    }
    assert {k: v for k, v in gpu["environment"].items() if k != "TEXTGEN_PROVIDER"} == {
        k: v for k, v in cpu["environment"].items() if k != "TEXTGEN_PROVIDER"
    }
    assert gpu["image"].removesuffix("-cuda") == cpu["image"].removesuffix("-cpu")
