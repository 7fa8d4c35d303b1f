"""deploy/k8s: each kustomization renders, every document validates, and the pieces fit together."""

from __future__ import annotations

import re

import pytest
import yaml
from deploytools import REPO, describe, missing, require_tool, run

K8S = REPO / "deploy" / "k8s"
OVERLAYS = ["cpu", "gpu"]
# Oldest supported Kubernetes minor and the newest schemas kubernetes-validate bundles.
K8S_VERSIONS = ["1.29.0", "latest"]
# Custom resources: kubernetes-validate has no schema for them. They are checked by
# test_servicemonitor and test_prometheusrule below instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def render(path) -> list[dict]:
    kubectl = require_tool("kubectl")
    proc = run([kubectl, "kustomize", str(path)])
    assert proc.returncode == 0, describe(proc)
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(K8S / "overlays" / request.param)


def one(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def config_env(docs: list[dict]) -> dict[str, str]:
    (cm,) = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("textgen-config-")
    ]
    return cm["data"]


def container(docs: list[dict]) -> dict:
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def test_base_renders():
    docs = render(K8S / "base")
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
        "PrometheusRule",
    } <= kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_documents_validate(overlay, version):
    try:
        import kubernetes_validate
    except ImportError:
        missing("the Python package kubernetes-validate", ".venv/bin/pip install kubernetes-validate")
    version = kubernetes_validate.latest_version() if version == "latest" else version
    _, docs = overlay
    validated, errors = 0, []
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue  # no schema in kubernetes-validate: see test_servicemonitor / test_prometheusrule
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
            validated += 1
        except kubernetes_validate.ValidationError as e:
            path = "/".join(map(str, e.path))
            errors.append(f"{where} is invalid for Kubernetes {version} at {path or '.'}: {e.message[:300]}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(
                f"{doc['apiVersion']} {doc['kind']} is not a Kubernetes {version} kind (a CRD? add it to CRD_KINDS)"
            )
    assert not errors, "\n".join(errors)
    assert validated >= 7


def test_deployment_probes_and_drain(overlay):
    _, docs = overlay
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "give the model time to load"
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    drain = float(config_env(docs)["TEXTGEN_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain, "SIGKILL must come after preStop + drain"


def test_deployment_security(overlay):
    _, docs = overlay
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    assert pod["enableServiceLinks"] is False, "Kubernetes would inject TEXTGEN_PORT for the Service"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    env = config_env(docs)
    for path in ("/tmp", env["PROMETHEUS_MULTIPROC_DIR"]):
        assert path in mounts, f"{path} must be writable (emptyDir) with a read-only root"
        assert "emptyDir" in volumes[mounts[path]]


def test_configuration(overlay):
    name, docs = overlay
    env = config_env(docs)
    for key in env:
        assert key.startswith(("TEXTGEN_", "PROMETHEUS_")), key
        assert key != "TEXTGEN_PORT" and not key.endswith("_SERVICE_HOST"), key
    c = container(docs)
    (port,) = c["ports"]
    assert port["name"] == "http" and str(port["containerPort"]) == env["TEXTGEN_HTTP_PORT"]
    assert env["TEXTGEN_HOST"] == "0.0.0.0"
    assert c["envFrom"][0]["configMapRef"]["name"] == next(
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("textgen-config-")
    )
    (api_key,) = c["env"]
    assert api_key["name"] == "TEXTGEN_API_KEY" and api_key["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["TEXTGEN_PROVIDER"] == {"cpu": "cpu", "gpu": "cuda"}[name]


def test_gpu_overlay_requests_a_gpu():
    docs = render(K8S / "overlays" / "gpu")
    c = container(docs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert c["image"].endswith("-cuda")


def test_cpu_overlay_requests_no_gpu():
    docs = render(K8S / "overlays" / "cpu")
    c = container(docs)
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert "tolerations" not in one(docs, "Deployment")["spec"]["template"]["spec"]
    assert c["image"].endswith("-cpu")
    # One ONNX Runtime thread per requested core but one: the HTTP process needs a core.
    assert config_env(docs)["TEXTGEN_INTRA_OP_THREADS"] == str(int(c["resources"]["requests"]["cpu"]) - 1)


def test_selectors_match(overlay):
    _, docs = overlay
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert one(docs, "Service")["spec"]["selector"].items() <= pod_labels.items()
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


def test_hpa_scales_on_waiting_requests_via_adapter(overlay):
    _, docs = overlay
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", one(docs, "Deployment")["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2, "a PodDisruptionBudget with one replica blocks node drains"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "textgen_num_requests_waiting"
    (adapter,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "textgen-prometheus-adapter-rules"
    ]
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    served = [r for r in rules if r["name"]["as"] == name]
    assert served, f"no prometheus-adapter rule serves {name}"
    (rule,) = served
    assert rule["seriesQuery"].startswith(name + "{")
    assert rule["resources"]["overrides"]["pod"]["resource"] == "pod"
    assert rule["resources"]["overrides"]["namespace"]["resource"] == "namespace"
    assert re.fullmatch(rule["name"]["matches"], name)


def test_servicemonitor(overlay):
    """CRD monitoring.coreos.com/v1 ServiceMonitor, checked by hand (kubernetes-validate has no schema)."""
    _, docs = overlay
    sm = one(docs, "ServiceMonitor")
    service = one(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in sm["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+s", endpoint["interval"])
    # job = the Service's label named by jobLabel; the alerts select job="textgen".
    assert service["metadata"]["labels"][sm["spec"]["jobLabel"]] == "textgen"


def test_prometheusrule_equals_alerts_yml(overlay):
    """CRD monitoring.coreos.com/v1 PrometheusRule: the same groups as deploy/prometheus/alerts.yml."""
    _, docs = overlay
    rule = one(docs, "PrometheusRule")
    alerts = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"], (
        "deploy/k8s/base/prometheusrule.yaml drifted from deploy/prometheus/alerts.yml: copy the groups over"
    )
