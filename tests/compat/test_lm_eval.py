"""lm-evaluation-harness (``lm-eval --model local-completions``) against the live server, offline.

Two tasks defined in tasks/ on ten famous lines of Shakespeare (tasks/shakespeare_lines.jsonl,
written by hand): ``textgen_shakespeare_mc``, multiple choice (the log-likelihood of each of four
endings), and ``textgen_shakespeare_gen``, generate_until (greedy continuation to the end of the
line, exact match). lm-eval runs once per module as a user would run it (its command line, from the
repository root, with the Hugging Face hub and datasets offline); the tests read its results and
its per-sample log, and check that the log-likelihood it reports for every choice is the one our
own scoring path gives: POST /v1/completions with the same tokens, ``echo``, ``logprobs`` and
``max_tokens: 0``, summed over the continuation's tokens.

lm-eval is a dev dependency (pyproject.toml): without it these tests fail in CI (``CI`` set) and
are skipped elsewhere. ``test_server_answers_what_lm_eval_reads`` needs only the server: it pins the
requests and response fields lm-eval 0.4.13 relies on, so a failure there names the field.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
TASKS = Path(__file__).resolve().parent / "tasks"
MC, GEN = "textgen_shakespeare_mc", "textgen_shakespeare_gen"
N_DOCS = sum(1 for line in (TASKS / "shakespeare_lines.jsonl").read_text().splitlines() if line.strip())
LM_EVAL_TIMEOUT_S = 240.0
TOLERANCE = 1e-4  # nats, per choice (sum over the continuation's tokens)


def require_lm_eval() -> None:
    missing = [m for m in ("lm_eval", "tenacity", "aiohttp") if importlib.util.find_spec(m) is None]
    if missing:
        msg = (
            f"lm-eval is not installed (missing {', '.join(missing)}): "
            "pip install -e '.[dev]' installs lm-eval[api]"
        )
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(msg)
        pytest.skip(msg)


def lm_eval_command(base_url: str, model: str, max_length: int, out_dir: Path) -> list[str]:
    """The lm-eval invocation (tests/compat/README.md shows the same command).

    Tokenizer: lm-eval needs one on the client to split each (context, continuation) pair into
    tokens and find ``ctxlen``, where the continuation starts among the echoed tokens.
    local-completions would load a Hugging Face tokenizer from the hub: impossible offline, and
    there is none for our SentencePiece model. ``tokenizer_backend=remote`` asks the server
    instead: GET /tokenizer_info once, then POST /tokenize {"prompt", "add_special_tokens": false}
    for the context and for context + continuation, so ctxlen counts exactly the tokens the
    model scores. The requests then go out as token ids (``tokenized_requests`` stays true),
    which the server uses as given: no bos, so echoed position ``ctxlen`` is the first token of
    the continuation. Not the alternatives: with ``tokenized_requests=False`` lm-eval would send
    text, the server would put bos in front, and every slice would be one token off; with
    ``tokenizer_backend=None`` lm-eval refuses log-likelihood requests (it cannot count ctxlen).
    ``max_length`` is the served context (lm-eval assumes 2048 and would send prompts that do not
    fit); ``max_retries=1`` makes a refused request fail the run at once instead of after retries.
    """
    model_args = ",".join(
        [
            f"model={model}",
            f"base_url={base_url}/v1/completions",
            "tokenizer_backend=remote",
            f"max_length={max_length}",
            "num_concurrent=1",
            "max_retries=1",
        ]
    )
    return [
        sys.executable, "-m", "lm_eval", "run",
        "--model", "local-completions",
        "--model_args", model_args,
        "--tasks", f"{MC},{GEN}",
        "--include_path", str(TASKS.relative_to(REPO)),
        "--log_samples",
        "--output_path", str(out_dir),
    ]  # fmt: skip


def served_model(server) -> tuple[str, int]:
    card = httpx.get(server.url("/v1/models"), timeout=30).json()["data"][0]
    return card["id"], card["max_model_len"]


@pytest.fixture(scope="module")
def lm_eval_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict, dict[str, list[dict]]]:
    """Run lm-eval once: (its results JSON, task name -> its logged samples)."""
    require_lm_eval()  # before the server: no model build or start when the test cannot run
    server = request.getfixturevalue("server")
    tmp = tmp_path_factory.mktemp("lm-eval")
    model, max_length = served_model(server)
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    # Nothing from the network: no hub, no dataset downloads; a cache of our own.
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp / "hf"), PYTHONUNBUFFERED="1")
    cmd = lm_eval_command(server.base_url, model, max_length, tmp / "out")
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=LM_EVAL_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"lm-eval still running after {LM_EVAL_TIMEOUT_S} s:\n{e.stderr}\n{server.log()[-3000:]}")
    assert r.returncode == 0, (
        f"lm-eval failed ({r.returncode}):\n{r.stderr[-6000:]}\nserver log:\n{server.log()[-3000:]}"
    )
    (results_file,) = (tmp / "out").rglob("results_*.json")
    samples = {}
    for task in (MC, GEN):
        (f,) = (tmp / "out").rglob(f"samples_{task}_*.jsonl")
        samples[task] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return json.loads(results_file.read_text()), samples


def tokenize(server, text: str) -> list[int]:
    r = httpx.post(server.url("/tokenize"), json={"prompt": text, "add_special_tokens": False}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def score(server, context: str, continuation: str) -> tuple[float, bool]:
    """Our scoring path: (log P(continuation | context), whether every continuation token is the argmax).

    The tokens are those lm-eval sends (context + continuation tokenized as one text, without bos;
    the continuation is what follows the context's own token count), scored by one echo request
    that generates nothing.
    """
    spaces = len(context) - len(context.rstrip())  # lm-eval moves trailing spaces to the continuation
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ids = tokenize(server, context + continuation)
    ctxlen = len(tokenize(server, context))
    r = httpx.post(
        server.url("/v1/completions"),
        json={"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids), "echo with max_tokens 0: one entry per prompt token"
    chosen, top = lp["token_logprobs"][ctxlen:], lp["top_logprobs"][ctxlen:]
    return sum(chosen), all(c == max(t.values()) for c, t in zip(chosen, top, strict=True))


def test_multiple_choice_task_completes(lm_eval_run):
    results, samples = lm_eval_run
    assert 0.0 <= results["results"][MC]["acc,none"] <= 1.0
    assert results["n-samples"][MC]["effective"] == N_DOCS
    assert len(samples[MC]) == N_DOCS
    for s in samples[MC]:
        lls = [float(resp[0][0]) for resp in s["resps"]]
        assert len(lls) == len(s["doc"]["choices"]) == 4
        assert all(math.isfinite(x) and x < 0 for x in lls), lls


def test_generate_until_task_completes(lm_eval_run):
    results, samples = lm_eval_run
    assert 0.0 <= results["results"][GEN]["exact_match,none"] <= 1.0
    assert len(samples[GEN]) == N_DOCS
    for s in samples[GEN]:
        (text,) = s["resps"][0]
        assert isinstance(text, str)
        assert "\n" not in text, f"the stop string ends the text before the newline: {text!r}"


def test_lm_eval_loglikelihoods_equal_our_scoring(lm_eval_run, server):
    _, samples = lm_eval_run
    checked = 0
    for s in samples[MC]:
        for i, resp in enumerate(s["resps"]):
            args = s["arguments"][f"gen_args_{i}"]
            context, continuation = args["arg_0"], args["arg_1"]
            theirs, their_greedy = float(resp[0][0]), resp[0][1] == "True"
            ours, our_greedy = score(server, context, continuation)
            checked += 1
            assert abs(theirs - ours) <= TOLERANCE, (context, continuation, theirs, ours)
            assert their_greedy == our_greedy, (context, continuation)
    assert checked == 4 * N_DOCS


def test_server_answers_what_lm_eval_reads(server):
    """The requests lm-eval 0.4.13's local-completions sends, and the fields it reads back.

    Its remote tokenizer: GET /tokenizer_info (a JSON object with ``eos_token``), POST /tokenize
    with ``prompt`` (reads ``tokens``), POST /detokenize (reads ``prompt``). A log-likelihood
    request is ``max_tokens: 1`` with ``echo`` and ``logprobs: 1``: lm-eval sums
    ``token_logprobs[ctxlen:-1]``, so the echoed prompt must come first and exactly one generated
    token last, even when that token is eos; it compares each ``token_logprobs`` entry with the
    largest value of the position's ``top_logprobs`` object to decide is_greedy.
    """
    model, _ = served_model(server)
    info = httpx.get(server.url("/tokenizer_info"), timeout=30)
    assert info.status_code == 200, info.text
    assert "eos_token" in info.json()
    ids = tokenize(server, "Juliet.\nO Romeo, Romeo! wherefore art thou Romeo?")
    text = httpx.post(server.url("/detokenize"), json={"tokens": ids}, timeout=30).json()
    assert text["prompt"] == "Juliet.\nO Romeo, Romeo! wherefore art thou Romeo?"

    # Exactly the body lm-eval sends for one (context, continuation) pair (batch size 1).
    body = {"model": model, "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}  # fmt: skip
    r = httpx.post(server.url("/v1/completions"), json=body, timeout=60)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["index"] == 0
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(t, dict) and t for t in lp["top_logprobs"][1:])
    r = httpx.post(server.url("/v1/completions"), json={**body, "prompt": ids, "max_tokens": 0}, timeout=60)
    assert r.status_code == 200, r.text
    prompt_only = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert prompt_only[1:] == pytest.approx(lp["token_logprobs"][1 : len(ids)], abs=TOLERANCE)

    # The body of a generate_until request: token ids, lm-eval's stop list with the eos string.
    stop = ["\n", info.json()["eos_token"]] if info.json()["eos_token"] else ["\n"]
    body = {"prompt": [ids], "model": model, "max_tokens": 8, "temperature": 0.0, "stop": stop, "seed": 1234}
    r = httpx.post(server.url("/v1/completions"), json=body, timeout=60)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["index"] == 0 and "\n" not in choice["text"]
