"""The engine: token ids in, token ids and text deltas out, for many requests at once.

``step()`` is one iteration of continuous batching:
schedule -> run the model (decode the running batch, prefill the newcomers) -> sample ->
update the sequences -> emit outputs. Text appears only through the per-request incremental
detokenizer (stop strings are matched there). No HTTP, no threads: one caller owns the engine.

The running batch and its KV cache take one of three layouts (``Engine.kv_layout``, logged at
start-up): "inplace", the bundle's model.kvinplace.onnx over cache buffers allocated once
(service/runner_inplace.py; CPU, when the bundle has the file), "static", the same decoder at
fixed batch sizes captured as CUDA graphs (service/runner_static.py; CUDA, float16 bundles), or
"concat", the generic model.onnx whose cache goes in and comes out every step (service/runner.py;
any bundle).

When a single greedy sequence runs on the in-place cache, a step is speculative: its last token
goes in with up to ``speculative_tokens`` draft tokens looked up from earlier in the sequence
(service/ngram.py), and the step keeps the drafts the model agrees with plus the model's own
next token, so it emits 1..k+1 tokens, the same tokens one-token steps would. A run over a few
positions costs little more than over one at batch 1 (overhead-bound), so each kept draft is
most of a step saved.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from service.bundle import Bundle
from service.detokenizer import IncrementalDetokenizer
from service.ngram import NgramIndex
from service.runner import ConcatBatch, Provider, Runner, want_cuda
from service.runner_inplace import InplaceBatch, InplaceRunner
from service.runner_static import StaticBatch, StaticRunner
from service.sampler import check_stop, prompt_logprobs, sample
from service.scheduler import Scheduler
from service.structured import GrammarError, GrammarMatchers
from service.tokenizer import Tokenizer
from service.types import (
    FinishReason,
    InvalidRequestError,
    PromptTooLongError,
    RequestOutput,
    RequestTimings,
    SamplingParams,
    StepStats,
    TopLogprob,
)

log = logging.getLogger(__name__)

KVInplace = Literal["auto", "off"]
StaticDecode = Literal["auto", "on", "off"]


@dataclass
class _Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    rng: np.random.Generator
    detok: IncrementalDetokenizer
    timings: RequestTimings
    deadline: float | None
    output: list[int] = field(default_factory=list)
    ngram: NgramIndex | None = None  # prompt + output, for speculative drafts (greedy requests only)
    # params.prompt_logprobs: (logprobs, alternatives) of the prompt, from its prefill, sent with the first output
    prompt_scores: tuple[list[float | None], list[list[TopLogprob]]] | None = None
    matcher: Any = None  # params.grammar: an llguidance matcher fed every output token (service/structured.py)


class Engine:
    """Continuous-batching decoder over one ONNX Runtime session.

    Args:
        bundle: the model bundle (see docs/model-bundle.md).
        provider, intra_op_threads, graph_opt_level: ONNX Runtime settings (see service.runner).
        max_running: most sequences in the running batch.
        max_waiting: most requests waiting for admission; more raise QueueFullError.
        kv_budget_tokens: cached-token budget; each running request reserves prompt + max_tokens.
            0 means max_running x context length.
        max_prefill_tokens: prompt tokens prefilled per step (at least one request is always admitted),
            so a burst of long prompts cannot stall the running streams for long.
        seed: seeds the generators of requests that bring no seed of their own.
        kv_inplace: "auto" runs the in-place KV cache when the bundle has it and the provider is
            the CPU; "off" always runs the generic concat path.
        speculative_tokens: most draft tokens a step checks when a single greedy sequence runs on
            the in-place cache (n-gram drafts, service/ngram.py; the output does not change, except
            for int8 bundles, whose activation scale spans the run: docs/model.md);
            0 turns speculation off.
        speculative_ngram: longest suffix n-gram that drafts are looked up by.
        static_decode: the static-shape decode path (service/runner_static.py: the in-place
            decoder at fixed batch sizes, captured as CUDA graphs on the GPU). "auto": on CUDA
            when the bundle's in-place decoder is float16 (``--fp16``); "on": whenever the bundle
            has an in-place decoder (on the CPU without graphs: for tests); "off": never.
        cuda_graph: capture the static path's decode steps as CUDA graphs (CUDA only).
    """

    def __init__(self, bundle: Bundle, *, provider: Provider = "auto", intra_op_threads: int = 0,
                 graph_opt_level: str = "all", max_running: int = 64, max_waiting: int = 256,
                 kv_budget_tokens: int = 0, max_prefill_tokens: int = 512, seed: int = 0,
                 kv_inplace: KVInplace = "auto", speculative_tokens: int = 3, speculative_ngram: int = 3,
                 static_decode: StaticDecode = "auto", cuda_graph: bool = True):
        if speculative_tokens < 0 or speculative_ngram < 1:
            raise ValueError(f"speculative_tokens must be >= 0 and speculative_ngram >= 1, "
                             f"got {speculative_tokens} and {speculative_ngram}")
        self.bundle = bundle
        self.tokenizer = Tokenizer.load(bundle.tokenizer_path)
        self._batch = _open_batch(bundle, provider, intra_op_threads, graph_opt_level, max_running, kv_inplace,
                                  static_decode, cuda_graph)
        self.runner = self._batch.runner
        self.kv_layout: Literal["inplace", "concat", "static"] = self._batch.layout
        # Multi-token steps need the in-place cache (the concat path has no way to drop rejected positions).
        self.speculative_tokens = speculative_tokens if isinstance(self._batch, InplaceBatch) else 0
        self.speculative_ngram = speculative_ngram
        if speculative_tokens and not self.speculative_tokens:
            log.info("speculative decoding: off (it needs the in-place KV cache)")
        if bundle.int8:
            log.warning("int8 bundle: activations are quantized with one scale per run, so a request's tokens "
                        "depend on what shares its step (other rows, speculative drafts); fp32 bundles do not")
        self.provider = self.runner.provider
        self.context_length = bundle.context_length
        self.model_name = bundle.name
        self.num_parameters = bundle.num_parameters
        self.vocab_size = bundle.vocab_size
        self.kv_budget_tokens = kv_budget_tokens or max_running * self.context_length
        self.scheduler = Scheduler(max_running=max_running, max_waiting=max_waiting,
                                   kv_budget_tokens=self.kv_budget_tokens, max_prefill_tokens=max_prefill_tokens)
        self.max_waiting = max_waiting
        self._seeds = np.random.default_rng(seed)
        self._seqs: dict[str, _Sequence] = {}
        self._finished_early: list[RequestOutput] = []  # aborted while waiting: reported at the next step
        self.last_step_stats: StepStats | None = None
        self._grammars: GrammarMatchers | None = None  # created with the first constrained request
        self._mask_time, self._num_constrained = 0.0, 0  # this step's structured-output work

    # ---- requests in -------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None, deadline: float | None = None) -> None:
        """Queue a request. Raises PromptTooLongError, QueueFullError or InvalidRequestError.

        ``deadline`` (time.monotonic seconds): past it the request finishes with finish_reason "length".
        """
        if request_id in self._seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty: at least one token is required")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        params.validate(self.vocab_size)
        if len(prompt_token_ids) + params.max_tokens > self.context_length:
            raise PromptTooLongError(len(prompt_token_ids), params.max_tokens, self.context_length)
        matcher = self._new_matcher(params.grammar) if params.grammar is not None else None
        self.scheduler.add_request(request_id, len(prompt_token_ids), params.max_tokens)  # may raise QueueFullError
        seed = params.seed if params.seed is not None else int(self._seeds.integers(2**63))
        self._seqs[request_id] = _Sequence(
            request_id=request_id,
            prompt=list(prompt_token_ids),
            params=params,
            rng=np.random.default_rng(seed),
            detok=IncrementalDetokenizer(self.tokenizer, params.stop, self.tokenizer.special_ids, prompt_token_ids),
            timings=RequestTimings(arrival=arrival_time if arrival_time is not None else time.monotonic()),
            deadline=deadline,
            ngram=NgramIndex(prompt_token_ids, self.speculative_ngram)
            if self.speculative_tokens and params.temperature == 0 and matcher is None else None,
            matcher=matcher,
        )

    def _new_matcher(self, grammar: str) -> Any:
        if self._grammars is None:
            self._grammars = GrammarMatchers(self.tokenizer)
        try:
            return self._grammars.new(grammar)
        except GrammarError as e:
            raise InvalidRequestError(f"grammar: {e}") from None

    def abort(self, request_id: str) -> None:
        """Stop a request; its slot is freed at the next step, which reports finish_reason "abort"."""
        seq = self._seqs.get(request_id)
        if seq is None or not self.scheduler.abort(request_id):
            return
        if request_id not in self._batch:  # still waiting: gone from the scheduler already
            self._finished_early.append(self._finish(seq, "abort"))

    # ---- introspection -----------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return bool(self._seqs) or bool(self._finished_early)

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def kv_cache_usage(self) -> float:
        return self.scheduler.kv_usage

    # ---- one iteration -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.monotonic()
        self._mask_time, self._num_constrained = 0.0, 0
        outputs, self._finished_early = self._finished_early, []
        sched = self.scheduler.schedule()
        for rid in sched.aborted:
            outputs.append(self._finish(self._seqs[rid], "abort"))
        self._batch.keep(sched.running)
        prefill_tokens = sum(len(self._seqs[r].prompt) for r in sched.admitted)
        seq, draft = self._draft(sched.admitted)
        try:
            if draft:
                logits = self._batch.decode_chunk(np.array([seq.output[-1], *draft], np.int64))  # (1 + k, V)
            else:
                logits, rows = self._run_model(sched.admitted, t0)
        except Exception as e:  # a failed run must not wedge the engine: fail the batch, keep serving
            log.exception("model run failed; failing %d requests", self._batch.num_live + len(sched.admitted))
            return outputs + self._fail_all([*self._batch.live_ids, *sched.admitted], f"model run failed: {e}")
        accepted = 0
        if draft:
            rows = [seq.request_id]
            out, accepted = self._verify(seq, logits, draft)
            outputs.append(out)
        elif rows:
            outputs += self._sample_and_update(logits, rows)
        self.last_step_stats = StepStats(
            batch_size=len(rows), num_prefill_tokens=prefill_tokens,
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.scheduler.kv_usage, step_time=time.monotonic() - t0,
            num_draft_tokens=len(draft), num_accepted_draft_tokens=accepted,
            num_constrained=self._num_constrained, mask_time=self._mask_time)
        return outputs

    # ---- speculative steps (one greedy sequence, n-gram drafts) --------------------------------
    def _draft(self, admitted: list[str]) -> tuple[_Sequence | None, list[int]]:
        """The only running sequence and the draft to check with its last token, when this step
        can be speculative: nobody is joining, the sequence is greedy and a draft is found."""
        if not self.speculative_tokens or admitted or self._batch.num_live != 1:
            return None, []
        s = self._seqs[self._batch.live_ids[0]]
        if s.ngram is None:
            return None, []
        # The step emits up to k + 1 tokens, all within max_tokens (and so within the context:
        # add_request refused prompt + max_tokens beyond it).
        room = s.params.max_tokens - len(s.output) - 1
        return s, s.ngram.propose(min(self.speculative_tokens, room))

    def _verify(self, s: _Sequence, logits: np.ndarray, draft: list[int]) -> tuple[RequestOutput, int]:
        """Greedy choices at the 1 + k positions, kept up to and including the first that differs
        from the draft; the sampler runs per position on the history as it grows, so penalties
        and logprobs are what one token per step would give. Returns the output and how many
        draft tokens were kept."""
        picks: list[tuple[int, float | None, list[TopLogprob] | None]] = []
        history = list(s.output)
        for j in range(len(draft) + 1):
            res = sample(logits[j : j + 1], [s.params], [s.rng], [s.prompt], [history])
            tok = int(res.token_ids[0])
            picks.append((tok, None if res.logprobs is None else float(res.logprobs[0]),
                          res.top_logprobs[0] if res.top_logprobs else None))
            history.append(tok)
            if j == len(draft) or tok != draft[j]:
                break
        out = self._update(s, picks, time.monotonic())
        if out.finished:
            self._retire([s.request_id])
        else:
            self._batch.advance(len(picks))  # the last token and the kept draft tokens are now cached
        return out, len(picks) - 1

    def _run_model(self, admitted: list[str], now: float) -> tuple[np.ndarray, list[str]]:
        """Decode the running rows, prefill the admitted ones; logits (B, V) in the order of rows."""
        parts: list[np.ndarray] = []
        rows: list[str] = []
        if self._batch.num_live:
            rows += self._batch.live_ids
            parts.append(self._batch.decode(np.array([self._seqs[r].output[-1] for r in rows], np.int64)))
        if admitted:
            for rid in admitted:
                self._seqs[rid].timings.scheduled = now
            seqs = [self._seqs[r] for r in admitted]
            want = [s.params.prompt_logprobs is not None for s in seqs]
            last, whole = self._batch.prefill_scored(admitted, [s.prompt for s in seqs], want)
            for s, logits in zip(seqs, whole, strict=True):
                if logits is not None:
                    s.prompt_scores = prompt_logprobs(logits, s.prompt, s.params.prompt_logprobs or 0)
            parts.append(last)
            rows += admitted
        return (np.concatenate(parts) if len(parts) > 1 else parts[0]) if parts else np.zeros((0, 0)), rows

    def _sample_and_update(self, logits: np.ndarray, rows: list[str]) -> list[RequestOutput]:
        seqs = [self._seqs[r] for r in rows]
        res = sample(logits, [s.params for s in seqs], [s.rng for s in seqs], [s.prompt for s in seqs],
                     [s.output for s in seqs], self._allowed(seqs))
        now = time.monotonic()
        outputs, finished = [], []
        for i, s in enumerate(seqs):
            lp = None if res.logprobs is None else float(res.logprobs[i])
            top = res.top_logprobs[i] if res.top_logprobs else None
            # max_tokens 0: the prompt was scored, nothing is generated (its sampled token is dropped)
            picks = [(int(res.token_ids[i]), lp, top)] if s.params.max_tokens else []
            out = self._update(s, picks, now)
            if out.finished:
                finished.append(s.request_id)
            outputs.append(out)
        if finished:
            self._retire(finished)
        return outputs

    def _allowed(self, seqs: list[_Sequence]) -> dict[int, np.ndarray] | None:
        """Row -> the tokens its grammar allows next, for the constrained rows of this step."""
        rows = [i for i, s in enumerate(seqs) if s.matcher is not None and s.params.max_tokens]
        if not rows:
            return None
        t = time.perf_counter()
        masks = self._grammars.masks([seqs[i].matcher for i in rows])
        self._mask_time += time.perf_counter() - t
        self._num_constrained += len(rows)
        return dict(zip(rows, masks, strict=True))

    def _retire(self, finished: list[str]) -> None:
        """Release the scheduler reservations and batch slots of requests that finished this step."""
        for rid in finished:
            self.scheduler.finish(rid)
        done = set(finished)
        self._batch.keep([r for r in self._batch.live_ids if r not in done])

    def _update(self, s: _Sequence, picks: list[tuple[int, float | None, list[TopLogprob] | None]],
                now: float) -> RequestOutput:
        """Append the picked tokens (token, logprob, top logprobs) in order until one finishes the
        request (the rest are dropped); the step's output for the request."""
        out = RequestOutput(request_id=s.request_id, new_token_ids=[], text_delta="",
                            num_prompt_tokens=len(s.prompt))
        if s.prompt_scores is not None:  # the first output after the prefill
            out.prompt_logprobs, out.prompt_top_logprobs = s.prompt_scores
            s.prompt_scores = None
        if not picks:  # scoring only (max_tokens 0)
            self._complete(s, out, "length", None)
            return out
        wants_logprobs = s.params.logprobs is not None  # then the sampler gave every pick its logprobs
        if wants_logprobs:
            out.new_logprobs, out.new_top_logprobs = [], []
        for tok, lp, top in picks:
            s.output.append(tok)
            if s.ngram is not None:
                s.ngram.append(tok)
            s.timings.token_times.append(now)
            if s.timings.first_token is None:
                s.timings.first_token = now
            out.new_token_ids.append(tok)
            if wants_logprobs:
                out.new_logprobs.append(float(lp))
                out.new_top_logprobs.append(top or [])
            reason, stop_reason = check_stop(tok, len(s.output), s.params, self.tokenizer.eos_id)
            render = reason != "stop"  # a stop token is never rendered
            if s.matcher is not None and reason != "stop":
                if not s.matcher.consume_token(tok):  # cannot happen: the mask allowed it
                    out.error = f"structured output: {s.matcher.get_error()}"
                    reason = "error"
                elif s.matcher.is_stopped():  # the structure is complete: nothing may follow
                    reason, stop_reason = "stop", None
            upd = s.detok.add([tok] if render else [])
            out.text_delta += upd.text_delta
            if upd.stop_string is not None:
                reason, stop_reason = "stop", upd.stop_string
            elif reason is None and s.deadline is not None and now >= s.deadline:
                reason = "length"  # the server-side time limit: finish like a max_tokens cut
            if reason is not None:
                if upd.stop_string is None:
                    out.text_delta += s.detok.flush()
                out.num_output_tokens = len(s.output)
                self._complete(s, out, reason, stop_reason)
                return out
        out.num_output_tokens = len(s.output)
        return out

    # ---- endings -----------------------------------------------------------------------------
    def _complete(self, s: _Sequence, out: RequestOutput, reason: FinishReason, stop_reason: str | int | None) -> None:
        s.timings.finished = time.monotonic()
        out.finished, out.finish_reason, out.stop_reason, out.timings = True, reason, stop_reason, s.timings
        del self._seqs[s.request_id]

    def _finish(self, s: _Sequence, reason: FinishReason, error: str | None = None) -> RequestOutput:
        out = RequestOutput(request_id=s.request_id, new_token_ids=[], text_delta="",
                            num_prompt_tokens=len(s.prompt), num_output_tokens=len(s.output), error=error)
        self._complete(s, out, reason, None)
        return out

    def _fail_all(self, request_ids: list[str], error: str) -> list[RequestOutput]:
        outs = []
        for rid in request_ids:
            if rid in self._seqs:
                self.scheduler.abort(rid)
                outs.append(self._finish(self._seqs[rid], "error", error))
        self.scheduler.schedule()  # reports the aborts and frees their reservations
        self._batch.clear()
        return outs


def _open_batch(bundle: Bundle, provider: Provider, intra_op_threads: int, graph_opt_level: str,
                max_running: int, kv_inplace: KVInplace, static_decode: StaticDecode = "auto",
                cuda_graph: bool = True) -> ConcatBatch | InplaceBatch | StaticBatch:
    """The running batch: the static path where it is asked for, else the in-place decoder where it
    can run, else the generic one; logs which."""
    if kv_inplace not in ("auto", "off"):
        raise ValueError(f"kv_inplace must be 'auto' or 'off', got {kv_inplace!r}")
    if static_decode not in ("auto", "on", "off"):
        raise ValueError(f"static_decode must be 'auto', 'on' or 'off', got {static_decode!r}")
    inplace_dtype = (bundle.kv_inplace or {}).get("kv_dtype", "float32")
    if static_decode == "on" and bundle.kv_inplace_path is None:
        raise ValueError("TEXTGEN_STATIC_DECODE=on needs a bundle with an in-place decoder "
                         "(config.json 'onnx_kv_inplace'; see `python -m model export --help`)")
    static_auto = (static_decode == "auto" and bundle.kv_inplace_path is not None and inplace_dtype == "float16"
                   and want_cuda(provider))
    runner: StaticRunner | InplaceRunner | None = None
    if static_decode == "on":
        runner = StaticRunner(bundle, max_running, provider, cuda_graph, intra_op_threads, graph_opt_level)
    elif static_auto:
        try:
            runner = StaticRunner(bundle, max_running, provider, cuda_graph, intra_op_threads, graph_opt_level)
        except Exception:  # auto: the generic decoder still serves
            log.exception("the static decode path could not start; serving model.onnx instead")
    if isinstance(runner, StaticRunner):
        log.info("KV cache layout: static (%s, %d slots x %d positions, %.0f MB of cache, buckets %s, "
                 "CUDA graphs: %s)", bundle.kv_inplace_path.name, max_running, runner.max_len,
                 runner.cache_bytes / 1e6, runner.buckets, runner.cuda_graph)
        return StaticBatch(runner, bundle.pad_id)
    if kv_inplace == "off":
        why = "TEXTGEN_KV_INPLACE=off"
    elif bundle.kv_inplace_path is None:
        why = "the bundle has no in-place decoder (config.json 'onnx_kv_inplace')"
    elif want_cuda(provider):
        why = "CUDA runs the generic decoder unless the static path runs (TEXTGEN_STATIC_DECODE)"
    elif inplace_dtype != "float32":
        why = f"the in-place decoder is {inplace_dtype}, for CUDA"
    else:
        runner = InplaceRunner(bundle, max_running, intra_op_threads, graph_opt_level)
        log.info("KV cache layout: inplace (%s, %d slots x %d positions, at most %.0f MB of cache)",
                 bundle.kv_inplace_path.name, max_running, runner.max_len, runner.cache_bytes / 1e6)
        return InplaceBatch(runner, bundle.pad_id)
    log.info("KV cache layout: concat (%s)", why)
    return ConcatBatch(Runner(bundle, provider, intra_op_threads, graph_opt_level), bundle.pad_id)
