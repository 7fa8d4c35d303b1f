"""Structured output through the real server and engine (tiny trained model): JSON schemas,
regular expressions, choices, grammars and tool calls are guaranteed by constrained decoding.

Every finished output must parse and validate, whatever the sampling; an output cut by
``max_tokens`` ends as ``length`` and is a valid prefix. Unconstrained rows sharing the batch are
unchanged. Bad structures are a 400 naming the problem, and the engine keeps serving.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
from pathlib import Path

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field
from server_harness import start

SCHEMAS = json.loads((Path(__file__).parent / "structured_schemas.json").read_text())
SAMPLES = 50
PROMPT = "ROMEO.\n"
MANY = {"prompt": [PROMPT] * 5, "n": 10}  # 50 samples in one request (n is at most 16 per prompt)


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    srv = start(tiny_bundle, tmp_path_factory.mktemp("structured") / "server.log", fake=False,
                TEXTGEN_MAX_RUNNING="64")  # fmt: skip
    yield srv
    assert srv.stop() == 0, srv.log()


def complete(server, **body) -> dict:
    r = httpx.post(server.url("/v1/completions"), json={"prompt": PROMPT, **body}, timeout=180)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_finished_sample_validates(server, name):
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    r = complete(server, **MANY, temperature=1.0, seed=7, max_tokens=150, response_format=fmt)
    finished = [c["text"] for c in r["choices"] if c["finish_reason"] == "stop"]
    assert len(finished) >= SAMPLES * 0.8, f"only {len(finished)} of {SAMPLES} finished"
    for text in finished:
        jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


def test_regex_choice_and_lark_grammar(server, client, model):
    r = complete(server, **MANY, temperature=1.0, max_tokens=20, guided_regex=r"[A-Z][a-z]{2,6}( [a-z]{1,5}){0,2}\.")
    for c in r["choices"]:
        assert c["finish_reason"] == "stop" and re.fullmatch(r"[A-Z][a-z]{2,6}( [a-z]{1,5}){0,2}\.", c["text"])
    choices = ["Montague", "Capulet", "neither house"]
    r = complete(server, prompt=[PROMPT] * 2, n=10, temperature=1.0, max_tokens=10, structured_outputs={"choice": choices})
    assert {c["text"] for c in r["choices"]} <= set(choices)
    # Arithmetic with at most three terms and one level of parentheses: every output can end in time.
    arith = r"""
        start: term | term OP term | term OP term OP term
        term: NUMBER | "(" NUMBER OP NUMBER ")"
        OP: "+" | "-" | "*" | "/"
        NUMBER: /[1-9][0-9]?/
    """
    r = complete(server, **MANY, temperature=1.0, max_tokens=40, guided_grammar=arith)
    done = [c["text"] for c in r["choices"] if c["finish_reason"] == "stop"]
    assert len(done) == SAMPLES
    term = r"([1-9][0-9]?|\([1-9][0-9]?[-+*/][1-9][0-9]?\))"
    for text in done:
        assert re.fullmatch(rf"{term}([-+*/]{term}){{0,2}}", text), text
        assert isinstance(eval(text), (int, float))  # Python agrees it is an expression
    gbnf = 'root ::= "yes" | "no"'  # llama.cpp's format converts
    r = complete(server, n=10, temperature=1.0, max_tokens=5, guided_grammar=gbnf)
    assert {c["text"] for c in r["choices"]} <= {"yes", "no"}


def test_json_object_chat_and_parse_with_a_pydantic_model(client, model):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say it"}], response_format={"type": "json_object"},
        max_tokens=60, temperature=0.7, seed=1,
    )  # fmt: skip
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)

    class Line(BaseModel):
        speaker: str = Field(max_length=10)
        act: int = Field(ge=1, le=5)

    # The client turns the pydantic model into a strict json_schema response_format, and parses.
    parsed = client.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": "Who speaks?"}], response_format=Line,
        max_tokens=60, temperature=0.7, seed=2,
    )  # fmt: skip
    line = parsed.choices[0].message.parsed
    assert isinstance(line, Line) and 1 <= line.act <= 5 and len(line.speaker) <= 10


def test_max_tokens_cut_is_a_valid_prefix_and_says_length(server):
    # the string cannot close before 200 characters: 12 tokens must end mid-document
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": 200}}, "required": ["text"]}
    r = complete(server, max_tokens=12, temperature=1.0, seed=3, guided_json=schema, logprobs=1)
    c = r["choices"][0]
    head = '{"text":"'
    assert c["finish_reason"] == "length" and (c["text"].startswith(head) or head.startswith(c["text"]))
    assert not c["text"].endswith("}")
    assert all(lp is not None and lp <= 0 for lp in c["logprobs"]["token_logprobs"])


def test_unconstrained_rows_are_unchanged_by_constrained_neighbours(server):
    plain = {"max_tokens": 24, "temperature": 0.9, "seed": 11, "ignore_eos": True}
    alone = complete(server, **plain)["choices"][0]["text"]
    greedy = complete(server, max_tokens=24, temperature=0, ignore_eos=True)["choices"][0]["text"]
    with cf.ThreadPoolExecutor(8) as pool:
        busy = [pool.submit(complete, server, n=8, temperature=1.0, max_tokens=60, guided_json=SCHEMAS["nested_object"])
                for _ in range(3)]  # fmt: skip
        mixed = [pool.submit(complete, server, **plain), pool.submit(complete, server, max_tokens=24, temperature=0,
                                                                      ignore_eos=True)]  # fmt: skip
        assert mixed[0].result()["choices"][0]["text"] == alone
        assert mixed[1].result()["choices"][0]["text"] == greedy
        for f in busy:
            f.result()


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                         "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "count", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["n"], "additionalProperties": False}}},
]  # fmt: skip


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("choice", ["named", "required"])
def test_tool_calls_through_the_openai_client(client, model, stream, choice):
    tool_choice = {"type": "function", "function": {"name": "get_weather"}} if choice == "named" else "required"
    kw = dict(model=model, messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
              tool_choice=tool_choice, max_tokens=80, temperature=0.8, seed=5)  # fmt: skip
    if stream:
        name, args, finish, ids = None, "", None, set()
        for chunk in client.chat.completions.create(**kw, stream=True):
            for c in chunk.choices:
                for call in c.delta.tool_calls or []:
                    name = call.function.name or name
                    args += call.function.arguments or ""
                    ids |= {call.id} if call.id else set()
                finish = c.finish_reason or finish
        assert finish == "tool_calls" and len(ids) == 1
    else:
        r = client.chat.completions.create(**kw)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
        (call,) = msg.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        name, args = call.function.name, call.function.arguments
    tool = next(t for t in TOOLS if t["function"]["name"] == name)
    assert choice == "required" or name == "get_weather"
    jsonschema.validate(json.loads(args), tool["function"]["parameters"])


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"guided_json": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "guided_json"),
        ({"guided_json": {"type": "string", "format": "uri-template"}}, "uri-template"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_grammar": "start: expr\nexpr: (("}, "guided_grammar"),
        ({"guided_json": {"type": "object", "properties": {f"k{i}": {"type": "string"} for i in range(5000)}}},
         "guided_json"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "one structure per request"),
        ({"response_format": {"type": "json_schema"}}, "json_schema.schema"),
    ],
)
def test_bad_structures_are_400_naming_the_problem(server, body, needle):
    r = httpx.post(server.url("/v1/completions"), json={"prompt": "x", **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] + str(err["param"])
    ok = complete(server, max_tokens=2)
    assert ok["usage"]["completion_tokens"] == 2


def test_native_generate_and_metrics(server):
    r = httpx.post(server.url("/generate"), json={"text": PROMPT, "max_tokens": 10, "guided_choice": ["aye", "nay"]})
    assert r.status_code == 200 and r.json()["text"] in ("aye", "nay")
    metrics = httpx.get(server.url("/metrics")).text
    assert re.search(r'textgen_structured_requests_total\{kind="choice",model="[^"]+"\} [1-9]', metrics)
    assert re.search(r"textgen_structured_mask_seconds_count\{[^}]*\} [1-9]", metrics)
    assert re.search(r"textgen_structured_compile_seconds_count\{[^}]*\} [1-9]", metrics)
