"""The inference worker's loop (service.process.worker.EngineWorker), in-process, on the fake engine:
what it sends for submits, refusals, aborts and expired requests."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
from fakes import FakeEngine, make_fake_bundle

from bundle.format import load_bundle
from service.engine.config import EngineConfig
from service.engine.types import SamplingParams
from service.process.shared_state import SharedState
from service.process.wire import Abort, Ack, Output, Refusal, Submit
from service.process.worker import EngineWorker


class Channel:
    """The worker's channel (service.process.wire.EngineChannel), recording what it sends."""

    def __init__(self):
        self.sent: list[tuple[int, list]] = []

    def receive(self, timeout_s: float, max_messages: int) -> list:
        return []

    def send(self, rqid, events):
        self.sent.append((rqid, events))

    def events(self) -> list:
        return [e for _, evs in self.sent for e in evs]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(make_fake_bundle(tmp_path_factory.mktemp("worker") / "bundle"))


def make_worker(bundle, max_running: int = 1, max_waiting: int = 1) -> EngineWorker:
    engine = FakeEngine(bundle, EngineConfig(max_running=max_running, max_waiting=max_waiting))
    steps, loads = [], []  # loads: the running and waiting gauges as published, in order

    def observe_steps(batch):
        steps.extend(batch)
        loads.append((batch[-1].num_running, batch[-1].num_waiting))

    metrics = SimpleNamespace(observe_steps=observe_steps, set_load=lambda r, w, kv: loads.append((r, w)))
    api = SimpleNamespace(engine=engine, metrics=metrics, state=SharedState(1, os.getpid()),
                          settings=SimpleNamespace(max_running=max_running))  # fmt: skip
    w = EngineWorker(api, Channel())
    w.steps, w.loads = steps, loads
    return w


@pytest.fixture
def worker(bundle, monkeypatch):
    monkeypatch.setenv("TEXTGEN_FAKE_STEP_S", "0")
    return make_worker(bundle)


def submit(w: EngineWorker, uid: str, n: int = 1, max_tokens: int = 3, deadline: float = 1e12, rqid: int = 0):
    params = tuple(SamplingParams(max_tokens=max_tokens, temperature=0) for _ in range(n))
    w._handle(Submit(rqid, uid, ([1, 5, 6],) * n, params, time.monotonic(), deadline))


def run(w: EngineWorker) -> None:
    w._flush()
    while w.engine.has_unfinished():
        w._step()
        w._beat()


def test_submit_ack_outputs_and_cleanup(worker):
    submit(worker, "a", rqid=0)
    run(worker)
    events = worker.channel.events()
    assert events[0] == Ack("a")
    outs = [e.output for e in events if isinstance(e, Output)]
    assert [len(o.new_token_ids) for o in outs] == [1, 1, 1] and outs[-1].finish_reason == "length"
    assert worker.active == {} and worker.steps


def test_one_message_per_http_process_per_iteration(worker):
    submit(worker, "a", rqid=0)
    worker._flush()
    worker.channel.sent.clear()
    worker._step()
    assert [c for c, _ in worker.channel.sent] == [0]


def test_queue_full_refuses_and_undoes_earlier_choices(worker):
    submit(worker, "a", max_tokens=50)
    worker._step()  # "a" runs: no free slot left
    submit(worker, "b", n=2)  # b#0 takes the only waiting place, b#1 does not fit
    worker._flush()
    errors = [e for e in worker.channel.events() if isinstance(e, Refusal)]
    assert errors == [Refusal("b", "queue_full", errors[0].message, None)]
    assert "b" not in worker.active and worker.engine.load().num_waiting == 0 and worker.engine.load().num_running == 1


def test_abort_stops_the_outputs(worker):
    submit(worker, "a", max_tokens=50)
    worker._flush()
    worker._step()
    worker._handle(Abort(0, "a"))
    run(worker)
    outs = [e for e in worker.channel.events() if isinstance(e, Output)]
    assert len(outs) == 1 and worker.active == {} and worker.engine.load().num_running == 0


def test_a_request_stuck_waiting_past_its_deadline_finishes_with_length(worker):
    submit(worker, "a", max_tokens=50)
    worker._step()  # "a" takes the only running slot
    submit(worker, "b", deadline=time.monotonic() - 5)  # waits behind "a"
    worker._step()
    assert worker.engine.load().num_waiting == 1
    worker._expire(time.monotonic())
    worker._flush()
    final = [e.output for e in worker.channel.events() if isinstance(e, Output) and e.uid == "b"]
    assert len(final) == 1 and final[0].finished and final[0].finish_reason == "length"
    assert final[0].num_output_tokens == 0 and "b" not in worker.active
    assert worker.engine.load().num_waiting == 0


def _msg(uid: str, max_tokens: int = 3) -> Submit:
    params = (SamplingParams(max_tokens=max_tokens, temperature=0),)
    return Submit(0, uid, ([1, 5],), params, time.monotonic(), 1e12)


def test_a_burst_fills_free_running_slots_however_small_the_queue(bundle, monkeypatch):
    """4 free slots, 1 waiting place, 4 simultaneous requests: all admitted, in order."""
    monkeypatch.setenv("TEXTGEN_FAKE_STEP_S", "0")
    w = make_worker(bundle, max_running=4, max_waiting=1)
    w._handle_all([_msg(u, max_tokens=20) for u in "abcd"])
    for _ in range(4):
        w._step()
        w._handle_all([])
    events = w.channel.events()
    assert [e.uid for e in events if isinstance(e, Ack)] == list("abcd")
    assert not [e for e in events if isinstance(e, Refusal)] and not w.deferred


def test_a_burst_beyond_running_and_waiting_capacity_is_refused(bundle, monkeypatch):
    monkeypatch.setenv("TEXTGEN_FAKE_STEP_S", "0")
    w = make_worker(bundle, max_running=1, max_waiting=1)
    w._handle_all([_msg(u, max_tokens=20) for u in "abc"])  # a waits; b is retried after a step
    w._step()
    w._handle_all([])  # a runs, b waits, c finds no free slot: refused at once
    w._flush()
    events = w.channel.events()
    assert [e.uid for e in events if isinstance(e, Ack)] == ["a", "b"]
    assert [e.uid for e in events if isinstance(e, Refusal)] == ["c"] and not w.deferred


def test_metrics_and_heartbeat_are_published_in_batches_while_busy_and_at_once_when_idle(worker):
    """Every step reaches the metrics, in order; while the engine runs, at most every
    PUBLISH_EVERY_S; the moment it is idle, all of them and the heartbeat."""
    submit(worker, "a", max_tokens=5)
    worker._flush()
    worker._step()
    worker._beat()  # the first beat publishes (none before)
    assert len(worker.steps) == 1 and worker.state.heartbeat_age() < 1
    beat_at = worker.state._a[1]
    for _ in range(3):
        worker._step()
        worker._beat()
    assert worker.engine.has_unfinished() and len(worker.steps) == 1  # not yet due
    assert worker.state._a[1] == beat_at
    worker._step()  # the last token: the engine is idle
    worker._beat()
    assert not worker.engine.has_unfinished() and len(worker.steps) == 5
    assert [s.batch_size for s in worker.steps] == [1] * 5 and worker.state._a[1] > beat_at
    assert worker.state.engine_gauges()["running"] == 0


def test_an_abort_that_empties_the_batch_publishes_the_load(worker):
    submit(worker, "a", max_tokens=50)
    worker._flush()
    worker._step()
    worker._beat()
    worker._handle(Abort(0, "a"))
    run(worker)  # the abort is reported by the next step
    worker._beat()
    assert worker.state.engine_gauges()["running"] == 0
    assert worker.loads[0] == (1, 0) and worker.loads[-1] == (0, 0)


def test_the_ack_leaves_before_the_step_that_prefills_the_request(worker):
    """The HTTP process sends a stream's headers while the prefill runs: the Ack must not wait
    for the step's outputs."""
    worker.channel.receive = lambda timeout_s, max_messages: [
        Submit(0, "a", ([1, 5, 6],), (SamplingParams(max_tokens=2, temperature=0),), time.monotonic(), 1e12)]
    sent_before_step = []

    def step():
        sent_before_step.extend(worker.channel.events())
        raise SystemExit  # one iteration of serve() is enough

    worker._step = step
    with pytest.raises(SystemExit):
        worker.serve()
    assert sent_before_step == [Ack("a")]
