"""The ``base`` preset built on a GPU, timed and evaluated: DIR/base.json and DIR/base.md.

    python -m bench.gpu_base --data-dir .gpu-base/data --out DIR

Runs ``python -m model build --preset base --device cuda`` (bf16 autocast on CUDA, weights in
fp32: model/train.py) with a wall-clock cap on training (``--time-limit-s``: the learning-rate
schedule then decays on time, so the run ends inside a short GPU window), then reads the
training summary: steps, training seconds, tokens/s, and bits per character on the held-out
plays (Macbeth and Twelfth Night, scored in fp32 over the whole validation text). The target is
<= 1.80 bits per character. The bundle is written under ``--work-dir`` (not DIR: it is large).
``--dry-run`` builds the ``tiny`` preset for a few steps on the CPU (checks the wiring only).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGET_BPC = 1.80


def build_command(a: argparse.Namespace) -> list[str]:
    preset, device = ("tiny", "cpu") if a.dry_run else ("base", "cuda")
    cmd = [sys.executable, "-m", "model", "build", "--preset", preset, "--device", device, "--data-dir",
           str(a.data_dir), "--work-dir", str(a.work_dir / "work"), "--out", str(a.work_dir / "bundle"),
           "--no-attention"]
    if a.dry_run:
        cmd += ["--max-steps", "20"]
    elif a.time_limit_s:
        cmd += ["--time-limit-s", str(a.time_limit_s)]
    return cmd


def report(summary: dict[str, Any], build_seconds: float, gpu: str | None, preset: str,
           target_bpc: float = TARGET_BPC) -> dict[str, Any]:
    """The figures of a finished build (model/train.py's train_summary.json), judged against the target."""
    secs = summary["train_seconds"]
    return {
        "preset": preset, "gpu": gpu, "device": summary.get("device"), "bf16_autocast": summary.get("bf16_autocast"),
        "parameters": summary.get("parameters"), "steps": summary["steps"], "train_seconds": secs,
        "tokens_seen": summary.get("tokens_seen"),
        "train_tokens_per_s": summary["tokens_seen"] / secs if secs and summary.get("tokens_seen") else None,
        "build_seconds": round(build_seconds, 1), "val_bits_per_char": summary["val_bpc"],
        "val_nats_per_token": summary.get("val_loss"), "target_bits_per_char": target_bpc,
        "met": summary["val_bpc"] <= target_bpc,
    }


def markdown(r: dict[str, Any]) -> str:
    tps = r["train_tokens_per_s"]
    return "\n".join([
        f"## `{r['preset']}` built on {r['gpu'] or r['device']}", "",
        "| parameters | steps | training | tokens/s | bf16 autocast | build (all stages) | bits/char (held-out) | target |",
        "|---:|---:|---:|---:|---|---:|---:|---|",
        f"| {r['parameters'] or 0:,} | {r['steps']:,} | {r['train_seconds']:.0f} s | "
        f"{'–' if tps is None else f'{tps:,.0f}'} | {r['bf16_autocast']} | {r['build_seconds']:.0f} s | "
        f"{r['val_bits_per_char']:.3f} | <= {r['target_bits_per_char']:.2f}: {'met' if r['met'] else '**not met**'} |",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_base", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for base.json, base.md and build.log")
    p.add_argument("--data-dir", type=Path, default=Path("data"),
                   help="the corpus download and caches (bench/gpu_pack.py base; default: data/)")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/textgen-base"), help="checkpoint and bundle")
    p.add_argument("--time-limit-s", type=float, default=420.0,
                   help="training wall-clock cap in seconds (0: the preset's steps, however long; default: 420)")
    p.add_argument("--dry-run", action="store_true", help="the tiny preset, 20 steps, on the CPU")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    gpu = None
    if not a.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
            return 2
        gpu = torch.cuda.get_device_name(0)
    cmd = build_command(a)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.monotonic()
    with (a.out / "build.log").open("w") as log:
        code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - t0
    summary_file = a.work_dir / "work" / ("tiny" if a.dry_run else "base") / "train_summary.json"
    if code != 0 or not summary_file.is_file():
        print(f"error: the build failed (exit {code}); see {a.out / 'build.log'}", file=sys.stderr)
        return 1
    r = report(json.loads(summary_file.read_text()), seconds, gpu, "tiny" if a.dry_run else "base")
    (a.out / "base.json").write_text(json.dumps({"command": cmd, **r}, indent=2) + "\n")
    (a.out / "base.md").write_text(markdown(r))
    print(markdown(r))
    return 0 if r["met"] or a.dry_run else 1


if __name__ == "__main__":
    sys.exit(main())
