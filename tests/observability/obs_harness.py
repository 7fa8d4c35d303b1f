"""Harness of the observability tests: the real Prometheus server on an ephemeral loopback port
(started, like the service, by bench/server.py: the harness the tests and the benchmarks share),
polling with deadlines, and small PromQL tools.

Nothing here sleeps for a fixed time to "let things settle": every wait polls a condition
until a deadline and fails with what it was waiting for and the tail of the process's log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bench.server import Server, free_port, launch

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Processes and polling
# ---------------------------------------------------------------------------------------------


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_binary(name: str, package: str = "prometheus") -> str:
    """The path of a binary; skip without it, unless CI=true (then fail)."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        msg = f"{name} not installed (Debian package `{package}`)"
        if under_ci():
            pytest.fail(f"{msg}; it is required under CI")
        pytest.skip(msg)
    return path


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1,
               on_timeout: Callable[[], str] | None = None) -> T:  # fmt: skip
    """Poll ``predicate`` until it returns something truthy; return it. Exceptions count as
    "not yet". Raises TimeoutError naming ``what`` (and the last exception) at the deadline."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:
            last_exc = e
        if time.monotonic() > deadline:
            extra = on_timeout() if on_timeout else ""
            raise TimeoutError(
                f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_exc!r})\n{extra}"
            )
        time.sleep(interval)


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


# ---------------------------------------------------------------------------------------------
# Prometheus
# ---------------------------------------------------------------------------------------------


@dataclass
class Prometheus:
    """A Prometheus server scraping one target every second, with the project's alert rules."""

    url: str
    proc: Server
    queries: list[str] = field(default_factory=list)  # every expression sent, for reports

    @classmethod
    def start(cls, target: str, workdir: Path, rule_files: list[Path], timeout: float = 60.0) -> Prometheus:
        binary = require_binary("prometheus")
        port = free_port()
        config = workdir / "prometheus.yml"
        rules = "\n".join(f"  - {json.dumps(str(p))}" for p in rule_files)
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n{rules or '  []'}\n"
            "scrape_configs:\n  - job_name: textgen\n    metrics_path: /metrics\n"
            f"    static_configs:\n      - targets: [{json.dumps(target)}]\n"
        )
        argv = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        proc = launch(argv, workdir / "prometheus.log", port=port, env=os.environ, ready_path="/-/ready",
                      name="prometheus")  # fmt: skip
        proc.wait_ready(timeout)
        return cls(proc.base_url, proc)

    def stop(self) -> None:
        self.proc.stop(signal.SIGTERM)

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; returns ``data``; raises AssertionError with Prometheus's error."""
        q = urllib.parse.urlencode(params, doseq=True)
        status, body, _ = http_get(f"{self.url}/api/v1/{path}?{q}", timeout=30)
        doc = json.loads(body)
        if doc.get("status") != "success":
            raise AssertionError(f"Prometheus /api/v1/{path} {params}: HTTP {status}: {doc.get('error')}")
        return doc["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query; the list of results (vector) or a one-element list (scalar)."""
        self.queries.append(expr)
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The single value of a query, None when empty."""
        res = self.query(expr, at)
        assert len(res) <= 1, f"{expr} returned {len(res)} series: {res}"
        return float(res[0]["value"][1]) if res else None

    def series(self, match: str, start: float, end: float) -> list[dict[str, str]]:
        return self.api("series", **{"match[]": match, "start": f"{start:.3f}", "end": f"{end:.3f}"})


# ---------------------------------------------------------------------------------------------
# Prometheus text format
# ---------------------------------------------------------------------------------------------


def parse_exposition(body: bytes) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, frozenset], float] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"series exposed twice: {key}"
            out[key] = s.value
    return out


def total(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


# ---------------------------------------------------------------------------------------------
# PromQL: the parts of an expression that must have data, and the selectors it uses
# ---------------------------------------------------------------------------------------------

_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS_WITH_LIST = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                 "topk", "quantile", "limitk", "limit_ratio"}  # fmt: skip
_KEYWORDS = (
    _KEYWORDS_WITH_LIST | _AGGREGATIONS | {"bool", "and", "or", "unless", "offset", "inf", "nan", "atan2"}
)
_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_NUMBER = re.compile(r"^\s*[-+]?(\d+(\.\d*)?([eE][-+]?\d+)?|\.\d+|Inf|NaN)\s*$", re.IGNORECASE)


def _scan(expr: str):
    """Yield (index, char, depth) for characters outside string literals; depth counts (, {, [."""
    depth, i, n = 0, 0, len(expr)
    while i < n:
        c = expr[i]
        if c in "\"'`":
            j = i + 1
            while j < n and expr[j] != c:
                j += 2 if expr[j] == "\\" and c != "`" else 1
            i = j + 1
            continue
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
        yield i, c, depth
        i += 1


def _strip_parens(expr: str) -> str:
    e = expr.strip()
    while e.startswith("(") and e.endswith(")"):
        # Only if the opening parenthesis closes at the very end.
        closes_at = next((i for i, c, d in _scan(e) if c == ")" and d == 0), None)
        if closes_at != len(e) - 1:
            break
        e = e[1:-1].strip()
    return e


def _split_words(expr: str, words: tuple[str, ...]) -> list[str]:
    """Split at top-level binary keywords (``or``; ``and``/``unless``)."""
    parts, start = [], 0
    for i, _c, d in _scan(expr):
        if d != 0 or i < start:
            continue
        for w in words:
            end = i + len(w)
            if (
                expr[i:end].lower() == w
                and (i == 0 or not (expr[i - 1].isalnum() or expr[i - 1] in "_:"))
                and (end == len(expr) or not (expr[end].isalnum() or expr[end] in "_:"))
            ):
                parts.append(expr[start:i])
                start = end
                break
    parts.append(expr[start:])
    return [_strip_modifiers(p) for p in parts]


def _strip_modifiers(part: str) -> str:
    """Drop vector-matching modifiers left at the start of a right operand."""
    p = part.strip()
    while True:
        m = re.match(r"^(bool|on|ignoring|group_left|group_right)\b\s*", p)
        if not m:
            return p
        p = p[m.end() :]
        if m.group(1) != "bool" and p.startswith("("):
            close = next(i for i, c, d in _scan(p) if c == ")" and d == 0)
            p = p[close + 1 :].strip()


def _split_comparison(expr: str) -> tuple[str, str] | None:
    for i, _c, d in _scan(expr):
        if d != 0:
            continue
        for op in _COMPARISONS:
            if expr.startswith(op, i) and not (op in (">", "<") and expr[i + 1 : i + 2] == "="):
                if op in ("==", "!=", ">", "<") and expr[i - 1 : i] in "=!<>" and i > 0:
                    continue
                return expr[:i], _strip_modifiers(expr[i + len(op) :])
    return None


def data_bearing_parts(expr: str) -> list[str]:
    """The sub-expressions that must return data when the metrics exist: the operands of
    top-level ``or``/``and``/``unless``, both sides of a threshold comparison (minus numeric
    literals), and the argument of ``absent(...)`` (which is empty exactly when its argument
    has data)."""
    out: list[str] = []
    for a in _split_words(_strip_parens(expr), ("or",)):
        for b in _split_words(_strip_parens(a), ("and", "unless")):
            b = _strip_parens(b)
            cmp = _split_comparison(b)
            sides = list(cmp) if cmp else [b]
            for s in sides:
                s = _strip_parens(s)
                if not s or _NUMBER.match(s):
                    continue
                m = re.match(r"^(absent|absent_over_time)\s*\(", s)
                if m and s.endswith(")"):
                    s = _strip_parens(s[m.end() - 1 :])
                    s = re.sub(r"\[[^\]]*\]\s*$", "", s) if m.group(1) == "absent_over_time" else s
                out.append(s)
    return out


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value)

    def promql(self) -> str:
        inner = ",".join(f"{k}{op}{json.dumps(v)}" for k, op, v in self.matchers)
        return f"{self.name}{{{inner}}}" if inner else self.name


_MATCHER = re.compile(
    r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`)\s*,?'
)


def selectors(expr: str) -> list[Selector]:
    """Every metric selector of an expression (function names, keywords, label lists skipped)."""
    out: list[Selector] = []
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c in "\"'`":  # a string literal (e.g. in label_replace)
            j = i + 1
            while j < n and expr[j] != c:
                j += 2 if expr[j] == "\\" and c != "`" else 1
            i = j + 1
        elif c == "[":
            i = expr.index("]", i) + 1
        elif c.isdigit() or (c == "." and i + 1 < n and expr[i + 1].isdigit()):
            while i < n and (expr[i].isalnum() or expr[i] in "._"):
                i += 1
        elif c == "{":  # a selector without a name
            close = expr.index("}", i)
            out.append(Selector("", _matchers(expr[i + 1 : close])))
            i = close + 1
        elif m := _IDENT.match(expr, i):
            word, i = m.group(0), m.end()
            rest = expr[i:].lstrip()
            if word.lower() in _KEYWORDS_WITH_LIST and rest.startswith("("):
                i = expr.index(")", i) + 1
            elif rest.startswith("(") or word.lower() in _KEYWORDS:
                pass
            elif rest.startswith("{"):
                start = expr.index("{", i)
                close = expr.index("}", start)
                out.append(Selector(word, _matchers(expr[start + 1 : close])))
                i = close + 1
            else:
                out.append(Selector(word, ()))
        else:
            i += 1
    return out


def _matchers(text: str) -> tuple[tuple[str, str, str], ...]:
    out, pos = [], 0
    while pos < len(text.strip()):
        m = _MATCHER.match(text, pos)
        if not m:
            raise ValueError(f"cannot parse label matchers {{{text}}}")
        out.append(
            (m.group(1), m.group(2), json.loads(m.group(3)) if m.group(3)[0] == '"' else m.group(3)[1:-1])
        )
        pos = m.end()
    return tuple(out)


GRAFANA_INTERVALS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}


def substitute_grafana(expr: str, variables: dict[str, str]) -> str:
    """Replace Grafana's built-in intervals and dashboard variables (``$model``, ``${model}``);
    an unknown variable becomes ``.*`` (the "All" value of a regex matcher)."""
    for k, v in GRAFANA_INTERVALS.items():
        expr = expr.replace("${" + k[1:] + "}", v).replace(k, v)

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return variables.get(name, ".*")

    return re.sub(r"\$\{([A-Za-z_]\w*)(?::\w+)?\}|\$([A-Za-z_]\w*)", sub, expr)
