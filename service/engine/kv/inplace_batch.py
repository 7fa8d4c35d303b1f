"""The in-place KV cache layout: the bundle's model.kvinplace.onnx over buffers allocated once.

Per layer one key and one value buffer ``(num_slots, H, max_len, D)`` float32 is allocated at
start-up (``np.zeros``: the OS commits a page only when it is first written). A run binds the
rows it works on, ``buf[start:stop]`` (a C-contiguous view), as both ``past_key_values.{i}.*``
and ``present.{i}.*`` through IO binding, by data pointer: GroupQueryAttention writes the new
positions into that memory and copies nothing else. Live sequences hold slots 0..n-1
(service.engine.kv.inplace_cache), so a decode step is one run over ``buf[:n]`` and a prefill of k newcomers
one run over ``buf[n:n+k]``, right padded (ONNX Runtime's CPU kernel is exact for rows of
different lengths in both; model/export_inplace.py). CPU only: CUDA keeps the concat layout.
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

from bundle.format import Bundle
from service.engine.kv.batch import SlotRows
from service.engine.kv.concat_batch import session_options
from service.engine.kv.inplace_cache import (
    DecodeBuffers,
    InplaceCache,
    Move,
    decode_inputs,
    right_pad_prompts,
)

log = logging.getLogger(__name__)


class InplaceRunner:
    """One CPU session of the in-place decoder and the cache buffers it reads and writes.

    Args:
        bundle: a bundle with an ``onnx_kv_inplace`` file (Bundle.kv_inplace_path).
        num_slots: rows of every buffer (the engine's max_running).
        intra_op_threads, graph_opt_level: as service.engine.kv.concat_batch.Runner.
    """

    def __init__(
        self, bundle: Bundle, num_slots: int, intra_op_threads: int = 0, graph_opt_level: str = "all"
    ):
        path = bundle.kv_inplace_path
        if path is None:
            raise ValueError(f"bundle {bundle.path} has no in-place decoder (config.json 'onnx_kv_inplace')")
        so = session_options(intra_op_threads, graph_opt_level)
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.provider = self.session.get_providers()[0]
        log.info("ONNX Runtime %s running %s on %s, intra-op threads: %s", ort.__version__, path.name,
                 self.provider, intra_op_threads or "ONNX Runtime's default")
        names = bundle.kv_inplace_io_names
        L = self.num_layers = bundle.num_layers
        self.num_heads, self.head_dim = bundle.num_kv_heads, bundle.head_dim
        self.vocab_size = bundle.vocab_size
        self.in_ids, self.in_mask = names["input_ids"], names["attention_mask"]
        self.in_pos, self.logits_name = names["position_ids"], names["logits"]
        self.past_names = [names[k].format(i=i) for i in range(L) for k in ("past_key", "past_value")]
        self.present_names = [
            names[k].format(i=i) for i in range(L) for k in ("present_key", "present_value")
        ]
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        missing = [n for n in (self.in_ids, self.in_mask, self.in_pos, *self.past_names) if n not in inputs]
        missing += [n for n in (self.logits_name, *self.present_names) if n not in outputs]
        if missing:
            raise ValueError(f"{path} does not follow the in-place decoder convention: missing {missing}")
        types = {inputs[n].type for n in self.past_names} | {outputs[self.logits_name].type}
        if types != {"tensor(float)"}:
            raise ValueError(f"{path}: the in-place path needs float32 cache and logits, got {sorted(types)}")
        self.kv_dtype = np.float32
        self.num_slots, self.max_len = num_slots, bundle.context_length
        shape = (num_slots, self.num_heads, self.max_len, self.head_dim)
        self.buffers = [np.zeros(shape, self.kv_dtype) for _ in self.past_names]  # 2L x (N, H, M, D)
        self._binding = self.session.io_binding()
        self._bound: tuple[int, int] | None = None  # the slots the cache binding points at
        # Decode steps have a binding of their own over buffers allocated once: a step writes its
        # inputs in place and rebinds only what changed shape (the mask's width, and everything
        # when the batch size changes). At batch 1 this was a fifth of a step.
        self._decode_inputs = DecodeBuffers(num_slots, self.max_len)
        self._decode_logits = np.zeros((num_slots, 1, self.vocab_size), np.float32)
        self._decode_binding = self.session.io_binding()
        self._decode_shape = (0, 0)  # (rows, mask width) the decode binding has

    @property
    def cache_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def run(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        start: int,
        stop: int,
        logits: np.ndarray | None = None,
    ) -> np.ndarray:
        """One call over slots start..stop-1, written in place. Returns logits (B, T, V), B = stop - start.

        input_ids, position_ids (B, T) int64; attention_mask (B, W) int64, right padded.
        ``logits``: a C-contiguous float32 (B, T, V) array to write them into (default: a new one).
        """
        b, B, T = self._binding, stop - start, input_ids.shape[1]
        b.bind_cpu_input(self.in_ids, input_ids)
        b.bind_cpu_input(self.in_mask, attention_mask)
        b.bind_cpu_input(self.in_pos, position_ids)
        if self._bound != (start, stop):
            for past, present, buf in zip(self.past_names, self.present_names, self.buffers, strict=True):
                view = buf[start:stop]  # (B, H, M, D), C-contiguous
                ptr = view.ctypes.data
                b.bind_input(past, "cpu", 0, self.kv_dtype, list(view.shape), ptr)
                b.bind_output(present, "cpu", 0, self.kv_dtype, list(view.shape), ptr)  # the same memory
            self._bound = (start, stop)
        if logits is None:
            logits = np.empty((B, T, self.vocab_size), np.float32)
        b.bind_output(self.logits_name, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(b)
        return logits

    def decode(self, last_tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One decode step over slots 0..n-1 (n = len(lengths)), holding ``lengths`` tokens, each
        given its next token. Returns logits (n, V), a view of a buffer the next decode step
        overwrites."""
        input_ids, attention_mask, position_ids = decode_inputs(self._decode_inputs, last_tokens, lengths, self.max_len)
        b, (n, width) = self._decode_binding, attention_mask.shape
        if n != self._decode_shape[0]:
            for name, a in ((self.in_ids, input_ids), (self.in_pos, position_ids)):
                b.bind_input(name, "cpu", 0, np.int64, [n, 1], a.ctypes.data)
            for past, present, buf in zip(self.past_names, self.present_names, self.buffers, strict=True):
                view = buf[:n]  # (n, H, M, D), C-contiguous
                b.bind_input(past, "cpu", 0, self.kv_dtype, list(view.shape), view.ctypes.data)
                b.bind_output(present, "cpu", 0, self.kv_dtype, list(view.shape), view.ctypes.data)
            logits = self._decode_logits[:n]
            b.bind_output(self.logits_name, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        if (n, width) != self._decode_shape:
            b.bind_input(self.in_mask, "cpu", 0, np.int64, [n, width], attention_mask.ctypes.data)
            self._decode_shape = (n, width)
        self.session.run_with_iobinding(b)
        return self._decode_logits[:n, 0]

    def apply(self, moves: list[Move]) -> None:
        """Copy each moved slot's valid positions into its new slot, in order."""
        for m in moves:
            for buf in self.buffers:
                buf[m.dst, :, : m.length] = buf[m.src, :, : m.length]


class InplaceBatch(SlotRows):
    """The running batch on the in-place decoder: slots 0..n-1 of the runner's buffers.

    A ``KVBatch`` (service/engine/kv/batch.py) with multi-token steps.
    """

    layout = "inplace"
    prefix_reuse = True
    multi_token_steps = True

    def __init__(self, runner: InplaceRunner, pad_id: int):
        self.runner, self.pad_id = runner, pad_id
        self.slots = InplaceCache(runner.num_slots, runner.max_len)

    def decode(self, last_tokens: np.ndarray) -> np.ndarray:
        """One decode step of slots 0..n-1; last_tokens (n,) in live_ids order. Returns logits (n, V)."""
        logits = self.runner.decode(last_tokens, self.slots.lengths[: len(self.slots)])
        self.slots.advance()
        return logits

    def decode_chunk(self, tokens: np.ndarray) -> np.ndarray:
        """Run T new tokens (the last one and a draft) of the only live slot. Returns logits (T, V).

        Writes T positions of the cache but does not count them: the caller ``advance``s by as
        many as it keeps; the positions beyond are overwritten by the next run.
        """
        ids, mask, pos = self.slots.chunk_inputs(tokens)
        return self.runner.run(ids, mask, pos, 0, 1)[0]

    def advance(self, by: int) -> None:
        """The only live slot keeps ``by`` of the positions its last ``decode_chunk`` wrote."""
        self.slots.advance(by)

    def prefill(self, request_ids: list[str], prompts: list[list[int]]) -> np.ndarray:
        """Give the newcomers the next slots and prefill them in one right-padded run. Returns (k, V)."""
        return self.prefill_scored(request_ids, prompts, [False] * len(prompts))[0]

    def prefill_scored(
        self, request_ids: list[str], prompts: list[list[int]], want: list[bool]
    ) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """``prefill``, plus the logits of every prompt position (L_i, V) of the rows in ``want``."""
        lengths = np.array([len(p) for p in prompts], np.int64)
        start = self.slots.join(request_ids, lengths)
        ids, mask, pos = right_pad_prompts(prompts, self.pad_id)
        logits = self.runner.run(ids, mask, pos, start, start + len(prompts))  # (k, T, V)
        whole = [logits[i, : len(p)].copy() if w else None for i, (p, w) in enumerate(zip(prompts, want, strict=True))]
        return logits[np.arange(len(prompts)), lengths - 1], whole

    def prefill_cached(self, request_ids: list[str], prompts: list[list[int]],
                       cached: list[list[np.ndarray]]) -> np.ndarray:
        """Prefill newcomers whose leading tokens' cache is given (per row 2L x (H, n, bs, D): n
        blocks of bs tokens, service.engine.kv.prefix_pool, n * bs < the prompt's length): each takes the
        next slot, the cached positions are copied in, and one run over that past computes the
        rest. Returns logits (k, V).

        One row per run: ONNX Runtime's CPU GroupQueryAttention refuses a multi-token run over a
        non-empty past for more than one row (model/export_inplace.py).
        """
        out = np.empty((len(prompts), self.runner.vocab_size), np.float32)
        for j, (rid, p, kv) in enumerate(zip(request_ids, prompts, cached, strict=True)):
            P, n = kv[0].shape[1] * kv[0].shape[2], len(p)
            slot = self.slots.join([rid], [n])
            for buf, a in zip(self.runner.buffers, kv, strict=True):
                buf[slot, :, :P].reshape(a.shape)[...] = a  # the slot's positions as (H, n, bs, D): no copy
            ids = np.asarray(p[P:], np.int64).reshape(1, n - P)
            pos = np.arange(P, n, dtype=np.int64).reshape(1, n - P)
            out[j] = self.runner.run(ids, np.ones((1, n), np.int64), pos, slot, slot + 1)[0, -1]
        return out

    def row_kv(self, request_ids: list[str]) -> dict[str, list[np.ndarray]]:
        """Each row's cached tokens, 2L x (H, tokens, D) views of its slot."""
        out = {}
        for rid in request_ids:
            s, n = self.slots.slot(rid), int(self.slots.lengths[self.slots.slot(rid)])
            out[rid] = [buf[s, :, :n] for buf in self.runner.buffers]
        return out

    def keep(self, keep_ids: list[str]) -> None:
        """Free the slots of rows not in keep_ids (a subset of live_ids); the last rows fill the holes."""
        if len(keep_ids) == len(self.slots):  # nobody left
            return
        self.runner.apply(self.slots.keep(keep_ids))

    def clear(self) -> None:
        self.slots.clear()
