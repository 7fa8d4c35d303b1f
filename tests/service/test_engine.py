"""The engine against the PyTorch model: continuous batching must not change a single token.

Every engine test runs on both KV cache layouts: "inplace" (model.kvinplace.onnx over buffers
allocated once) and "concat" (model.onnx, the cache concatenated every step).
"""

from __future__ import annotations

import dataclasses
import random
import time

import numpy as np
import pytest

from bundle.format import load_bundle
from service.engine.config import EngineConfig
from service.engine.engine import Engine
from service.engine.types import InvalidRequestError, PromptTooLongError, QueueFullError, SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)
KV_INPLACE = {"inplace": "auto", "concat": "off"}  # layout -> the Engine's kv_inplace setting


@pytest.fixture(scope="module", params=list(KV_INPLACE))
def layout(request) -> str:
    return request.param


def make_engine(bundle_dir, layout: str, **kwargs) -> Engine:
    if layout == "inplace":
        kwargs.setdefault("provider", "cpu")  # "auto" would choose CUDA, and so concat, on a GPU machine
    engine = Engine(load_bundle(bundle_dir), EngineConfig(kv_inplace=KV_INPLACE[layout], **kwargs))
    assert engine.kv_layout == layout
    return engine


@pytest.fixture(scope="module")
def engine_and_model(random_model_and_bundle, layout):
    model, bundle_dir = random_model_and_bundle
    return make_engine(bundle_dir, layout, max_running=8, max_prefill_tokens=64), model


def run_to_completion(engine: Engine, schedule: dict[int, list] | None = None) -> dict[str, dict]:
    """Step until idle; ``schedule[step]`` holds callables run before that step (joins, aborts)."""
    results: dict[str, dict] = {}
    step = 0
    while engine.has_unfinished() or (schedule and any(k >= step for k in schedule)):
        for action in (schedule or {}).get(step, []):
            action()
        for out in engine.step():
            r = results.setdefault(out.request_id, {"tokens": [], "text": "", "finish": None, "logprobs": []})
            r["tokens"] += out.new_token_ids
            r["text"] += out.text_delta
            r["logprobs"] += out.new_logprobs or []
            if out.finished:
                r["finish"], r["out"] = out.finish_reason, out
        step += 1
        assert step < 10_000
    return results


def check_idle(engine: Engine) -> None:
    engine.scheduler.check_invariants()
    assert engine.load().num_running == engine.load().num_waiting == 0
    assert engine.load().kv_cache_usage == 0
    assert engine._batch.num_live == 0 and not engine._seqs


def test_greedy_batch_with_joins_and_aborts_equals_each_prompt_alone(engine_and_model) -> None:
    from model.gpt import generate_greedy

    engine, model = engine_and_model
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(4, 500) for _ in range(n)] for n in (3, 40, 9, 17, 1, 60, 25, 5, 12, 33)]
    lengths = [20, 7, 30, 12, 25, 9, 16, 28, 11, 19]
    expected = [generate_greedy(model, p, n) for p, n in zip(prompts, lengths, strict=True)]
    assert len({tuple(e) for e in expected}) > 5  # the model's continuations differ: a real check

    def add(i: int):
        return lambda: engine.add_request(f"r{i}", prompts[i], SamplingParams(max_tokens=lengths[i], **GREEDY))

    schedule = {0: [add(0), add(1), add(2)], 2: [add(3), add(4)], 5: [add(5), add(6), add(7)], 9: [add(8)],
                14: [add(9)], 3: [lambda: engine.add_request("gone", prompts[1], SamplingParams(max_tokens=30, **GREEDY))],
                6: [lambda: engine.abort("gone")]}
    res = run_to_completion(engine, schedule)
    for i in range(10):
        assert res[f"r{i}"]["tokens"] == expected[i], f"request {i} diverged"
        assert res[f"r{i}"]["finish"] == "length"
    assert res["gone"]["finish"] == "abort" and 0 < len(res["gone"]["tokens"]) < 30
    check_idle(engine)


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(engine_and_model) -> None:
    engine, _ = engine_and_model
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=42, ignore_eos=True)
    prompt = [1, 50, 60, 70]
    engine.add_request("alone", prompt, params)
    alone = run_to_completion(engine)["alone"]["tokens"]
    noise = random.Random(1)
    for i in range(6):
        p = [1] + [noise.randrange(4, 500) for _ in range(noise.randrange(1, 50))]
        engine.add_request(f"n{i}", p, SamplingParams(max_tokens=noise.randrange(5, 30), temperature=1.0, ignore_eos=True))
    engine.add_request("busy", prompt, params)
    busy = run_to_completion(engine)["busy"]["tokens"]
    assert busy == alone
    engine.add_request("other-seed", prompt, dataclasses.replace(params, seed=7))
    assert run_to_completion(engine)["other-seed"]["tokens"] != alone


def test_no_leaks_after_thousands_of_requests_with_random_aborts(random_bundle, layout) -> None:
    engine = make_engine(random_bundle, layout, max_running=16, max_waiting=64, kv_budget_tokens=1500,
                         max_prefill_tokens=128)
    rng = random.Random(7)
    submitted, finished, live = 0, {}, set()
    while submitted < 2000 or engine.has_unfinished():
        while submitted < 2000 and engine.load().num_waiting < 32:
            rid = f"q{submitted}"
            engine.add_request(rid, [1] + [rng.randrange(4, 500) for _ in range(rng.randrange(1, 30))],
                               SamplingParams(max_tokens=rng.randrange(1, 8), temperature=rng.choice([0.0, 1.0])))
            live.add(rid)
            submitted += 1
        for rid in rng.sample(sorted(live), k=min(len(live), rng.randrange(0, 3))):
            engine.abort(rid)
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finished, "a request finished twice"
                finished[out.request_id] = out.finish_reason
                live.discard(out.request_id)
        engine.scheduler.check_invariants()
        assert engine._batch.num_live == engine.load().num_running  # every running sequence has exactly one cache row
        assert engine._batch.cached_tokens <= engine.kv_budget_tokens
        if layout == "inplace":
            engine._batch.slots.check_invariants()  # live rows hold slots 0..n-1
    assert len(finished) == 2000
    assert set(finished.values()) <= {"length", "abort", "stop"}
    assert "abort" in finished.values()
    check_idle(engine)


def test_stop_strings_stop_tokens_and_logprobs(engine_and_model) -> None:
    engine, _ = engine_and_model
    prompt = [1, 100, 200]
    engine.add_request("free", prompt, SamplingParams(max_tokens=30, logprobs=2, **GREEDY))
    free = run_to_completion(engine)["free"]
    assert len(free["logprobs"]) == 30 and all(lp <= 0 for lp in free["logprobs"])
    text = free["text"]
    # a stop string of two visible characters from the second half of the text
    start = next(i for i in range(len(text) // 2, len(text) - 1) if text[i : i + 2].strip() == text[i : i + 2])
    stop = text[start : start + 2]
    engine.add_request("s", prompt, SamplingParams(max_tokens=30, stop=(stop,), **GREEDY))
    r = run_to_completion(engine)["s"]
    assert r["finish"] == "stop" and r["out"].stop_reason == stop
    assert r["text"] == text[: text.index(stop)]
    tok = free["tokens"][5]
    engine.add_request("t", prompt, SamplingParams(max_tokens=30, stop_token_ids=(tok,), **GREEDY))
    r = run_to_completion(engine)["t"]
    first = free["tokens"].index(tok)
    assert r["finish"] == "stop" and r["tokens"] == free["tokens"][: first + 1]
    check_idle(engine)


def test_deadline_finishes_as_length(engine_and_model) -> None:
    engine, _ = engine_and_model
    engine.add_request("late", [1, 5], SamplingParams(max_tokens=50, **GREEDY), deadline=time.monotonic() - 1)
    r = run_to_completion(engine)["late"]
    assert r["finish"] == "length" and len(r["tokens"]) == 1
    check_idle(engine)


def test_step_stats_split_the_step_time(engine_and_model) -> None:
    """schedule_time + model_time + the rest = step_time, for prefill and decode steps alike."""
    engine, _ = engine_and_model
    engine.add_request("phases", [1, 5, 9], SamplingParams(max_tokens=3, **GREEDY))
    prefill, tokens = [], 0
    while engine.has_unfinished():
        tokens += sum(len(o.new_token_ids) for o in engine.step())
        s = engine.last_step_stats
        assert s.model_time > 0 and s.schedule_time >= 0
        assert s.schedule_time + s.model_time <= s.step_time
        prefill.append(s.num_prefill_tokens)
    assert prefill[0] == 3 and tokens == 3  # a prefill step, then decode steps (speculative or not)
    check_idle(engine)


def test_request_errors(random_bundle, layout) -> None:
    engine = make_engine(random_bundle, layout, max_running=1, max_waiting=1)
    with pytest.raises(PromptTooLongError, match="250 tokens and max_tokens is 10"):
        engine.add_request("long", [1] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.add_request("oov", [1, 99999], SamplingParams())
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(InvalidRequestError, match="temperature"):
        engine.add_request("nan", [1], SamplingParams(temperature=float("nan")))
    engine.add_request("a", [1, 2], SamplingParams(max_tokens=3))
    with pytest.raises(QueueFullError):
        engine.add_request("b", [1, 2], SamplingParams(max_tokens=3))
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("a", [1, 2], SamplingParams(max_tokens=3))
    run_to_completion(engine)
    check_idle(engine)


def test_batch_padding_is_trimmed_when_long_rows_leave(engine_and_model) -> None:
    engine, _ = engine_and_model
    if engine.kv_layout != "concat":
        pytest.skip("the in-place layout has no padding columns: each row has its own length")
    engine.add_request("long", [1, *range(10, 110)], SamplingParams(max_tokens=2, **GREEDY))
    engine.add_request("short", [1, 5], SamplingParams(max_tokens=20, **GREEDY))
    widths = []
    while engine.has_unfinished():
        engine.step()
        widths.append(engine._batch.slots.width)
    assert max(widths) >= 101
    assert min(w for w in widths if w) < 30  # after "long" left, its padding went with it
    check_idle(engine)


def test_logits_dtype_and_provider(engine_and_model) -> None:
    engine, _ = engine_and_model
    assert engine.provider == "CPUExecutionProvider"
    assert engine.runner.kv_dtype == np.float32


def test_inplace_rows_stay_contiguous_and_leavers_hand_their_slot_to_the_last_row(random_bundle) -> None:
    engine = make_engine(random_bundle, "inplace", max_running=4)
    lengths = {"a": 2, "b": 9, "c": 5}
    for rid, n in lengths.items():
        engine.add_request(rid, [1, 10 + len(rid), 20], SamplingParams(max_tokens=n, **GREEDY))
    slots = engine._batch.slots
    engine.step()
    assert slots.live_ids == ["a", "b", "c"]
    engine.step()  # "a" finishes: "c", the last row, moves into slot 0
    assert slots.live_ids == ["c", "b"] and list(slots.lengths[:3]) == [4, 4, 0]
    engine.abort("b")
    engine.step()
    assert slots.live_ids == ["c"]
    run_to_completion(engine)
    check_idle(engine)
    with pytest.raises(ValueError, match="kv_inplace must be"):
        Engine(load_bundle(random_bundle), EngineConfig(kv_inplace="on"))  # type: ignore[arg-type]


def test_kv_inplace_setting_is_validated() -> None:
    from service.settings import Settings, SettingsError

    assert Settings.from_env({}).kv_inplace == "auto"
    assert Settings.from_env({"TEXTGEN_KV_INPLACE": "off"}).kv_inplace == "off"
    with pytest.raises(SettingsError, match="TEXTGEN_KV_INPLACE"):
        Settings.from_env({"TEXTGEN_KV_INPLACE": "on"})


# ---- speculative greedy steps (n-gram drafts, in-place layout, one running sequence) -------------
def run_counting_drafts(engine: Engine) -> tuple[dict[str, dict], int, int]:
    """run_to_completion, plus the draft tokens checked and kept over all steps."""
    results: dict[str, dict] = {}
    drafted = kept = 0
    while engine.has_unfinished():
        for out in engine.step():
            r = results.setdefault(out.request_id, {"tokens": [], "text": "", "logprobs": [], "finish": None})
            r["tokens"] += out.new_token_ids
            r["text"] += out.text_delta
            r["logprobs"] += out.new_logprobs or []
            if out.finished:
                r["finish"], r["out"] = out.finish_reason, out
        drafted += engine.last_step_stats.num_draft_tokens
        kept += engine.last_step_stats.num_accepted_draft_tokens
    return results, drafted, kept


def repetitive_prompt(rng: random.Random) -> list[int]:
    pattern = [rng.randrange(4, 500) for _ in range(rng.randrange(2, 7))]
    return [1, *pattern * 4, *pattern[: rng.randrange(len(pattern))]]


def test_speculative_greedy_is_token_for_token_plain_greedy(random_model_and_bundle) -> None:
    from model.gpt import generate_greedy

    model, bundle_dir = random_model_and_bundle
    engine = make_engine(bundle_dir, "inplace", speculative_tokens=4)
    assert engine.speculative_tokens == 4
    rng = random.Random(1)
    drafted = kept = 0
    for i in range(8):
        prompt, n = repetitive_prompt(rng), rng.randrange(5, 40)
        engine.add_request(f"s{i}", prompt, SamplingParams(max_tokens=n, **GREEDY))
        res, d, k = run_counting_drafts(engine)
        assert res[f"s{i}"]["tokens"] == generate_greedy(model, prompt, n)
        assert res[f"s{i}"]["finish"] == "length" and res[f"s{i}"]["out"].num_output_tokens == n
        drafted, kept = drafted + d, kept + k
        check_idle(engine)
        engine._batch.slots.check_invariants()
    assert drafted > 0 and kept > 0  # steps were speculative, and some drafts were right


def test_a_greedy_row_indexes_its_tokens_only_when_it_runs_alone(random_model_and_bundle) -> None:
    """Batched, a greedy row pays nothing per token for its n-gram index; left alone, the index
    catches up with the prompt and the output so far, and its drafts keep the tokens exact."""
    from model.gpt import generate_greedy

    model, bundle_dir = random_model_and_bundle
    engine = make_engine(bundle_dir, "inplace", speculative_tokens=3, max_running=4)
    rng = random.Random(5)
    short, long = repetitive_prompt(rng), repetitive_prompt(rng)
    engine.add_request("short", short, SamplingParams(max_tokens=6, **GREEDY))
    engine.add_request("long", long, SamplingParams(max_tokens=40, **GREEDY))
    tokens: dict[str, list[int]] = {"short": [], "long": []}
    drafted_alone = 0
    while engine.has_unfinished():
        together = engine.load().num_running == 2
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        if together and "short" in engine._seqs:
            assert len(engine._seqs["long"].ngram) == 0  # nothing indexed while batched
        if not together:
            drafted_alone += engine.last_step_stats.num_draft_tokens
        seq = engine._seqs.get("long")
        if seq is not None and len(seq.ngram):
            assert seq.ngram.tokens == (seq.prompt + seq.output)[: len(seq.ngram)]
    assert tokens["long"] == generate_greedy(model, long, 40)
    assert tokens["short"] == generate_greedy(model, short, 6)
    assert drafted_alone > 0
    check_idle(engine)


def test_speculation_keeps_penalties_logprobs_and_stops(random_bundle) -> None:
    spec = make_engine(random_bundle, "inplace", speculative_tokens=3)
    plain = make_engine(random_bundle, "inplace", speculative_tokens=0)
    rng = random.Random(2)
    drafted = 0
    for i in range(6):
        prompt = repetitive_prompt(rng)
        params = [
            SamplingParams(max_tokens=30, logprobs=2, **GREEDY),
            SamplingParams(max_tokens=30, repetition_penalty=1.3, frequency_penalty=0.5, **GREEDY),
        ][i % 2]
        ref, _, _ = run_counting_drafts(_add(plain, "r", prompt, params))
        stop_tok = ref["r"]["tokens"][len(ref["r"]["tokens"]) // 2]  # a stop token met mid-way
        got, d, _ = run_counting_drafts(_add(spec, "r", prompt, params))
        drafted += d
        assert got["r"]["tokens"] == ref["r"]["tokens"] and got["r"]["text"] == ref["r"]["text"]
        np.testing.assert_allclose(got["r"]["logprobs"], ref["r"]["logprobs"], atol=1e-4)
        stopping = dataclasses.replace(params, stop_token_ids=(stop_tok,), ignore_eos=True)
        ref_stop, _, _ = run_counting_drafts(_add(plain, "t", prompt, stopping))
        got_stop, _, _ = run_counting_drafts(_add(spec, "t", prompt, stopping))
        assert got_stop["t"]["tokens"] == ref_stop["t"]["tokens"]
        assert got_stop["t"]["tokens"][-1] == stop_tok and got_stop["t"]["finish"] == "stop"
        check_idle(spec)
    assert drafted > 0


def _add(engine: Engine, rid: str, prompt: list[int], params: SamplingParams) -> Engine:
    engine.add_request(rid, prompt, params)
    return engine


def test_no_speculation_on_the_concat_layout_or_with_company(random_bundle) -> None:
    assert make_engine(random_bundle, "concat", speculative_tokens=3).speculative_tokens == 0
    engine = make_engine(random_bundle, "inplace", speculative_tokens=3, max_running=4)
    rng = random.Random(3)
    engine.add_request("a", repetitive_prompt(rng), SamplingParams(max_tokens=20, **GREEDY))
    engine.add_request("b", repetitive_prompt(rng), SamplingParams(max_tokens=20, temperature=0.8, seed=1))
    while engine.load().num_running + engine.load().num_waiting == 2:  # two rows share each step: never speculative
        engine.step()
        assert engine.last_step_stats.num_draft_tokens == 0
    run_to_completion(engine)
    with pytest.raises(ValueError, match="speculative_tokens"):
        Engine(load_bundle(random_bundle), EngineConfig(speculative_tokens=-1))


def test_prompt_logprobs_equal_the_pytorch_model_and_scoring_holds_no_slot(engine_and_model) -> None:
    """The scoring path (echo with logprobs on /v1/completions): each prompt token's logprob is
    the PyTorch model's log_softmax at the position before it, also in a batch with a decoding
    row and a left-padded neighbour; with max_tokens 0 the request ends at its prefill."""
    import torch

    engine, model = engine_and_model
    prompts = {"s1": [1, 40, 41, 300, 7, 99, 12], "s2": [1, 5, 6], "s3": [8]}
    engine.add_request("busy", [1, 2, 3], SamplingParams(max_tokens=6, **GREEDY))
    engine.step()  # "busy" decodes in the same steps as the scored prompts
    for rid, p in prompts.items():
        engine.add_request(rid, p, SamplingParams(max_tokens=0, prompt_logprobs=3, **GREEDY))
    engine.add_request("gen", prompts["s1"], SamplingParams(max_tokens=2, prompt_logprobs=0, logprobs=0, **GREEDY))
    res = run_to_completion(engine)
    for rid, p in prompts.items():
        out = res[rid]["out"]
        assert res[rid]["finish"] == "length" and res[rid]["tokens"] == [] and out.num_output_tokens == 0
        with torch.no_grad():
            ref = torch.log_softmax(model.causal_logits(torch.tensor([p]))[0].double(), dim=-1)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
        for t in range(1, len(p)):
            assert abs(out.prompt_logprobs[t] - float(ref[t - 1, p[t]])) < 1e-4
            best = torch.topk(ref[t - 1], 3)
            assert [a.token_id for a in out.prompt_top_logprobs[t]] == best.indices.tolist()
        assert out.prompt_top_logprobs[0] == []
    gen = res["gen"]
    assert len(gen["tokens"]) == 2 and gen["out"].prompt_logprobs is None  # sent with the first output only
    assert gen["finish"] == "length"
    check_idle(engine)


def test_logit_bias_forces_and_bans_tokens(engine_and_model) -> None:
    engine, _ = engine_and_model
    prompt = [1, 50, 60, 70]
    engine.add_request("plain", prompt, SamplingParams(max_tokens=8, **GREEDY))
    plain = run_to_completion(engine)["plain"]["tokens"]
    engine.add_request("forced", prompt, SamplingParams(max_tokens=8, logit_bias=((123, 100.0),), **GREEDY))
    engine.add_request("banned", prompt, SamplingParams(max_tokens=8, logit_bias=((plain[0], -100.0),), **GREEDY))
    res = run_to_completion(engine)
    assert res["forced"]["tokens"] == [123] * 8
    assert res["banned"]["tokens"][0] != plain[0]
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        engine.add_request("bad", prompt, SamplingParams(logit_bias=((10**6, 1.0),)))
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.add_request("bad", prompt, SamplingParams(max_tokens=0))  # 0 only to score the prompt
    check_idle(engine)


def test_grammar_rows_beside_free_rows_and_alone(random_bundle, layout) -> None:
    """Constrained rows (service/engine/structured.py) do not change their neighbours' tokens, greedy or
    seeded; a constrained greedy request alone does not speculate (no draft can break its grammar)
    and ends when its structure is complete."""
    import json

    from service.engine.structured import GrammarCompiler, Structure

    engine = make_engine(random_bundle, layout, max_running=8, speculative_tokens=3)
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}, "b": {"type": "integer", "minimum": 0,
              "maximum": 9}}, "required": ["a", "b"], "additionalProperties": False}  # fmt: skip
    grammar = GrammarCompiler(engine.tokenizer).compile(Structure("json_schema", schema)).grammar
    free = {"greedy": SamplingParams(max_tokens=16, **GREEDY),
            "seeded": SamplingParams(max_tokens=16, temperature=1.0, seed=5, ignore_eos=True)}  # fmt: skip
    prompt = [1, 50, 60, 70]
    alone = {}
    for rid, params in free.items():
        engine.add_request(rid, prompt, params)
        alone[rid] = run_to_completion(engine)[rid]["tokens"]
    for i in range(4):
        engine.add_request(f"c{i}", prompt, SamplingParams(max_tokens=40, temperature=1.0, seed=i, grammar=grammar))
    for rid, params in free.items():
        engine.add_request(rid, prompt, params)
    res = run_to_completion(engine)
    for rid in free:
        assert res[rid]["tokens"] == alone[rid], rid
    for i in range(4):
        assert res[f"c{i}"]["finish"] == "stop" and json.loads(res[f"c{i}"]["text"])["a"] in ("x", "y")
    engine.add_request("solo", prompt, SamplingParams(max_tokens=40, temperature=0.0, grammar=grammar))
    drafts = 0
    out = {"text": ""}
    while engine.has_unfinished():
        for o in engine.step():
            out["text"] += o.text_delta
            out["finish"] = o.finish_reason
        drafts += engine.last_step_stats.num_draft_tokens
    assert drafts == 0 and out["finish"] == "stop" and set(json.loads(out["text"])) == {"a", "b"}
    with pytest.raises(InvalidRequestError, match="grammar"):
        engine.add_request("bad", prompt, SamplingParams(grammar='{"grammars": [{"lark_grammar": "start: ("}]}'))
    check_idle(engine)


def test_a_failed_run_fails_its_rows_and_the_waiting_requests_still_run(random_bundle, layout, monkeypatch) -> None:
    """A model run that raises fails the rows it ran; a request that was waiting for a slot is
    then admitted, prefilled and served like any other (not left running without a prefill)."""
    engine = make_engine(random_bundle, layout, max_running=1, speculative_tokens=0)
    p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine.add_request("a", [1, 5, 6], p)
    engine.step()  # "a" is prefilled and holds the only slot
    engine.add_request("b", [1, 7, 8, 9], p)

    def broken(*args, **kwargs):
        raise RuntimeError("the run failed")

    monkeypatch.setattr(engine._batch, "decode", broken)
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", "error")]
    monkeypatch.undo()
    got = run_to_completion(engine)
    assert got["b"]["finish"] == "length" and len(got["b"]["tokens"]) == 4
    alone = make_engine(random_bundle, layout, max_running=1, speculative_tokens=0)
    alone.add_request("b", [1, 7, 8, 9], p)
    assert run_to_completion(alone)["b"]["tokens"] == got["b"]["tokens"]
    check_idle(engine)
