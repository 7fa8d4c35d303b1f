"""One streaming client against the service and the thin server's two front ends, side by side.

    python -m bench.front_ends --bundle artifacts/small --output-len 1 --requests 40 --rounds 6

Three servers on the same bundle, all running at once and idle while another is measured:
the service (``python -m service``: an HTTP process and the inference worker), the thin server
through uvicorn (``bench.baselines.thin --frontend uvicorn``: one process, a bare ASGI app, the
engine in a task of the event loop) and the thin server on raw sockets (one process, no event
loop). Each round sends ``--requests`` streamed completions from one client to each, in an order
that rotates between rounds, on prompts of their own (no prefix-cache hits). The medians over the
rounds of TTFT p50 and output tokens/s split the service's distance to the thinnest server into
what an ASGI server costs (uvicorn ÷ raw) and what the second process and the service's own
layers cost (service ÷ uvicorn).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench.serve import BenchmarkConfig, run_sync
from bench.server import Server, free_port, launch, server_env, service_argv, thin_argv

SERVERS = ("service", "thin-uvicorn", "thin-raw")
LABELS = {
    "service": "the service (HTTP process + inference worker)",
    "thin-uvicorn": "thin server, uvicorn + bare ASGI app, one process",
    "thin-raw": "thin server, raw sockets, one process",
}


def argv_of(name: str, bundle: Path, port: int) -> list[str]:
    """Every one of them answers /ready once it serves."""
    if name == "service":
        return service_argv(bundle, port)
    return thin_argv(bundle, port, frontend=name.removeprefix("thin-"))


def run(bundle: Path, output_len: int, requests: int, rounds: int, temperature: float, log_dir: Path,
        seed: int = 0) -> dict[str, dict[str, list[float]]]:  # fmt: skip
    """Every round's TTFT p50 (s) and output tokens/s per server."""
    servers: dict[str, Server] = {}
    try:
        for name in SERVERS:
            port = free_port()
            servers[name] = launch(argv_of(name, bundle, port), log_dir / f"{name}.log", port=port,
                                   env=server_env(inherit_settings=True), name=name)  # fmt: skip
        for s in servers.values():
            s.wait_ready(180)
        out: dict[str, dict[str, list[float]]] = {n: {"ttft": [], "tput": []} for n in SERVERS}
        for rnd in range(rounds + 1):  # round 0 warms every server up and is not counted
            k = rnd % len(SERVERS)
            for i, name in enumerate(SERVERS[k:] + SERVERS[:k]):
                cfg = BenchmarkConfig(
                    url=servers[name].base_url, concurrency=1, num_requests=requests if rnd else 4,
                    prompt_len=(32, 32), output_len=(output_len, output_len), temperature=temperature,
                    seed=seed + 1000 + 10 * rnd + i, progress=False, use_tokenize=False,
                )  # fmt: skip
                res = run_sync(cfg)
                if res.summary["failed"]:
                    raise RuntimeError(f"{name}: {res.summary['failed']} requests failed\n{servers[name].log_tail()}")
                if rnd:
                    out[name]["ttft"].append(res.summary["ttft_s"]["p50"])
                    out[name]["tput"].append(res.summary["output_throughput"])
        return out
    finally:
        for s in servers.values():
            s.stop()


def table(out: dict[str, dict[str, list[float]]]) -> str:
    med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in out.items()}
    lines = ["| server | TTFT p50, median of the rounds (ms) | output tok/s, median |", "|---|---:|---:|"]
    lines += [f"| {LABELS[n]} | {1000 * m['ttft']:.2f} | {m['tput']:,.0f} |" for n, m in med.items()]
    svc, uv, raw = med["service"], med["thin-uvicorn"], med["thin-raw"]
    lines += [
        "",
        f"TTFT: uvicorn − raw {1000 * (uv['ttft'] - raw['ttft']):+.2f} ms, service − uvicorn "
        f"{1000 * (svc['ttft'] - uv['ttft']):+.2f} ms; tokens/s: uvicorn ÷ raw {uv['tput'] / raw['tput']:.2f}×, "
        f"service ÷ uvicorn {svc['tput'] / uv['tput']:.2f}×.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.front_ends", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--output-len", type=int, default=1, help="tokens per request (default 1: TTFT alone)")
    p.add_argument("--requests", type=int, default=40, help="requests per server and round (default 40)")
    p.add_argument("--rounds", type=int, default=6, help="rounds, the order rotating (default 6)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--log-dir", type=Path, default=None, help="server logs (default: a temp dir)")
    a = p.parse_args(argv)
    if min(a.output_len, a.requests, a.rounds) < 1:
        p.error("--output-len, --requests and --rounds must be >= 1")
    log_dir = a.log_dir or Path(tempfile.mkdtemp(prefix="bench-front-ends-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    out = run(a.bundle, a.output_len, a.requests, a.rounds, a.temperature, log_dir)
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
