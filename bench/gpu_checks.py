"""Step 1 of the GPU benchmark: ONNX Runtime really runs the requested provider, and the cache stays there.

ONNX Runtime falls back to the CPU without an exception when CUDA cannot start, so for each
graph the check (1) reads ``session.get_providers()``, (2) profiles a prefill and a few decode
steps through the service's own runner and counts the nodes each provider ran (on CUDA only
shape arithmetic may run on the CPU, and no Memcpy node may copy the cache), and (3) counts the
bytes that come back to the host per decode step (OrtValue.numpy on a device value: the logits
only) and checks the cache outputs are device values. A provider other than the requested one
raises ``ProviderMismatch``.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

# Heavy operators that must never run on the CPU when CUDA is asked for.
COMPUTE_OPS = {"MatMul", "Gemm", "GroupQueryAttention", "Softmax", "LayerNormalization", "Gelu", "FusedMatMul",
               "SkipLayerNormalization", "Attention", "MultiHeadAttention", "BiasGelu", "FastGelu"}
PROVIDER_NAMES = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


class ProviderMismatch(RuntimeError):
    """ONNX Runtime runs another execution provider than the one requested (a silent fallback)."""


def check_provider(session: ort.InferenceSession, want: str, what: str) -> str:
    """The provider the session runs first; raises ProviderMismatch when it is not ``want``."""
    got = session.get_providers()[0]
    if got != want:
        raise ProviderMismatch(f"{what}: ONNX Runtime runs {got}, not {want} (a silent fallback; available: "
                               f"{ort.get_available_providers()})")
    return got


def node_placement(profile: Path) -> dict[str, Any]:
    """Kernel runs per provider, the operators run on the CPU, and the Memcpy nodes of an ORT profile."""
    events = json.loads(profile.read_text())
    by_provider: Counter[str] = Counter()
    cpu_ops: Counter[str] = Counter()
    memcpy: Counter[str] = Counter()
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") != "Node" or "provider" not in args or not e.get("name", "").endswith("_kernel_time"):
            continue
        by_provider[args["provider"]] += 1
        op = args.get("op_name", "?")
        if args["provider"] == "CPUExecutionProvider":
            cpu_ops[op] += 1
        if op.startswith("Memcpy"):
            memcpy[op] += 1
    return {"kernel_runs_by_provider": dict(by_provider), "cpu_ops": dict(cpu_ops), "memcpy_nodes": dict(memcpy)}


@contextmanager
def counting_host_copies():
    """Count bytes that OrtValue.numpy() copies from a device to the host while the block runs."""
    counter = {"bytes": 0, "calls": 0}
    original = ort.OrtValue.numpy

    def numpy(self: ort.OrtValue) -> np.ndarray:
        arr = original(self)
        if self.device_name().lower() != "cpu":
            counter["bytes"] += arr.nbytes
            counter["calls"] += 1
        return arr

    ort.OrtValue.numpy = numpy  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        ort.OrtValue.numpy = original  # type: ignore[method-assign]


def _profiled_session(path: Path, providers: list[Any], prefix: Path) -> ort.InferenceSession:
    from service.engine.kv.concat_batch import session_options

    so = session_options()
    so.enable_profiling = True
    so.profile_file_prefix = str(prefix)
    return ort.InferenceSession(str(path), so, providers=providers)


def _fallback_refused(path: Path, device: str) -> str | None:
    """With ``session.disable_cpu_ep_fallback`` ONNX Runtime refuses a session that would put a node on
    the CPU: None when it accepts, else its message (shape nodes it places on the CPU itself count too)."""
    from service.engine.kv.concat_batch import session_options

    so = session_options()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        ort.InferenceSession(str(path), so, providers=[PROVIDER_NAMES[device]])
        return None
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:300]}"


def check_graph(bundle_dir: Path, kind: str, device: str, decode_steps: int = 4, batch: int = 4) -> dict[str, Any]:
    """Profile one graph of a bundle through the service's runner on ``device``.

    Args:
        kind: "concat" (model.onnx, service.engine.kv.concat_batch.Runner) or "static" (model.kvinplace.onnx,
            service.engine.kv.static_batch.StaticRunner, without graph capture: profiling and capture exclude
            each other).
    Returns a dict with the provider, node placement, host bytes per decode step and the verdict
    ``ok`` (with ``problems`` when not); raises ProviderMismatch on a fallback.
    """
    from bundle.format import load_bundle
    from service.engine.kv.concat_batch import ConcatBatch, Runner
    from service.engine.kv.static_batch import StaticBatch, StaticRunner

    bundle = load_bundle(bundle_dir, verify_hashes=False)
    want = PROVIDER_NAMES[device]
    if kind == "concat":
        runner: Any = Runner(bundle, device)
        path, batch_cls = bundle.onnx_path, ConcatBatch
    else:
        runner = StaticRunner(bundle, num_slots=batch, provider=device, cuda_graph=False)
        path, batch_cls = bundle.kv_inplace_path, StaticBatch
    what = f"{bundle_dir.name}/{path.name}"
    check_provider(runner.session, want, what)
    with tempfile.TemporaryDirectory() as tmp:
        providers = [want, "CPUExecutionProvider"] if device == "cuda" else [want]
        runner.session = _profiled_session(path, providers, Path(tmp) / "profile")
        check_provider(runner.session, want, what)
        b = batch_cls(runner, bundle.pad_id)
        prompts = [[bundle.bos_id, *range(10, 10 + 3 * (i + 1))] for i in range(batch)]
        b.prefill([f"r{i}" for i in range(batch)], prompts)
        tokens = np.full(batch, 7, np.int64)
        with counting_host_copies() as copied:
            for _ in range(decode_steps):
                logits = b.decode(tokens)
        placement = node_placement(Path(runner.session.end_profiling()))
    kv = b.slots.past if kind == "concat" else runner.buffers
    kv_devices = sorted({v.device_name().lower() if isinstance(v, ort.OrtValue) else "cpu (numpy)" for v in kv})
    logits_bytes = batch * bundle.vocab_size * (logits.dtype.itemsize if device == "cuda" else 0)
    per_step = copied["bytes"] / decode_steps
    problems = []
    if device == "cuda":
        heavy_on_cpu = sorted(set(placement["cpu_ops"]) & COMPUTE_OPS)
        if heavy_on_cpu:
            problems.append(f"compute operators on the CPU: {heavy_on_cpu}")
        if placement["memcpy_nodes"].get("MemcpyToHost"):
            problems.append(f"MemcpyToHost nodes inside the graph: {placement['memcpy_nodes']}")
        if kv_devices != ["cuda"]:
            problems.append(f"the KV cache lives on {kv_devices}, not the GPU")
        if per_step > logits_bytes:
            problems.append(f"{per_step:.0f} bytes to the host per decode step, more than the logits' {logits_bytes}")
    return {
        "graph": what, "provider": runner.session.get_providers()[0], "requested": want,
        "available": ort.get_available_providers(), **placement,
        "kv_cache_on": kv_devices, "decode_steps": decode_steps, "batch": batch,
        "host_bytes_per_decode_step": per_step, "logits_bytes_per_step": logits_bytes,
        "cpu_fallback_refused": _fallback_refused(path, device) if device == "cuda" else None,
        "ok": not problems, "problems": problems,
    }
