"""`python -m model import --hf`: Hugging Face checkpoints of each family to bundles, checked against transformers.

Each family: a random-weight checkpoint (tests/hf_checkpoints.py) imported through the command
line; both graphs (model.onnx, model.kvinplace.onnx) are then checked here against the
checkpoint's own ``transformers`` model: a padded batch, prefill + 16 greedy steps, max |logit
diff| <= 1e-4 and the same greedy tokens. Refusals are checked through the command line too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ["gpt2", "llama", "qwen2", "mistral", "gemma"]


def _reference(ckpt: Path):
    from model.hf.checkpoint import inspect_checkpoint
    from model.hf.importer import load_hf
    from model.hf.spec import decoder_spec
    from model.hf.verify import HFReference

    cfg, hf_model = load_hf(inspect_checkpoint(ckpt))
    return HFReference(hf_model, decoder_spec(cfg))


def _prompts(bundle: Path) -> tuple[list[list[int]], int]:
    from tokenizers import Tokenizer

    from model.hf.verify import parity_prompts

    t = json.loads((bundle / "config.json").read_text())["tokenizer"]
    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    return parity_prompts(tok, t["bos_id"], t["add_bos"]), t["pad_id"]


@pytest.mark.parametrize("family", FAMILIES)
def test_import_matches_transformers(hf_import, family):
    from model.verify import check_parity, check_parity_kv_inplace

    ckpt, bundle = hf_import(family)
    ref = _reference(ckpt)
    prompts, pad = _prompts(bundle)
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: the batch is padded
    for file, check in (("model.onnx", check_parity), ("model.kvinplace.onnx", check_parity_kv_inplace)):
        rep = check(ref, bundle / file, prompts, pad, steps=16)
        assert rep.max_abs_diff <= 1e-4, (file, rep.max_abs_diff)
        assert rep.greedy_identical, (file, rep.torch_tokens, rep.onnx_tokens)
        assert len({tuple(t) for t in rep.torch_tokens}) > 1  # rows differ: the comparison sees each row
    log = (bundle / "import.log").read_text()
    assert "verified model.onnx" in log and "verified model.kvinplace.onnx" in log


def test_in_place_graph_uses_group_query_attention_with_fewer_kv_heads(hf_import):
    import onnx

    _, bundle = hf_import("llama")
    m = onnx.load(str(bundle / "model.kvinplace.onnx"), load_external_data=False)
    gqa = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(n.domain == "com.microsoft" for n in gqa)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert (attrs["num_heads"], attrs["kv_num_heads"]) == (4, 2)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    assert inputs["past_key_values.0.key"][1:] == [2, "max_len", 16]  # (B, Hkv, M, D)


def test_bundle_records_tokenizer_template_defaults_and_source(hf_import):
    from bundle.format import load_bundle

    ckpt, bundle = hf_import("llama")
    b = load_bundle(bundle)  # hashes verified
    cfg = b.config
    assert cfg["model_type"] == "llama"
    assert {k: cfg["architecture"][k] for k in ("n_layer", "n_head", "n_kv_head", "head_dim", "context_length")} == \
        {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "head_dim": 16, "context_length": 128}
    tok = cfg["tokenizer"]
    assert tok["type"] == "huggingface" and tok["file"] == "tokenizer.json" and tok["add_bos"] is True
    assert (tok["bos_token"], tok["eos_token"]) == ("<|begin|>", "<|end|>")
    assert tok["eos_ids"] == [tok["eos_id"], tok["eos_id"] + 1]  # tokenizer's <|end|>, then generation's <|eot|>
    assert cfg["generation"] == {"defaults": {"temperature": 0.7, "top_p": 0.9, "do_sample": True}}
    assert (bundle / cfg["chat_template"]["file"]).read_text() == (ckpt / "chat_template.jinja").read_text()
    assert (bundle / "tokenizer_config.json").read_bytes() == (ckpt / "tokenizer_config.json").read_bytes()
    src = cfg["source"]
    assert src["kind"] == "huggingface" and src["path"] == str(ckpt) and src["transformers_version"] == "5.23.0"
    assert set(src["files"]) >= {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"}
    assert {"model.onnx", "model.kvinplace.onnx", "tokenizer.json", "chat_template.jinja"} <= set(cfg["files"])


def test_mistral_context_is_capped_at_its_sliding_window(hf_import):
    _, bundle = hf_import("mistral")  # max_position_embeddings 256, sliding_window 96
    assert json.loads((bundle / "config.json").read_text())["architecture"]["context_length"] == 96


def _import(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "model", "import", *args], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    from hf_checkpoints import make_checkpoint

    return make_checkpoint("qwen2", tmp_path_factory.mktemp("refusals") / "ckpt")


def _copy(src: Path, dst: Path, skip: set[str]) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_refuses_an_unsupported_family(small_ckpt, tmp_path):
    ck = _copy(small_ckpt, tmp_path / "ck", set())
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "model_type": "falcon"}))
    r = _import(["--hf", str(ck), "--out", str(tmp_path / "b")])
    assert r.returncode != 0
    assert "'falcon' is not supported" in r.stderr and "gpt2, llama, mistral, qwen2, gemma" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "b").exists()


def test_refuses_a_folder_without_weights(small_ckpt, tmp_path):
    ck = _copy(small_ckpt, tmp_path / "ck", {"model.safetensors"})
    (ck / "pytorch_model.bin").write_bytes(b"not read")
    r = _import(["--hf", str(ck), "--out", str(tmp_path / "b")])
    assert r.returncode != 0 and "no *.safetensors weights" in r.stderr and "pytorch_model.bin" in r.stderr


def test_refuses_a_folder_without_tokenizer(small_ckpt, tmp_path):
    ck = _copy(small_ckpt, tmp_path / "ck", {"tokenizer.json"})
    r = _import(["--hf", str(ck), "--out", str(tmp_path / "b")])
    assert r.returncode != 0 and "has no tokenizer.json" in r.stderr


def test_refuses_a_checkpoint_over_the_size_limit(small_ckpt, tmp_path):
    size = (small_ckpt / "model.safetensors").stat().st_size
    r = _import(["--hf", str(small_ckpt), "--out", str(tmp_path / "b"), "--max-bytes", str(size - 1)])
    assert r.returncode != 0 and f"{size:,} bytes, over the limit of {size - 1:,}" in r.stderr


def test_refuses_a_missing_folder(tmp_path):
    r = _import(["--hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "b")])
    assert r.returncode != 0 and "does not exist" in r.stderr


def test_import_never_uses_the_network(small_ckpt, tmp_path):
    """With every proxy pointed at a closed port, the import still succeeds (nothing is fetched)."""
    closed = "http://127.0.0.1:9"
    env = {**os.environ, "HTTP_PROXY": closed, "HTTPS_PROXY": closed, "http_proxy": closed, "https_proxy": closed,
           "NO_PROXY": "", "no_proxy": "", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-m", "model", "import", "--hf", str(small_ckpt), "--out", str(tmp_path / "b"),
                        "--no-kv-inplace"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "verified model.onnx" in r.stderr


def _prefill_logits(onnx_file: Path, ids, n_kv_head: int = 2, head_dim: int = 16, n_layer: int = 2):
    import numpy as np
    import onnxruntime as ort

    s = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    B, T = ids.shape
    feed = {"input_ids": ids, "attention_mask": np.ones((B, T), np.int64),
            "position_ids": np.broadcast_to(np.arange(T), (B, T)).copy()}
    for i in range(n_layer):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((B, n_kv_head, 0, head_dim), np.float32)
    return s.run(["logits"], feed)[0]


# Measured on this random-weight llama (logit std 1.2): int8 relative RMS error 0.034, argmax agreement
# 0.94; int4 0.36 and 0.51 (random Gaussian weights are int4's worst case; block 32, symmetric).
QUANT_BOUNDS = {"--int8": (8, 0.08, 0.85), "--int4": (4, 0.6, 0.35)}


@pytest.mark.parametrize("flag", sorted(QUANT_BOUNDS))
def test_weight_only_quantized_bundles_load_run_and_stay_close(hf_import, flag):
    import numpy as np
    import onnx

    from model.verify import check_parity_kv_inplace

    bits, max_rel_rms, min_agree = QUANT_BOUNDS[flag]
    ckpt, fp32 = hf_import("llama")
    _, q = hf_import("llama", flag)
    cfg = json.loads((q / "config.json").read_text())
    assert cfg["quantization"]["method"] == "MatMulNBits" and cfg["quantization"]["bits"] == bits
    for f in ("model.onnx", "model.kvinplace.onnx"):
        nodes = onnx.load(str(q / f)).graph.node
        nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
        assert len(nbits) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the output head
        assert all(onnx.helper.get_attribute_value(a) == bits for n in nbits for a in n.attribute if a.name == "bits")
        assert (q / f).stat().st_size < (fp32 / f).stat().st_size
    ids = np.random.default_rng(0).integers(0, 400, (4, 20))
    ref, got = _prefill_logits(fp32 / "model.onnx", ids), _prefill_logits(q / "model.onnx", ids)
    rel_rms = float(np.sqrt(((got - ref) ** 2).mean()) / ref.std())
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    assert rel_rms <= max_rel_rms and agree >= min_agree, (rel_rms, agree)
    prompts, pad = _prompts(q)  # the in-place graph runs its right-padded prefill and decode steps
    rep = check_parity_kv_inplace(_reference(ckpt), q / "model.kvinplace.onnx", prompts, pad, steps=16)
    assert np.isfinite(rep.max_abs_diff) and rep.max_abs_diff < 6 * ref.std()
