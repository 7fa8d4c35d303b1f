"""Multi-turn chat workload for ``bench.serve``: the traffic prefix caching is for.

Every conversation starts with the same system prompt (``system_len`` tokens, e.g. 60% of the
context); each turn adds a user message of ``user_len`` tokens, the server's streamed reply is
appended to the history, and the next turn sends the whole conversation again. ``conversations``
clients run their conversations at once (closed loop: a client sends its next turn when the
reply is complete), so turns of different conversations interleave.

``compare_cache`` runs the workload with ``cache_prompt: false`` and with it on (the server's
default), alternating which goes first, ``rounds`` times; each round has its own system prompt
and messages, shared by its two passes, so both passes send the same conversations (greedy
outputs are the same with the cache or without). The hit rate the server measured (its
``textgen_prefix_cache_*`` counters) is set beside the rate the workload predicts: every prompt's
longest run of leading full blocks already sent by an earlier request (at most all but its last
token), with unlimited cache and no two requests at the same time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx

from bench.workload import RequestSpec, build_prompt, plan_prompts


@dataclass(frozen=True)
class ChatWorkload:
    conversations: int = 4
    turns: int = 4
    system_len: int = 1228  # tokens: 60% of a 2048-token context
    user_len: int = 48
    output_len: int = 32
    block_size: int = 16  # the server's prefix-cache block size, for the prediction
    seed: int = 0

    def validate(self) -> None:
        for name in ("conversations", "turns", "system_len", "user_len", "output_len", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def predicted_hits(prompts: list[list[int]], block_size: int) -> tuple[int, int]:
    """(hit tokens, query tokens) of prompts sent one after another to an unbounded prefix cache."""
    seen: set[tuple[int, ...]] = set()
    hits = queries = 0
    for p in prompts:
        queries += len(p)
        n_lookup = (len(p) - 1) // block_size
        k = 0
        while k < n_lookup and tuple(p[: (k + 1) * block_size]) in seen:
            k += 1
        hits += k * block_size
        seen.update(tuple(p[: (j + 1) * block_size]) for j in range(len(p) // block_size))
    return hits, queries


async def prefix_counters(client: httpx.AsyncClient) -> tuple[float, float] | None:
    """(queries, hits) from the server's /metrics, or None where it has no such counters."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        resp = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(resp.text):
        if family.name in ("textgen_prefix_cache_queries", "textgen_prefix_cache_hits"):
            found[family.name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    if len(found) < 2:
        return None
    return found["textgen_prefix_cache_queries"], found["textgen_prefix_cache_hits"]


async def conversation_texts(count, work: ChatWorkload, round_: int) -> tuple[str, list[list[str]]]:
    """The system prompt and each conversation's user messages of one round (token-sized with ``count``)."""
    plan = await plan_prompts(count)
    base = 7919 * (work.seed + 1) + 104729 * round_  # a different window of the passage per round
    system, _ = await build_prompt(RequestSpec(0, work.system_len, 0, base % 5000), plan, count)
    users = []
    for c in range(work.conversations):
        turns = []
        for t in range(work.turns):
            spec = RequestSpec(0, work.user_len, 0, (base + 613 * c + 97 * t + 1) % 5000)
            turns.append((await build_prompt(spec, plan, count))[0])
        users.append(turns)
    return system, users


async def run_pass(
    client: httpx.AsyncClient,
    send,
    model: str,
    work: ChatWorkload,
    system: str,
    users: list[list[str]],
    extra: dict[str, Any],
) -> tuple[list[Any], list[list[dict]], float]:
    """All conversations once. ``send(body, text_sink) -> RequestRecord``. Returns the records in
    send order, the message lists sent (in send order) and the wall time."""
    records: list[Any] = []
    sent: list[list[dict]] = []
    t0 = time.perf_counter()

    async def conversation(c: int) -> None:
        history: list[dict] = [{"role": "system", "content": system}]
        for t in range(work.turns):
            history.append({"role": "user", "content": users[c][t]})
            body = {
                "model": model,
                "messages": list(history),
                "max_tokens": work.output_len,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                **extra,
            }
            sent.append(list(history))
            pieces: list[str] = []
            records.append(await send(body, pieces))
            history.append({"role": "assistant", "content": "".join(pieces)})

    await asyncio.gather(*(conversation(c) for c in range(work.conversations)))
    return records, sent, time.perf_counter() - t0


async def token_ids(client: httpx.AsyncClient, messages: list[dict]) -> list[int]:
    resp = await client.post("/tokenize", json={"messages": messages})
    resp.raise_for_status()
    return list(resp.json()["tokens"])
