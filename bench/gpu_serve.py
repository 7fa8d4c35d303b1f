"""Step 5 of the GPU benchmark: the service on the device under the serving harness, against the offline engine.

Starts ``python -m service`` on an ephemeral 127.0.0.1 port with the given bundle and provider,
waits for /ready (polled with a deadline), runs bench/serve.py's closed loop at ``concurrency``
clients, stops the server with SIGINT (a clean shutdown of every process), then runs the same
request count and lengths through the engine in this process with max_running = concurrency.
The ratio of the two output rates is what the HTTP layer keeps of the engine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(bundle: Path, provider: str, max_running: int, log_path: Path, timeout_s: float
                  ) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_")}
    env.update({"TEXTGEN_PROVIDER": provider, "TEXTGEN_MAX_RUNNING": str(max_running),
                "TEXTGEN_MAX_WAITING": str(4 * max_running), "TEXTGEN_LOG_LEVEL": "info",
                "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])})
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "service", "--model", str(bundle), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with {proc.returncode} while starting; log:\n"
                               f"{log_path.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    stop_service(proc)
    raise RuntimeError(f"the service was not ready after {timeout_s:.0f} s; log:\n"
                       f"{log_path.read_text(errors='replace')[-3000:]}")


def stop_service(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGINT to the process group (LitServe shuts down cleanly on it); SIGKILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def served(url: str, concurrency: int, requests: int, prompt_len: int, new_tokens: int) -> dict[str, Any]:
    from bench.serve import BenchmarkConfig, run_sync

    cfg = BenchmarkConfig(url=url, concurrency=concurrency, num_requests=requests, prompt_len=(prompt_len, prompt_len),
                          output_len=(new_tokens, new_tokens), temperature=0.0, ignore_eos=True, progress=False,
                          timeout=120.0)
    cfg.validate()
    s = run_sync(cfg).summary
    keep = ("duration_s", "completed", "failed", "failed_by_status", "total_output_tokens", "output_throughput",
            "request_throughput", "ttft_s", "itl_s", "tpot_s", "e2e_s", "max_in_flight")
    return {k: s.get(k) for k in keep}


def offline(bundle: Path, provider: str, concurrency: int, requests: int, prompt_len: int, new_tokens: int
            ) -> dict[str, Any]:
    """The same requests through the engine: all queued, ``concurrency`` running at a time."""
    from bench.engine import fixed_workload, text_tokens
    from bundle.format import load_bundle
    from service.engine.config import EngineConfig
    from service.engine.engine import Engine
    from service.engine.types import SamplingParams

    b = load_bundle(bundle, verify_hashes=False)
    engine = Engine(b, EngineConfig(provider=provider, max_running=concurrency, max_waiting=requests + 1))
    wl = fixed_workload(text_tokens(b.tokenizer_path), b.bos_id, requests, prompt_len, new_tokens)

    def run(reqs: list[Any], tag: str) -> tuple[float, int]:
        for i, r in enumerate(reqs):
            engine.add_request(f"{tag}{i}", r.prompt, SamplingParams(max_tokens=r.max_tokens, temperature=0.0,
                                                                     ignore_eos=True))
        t0, tokens = time.perf_counter(), 0
        while engine.has_unfinished():
            tokens += sum(len(o.new_token_ids) for o in engine.step())
        return time.perf_counter() - t0, tokens

    run(wl.requests[:concurrency], "warm")  # captures and allocations, as the server's first requests had
    wall, tokens = run(wl.requests, "run")
    return {"duration_s": wall, "total_output_tokens": tokens, "output_throughput": tokens / wall,
            "kv_layout": engine.kv_layout}


def serve_vs_offline(bundle: Path, provider: str, concurrency: int, requests: int, prompt_len: int,
                     new_tokens: int, log_path: Path, start_timeout_s: float) -> dict[str, Any]:
    proc, url = start_service(bundle, provider, concurrency, log_path, start_timeout_s)
    try:
        served(url, concurrency, min(concurrency, requests), prompt_len, min(8, new_tokens))  # warm-up
        srv = served(url, concurrency, requests, prompt_len, new_tokens)
    finally:
        stop_service(proc)
    off = offline(bundle, provider, concurrency, requests, prompt_len, new_tokens)
    ratio = srv["output_throughput"] / off["output_throughput"] if off["output_throughput"] else None
    return {"concurrency": concurrency, "requests": requests, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "served": srv, "offline": off, "served_over_offline": ratio}
