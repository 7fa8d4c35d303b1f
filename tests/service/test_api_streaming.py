"""Streams whose outputs queue up in the HTTP process: several tokens per SSE event.

The real server with the fake engine in burst mode (``TEXTGEN_FAKE_BURST``): every engine step
emits 4 tokens per request as 4 outputs in one worker message, so the handler always finds
outputs of its stream already queued, as when the HTTP side falls behind the engine. (A client
that merely reads slowly does not get there on loopback: the kernel and uvicorn buffer megabytes
of events before the handler's writes block.) Every chunk must then carry the tokens of the
queued outputs, and the stream must still say exactly what the non-streaming answer says.
"""

from __future__ import annotations

import itertools
import json
import math
import time

import httpx
import pytest
from fakes import make_fake_bundle
from prometheus_client.parser import text_string_to_metric_families
from server_harness import start

BURST = 4
PROMPT = "Shall I compare thee"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("streaming")
    srv = start(
        make_fake_bundle(tmp / "bundle"), tmp / "server.log", fake=True, TEXTGEN_FAKE_BURST=str(BURST)
    )
    yield srv
    assert srv.stop() == 0, srv.log()


def _seeded(model: str, **kw) -> dict:
    return dict(model=model, prompt=PROMPT, max_tokens=40, temperature=1.0, seed=7, **kw)


def test_joined_stream_says_what_the_whole_answer_says(client, model):
    whole = client.completions.create(**_seeded(model))
    chunks = list(
        client.completions.create(**_seeded(model), stream=True, stream_options={"include_usage": True})
    )
    tokens = whole.usage.completion_tokens
    with_text = [c for c in chunks if c.choices and c.choices[0].text]
    assert "".join(c.choices[0].text for c in with_text) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert tokens > BURST and len(with_text) <= math.ceil(tokens / BURST) < tokens


def test_completion_logprobs_have_one_entry_per_token(client, model):
    whole = client.completions.create(**_seeded(model, logprobs=2)).choices[0].logprobs
    lps = [
        c.choices[0].logprobs for c in client.completions.create(**_seeded(model, logprobs=2), stream=True)
    ]
    for lp in lps:
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        gaps = [b - a for a, b in itertools.pairwise(lp.text_offset)]
        assert gaps == [len(t) for t in lp.tokens[:-1]]
    assert max(len(lp.tokens) for lp in lps) > 1
    assert [t for lp in lps for t in lp.tokens] == whole.tokens
    assert [v for lp in lps for v in lp.token_logprobs] == whole.token_logprobs


def test_chat_logprobs_have_one_entry_per_token(client, model):
    kw = dict(
        model=model,
        messages=[{"role": "user", "content": "Speak, friend."}],
        max_tokens=30,
        temperature=1.0,
        seed=3,
        logprobs=True,
        top_logprobs=2,
    )
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    contents = [c.choices[0].logprobs.content for c in chunks if c.choices and c.choices[0].logprobs]
    assert max(len(content) for content in contents) > 1
    streamed = [e for content in contents for e in content]
    assert len(streamed) == chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [(e.token, e.logprob) for e in streamed] == [
        (e.token, e.logprob) for e in whole.choices[0].logprobs.content
    ]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        whole.choices[0].message.content
    )


def test_choices_are_joined_separately(client, model):
    kw = _seeded(model, n=3, logprobs=0)  # logprobs: every chunk says how many tokens it carries
    whole = client.completions.create(**kw)
    texts: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    ends: dict[int, list[bool]] = {}  # per choice, whether each of its chunks had a finish_reason
    usage = None
    for chunk in client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            tokens.setdefault(c.index, []).extend(c.logprobs.tokens)
            ends.setdefault(c.index, []).append(c.finish_reason is not None)
    assert [texts[i] for i in range(3)] == [c.text for c in whole.choices]
    assert [tokens[i] for i in range(3)] == [c.logprobs.tokens for c in whole.choices]
    assert all(e[-1] and not any(e[:-1]) for e in ends.values())
    assert usage.model_dump() == whole.usage.model_dump()
    for i, c in enumerate(whole.choices):
        assert len(ends[i]) <= math.ceil(len(c.logprobs.tokens) / BURST) < len(c.logprobs.tokens)


def test_generate_stream_chunks_carry_every_token_id(server):
    body = {"text": PROMPT, "max_tokens": 40, "temperature": 1.0, "seed": 5, "details": True}
    whole = httpx.post(server.url("/generate"), json=body).json()
    with httpx.stream("POST", server.url("/generate"), json={**body, "stream": True}) as r:
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    ids = [t for c in chunks for t in c["token_ids"]]
    assert ids == whole["details"]["token_ids"] and len(ids) == chunks[-1]["usage"]["completion_tokens"]
    assert "".join(c["text"] for c in chunks) == whole["text"] and len(chunks) < len(ids)


def _counters(server) -> dict[str, float]:
    text = httpx.get(server.url("/metrics")).text
    want = {
        "textgen_inter_token_latency_seconds_count",
        "textgen_generation_tokens_total",
        "textgen_requests_finished_total",
    }
    got = dict.fromkeys(want, 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in want:
                got[s.name] += s.value
    return got


def test_a_joined_chunk_still_counts_every_token_in_the_metrics(server, client, model):
    before = _counters(server)
    chunks = list(
        client.completions.create(**_seeded(model), stream=True, stream_options={"include_usage": True})
    )
    tokens = chunks[-1].usage.completion_tokens
    finished = before["textgen_requests_finished_total"] + 1
    deadline = time.monotonic() + 10  # the request is recorded when its response closed
    while (after := _counters(server))["textgen_requests_finished_total"] < finished:
        assert time.monotonic() < deadline, "the request was never recorded"
        time.sleep(0.05)
    assert after["textgen_generation_tokens_total"] - before["textgen_generation_tokens_total"] == tokens
    itl = (
        after["textgen_inter_token_latency_seconds_count"]
        - before["textgen_inter_token_latency_seconds_count"]
    )
    assert itl == tokens - 1
