"""Unit tests of the HTTP layer's pure parts: settings, request models, chat template, job
building, error table. No server, no engine."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
from fakes import FAKE_CONTEXT, FAKE_VOCAB, make_fake_bundle
from pydantic import ValidationError

from bundle.tokenizer import Tokenizer
from service.engine.config import EngineConfig
from service.http import chat_template
from service.http import jobs as serving
from service.http.errors import STATUS, ApiError
from service.http.protocol import (
    MAX_STOP,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerateRequest,
    describe_validation_error,
)
from service.settings import Settings, SettingsError


@pytest.fixture(scope="module")
def fake_bundle(tmp_path_factory):
    return make_fake_bundle(tmp_path_factory.mktemp("fake") / "bundle")


# -- settings ------------------------------------------------------------------------------------


def test_settings_defaults_and_env():
    s = Settings.from_env({})
    assert (s.host, s.http_port, s.max_running, s.max_waiting) == ("127.0.0.1", 8000, 64, 256)
    s = Settings.from_env({"TEXTGEN_MAX_RUNNING": "8", "TEXTGEN_LOG_PROMPTS": "true", "TEXTGEN_API_KEY": "k"})
    assert s.max_running == 8 and s.log_prompts is True and s.api_key.get_secret_value() == "k"


def test_onnx_threads_leave_a_core_for_the_http_process(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert Settings.from_env({}).onnx_threads == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert Settings.from_env({}).onnx_threads == 1  # never 0: that would mean ONNX Runtime's default
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert Settings.from_env({}).onnx_threads == 15
    assert Settings.from_env({"TEXTGEN_INTRA_OP_THREADS": "4"}).onnx_threads == 4  # explicit wins


def test_engine_config_comes_from_the_settings(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    # Every engine option except the seed is a setting, with the same default.
    options = {f.name for f in fields(EngineConfig)} - {"seed"}
    assert options <= set(Settings.model_fields)
    assert Settings.from_env({}).engine_config() == EngineConfig(intra_op_threads=3)  # 0 resolved
    env = {"TEXTGEN_MAX_RUNNING": "8", "TEXTGEN_KV_INPLACE": "off", "TEXTGEN_SPECULATIVE_TOKENS": "0",
           "TEXTGEN_INTRA_OP_THREADS": "2", "TEXTGEN_PROVIDER": "cpu"}  # fmt: skip
    cfg = Settings.from_env(env).engine_config()
    assert (cfg.max_running, cfg.kv_inplace, cfg.speculative_tokens, cfg.intra_op_threads, cfg.provider) == (
        8, "off", 0, 2, "cpu")  # fmt: skip
    with pytest.raises(ValueError, match="speculative_ngram"):
        EngineConfig(speculative_ngram=0)


def test_settings_ignores_kubernetes_port_variable():
    assert Settings.from_env({"TEXTGEN_PORT": "tcp://10.0.0.1:8000"}).http_port == 8000


def test_cli_flags_override_env():
    s = Settings.from_env({"TEXTGEN_HTTP_PORT": "9000"}, http_port=9100, model_dir=None)
    assert s.http_port == 9100


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"TEXTGEN_MAX_RUNNING": "0"}, "TEXTGEN_MAX_RUNNING"),
        ({"TEXTGEN_HTTP_PORT": "80"}, "TEXTGEN_HTTP_PORT"),
        ({"TEXTGEN_PROVIDER": "tpu"}, "TEXTGEN_PROVIDER"),
        ({"TEXTGEN_REQUEST_TIMEOUT_S": "soon"}, "TEXTGEN_REQUEST_TIMEOUT_S"),
        ({"TEXTGEN_HOST": "example.com"}, "TEXTGEN_HOST"),
        ({"TEXTGEN_MAX_TOKENS_PER_EVENT": "0"}, "TEXTGEN_MAX_TOKENS_PER_EVENT"),
        ({"TEXTGEN_PREFIX_CACHING": "sometimes"}, "TEXTGEN_PREFIX_CACHING"),
        ({"TEXTGEN_PREFIX_BLOCK_SIZE": "0"}, "TEXTGEN_PREFIX_BLOCK_SIZE"),
    ],
)
def test_bad_settings_name_the_variable(env, needle):
    with pytest.raises(SettingsError, match=needle):
        Settings.from_env(env)


def test_flag_errors_name_the_flag():
    with pytest.raises(SettingsError, match="--port"):
        Settings.from_env({}, http_port=1)


def test_api_key_never_shown():
    s = Settings.from_env({"TEXTGEN_API_KEY": "sekrit"})
    assert "sekrit" not in json.dumps(s.describe()) and "sekrit" not in repr(s)


# -- request models ------------------------------------------------------------------------------


def _error(model, data) -> tuple[str, str | None]:
    with pytest.raises(ValidationError) as e:
        model.model_validate(data)
    return describe_validation_error(e.value)


@pytest.mark.parametrize(
    ("data", "param", "needle"),
    [
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens", "valid integer"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
        ({"prompt": "x", "n": 17}, "n", "less than or equal to 16"),
        ({"prompt": "x", "temperature": 2.5}, "temperature", "2"),
        ({"prompt": "x", "top_p": 0}, "top_p", "greater than 0"),
        ({"prompt": "x", "stop": ["s"] * 1000}, "stop", f"at most {MAX_STOP}"),
        ({"prompt": "x", "stop": "y" * 65}, "stop", "at most 64 characters"),
        ({"prompt": "x", "stop": [""]}, "stop", "must not be empty"),
        ({"prompt": "x", "echo": 1}, "echo", "valid boolean"),
        ({"prompt": ["a"] * 65}, "prompt", "at most 64 prompts"),
        ({"prompt": ["a", ""]}, "prompt", "prompt 1 must not be empty"),
        ({"prompt": [[1], []]}, "prompt", "prompt 1 must not be empty"),
        ({"prompt": []}, "prompt", "non-empty"),
        ({"prompt": "x", "best_of": 2}, "best_of", "only 1"),
        ({"prompt": "x", "suffix": "y"}, "suffix", "not supported"),
        ({"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias", "decimal"),
        ({"prompt": "x", "logit_bias": {"1": 101}}, "logit_bias", "[-100, 100]"),
        ({"prompt": "x", "logit_bias": {"1": "x"}}, "logit_bias", "number"),
        ({"prompt": [1, "a"]}, "prompt", "list of token ids"),
        ({"prompt": [True]}, "prompt", "list of token ids"),
        ({"prompt": "x", "seed": -1}, "seed", "greater than or equal to 0"),
        ({"prompt": "x", "logprobs": 6}, "logprobs", "5"),
        ({}, "prompt", "required"),
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": "a\ud800"}, "prompt.0", "valid Unicode"),
        ({"prompt": "x", "stop": ["\udfff"]}, "stop.0", "valid Unicode"),
        ({"prompt": "x", "max_tokens": 5.5}, "max_tokens", "valid integer"),
    ],
)
def test_completion_request_errors_name_the_field(data, param, needle):
    message, first = _error(CompletionRequest, data)
    assert first == param
    assert message.startswith(param) and needle in message


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hi", ["hi"]),
        ([5, 6], [[5, 6]]),
        (["hi"], ["hi"]),
        ([[5, 6]], [[5, 6]]),
        (["a", "b"], ["a", "b"]),
        ([[5], [6, 7]], [[5], [6, 7]]),
        ([5.0, 6], [[5, 6]]),
    ],
)
def test_prompt_forms(prompt, expected):
    assert CompletionRequest.model_validate({"prompt": prompt}).prompt == expected


def test_integral_floats_are_integers_and_nulls_are_defaults():
    req = CompletionRequest.model_validate(
        {"prompt": [5.0, 6], "max_tokens": 4.0, "n": 2.0, "stop": None, "stop_token_ids": None}
    )
    assert (req.prompt, req.max_tokens, req.n, req.stop, req.stop_token_ids) == ([[5, 6]], 4, 2, [], [])


def test_chat_request_errors():
    _, param = _error(ChatCompletionRequest, {"messages": [{"role": "tool", "content": "x"}]})
    assert param == "messages.0.role"
    _, param = _error(ChatCompletionRequest, {"messages": []})
    assert param == "messages"
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": parts}]})
    assert req.messages[0].text == "ab"


def test_generate_request_needs_one_prompt(fake_bundle):
    m = _model(fake_bundle)
    with pytest.raises(ApiError) as e:
        serving.build_generate(GenerateRequest.model_validate({}), m)
    assert e.value.kind == "validation"


# -- chat template -------------------------------------------------------------------------------


def _messages(*pairs) -> list[ChatMessage]:
    return [ChatMessage(role=r, content=c) for r, c in pairs]


def test_chat_template_renders_a_script():
    text = chat_template.render(
        _messages(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye"))
    )
    assert text == "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:"


def test_chat_template_continues_a_final_assistant_message():
    assert (
        chat_template.render(_messages(("user", "Hi"), ("assistant", "Well"))) == "User: Hi\nAssistant: Well"
    )


def test_chat_stops_at_the_next_turn(fake_bundle):
    req = ChatCompletionRequest(messages=_messages(("user", "Hi")), stop=["END", "\nUser:"])
    job = serving.build_chat(req, _model(fake_bundle))
    assert job.params[0].stop == ("END", "\nUser:", "\nSystem:", "\nAssistant:")


# -- job building --------------------------------------------------------------------------------


def _model(bundle) -> serving.ModelInfo:
    return serving.ModelInfo("fake", FAKE_CONTEXT, Tokenizer.load(bundle / "tokenizer.model"), add_bos=True)


def test_text_prompt_starts_with_bos(fake_bundle):
    m = _model(fake_bundle)
    job = serving.build_completion(CompletionRequest(prompt="Hello"), m)
    (ids,) = job.prompts
    assert ids[0] == m.tokenizer.bos_id and ids[1:] == m.tokenizer.encode("Hello")
    assert job.params[0].max_tokens == serving.DEFAULT_MAX_TOKENS


def test_token_prompt_is_used_as_given(fake_bundle):
    job = serving.build_completion(CompletionRequest(prompt=[5, 6, 7]), _model(fake_bundle))
    assert job.prompts == ([5, 6, 7],)


def test_token_outside_vocabulary(fake_bundle):
    with pytest.raises(ApiError) as e:
        serving.build_completion(CompletionRequest(prompt=[5, FAKE_VOCAB]), _model(fake_bundle))
    assert e.value.status == 400 and e.value.param == "prompt" and str(FAKE_VOCAB) in e.value.message
    assert e.value.status_on("/generate") == 422  # the native routes keep TGI's status


def test_max_tokens_over_context_is_400(fake_bundle):
    with pytest.raises(ApiError) as e:
        serving.build_completion(
            CompletionRequest(prompt="x", max_tokens=FAKE_CONTEXT + 1), _model(fake_bundle)
        )
    assert e.value.status == 400 and e.value.param == "max_tokens" and str(FAKE_CONTEXT) in e.value.message


def test_context_overflow_is_400_with_both_lengths(fake_bundle):
    with pytest.raises(ApiError) as e:
        serving.build_completion(CompletionRequest(prompt=[5] * 100, max_tokens=50), _model(fake_bundle))
    assert e.value.status == 400 and e.value.kind == "context_length_exceeded"
    assert "100" in e.value.message and "50" in e.value.message and str(FAKE_CONTEXT) in e.value.message


def test_chat_context_overflow_names_messages(fake_bundle):
    req = ChatCompletionRequest(messages=_messages(("user", "to be " * 100)), max_tokens=100)
    with pytest.raises(ApiError) as e:
        serving.build_chat(req, _model(fake_bundle))
    assert e.value.kind == "context_length_exceeded" and e.value.param == "messages"


def test_chat_default_max_tokens_fills_the_context(fake_bundle):
    m = _model(fake_bundle)
    job = serving.build_chat(ChatCompletionRequest(messages=_messages(("user", "Hi"))), m)
    assert len(job.prompts[0]) + job.params[0].max_tokens == FAKE_CONTEXT
    assert "\nUser:" in job.params[0].stop


def test_seeded_choices_get_consecutive_seeds(fake_bundle):
    job = serving.build_completion(CompletionRequest(prompt="x", n=3, seed=7), _model(fake_bundle))
    assert [p.seed for p in job.params] == [7, 8, 9]


def test_cache_prompt_reaches_the_engine_on_every_route(fake_bundle):
    m = _model(fake_bundle)
    jobs = [
        serving.build_completion(CompletionRequest(prompt="x"), m),
        serving.build_chat(ChatCompletionRequest(messages=_messages(("user", "Hi"))), m),
        serving.build_generate(GenerateRequest(text="x"), m),
    ]
    assert [j.params[0].cache_prompt for j in jobs] == [True, True, True]  # on by default
    jobs = [
        serving.build_completion(CompletionRequest(prompt="x", cache_prompt=False), m),
        serving.build_chat(ChatCompletionRequest(messages=_messages(("user", "Hi")), cache_prompt=False), m),
        serving.build_generate(GenerateRequest(text="x", cache_prompt=False), m),
    ]
    assert [j.params[0].cache_prompt for j in jobs] == [False, False, False]
    message, param = _error(CompletionRequest, {"prompt": "x", "cache_prompt": "sometimes"})
    assert param == "cache_prompt" and message.startswith("cache_prompt")
    assert Settings.from_env({}).prefix_caching is True
    assert Settings.from_env({"TEXTGEN_PREFIX_CACHING": "false"}).prefix_caching is False


def test_wrong_model_name(fake_bundle):
    with pytest.raises(ApiError) as e:
        serving.build_completion(CompletionRequest(prompt="x", model="gpt-4"), _model(fake_bundle))
    assert e.value.param == "model" and e.value.status == 404 and e.value.body()["error"]["code"] == "model_not_found"


def test_several_prompts_get_n_choices_each_in_openai_order(fake_bundle):
    m = _model(fake_bundle)
    job = serving.build_completion(CompletionRequest(prompt=["a", [5, 6], "b c"], n=2, seed=3), m)
    assert job.prompt_index == (0, 0, 1, 1, 2, 2)  # index = prompt * n + choice
    assert job.prompt_of(2) == [5, 6] and job.num_prompt_tokens == sum(len(p) for p in job.prompts)
    assert [p.seed for p in job.params] == [3, 4] * 3


def test_too_many_choices_name_n_and_the_limit(fake_bundle):
    m = _model(fake_bundle)
    with pytest.raises(ApiError) as e:
        serving.build_completion(CompletionRequest(prompt=["a"] * 10, n=16), m)
    assert e.value.param == "n" and str(m.max_choices) in e.value.message and e.value.status == 400


def test_echo_and_scoring(fake_bundle):
    m = _model(fake_bundle)
    job = serving.build_completion(CompletionRequest(prompt=[5, 6], echo=True, max_tokens=0, logprobs=2), m)
    assert job.echo == (m.tokenizer.decode([5, 6]),)
    assert job.params[0].max_tokens == 0 and job.params[0].prompt_logprobs == 2
    with pytest.raises(ApiError) as e:  # max_tokens 0 without echo generates nothing and scores nothing
        serving.build_completion(CompletionRequest(prompt="x", max_tokens=0), m)
    assert e.value.param == "max_tokens" and "echo" in e.value.message
    plain = serving.build_completion(CompletionRequest(prompt="x", logprobs=1), m)
    assert plain.echo is None and plain.params[0].prompt_logprobs is None  # no echo: no prompt scoring


def test_logit_bias_is_checked_against_the_vocabulary(fake_bundle):
    m = _model(fake_bundle)
    job = serving.build_completion(CompletionRequest(prompt="x", logit_bias={"5": -100, "7": 2.5}), m)
    assert job.params[0].logit_bias == ((5, -100.0), (7, 2.5))
    with pytest.raises(ApiError) as e:
        serving.build_completion(CompletionRequest(prompt="x", logit_bias={str(FAKE_VOCAB): 1}), m)
    assert e.value.param == "logit_bias" and str(FAKE_VOCAB) in e.value.message


def test_top_logprobs_needs_logprobs(fake_bundle):
    req = ChatCompletionRequest(messages=_messages(("user", "Hi")), top_logprobs=2)
    with pytest.raises(ApiError, match="top_logprobs"):
        serving.build_chat(req, _model(fake_bundle))


# -- errors --------------------------------------------------------------------------------------


def test_error_table():
    assert {
        k: v[0] for k, v in STATUS.items() if k in ("validation", "queue_full", "unavailable", "unauthorized")
    } == {
        "validation": 400,
        "queue_full": 429,
        "unavailable": 503,
        "unauthorized": 401,
    }
    r = ApiError("queue_full", "full").response()
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    sse = ApiError("internal", "boom").sse()
    assert (
        sse.startswith("event: error\ndata: ")
        and json.loads(sse.split("data: ")[1])["error"]["message"] == "boom"
    )


@pytest.mark.parametrize("n", [1, 2, 10, 11, 99, 100, 512, 8000, 32000, 151_936])
def test_below_pattern_matches_exactly_the_token_ids(n):
    import re

    from service.http.api import below_pattern

    pattern = re.compile(below_pattern(n))
    assert all(bool(pattern.match(str(i))) == (i < n) for i in range(n + 1000))
    assert not pattern.match("01") and not pattern.match("-1")
