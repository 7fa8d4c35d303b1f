"""Security: the API key, what reaches the logs and /metrics, and the container user.

With TEXTGEN_API_KEY set, requests without the key or with a wrong one get 401 before any
work (no prompt token counted, nothing scheduled, textgen_requests_rejected_total{reason="auth"}
up by exactly the number refused); /health, /ready and /metrics stay open; the key never shows
in the logs (at info and at debug level), in /metrics or in any response; prompts are not logged
by default (a unique marker is grepped for), and a positive control with TEXTGEN_LOG_PROMPTS=true
shows that the grep would find it. The Dockerfile's final stage runs as a non-root user.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import httpx
from relkit import error_field, finished, rejected, scrape, terminate

REPO = Path(__file__).resolve().parents[2]
GENERATION = ("/v1/completions", "/v1/chat/completions", "/generate")


def body_for(route: str, marker: str) -> dict:
    text = f"Tell me about {marker} please"
    if route == "/v1/chat/completions":
        return {"messages": [{"role": "user", "content": text}], "max_tokens": 4}
    if route == "/generate":
        return {"text": text, "max_tokens": 4}
    if route == "/tokenize":
        return {"text": text}
    if route == "/detokenize":
        return {"tokens": [5, 6]}
    return {"prompt": text, "max_tokens": 4}


def engine_work(m) -> dict[str, float]:
    return {
        "prompt_tokens": m.value("textgen_prompt_tokens_total"),
        "generation_tokens": m.value("textgen_generation_tokens_total"),
        "finished": sum(finished(m, r) for r in ("stop", "length", "abort", "error")),
        "steps": m.value("textgen_iteration_batch_size_count"),
    }


def test_api_key_logs_and_metrics(servers, record):
    key = "sk-rel-" + secrets.token_hex(16)
    wrong = "sk-wrong-" + secrets.token_hex(8)
    marker = "zebra" + secrets.token_hex(6)  # a prompt that must not reach the logs
    srv = servers.launch(TEXTGEN_API_KEY=key)
    m0 = scrape(srv.base_url)

    attempts = [{}, {"Authorization": f"Bearer {wrong}"}, {"Authorization": key}]
    attempts += [{"Authorization": f"Basic {key}"}, {"Authorization": f"Bearer {key}x"}, {"X-Api-Key": key}]
    seen: list[str] = []  # every response text, to look for the key
    refused = 0
    with httpx.Client(base_url=srv.base_url, timeout=30) as http:
        for headers in attempts:
            for route in (*GENERATION, "/tokenize", "/detokenize"):
                r = http.post(route, json=body_for(route, marker), headers=headers)
                refused += 1
                assert r.status_code == 401, (route, headers, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
                assert error_field(r.json())["type"] == "authentication_error"
                seen.append(r.text + str(r.headers))
            r = http.get("/v1/models", headers=headers)
            refused += 1
            assert r.status_code == 401
        # 401 before the body is read: a 10 MB body gets 401, not 413.
        r = http.post(
            "/v1/completions", content=b"x" * (10 * 2**20), headers={"Content-Type": "application/json"}
        )
        refused += 1
        assert r.status_code == 401

        m1 = scrape(srv.base_url)
        assert engine_work(m1) == engine_work(m0), "refused requests cost engine work"
        assert rejected(m1, "auth") - rejected(m0, "auth") == refused

        for path in ("/health", "/ready", "/metrics"):
            r = http.get(path)
            assert r.status_code == 200, (path, r.status_code)
            seen.append(r.text)
        seen.append(http.get("/openapi.json").text)

        auth = {"Authorization": f"Bearer {key}"}
        for route in GENERATION:
            r = http.post(route, json=body_for(route, marker), headers=auth)
            assert r.status_code == 200, r.text
            seen.append(r.text + str(r.headers))
        assert http.get("/v1/models", headers=auth).status_code == 200
        m2 = scrape(srv.base_url)
        assert engine_work(m2)["prompt_tokens"] > engine_work(m1)["prompt_tokens"]
        seen.append(m2.text)

    code, left = terminate(srv.proc)  # flush and close the log
    assert code == 0 and not left
    log = srv.log()
    assert "POST /v1/completions" in log  # the access log is there...
    assert key not in log, "the API key is in the log"
    assert wrong not in log, "a rejected key is in the log"
    assert marker not in log, "a prompt is in the log (TEXTGEN_LOG_PROMPTS is off by default)"
    leaks = [s[:200] for s in seen if key in s]
    assert not leaks, f"the API key is in responses: {leaks}"
    record("security", refused_401=refused, engine_work_for_refused=0, key_in_logs_or_metrics=False)


def test_debug_logs_never_show_the_key(servers):
    """At debug level with prompt logging on: the prompt is logged (the grep works), the key not."""
    key = "sk-rel-" + secrets.token_hex(16)
    marker = "okapi" + secrets.token_hex(6)
    srv = servers.launch(TEXTGEN_API_KEY=key, TEXTGEN_LOG_LEVEL="debug", TEXTGEN_LOG_PROMPTS="true")
    with httpx.Client(base_url=srv.base_url, timeout=30) as http:
        for route in GENERATION:
            ok = http.post(route, json=body_for(route, marker), headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200
            assert http.post(route, json=body_for(route, marker)).status_code == 401
        assert key not in http.get("/metrics").text
    code, left = terminate(srv.proc)
    assert code == 0 and not left
    log = srv.log()
    assert marker in log, "positive control: TEXTGEN_LOG_PROMPTS=true should log the prompt"
    assert key not in log, "the API key is in the debug log"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line:
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_final_stage_runs_as_non_root():
    steps = dockerfile_instructions(REPO / "Dockerfile")
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    final = steps[last_from:]
    users = [(i, arg) for i, (word, arg) in enumerate(final) if word == "USER"]
    assert users, "the final stage sets no USER: the container runs as root"
    i, user = users[-1]
    name = user.split(":")[0]
    assert name not in ("root", "0") and not re.fullmatch(r"0+", name), f"USER {user}"
    entry = [j for j, (word, _) in enumerate(final) if word in ("ENTRYPOINT", "CMD")]
    assert entry and all(j > i for j in entry), "USER must come before ENTRYPOINT/CMD"
