"""The machine under the GPU benchmark (bench/gpu.py): what it is, and what its memory and matrix units do.

``environment`` names the GPU, driver, CUDA, ONNX Runtime, torch and transformers versions.
``copy_bandwidth`` and ``matmul_rate`` measure the two ceilings a decode step is held to
(bench/gpu_floors.py): bytes per second of a device-to-device copy (read + write counted) and
FLOP/s of a large matrix product, with PyTorch on the same device.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from typing import Any


def environment(device: str) -> dict[str, Any]:
    """Versions and hardware, as far as each can be read (a missing piece is None, never an error)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    info: dict[str, Any] = {
        "device": device,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_build_cuda": _try(lambda: __import__("onnxruntime.capi.build_and_package_info",
                                                          fromlist=["cuda_version"]).cuda_version),
        "onnxruntime_providers": ort.get_available_providers(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": _try(lambda: __import__("transformers").__version__),
        "cpu_count": os.cpu_count(),
        "load_average": _try(lambda: [round(x, 2) for x in os.getloadavg()]),
        "gpu": None,
        "driver": None,
        "gpu_memory_gib": None,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["driver"] = _try(lambda: subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True,
            timeout=20, check=True).stdout.strip().splitlines()[0])
    else:
        info["gpu"] = "none (CPU dry run)"
    return info


def _try(f: Any) -> Any:
    try:
        return f()
    except Exception:
        return None


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int, repeats: int = 10) -> float:
    """Bytes per second of ``dst.copy_(src)`` on the device, counting bytes read and written; best of ``repeats``."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def matmul_rate(device: str, n: int, dtype: str, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matrix product in ``dtype`` ("float16" or "float32", TF32 off); best of ``repeats``."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    dt = {"float16": torch.float16, "float32": torch.float32}[dtype]
    if device == "cpu" and dt == torch.float16:
        dt = torch.bfloat16  # CPUs have no fast fp16 GEMM in torch; the dry run only exercises the code
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, dtype=dt, device=device, generator=g)
    b = torch.randn(n, n, dtype=dt, device=device, generator=g)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
