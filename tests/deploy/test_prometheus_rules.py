"""deploy/prometheus: promtool check config / check rules / test rules, and coverage of the alert tests."""

from __future__ import annotations

import pytest
import yaml
from deploytools import REPO, describe, require_tool, run
from promql import METRICS, adapter_exprs, dashboard_and_alert_exprs, metric_names

PROM = REPO / "deploy" / "prometheus"
ALERTS = PROM / "alerts.yml"
ALERTS_TEST = PROM / "alerts_test.yml"

REQUIRED_ALERTS = {
    "TextgenInstanceDown",
    "TextgenTimeToFirstTokenSLO",
    "TextgenWaitingQueueSaturated",
    "TextgenHighErrorRate",
    "TextgenKVCacheNearlyFull",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_tool("promtool")


def alerts() -> dict[str, dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def test_check_config(promtool: str):
    proc = run([promtool, "check", "config", "prometheus.yml"], cwd=PROM)
    assert proc.returncode == 0, describe(proc)


def test_check_rules(promtool: str):
    proc = run([promtool, "check", "rules", "alerts.yml"], cwd=PROM)
    assert proc.returncode == 0, describe(proc)


def test_rule_unit_tests(promtool: str):
    proc = run([promtool, "test", "rules", "alerts_test.yml"], cwd=PROM)
    assert proc.returncode == 0, describe(proc)
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_required_alerts_exist_with_severity_and_text():
    rules = alerts()
    assert set(rules) >= REQUIRED_ALERTS
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert "for" in rule, f"{name}: alerts wait a `for` period so that one bad scrape does not page"


def test_ttft_alert_is_p99_over_one_second():
    expr = " ".join(alerts()["TextgenTimeToFirstTokenSLO"]["expr"].split())
    assert "histogram_quantile(0.99," in expr
    assert "rate(textgen_time_to_first_token_seconds_bucket[5m])" in expr
    assert expr.endswith("> 1.0")
    assert alerts()["TextgenTimeToFirstTokenSLO"]["for"] == "5m"


def test_every_alert_has_a_firing_and_a_quiet_test():
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(alerts())
    assert names - fired == set(), f"alerts never seen firing in alerts_test.yml: {sorted(names - fired)}"
    assert names - quiet == set(), f"alerts never checked quiet in alerts_test.yml: {sorted(names - quiet)}"


def test_every_expression_parses(promtool: str, tmp_path):
    """Dashboard, alert and adapter expressions (variables substituted) as recording rules: promtool parses each."""
    exprs = dashboard_and_alert_exprs() + adapter_exprs()
    rules = {
        "groups": [
            {
                "name": "parse",
                "rules": [{"record": f"check:expr{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    proc = run([promtool, "check", "rules", str(path)])
    where = "\n".join(f"check:expr{i} = {w}" for i, (w, _) in enumerate(exprs))
    assert proc.returncode == 0, describe(proc) + "\n" + where


def test_expressions_use_only_contract_metrics():
    for where, expr in dashboard_and_alert_exprs() + adapter_exprs():
        unknown = metric_names(expr) - set(METRICS)
        assert not unknown, f"{where}: {sorted(unknown)} are not metrics of the service: {expr}"
        for name in metric_names(expr):
            if METRICS[name] == "histogram":
                assert f"{name}_bucket" in expr or f"{name}_sum" in expr or f"{name}_count" in expr, (
                    f"{where}: histogram {name} read without _bucket/_sum/_count"
                )


def test_expression_list_is_complete():
    exprs = dashboard_and_alert_exprs()
    assert all("$" not in expr for _, expr in exprs), "Grafana variables left unsubstituted"
    assert sum(1 for where, _ in exprs if where.startswith("alerts.yml")) == len(alerts())
    assert sum(1 for where, _ in exprs if "panel" in where) >= 20
