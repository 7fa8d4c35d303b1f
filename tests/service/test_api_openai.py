"""The service through the official ``openai`` client (and plain HTTP for the native routes).

One real server for the module, with the real engine on ``random_bundle`` (seeded random
weights: greedy continuations vary, so stop strings and concurrency checks mean something);
with the fake engine on a fake bundle where the engine or the bundle fixtures are missing.
"""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import openai
import pytest
from fakes import make_fake_bundle
from prometheus_client.parser import text_string_to_metric_families
from server_harness import start


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai")
    try:
        import service.engine.engine  # noqa: F401

        bundle, fake = request.getfixturevalue("random_bundle"), False
    except (ImportError, pytest.FixtureLookupError):
        bundle, fake = make_fake_bundle(tmp / "bundle"), True
    srv = start(bundle, tmp / "server.log", fake=fake, TEXTGEN_MAX_RUNNING="16")
    yield srv
    assert srv.stop() == 0, srv.log()


def _tokenize(server, text: str) -> list[int]:
    return httpx.post(server.url("/tokenize"), json={"text": text}).json()["tokens"]


def test_models(server, client, model):
    models = client.models.list().data
    assert [m.id for m in models] == [model]
    assert httpx.get(server.url("/v1/models")).json()["data"][0]["max_model_len"] > 0


def test_cors_is_off_unless_configured(server):
    r = httpx.get(server.url("/v1/models"), headers={"Origin": "https://app.example.com"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_completion_usage_is_exact(server, client, model):
    r = client.completions.create(model=model, prompt="To be, or not", max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert r.usage.prompt_tokens == len(_tokenize(server, "To be, or not"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")
    assert (
        r.usage.completion_tokens == 8 if choice.finish_reason == "length" else r.usage.completion_tokens <= 8
    )
    assert r.id.startswith("cmpl-") and r.model == model


def test_stream_matches_non_stream(client, model):
    kw = dict(model=model, prompt="Shall I compare thee", max_tokens=12, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_stream_without_usage_option_has_no_usage(client, model):
    chunks = list(client.completions.create(model=model, prompt="Hi", max_tokens=3, stream=True))
    assert all(c.usage is None for c in chunks)


def test_chat(client, model):
    kw = dict(
        model=model, messages=[{"role": "user", "content": "Speak, friend."}], max_tokens=10, temperature=0
    )
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices_and_seed_reproducibility(client, model):
    kw = dict(model=model, prompt="Once upon", max_tokens=6, temperature=1.0, n=3, seed=1234)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert 3 <= a.usage.completion_tokens <= 18
    streamed = {}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == [c.text for c in a.choices]


def test_stop_string(client, model):
    kw = dict(model=model, prompt="The quick brown", max_tokens=24, temperature=0)
    text = client.completions.create(**kw).choices[0].text
    stop = text.strip()[2:4] if len(text.strip()) >= 4 else None
    if not stop:
        pytest.skip(f"greedy output {text!r} is too short to cut")
    r = client.completions.create(**kw, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index(stop)]


def test_token_id_prompt_equals_text_prompt(server, client, model):
    ids = _tokenize(server, "Good morrow")
    kw = dict(model=model, max_tokens=8, temperature=0)
    by_text = client.completions.create(prompt="Good morrow", **kw)
    by_ids = client.completions.create(prompt=ids, **kw)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_concurrent_greedy_outputs_equal_each_alone(client, model):
    prompts = [f"Line {i}: the king" for i in range(8)]

    def run(p: str) -> str:
        return client.completions.create(model=model, prompt=p, max_tokens=10, temperature=0).choices[0].text

    alone = [run(p) for p in prompts]
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(run, prompts))
    assert together == alone


def test_requests_share_engine_steps(server, client, model):
    """Concurrent requests from separate connections are batched into the same engine steps."""
    with cf.ThreadPoolExecutor(8) as pool:
        list(
            pool.map(lambda i: client.completions.create(model=model, prompt=f"{i}", max_tokens=30), range(8))
        )
    samples = {
        s.name: s.value
        for f in text_string_to_metric_families(httpx.get(server.url("/metrics")).text)
        if f.name == "textgen_iteration_batch_size"
        for s in f.samples
        if s.labels.get("le") in (None, "1.0")
    }
    assert samples["textgen_iteration_batch_size_count"] > samples["textgen_iteration_batch_size_bucket"]


def test_a_thousand_stop_strings_are_refused(client, model):
    with pytest.raises(openai.BadRequestError, match="stop"):
        client.completions.create(model=model, prompt="x", stop=[f"s{i}" for i in range(1000)])


def test_logprobs(client, model):
    r = client.completions.create(model=model, prompt="Hark", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    c = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, logprobs=True, top_logprobs=2
    )
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens and all(len(e.top_logprobs) <= 2 for e in content)


def test_extensions_pass_through(client, model):
    r = client.completions.create(
        model=model,
        prompt="Now is the winter",
        max_tokens=5,
        temperature=0.8,
        extra_body={
            "top_k": 5,
            "min_p": 0.05,
            "repetition_penalty": 1.2,
            "ignore_eos": True,
            "stop_token_ids": [2],
        },
    )
    assert r.usage.completion_tokens <= 5


def test_generate_details(server):
    r = httpx.post(
        server.url("/generate"),
        json={"text": "Fair is foul", "max_tokens": 6, "temperature": 0, "details": True},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    d = body["details"]
    assert len(d["token_ids"]) == len(d["logprobs"]) == body["usage"]["completion_tokens"]
    assert d["timings"]["e2e_s"] > 0 and d["timings"]["ttft_s"] is not None
    by_ids = httpx.post(
        server.url("/generate"),
        json={"input_ids": _tokenize(server, "Fair is foul"), "max_tokens": 6, "temperature": 0},
    )
    assert by_ids.json()["text"] == body["text"]


def test_generate_stream(server):
    with httpx.stream(
        "POST", server.url("/generate"), json={"text": "Hi", "max_tokens": 4, "stream": True}
    ) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and '"finish_reason":"' in lines[-2]


def test_tokenize_detokenize(server):
    text = "O Romeo, Romeo!"
    ids = _tokenize(server, text)
    assert httpx.post(server.url("/detokenize"), json={"tokens": ids}).json()["text"] == text
    chat = httpx.post(server.url("/tokenize"), json={"messages": [{"role": "user", "content": text}]}).json()
    assert chat["count"] == len(chat["tokens"]) > len(ids)


def test_health_ready_metrics(server):
    assert httpx.get(server.url("/health")).json() == {"status": "ok"}
    ready = httpx.get(server.url("/ready"))
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    metrics = httpx.get(server.url("/metrics")).text
    assert "textgen_http_requests_total" in metrics and "textgen_num_requests_running" in metrics
    assert 'route="/v1/completions"' in metrics


def test_a_lone_greedy_request_speculates_and_streams_the_same_text(server, client, model):
    """One greedy request alone: n-gram speculative steps (counted in /metrics); streamed pieces
    add up to the non-streamed text, which a sampled request's steps never touch."""

    def drafted() -> float:
        families = text_string_to_metric_families(httpx.get(server.url("/metrics")).text)
        return sum(
            s.value
            for f in families
            if f.name == "textgen_spec_decode_num_draft_tokens"
            for s in f.samples
            if s.name.endswith("_total")
        )

    before = drafted()
    prompt = "the king, the king, the king, the king"
    args = dict(model=model, prompt=prompt, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**args)
    pieces = client.completions.create(**args, stream=True)
    streamed = "".join(c.choices[0].text for c in pieces if c.choices)
    assert streamed == whole.choices[0].text and whole.usage.completion_tokens == 40
    assert drafted() > before  # the repeated prompt gives drafts from the first step
