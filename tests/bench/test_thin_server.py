"""bench.baselines.thin: the thinnest server around the engine, as the clients check runs it."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from bench.baselines.common import PromptEncoder
from bench.server import Server, free_port, launch, server_env, thin_argv


@pytest.fixture(scope="module", params=["raw", "uvicorn"])
def thin(request: pytest.FixtureRequest, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The thin server with each front end: raw sockets, or uvicorn with a bare ASGI app."""
    port = free_port()
    argv = thin_argv(tiny_bundle, port, frontend=request.param)
    log = tmp_path_factory.mktemp("thin") / "thin.log"
    server = launch(argv, log, port=port, env=server_env(), name="thin")
    server.wait_ready(120)
    yield server
    code = server.stop()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal so that the exit status tells it
    assert code in ((0, -signal.SIGTERM) if request.param == "uvicorn" else (0,)), server.log_tail()


def test_streams_completions_the_openai_client_reads(thin: Server, tiny_bundle: Path) -> None:
    client = openai.OpenAI(base_url=thin.url("/v1"), api_key="none")
    (model,) = [m.id for m in client.models.list()]
    assert model == PromptEncoder.load(tiny_bundle).model_name
    stream = client.completions.create(
        model=model, prompt="To be, or not to be", max_tokens=20, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_tokenize_counts_as_the_service_encodes(thin: Server, tiny_bundle: Path) -> None:
    r = httpx.post(thin.url("/tokenize"), json={"text": "Now is the winter of our discontent"})
    assert r.status_code == 200
    assert r.json()["tokens"] == PromptEncoder.load(tiny_bundle).encode("Now is the winter of our discontent")


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(thin: Server) -> None:
    r = httpx.post(thin.url("/v1/completions"), content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(thin.url("/v1/completions"), json={"prompt": "hi", "max_tokens": 4})  # not streamed
    assert r.status_code == 400 and "only streamed" in r.json()["error"]["message"]
    assert httpx.get(thin.url("/nowhere")).status_code == 404
    # A client that leaves mid-stream: its request is aborted, the next one is served.
    with socket.create_connection(("127.0.0.1", thin.port)) as s:
        body = b'{"prompt": "long", "max_tokens": 200, "stream": true, "ignore_eos": true}'
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert s.recv(4096).startswith(b"HTTP/1.1 200 OK")
    with httpx.stream("POST", thin.url("/v1/completions"),
                      json={"prompt": "again", "max_tokens": 3, "stream": True}) as r:  # fmt: skip
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"


def test_front_ends_bench_measures_all_three(tiny_bundle: Path, tmp_path: Path) -> None:
    """bench.front_ends: the service and both thin front ends, every round's figures, the table."""
    from bench.front_ends import SERVERS, run, table

    out = run(tiny_bundle, output_len=2, requests=2, rounds=2, temperature=0.0, log_dir=tmp_path)
    assert set(out) == set(SERVERS)
    for name, figures in out.items():
        assert len(figures["ttft"]) == 2 and all(t > 0 for t in figures["ttft"]), name
        assert all(v > 0 for v in figures["tput"]), name
    text = table(out)
    assert "uvicorn − raw" in text and "service ÷ uvicorn" in text
