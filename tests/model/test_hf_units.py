"""Pure parts of the Hugging Face import: config -> DecoderSpec, tokenizer/template/generation sections,
and the eager reference of the in-place attention op against the concat attention."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from model.hf.spec import UnsupportedModel, context_length, decoder_spec
from model.hf.tokenizer_files import chat_template, generation_defaults, tokenizer_section


def test_unsupported_family_names_model_type_and_supported_list():
    with pytest.raises(UnsupportedModel, match=r"'falcon' is not supported.*gpt2, llama, mistral, qwen2, gemma"):
        decoder_spec(SimpleNamespace(model_type="falcon"))


def test_checkpoint_config_errors_name_the_file(tmp_path):
    from model.hf.checkpoint import CheckpointError, inspect_checkpoint

    with pytest.raises(CheckpointError, match=r"has no config\.json: not a Hugging Face model folder"):
        inspect_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        inspect_checkpoint(tmp_path)
    (tmp_path / "config.json").write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        inspect_checkpoint(tmp_path)


def test_rope_variants_that_change_with_length_are_refused():
    cfg = SimpleNamespace(model_type="llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(UnsupportedModel, match="RoPE type 'dynamic'"):
        decoder_spec(cfg)


def test_context_length_is_the_smallest_of_positions_window_and_cap():
    assert context_length(32768, 4096, None) == 4096
    assert context_length(2048, None, None) == 2048
    assert context_length(32768, 4096, 1024) == 1024


class _Tok:
    """What tokenizer_section reads of a tokenizers.Tokenizer."""

    def __init__(self, adds_bos: bool):
        self.adds_bos = adds_bos
        self.vocab = {"<s>": 1, "</s>": 2, "<eot>": 7, "<pad>": 0}

    def token_to_id(self, t):
        return self.vocab.get(t)

    def get_vocab_size(self, with_added_tokens=True):
        return 100

    def encode(self, text, add_special_tokens=True):
        return SimpleNamespace(ids=([1] if self.adds_bos and add_special_tokens else []) + [50])


def test_tokenizer_section_collects_every_end_id_once():
    tok_cfg = {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>", "pad_token": "<pad>"}
    sec = tokenizer_section(_Tok(True), tok_cfg, {"eos_token_id": [2, 7]})
    assert (sec["bos_id"], sec["eos_id"], sec["eos_ids"], sec["pad_id"]) == (1, 2, [2, 7], 0)
    assert sec["add_bos"] is True and sec["bos_token"] == "<s>" and sec["unk_id"] is None


def test_add_bos_follows_config_else_the_post_processor():
    assert tokenizer_section(_Tok(False), {"bos_token": "<s>", "eos_token": "</s>"}, {})["add_bos"] is False
    assert tokenizer_section(_Tok(False), {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True},
                             {})["add_bos"] is True


def test_a_checkpoint_without_end_token_is_refused():
    with pytest.raises(ValueError, match="no end-of-sequence token"):
        tokenizer_section(_Tok(True), {"bos_token": "<s>"}, {})


def test_chat_template_sources():
    assert chat_template({"chat_template": "A"}, None) == "A"
    assert chat_template({"chat_template": "A"}, "FILE") == "FILE"
    assert chat_template({"chat_template": [{"name": "tool_use", "template": "T"},
                                            {"name": "default", "template": "D"}]}, None) == "D"
    assert chat_template({}, None) is None


def test_generation_defaults_keep_only_sampling_keys_that_are_set():
    gen = {"temperature": 0.6, "top_p": 0.9, "eos_token_id": [1, 2], "top_k": None, "do_sample": True}
    assert generation_defaults(gen) == {"temperature": 0.6, "top_p": 0.9, "do_sample": True}


def test_inplace_attention_eager_reference_matches_concat_attention():
    """The in-place op's PyTorch semantics (right-padded prefill, then a decode step per row length) give
    the same outputs as the concat decoder on the left-padded batch."""
    import torch

    from model.hf.decoder import Decoder
    from model.hf.spec import DecoderSpec

    spec = DecoderSpec("llama", 50, 32, 2, 4, 2, 8, 64, 64, "rmsnorm", 1e-6, "glu", "silu", "rope", "default",
                       False, False, False, False, 1.0, 8**-0.5)
    torch.manual_seed(0)
    dec = Decoder(spec, 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))).eval()
    prompts = [[3, 4, 5, 6, 7], [8, 9]]
    with torch.no_grad():
        # concat, left padded
        ids = torch.tensor([[3, 4, 5, 6, 7], [0, 0, 0, 8, 9]])
        mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ref, past = dec(ids, mask, pos)
        ref2, _ = dec(torch.tensor([[10], [11]]), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                      pos[:, -1:] + 1, past)
        # in place, right padded, buffers of 16 positions
        dec.kv_layout = "inplace"
        bufs = [(torch.zeros(2, 2, 16, 8), torch.zeros(2, 2, 16, 8)) for _ in range(2)]
        r_ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 0, 0, 0]])
        r_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
        out, bufs = dec(r_ids, r_mask, torch.arange(5).expand(2, 5), bufs)
        lengths = torch.tensor([len(p) for p in prompts])
        assert torch.allclose(out[torch.arange(2), lengths - 1], ref[:, -1], atol=1e-5)
        d_mask = (torch.arange(6)[None] <= lengths[:, None]).long()
        out2, _ = dec(torch.tensor([[10], [11]]), d_mask, lengths[:, None], bufs)
        assert torch.allclose(out2[:, 0], ref2[:, 0], atol=1e-5)
