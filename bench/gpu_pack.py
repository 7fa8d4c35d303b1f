"""Prepare what a GPU machine with no network needs for ``python -m bench.gpu`` and the ``base`` build.

    python -m bench.gpu_pack bench --checkpoint artifacts/.work/small/checkpoint.pt --out .gpu
    python -m bench.gpu_pack base --data-dir data --out .gpu-base

``bench`` exports the checkpoint twice without the inspection graph (fp32 ``model.onnx``; fp16
``model.onnx`` and ``model.kvinplace.onnx``), keeps its weights without the optimizer state
(``small.pt``, for the PyTorch side of the parity check), downloads the Python 3.12 wheels the
GPU machine lacks (onnxruntime-gpu and the service's dependencies, at the versions installed
here), and packs it all into one tar split into parts of at most ``--part-mib`` MiB, so that each
part travels with one call to the machine (the repository's copy and one part must stay under
the machine's transfer limit). ``base`` packs the Shakespeare download and the tokenizer and
token caches of the ``base`` preset's vocabulary, so the build neither downloads nor retrains
the tokenizer. docs/gpu.md has the procedure on the GPU machine (bench/gpu_run.sh).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from bundle.format import sha256_file

ROOT = Path(__file__).resolve().parents[1]
# Not on the GPU machine's Python (its package list: torch, transformers, numpy, httpx, anyio, uvloop,
# psutil, prometheus-client... are there): onnxruntime-gpu and the service's own dependencies.
WHEELS = ("onnxruntime-gpu", "litserve", "fastapi", "starlette", "uvicorn", "pydantic", "pydantic-core",
          "annotated-types", "typing-inspection", "opentelemetry-api", "pyzmq", "llguidance",
          "sentencepiece", "prometheus-client", "typing-extensions", "annotated-doc")
# pip matches these tags exactly and prefers them in this order: the oldest glibc first, a newer one only
# for a package with nothing older (llguidance 1.9.1 has manylinux_2_31 only; the GPU machine's glibc must
# be at least as new as the newest tag picked, which `pip install` there checks).
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_26_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_35_x86_64")
ARCHIVE = "textgen-gpu.tar"


def _run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def export_bundles(checkpoint: Path, tokenizer: Path, stage: Path, work: Path) -> None:
    """small (fp32 model.onnx) and small-fp16 (fp16 model.onnx + model.kvinplace.onnx), each verified."""
    base = [sys.executable, "-m", "model", "export", "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer),
            "--work-dir", str(work), "--no-attention"]
    _run([*base, "--out", str(stage / "small"), "--name", "small", "--no-kv-inplace"])
    _run([*base, "--out", str(stage / "small-fp16"), "--name", "small-fp16", "--fp16"])


def save_weights(checkpoint: Path, out: Path) -> None:
    """The model's config and weights only (model.train.load_model reads them): no optimizer state."""
    import torch

    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    torch.save({"model_config": ck["model_config"], "model": ck["model"], "step": ck.get("step")}, out)


def download_wheels(dest: Path, names: tuple[str, ...] = WHEELS) -> list[str]:
    """Python 3.12 manylinux wheels of ``names`` at the versions installed here (nothing else)."""
    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{n}=={importlib.metadata.version(n)}" for n in names]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    _run([*cmd, *pins])
    return pins


def split(archive: Path, out: Path, part_bytes: int) -> list[Path]:
    """Cut ``archive`` into ``<name>.part-00``, ``-01``, ... of at most ``part_bytes`` each (cat joins them)."""
    parts = []
    with archive.open("rb") as f:
        while chunk := f.read(part_bytes):
            p = out / f"{archive.name}.part-{len(parts):02d}"
            p.write_bytes(chunk)
            parts.append(p)
    return parts


def pack(stage: Path, out: Path, part_mib: int) -> list[Path]:
    """Tar the staged folder, split it, and write SHA256 (the archive's, checked after joining)."""
    archive = out / ARCHIVE
    with tarfile.open(archive, "w") as tar:  # the payload is compressed already (wheels, weights)
        for p in sorted(stage.iterdir()):
            tar.add(p, arcname=p.name)
    digest = sha256_file(archive)
    parts = split(archive, out, part_mib << 20)
    archive.unlink()
    (out / "SHA256").write_text(f"{digest}  {ARCHIVE}\n")
    return parts


def cmd_bench(a: argparse.Namespace) -> None:
    out: Path = a.out
    if out.exists():
        shutil.rmtree(out)
    stage = out / "stage"
    stage.mkdir(parents=True)
    ck = a.checkpoint
    export_bundles(ck, a.tokenizer or ck.parent / "tokenizer.model", stage, out / "work")
    save_weights(ck, stage / "small.pt")
    pins = [] if a.no_wheels else download_wheels(stage / "wheels")
    (stage / "WHEELS").write_text("\n".join(pins) + "\n")
    shutil.rmtree(out / "work")
    parts = pack(stage, out, a.part_mib)
    shutil.rmtree(stage)
    _report(out, parts)


def cmd_base(a: argparse.Namespace) -> None:
    from model.config import PRESETS

    out: Path = a.out
    if out.exists():
        shutil.rmtree(out)
    data = out / "data"
    (data / "downloads").mkdir(parents=True)
    for f in sorted((a.data_dir / "downloads").glob("shakespeare-*.tar.gz")):
        shutil.copy2(f, data / "downloads" / f.name)
    vocab = PRESETS["base"].vocab_size
    for corpus in sorted(a.data_dir.glob("corpus-*")):
        for f in corpus.glob(f"tokenizer-*-{vocab}-*.model"):
            dst = data / corpus.name
            dst.mkdir(exist_ok=True)
            shutil.copy2(f, dst / f.name)
            tokens = corpus / f"tokens-{sha256_file(f)[:16]}.npz"  # model.cli.cmd_train's cache key
            if tokens.is_file():
                shutil.copy2(tokens, dst / tokens.name)
    if not any((data / "downloads").iterdir()):
        sys.exit(f"error: no Shakespeare download under {a.data_dir / 'downloads'}: run `python -m model prepare` first")
    _report(out, sorted(p for p in out.rglob("*") if p.is_file()))


def _report(out: Path, files: list[Path]) -> None:
    total = sum(p.stat().st_size for p in files)
    for p in files:
        print(f"{p.stat().st_size / 2**20:8.1f} MiB  {p.relative_to(out.parent)}")
    print(f"{total / 2**20:8.1f} MiB in {len(files)} file(s) under {out}; see docs/gpu.md for the calls")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_pack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("bench", help="bundles, weights and wheels for python -m bench.gpu, in parts")
    b.add_argument("--checkpoint", type=Path, default=Path("artifacts/.work/small/checkpoint.pt"),
                   help="the trained model (default: the small preset's, from `python -m model build`)")
    b.add_argument("--tokenizer", type=Path, default=None, help="default: tokenizer.model next to the checkpoint")
    b.add_argument("--out", type=Path, default=Path(".gpu"), help="folder of the parts (default: .gpu, ignored by git)")
    b.add_argument("--part-mib", type=int, default=48,
                   help="largest part in MiB; the repository's copy and one part travel per call (default: 48)")
    b.add_argument("--no-wheels", action="store_true", help="leave the wheels out (a machine that has them)")
    b.set_defaults(func=cmd_bench)
    s = sub.add_parser("base", help="the corpus download and tokenizer cache for `model build --preset base`")
    s.add_argument("--data-dir", type=Path, default=Path("data"), help="the prepared data (default: data/)")
    s.add_argument("--out", type=Path, default=Path(".gpu-base"), help="default: .gpu-base, ignored by git")
    s.set_defaults(func=cmd_base)
    a = p.parse_args(argv)
    a.func(a)


if __name__ == "__main__":
    main()
