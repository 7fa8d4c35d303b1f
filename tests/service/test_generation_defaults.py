"""service.http.generation_defaults: the bundle's generation defaults fill only the fields a request
leaves out, on /v1/completions, /v1/chat/completions and /generate (request building, no server)."""

from __future__ import annotations

import pytest
from hf_tokenizers import bundle_section, byte_level_bpe

from bundle.tokenizer import HuggingFaceTokenizer
from service.http import jobs as serving
from service.http.generation_defaults import GenerationDefaults
from service.http.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest

QWEN_LIKE = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "max_new_tokens": 32,
             "do_sample": True}
CONTEXT = 64


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> serving.ModelInfo:
    folder = tmp_path_factory.mktemp("tok")
    section = bundle_section(byte_level_bpe(), folder, eos=["<|im_end|>"])
    tok = HuggingFaceTokenizer.load(folder / "tokenizer.json", section, section["vocab_size"])
    return serving.ModelInfo("m", CONTEXT, tok, add_bos=False, defaults=GenerationDefaults.from_bundle(QWEN_LIKE))


def test_from_bundle_maps_generation_config_keys_to_request_fields() -> None:
    d = GenerationDefaults.from_bundle(QWEN_LIKE)
    assert d.fields == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    assert d.max_new_tokens == 32
    assert d.reported() == {**d.fields, "max_tokens": 32}


def test_do_sample_false_makes_greedy_the_default() -> None:
    d = GenerationDefaults.from_bundle({"do_sample": False, "temperature": 0.6, "top_p": 0.9})
    assert d.fields["temperature"] == 0.0 and d.fields["top_p"] == 0.9
    assert GenerationDefaults.from_bundle({}).fields == {} and GenerationDefaults.from_bundle({}).reported() == {}


def test_fields_the_request_sets_win_even_at_the_api_default() -> None:
    d = GenerationDefaults.from_bundle(QWEN_LIKE)
    req = d.apply(CompletionRequest(prompt="x", temperature=1.0, top_k=0))
    assert (req.temperature, req.top_k, req.top_p, req.repetition_penalty) == (1.0, 0, 0.8, 1.05)
    untouched = CompletionRequest(prompt="x")
    assert (untouched.temperature, untouched.top_p) == (1.0, 1.0)  # apply copies, never edits the request
    assert d.apply(untouched).temperature == 0.7


@pytest.mark.parametrize(
    ("build", "make"),
    [
        (serving.build_completion, lambda **kw: CompletionRequest(prompt="hello world", **kw)),
        (serving.build_chat, lambda **kw: ChatCompletionRequest(messages=[{"role": "user", "content": "hello"}], **kw)),
        (serving.build_generate, lambda **kw: GenerateRequest(text="hello world", **kw)),
    ],
    ids=["completions", "chat", "generate"],
)
def test_every_route_applies_the_defaults(model: serving.ModelInfo, build, make) -> None:
    (p,) = build(model.defaults.apply(make()), model).params
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_tokens) == (0.7, 0.8, 20, 1.05, 32)
    (q,) = build(model.defaults.apply(make(temperature=0.0, max_tokens=5, top_p=1.0)), model).params
    assert (q.temperature, q.top_p, q.top_k, q.max_tokens) == (0.0, 1.0, 20, 5)


def test_the_default_length_never_makes_a_request_too_long(model: serving.ModelInfo) -> None:
    prompt = list(range(10, 10 + CONTEXT - 8))  # leaves 8 positions
    (p,) = serving.build_completion(model.defaults.apply(CompletionRequest(prompt=prompt)), model).params
    assert p.max_tokens == 8
    without = serving.ModelInfo("m", CONTEXT, model.tokenizer, add_bos=False)
    (q,) = serving.build_completion(CompletionRequest(prompt=[1, 2]), without).params
    assert q.max_tokens == serving.DEFAULT_MAX_TOKENS


def test_chat_defaults_to_the_rest_of_the_context_without_max_new_tokens(model: serving.ModelInfo) -> None:
    without = serving.ModelInfo("m", CONTEXT, model.tokenizer, add_bos=False)
    job = serving.build_chat(ChatCompletionRequest(messages=[{"role": "user", "content": "hello"}]), without)
    assert job.params[0].max_tokens == CONTEXT - len(job.prompts[0])
