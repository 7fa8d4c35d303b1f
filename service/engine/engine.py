"""The engine: token ids in, token ids and text deltas out, for many requests at once.

``step()`` is one iteration of continuous batching:
schedule -> run the model (decode the running batch, prefill the newcomers) -> sample ->
update the sequences -> emit outputs. No HTTP, no threads: one caller owns the engine.

Text at one edge: the engine takes token ids (the HTTP process tokenizes and renders chat
templates) and gives back token ids AND text deltas, through a per-request incremental
detokenizer where stop strings are matched. It keeps detokenization, rather than leaving it to
the HTTP process as vLLM's output processor does, because a stop string must end its sequence in
the step that produced it: the row leaves the batch and its KV cache at once, no token is
computed past the stop, and usage counts exactly what was returned. The cost is small (most
tokens take the detokenizer's table lookup, service/engine/detokenizer.py), and the HTTP process stays
free of per-token Python work other than formatting.

The running batch and its KV cache take one of three layouts (``Engine.kv_layout``, logged at
start-up): "inplace", the bundle's model.kvinplace.onnx over cache buffers allocated once
(service/engine/kv/inplace_batch.py; CPU, when the bundle has the file), "static", the same decoder at
fixed batch sizes captured as CUDA graphs (service/engine/kv/static_batch.py; CUDA, float16 bundles), or
"concat", the generic model.onnx whose cache goes in and comes out every step
(service/engine/kv/concat_batch.py; any bundle).

When a single greedy sequence runs on the in-place cache, a step is speculative: its last token
goes in with up to ``speculative_tokens`` draft tokens looked up from earlier in the sequence
(service/engine/ngram.py), and the step keeps the drafts the model agrees with plus the model's own
next token, so it emits 1..k+1 tokens, the same tokens one-token steps would. A run over a few
positions costs little more than over one at batch 1 (overhead-bound), so each kept draft is
most of a step saved.

Prefix caching (service/engine/prefix_cache.py, service/engine/kv/prefix_pool.py): after a prefill, the prompt's
full blocks are copied into a block pool that shares the KV budget with the running requests; a
newcomer whose leading blocks are there gets them copied into its row and prefills only the rest
(one run per such row). Requests that ask for prompt logprobs prefill everything (the logits of
cached positions are not kept), and ``cache_prompt=False`` requests neither read nor write blocks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from bundle.format import Bundle
from bundle.tokenizer import Tokenizer
from service.engine import finishing, rules
from service.engine.config import EngineConfig
from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.kv.batch import open_batch
from service.engine.kv.prefix_pool import BlockPool
from service.engine.ngram import NgramIndex
from service.engine.prefix_cache import BlockIndex, block_hashes, lookup_blocks
from service.engine.sampler import argmax_only, prompt_logprobs, sample
from service.engine.scheduler import Scheduler, size_kv_budget
from service.engine.structured import GrammarError, GrammarMatchers
from service.engine.types import (
    EngineLoad,
    FinishReason,
    InvalidRequestError,
    RequestOutput,
    RequestTimings,
    SamplingParams,
    StepStats,
    TopLogprob,
)

log = logging.getLogger(__name__)



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
    # Prompt + output, for speculative drafts (greedy requests only). Filled only when a draft is
    # wanted (the sequence runs alone): batched, a row pays nothing per token for it.
    ngram: NgramIndex | None = None
    # params.prompt_logprobs: (logprobs, alternatives) of the prompt, from its prefill, sent with the first output
    prompt_scores: tuple[list[float | None], list[list[TopLogprob]]] | None = None
    matcher: Any = None  # params.grammar: an llguidance matcher fed every output token (service/engine/structured.py)
    block_hashes: list[bytes] = field(default_factory=list)  # the prompt's full blocks, to cache after its prefill
    lookup: bool = False  # it looked its prompt up in the prefix cache (counts as a query)
    argmax_only: bool = False  # greedy with nothing that changes the logits or asks for logprobs (see sampler)

    def caught_up_ngram(self) -> NgramIndex:
        """The n-gram index, fed first the tokens (prompt, then output) it has not seen yet."""
        seen, n_prompt = len(self.ngram), len(self.prompt)
        self.ngram.extend(self.prompt[seen:])
        self.ngram.extend(self.output[max(0, seen - n_prompt) :])
        return self.ngram


class Engine:
    """Continuous-batching decoder over one ONNX Runtime session.

    Args:
        bundle: the model bundle (see docs/model-bundle.md).
        config: the engine's options (service/engine/config.py; the service builds it with
            ``Settings.engine_config()``).
    """

    def __init__(self, bundle: Bundle, config: EngineConfig = EngineConfig()):
        c = self.config = config
        self.bundle = bundle
        self.tokenizer = Tokenizer.from_bundle(bundle)
        _ = self.tokenizer.plain_texts  # the detokenizer's table: built now, not in the first request (152k tokens)
        self._batch = open_batch(bundle, c)
        self.runner = self._batch.runner
        self.kv_layout: Literal["inplace", "concat", "static"] = self._batch.layout
        # Multi-token steps need the in-place cache (the concat path has no way to drop rejected positions).
        self.speculative_tokens = c.speculative_tokens if self._batch.multi_token_steps else 0
        self.speculative_ngram = c.speculative_ngram
        if c.speculative_tokens and not self.speculative_tokens:
            log.info("speculative decoding: off (it needs the in-place KV cache)")
        if bundle.int8:
            log.warning("int8 bundle: activations are quantized with one scale per run, so a request's tokens "
                        "depend on what shares its step (other rows, speculative drafts); fp32 bundles do not")
        self.provider = self.runner.provider
        self.context_length = bundle.context_length
        self.model_name = bundle.name
        self.num_parameters = bundle.num_parameters
        self.vocab_size = bundle.vocab_size
        self._eos_ids = frozenset(self.tokenizer.eos_ids)  # the tokens that end a sequence
        self.kv_budget_tokens = size_kv_budget(
            max_running=c.max_running, context_length=self.context_length, bytes_per_token=bundle.kv_bytes_per_token,
            cache_bytes=c.kv_cache_mb * 2**20, tokens=c.kv_budget_tokens)
        log.info("KV cache budget: %d tokens x %d bytes per token = %.0f MiB", self.kv_budget_tokens,
                 bundle.kv_bytes_per_token, self.kv_budget_tokens * bundle.kv_bytes_per_token / 2**20)
        if self.kv_budget_tokens < self.context_length:
            log.warning("the KV cache budget (%d tokens) is below the context length (%d): longer requests are "
                        "refused; raise TEXTGEN_KV_CACHE_MB", self.kv_budget_tokens, self.context_length)
        if c.prefix_block_size < 1:
            raise ValueError(f"prefix_block_size must be >= 1, got {c.prefix_block_size}")
        self.block_size = c.prefix_block_size
        self.prefix_cache: BlockIndex | None = None
        self._pool: BlockPool | None = None
        self._salt = b""  # anything besides the tokens that changes a block's cache: the model (set below)
        if c.prefix_caching and not self._batch.prefix_reuse:
            log.info("prefix caching: off (the %s layout cannot reuse cached blocks)", self.kv_layout)
        elif c.prefix_caching:
            n = self.kv_budget_tokens // c.prefix_block_size
            self.prefix_cache = BlockIndex(n)
            self._pool = BlockPool(bundle.num_layers, bundle.num_kv_heads, bundle.head_dim, n, c.prefix_block_size,
                                   self.runner.kv_dtype)
            self._salt = f"{bundle.name}:{bundle.num_parameters}:{np.dtype(self.runner.kv_dtype).name}".encode()
        self.scheduler = Scheduler(max_running=c.max_running, max_waiting=c.max_waiting,
                                   kv_budget_tokens=self.kv_budget_tokens, max_prefill_tokens=c.max_prefill_tokens,
                                   prefix_cache=self.prefix_cache, block_size=c.prefix_block_size)
        self.max_waiting = c.max_waiting
        self._seeds = np.random.default_rng(c.seed)
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
        rules.check_token_ids(prompt_token_ids, self.vocab_size, "prompt")
        rules.check(params, prompt_len=len(prompt_token_ids), vocab_size=self.vocab_size,
                    context_length=self.context_length)
        matcher = self._new_matcher(params.grammar) if params.grammar is not None else None
        cache = self.prefix_cache is not None and params.cache_prompt
        hashes = block_hashes(prompt_token_ids, self.block_size, self._salt) if cache else []
        # Prompt logprobs need the logits of every prompt position: such a prompt is computed whole.
        lookup = cache and params.prompt_logprobs is None
        n_lookup = lookup_blocks(len(prompt_token_ids), self.block_size) if lookup else 0
        self.scheduler.add_request(request_id, len(prompt_token_ids), params.max_tokens,  # may raise QueueFullError
                                   tuple(hashes[:n_lookup]))
        seed = params.seed if params.seed is not None else int(self._seeds.integers(2**63))
        self._seqs[request_id] = _Sequence(
            request_id=request_id,
            prompt=list(prompt_token_ids),
            params=params,
            rng=np.random.default_rng(seed),
            detok=IncrementalDetokenizer(self.tokenizer, params.stop, self.tokenizer.special_ids, prompt_token_ids),
            timings=RequestTimings(arrival=arrival_time if arrival_time is not None else time.monotonic()),
            deadline=deadline,
            ngram=NgramIndex((), self.speculative_ngram)
            if self.speculative_tokens and params.temperature == 0 and matcher is None else None,
            matcher=matcher,
            block_hashes=hashes,
            lookup=lookup,
            argmax_only=argmax_only(params),
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

    def load(self) -> EngineLoad:
        """Sequences running (aborted ones not yet reported included) and waiting, and the reserved
        share of the KV cache budget: what the worker publishes as gauges."""
        s = self.scheduler
        return EngineLoad(s.num_running, s.num_waiting, s.kv_usage)

    # ---- one iteration -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.monotonic()
        self._mask_time, self._num_constrained = 0.0, 0
        outputs, self._finished_early = self._finished_early, []
        sched = self.scheduler.schedule()
        for rid in sched.aborted:
            outputs.append(self._finish(self._seqs[rid], "abort"))
        self._batch.keep(sched.running)
        hits = sum(len(b) for b in sched.cached.values()) * self.block_size
        prefill_tokens = sum(len(self._seqs[r].prompt) for r in sched.admitted) - hits
        queries = sum(len(self._seqs[r].prompt) for r in sched.admitted if self._seqs[r].lookup)
        seq, draft = self._draft(sched.admitted)
        t_run = time.monotonic()
        try:
            if draft:
                logits = self._batch.decode_chunk(np.array([seq.output[-1], *draft], np.int64))  # (1 + k, V)
            else:
                logits, rows = self._run_model(sched.admitted, sched.cached, t0)
        except Exception as e:  # a failed run must not wedge the engine: fail the batch, keep serving
            log.exception("model run failed; failing %d requests", self._batch.num_live + len(sched.admitted))
            return outputs + self._fail_all([*self._batch.live_ids, *sched.admitted], f"model run failed: {e}")
        finally:
            self._release(sched.cached)
        t_ran = time.monotonic()
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
            num_constrained=self._num_constrained, mask_time=self._mask_time,
            schedule_time=t_run - t0, model_time=t_ran - t_run,
            prefix_cache_queries=queries, prefix_cache_hits=hits, prefix_cache_blocks=self.prefix_cache_blocks,
            prefix_cache_usage=self.scheduler.cached_tokens / self.kv_budget_tokens)
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
        return s, s.caught_up_ngram().propose(min(self.speculative_tokens, room))

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

    def _run_model(self, admitted: list[str], cached: dict[str, list[int]], now: float) -> tuple[np.ndarray, list[str]]:
        """Decode the running rows, prefill the admitted ones (those in ``cached`` over their cached
        blocks); logits (B, V) in the order of rows."""
        parts: list[np.ndarray] = []
        rows: list[str] = []
        if self._batch.num_live:
            rows += self._batch.live_ids
            parts.append(self._batch.decode(np.array([self._seqs[r].output[-1] for r in rows], np.int64)))
        if admitted:
            for rid in admitted:
                self._seqs[rid].timings.scheduled = now
            fresh = [r for r in admitted if r not in cached]
            if fresh:
                seqs = [self._seqs[r] for r in fresh]
                want = [s.params.prompt_logprobs is not None for s in seqs]
                last, whole = self._batch.prefill_scored(fresh, [s.prompt for s in seqs], want)
                for s, logits in zip(seqs, whole, strict=True):
                    if logits is not None:
                        s.prompt_scores = prompt_logprobs(logits, s.prompt, s.params.prompt_logprobs or 0)
                parts.append(last)
                rows += fresh
            reused = [r for r in admitted if r in cached]
            if reused:
                kv = [self._pool.read(cached[r]) for r in reused]
                parts.append(self._batch.prefill_cached(reused, [self._seqs[r].prompt for r in reused], kv))
                rows += reused
            self._cache_prompts(admitted)
        return (np.concatenate(parts) if len(parts) > 1 else parts[0]) if parts else np.zeros((0, 0)), rows

    # ---- prefix cache ---------------------------------------------------------------------------
    def _cache_prompts(self, admitted: list[str]) -> None:
        """Copy the prefilled prompts' full blocks that the cache lacks into its pool, as far as
        the budget left by the reservations allows (older blocks are evicted for them)."""
        if self.prefix_cache is None:
            return
        new = {r: self.scheduler.cache_blocks(self._seqs[r].block_hashes) for r in admitted}
        new = {r: blocks for r, blocks in new.items() if blocks}
        if not new:
            return
        try:
            kv = self._batch.row_kv(list(new))
            for r, blocks in new.items():
                self._pool.write(blocks, kv[r])
        except BaseException:  # an indexed block must never name data that was not written
            self.prefix_cache.forget([i for blocks in new.values() for _, i in blocks])
            raise

    def _release(self, cached: dict[str, list[int]]) -> None:
        """Unpin the cached blocks newcomers were admitted with (their prefill has copied them)."""
        for ids in cached.values():
            self.prefix_cache.release(ids)

    @property
    def prefix_cache_blocks(self) -> int:
        return 0 if self.prefix_cache is None else self.prefix_cache.num_blocks

    def _sample_and_update(self, logits: np.ndarray, rows: list[str]) -> list[RequestOutput]:
        seqs = [self._seqs[r] for r in rows]
        if all(s.argmax_only for s in seqs):  # the sampler would do just this (and build lists around it)
            tokens, logprobs, top_logprobs = logits.argmax(axis=1).tolist(), None, None
        else:
            res = sample(logits, [s.params for s in seqs], [s.rng for s in seqs], [s.prompt for s in seqs],
                         [s.output for s in seqs], self._allowed(seqs))
            tokens, logprobs, top_logprobs = res.token_ids.tolist(), res.logprobs, res.top_logprobs
        now = time.monotonic()
        outputs, finished = [], []
        for i, s in enumerate(seqs):
            lp = None if logprobs is None else float(logprobs[i])
            top = top_logprobs[i] if top_logprobs else None
            # max_tokens 0: the prompt was scored, nothing is generated (its sampled token is dropped)
            picks = [(tokens[i], lp, top)] if s.params.max_tokens else []
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
            self._complete(s, out, finishing.Ending("length"))
            return out
        wants_logprobs = s.params.logprobs is not None  # then the sampler gave every pick its logprobs
        if wants_logprobs:
            out.new_logprobs, out.new_top_logprobs = [], []
        for tok, lp, top in picks:
            s.output.append(tok)
            s.timings.token_times.append(now)
            if s.timings.first_token is None:
                s.timings.first_token = now
            out.new_token_ids.append(tok)
            if wants_logprobs:
                out.new_logprobs.append(float(lp))
                out.new_top_logprobs.append(top or [])
            token_end = finishing.stop_token(tok, s.params, self._eos_ids)
            grammar_error = grammar_complete = False
            if s.matcher is not None and token_end is None:
                grammar_error = not s.matcher.consume_token(tok)  # cannot happen: the mask allowed it
                if grammar_error:
                    out.error = f"structured output: {s.matcher.get_error()}"
                grammar_complete = s.matcher.is_stopped()  # the structure is complete: nothing may follow
            upd = s.detok.add([tok] if token_end is None else [])  # a stop token is never rendered
            out.text_delta += upd.text_delta
            end = finishing.after_token(
                token_end, len(s.output), s.params, stop_string=upd.stop_string, grammar_error=grammar_error,
                grammar_complete=grammar_complete, past_deadline=finishing.past_deadline(s.deadline, now),
            )
            if end is not None:
                if upd.stop_string is None:
                    out.text_delta += s.detok.flush()
                out.num_output_tokens = len(s.output)
                self._complete(s, out, end)
                return out
        out.num_output_tokens = len(s.output)
        return out

    # ---- endings -----------------------------------------------------------------------------
    def _complete(self, s: _Sequence, out: RequestOutput, end: finishing.Ending) -> None:
        s.timings.finished = time.monotonic()
        out.finished, out.finish_reason, out.stop_reason, out.timings = True, end.reason, end.stop_reason, s.timings
        del self._seqs[s.request_id]

    def _finish(self, s: _Sequence, reason: FinishReason, error: str | None = None) -> RequestOutput:
        out = RequestOutput(request_id=s.request_id, new_token_ids=[], text_delta="",
                            num_prompt_tokens=len(s.prompt), num_output_tokens=len(s.output), error=error)
        self._complete(s, out, finishing.Ending(reason))
        return out

    def _fail_all(self, request_ids: list[str], error: str) -> list[RequestOutput]:
        """End the running rows with an error after a failed run. Their slots and reservations are
        freed at once (``Scheduler.finish``), not through a ``schedule()``, which would also admit
        waiting requests that this step then never prefills."""
        outs = []
        for rid in request_ids:
            if rid in self._seqs:
                self.scheduler.finish(rid)
                outs.append(self._finish(self._seqs[rid], "error", error))
        self._batch.clear()
        return outs
