"""The serving comparison (bench.compare) and its baselines, on the tiny bundle.

One end-to-end run starts the service, the LitServe static-batching and no-batching servers on
ephemeral ports and runs the offline engine, all on a few short requests, and checks that every
request of every run succeeded with exact token counts, that the markdown section was written
into an existing document without touching its other sections, and that the PNG and JSON exist.
The rest are pure functions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.baselines.common import PromptEncoder
from bench.baselines.offline import benchmark_offline, build_prompts
from bench.compare import BEGIN, END, SECTION, group_profile, main, ratios, summarize_profile, update_doc
from bench.serve import BenchmarkResult, RequestRecord, summarize
from bench.workload import sample_requests


def _result(tput: float, ttft_p99: float = 0.1, e2e_p99: float = 1.0) -> BenchmarkResult:
    rec = RequestRecord(0.0, ttft_p99, [], e2e_p99, int(tput), 10, True, 200, None)
    return BenchmarkResult(config={}, summary=summarize([rec], 1.0, {}), requests=[rec])


def test_ratios_divide_the_service_by_each_baseline() -> None:
    runs = {
        "service": _result(1000),
        "static": _result(400),
        "none": _result(100),
        "offline": _result(1250),
        "service-c1": _result(10, ttft_p99=0.05),
        "service-c16": _result(10, ttft_p99=0.15),
        "service-c16-burst": _result(10, ttft_p99=0.40),
        "poisson-10": _result(10, e2e_p99=2.0),
        "poisson-70": _result(10, e2e_p99=5.0),
    }
    r = ratios(runs)
    assert r["vs_static"] == pytest.approx(2.5)
    assert r["vs_none"] == pytest.approx(10.0)
    assert r["vs_offline"] == pytest.approx(0.8)
    assert r["ttft_c16_c1"] == pytest.approx(3.0)  # the ramped-up run, not the burst
    assert r["ttft_burst_c1"] == pytest.approx(8.0)
    assert r["poisson_70_10"] == pytest.approx(2.5)
    assert ratios({"service": _result(1000)})["vs_static"] is None


def test_update_doc_replaces_only_the_generated_block(tmp_path: Path) -> None:
    doc = tmp_path / "B.md"
    doc.write_text("# Benchmarks\n\n## Engine\n\nkeep me\n")
    update_doc(doc, "first")
    text = doc.read_text()
    assert "keep me" in text and SECTION in text and f"{BEGIN}\nfirst\n{END}" in text
    doc.write_text(text + "\nhand-written notes after the block\n\n## Later\n\nalso kept\n")
    update_doc(doc, "second")
    text = doc.read_text()
    assert "first" not in text and f"{BEGIN}\nsecond\n{END}" in text
    assert text.count(SECTION) == 1
    assert "keep me" in text and "hand-written notes" in text and "also kept" in text


def test_summarize_profile_counts_self_and_inclusive_time(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text("main (a.py:1);step (b.py:2);run (c.py:3) 6\nmain (a.py:1);send (d.py:4) 4\n")
    top = {f: (s, i) for f, s, i in summarize_profile(raw)}
    assert top["run (c.py:3)"] == pytest.approx((60.0, 60.0))
    assert top["send (d.py:4)"] == pytest.approx((40.0, 40.0))


def test_offline_prompts_have_the_exact_lengths(tiny_bundle: Path) -> None:
    enc = PromptEncoder.load(tiny_bundle)
    reqs = build_prompts(enc, 6, (8, 24), (4, 8), seed=3)
    specs = sample_requests(6, (8, 24), (4, 8), 3)
    assert [len(ids) for ids, _ in reqs] == [s.prompt_len for s in specs]
    assert [n for _, n in reqs] == [s.output_len for s in specs]
    assert all(ids[0] == enc.tokenizer.bos_id for ids, _ in reqs)


def test_offline_closed_loop(tiny_bundle: Path) -> None:
    r = benchmark_offline(tiny_bundle, 3, 7, (8, 24), (4, 8), seed=1, warmup=1)
    s = r.summary
    assert s["completed"] == 7 and s["failed"] == 0
    assert s["total_output_tokens"] == sum(x.output_len for x in sample_requests(7, (8, 24), (4, 8), 1))
    assert all(rec.ttft is not None and rec.ttft <= rec.e2e for rec in r.requests)
    assert max(rec.start for rec in r.requests[:3]) < min(rec.start for rec in r.requests[3:])


def test_compare_end_to_end(tiny_bundle: Path, tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Other\n\nunchanged\n")
    out_json = tmp_path / "compare.json"
    argv = [
        "--bundle", str(tiny_bundle), "--concurrency", "2", "--num-requests", "4", "--none-requests", "2",
        "--prompt-len", "8:24", "--output-len", "4:12", "--checks", "main",
        "--out", str(doc), "--img-dir", str(tmp_path / "img"), "--json-out", str(out_json),
        "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out_json.read_text())
    expected = {k: sum(x.output_len for x in sample_requests(n, (8, 24), (4, 12), 0)) for k, n in
                (("service", 4), ("static", 4), ("none", 2), ("offline", 4))}  # fmt: skip
    for key, tokens in expected.items():
        s = data["runs"][key]["summary"]
        assert s["failed"] == 0, (key, data["runs"][key]["requests"])
        assert s["total_output_tokens"] == tokens, key
    # The inference worker was found among the server's processes; its share may round to 0 here
    # (psutil counts CPU time in 10 ms ticks and this tiny workload is a few ms of engine work).
    cpu = data["runs"]["service"]["summary"]["cpu_s"]
    assert {"worker", "http"} <= cpu.keys() and sum(v for k, v in cpu.items() if k != "client") > 0, cpu
    text = doc.read_text()
    assert "unchanged" in text and SECTION in text and BEGIN in text
    assert "LitServe static batching" in text and "service ÷ offline engine" in text
    assert (tmp_path / "img" / "serving-compare.png").stat().st_size > 1000


def test_group_profile_takes_the_innermost_matching_frame(tmp_path: Path) -> None:
    raw = tmp_path / "w.txt"
    raw.write_text(
        "serve (engine_loop.py:1);EngineWorker._step (e.py:2);Engine.step (e.py:3);Session.run (o.py:4) 5\n"
        "serve (engine_loop.py:1);EngineWorker._flush (e.py:9);Connection._send (c.py:1) 3\n"
        "serve (engine_loop.py:1);idle (x.py:1) 2\n"
    )
    groups = (("model", ("Session.run",)), ("send", ("EngineWorker._flush",)), ("engine", ("Engine.",)))
    assert group_profile(raw, groups) == [("model", 50.0), ("send", 30.0), ("other", 20.0)]


def test_client_rows_have_two_requests_per_client_and_parse_their_counts() -> None:
    from bench.compare import CompareConfig, _client_counts, build_parser, client_requests, config_from_args

    cfg = CompareConfig(bundle=Path("b"), client_requests=12)
    assert [client_requests(cfg, c) for c in (1, 4, 32)] == [12, 12, 64]
    args = build_parser().parse_args(["--bundle", "b", "--checks", "clients"])
    assert config_from_args(args).client_counts == (1, 4, 32)
    assert _client_counts("1, 32") == (1, 32)
    for bad in ("", "0,4", "four"):
        with pytest.raises(ValueError, match="--client-counts"):
            _client_counts(bad)


def test_offline_ttft_counts_the_engines_intake() -> None:
    """The offline twin of a served TTFT starts before ``add_request``, as a served request's
    clock starts before the worker hands it to the engine."""
    import time

    from bench.baselines.offline import run_offline
    from service.engine.types import RequestOutput

    intake_s = 0.02

    class SlowIntakeEngine:
        def __init__(self) -> None:
            self.live: list[str] = []

        def add_request(self, rid, ids, params) -> None:
            end = time.perf_counter() + intake_s
            while time.perf_counter() < end:  # the engine's own work, not a wait for anything
                pass
            self.live.append(rid)

        def has_unfinished(self) -> bool:
            return bool(self.live)

        def step(self) -> list[RequestOutput]:
            rid = self.live.pop()
            return [RequestOutput(rid, [7], "x", finished=True, finish_reason="length", num_output_tokens=1)]

    records, _ = run_offline(SlowIntakeEngine(), [([1, 2, 3], 1)], concurrency=1)
    assert records[0].ttft >= intake_s


def test_every_clients_row_has_prompts_of_its_own(tiny_bundle: Path) -> None:
    """The service keeps its prefix cache across the rows and their rounds, and the offline engine
    warms up before each run: no run may find its prompts cached by an earlier one or by the warm-up."""
    from bench.baselines.offline import PromptEncoder
    from bench.compare import CompareConfig, client_runs, client_seed

    cfg = CompareConfig(bundle=tiny_bundle, client_counts=(1, 4), client_requests=4, client_rounds=3)
    seeds = [client_seed(cfg, c, t, r) for c, t in client_runs(cfg) for r in (1, 2, 3)]
    assert len(set(seeds)) == len(seeds) and cfg.seed not in seeds and cfg.seed + 1 not in seeds
    encoder = PromptEncoder.load(tiny_bundle)
    first = [tuple(build_prompts(encoder, 4, (8, 24), (4, 8), s)[0][0]) for s in seeds]
    assert len(set(first)) == len(first)


def test_client_rows_take_medians_over_rounds_and_leave_the_main_table() -> None:
    """Each round pairs a served and an offline run; the clients table gives the medians of both
    sides and of the per-round ratios, and the range of the throughput ratio."""
    from bench.compare import client_ratios, client_table, markdown_block

    runs = {"service": _result(1000)}
    for rnd, (served, offline) in enumerate([(800, 1000), (900, 1000), (600, 1000)], start=1):
        suffix = "" if rnd == 1 else f"#{rnd}"
        runs[f"service-n1-t0{suffix}"] = _result(served, ttft_p99=0.006)
        runs[f"offline-n1-t0{suffix}"] = _result(offline, ttft_p99=0.004)
    (row,) = client_ratios(runs)
    assert row["rounds"] == 3 and row["clients"] == 1 and row["temperature"] == 0.0
    assert row["served"] == pytest.approx(800) and row["offline"] == pytest.approx(1000)
    assert row["ratio"] == pytest.approx(0.8) and row["ratio_range"] == pytest.approx((0.6, 0.9))
    assert row["ttft_ratio"] == pytest.approx(1.5)
    table = "\n".join(client_table([row], {"client_requests": 12, "client_rounds": 3}))
    assert "| 1 | 0 | 800 | 1000 | 0.80× (0.60–0.90) | ≥ 0.8× | yes |" in table
    assert "1.50× (yes)" in table  # TTFT within 1.5x the offline engine's
    meta = {"config": {"prompt_len": (8, 8), "output_len": (8, 8), "seed": 0, "concurrency": 1,
                       "num_requests": 1, "none_requests": 1, "client_rounds": 3},
            "date": "d", "machine": "m", "loadavg": "0", "command": "c"}  # fmt: skip
    text = markdown_block(runs, meta)
    assert text.count("| 1 | 0 | 800 |") == 1  # the clients table's row
    assert "service-n1" not in text and "offline-n1" not in text  # the 6 client runs stay out of the main table


def test_clients_check_end_to_end(tiny_bundle: Path, tmp_path: Path) -> None:
    """Two rounds of one row: offline, served, thin server in round 1, rotated in round 2, every
    run complete, and both tables written."""
    doc = tmp_path / "BENCHMARKS.md"
    out_json = tmp_path / "compare.json"
    argv = [
        "--bundle", str(tiny_bundle), "--checks", "clients", "--client-counts", "1", "--client-requests", "2",
        "--client-rounds", "2", "--out", str(doc), "--img-dir", str(tmp_path / "img"), "--json-out", str(out_json),
        "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    assert main(argv) == 0
    runs = json.loads(out_json.read_text())["runs"]
    keys = [k for k in runs if k.startswith(("service-n", "offline-n", "thin-n"))]
    assert keys == ["offline-n1-t0", "service-n1-t0", "thin-n1-t0", "service-n1-t0#2", "thin-n1-t0#2",
                    "offline-n1-t0#2", "offline-n1-t0.8", "service-n1-t0.8", "thin-n1-t0.8",
                    "service-n1-t0.8#2", "thin-n1-t0.8#2", "offline-n1-t0.8#2"]  # fmt: skip
    for k in keys:
        s = runs[k]["summary"]
        assert s["completed"] == 2 and s["failed"] == 0 and s["total_output_tokens"] == 2 * 128, k
    text = doc.read_text()
    assert "2 rounds per row" in text and "| 1 | 0.8 |" in text
    assert "thinnest server around the engine" in text and text.count("| 1 | 0.8 |") == 2  # both tables
    assert "![Clients check](img/serving-clients.png)" in text
    assert (tmp_path / "img" / "serving-clients.png").stat().st_size > 1000
    assert not (tmp_path / "img" / "serving-compare.png").exists()  # no main run: no main plot
