"""bundle.format: the sections of an imported Hugging Face bundle (tokenizer.json, eos_ids, chat
template, generation defaults, source) and the BundleErrors that name what is wrong."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hf_tokenizers import bundle_section, byte_level_bpe

from bundle.format import BundleError, load_bundle
from bundle.tokenizer import HuggingFaceTokenizer, Tokenizer


@pytest.fixture(scope="module")
def hf_config(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("hf")
    section = bundle_section(byte_level_bpe(), folder, eos=["<|im_end|>", "<|endoftext|>"])
    (folder / "model.onnx").write_bytes(b"not read by load_bundle")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    config = {
        "format_version": 1,
        "name": "tiny-qwen",
        "model_type": "qwen2",
        "architecture": {"vocab_size": section["vocab_size"], "context_length": 64, "n_layer": 1, "n_head": 2,
                         "n_kv_head": 1, "head_dim": 8},
        "tokenizer": section,
        "chat_template": {"file": "chat_template.jinja"},
        "generation": {"defaults": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
                                    "max_new_tokens": 32, "do_sample": True}},
        "source": {"kind": "huggingface", "model_type": "qwen2", "path": "/models/q", "files": {}},
    }
    return folder, config


def write(folder: Path, config: dict) -> Path:
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_hf_bundle_loads_with_its_sections(hf_config) -> None:
    folder, config = hf_config
    b = load_bundle(write(folder, config))
    assert b.tokenizer_type == "huggingface" and b.tokenizer_path == folder / "tokenizer.json"
    assert b.eos_ids == tuple(config["tokenizer"]["eos_ids"]) and len(b.eos_ids) == 2
    assert b.bos_id == -1 and b.pad_id == -1 and b.padding_id == b.eos_id and not b.add_bos
    assert b.chat_template_path == folder / "chat_template.jinja"
    assert b.generation_defaults["top_k"] == 20 and b.model_type == "qwen2"
    assert b.source["kind"] == "huggingface"
    tok = Tokenizer.from_bundle(b)
    assert isinstance(tok, HuggingFaceTokenizer) and tok.eos_ids == b.eos_ids


def test_sentencepiece_bundle_unchanged(hf_config, tmp_path: Path) -> None:
    """A bundle of our own (tokenizer.model, no new sections) loads as before."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["the quick brown fox jumps over the lazy dog"] * 50), model_writer=model,
        model_type="bpe", vocab_size=300, byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    (tmp_path / "model.onnx").write_bytes(b"not read by load_bundle")
    _, hf = hf_config
    config = {k: v for k, v in hf.items() if k not in ("chat_template", "generation", "source", "model_type")}
    config["architecture"] = {**hf["architecture"], "vocab_size": 300}
    config["tokenizer"] = {"type": "sentencepiece", "file": "tokenizer.model", "vocab_size": 300, "add_bos": True,
                           "bos_id": 1, "eos_id": 2, "pad_id": 0, "unk_id": 3}
    b = load_bundle(write(tmp_path, config))
    assert b.tokenizer_type == "sentencepiece" and b.chat_template_path is None and b.generation_defaults == {}
    tok = Tokenizer.from_bundle(b)
    assert tok.kind == "sentencepiece" and tok.eos_ids == (b.eos_id,) and tok.bos_token is not None


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("tokenizer", "type"), "wordpiece", "tokenizer.type is 'wordpiece', expected one of sentencepiece, huggingface"),
        (("tokenizer", "eos_ids"), [], "tokenizer.eos_ids must be a non-empty list"),
        (("tokenizer", "eos_ids"), [1, 10**6], "tokenizer.eos_ids[1] must be a token id in [0, "),
        (("tokenizer", "eos_id"), None, "tokenizer.eos_id must be a token id"),
        (("tokenizer", "bos_id"), -3, "tokenizer.bos_id must be a token id in [0, "),
        (("tokenizer", "add_bos"), True, "tokenizer.add_bos is true but bos_id is null"),
        (("tokenizer", "add_bos"), "yes", "tokenizer.add_bos must be true or false"),
        (("tokenizer", "file"), "missing.json", "is missing missing.json"),
        (("chat_template",), {"file": "nope.jinja"}, "is missing nope.jinja"),
        (("chat_template",), "{{ x }}", "'chat_template' must be an object"),
        (("generation", "defaults", "top_p"), 1.5, "generation.defaults.top_p must be a number in (0, 1], got 1.5"),
        (("generation", "defaults", "top_k"), 2.5, "generation.defaults.top_k must be an integer >= 0"),
        (("generation", "defaults", "temperature"), True, "generation.defaults.temperature must be a number >= 0"),
        (("generation", "defaults", "num_beams"), 4, "generation.defaults.num_beams is not a known default"),
        (("generation",), [], "'generation' must be an object"),
        (("source",), "hub", "'source' must be an object"),
        (("model_type",), 3, "model_type must be a string"),
    ],
)
def test_bad_sections_are_bundle_errors_naming_the_field(hf_config, tmp_path, path, value, message) -> None:
    folder, config = hf_config
    bad = copy.deepcopy(config)
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    for name in ("tokenizer.json", "model.onnx", "chat_template.jinja"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(BundleError) as e:
        load_bundle(write(tmp_path, bad))
    assert message in str(e.value)


def test_corrupt_tokenizer_json_is_a_clear_error(hf_config, tmp_path) -> None:
    _, config = hf_config
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "nothing"}}')
    with pytest.raises(ValueError, match=r"is not a valid tokenizer\.json"):
        HuggingFaceTokenizer.load(tmp_path / "tokenizer.json", config["tokenizer"], 10)
