"""Every PromQL expression the deployment ships, ready to run against a real Prometheus.

``dashboard_and_alert_exprs()`` collects the expressions of the Grafana dashboard
(deploy/grafana/dashboards/textgen.json: panel targets and the ``model`` variable) and of the alert
rules (deploy/prometheus/alerts.yml), with Grafana's variables replaced by values Prometheus
accepts: ``$model`` -> ``.+``, ``$__rate_interval`` and ``$__interval`` -> ``1m``.
``adapter_exprs()`` gives the queries of the prometheus-adapter rule behind the HPA
(deploy/k8s/base/prometheus-adapter-rules.yaml); they select on the ``namespace`` and ``pod``
labels that only a Kubernetes scrape adds, so they are kept apart.

The module has no dependency on the test suite (only PyYAML), so that other tests and scripts can
import it: from tests/deploy (``import promql``) or by path. ``python tests/deploy/promql.py``
prints the list.

``METRICS`` is the metric contract of the service (names and types) that the deployment is written
against; ``metric_names(expr)`` lists the textgen metrics an expression reads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "textgen.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
ADAPTER_RULES = REPO / "deploy" / "k8s" / "base" / "prometheus-adapter-rules.yaml"

# The service's metrics (all carry a `model` label). Histograms are read through their
# _bucket / _sum / _count series.
METRICS: dict[str, str] = {
    "textgen_time_to_first_token_seconds": "histogram",
    "textgen_inter_token_latency_seconds": "histogram",
    "textgen_e2e_request_latency_seconds": "histogram",
    "textgen_request_queue_time_seconds": "histogram",
    "textgen_request_prefill_time_seconds": "histogram",
    "textgen_request_decode_time_seconds": "histogram",
    "textgen_request_prompt_tokens": "histogram",
    "textgen_request_generation_tokens": "histogram",
    "textgen_iteration_batch_size": "histogram",
    "textgen_prompt_tokens_total": "counter",
    "textgen_generation_tokens_total": "counter",
    "textgen_spec_decode_num_draft_tokens_total": "counter",
    "textgen_spec_decode_num_accepted_tokens_total": "counter",
    "textgen_prefix_cache_queries_total": "counter",
    "textgen_prefix_cache_hits_total": "counter",
    "textgen_prefix_cache_blocks": "gauge",
    "textgen_prefix_cache_usage_perc": "gauge",
    "textgen_requests_finished_total": "counter",
    "textgen_requests_rejected_total": "counter",
    "textgen_http_requests_total": "counter",
    "textgen_num_requests_running": "gauge",
    "textgen_num_requests_waiting": "gauge",
    "textgen_waiting_queue_capacity": "gauge",
    "textgen_kv_cache_usage_perc": "gauge",
    "textgen_model_info": "gauge",
}

_SUBSTITUTIONS = [
    (re.compile(r"\$\{model(?::[a-z]+)?\}|\$model\b"), ".+"),
    (re.compile(r"\$\{__rate_interval\}|\$__rate_interval\b"), "1m"),
    (re.compile(r"\$\{__interval\}|\$__interval\b"), "1m"),
]
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<expr>.+?)\s*,\s*(?P<label>\w+)\s*\)\s*$")
_METRIC = re.compile(r"\btextgen_[a-z0-9_]+\b")


def substitute(expr: str) -> str:
    """Replace the Grafana variables the dashboard uses with values Prometheus accepts."""
    for pattern, value in _SUBSTITUTIONS:
        expr = pattern.sub(value, expr)
    return expr


def _panels(panels: list[dict]) -> list[dict]:
    """Flatten panels, including those nested in collapsed rows."""
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(_panels(panel.get("panels", [])))
    return out


def dashboard_exprs(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and query variable of a dashboard, substituted."""
    dashboard = json.loads(path.read_text())
    out: list[tuple[str, str]] = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else (query or "")
        match = _LABEL_VALUES.match(query)
        # label_values(expr, label) is Grafana's; the PromQL part is expr.
        expr = match.group("expr") if match else query
        if expr:
            out.append((f"{path.name}: variable {var['name']}", substitute(expr)))
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                where = f"{path.name}: panel {panel.get('id')} {panel.get('title')!r} target {target.get('refId')}"
                out.append((where, substitute(target["expr"])))
    return out


def alert_exprs(path: Path = ALERTS) -> list[tuple[str, str]]:
    """(where, expr) for every alerting and recording rule of a Prometheus rule file."""
    rules = yaml.safe_load(path.read_text())
    out = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            out.append((f"{path.name}: {group['name']}/{name}", rule["expr"].strip()))
    return out


def adapter_exprs(path: Path = ADAPTER_RULES) -> list[tuple[str, str]]:
    """The prometheus-adapter rules as the queries the adapter sends for one pod.

    The adapter fills ``<<.Series>>``, ``<<.LabelMatchers>>`` and ``<<.GroupBy>>``; here they
    become the metric name, a namespace/pod matcher matching anything, and ``pod``.
    """
    config_map = yaml.safe_load(path.read_text())
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    out = []
    for i, rule in enumerate(config["rules"]):
        series = _METRIC.search(rule["seriesQuery"]).group(0)
        out.append((f"{path.name}: rule {i} seriesQuery", rule["seriesQuery"]))
        query = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace=~".+",pod=~".+"')
            .replace("<<.GroupBy>>", "pod")
        )
        out.append((f"{path.name}: rule {i} metricsQuery", query))
    return out


def dashboard_and_alert_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every PromQL expression of the dashboard and of the alert rules.

    Grafana variables are substituted: ``$model`` by ``.+``, ``$__rate_interval`` and
    ``$__interval`` by ``1m``.
    """
    return dashboard_exprs() + alert_exprs()


def metric_names(expr: str) -> set[str]:
    """The textgen metric families an expression reads (histogram suffixes removed)."""
    names = set()
    for name in _METRIC.findall(expr):
        for suffix in ("_bucket", "_sum", "_count"):
            base = name.removesuffix(suffix)
            if base != name and METRICS.get(base) == "histogram":
                name = base
                break
        names.add(name)
    return names


if __name__ == "__main__":
    for where, expr in dashboard_and_alert_exprs() + adapter_exprs():
        print(f"# {where}\n{expr}\n")
