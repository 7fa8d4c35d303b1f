"""deploy/grafana: the dashboard JSON and its provisioning."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from deploytools import REPO
from promql import DASHBOARD, dashboard_exprs, metric_names

GRAFANA = REPO / "deploy" / "grafana"

# Panel title -> metrics it must read: the panels the operations runbook refers to.
REQUIRED_PANELS = {
    "End-to-end request latency": {"textgen_e2e_request_latency_seconds"},
    "Time to first token": {"textgen_time_to_first_token_seconds"},
    "Inter-token latency": {"textgen_inter_token_latency_seconds"},
    "HTTP request rate by status": {"textgen_http_requests_total"},
    "Tokens / s": {"textgen_generation_tokens_total"},
    "Running and waiting requests": {"textgen_num_requests_running", "textgen_num_requests_waiting"},
    "KV cache usage": {"textgen_kv_cache_usage_perc"},
    "Batch size per engine step": {"textgen_iteration_batch_size"},
    "Speculative decoding": {
        "textgen_spec_decode_num_draft_tokens_total",
        "textgen_spec_decode_num_accepted_tokens_total",
    },
    "Prefix cache": {
        "textgen_prefix_cache_hits_total",
        "textgen_prefix_cache_queries_total",
        "textgen_prefix_cache_usage_perc",
    },
    "Finish reasons": {"textgen_requests_finished_total"},
    "Rejections": {"textgen_requests_rejected_total"},
}
REQUIRED_QUANTILES = {
    "End-to-end request latency": {"0.5", "0.9", "0.99"},
    "Time to first token": {"0.5", "0.99"},
    "Inter-token latency": {"0.5", "0.99"},
}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> list[dict]:
    out, todo = [], list(dashboard["panels"])
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(p.get("panels", []))
    return out


def test_dashboard_identity(dashboard: dict):
    assert dashboard["uid"] == "textgen" and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)


def test_model_variable(dashboard: dict):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    model = variables["model"]
    assert model["type"] == "query"
    query = model["query"]["query"] if isinstance(model["query"], dict) else model["query"]
    assert query == "label_values(textgen_model_info, model)"
    assert model["includeAll"] and model["multi"] and model["allValue"] == ".+"
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )


def test_every_panel_has_a_target(dashboard: dict):
    for p in panels(dashboard):
        if p["type"] == "row":
            continue
        assert p.get("targets"), f"panel {p['title']!r} has no target"
        for t in p["targets"]:
            assert t.get("expr"), f"panel {p['title']!r} target {t.get('refId')} has no expr"
            assert t["datasource"]["uid"] == "${datasource}"


def test_panel_ids_and_layout(dashboard: dict):
    ps = panels(dashboard)
    ids = [p["id"] for p in ps]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in ps:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]


def test_every_selector_filters_on_the_model_variable(dashboard: dict):
    for p in panels(dashboard):
        for t in p.get("targets", []):
            expr = t["expr"]
            selectors = re.findall(r"\btextgen_[a-z0-9_]+(\{[^}]*\})?", expr)
            assert selectors, f"{p['title']!r}: no textgen metric in {expr}"
            for sel in selectors:
                assert 'model=~"$model"' in sel, f'{p["title"]!r}: selector without model=~"$model": {expr}'
            if "rate(" in expr:
                assert "[$__rate_interval]" in expr, f"{p['title']!r}: use $__rate_interval in rate(): {expr}"


def test_required_panels(dashboard: dict):
    by_title = {p["title"]: p for p in panels(dashboard)}
    for title, metrics in REQUIRED_PANELS.items():
        assert title in by_title, f"missing panel {title!r}"
        read = set().union(*(metric_names(t["expr"]) for t in by_title[title]["targets"]))
        assert metrics <= read, f"{title!r} reads {sorted(read)}, needs {sorted(metrics)}"
    for title, quantiles in REQUIRED_QUANTILES.items():
        found = {
            m
            for t in by_title[title]["targets"]
            for m in re.findall(r"histogram_quantile\(([\d.]+)", t["expr"])
        }
        assert quantiles <= found, f"{title!r} shows quantiles {sorted(found)}, needs {sorted(quantiles)}"
    status = by_title["HTTP request rate by status"]["targets"][0]["expr"]
    assert "by (status)" in status


def test_dashboard_exprs_are_substituted():
    exprs = dashboard_exprs()
    assert exprs and all("$" not in e for _, e in exprs)
    assert any('model=~".+"' in e and "[1m]" in e for _, e in exprs)


def test_provisioning_files():
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True and source["uid"] == "prometheus"
    dashboard = json.loads(DASHBOARD.read_text())
    default_ds = {v["name"]: v for v in dashboard["templating"]["list"]}["datasource"]["current"]["value"]
    assert default_ds == source["uid"], "the dashboard's default datasource is the provisioned one"
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/textgen.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/etc/grafana/dashboards"
