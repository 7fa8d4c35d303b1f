"""The multi-turn chat workload of bench.serve: the hit-rate prediction alone, then a cache on/off
comparison against the real service (tiny random model, ephemeral loopback port)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from bench.chat_workload import ChatWorkload, predicted_hits
from bench.serve import BenchmarkConfig, chat_table, run_chat_compare

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
import server_harness


def test_prediction_counts_leading_full_blocks_seen_before() -> None:
    a = list(range(40))  # 2 full blocks of 16 + 8 tokens
    b = [*range(32), 99, 98, 97]  # shares both blocks; may look up (35 - 1) // 16 = 2 blocks
    c = list(range(32))  # shares both, but its last token is computed: looks up 1 block
    d = [7, *range(1, 40)]  # differs in its first token: shares nothing
    assert predicted_hits([a], 16) == (0, 40)
    assert predicted_hits([a, b], 16) == (32, 75)
    assert predicted_hits([a, c], 16) == (16, 72)
    assert predicted_hits([a, d], 16) == (0, 80)
    assert predicted_hits([b, a, c], 16) == (32 + 16, 35 + 40 + 32)


@pytest.fixture(scope="module")
def server(random_bundle, tmp_path_factory):
    s = server_harness.start(
        random_bundle,
        tmp_path_factory.mktemp("chat") / "server.log",
        fake=False,
        TEXTGEN_PROVIDER="cpu",
        TEXTGEN_INTRA_OP_THREADS="1",
    )
    yield s
    assert s.stop() == 0


def test_cache_on_and_off_in_one_run_and_the_measured_hit_rate_is_the_predicted_one(server) -> None:
    # One conversation at a time: each turn is sent after the previous reply, so every block the
    # prediction counts is cached when the turn arrives, and the server must find exactly those.
    work = ChatWorkload(conversations=1, turns=3, system_len=60, user_len=12, output_len=8)
    config = BenchmarkConfig(url=server.base_url, endpoint="chat", progress=False)
    result = asyncio.run(run_chat_compare(config, work, rounds=2))
    on, off = result["on"], result["off"]
    assert on["completed"] == off["completed"] == 2 * 3 and on["failed"] == off["failed"] == 0
    assert on["total_prompt_tokens"] == off["total_prompt_tokens"]  # the same conversations
    assert off["hit_rate"] is None  # cache_prompt false: nothing looked up
    assert result["predicted_hit_rate"] > 0.5
    assert on["hit_rate"] == pytest.approx(result["predicted_hit_rate"])
    table = chat_table(result)
    assert "measured hit rate" in table and "TTFT p50 off / on" in table
