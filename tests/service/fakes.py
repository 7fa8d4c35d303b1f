"""Test doubles for the HTTP layer: a fake engine with service.engine.engine.Engine's interface, and a
fake bundle (a real SentencePiece tokenizer, a placeholder model.onnx).

The server loads the fake engine with ``TEXTGEN_ENGINE_CLASS=fakes:FakeEngine`` (this folder
on PYTHONPATH). Its tokens are deterministic: greedy (temperature 0) continues a fixed cycle from
the last token, seeded sampling draws from ``random.Random(seed)``. ``TEXTGEN_FAKE_STEP_S`` sets
the duration of one step, to keep requests running while a test disconnects or drains.
``TEXTGEN_FAKE_BURST=k`` makes one step emit k tokens per request as k outputs, in the order k
consecutive steps would (request by request, round after round): the HTTP process then finds
several outputs of a stream queued at once, as when it falls behind the engine.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm

from bundle.tokenizer import Tokenizer
from service.engine import finishing, rules
from service.engine.config import EngineConfig
from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.types import (
    EngineLoad,
    InvalidRequestError,
    QueueFullError,
    RequestOutput,
    RequestTimings,
    SamplingParams,
    StepStats,
    TopLogprob,
)

FAKE_CONTEXT = 128
FAKE_VOCAB = 320
TEXT = """Shall I compare thee to a summer's day? Thou art more lovely and more temperate.
Rough winds do shake the darling buds of May, and summer's lease hath all too short a date.
Sometime too hot the eye of heaven shines, and often is his gold complexion dimm'd;
And every fair from fair sometime declines, by chance or nature's changing course untrimm'd.
But thy eternal summer shall not fade, nor lose possession of that fair thou ow'st.
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune, or to take arms against a sea of troubles.
User: Assistant: System: 0123456789 hello world, the quick brown fox jumps over the lazy dog.
"""


def make_fake_bundle(path: Path, name: str = "fake-tiny") -> Path:
    """A bundle folder the service accepts: tokenizer.model, config.json, a placeholder model.onnx."""
    path.mkdir(parents=True, exist_ok=True)
    lines = [ln for ln in (TEXT * 20).splitlines() if ln.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(path / "tokenizer"),
        model_type="bpe",
        vocab_size=FAKE_VOCAB,
        byte_fallback=True,
        character_coverage=1.0,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        minloglevel=2,
    )
    (path / "model.onnx").write_bytes(b"not a model: the fake engine never reads it")
    config = {
        "format_version": 1,
        "name": name,
        "architecture": {
            "vocab_size": FAKE_VOCAB,
            "context_length": FAKE_CONTEXT,
            "n_layer": 1,
            "n_head": 1,
            "head_dim": 8,
        },
        "num_parameters": 1234,
        "tokenizer": {
            "type": "sentencepiece",
            "file": "tokenizer.model",
            "add_bos": True,
            "bos_id": 1,
            "eos_id": 2,
            "pad_id": 0,
        },
        "onnx": {"file": "model.onnx"},
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@dataclass
class _Req:
    id: str
    prompt: list[int]
    params: SamplingParams
    timings: RequestTimings
    rng: random.Random
    detok: IncrementalDetokenizer
    deadline: float | None
    output: list[int] = field(default_factory=list)


class FakeEngine:
    """service.engine.engine.Engine's interface, with deterministic tokens and no model."""

    def __init__(self, bundle, config: EngineConfig = EngineConfig()):
        self.tokenizer = Tokenizer.load(bundle.tokenizer_path)
        self.context_length = bundle.context_length
        self.vocab_size = bundle.vocab_size
        self.eos_id = bundle.eos_id
        self.provider = "FakeExecutionProvider"
        self.num_parameters = bundle.num_parameters
        self.model_name = bundle.name
        self.max_running, self.max_waiting = config.max_running, config.max_waiting
        self.step_s = float(os.environ.get("TEXTGEN_FAKE_STEP_S", "0.002"))
        self.burst = int(os.environ.get("TEXTGEN_FAKE_BURST", "1"))
        self.waiting: deque[_Req] = deque()
        self.running: dict[str, _Req] = {}
        self.last_step_stats: StepStats | None = None
        self._rng = random.Random(0)

    # -- the Engine interface -----------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None, deadline: float | None = None) -> None:  # fmt: skip
        if not prompt_token_ids:
            raise InvalidRequestError("prompt must not be empty")
        rules.check(params, prompt_len=len(prompt_token_ids), vocab_size=self.vocab_size,
                    context_length=self.context_length)
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(self.max_waiting)
        seed = params.seed if params.seed is not None else self._rng.randrange(2**31)
        detok = IncrementalDetokenizer(
            self.tokenizer, params.stop, self.tokenizer.special_ids, prompt_token_ids
        )
        timings = RequestTimings(arrival=arrival_time if arrival_time is not None else time.monotonic())
        self.waiting.append(
            _Req(request_id, list(prompt_token_ids), params, timings, random.Random(seed), detok, deadline)
        )

    def abort(self, request_id: str) -> None:
        self.running.pop(request_id, None)
        self.waiting = deque(r for r in self.waiting if r.id != request_id)

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def load(self) -> EngineLoad:
        return EngineLoad(len(self.running), len(self.waiting), len(self.running) / self.max_running)

    def step(self) -> list[RequestOutput]:
        t0 = time.monotonic()
        prefill = 0
        while self.waiting and len(self.running) < self.max_running:
            r = self.waiting.popleft()
            r.timings.scheduled = t0
            prefill += len(r.prompt)
            self.running[r.id] = r
        if self.step_s:
            time.sleep(self.step_s)
        now = time.monotonic()
        outputs = []
        for _ in range(self.burst):
            round_ = [self._advance(r, now) for r in list(self.running.values())]
            for out in round_:
                if out.finished:
                    del self.running[out.request_id]
            outputs.extend(round_)
        batch = len({o.request_id for o in outputs})
        self.last_step_stats = StepStats(batch, prefill, len(self.running), len(self.waiting),
                                         self.load().kv_cache_usage, now - t0)  # fmt: skip
        return outputs

    # -- internals ----------------------------------------------------------------------------
    def _next_token(self, r: _Req) -> int:
        if r.params.temperature == 0:
            last = (r.output or r.prompt)[-1]
            tok = (last * 7 + 11) % self.vocab_size
        else:
            tok = r.rng.randrange(self.vocab_size)
        if tok == self.eos_id and r.params.ignore_eos:
            tok += 1
        return tok if tok not in (0, 1) else 4  # never pad or bos

    def _advance(self, r: _Req, now: float) -> RequestOutput:
        tok = self._next_token(r)
        r.output.append(tok)
        if r.timings.first_token is None:
            r.timings.first_token = now
        r.timings.token_times.append(now)
        update = r.detok.add([tok])
        text = update.text_delta
        end = finishing.after_token(
            finishing.stop_token(tok, r.params, (self.eos_id,)), len(r.output), r.params,
            stop_string=update.stop_string, past_deadline=finishing.past_deadline(r.deadline, now),
        )
        reason, stop_reason = (end.reason, end.stop_reason) if end is not None else (None, None)
        if reason is not None:
            if update.stop_string is None:
                text += r.detok.flush()
            r.timings.finished = now
        lp = r.params.logprobs
        return RequestOutput(
            request_id=r.id,
            new_token_ids=[tok],
            text_delta=text,
            finished=reason is not None,
            finish_reason=reason,
            stop_reason=stop_reason,
            new_logprobs=[-0.5] if lp is not None else None,
            new_top_logprobs=[
                [TopLogprob(tok, -0.5), *[TopLogprob(4 + k, -3.0 - k) for k in range(lp - 1)]][:lp]
            ]
            if lp is not None
            else None,
            num_prompt_tokens=len(r.prompt),
            num_output_tokens=len(r.output),
            timings=r.timings if reason is not None else None,
        )
