"""A Hugging Face style bundle served end to end over real HTTP: a tiny random GPT of our own
exported to ONNX (no importer), with a byte-level BPE ``tokenizer.json`` trained here, a ChatML
template (Qwen2's, tests/service/chat_templates/) and generation defaults.

Checks: the chat template renders the prompt, the defaults apply and /v1/models reports them,
each of several end ids stops a generation, streams of emoji, CJK and accented text through the
openai client never show a replacement character and equal the final text, and a template error
is a 400.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from hf_tokenizers import bundle_section, byte_level_bpe
from server_harness import start

from bundle.format import sha256_file

CHATML = (Path(__file__).parent / "chat_templates" / "chatml_qwen2.jinja").read_text()
# A guard a real template might have: the conversation must not end with a system message.
TEMPLATE = ("{%- if messages[-1]['role'] == 'system' %}{{ raise_exception('the last message must not be a system "
            "message') }}{%- endif %}\n" + CHATML)
DEFAULTS = {"temperature": 0.9, "top_k": 5, "repetition_penalty": 1.2, "max_new_tokens": 7, "do_sample": False}
PROMPTS = ["café naïve résumé", "日本語の東京", "emoji 😀👋🤖 here"]
UTF8_REGEX = "[日本語東京😀👋🤖éàü ]{6,12}"


@pytest.fixture(scope="module")
def hf_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from model.config import GPTConfig
    from model.export import export_onnx, write_bundle
    from model.export_inplace import KV_INPLACE_FILE, build_kv_inplace
    from model.gpt import GPT

    out = tmp_path_factory.mktemp("hf-bundle")
    tok = byte_level_bpe(vocab_size=600)
    section = bundle_section(tok, out, eos=["<|im_end|>", "<|endoftext|>"], pad="<|endoftext|>")
    torch.manual_seed(20)
    model = GPT(GPTConfig(vocab_size=section["vocab_size"], context_length=256, n_layer=2, n_head=2, n_embd=64)).eval()
    onnx_file = export_onnx(model, out / "model.onnx")
    placeholder = out / "placeholder.model"  # write_bundle copies a tokenizer.model: replaced below
    placeholder.write_bytes(b"")
    write_bundle(out, "tiny-chatml", model, onnx_file, placeholder, {"note": "random weights"}, "float32",
                 {"bos_id": 0, "eos_id": 0, "pad_id": 0, "unk_id": 0},
                 kv_inplace_file=build_kv_inplace(model, out / KV_INPLACE_FILE))
    for f in (placeholder, out / "tokenizer.model"):
        f.unlink()
    (out / "chat_template.jinja").write_text(TEMPLATE)
    config = json.loads((out / "config.json").read_text())
    config["tokenizer"] = section
    config["chat_template"] = {"file": "chat_template.jinja"}
    config["generation"] = {"defaults": DEFAULTS}
    config["source"] = {"kind": "test", "note": "a random GPT with a Hugging Face tokenizer, no importer"}
    files = ["model.onnx", KV_INPLACE_FILE, "tokenizer.json", "chat_template.jinja"]
    config["files"] = {f: {"sha256": sha256_file(out / f), "bytes": (out / f).stat().st_size} for f in files}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="module")
def server(hf_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = start(hf_bundle, tmp_path_factory.mktemp("hf-e2e") / "server.log", fake=False, TEXTGEN_MAX_RUNNING="16")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tok(hf_bundle: Path):
    from bundle.format import load_bundle
    from bundle.tokenizer import Tokenizer

    return Tokenizer.from_bundle(load_bundle(hf_bundle))


def test_models_report_context_length_and_defaults(server) -> None:
    card = httpx.get(server.url("/v1/models")).json()["data"][0]
    assert card["id"] == "tiny-chatml" and card["max_model_len"] == 256
    assert card["generation_defaults"] == {"temperature": 0.0, "top_k": 5, "repetition_penalty": 1.2, "max_tokens": 7}
    assert httpx.get(server.url("/v1/models/tiny-chatml")).json()["generation_defaults"] == card["generation_defaults"]
    info = httpx.get(server.url("/tokenizer_info")).json()
    assert info["eos_token"] == "<|im_end|>" and info["add_bos_token"] is False


def test_chat_prompt_is_the_rendered_template(server, client, tok) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi 😀"}]
    ids = httpx.post(server.url("/tokenize"), json={"messages": messages}).json()["tokens"]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi 😀<|im_end|>\n<|im_start|>assistant\n"
    assert ids == tok.encode(expected)
    assert ids[0] == tok.encode("<|im_start|>")[0]  # the special token, one id, no bos before it
    r = client.chat.completions.create(model="tiny-chatml", messages=messages)
    assert r.usage.prompt_tokens == len(ids)


def test_defaults_apply_where_the_request_is_silent(server, client) -> None:
    base = {"model": "tiny-chatml", "prompt": "café", "extra_body": {"ignore_eos": True}}
    silent = client.completions.create(**base)
    assert silent.usage.completion_tokens == 7  # max_new_tokens
    greedy = client.completions.create(**base, temperature=0.0, max_tokens=7)
    assert silent.choices[0].text == greedy.choices[0].text  # do_sample false: greedy by default
    for _ in range(2):
        assert client.completions.create(**base).choices[0].text == silent.choices[0].text
    chat = client.chat.completions.create(model="tiny-chatml", messages=[{"role": "user", "content": "x"}],
                                          extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 7
    native = httpx.post(server.url("/generate"), json={"text": "café", "ignore_eos": True}).json()
    assert native["usage"]["completion_tokens"] == 7


@pytest.mark.parametrize("end", ["<|im_end|>", "<|endoftext|>"])
def test_each_end_id_stops_generation(server, client, tok, end: str) -> None:
    end_id = tok.encode(end)[0]
    r = client.chat.completions.create(model="tiny-chatml", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=20, logit_bias={str(end_id): 100})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == ""
    assert r.usage.completion_tokens == 1
    other = tok.encode(" the")[0]
    r = client.chat.completions.create(model="tiny-chatml", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=5, logit_bias={str(other): 100})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


@pytest.mark.parametrize("prompt", PROMPTS)
def test_streams_of_multibyte_text_never_show_a_replacement_character(server, client, prompt: str) -> None:
    """Constrained to emoji, CJK and accented characters, the random model picks any tokens that spell
    them (byte tokens, tokens that end inside a character); the stream equals the final text."""
    body = {"model": "tiny-chatml", "messages": [{"role": "user", "content": prompt}], "temperature": 1.0,
            "max_tokens": 60, "seed": 3, "extra_body": {"structured_outputs": {"regex": UTF8_REGEX}}}
    final = client.chat.completions.create(**body, logprobs=True)
    text = final.choices[0].message.content
    assert final.choices[0].finish_reason == "stop" and "\ufffd" not in text
    pieces = [bytes(t.bytes) for t in final.choices[0].logprobs.content]
    assert b"".join(pieces).decode() == text
    split = [b for b in pieces if not _whole_characters(b)]
    assert split, f"expected tokens that split characters, got {pieces}"
    deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**body, stream=True) if c.choices]
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == text


def test_completion_stream_after_a_multibyte_prompt(server, client) -> None:
    for prompt in PROMPTS:
        body = {"model": "tiny-chatml", "prompt": prompt, "max_tokens": 40, "temperature": 1.0, "seed": 11,
                "extra_body": {"guided_regex": UTF8_REGEX}}
        text = client.completions.create(**body).choices[0].text
        deltas = [c.choices[0].text for c in client.completions.create(**body, stream=True)]
        assert "".join(deltas) == text and "\ufffd" not in "".join(deltas)


def test_template_error_is_a_400_naming_the_problem(server) -> None:
    r = httpx.post(server.url("/v1/chat/completions"),
                   json={"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "chat_template" and err["param"] == "messages"
    assert "the last message must not be a system message" in err["message"]
    r = httpx.post(server.url("/v1/chat/completions"), json={"stream": True, "messages": [{"role": "system", "content": "x"}]})
    assert r.status_code == 400 and "must not be a system message" in r.text
    assert httpx.get(server.url("/health")).status_code == 200


def _whole_characters(b: bytes) -> bool:
    try:
        b.decode()
    except UnicodeDecodeError:
        return False
    return True
