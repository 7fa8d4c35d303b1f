"""bench.report on benchmark result files: windows, percentiles, rates and the figures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import report


def _records() -> list[dict]:
    """Window [0, 10): 10 requests, TTFT 0.1 s; window [10, 20): 10 requests, TTFT 0.3 s.
    Each request has 5 tokens 20 ms apart (window 2: 40 ms) and finishes inside its window;
    one failure in each window, the last one ending the run at 20 s."""
    out = []
    for w, (ttft, gap) in enumerate([(0.1, 0.02), (0.3, 0.04)]):
        for i in range(10):
            start = 10.0 * w + i * 0.9
            out.append(
                dict(
                    start=start,
                    ttft=ttft,
                    itl=[gap] * 4,
                    e2e=ttft + 4 * gap,
                    output_tokens=5,
                    ok=True,
                    status=200,
                )
            )
    out.append(dict(start=3.0, ttft=None, itl=[], e2e=0.01, output_tokens=0, ok=False, status=429))
    out.append(dict(start=19.99, ttft=None, itl=[], e2e=0.01, output_tokens=0, ok=False, status=429))
    return out


def test_windows_percentiles_and_rates():
    rep = report.report_from_results(report.load_results_data(_records()), window=10.0)
    ttft = {s.label: s for s in rep.ttft}
    np.testing.assert_allclose(ttft["p50"].t, [5.0, 15.0])
    np.testing.assert_allclose(ttft["p50"].y, [0.1, 0.3])
    np.testing.assert_allclose(ttft["p99"].y, [0.1, 0.3])
    np.testing.assert_allclose({s.label: s for s in rep.itl}["p50"].y, [0.02, 0.04])
    np.testing.assert_allclose({s.label: s for s in rep.e2e}["p90"].y, [0.18, 0.46])
    rps = {s.label: s for s in rep.requests_per_s}
    np.testing.assert_allclose(rps["finished"].y, [1.0, 1.0])  # 10 requests per 10 s
    np.testing.assert_allclose(rps["failed"].y, [0.1, 0.1])
    np.testing.assert_allclose(rep.tokens_per_s[0].y, [5.0, 5.0])  # 50 tokens per 10 s
    assert "22 requests (2 failed)" in rep.subtitle


def test_cli_writes_the_figures(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"config": {}, "summary": {}, "requests": _records()}))
    assert report.main(["--results", str(path), "--out", str(tmp_path / "plots"), "--name", "unit"]) == 0
    out = capsys.readouterr().out
    assert "TTFT: p50" in out and "throughput" in out
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["e2e.png", "itl.png", "overview.png", "throughput.png", "ttft.png"]


def test_cli_errors_name_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"requests": [{"ttft": 0.1}]}))
    assert report.main(["--results", str(bad), "--out", str(tmp_path)]) == 2
    assert "record 0 is malformed" in capsys.readouterr().err
    assert report.main(["--prometheus", "http://127.0.0.1:9", "--step", "soon", "--out", str(tmp_path)]) == 2
    assert "duration" in capsys.readouterr().err


def test_time_and_duration_parsing():
    assert report.parse_duration("500ms") == 0.5
    assert report.parse_duration("2m") == 120
    assert report.parse_time("now-15m", now=1000.0) == 100.0
    assert report.parse_time("2026-01-01T00:00:00Z") == 1767225600.0
    assert report.prom_duration(60) == "60s" and report.prom_duration(0.25) == "250ms"
    with pytest.raises(ValueError, match="'0s'"):
        report.parse_duration("0s")


def test_prometheus_queries_use_the_service_metrics():
    q = report.prometheus_queries("1m", model="m")
    assert q["ttft"]["p99"] == (
        'histogram_quantile(0.99, sum by (le) (rate(textgen_time_to_first_token_seconds_bucket{model="m"}[1m])))'
    )
    assert set(q["e2e"]) == {"p50", "p90", "p99"}
    assert "textgen_generation_tokens_total" in q["tokens_per_s"]["generated"]
