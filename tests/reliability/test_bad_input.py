"""Bad input: a hand-written list of hostile requests, and schemathesis against /openapi.json.

Every hand-written case must get the expected 4xx with the OpenAI error shape, the offending
field named in the body, and must leave the service serving (a good request succeeds right
after each). schemathesis (CLI ``st run`` against the live schema, bounded examples, seeded)
checks that no input gives a 5xx and that responses conform to the schema; the checks whose
failures are known bugs are reported in separate tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from relkit import error_field

VOCAB = 512  # the tiny tokenizer (and the random bundle's)
CONTEXT = 256
ST_EXAMPLES = 20  # per operation and phase: ~1,000 requests in about 40 s
ST_SEED = 1


@pytest.fixture(scope="module")
def server(module_servers):
    return module_servers.launch()


def post(server, path: str, body: bytes | dict, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    return httpx.post(server.url(path), content=content, headers=headers, timeout=60, **kw)


def assert_still_serving(server) -> None:
    # ignore_eos: a sampled end-of-text token must not look like a server fault
    r = post(server, "/v1/completions", {"prompt": "To be", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text


def nested(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"


CMPL, CHAT, GEN = "/v1/completions", "/v1/chat/completions", "/generate"
MSG = [{"role": "user", "content": "hi"}]

# (id, route, body, expected status, a word the error body must contain: the field, or the problem)
CASES = [
    ("invalid-json", CMPL, b'{"prompt": "x",', 400, "JSON"),
    ("json-not-object", CMPL, b"[1, 2]", 400, "JSON object"),
    ("empty-body", CMPL, b"", 400, "JSON"),
    ("invalid-utf8", CMPL, b'{"prompt": "\xff\xfe"}', 400, "utf-8"),
    ("type-max_tokens-str", CMPL, {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("type-max_tokens-bool", CMPL, {"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ("type-prompt-int", CMPL, {"prompt": 123}, 400, "prompt"),
    ("type-stream-str", CMPL, {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("type-temperature-str", CMPL, {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("type-messages-str", CHAT, {"messages": "hello"}, 400, "messages"),
    ("type-role", CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("type-details", GEN, {"text": "x", "details": 1}, 422, "details"),
    ("missing-prompt", CMPL, {"max_tokens": 3}, 400, "prompt"),
    ("missing-messages", CHAT, {"max_tokens": 3}, 400, "messages"),
    ("missing-content", CHAT, {"messages": [{"role": "user"}]}, 400, "content"),
    ("missing-text", GEN, {"max_tokens": 3}, 422, "text"),
    ("logit_bias-out-of-range", CMPL, {"prompt": "x", "logit_bias": {"1": 500}}, 400, "logit_bias"),
    ("best_of-unsupported", CMPL, {"prompt": "x", "best_of": 2}, 400, "best_of"),
    ("tools-auto", CHAT, {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool_choice"),
    ("schema-unsupported", CMPL, {"prompt": "x", "guided_json": {"type": "string", "format": "uri-template"}}, 400, "uri-template"),
    ("regex-invalid", CMPL, {"prompt": "x", "guided_regex": "(a"}, 400, "guided_regex"),
    ("empty-token-prompt", CMPL, {"prompt": []}, 400, "prompt"),
    ("empty-messages", CHAT, {"messages": []}, 400, "messages"),
    ("empty-input_ids", GEN, {"input_ids": []}, 422, "input_ids"),
    ("prompt-over-context", CMPL, {"prompt": "to be or not " * 200}, 400, "prompt"),
    ("token-prompt-over-context", CMPL, {"prompt": [5] * (CONTEXT + 10)}, 400, "prompt"),
    ("prompt-plus-max-over-context", CMPL, {"prompt": [5] * 200, "max_tokens": 100}, 400, "prompt"),
    ("max_tokens-0", CMPL, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens-negative", CMPL, {"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("max_tokens-huge", CMPL, {"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ("max_tokens-bigint", CMPL, {"prompt": "x", "max_tokens": 10**40}, 400, "max_tokens"),
    ("max_completion_tokens-0", CHAT, {"messages": MSG, "max_completion_tokens": 0}, 400, "max_completion"),
    ("max_tokens-0-stream", CMPL, {"prompt": "x", "max_tokens": 0, "stream": True}, 400, "max_tokens"),
    ("temperature-negative", CMPL, {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("temperature-nan", CMPL, b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("temperature-inf", CMPL, b'{"prompt": "x", "temperature": Infinity}', 400, "temperature"),
    ("top_p-over-1", CMPL, {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("top_p-0", CHAT, {"messages": MSG, "top_p": 0}, 400, "top_p"),
    ("n-huge", CMPL, {"prompt": "x", "n": 10**6}, 400, "n"),
    ("n-huge-chat", CHAT, {"messages": MSG, "n": 10**6}, 400, "n"),
    ("n-0", CMPL, {"prompt": "x", "n": 0}, 400, "n"),
    ("stop-1000", CMPL, {"prompt": "x", "stop": [f"s{i}" for i in range(1000)]}, 400, "stop"),
    ("stop-too-long", CMPL, {"prompt": "x", "stop": ["x" * 10_000]}, 400, "stop"),
    ("token-id-over-vocab", CMPL, {"prompt": [1, VOCAB]}, 400, "prompt"),
    ("token-id-negative", CMPL, {"prompt": [-1]}, 400, "prompt"),
    ("token-id-bigint", CMPL, {"prompt": [10**30]}, 400, "prompt"),
    ("input_ids-over-vocab", GEN, {"input_ids": [10**6]}, 422, "input_ids"),
    ("stop_token_ids-over-vocab", CMPL, {"prompt": "x", "stop_token_ids": [VOCAB]}, 400, "stop_token_ids"),
    ("detokenize-over-vocab", "/detokenize", {"tokens": [VOCAB]}, 422, "tokens"),
    ("logprobs-over-limit", CMPL, {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("top_logprobs-without-logprobs", CHAT, {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    ("seed-negative", CMPL, {"prompt": "x", "seed": -1}, 400, "seed"),
    ("wrong-model", CMPL, {"prompt": "x", "model": "gpt-4"}, 404, "model"),
]

# Fixed since this suite found them (docs/reliability.md, "Bugs found"): each was a 500 or a
# wrong field name. Known bugs go in BUGS (case id -> reason): marked xfail(strict=True), so a
# fix turns them red until the mark is removed.
FOUND_AND_FIXED = [
    ("nested-100k-lists", CMPL, nested(100_000), 400, "prompt"),
    ("nested-100k-top-level", CMPL, b"[" * 100_000 + b"]" * 100_000, 400, "JSON"),
    ("lone-surrogate-prompt", CMPL, b'{"prompt": "abc\\ud800"}', 400, "prompt"),
    ("lone-surrogate-tokenize", "/tokenize", b'{"text": "abc\\ud800"}', 422, "text"),
    ("chat-prompt-over-context", CHAT, {"messages": [{"role": "user", "content": "to be " * 300}]}, 400, "messages"),
    ("empty-prompt", CMPL, {"prompt": ""}, 400, "prompt"),
    ("empty-text", GEN, {"text": ""}, 422, "text"),
]  # fmt: skip
BUGS: dict[str, str] = {}


def _params(cases):
    for case in cases:
        marks = [pytest.mark.xfail(strict=True, reason=BUGS[case[0]])] if case[0] in BUGS else []
        yield pytest.param(*case[1:], id=case[0], marks=marks)


@pytest.mark.parametrize(("route", "body", "status", "named"), list(_params(CASES + FOUND_AND_FIXED)))
def test_bad_request_is_refused_and_named(server, route, body, status, named):
    r = post(server, route, body)
    assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"].startswith("application/json")
    err = error_field(r.json())
    assert named.lower() in (err["message"] + " " + str(err["param"])).lower(), err
    assert_still_serving(server)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_10mb_body_is_413(server, chunked):
    big = b'{"prompt": "' + b"x" * (10 * 2**20) + b'"}'
    content: bytes | Iterator[bytes] = big
    if chunked:  # no Content-Length: the limit must hold while reading
        content = (big[i : i + 2**20] for i in range(0, len(big), 2**20))
    r = httpx.post(
        server.url(CMPL), content=content, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert r.status_code == 413, r.text[:300]
    err = error_field(r.json())
    assert "bytes" in err["message"] and err["code"] == "payload_too_large"
    assert_still_serving(server)


# -- schemathesis ---------------------------------------------------------------------------------

# schemathesis failure types (its JSON report), by what they mean here.
SERVER_ERRORS = {"ServerError", "ContentTypeServerError"}
CONFORMANCE = {
    "JsonSchemaError",
    "UndefinedStatusCode",
    "MissingHeaders",
    "MalformedJson",
    "ContentDeserializationError",
    "MalformedMediaType",
    "MissingContentType",
}
CONTENT_TYPE = {"UndefinedContentType"}
VALIDATION_MISMATCH = {"AcceptedNegativeData", "RejectedPositiveData"}
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
    "response_headers_conformance,positive_data_acceptance,negative_data_rejection"
)


@pytest.fixture(scope="module")
def fuzz(server, tmp_path_factory, record) -> dict:
    """One schemathesis run over every operation; its JSON report and console output."""
    work = tmp_path_factory.mktemp("schemathesis")  # st keeps a cache in its working directory
    # prompt + max_tokens over the context (and prompts x n over the choice limit) is a 400 that no
    # JSON Schema can express: a schema-valid request may get it. 404 is not expected: the schema
    # names the served model, so a schema-valid request never asks for another.
    (work / "schemathesis.toml").write_text(
        '[checks.positive_data_acceptance]\nexpected-statuses = ["2xx", "3xx", "400", "401", "403", '
        '"409", "429", "5xx"]\n'
    )
    st = Path(sys.executable).parent / "st"
    cmd = [str(st), "--config-file", str(work / "schemathesis.toml"), "run", server.url("/openapi.json")]
    cmd += ["--max-examples", str(ST_EXAMPLES)]
    cmd += ["--seed", str(ST_SEED), "--checks", CHECKS, "--continue-on-failure", "--no-shrink"]
    cmd += ["--request-timeout", "60", "--warnings", "off", "--output-sanitize", "false"]
    cmd += ["--report", "json", "--report-json-path", str(work / "report.json")]
    r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600)
    assert (work / "report.json").is_file(), f"schemathesis did not run:\n{r.stdout[-3000:]}\n{r.stderr}"
    report = json.loads((work / "report.json").read_text())
    assert report["operations"]["tested"] >= 9 and not report["errors"], r.stdout[-3000:]
    failures = {f["type"]: f for f in report["failures"]}
    record(
        "schemathesis",
        operations=report["operations"]["tested"],
        test_cases=report["test_cases"]["generated"],
        failure_types=sorted(failures) or "none",
        seconds=round(report["running_time"], 1),
    )
    assert_still_serving(server)
    return {"failures": failures, "output": r.stdout}


def _failures(fuzz: dict, kinds: set[str]) -> str:
    found = {t: f for t, f in fuzz["failures"].items() if t in kinds}
    if not found:
        return ""
    summary = "; ".join(f"{f['code']} {f['title']} ×{f['count']}: {f['operations']}" for f in found.values())
    return f"{summary}\n{fuzz['output'][-6000:]}"


def test_schemathesis_no_server_errors(fuzz):
    assert not _failures(fuzz, SERVER_ERRORS)


def test_schemathesis_responses_conform(fuzz):
    assert not _failures(fuzz, CONFORMANCE)


def test_schemathesis_content_types_documented(fuzz):
    assert not _failures(fuzz, CONTENT_TYPE)


def test_schemathesis_schema_matches_validation(fuzz):
    assert not _failures(fuzz, VALIDATION_MISMATCH)
