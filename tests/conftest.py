"""Shared fixtures: model bundles built once per test session.

``tiny_bundle`` is a real end-to-end build through the command line (corpus -> tokenizer ->
training -> export -> verify); ``random_bundle`` is an untrained, seeded model with the tiny
tokenizer whose greedy continuations vary, which makes token-for-token parity tests meaningful.
Both carry the optional in-place decoder (model.kvinplace.onnx) next to model.onnx.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run the long soak tests (reliability)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak test: run with --soak")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model built by `python -m model build --preset tiny` (cached corpus under data/)."""
    work = tmp_path_factory.mktemp("tiny-build")
    out = work / "bundle"
    cmd = [sys.executable, "-m", "model", "build", "--preset", "tiny", "--out", str(out),
           "--work-dir", str(work / "work"), "--data-dir", str(ROOT / "data")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, f"tiny build failed:\n{r.stderr[-3000:]}"
    assert (out / "config.json").is_file()
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_bundle: Path) -> Path:
    return tiny_bundle.parent / "work" / "tiny" / "checkpoint.pt"


@pytest.fixture(scope="session")
def random_model_and_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    """(GPT, bundle dir): seeded random weights exported with the tiny tokenizer."""
    import torch

    from bundle.tokenizer import Tokenizer
    from model.config import GPTConfig
    from model.export import export_onnx, write_bundle
    from model.export_inplace import KV_INPLACE_FILE, build_kv_inplace
    from model.gpt import GPT

    torch.manual_seed(1234)
    tok = Tokenizer.load(tiny_bundle / "tokenizer.model")
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=256, n_layer=2, n_head=2, n_embd=64)).eval()
    out = tmp_path_factory.mktemp("random-bundle")
    onnx_file = export_onnx(model, out / "model.onnx")
    ids = {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id, "unk_id": tok.unk_id}
    write_bundle(out, "random", model, onnx_file, tiny_bundle / "tokenizer.model", {"note": "random weights"},
                 "float32", ids, kv_inplace_file=build_kv_inplace(model, out / KV_INPLACE_FILE))
    return model, out


@pytest.fixture(scope="session")
def random_bundle(random_model_and_bundle) -> Path:
    return random_model_and_bundle[1]


@pytest.fixture(scope="session")
def bundle_without_attention(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle as an older export or `--no-attention` leaves it: no model.attention.onnx."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("no-attention") / "bundle"
    shutil.copytree(tiny_bundle, out)
    cfg = json.loads((out / "config.json").read_text())
    del cfg["onnx_attention"], cfg["files"]["model.attention.onnx"]
    (out / "model.attention.onnx").unlink()
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


@pytest.fixture(scope="session")
def hf_import(tmp_path_factory: pytest.TempPathFactory):
    """``hf_import(family, *flags) -> (checkpoint dir, bundle dir)``: a random-weight Hugging Face checkpoint
    of the family (tests/hf_checkpoints.py) imported through `python -m model import --hf`, once per
    family and flags. The import's own output (its parity lines) is kept in ``<bundle>/import.log``."""
    from hf_checkpoints import make_checkpoint

    root = tmp_path_factory.mktemp("hf")
    done: dict[tuple[str, ...], tuple[Path, Path]] = {}

    def run(family: str, *flags: str) -> tuple[Path, Path]:
        key = (family, *flags)
        if key not in done:
            ckpt = root / f"ckpt-{family}"
            if not (ckpt / "config.json").is_file():
                make_checkpoint(family, ckpt)
            out = root / "-".join(["bundle", *key]).replace("--", "")
            cmd = [sys.executable, "-m", "model", "import", "--hf", str(ckpt), "--out", str(out), *flags]
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            assert r.returncode == 0, f"import of {family} failed:\n{r.stderr[-3000:]}"
            (out / "import.log").write_text(r.stderr)
            done[key] = (ckpt, out)
        return done[key]

    return run
