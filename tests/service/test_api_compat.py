"""OpenAI compatibility as real clients use it: the official ``openai`` client, synchronous and
asynchronous, against the real engine (docs/api.md "Compatibility").

Status classes as OpenAI's API has them, unknown fields ignored, several prompts per request,
echo with prompt log-probabilities and scoring (``max_tokens: 0``), ``logit_bias``,
``/v1/models/{id}``, vLLM's tokenizer routes, ``X-Request-Id`` and CORS.
"""

from __future__ import annotations

import asyncio
import math
import re
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import start

ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def server(random_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compat")
    srv = start(
        random_bundle,
        tmp / "server.log",
        fake=False,
        TEXTGEN_MAX_RUNNING="16",
        TEXTGEN_CORS_ALLOW_ORIGINS=ORIGIN,
    )
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture
def aclient(server):
    """A factory: an AsyncOpenAI client belongs to the event loop it is used in (one per asyncio.run)."""
    return lambda: openai.AsyncOpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=60)


def tokenize(server, text: str) -> list[int]:
    return httpx.post(server.url("/tokenize"), json={"prompt": text}).json()["tokens"]


def metric(server, name: str, **labels: str) -> float:
    body = httpx.get(server.url("/metrics")).text
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


GREEDY = dict(temperature=0, max_tokens=6)


# -- status codes ---------------------------------------------------------------------------------


def test_invalid_requests_are_bad_request_errors(client, model):
    cases = [
        (dict(prompt="x", temperature=5), "temperature"),
        (dict(prompt="x", max_tokens=10**6), "max_tokens"),
        (dict(prompt="x", suffix="tail"), "suffix"),
        (dict(prompt="x", best_of=3), "best_of"),
        (dict(prompt="x", logit_bias={"1": 1000}), "logit_bias"),
        (dict(prompt="x", extra_body={"top_k": -1}), "top_k"),
    ]
    for kwargs, field in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=model, **kwargs)
        assert e.value.status_code == 400 and field in str(e.value.body), kwargs
        assert e.value.body["param"] == field
    with pytest.raises(openai.BadRequestError, match="tool_choice"):  # "auto" needs a tool-call parser
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        )
    with pytest.raises(openai.BadRequestError, match="functions"):
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            functions=[{"name": "f", "parameters": {"type": "object"}}],
        )


def test_unknown_model_is_not_found(client, model):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="x")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_async_client_sees_the_same_classes(aclient, model):
    async def run():
        async with aclient() as c:
            with pytest.raises(openai.BadRequestError):
                await c.completions.create(model=model, prompt="x", top_p=0)
            with pytest.raises(openai.NotFoundError):
                await c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])

    asyncio.run(run())


# -- unknown fields -------------------------------------------------------------------------------


def test_unknown_fields_are_ignored_logged_once_and_counted(server, client, model):
    before = metric(server, "textgen_ignored_request_fields_total", field="my_client_flag")
    kw = dict(model=model, prompt="To be", **GREEDY)
    plain = client.completions.create(**kw)
    for _ in range(2):
        r = client.completions.create(**kw, extra_body={"my_client_flag": True, "metadata": {"a": "b"}})
        assert r.choices[0].text == plain.choices[0].text
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi", "my_message_note": 1}],
        max_tokens=2,
        store=False,
        extra_body={"my_client_flag": 1},
    )
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert metric(server, "textgen_ignored_request_fields_total", field="my_client_flag") == before + 3
    assert metric(server, "textgen_ignored_request_fields_total", field="messages.my_message_note") >= 1
    log = server.log()
    assert log.count("ignoring the unknown request field 'my_client_flag'") == 1
    assert "ignoring the unknown request field 'store'" in log


# -- several prompts ------------------------------------------------------------------------------


def test_several_prompts_with_n_choices_each_in_openai_order(server, client, model):
    prompts = ["To be, or not", "Shall I compare thee", "Now is the winter"]
    alone = [client.completions.create(model=model, prompt=p, **GREEDY).choices[0].text for p in prompts]
    r = client.completions.create(model=model, prompt=prompts, n=2, **GREEDY)
    assert [c.index for c in r.choices] == list(range(6))
    assert [c.text for c in r.choices] == [t for t in alone for _ in range(2)]  # index = prompt * n + choice
    assert r.usage.prompt_tokens == sum(len(tokenize(server, p)) for p in prompts)
    assert 0 < r.usage.completion_tokens <= 6 * 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    ids = [tokenize(server, p) for p in prompts]
    by_ids = client.completions.create(model=model, prompt=ids, **GREEDY)
    assert [c.text for c in by_ids.choices] == alone


def test_several_prompts_stream_interleaved_by_index(client, model):
    prompts = ["To be, or not", "Now is the winter"]
    whole = client.completions.create(model=model, prompt=prompts, n=2, **GREEDY)
    texts: dict[int, str] = {}
    finished = set()
    for chunk in client.completions.create(model=model, prompt=prompts, n=2, stream=True, **GREEDY):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1, 2, 3}
    assert [texts[i] for i in range(4)] == [c.text for c in whole.choices]


def test_too_many_choices_name_the_limit(client, model):
    with pytest.raises(openai.BadRequestError, match="choices exceeds the limit"):
        client.completions.create(model=model, prompt=["a"] * 20, n=16, max_tokens=1)


# -- echo and prompt log-probabilities ------------------------------------------------------------


def test_echo_scores_the_prompt_as_the_decoder_generated_it(server, client, model):
    """Scoring prompt + its own greedy continuation gives the continuation's logprobs exactly as
    generation reported them: the scoring path and the decode path agree."""
    prompt = tokenize(server, "Shall I compare thee")
    gen = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=8, logprobs=1)
    gen_lp = gen.choices[0].logprobs.token_logprobs
    gen_ids = _generated_ids(server, prompt)  # the ids themselves: re-tokenized text may differ
    assert len(gen_ids) == len(gen_lp)
    scored = client.completions.create(
        model=model, prompt=prompt + gen_ids, echo=True, max_tokens=0, logprobs=1, temperature=0
    )
    c = scored.choices[0]
    lp = c.logprobs
    assert c.finish_reason == "length" and scored.usage.completion_tokens == 0
    assert len(lp.tokens) == len(prompt) + len(gen_ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    for got, want in zip(lp.token_logprobs[len(prompt) :], gen_lp, strict=True):
        assert math.isclose(got, want, abs_tol=1e-4)
    # greedy tokens are the top alternative at their position
    for k in range(len(prompt), len(lp.tokens)):
        assert math.isclose(max(lp.top_logprobs[k].values()), lp.token_logprobs[k], abs_tol=1e-6)
    assert c.text == httpx.post(server.url("/detokenize"), json={"tokens": prompt + gen_ids}).json()["prompt"]


def _generated_ids(server, prompt: list[int]) -> list[int]:
    r = httpx.post(
        server.url("/generate"), json={"input_ids": prompt, "max_tokens": 8, "temperature": 0, "details": True}
    )
    return r.json()["details"]["token_ids"]


def test_echo_with_generation_and_offsets(client, model):
    text = "To be, or not"
    plain = client.completions.create(model=model, prompt=text, logprobs=2, **GREEDY).choices[0]
    echoed = client.completions.create(model=model, prompt=text, echo=True, logprobs=2, **GREEDY).choices[0]
    assert echoed.text == text + plain.text
    lp, n_new = echoed.logprobs, len(plain.logprobs.tokens)
    assert lp.tokens[-n_new:] == plain.logprobs.tokens
    assert lp.token_logprobs[-n_new:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    # offsets of the new tokens count from the end of the echoed prompt
    assert lp.text_offset[-n_new:] == [len(text) + o for o in plain.logprobs.text_offset]
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    no_lp = client.completions.create(model=model, prompt=text, echo=True, **GREEDY).choices[0]
    assert no_lp.text == echoed.text and no_lp.logprobs is None


def test_echo_streams_the_prompt_first(client, model):
    text = "Now is the winter"
    whole = client.completions.create(model=model, prompt=[text, text], echo=True, **GREEDY)
    chunks = list(client.completions.create(model=model, prompt=[text, text], echo=True, stream=True, **GREEDY))
    firsts: dict[int, str] = {}
    joined: dict[int, str] = {}
    for ch in chunks:
        for c in ch.choices:
            firsts.setdefault(c.index, c.text)
            joined[c.index] = joined.get(c.index, "") + c.text
    assert all(f.startswith(text) for f in firsts.values())
    assert [joined[i] for i in range(2)] == [c.text for c in whole.choices]
    scoring = list(
        client.completions.create(model=model, prompt=text, echo=True, max_tokens=0, logprobs=0, stream=True)
    )
    texts = [c.text for ch in scoring for c in ch.choices]
    assert "".join(texts) == text and scoring[-1].choices[0].finish_reason == "length"


def test_async_batched_scoring(server, aclient, model):
    prompts = ["To be, or not", "Now is the winter of our"]

    async def run():
        async with aclient() as c:
            return await asyncio.gather(
                c.completions.create(model=model, prompt=prompts, echo=True, max_tokens=0, logprobs=0),
                *(c.completions.create(model=model, prompt=p, echo=True, max_tokens=0, logprobs=0) for p in prompts),
            )

    batched, *alone = asyncio.run(run())
    for c, single in zip(batched.choices, alone, strict=True):
        assert c.text == single.choices[0].text
        assert c.logprobs.token_logprobs == pytest.approx(single.choices[0].logprobs.token_logprobs, abs=1e-5)


# -- logit_bias -----------------------------------------------------------------------------------


def test_logit_bias_on_both_endpoints(server, client, model):
    target = tokenize(server, "the")[-1]
    text = httpx.post(server.url("/detokenize"), json={"tokens": [target]}).json()["text"]
    r = client.completions.create(model=model, prompt="x", logit_bias={str(target): 100}, extra_body={"ignore_eos": True}, **GREEDY)
    assert r.choices[0].text == text * 6
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        logit_bias={str(target): 100},
        max_tokens=4,
        temperature=0.9,
        seed=1,
    )
    assert chat.choices[0].message.content == text * 4
    plain = client.completions.create(model=model, prompt="To be", **GREEDY).choices[0]
    first = _generated_ids(server, tokenize(server, "To be"))[0]
    banned = client.completions.create(model=model, prompt="To be", logit_bias={str(first): -100}, **GREEDY)
    assert banned.choices[0].text != plain.text


def test_async_logit_bias_and_batched_prompts(server, aclient, model):
    target = tokenize(server, "the")[-1]
    text = httpx.post(server.url("/detokenize"), json={"tokens": [target]}).json()["text"]

    async def run():
        async with aclient() as c:
            return await c.completions.create(
                model=model, prompt=["To be", "Now is"], n=2, logit_bias={str(target): 100},
                extra_body={"ignore_eos": True}, **GREEDY,
            )  # fmt: skip

    r = asyncio.run(run())
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.text == text * 6 for c in r.choices)


# -- routes, headers --------------------------------------------------------------------------------


def test_tokenizer_routes_take_vllm_names(server):
    a = httpx.post(server.url("/tokenize"), json={"prompt": "To be"}).json()
    b = httpx.post(server.url("/tokenize"), json={"text": "To be"}).json()
    assert a == b and a["count"] == len(a["tokens"])
    d = httpx.post(server.url("/detokenize"), json={"tokens": a["tokens"]}).json()
    assert d["prompt"] == d["text"] == "To be"
    info = httpx.get(server.url("/tokenizer_info")).json()
    assert info["eos_token_id"] >= 0 and isinstance(info["eos_token"], str)
    assert info["model_max_length"] == httpx.get(server.url("/v1/models")).json()["data"][0]["max_model_len"]
    both = httpx.post(server.url("/tokenize"), json={"prompt": "a", "text": "b"})
    assert both.status_code == 422 and "exactly one" in both.json()["error"]["message"]


def test_request_id_is_echoed_and_logged(server, model):
    body = {"model": model, "prompt": "To be", "max_tokens": 2}
    r = httpx.post(server.url("/v1/completions"), json=body, headers={"X-Request-Id": "trace-abc.123"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-abc.123"
    deadline = time.monotonic() + 10
    while not re.search(r"trace-abc\.123 cmpl-\S+ /v1/completions status=200", server.log()):
        assert time.monotonic() < deadline, "the request id never reached the log line"
        time.sleep(0.05)
    made = httpx.post(server.url("/v1/completions"), json=body).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    bad = httpx.post(server.url("/v1/completions"), json=body, headers={"X-Request-Id": "x" * 500})
    assert re.fullmatch(r"[0-9a-f]{32}", bad.headers["x-request-id"])  # unsafe ids are replaced
    err = httpx.post(server.url("/v1/completions"), json={"prompt": 5}, headers={"X-Request-Id": "e-1"})
    assert err.status_code == 400 and err.headers["x-request-id"] == "e-1"
    with httpx.stream("POST", server.url("/v1/completions"), json={**body, "stream": True},
                      headers={"X-Request-Id": "s-1"}) as s:
        assert s.headers["x-request-id"] == "s-1"


def test_cors_when_configured(server):
    pre = httpx.options(
        server.url("/v1/completions"),
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(server.url("/v1/models"), headers={"Origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    other = httpx.get(server.url("/v1/models"), headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_idle_keep_alive_connection_outlives_uvicorns_five_seconds(server):
    """uvicorn closes idle connections after 5 s by default; a client pool (or a load balancer)
    that reuses one just then gets a connection reset. The server keeps them 75 s
    (TEXTGEN_KEEP_ALIVE_S); 6 s of idleness (the behaviour under test, not a synchronization)
    must leave the connection usable."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", "/health")
        assert conn.getresponse().read() and conn.sock is not None
        time.sleep(6)
        conn.request("GET", "/health")  # the same socket: http.client reconnects only if it was closed
        r = conn.getresponse()
        assert r.status == 200 and r.read()
        assert conn.sock is not None
    finally:
        conn.close()
