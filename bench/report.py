"""Plots of serving latency and throughput over time, from Prometheus or from a benchmark run.

Two sources, the same four figures (PNG, matplotlib Agg):

- ``--prometheus URL --start T --end T --step S``: range queries (``/api/v1/query_range``) over
  the service's metrics: ``histogram_quantile`` of the TTFT, inter-token and end-to-end
  histograms, and ``rate`` of the finished-request and generated-token counters.
- ``--results FILE``: a benchmark result JSON (``bench/serve.py``): a list of per-request
  records ``{"start", "ttft", "itl": [...], "e2e", "output_tokens", "ok"}`` with times in
  seconds, ``start`` relative to the start of the run; or an object holding that list under
  ``"requests"``. Each value is placed at the time the server would have observed it (a TTFT at
  ``start + ttft``, each inter-token gap when its token arrived, e2e at completion) and
  percentiles are taken over fixed windows.

Figures: ``ttft.png`` (p50, p99), ``itl.png`` (p50, p99), ``e2e.png`` (p50, p90, p99),
``throughput.png`` (requests/s and output tokens/s), and ``overview.png`` with all four.

Examples::

    python -m bench.report --results bench/results/run.json --out bench/results/plots
    python -m bench.report --prometheus http://localhost:9090 --start now-30m --end now \\
        --step 15s --window 1m --out bench/results/plots
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

TTFT_SLO_S = 1.0  # the alert threshold on p99 TTFT (deploy/prometheus/alerts.yml)
COLORS = {"p50": "#1f77b4", "p90": "#ff7f0e", "p99": "#d62728"}


@dataclass
class Series:
    """One line: values at times in seconds since the start of the report (NaN: no data)."""

    label: str
    t: np.ndarray
    y: np.ndarray


@dataclass
class Report:
    title: str
    subtitle: str
    ttft: list[Series] = field(default_factory=list)  # seconds
    itl: list[Series] = field(default_factory=list)  # seconds
    e2e: list[Series] = field(default_factory=list)  # seconds
    requests_per_s: list[Series] = field(default_factory=list)
    tokens_per_s: list[Series] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Parsing of times and durations
# ---------------------------------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """``"15s"``, ``"1m"``, ``"500ms"``, ``"2h"`` or a number of seconds, as seconds."""
    m = _DURATION.match(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"expected a positive duration like 15s, 1m, 500ms, got {text!r}")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def prom_duration(seconds: float) -> str:
    """Seconds as a PromQL duration (whole milliseconds)."""
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def parse_time(text: str, now: float | None = None) -> float:
    """``now``, ``now-15m``, a Unix timestamp or an ISO 8601 time, as a Unix timestamp."""
    now = time.time() if now is None else now
    s = text.strip()
    if s == "now":
        return now
    if s.startswith("now-"):
        return now - parse_duration(s[4:])
    try:
        return float(s)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"expected now, now-<duration>, a Unix time or an ISO 8601 time, got {text!r}"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


# ---------------------------------------------------------------------------------------------
# Source 1: Prometheus
# ---------------------------------------------------------------------------------------------


def prometheus_queries(window: str, model: str | None = None) -> dict[str, dict[str, str]]:
    """The PromQL behind each figure: ``{figure: {line label: expression}}``."""
    sel = f'{{model="{model}"}}' if model else ""

    def q(quantile: float, hist: str) -> str:
        return f"histogram_quantile({quantile}, sum by (le) (rate({hist}_bucket{sel}[{window}])))"

    ttft, itl, e2e = (
        "textgen_time_to_first_token_seconds",
        "textgen_inter_token_latency_seconds",
        "textgen_e2e_request_latency_seconds",
    )
    failed_sel = f'{{model="{model}",finish_reason="error"}}' if model else '{finish_reason="error"}'
    return {
        "ttft": {"p50": q(0.5, ttft), "p99": q(0.99, ttft)},
        "itl": {"p50": q(0.5, itl), "p99": q(0.99, itl)},
        "e2e": {"p50": q(0.5, e2e), "p90": q(0.9, e2e), "p99": q(0.99, e2e)},
        "requests_per_s": {
            "finished": f"sum(rate(textgen_requests_finished_total{sel}[{window}]))",
            "failed": (
                f"sum(rate(textgen_requests_finished_total{failed_sel}[{window}]))"
                f" + sum(rate(textgen_requests_rejected_total{sel}[{window}]))"
            ),
        },
        "tokens_per_s": {"generated": f"sum(rate(textgen_generation_tokens_total{sel}[{window}]))"},
    }


def query_range(
    url: str, expr: str, start: float, end: float, step: float, timeout: float = 30.0
) -> list[dict]:
    """``/api/v1/query_range``; returns the ``result`` list of the matrix. Raises RuntimeError."""
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    full = f"{url.rstrip('/')}/api/v1/query_range?{params}"
    try:
        with urllib.request.urlopen(full, timeout=timeout) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        raise RuntimeError(f"Prometheus rejected {expr!r}: HTTP {e.code} {detail}") from None
    except urllib.error.URLError as e:
        raise RuntimeError(f"cannot reach Prometheus at {url}: {e.reason}") from None
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus query {expr!r} failed: {body.get('error')}")
    return body["data"]["result"]


def report_from_prometheus(
    url: str, start: float, end: float, step: float, window: str, model: str | None = None
) -> Report:
    if end <= start:
        raise ValueError(f"--end ({end}) must be after --start ({start})")
    grid = np.arange(start, end + step / 2, step)
    rep = Report(
        title=f"textgen from Prometheus{f' (model {model})' if model else ''}",
        subtitle=(
            f"{datetime.fromtimestamp(start, UTC):%Y-%m-%d %H:%M:%S} UTC + "
            f"{end - start:.0f} s, step {step:g} s, rate window {window}"
        ),
    )
    for figure, lines in prometheus_queries(window, model).items():
        for label, expr in lines.items():
            y = np.full(len(grid), np.nan)
            for res in query_range(url, expr, start, end, step):
                for ts, val in res["values"]:
                    i = round((float(ts) - start) / step)
                    if 0 <= i < len(grid):
                        v = float(val)
                        y[i] = v if math.isfinite(v) else np.nan
            getattr(rep, figure).append(Series(label, grid - start, y))
    return rep


# ---------------------------------------------------------------------------------------------
# Source 2: a benchmark result file
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    start: float
    ttft: float | None
    itl: tuple[float, ...]
    e2e: float | None
    output_tokens: int
    ok: bool


def load_results(path: str | Path) -> list[Record]:
    """Read per-request records from a benchmark result JSON (see the module docstring)."""
    try:
        return load_results_data(json.loads(Path(path).read_text()))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def load_results_data(data: Any) -> list[Record]:
    """Per-request records from parsed JSON: a list of records or ``{"requests": [...]}``."""
    if isinstance(data, dict):
        data = data.get("requests")
    if not isinstance(data, list):
        raise ValueError("expected a list of request records or an object with a 'requests' list")
    out = []
    for i, r in enumerate(data):
        try:
            out.append(
                Record(
                    start=float(r["start"]),
                    ttft=None if r.get("ttft") is None else float(r["ttft"]),
                    itl=tuple(float(x) for x in r.get("itl") or ()),
                    e2e=None if r.get("e2e") is None else float(r["e2e"]),
                    output_tokens=int(r.get("output_tokens") or 0),
                    ok=bool(r.get("ok", True)),
                )
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"request record {i} is malformed ({e!r}): {r!r}") from None
    if not out:
        raise ValueError("no request records")
    return out


def nice_window(seconds: float) -> float:
    """The 1-2-5 value nearest above ``seconds`` (at least 0.1 s), for round window widths."""
    for exp in range(-1, 7):
        for m in (1, 2, 5):
            if m * 10.0**exp >= seconds:
                return round(m * 10.0**exp, 6)
    return 10.0**7


def _windowed(
    times: np.ndarray, values: np.ndarray, edges: np.ndarray, quantiles: dict[str, float]
) -> list[Series]:
    centers = (edges[:-1] + edges[1:]) / 2
    idx = np.digitize(times, edges) - 1
    out = {k: np.full(len(centers), np.nan) for k in quantiles}
    for w in range(len(centers)):
        v = values[idx == w]
        if len(v):
            for k, q in quantiles.items():
                out[k][w] = np.percentile(v, q * 100)
    return [Series(k, centers, y) for k, y in out.items()]


def report_from_results(records: list[Record], window: float | None = None, name: str = "") -> Report:
    """Percentiles and rates over fixed windows (default: about 40 windows over the run)."""
    ok = [r for r in records if r.ok]
    ttft_t = np.array([r.start + r.ttft for r in ok if r.ttft is not None])
    ttft_v = np.array([r.ttft for r in ok if r.ttft is not None])
    itl_t, itl_v, tok_t = [], [], []
    for r in ok:
        if r.ttft is None:
            continue
        t = r.start + r.ttft
        tok_t.append(t)
        for gap in r.itl:
            t += gap
            itl_t.append(t)
            itl_v.append(gap)
            tok_t.append(t)
        # Tokens the record counts but whose gaps it did not list arrive at completion.
        missing = r.output_tokens - 1 - len(r.itl)
        if missing > 0 and r.e2e is not None:
            tok_t.extend([r.start + r.e2e] * missing)
    done = [r for r in records if r.e2e is not None]
    e2e_t = np.array([r.start + r.e2e for r in done if r.ok])
    e2e_v = np.array([r.e2e for r in done if r.ok])
    fail_t = np.array([r.start + (r.e2e or 0.0) for r in records if not r.ok])

    end = max([r.start + (r.e2e or 0.0) for r in records] + [max(tok_t, default=0.0)])
    if window is None:
        window = nice_window(end / 40)
    edges = np.arange(max(1, math.ceil(end / window - 1e-9)) + 1) * window
    centers = (edges[:-1] + edges[1:]) / 2
    p = {"p50": 0.5, "p99": 0.99}

    # Rates over the part of each window the run covers; none for a last window under half full.
    covered = np.minimum(edges[1:], end) - edges[:-1]

    def rate(times) -> np.ndarray:
        counts = np.histogram(np.asarray(times, dtype=float), bins=edges)[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(covered >= window / 2, counts / covered, np.nan)

    n_fail = len(records) - len(ok)
    return Report(
        title=f"textgen benchmark{f': {name}' if name else ''}",
        subtitle=(
            f"{len(records)} requests ({n_fail} failed) over {end:.1f} s; percentiles over {window:g} s windows"
        ),
        ttft=_windowed(ttft_t, ttft_v, edges, p),
        itl=_windowed(np.array(itl_t), np.array(itl_v), edges, p),
        e2e=_windowed(e2e_t, e2e_v, edges, {"p50": 0.5, "p90": 0.9, "p99": 0.99}),
        requests_per_s=[Series("finished", centers, rate(e2e_t)), Series("failed", centers, rate(fail_t))],
        tokens_per_s=[Series("generated", centers, rate(tok_t))],
    )


def summary(records: list[Record]) -> str:
    """One line per measure: overall percentiles of the successful requests."""
    ok = [r for r in records if r.ok]
    rows = [
        ("TTFT", [r.ttft for r in ok if r.ttft is not None]),
        ("inter-token", [g for r in ok for g in r.itl]),
        ("e2e", [r.e2e for r in ok if r.e2e is not None]),
    ]
    lines = []
    for name, v in rows:
        if v:
            a = np.asarray(v) * 1000
            lines.append(
                f"{name:>12}: p50 {np.percentile(a, 50):8.1f} ms  p90 {np.percentile(a, 90):8.1f} ms  "
                f"p99 {np.percentile(a, 99):8.1f} ms  (n={len(a)})"
            )
    span = max(r.start + (r.e2e or 0.0) for r in records) - min(r.start for r in records)
    if span > 0:
        tokens = sum(r.output_tokens for r in ok)
        lines.append(
            f"{'throughput':>12}: {len(ok) / span:.2f} requests/s, {tokens / span:.1f} output tokens/s"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plotting
# ---------------------------------------------------------------------------------------------


def _time_axis(report: Report) -> tuple[float, str]:
    span = max(
        (float(np.nanmax(s.t)) for f in _figures(report).values() for s in f[1] if len(s.t)), default=0
    )
    return (60.0, "minutes") if span > 1200 else (1.0, "seconds")


def _figures(report: Report) -> dict[str, tuple[str, list[Series], str]]:
    return {
        "ttft": ("Time to first token", report.ttft, "latency"),
        "itl": ("Inter-token latency", report.itl, "latency"),
        "e2e": ("End-to-end request latency", report.e2e, "latency"),
        "throughput": ("Throughput", report.requests_per_s, "rate"),
    }


def _draw(ax, key: str, report: Report, t_scale: float, t_unit: str) -> None:
    title, series, kind = _figures(report)[key]
    ax.set_title(title, loc="left", fontsize=11, fontweight="bold")
    ax.grid(True, alpha=0.3)
    ax.set_xlabel(f"time since start ({t_unit})")
    ax.spines[["top", "right"]].set_visible(False)
    if kind == "latency":
        ymax = max((float(np.nanmax(s.y)) for s in series if np.isfinite(s.y).any()), default=0.0)
        scale, unit = (1000.0, "ms") if ymax < 1.0 else (1.0, "s")
        for s in series:
            ax.plot(
                s.t / t_scale, s.y * scale, label=s.label, color=COLORS.get(s.label), lw=1.8, marker=".", ms=3
            )
        if key == "ttft" and ymax > 0.25 * TTFT_SLO_S:
            ax.axhline(TTFT_SLO_S * scale, color="0.4", ls="--", lw=1, label=f"SLO (p99 < {TTFT_SLO_S:g} s)")
        ax.set_ylabel(f"latency ({unit})")
        top = max(ymax, TTFT_SLO_S if key == "ttft" and ymax > 0.25 * TTFT_SLO_S else 0.0) * scale
        ax.set_ylim(0, top * 1.22 if top > 0 else 1)  # headroom for the legend
        if not any(np.isfinite(s.y).any() for s in series):
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")
        ax.legend(loc="upper left", frameon=False, ncol=4)
        return
    # Throughput: requests/s on the left axis, output tokens/s on the right.
    for s, c in zip(report.requests_per_s, ("#2ca02c", "#7f7f7f"), strict=False):
        if s.label == "failed" and not np.nan_to_num(s.y).any():
            continue
        ax.plot(s.t / t_scale, s.y, label=f"requests/s ({s.label})", color=c, lw=1.8, marker=".", ms=3)
    ax.set_ylabel("requests / s")
    ymax = max((float(np.nanmax(s.y)) for s in report.requests_per_s if np.isfinite(s.y).any()), default=0.0)
    ax.set_ylim(0, ymax * 1.22 if ymax > 0 else 1)
    ax2 = ax.twinx()
    ax2.spines[["top"]].set_visible(False)
    for s in report.tokens_per_s:
        ax2.plot(
            s.t / t_scale, s.y, label="output tokens/s", color="#9467bd", lw=1.8, ls="-", marker=".", ms=3
        )
    ax2.set_ylabel("output tokens / s")
    ymax = max((float(np.nanmax(s.y)) for s in report.tokens_per_s if np.isfinite(s.y).any()), default=0.0)
    ax2.set_ylim(0, ymax * 1.22 if ymax > 0 else 1)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", frameon=False, ncol=3)


def plot(report: Report, out_dir: str | Path, prefix: str = "") -> list[Path]:
    """Write ``ttft.png``, ``itl.png``, ``e2e.png``, ``throughput.png`` and ``overview.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_scale, t_unit = _time_axis(report)
    paths = []
    with plt.rc_context({"font.size": 10, "axes.titlepad": 8}):
        for key in _figures(report):
            fig, ax = plt.subplots(figsize=(10, 4.2), dpi=150, layout="constrained")
            _draw(ax, key, report, t_scale, t_unit)
            fig.suptitle(f"{report.title}\n{report.subtitle}", fontsize=9, color="0.35", x=0.99, ha="right")
            paths.append(out / f"{prefix}{key}.png")
            fig.savefig(paths[-1])
            plt.close(fig)
        fig, axes = plt.subplots(2, 2, figsize=(15, 8.5), dpi=130, layout="constrained")
        for ax, key in zip(axes.flat, _figures(report), strict=True):
            _draw(ax, key, report, t_scale, t_unit)
        fig.suptitle(f"{report.title} — {report.subtitle}", fontsize=12)
        paths.append(out / f"{prefix}overview.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.report",
        description="Plot TTFT, inter-token latency, e2e latency and throughput over time, "
        "from a Prometheus server or from a benchmark result JSON.",
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prometheus", metavar="URL", help="Prometheus base URL, e.g. http://localhost:9090")
    src.add_argument("--results", metavar="FILE", help="benchmark result JSON (bench/serve.py)")
    ap.add_argument(
        "--start", default="now-15m", help="range start: now, now-15m, Unix time, ISO 8601 (default now-15m)"
    )
    ap.add_argument("--end", default="now", help="range end (default now)")
    ap.add_argument("--step", default="15s", help="query resolution step (default 15s)")
    ap.add_argument(
        "--window",
        default=None,
        help="Prometheus: rate() window (default 4 x step, at least 15s); "
        "results: percentile window in seconds (default about 40 windows over the run)",
    )
    ap.add_argument("--model", default=None, help="Prometheus: only this model label")
    ap.add_argument("--name", default="", help="a name for the run, shown in the figure titles")
    ap.add_argument(
        "--out", default="bench/results/plots", help="output folder (default bench/results/plots)"
    )
    ap.add_argument("--prefix", default="", help="prefix of the file names, e.g. 'run1-'")
    args = ap.parse_args(argv)

    try:
        if args.prometheus:
            start, end, step = parse_time(args.start), parse_time(args.end), parse_duration(args.step)
            window = args.window or prom_duration(max(4 * step, 15.0))
            parse_duration(window)
            rep = report_from_prometheus(args.prometheus, start, end, step, window, args.model)
            if args.name:
                rep.title += f": {args.name}"
        else:
            records = load_results(args.results)
            window = parse_duration(args.window) if args.window else None
            rep = report_from_results(records, window, args.name)
            print(summary(records))
        paths = plot(rep, args.out, args.prefix)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
