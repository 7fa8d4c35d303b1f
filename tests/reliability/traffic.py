"""Mixed client traffic for the reliability tests: request bodies, sending, and strict checks.

``make_call`` draws one request from a seeded mix: three routes (OpenAI completions and chat,
native /generate), streaming or not, greedy or sampled (seeded), n = 1 or 2, short outputs, with
or without stop strings, logprobs, usage in the stream. ``send`` performs it with httpx and
``check`` verifies that the answer is complete and well formed: OpenAI routes are validated with
the ``openai`` package's own response types, every SSE stream must end with ``[DONE]`` and give
each choice exactly one finish reason, token counts must agree with ``max_tokens``.
Greedy requests use a few fixed (route, prompt, max_tokens) combinations, so that their text can
be compared with what the same request gets when it runs alone (``reference_texts``).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import httpx
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from relkit import Sse, parse_sse

from service.http.protocol import CompletionResponse, GenerateChunk, GenerateResponse

ROUTES = ("/v1/completions", "/v1/chat/completions", "/generate")
PROMPTS = (
    "To be, or not to be,",
    "O Romeo, Romeo! wherefore art thou",
    "Now is the winter of our discontent",
    "All the world's a stage, and all the men and women merely players;",
    "Friends, Romans, countrymen, lend me your ears",
    "Shall I compare thee",
)
GREEDY_MAX_TOKENS = (4, 12)


@dataclass(frozen=True)
class Call:
    route: str
    body: dict
    greedy_key: tuple[str, int, int] | None = None  # (route, prompt index, max_tokens)

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def n(self) -> int:
        return int(self.body.get("n", 1))

    @property
    def max_tokens(self) -> int:
        return int(self.body.get("max_tokens", 16))


@dataclass
class Result:
    call: Call
    status: int
    latency: float  # seconds from sending to the end of the body
    body: object = None  # the JSON body (or the parsed stream) as received
    headers: dict[str, str] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)  # one per choice
    problem: str | None = None  # why the answer is not complete and well formed


def prompt_body(route: str, prompt: str) -> dict:
    if route == "/v1/chat/completions":
        return {"messages": [{"role": "user", "content": prompt}]}
    if route == "/generate":
        return {"text": prompt}
    return {"prompt": prompt}


def greedy_call(route: str, prompt_index: int, max_tokens: int, stream: bool = False) -> Call:
    body = {**prompt_body(route, PROMPTS[prompt_index]), "max_tokens": max_tokens, "temperature": 0}
    if stream:
        body["stream"] = True
    return Call(route, body, (route, prompt_index, max_tokens))


def make_call(rng: random.Random) -> Call:
    """One request of the mix: about a third greedy, streaming half of the time."""
    route = rng.choice(ROUTES)
    stream = rng.random() < 0.5
    if rng.random() < 0.35:
        return greedy_call(route, rng.randrange(len(PROMPTS)), rng.choice(GREEDY_MAX_TOKENS), stream)
    body = prompt_body(route, rng.choice(PROMPTS))
    body["max_tokens"] = rng.randint(1, 16)
    body["temperature"] = rng.choice([0.5, 0.8, 1.0, 1.3])
    body["seed"] = rng.randrange(2**31)
    if rng.random() < 0.3:
        body["top_p"] = rng.choice([0.5, 0.9])
    if rng.random() < 0.3:
        body["top_k"] = rng.choice([5, 40])
    if rng.random() < 0.2:
        body["stop"] = [rng.choice(["\n", "the", "e"])]
    if rng.random() < 0.2:
        body["repetition_penalty"] = 1.2
    if stream:
        body["stream"] = True
    if route == "/generate":
        body["details"] = rng.random() < 0.5
    else:
        if rng.random() < 0.3:
            body["n"] = 2
        if stream and rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        if rng.random() < 0.2:
            if route == "/v1/completions":
                body["logprobs"] = 2
            else:
                body["logprobs"], body["top_logprobs"] = True, 2
    return Call(route, body)


async def send(client: httpx.AsyncClient, call: Call, validate: bool = True) -> Result:
    """Perform ``call``; network errors propagate (a test counts them as failures). Without
    ``validate``, call ``validate_result`` later (keeps the client's CPU time out of latencies)."""
    t0 = time.monotonic()
    if call.stream:
        async with client.stream("POST", call.route, json=call.body) as r:
            if r.status_code != 200:
                await r.aread()
                return Result(call, r.status_code, time.monotonic() - t0, _json(r), dict(r.headers))
            lines = [line async for line in r.aiter_lines()]
        res = Result(call, 200, time.monotonic() - t0, parse_sse(lines), dict(r.headers))
    else:
        r = await client.post(call.route, json=call.body)
        res = Result(call, r.status_code, time.monotonic() - t0, _json(r), dict(r.headers))
        if r.status_code != 200:
            return res
    return validate_result(res) if validate else res


def validate_result(res: Result) -> Result:
    """Fill ``texts`` (or ``problem``) of a 200 result."""
    if res.status == 200 and not res.texts and res.problem is None:
        try:
            res.texts = check(res.call, res.body)
        except (AssertionError, ValueError) as e:
            res.problem = f"{type(e).__name__}: {e}"
    return res


def _json(r: httpx.Response) -> object:
    try:
        return r.json()
    except ValueError:
        return r.text


def check(call: Call, body: object) -> list[str]:
    """The texts of every choice, after checking that the 200 answer is complete and well formed."""
    if call.stream:
        assert isinstance(body, Sse)
        assert not body.errors, f"stream ended with an error: {body.errors}"
        assert body.done, "stream did not end with data: [DONE]"
        texts = _check_stream(call, body.data)
    else:
        assert isinstance(body, dict), body
        texts = _check_body(call, body)
    return texts


def _check_body(call: Call, body: dict) -> list[str]:
    n, max_tokens = call.n, call.max_tokens
    if call.route == "/generate":
        g = GenerateResponse.model_validate(body)
        _check_counts([g.finish_reason], g.usage.completion_tokens, max_tokens)
        if call.body.get("details"):
            assert g.details is not None and len(g.details.token_ids) == g.usage.completion_tokens
        return [g.text]
    if call.route == "/v1/completions":
        c = Completion.model_validate(body)
        assert c.object == "text_completion"
        texts = _by_index([(ch.index, ch.text) for ch in c.choices], n)
        if call.body.get("logprobs") is not None:
            for ch in c.choices:
                assert ch.logprobs is not None and len(ch.logprobs.tokens or []) >= 1
    else:
        c = ChatCompletion.model_validate(body)
        assert c.object == "chat.completion"
        assert all(ch.message.role == "assistant" for ch in c.choices)
        texts = _by_index([(ch.index, ch.message.content or "") for ch in c.choices], n)
        if call.body.get("logprobs"):
            for ch in c.choices:
                assert ch.logprobs is not None and ch.logprobs.content is not None
    assert c.usage is not None
    _check_counts([ch.finish_reason for ch in c.choices], c.usage.completion_tokens, max_tokens)
    return texts


def _check_stream(call: Call, chunks: list[dict]) -> list[str]:
    n, max_tokens = call.n, call.max_tokens
    parts: list[list[str]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    usage = None
    for raw in chunks:
        if call.route == "/generate":
            g = GenerateChunk.model_validate(raw)
            assert reasons[0] is None, "a chunk after the final one"
            parts[0].append(g.text)
            if g.finish_reason is not None:
                reasons[0], usage = g.finish_reason, g.usage
                assert g.usage is not None, "the final /generate chunk has no usage"
            continue
        # openai's Completion type wants a finish reason in every choice: stream chunks are
        # checked with the service's own model (finish_reason null until the last chunk).
        c = (CompletionResponse if call.route == "/v1/completions" else ChatCompletionChunk).model_validate(
            raw
        )
        if not c.choices:  # the usage chunk (stream_options.include_usage)
            assert c.usage is not None and usage is None, raw
            usage = c.usage
            continue
        for ch in c.choices:
            assert 0 <= ch.index < n, raw
            assert reasons[ch.index] is None, f"choice {ch.index}: a chunk after its finish_reason"
            text = ch.text if call.route == "/v1/completions" else (ch.delta.content or "")
            parts[ch.index].append(text)
            if ch.finish_reason is not None:
                reasons[ch.index] = ch.finish_reason
    assert all(r in ("stop", "length") for r in reasons), f"finish reasons {reasons}"
    wants_usage = call.route == "/generate" or (call.body.get("stream_options") or {}).get("include_usage")
    if wants_usage:
        assert usage is not None, "no usage in the stream"
        _check_counts(reasons, usage.completion_tokens, max_tokens)
    return ["".join(p) for p in parts]


def _by_index(pairs: list[tuple[int, str]], n: int) -> list[str]:
    assert sorted(i for i, _ in pairs) == list(range(n)), f"choice indices {[i for i, _ in pairs]}, n={n}"
    return [t for _, t in sorted(pairs)]


def _check_counts(reasons: list, completion_tokens: int, max_tokens: int) -> None:
    assert all(r in ("stop", "length") for r in reasons), f"finish reasons {reasons}"
    n = len(reasons)
    assert completion_tokens <= n * max_tokens, f"{completion_tokens} tokens > {n} x {max_tokens}"
    if all(r == "length" for r in reasons):
        assert completion_tokens == n * max_tokens, f"finish 'length' with {completion_tokens} tokens"


def reference_texts(base_url: str) -> dict[tuple[str, int, int], str]:
    """Each greedy (route, prompt, max_tokens) of the mix, sent alone, one after the other."""
    refs = {}
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for route in ROUTES:
            for i in range(len(PROMPTS)):
                for max_tokens in GREEDY_MAX_TOKENS:
                    call = greedy_call(route, i, max_tokens)
                    r = client.post(route, json=call.body)
                    assert r.status_code == 200, r.text
                    refs[call.greedy_key] = check(call, r.json())[0]
    return refs
