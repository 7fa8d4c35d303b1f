"""What bench/gpu.py's steps measured, judged against the targets and written as markdown. Pure: no I/O.

``summarize(report)`` adds each decode row's floor (bench/gpu_floors.py) and evaluates the targets:

- the provider in use is the requested one, and per-step host copies are the logits only;
- batch-1 inter-token latency <= 2x the memory-bandwidth floor of a decode step, or >= 3x faster
  than PyTorch eager at the same precision (where launch overhead dominates a small model);
- at batch 64, >= 1.5x the tokens/s of transformers generate() at the same precision;
- the served service (64 clients) keeps >= 70% of the offline engine's output rate at the same concurrency.

A target whose inputs are missing (a step failed or ran out of time) is "not measured", never met.
``markdown(report)`` renders the tables for docs/BENCHMARKS.md.
"""

from __future__ import annotations

from typing import Any

from bench.gpu_floors import ModelShape, step_floor

RUNNER_DTYPE = {"engine-fp32": "float32", "engine-fp16": "float16", "engine-fp16-static": "float16",
                "engine-fp16-graph": "float16", "torch-fp32": "float32", "torch-fp16": "float16",
                "hf-fp32": "float32", "hf-fp16": "float16"}
LABELS = {
    "engine-fp16-graph": "this engine, fp16, static path + CUDA graphs",
    "engine-fp16-static": "this engine, fp16, static path, no graphs",
    "engine-fp16": "this engine, fp16, model.onnx (concat KV cache)",
    "engine-fp32": "this engine, fp32, model.onnx (concat KV cache)",
    "torch-fp16": "PyTorch eager + KV cache, fp16",
    "torch-fp32": "PyTorch eager + KV cache, fp32",
    "hf-fp16": "transformers generate(), GPT-2 same size, fp16",
    "hf-fp32": "transformers generate(), GPT-2 same size, fp32",
}


def _result(report: dict[str, Any], step: str) -> dict[str, Any] | None:
    s = report["steps"].get(step) or {}
    return s.get("result")


def decode_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The decode step's rows, each with its floor and the measured step over the floor where known."""
    dec, fl = _result(report, "decode"), _result(report, "floors")
    if dec is None:
        return []
    rows = [dict(r) for r in dec["rows"]]
    if fl is None or "model" not in dec:
        return rows
    m = ModelShape(**dec["model"])
    context = dec["prompt_len"] + dec["new_tokens"] // 2  # the cache's mean length over the decode
    for r in rows:
        dtype = RUNNER_DTYPE.get(r["runner"], "float32")
        nbytes = 2 if dtype == "float16" else 4
        f = step_floor(m, r["batch"], context, nbytes, nbytes, fl["copy_bandwidth_bytes_per_s"],
                       fl["matmul_flops_per_s"][dtype])
        r["floor_ms"], r["floor_bound"], r["memory_floor_ms"] = f.seconds * 1e3, f.bound, f.memory_s * 1e3
        r["step_over_floor"] = r["step_ms"] / r["floor_ms"] if r.get("step_ms") else None
    return rows


def _find(rows: list[dict[str, Any]], runner: str, batch: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["runner"] == runner and r["batch"] == batch), None)


def _target(name: str, value: float | None, threshold: str, met: bool | None, detail: str) -> dict[str, Any]:
    return {"target": name, "value": value, "threshold": threshold,
            "met": met if value is not None or met is not None else None, "detail": detail}


def targets(report: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    checks = report["steps"].get("checks", {})
    ok = checks.get("status") == "ok"
    out.append(_target("provider checked, host copies per step = logits only", None, "all graphs pass",
                       ok if checks.get("status") in ("ok", "failed") else None,
                       f"checks step: {checks.get('status', 'not run')}"))
    engines = [r for r in rows if r["runner"].startswith("engine") and r["batch"] == 1 and r.get("step_ms")]
    if engines:
        best = min(engines, key=lambda r: r["step_ms"])
        dtype = RUNNER_DTYPE[best["runner"]]
        eager = _find(rows, "torch-" + ("fp16" if dtype == "float16" else "fp32"), 1)
        over = best["step_ms"] / best["memory_floor_ms"] if best.get("memory_floor_ms") else None
        speedup = eager["step_ms"] / best["step_ms"] if eager and eager.get("step_ms") else None
        met = (over is not None and over <= 2.0) or (speedup is not None and speedup >= 3.0)
        out.append(_target("batch-1 inter-token latency", best["step_ms"],
                           "<= 2x memory floor, or >= 3x faster than PyTorch eager", met,
                           f"{best['runner']}: {best['step_ms']:.3f} ms; memory floor "
                           f"{_f(best.get('memory_floor_ms'), 4)} ms (x{_f(over, 1)}); PyTorch eager "
                           f"{_f(eager and eager.get('step_ms'), 3)} ms (engine {_f(speedup, 1)}x faster)"))
    else:
        out.append(_target("batch-1 inter-token latency", None, "<= 2x memory floor, or >= 3x PyTorch eager", None,
                           "not measured"))
    at64 = [r for r in rows if r["runner"].startswith("engine") and r["batch"] == 64]
    if at64:
        best = max(at64, key=lambda r: r["tokens_per_s"])
        hf = _find(rows, "hf-" + ("fp16" if RUNNER_DTYPE[best["runner"]] == "float16" else "fp32"), 64)
        ratio = best["tokens_per_s"] / hf["tokens_per_s"] if hf else None
        out.append(_target("batch 64: tokens/s over transformers generate()", ratio, ">= 1.5x",
                           None if ratio is None else ratio >= 1.5,
                           f"{best['runner']}: {best['tokens_per_s']:,.0f} tokens/s; "
                           f"{hf['runner'] if hf else 'hf'}: {_f(hf and hf['tokens_per_s'], 0)} tokens/s"))
    else:
        out.append(_target("batch 64: tokens/s over transformers generate()", None, ">= 1.5x", None, "not measured"))
    srv = _result(report, "serve")
    ratio = srv.get("served_over_offline") if srv else None
    out.append(_target("served over the offline engine (same concurrency)", ratio, ">= 0.70",
                       None if ratio is None else ratio >= 0.70,
                       f"{srv.get('concurrency', '?')} clients: served {_f(srv['served']['output_throughput'], 0)} "
                       f"tokens/s, offline {_f(srv['offline']['output_throughput'], 0)} tokens/s"
                       if srv else "not measured"))
    return out


def _f(v: Any, digits: int) -> str:
    return "–" if v is None or v is False else f"{v:,.{digits}f}"


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    rows = decode_rows(report)
    return {"decode_rows": rows, "targets": targets(report, rows),
            "steps": {k: v["status"] for k, v in report["steps"].items()}}


# ---- markdown -----------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    env = _result(report, "env") or {}
    lines = ["## GPU" + (" (dry run on the CPU: sizes and figures mean nothing)" if report["dry_run"] else ""), ""]
    lines += [f"`{report['command']}`, {report['seconds']:.0f} s. Machine: {env.get('gpu', '?')}, driver "
              f"{env.get('driver') or '?'}, CUDA {env.get('torch_cuda') or '?'} (PyTorch {env.get('torch', '?')}), "
              f"ONNX Runtime {env.get('onnxruntime', '?')} (built for CUDA {env.get('onnxruntime_build_cuda') or '?'}), "
              f"transformers {env.get('transformers') or '?'}, {env.get('cpu_count', '?')} CPUs, load "
              f"{env.get('load_average') or '?'}.", ""]
    lines += ["| step | status | seconds |", "|---|---|---:|"]
    for name, st in report["steps"].items():
        lines.append(f"| {name} | {st['status']} | {st.get('seconds', '–')} |")
    lines += ["", "### Targets", "", "| target | threshold | value | met | detail |", "|---|---|---:|---|---|"]
    for t in s["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['threshold']} | {_f(t['value'], 3)} | {met} | {t['detail']} |")
    lines += _checks_md(report) + _parity_md(report) + _decode_md(report, s["decode_rows"]) + _serve_md(report)
    return "\n".join(lines) + "\n"


def _checks_md(report: dict[str, Any]) -> list[str]:
    res = _result(report, "checks")
    if res is None:
        return []
    lines = ["", "### Providers and host copies", "",
             "| graph | provider | kernel runs by provider | CPU ops | KV cache on | host bytes / decode step "
             "(logits) | verdict |", "|---|---|---|---|---|---:|---|"]
    for name, g in res["graphs"].items():
        verdict = "ok" if g["ok"] else "**" + "; ".join(g.get("problems", [])) + "**"
        lines.append(f"| {name} | {g.get('provider', '–')} | {_counts(g.get('kernel_runs_by_provider'))} | "
                     f"{_ops(g.get('cpu_ops'))} | {', '.join(g.get('kv_cache_on') or ['–'])} | "
                     f"{_f(g.get('host_bytes_per_decode_step'), 0)} ({_f(g.get('logits_bytes_per_step'), 0)}) | "
                     f"{verdict} |")
    return lines


def _counts(d: dict[str, int] | None) -> str:
    return "–" if not d else ", ".join(f"{k.removesuffix('ExecutionProvider')} {v}" for k, v in d.items())


def _ops(d: dict[str, int] | None, most: int = 6) -> str:
    """The operators that ran on the CPU, most frequent first (a long list cut short)."""
    if not d:
        return "none"
    names = sorted(d, key=lambda k: -d[k])
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _parity_md(report: dict[str, Any]) -> list[str]:
    res = _result(report, "parity")
    if res is None:
        return []
    lines = ["", "### Parity on the device", "", "| check | measured | limit | ok |", "|---|---|---|---|"]
    for name, c in res.items():
        if not isinstance(c, dict):
            continue
        if "max_abs_diff" in c:
            got = (f"max abs diff {c['max_abs_diff']:.2e}, relative {c['relative_error']:.2e}, greedy identical: "
                   f"{c['greedy_identical']}")
        else:
            got = f"{c['rows_identical']}/{c['rows']} rows identical ({c['layout']})"
        lines.append(f"| {name} | {got} | {c['limit']} | {'yes' if c['ok'] else '**no**'} |")
    return lines


def _decode_md(report: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    dec = _result(report, "decode")
    if dec is None or not rows:
        return []
    batches = sorted({r["batch"] for r in rows})
    runners = [n for n in LABELS if any(r["runner"] == n for r in rows)]
    head = "| runner | " + " | ".join(f"batch {b}" for b in batches) + " |"
    sep = "|---|" + "---:|" * len(batches)
    lines = ["", f"### Decode ({dec['prompt_len']}-token prompts, {dec['new_tokens']} new tokens, greedy)", "",
             "Tokens/s (new tokens over the wall time, prefill included):", "", head, sep]
    for n in runners:
        cells = [_f((_find(rows, n, b) or {}).get("tokens_per_s"), 0) for b in batches]
        lines.append(f"| {LABELS[n]} | " + " | ".join(cells) + " |")
    lines += ["", "Median decode step in ms, and × its floor (bench/gpu_floors.py):", "", head, sep]
    for n in runners:
        cells = []
        for b in batches:
            r = _find(rows, n, b) or {}
            cells.append(f"{_f(r.get('step_ms'), 3)} (×{_f(r.get('step_over_floor'), 1)})")
        lines.append(f"| {LABELS[n]} | " + " | ".join(cells) + " |")
    fl = _result(report, "floors")
    if fl:
        lines += ["", f"Floors from a device copy of {fl['copy_bytes'] / 2**20:.0f} MiB at "
                  f"{fl['copy_bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s (read + write) and {fl['matmul_n']}³ "
                  f"products at {fl['matmul_flops_per_s']['float16'] / 1e12:,.1f} TFLOP/s (fp16), "
                  f"{fl['matmul_flops_per_s']['float32'] / 1e12:,.1f} TFLOP/s (fp32, no TF32)."]
    notes = [f"{k}: {v.get('status')}" + (f" ({v['error']})" if v.get("error") else "")
             + (f", CUDA graphs: {v['cuda_graph']}" if "cuda_graph" in v and v.get("layout") == "static" else "")
             + (f" (capture refused: {v['graph_fallback']})" if v.get("graph_fallback") else "")
             for k, v in dec["runners"].items()]
    return [*lines, "", "Runners: " + "; ".join(notes) + "."]


def _serve_md(report: dict[str, Any]) -> list[str]:
    res = _result(report, "serve")
    if res is None:
        return []
    srv, off = res["served"], res["offline"]

    def ms(stats: dict[str, Any] | None, key: str) -> str:
        return _f(None if not stats or stats.get(key) is None else stats[key] * 1e3, 1)

    return ["", f"### Served ({res['concurrency']} clients, {res['requests']} requests, {res['prompt_len']}-token "
            f"prompts, {res['new_tokens']} new tokens)", "",
            "| | output tokens/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | failed |", "|---|---:|---|---|---:|",
            f"| service (bench/serve.py) | {_f(srv['output_throughput'], 0)} | {ms(srv['ttft_s'], 'p50')} / "
            f"{ms(srv['ttft_s'], 'p99')} | {ms(srv['itl_s'], 'p50')} / {ms(srv['itl_s'], 'p99')} | {srv['failed']} |",
            f"| offline engine ({off['kv_layout']}) | {_f(off['output_throughput'], 0)} | | | |",
            "", f"Served over offline: {_f(res['served_over_offline'], 2)}."]
