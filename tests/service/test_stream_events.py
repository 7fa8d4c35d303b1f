"""Joining queued outputs into one stream event: ``choices.merge_outputs`` (pure), ``Pending``
(the HTTP side's per-request queue, no server), the chunks written from a joined output, and
the wire (service.process.wire) that carries requests to the worker and each step's events back."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from fakes import make_fake_bundle

from bundle.tokenizer import Tokenizer
from service.engine.types import RequestOutput, RequestTimings, SamplingParams, TopLogprob
from service.http import formatting as fmt
from service.http import protocol as p
from service.http.choices import Choice, merge_outputs
from service.http.errors import ApiError
from service.http.jobs import Job, ModelInfo
from service.process.frontend import Fail, Pending
from service.process.wire import (
    Abort,
    Ack,
    EngineChannel,
    FrameReader,
    FrontendChannel,
    Output,
    Refusal,
    Submit,
    encode,
    new_channel_id,
)

UID = "cmpl-1"


def _out(
    index: int, n: int, total: int, *, text: str | None = None, logprobs: bool = False, **kw
) -> RequestOutput:
    """The output of step ``total`` (1-based) of choice ``index``: one token, ``n + total``."""
    tok = 10 * n + total
    return RequestOutput(
        request_id=f"{UID}#{index}",
        new_token_ids=[tok],
        text_delta=f"<{tok}>" if text is None else text,
        new_logprobs=[-float(total)] if logprobs else None,
        new_top_logprobs=[[TopLogprob(tok, -float(total)), TopLogprob(7, -9.0)]] if logprobs else None,
        num_prompt_tokens=3,
        num_output_tokens=total,
        **kw,
    )


def _ev(index: int, out: RequestOutput) -> Output:
    return Output(UID, index, out)


def _one_choice(steps: int) -> list[Output]:
    """The events of ``steps`` steps of a one-choice request, the last one finishing it."""
    last = {"finished": True, "finish_reason": "length"}
    return [_ev(0, _out(0, 0, t, **(last if t == steps else {}))) for t in range(1, steps + 1)]


def _pending(n: int, cap: int) -> Pending:
    job = Job(UID, ([1, 2, 3],), tuple(SamplingParams(max_tokens=8) for _ in range(n)), (0,) * n, stream=True)
    return Pending(job, arrival=0.0, max_tokens_per_event=cap)


def _drain(p: Pending, events: list) -> list[tuple[int, RequestOutput]]:
    """Queue every event at once (as the dispatcher does with a backlog), then read the
    outputs until the request is complete; never waits for an event that is not there."""

    async def go() -> list[tuple[int, RequestOutput]]:
        for ev in events:
            p.put(ev)
        got = []
        async with asyncio.timeout(5):  # a bug that waits for a missing event fails, not hangs
            async for c, out in p.outputs():
                got.append((c.index, out))
        return got

    return asyncio.run(go())


# -- merge_outputs -------------------------------------------------------------------------------


def test_merge_concatenates_tokens_text_and_logprobs_and_keeps_the_last_finish():
    timings = RequestTimings(arrival=0.0)
    outs = [
        _out(0, 0, 1, logprobs=True),
        _out(0, 0, 2, text="", logprobs=True),  # held back by the detokenizer
        _out(0, 0, 3, logprobs=True, finished=True, finish_reason="stop", stop_reason=2, timings=timings),
    ]
    m = merge_outputs(outs)
    assert m.new_token_ids == [1, 2, 3] and m.text_delta == "<1><3>"
    assert m.new_logprobs == [-1.0, -2.0, -3.0]
    assert [[t.token_id for t in alts] for alts in m.new_top_logprobs] == [[1, 7], [2, 7], [3, 7]]
    assert (m.finished, m.finish_reason, m.stop_reason, m.timings) == (True, "stop", 2, timings)
    assert (m.num_prompt_tokens, m.num_output_tokens, m.request_id) == (3, 3, f"{UID}#0")
    assert outs[0].new_token_ids == [1]  # the inputs are not modified


def test_merge_without_logprobs_has_none_and_one_output_is_itself():
    outs = [_out(0, 0, 1), _out(0, 0, 2)]
    m = merge_outputs(outs)
    assert m.new_logprobs is None and m.new_top_logprobs is None and not m.finished
    assert merge_outputs(outs[:1]) is outs[0]


# -- Pending: what is joined, what is not ----------------------------------------------------------


def test_queued_outputs_of_a_stream_become_one_output():
    p = _pending(1, cap=16)
    got = _drain(p, _one_choice(5))
    assert [out.new_token_ids for _, out in got] == [[1, 2, 3, 4, 5]]
    c = p.choices[0]
    assert c.num_output_tokens == 5 and c.finish_reason == "length" and "".join(c.text) == "<1><2><3><4><5>"
    assert len(c.itl) == 4  # tokens - 1 gaps, as if they had come one by one


def test_the_cap_splits_a_backlog_and_one_disables_joining():
    events = _one_choice(5)
    sizes = [len(out.new_token_ids) for _, out in _drain(_pending(1, cap=2), events)]
    assert sizes == [2, 2, 1]
    assert [len(out.new_token_ids) for _, out in _drain(_pending(1, cap=1), events)] == [1] * 5


def test_choices_are_joined_separately_and_keep_their_order():
    """Three steps of two choices, interleaved as the worker sends them; choice 1 finishes first."""
    events = [
        _ev(0, _out(0, 0, 1)),
        _ev(1, _out(1, 5, 1)),
        _ev(0, _out(0, 0, 2)),
        _ev(1, _out(1, 5, 2, finished=True, finish_reason="stop")),
        _ev(0, _out(0, 0, 3, finished=True, finish_reason="length")),
    ]
    p = _pending(2, cap=16)
    got = _drain(p, events)
    assert [(i, out.new_token_ids, out.finished) for i, out in got] == [
        (0, [1, 2, 3], True),
        (1, [51, 52], True),
    ]
    assert [c.finish_reason for c in p.choices] == ["length", "stop"] and p.complete


def test_a_lone_output_is_returned_at_once():
    """Nothing waits for a token that has not arrived: one queued output comes out alone."""

    async def go() -> tuple[list[int], list[int]]:
        p = _pending(1, cap=16)
        p.put(_ev(0, _out(0, 0, 1)))
        async with asyncio.timeout(5):
            _, first = await p.next_event()
            p.put(_ev(0, _out(0, 0, 2)))
            _, second = await p.next_event()
        return first.new_token_ids, second.new_token_ids

    assert asyncio.run(go()) == ([1], [2])


def test_nothing_is_joined_across_an_error():
    """Outputs queued after a failed choice stay behind the error, which is raised as today."""
    events = [
        _ev(0, _out(0, 0, 1)),
        _ev(0, _out(0, 0, 2)),
        _ev(1, _out(1, 5, 1, finished=True, finish_reason="error", error="boom")),
        _ev(0, _out(0, 0, 3)),
    ]
    p = _pending(2, cap=16)

    async def go() -> list[int]:
        for ev in events:
            p.put(ev)
        _, out = await p.next_event()
        with pytest.raises(ApiError, match="boom"):
            await p.next_event()
        return out.new_token_ids

    assert asyncio.run(go()) == [1, 2]


def test_nothing_is_joined_across_a_failure_event():
    p = _pending(1, cap=16)

    async def go() -> list[int]:
        p.put(_ev(0, _out(0, 0, 1)))
        p.put(Fail(ApiError("unavailable", "the server is shutting down")))
        p.put(_ev(0, _out(0, 0, 2)))
        _, out = await p.next_event()
        with pytest.raises(ApiError, match="shutting down"):
            await p.next_event()
        return out.new_token_ids

    assert asyncio.run(go()) == [1]


def test_itl_of_a_joined_output_spreads_its_gap():
    c = Choice(0)
    c.add(_out(0, 0, 1), now=1.0)
    c.add(merge_outputs([_out(0, 0, 2), _out(0, 0, 3), _out(0, 0, 4)]), now=1.3)
    assert c.itl == pytest.approx([0.1, 0.1, 0.1]) and c.num_output_tokens == 4


# -- chunks written from a joined output -------------------------------------------------------------


@pytest.fixture(scope="module")
def model_info(tmp_path_factory) -> ModelInfo:
    bundle = make_fake_bundle(tmp_path_factory.mktemp("fake") / "bundle")
    return ModelInfo("fake", 128, Tokenizer.load(bundle / "tokenizer.model"), add_bos=True)


def _joined(m: ModelInfo, text: str, logprobs: int) -> tuple[Choice, RequestOutput, list[int]]:
    """A choice that already got "So", then a joined output with the tokens of ``text``."""
    ids = m.tokenizer.encode(text)
    outs = [
        RequestOutput(
            request_id=f"{UID}#0",
            new_token_ids=[t],
            text_delta=m.tokenizer.decode([t]),
            new_logprobs=[-0.25 * (k + 1)],
            new_top_logprobs=[[TopLogprob(t, -0.25 * (k + 1)), TopLogprob(5, -4.0)][:logprobs]],
            num_output_tokens=k + 2,
        )
        for k, t in enumerate(ids)
    ]
    merged = merge_outputs(outs)
    merged.text_delta = text  # the detokenizer's exact text for these tokens
    c = Choice(0)
    c.add(RequestOutput(f"{UID}#0", [9], "So", num_output_tokens=1), now=0.0)
    c.add(merged, now=1.0)
    return c, merged, ids


def test_completion_chunk_has_one_logprobs_entry_per_token(model_info):
    m = model_info
    job = Job(UID, ([1],), (SamplingParams(logprobs=2),), (0,), stream=True, logprobs="completion")
    c, out, ids = _joined(m, " fair summer", logprobs=2)
    chunk = json.loads(fmt.completion_chunk(job, m, c, out, c.prev_text_len).removeprefix("data: "))
    choice = chunk["choices"][0]
    lp = choice["logprobs"]
    assert len(ids) > 1 and choice["text"] == " fair summer"
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids)
    assert lp["token_logprobs"] == [-0.25 * (k + 1) for k in range(len(ids))]
    assert "".join(lp["tokens"]) == " fair summer"
    # each token's offset in the choice's whole text, which starts with "So"
    assert lp["text_offset"][0] == 2
    gaps = [b - a for a, b in itertools.pairwise(lp["text_offset"])]
    assert gaps == [len(t) for t in lp["tokens"][:-1]]


def test_chat_chunk_has_one_logprobs_entry_per_token(model_info):
    m = model_info
    job = Job(UID, ([1],), (SamplingParams(logprobs=1),), (0,), stream=True, logprobs="chat")
    c, out, ids = _joined(m, " fair summer", logprobs=1)
    chunk = json.loads(fmt.chat_chunk(job, m, c, out).removeprefix("data: "))
    choice = chunk["choices"][0]
    content = choice["logprobs"]["content"]
    assert choice["delta"]["content"] == " fair summer" and len(content) == len(ids)
    assert "".join(e["token"] for e in content) == " fair summer"
    assert [e["logprob"] for e in content] == [-0.25 * (k + 1) for k in range(len(ids))]
    assert all(len(e["top_logprobs"]) == 1 for e in content)


# -- the channel between the worker and the HTTP process (real Unix sockets, in one process) ---------


def test_channel_carries_requests_in_order_and_each_steps_events_as_one_message():
    channel_id = new_channel_id()
    engine = EngineChannel(channel_id)
    outputs = [RequestOutput(f"{UID}#0", [k], "x", num_output_tokens=k + 1) for k in range(3)]

    async def go():
        front = FrontendChannel(channel_id, 0)
        try:
            params = (SamplingParams(max_tokens=2),)
            sent = [Submit(0, f"r{k}", ([1, 2],), params, 1.0, 2.0) for k in range(5)]
            sent.append(Abort(0, "r0"))
            for m in sent:
                front.send(m)
            got: list = []
            async with asyncio.timeout(10):
                while len(got) < len(sent):  # the worker side polls; nothing is lost or reordered
                    got += engine.receive(0.05, 1024)
            assert got == sent
            assert engine.receive(0.0, 10) == []  # no message waiting: returns at once
            engine.send(0, [Ack(UID), *[Output(UID, 0, o) for o in outputs]])
            engine.send(0, [Refusal("r9", "queue_full", "full")])
            async with asyncio.timeout(10):
                first, second = await front.receive(), await front.receive()
            return first, second
        finally:
            front.close()

    try:
        first, second = asyncio.run(go())
    finally:
        engine.close()
    assert first[0] == Ack(UID) and [ev.output for ev in first[1:]] == outputs
    assert second == [Refusal("r9", "queue_full", "full", None)]


def test_channels_of_two_services_do_not_cross():
    a, b = EngineChannel(new_channel_id()), EngineChannel(new_channel_id())
    try:
        assert a.channel_id != b.channel_id
        front = None

        async def go():
            nonlocal front
            front = FrontendChannel(a.channel_id, 0)
            front.send(Abort(0, "only-a"))
            async with asyncio.timeout(10):
                got: list = []
                while not got:
                    got = a.receive(0.05, 10)
            return got

        assert asyncio.run(go())[0].uid == "only-a"
        assert b.receive(0.05, 10) == []
        front.close()
    finally:
        a.close()
        b.close()


def test_frames_split_anywhere_are_decoded_whole_and_in_order():
    frames = b"".join(encode(obj) for obj in ([Ack("a")], Abort(0, "b"), "x" * 70_000))
    for step in (1, 3, 4, 5, 4096, len(frames)):
        reader, got = FrameReader(), []
        for k in range(0, len(frames), step):
            got += reader.feed(frames[k : k + step])
        assert got == [[Ack("a")], Abort(0, "b"), "x" * 70_000], step


def test_a_message_larger_than_the_socket_buffer_waits_in_the_senders_buffer_not_the_sender():
    channel_id = new_channel_id()
    engine = EngineChannel(channel_id)
    big = [Refusal("r", "validation", "y" * 8_000_000)]  # far more than a Unix socket buffers

    async def go():
        front = FrontendChannel(channel_id, 3)
        try:
            async with asyncio.timeout(10):
                while not engine.receive(0.01, 1):  # reads the hello: rqid 3 is known
                    front.send(Abort(3, "ping"))
                engine.send(3, big)  # returns at once; the rest goes out as the reader drains it
                engine.send(3, [Ack("after")])
                got = []
                while len(got) < 2:
                    engine.receive(0.0, 10)  # the worker's loop flushes what waits
                    try:
                        async with asyncio.timeout(0.01):
                            got.append(await front.receive())
                    except TimeoutError:
                        pass
            return got
        finally:
            front.close()

    try:
        got = asyncio.run(go())
    finally:
        engine.close()
    assert got == [big, [Ack("after")]]


def test_an_http_process_that_left_is_forgotten_and_its_events_dropped():
    channel_id = new_channel_id()
    engine = EngineChannel(channel_id)

    async def go():
        front = FrontendChannel(channel_id, 1)
        front.send(Abort(1, "x"))
        async with asyncio.timeout(10):
            while not engine.receive(0.01, 1):
                pass
        front.close()

    try:
        asyncio.run(go())
        deadline = 50
        while 1 in engine._by_rqid and deadline:  # the worker notices the hang-up when it next reads
            engine.receive(0.01, 1)
            deadline -= 1
        assert 1 not in engine._by_rqid
        engine.send(1, [Ack("nobody")])  # no error: there is no one to tell
    finally:
        engine.close()


def test_an_output_with_every_field_set_survives_the_wire():
    from service.engine.types import RequestTimings

    out = RequestOutput(
        f"{UID}#2", [1, 2], "ab", True, "stop", "x", [-0.1, -0.2], [[TopLogprob(1, -0.1)]], 3, 4,
        [None, -1.0], [[TopLogprob(5, -2.0)]], RequestTimings(1.0, 2.0, 3.0, 4.0, [3.0]), "why",
    )  # fmt: skip
    assert FrameReader().feed(encode([Output(UID, 2, out), Ack(UID)])) == [[Output(UID, 2, out), Ack(UID)]]


# -- text-only chunks: a frame made once by pydantic, filled with each text ----------------------------

TRICKY_TEXTS = ["So", ' "quoted" \\ back', "line\nbreak\ttab\r", "\x00\x01\x1f\x7f", "été 日本 🎭", "</script>", "\u2028"]


@pytest.mark.parametrize("chat", [False, True])
def test_text_only_chunks_are_byte_for_byte_what_pydantic_writes(model_info: ModelInfo, chat: bool):
    from dataclasses import replace

    job = Job(UID, ([1, 2],), (SamplingParams(max_tokens=8),) * 2, (0, 0), stream=True)
    for name, framed in (("fake", True), ("a @@textgen-chunk-text@@ b", True), ("@@textgen-chunk-text@@", False)):
        m = replace(model_info, name=name)
        c = Choice(1)
        for text in TRICKY_TEXTS:
            out = RequestOutput(f"{UID}#1", [5], text, num_output_tokens=1)
            got = (fmt.chat_chunk(job, m, c, out) if chat else fmt.completion_chunk(job, m, c, out, 0))
            if chat:
                choice = p.ChatChunkChoice(index=1, delta=p.ChatDelta(content=text))
                want = p.ChatCompletionChunk(id=UID, created=m.created, model=name, choices=[choice])
            else:
                choice = p.CompletionChoice(index=1, text=text, logprobs=None, finish_reason=None)
                want = p.CompletionResponse(id=UID, created=m.created, model=name, choices=[choice])
            assert got == f"data: {want.model_dump_json()}\n\n", (name, text)
        assert bool(c.text_frame) == framed  # a model named as the placeholder gets pydantic's chunks
        empty = RequestOutput(f"{UID}#1", [5], "", num_output_tokens=2)  # text held back: nothing to send
        assert (fmt.chat_chunk(job, m, c, empty) if chat else fmt.completion_chunk(job, m, c, empty, 0)) is None

