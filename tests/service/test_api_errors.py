"""Every error case through a real server: status, body shape, the field named, headers.

The fake engine (slow steps, 2 running + 2 waiting) makes a full queue and a server-side
timeout easy to reach; an API key and a small body limit are set.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import openai
import pytest
from fakes import make_fake_bundle
from server_harness import start

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 4096
STEP_S = 0.02
TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    srv = start(
        make_fake_bundle(tmp / "bundle"),
        tmp / "server.log",
        fake=True,
        TEXTGEN_API_KEY=KEY,
        TEXTGEN_MAX_BODY_BYTES=str(BODY_LIMIT),
        TEXTGEN_MAX_RUNNING="2",
        TEXTGEN_MAX_WAITING="2",
        TEXTGEN_FAKE_STEP_S=str(STEP_S),
        TEXTGEN_REQUEST_TIMEOUT_S=str(TIMEOUT_S),
    )
    yield srv
    assert srv.stop() == 0, srv.log()


def post(server, path: str, body, headers=AUTH, **kw) -> httpx.Response:
    if isinstance(body, (dict, list)):
        return httpx.post(server.url(path), json=body, headers=headers, timeout=30, **kw)
    return httpx.post(server.url(path), content=body, headers=headers, timeout=30, **kw)


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def wait_idle(server, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = httpx.get(server.url("/ready")).json()
        if body["running"] == 0 and body["waiting"] == 0 and body["inflight"] == 0:
            return body
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {body}")


# -- before the engine ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/generate", "/tokenize"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_api_key_required(server, path, headers):
    err = error(post(server, path, {"prompt": "x"}, headers=headers), 401)
    assert err["type"] == "authentication_error"


def test_401_comes_before_the_body_is_read(server):
    r = post(server, "/v1/completions", b"x" * (BODY_LIMIT * 2), headers={})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_open_routes_need_no_key(server):
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(server.url(path)).status_code == 200


def test_models_needs_the_key(server):
    assert httpx.get(server.url("/v1/models")).status_code == 401
    assert httpx.get(server.url("/v1/models"), headers=AUTH).status_code == 200


def test_body_too_large(server):
    big = {"prompt": "x" * BODY_LIMIT}
    err = error(post(server, "/v1/completions", big), 413)
    assert str(BODY_LIMIT) in err["message"]

    def chunks():  # no Content-Length: the limit applies while reading
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    error(post(server, "/v1/completions", chunks()), 413)


@pytest.mark.parametrize(
    "body", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"text"', b"[" * 2000 + b"]" * 2000]
)
def test_malformed_json_is_400(server, body):
    err = error(
        post(server, "/v1/completions", body, headers={**AUTH, "Content-Type": "application/json"}), 400
    )
    assert err["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 100_000}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "stop": ["s"] * 500}, "stop"),
        ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 200}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
        ("/v1/completions", {"prompt": "x", "suffix": "end"}, "suffix"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
            "tool_choice",
        ),
        ("/v1/completions", {"prompt": "x", "guided_regex": "[a-"}, "guided_regex"),
        ("/v1/completions", {"prompt": [1, 99999]}, "prompt"),
        ("/v1/completions", {"prompt": "x", "stop_token_ids": [99999]}, "stop_token_ids"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ("/v1/chat/completions", {"messages": "hello"}, "messages"),
        ("/generate", {"text": "x", "input_ids": [1]}, "text"),
        ("/detokenize", {"tokens": ["a"]}, "tokens.0"),
    ],
)
def test_validation_is_400_naming_the_field_and_422_on_native_routes(server, path, body, param):
    native = not path.startswith("/v1/")  # /generate, /tokenize, /detokenize keep TGI's 422
    err = error(post(server, path, body), 422 if native else 400)
    assert err["param"] == param and param.split(".")[0] in err["message"]


def test_unknown_model_is_404_as_openai_answers(server):
    err = error(post(server, "/v1/completions", {"prompt": "x", "model": "other"}), 404)
    assert err["param"] == "model" and err["code"] == "model_not_found" and "other" in err["message"]
    err = error(httpx.get(server.url("/v1/models/other"), headers=AUTH), 404)
    assert err["code"] == "model_not_found"
    card = httpx.get(server.url("/v1/models/fake-tiny"), headers=AUTH)
    assert card.status_code == 200 and card.json()["id"] == "fake-tiny"


def test_context_overflow_is_400_with_both_lengths(server):
    err = error(post(server, "/v1/completions", {"prompt": [5] * 100, "max_tokens": 50}), 400)
    assert err["code"] == "context_length_exceeded"
    assert "100" in err["message"] and "50" in err["message"] and "128" in err["message"]


def test_unknown_route_and_method(server):
    error(httpx.get(server.url("/v1/nothing")), 404)
    error(httpx.get(server.url("/v1/completions"), headers=AUTH), 405)


def test_openai_client_sees_typed_errors(server):
    client = openai.OpenAI(base_url=server.url("/v1"), api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="fake-tiny", prompt="x", max_tokens=-1)
    with pytest.raises(openai.NotFoundError, match="model"):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="fake-tiny", prompt=[5] * 120, max_tokens=20)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url("/v1"), api_key="bad", max_retries=0).models.list()


# -- in the engine -------------------------------------------------------------------------------


def wait_gauge(server, name: str, value: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(server.url("/ready")).json()[name] < value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.01)


def test_queue_full_is_429_with_retry_after(server):
    wait_idle(server)
    long = {"prompt": "x", "max_tokens": 60, "temperature": 0}
    with cf.ThreadPoolExecutor(4) as pool:  # fill 2 running slots, then the 2 waiting places
        busy = [pool.submit(post, server, "/v1/completions", long) for _ in range(2)]
        wait_gauge(server, "running", 2)
        busy += [pool.submit(post, server, "/v1/completions", long) for _ in range(2)]
        wait_gauge(server, "waiting", 2)
        r = post(server, "/v1/completions", long)
        err = error(r, 429)
        assert err["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
        streamed = post(server, "/v1/completions", {**long, "stream": True})
        error(streamed, 429)  # a refused stream gets a real status, not 200 + an empty body
        assert all(f.result().status_code == 200 for f in busy)
    metrics = httpx.get(server.url("/metrics")).text
    assert 'textgen_requests_rejected_total{model="fake-tiny",reason="queue_full"}' in metrics


def test_server_side_timeout_finishes_with_length(server):
    wait_idle(server)
    t0 = time.monotonic()
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 120, "temperature": 0})
    elapsed = time.monotonic() - t0
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert 0 < body["usage"]["completion_tokens"] < 120
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 1.0
    wait_idle(server)


def test_timeout_in_a_stream(server):
    wait_idle(server)
    with httpx.stream(
        "POST",
        server.url("/v1/completions"),
        json={"prompt": "x", "max_tokens": 120, "stream": True},
        headers=AUTH,
    ) as r:
        events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_no_admission_delay_at_capacity(server):
    """A request waiting for a slot starts as soon as one frees (LitServe's loop waited up to 1 s)."""
    wait_idle(server)
    done: dict[str, float] = {}

    def run(name: str, max_tokens: int) -> None:
        r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": max_tokens, "temperature": 0})
        assert r.status_code == 200, r.text
        done[name] = time.monotonic()

    with cf.ThreadPoolExecutor(3) as pool:
        longs = [pool.submit(run, f"long{i}", 30) for i in range(2)]
        wait_gauge(server, "running", 2)
        short = pool.submit(run, "short", 5)
        for f in [*longs, short]:
            f.result()
    first_free = min(done["long0"], done["long1"])
    assert done["short"] - first_free < 5 * STEP_S + 0.3


def test_prompts_are_not_logged(server):
    secret = "SECRET-PROMPT-TEXT"
    r = post(server, "/v1/completions", {"prompt": secret, "max_tokens": 2})
    assert r.status_code == 200
    assert secret not in server.log()
