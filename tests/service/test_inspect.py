"""/v1/inspect and the inspection graph (model.attention.onnx): the numbers against PyTorch, and the route's
limits and errors on the live service.

The tiny bundle is built through `python -m model build`, so it carries the graph; the live
service runs the fake engine (the route never touches the engine).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import server_harness
import torch

from bundle.tokenizer import Tokenizer
from model.export_attention import attention_forward
from model.train import load_model
from service.http.inspection import Inspector, RateLimit
from service.settings import Settings

PROMPT = "Your cat is a lovely cat. ROMEO.\nBut soft, what light through yonder window breaks?"


@pytest.fixture(scope="module")
def torch_model(tiny_checkpoint: Path):
    model, _ = load_model(tiny_checkpoint)
    return model.eval()


def reference(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        logits, atts = attention_forward(model, torch.tensor([ids]))
    return logits[0].numpy(), torch.stack([a[0] for a in atts]).numpy()


def check_attention(att: np.ndarray, want: np.ndarray) -> None:
    T = att.shape[-1]
    assert att.shape == want.shape
    assert np.abs(att - want).max() <= 1e-4
    assert np.abs(att.sum(-1) - 1).max() <= 1e-4  # every row is a distribution
    assert not att[..., np.triu_indices(T, k=1)[0], np.triu_indices(T, k=1)[1]].any()  # causal: 0 above


def test_graph_equals_pytorch_rows_sum_to_one_and_causal(tiny_bundle: Path, torch_model):
    tok = Tokenizer.load(tiny_bundle / "tokenizer.model")
    settings = Settings(model_dir=tiny_bundle)
    insp = Inspector(settings, "tiny", tok, torch_model.cfg.context_length)
    for ids in (
        [tok.bos_id, *tok.encode(PROMPT)],
        [tok.bos_id],
        [tok.bos_id, *tok.encode("cat " * 40)][:128],
    ):
        logits, att = insp.run(ids)
        want_logits, want = reference(torch_model, ids)
        check_attention(att, want)
        assert np.abs(logits - want_logits).max() <= 1e-4
        assert att.shape[:2] == (torch_model.cfg.n_layer, torch_model.cfg.n_head)


def test_rate_limit_is_a_token_bucket():
    now = [0.0]
    r = RateLimit(2.0, clock=lambda: now[0])
    assert [r.take(), r.take(), r.take()] == [True, True, False]
    now[0] += 0.5
    assert [r.take(), r.take()] == [True, False]


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory):
    s = server_harness.start(
        tiny_bundle,
        tmp_path_factory.mktemp("inspect") / "server.log",
        fake=True,
        TEXTGEN_INSPECT_MAX_TOKENS="40",
        TEXTGEN_INSPECT_RATE_PER_S="1000",
    )
    yield s
    s.stop()


def test_inspect_over_http_equals_pytorch(server, tiny_bundle: Path, torch_model):
    info = httpx.get(server.url("/v1/inspect"), timeout=30).json()
    arch = json.loads((tiny_bundle / "config.json").read_text())["architecture"]
    assert (info["n_layer"], info["n_head"], info["max_prompt_tokens"]) == (
        arch["n_layer"],
        arch["n_head"],
        40,
    )
    r = httpx.post(
        server.url("/v1/inspect"), json={"prompt": "Your cat is a lovely cat", "top_n": 5}, timeout=30
    )
    assert r.status_code == 200, r.text
    body = r.json()
    ids = [t["id"] for t in body["tokens"]]
    tok = Tokenizer.load(tiny_bundle / "tokenizer.model")
    assert ids == [tok.bos_id, *tok.encode("Your cat is a lovely cat")]
    logits, want = reference(torch_model, ids)
    check_attention(np.asarray(body["attentions"]), want)
    probs = torch.softmax(torch.from_numpy(logits).double(), -1).numpy()
    for t, row in enumerate(body["next_tokens"]):
        assert len(row) == 5
        assert row[0]["id"] == int(probs[t].argmax())
        assert [x["prob"] for x in row] == sorted((x["prob"] for x in row), reverse=True)
        assert all(abs(x["prob"] - probs[t, x["id"]]) <= 1e-5 for x in row)


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"prompt": "cat " * 60}, "prompt", "limit of 40"),
        ({"prompt": "", "add_special_tokens": False}, "prompt", "no tokens"),
        ({"prompt": "x", "top_n": 0}, "top_n", "top_n"),
        ({"prompt": 5}, "prompt", "prompt"),
        ({}, "prompt", "prompt"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(server, body, param, says):
    r = httpx.post(server.url("/v1/inspect"), json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"]


def test_rate_limit_answers_429(tiny_bundle: Path, tmp_path_factory):
    s = server_harness.start(
        tiny_bundle,
        tmp_path_factory.mktemp("inspect-rate") / "server.log",
        fake=True,
        TEXTGEN_INSPECT_RATE_PER_S="0.01",
    )
    try:
        codes = [
            httpx.post(s.url("/v1/inspect"), json={"prompt": "a cat"}, timeout=30).status_code
            for _ in range(2)
        ]
        assert codes == [200, 429]
        r = httpx.post(s.url("/v1/inspect"), json={"prompt": "a cat"}, timeout=30)
        assert "TEXTGEN_INSPECT_RATE_PER_S" in r.json()["error"]["message"]
    finally:
        s.stop()


def test_a_bundle_without_the_graph_answers_404(bundle_without_attention: Path, tmp_path_factory):
    s = server_harness.start(
        bundle_without_attention, tmp_path_factory.mktemp("inspect-bare") / "server.log", fake=True
    )
    try:
        for r in (
            httpx.get(s.url("/v1/inspect"), timeout=30),
            httpx.post(s.url("/v1/inspect"), json={"prompt": "a cat"}, timeout=30),
        ):
            assert r.status_code == 404
            assert "model.attention.onnx" in r.json()["error"]["message"]
    finally:
        s.stop()
