"""The static-shape decode path: the in-place decoder at fixed batch sizes, replayed as CUDA graphs.

A decode step on a GPU is a few hundred small kernels; launching them from Python costs more
than running them for a small model. ONNX Runtime's CUDA provider can capture a run as a CUDA
graph and replay it with one launch (provider option ``enable_cuda_graph``), if every later run
has the same shapes and the same input and output addresses. This runner makes decode steps
like that:

- the cache is the in-place layout (model.kvinplace.onnx, model/export_inplace.py): per layer one
  key and one value buffer ``(num_slots, H, max_len, D)`` allocated once on the device, bound as
  both past and present; GroupQueryAttention writes the new position in place. On CUDA it needs
  float16 (the bundle's ``--fp16`` export, model/export_inplace_fp16.py);
- a step runs the smallest batch-size bucket b covering the occupied slots (service/engine/kv/static_cache.py),
  over slots 0..b-1, with an attention mask as wide as the cache; each bucket owns its input and
  logits buffers on the device and its graph id (run option ``gpu_graph_id``), so it is captured
  once, at its first steps, and replayed after;
- per step, the host sends token ids, positions and the mask, and gets the logits back: the
  cache never leaves the device (``transfers`` counts the bytes).

Prefills (any shape) run the same session with ``gpu_graph_id`` -1: no capture. When the session
cannot be created with graph capture (ONNX Runtime refuses it when a compute node is not on the
CUDA provider), the runner logs why and runs the same fixed-shape steps without graphs
(``cuda_graph`` is then False). On the CPU there are no graphs: the same bookkeeping runs on numpy
buffers, which is how the tests check it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from bundle.format import Bundle
from service.engine.kv.batch import SlotRows
from service.engine.kv.concat_batch import Provider, ProviderError, session_options, want_cuda
from service.engine.kv.inplace_cache import right_pad_prompts
from service.engine.kv.static_cache import StaticSlots, contiguous_runs, decode_buckets

log = logging.getLogger(__name__)

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class Transfers:
    """Bytes the runner copied between host and device in decode steps (prefills not counted)."""

    steps: int = 0
    host_to_device: int = 0  # token ids, positions, attention mask
    device_to_host: int = 0  # logits

    def per_step(self) -> dict[str, float]:
        n = max(self.steps, 1)
        return {"steps": self.steps, "host_to_device_bytes": self.host_to_device / n,
                "device_to_host_bytes": self.device_to_host / n}


@dataclass
class _Bucket:
    """One batch size's fixed buffers and binding; on CUDA its own captured graph."""

    size: int
    binding: Any
    run_options: ort.RunOptions | None
    inputs: dict[str, Any]  # name -> OrtValue (CUDA) or numpy array (CPU), fixed addresses
    logits: Any  # (b, 1, V) float32: OrtValue (CUDA) or numpy array (CPU)
    runs: int = field(default=0)


class StaticRunner:
    """One session of the in-place decoder with device-resident cache buffers and bucketed decode steps.

    Args:
        bundle: a bundle with an in-place decoder (``onnx_kv_inplace``); float16 for CUDA.
        num_slots: rows of the cache buffers and the largest bucket (the engine's max_running).
        provider: "auto", "cpu" or "cuda" (as service.engine.kv.concat_batch.Runner).
        cuda_graph: capture decode steps as CUDA graphs when on CUDA.
        intra_op_threads, graph_opt_level: as service.engine.kv.concat_batch.Runner.
    """

    def __init__(self, bundle: Bundle, num_slots: int, provider: Provider = "auto", cuda_graph: bool = True,
                 intra_op_threads: int = 0, graph_opt_level: str = "all"):
        path = bundle.kv_inplace_path
        if path is None:
            raise ValueError(f"bundle {bundle.path} has no in-place decoder (config.json 'onnx_kv_inplace'): "
                             "the static decode path needs one")
        so = session_options(intra_op_threads, graph_opt_level)
        self.graph_fallback: str | None = None  # why graph capture is off on CUDA, if it is
        if want_cuda(provider):
            self.session, self.cuda_graph = self._open_cuda(str(path), so, cuda_graph)
        else:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            self.cuda_graph = False
        self.provider = self.session.get_providers()[0]
        self.on_cuda = self.provider == "CUDAExecutionProvider"
        if provider == "cuda" and not self.on_cuda:
            raise ProviderError(f"TEXTGEN_PROVIDER=cuda but ONNX Runtime runs {self.provider} "
                                f"(available: {ort.get_available_providers()})")
        self.device = "cuda" if self.on_cuda else "cpu"
        names = bundle.kv_inplace_io_names
        L = self.num_layers = bundle.num_layers
        self.num_heads, self.head_dim, self.vocab_size = bundle.num_kv_heads, bundle.head_dim, bundle.vocab_size
        self.in_ids, self.in_mask = names["input_ids"], names["attention_mask"]
        self.in_pos, self.logits_name = names["position_ids"], names["logits"]
        self.past_names = [names[k].format(i=i) for i in range(L) for k in ("past_key", "past_value")]
        self.present_names = [names[k].format(i=i) for i in range(L) for k in ("present_key", "present_value")]
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        missing = [n for n in (self.in_ids, self.in_mask, self.in_pos, *self.past_names) if n not in inputs]
        missing += [n for n in (self.logits_name, *self.present_names) if n not in outputs]
        if missing:
            raise ValueError(f"{path} does not follow the in-place decoder convention: missing {missing}")
        kv_types = {inputs[n].type for n in self.past_names}
        if len(kv_types) != 1 or next(iter(kv_types)) not in _NP_TYPES:
            raise ValueError(f"{path}: the cache must be float32 or float16, got {sorted(kv_types)}")
        if outputs[self.logits_name].type != "tensor(float)":
            raise ValueError(f"{path}: the static path reads float32 logits, got {outputs[self.logits_name].type}")
        self.kv_dtype = _NP_TYPES[next(iter(kv_types))]
        if self.on_cuda and self.kv_dtype != np.float16:
            raise ValueError(f"{path}: ONNX Runtime's CUDA GroupQueryAttention needs a float16 cache; "
                             "export the bundle with `python -m model export --fp16`")
        self.num_slots, self.max_len = num_slots, bundle.context_length
        self.buckets = decode_buckets(num_slots)
        self.pad_id = bundle.pad_id
        self._shape = (num_slots, self.num_heads, self.max_len, self.head_dim)
        self._row_bytes = self.num_heads * self.max_len * self.head_dim * np.dtype(self.kv_dtype).itemsize
        self.buffers = [self._alloc(self._shape, self.kv_dtype) for _ in self.past_names]  # 2L x (N, H, M, D)
        self._ptrs = [self._ptr(b) for b in self.buffers]
        self._buckets: dict[int, _Bucket] = {}
        self._graph_session = self.cuda_graph  # the session was created with enable_cuda_graph
        self._graph_ids_off = False
        self._prefill_options = self._graph_options(-1)
        self.transfers = Transfers()
        log.info("static decode path: %s on %s, buckets %s, CUDA graphs: %s%s", path.name, self.provider,
                 self.buckets, self.cuda_graph, f" (off: {self.graph_fallback})" if self.graph_fallback else "")

    # ---- set-up ------------------------------------------------------------------------------
    def _open_cuda(self, path: str, so: ort.SessionOptions, cuda_graph: bool) -> tuple[ort.InferenceSession, bool]:
        if cuda_graph:
            try:
                opts = {"enable_cuda_graph": "1"}
                return ort.InferenceSession(path, so, providers=[("CUDAExecutionProvider", opts),
                                                                 "CPUExecutionProvider"]), True
            except Exception as e:  # ONNX Runtime refuses capture for this graph: run the steps without it
                self.graph_fallback = f"{type(e).__name__}: {e}"
                log.warning("CUDA graph capture is not possible for %s; decoding without it: %s", path, e)
        return ort.InferenceSession(path, so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]), False

    def _alloc(self, shape: tuple[int, ...], dtype: Any) -> Any:
        if self.on_cuda:
            return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, "cuda", 0)
        return np.zeros(shape, dtype)

    def _ptr(self, buf: Any) -> int:
        return buf.data_ptr() if isinstance(buf, ort.OrtValue) else buf.ctypes.data

    def _graph_options(self, graph_id: int) -> ort.RunOptions | None:
        if not self._graph_session:
            return None
        ro = ort.RunOptions()
        ro.add_run_config_entry("gpu_graph_id", str(graph_id))  # -1: this run is neither captured nor replayed
        return ro

    def _bind_cache(self, binding: Any, start: int, stop: int) -> None:
        """Bind slots start..stop-1 of every buffer as both past and present (the same memory)."""
        shape = [stop - start, self.num_heads, self.max_len, self.head_dim]
        for past, present, ptr in zip(self.past_names, self.present_names, self._ptrs, strict=True):
            addr = ptr + start * self._row_bytes
            binding.bind_input(past, self.device, 0, self.kv_dtype, shape, addr)
            binding.bind_output(present, self.device, 0, self.kv_dtype, shape, addr)

    def _bucket(self, b: int) -> _Bucket:
        """The fixed buffers of bucket b, bound once (a graph replays these addresses)."""
        if b in self._buckets:
            return self._buckets[b]
        binding = self.session.io_binding()
        inputs = {self.in_ids: self._alloc((b, 1), np.int64), self.in_pos: self._alloc((b, 1), np.int64),
                  self.in_mask: self._alloc((b, self.max_len), np.int64)}
        logits = self._alloc((b, 1, self.vocab_size), np.float32)
        for name, buf in inputs.items():
            binding.bind_input(name, self.device, 0, np.int64, list(_shape(buf)), self._ptr(buf))
        binding.bind_output(self.logits_name, self.device, 0, np.float32, list(_shape(logits)), self._ptr(logits))
        self._bind_cache(binding, 0, b)
        graph_id = -1 if self._graph_ids_off else self.buckets.index(b) + 1  # ids start at 1: 0 is ORT's own
        bucket = _Bucket(b, binding, self._graph_options(graph_id) if self._graph_session else None, inputs, logits)
        self._buckets[b] = bucket
        return bucket

    def _drop_graphs(self, why: str) -> None:
        """Run every later step without capture (graph id -1) after ONNX Runtime failed to capture or replay."""
        log.warning("CUDA graph capture or replay failed; decoding without graphs from now on: %s", why)
        self.graph_fallback, self.cuda_graph = why, False
        for bucket in self._buckets.values():
            bucket.run_options = self._prefill_options  # gpu_graph_id -1 on this graph-enabled session
        self._graph_ids_off = True

    @property
    def cache_bytes(self) -> int:
        return len(self.buffers) * self.num_slots * self._row_bytes

    # ---- runs --------------------------------------------------------------------------------
    def decode(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """One decode step at a bucket's fixed shapes (service.engine.kv.static_cache.StaticSlots.decode_inputs):
        input_ids, position_ids (b, 1), attention_mask (b, max_len) over slots 0..b-1. Returns the
        logits (b, V), valid until the next step of the same bucket."""
        b = input_ids.shape[0]
        if b not in self.buckets:
            raise ValueError(f"a decode step of {b} rows is not one of the buckets {self.buckets}")
        bucket = self._bucket(b)
        feed = {self.in_ids: input_ids, self.in_mask: attention_mask, self.in_pos: position_ids}
        for name, value in feed.items():
            buf = bucket.inputs[name]
            if self.on_cuda:
                buf.update_inplace(np.ascontiguousarray(value))  # host to device, into the captured address
            else:
                np.copyto(buf, value)
        if bucket.run_options is None:
            self.session.run_with_iobinding(bucket.binding)
        else:
            try:
                self.session.run_with_iobinding(bucket.binding, bucket.run_options)
            except Exception as e:  # capture or replay failed: the same step as a plain run, from now on
                self._drop_graphs(f"{type(e).__name__}: {e}")
                self.session.run_with_iobinding(bucket.binding, bucket.run_options)
        bucket.runs += 1
        logits = bucket.logits.numpy() if self.on_cuda else bucket.logits  # (b, 1, V) float32
        self.transfers.steps += 1
        self.transfers.host_to_device += sum(v.nbytes for v in feed.values())
        self.transfers.device_to_host += logits.nbytes if self.on_cuda else 0
        return logits[:, 0]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            start: int, stop: int) -> np.ndarray:
        """A run of any shape over slots start..stop-1 (prefills), never captured. Returns logits (B, T, V).

        input_ids, position_ids (B, T) int64; attention_mask (B, W) int64, right padded.
        """
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.in_ids, input_ids)
        binding.bind_cpu_input(self.in_mask, attention_mask)
        binding.bind_cpu_input(self.in_pos, position_ids)
        self._bind_cache(binding, start, stop)
        if self.on_cuda:
            binding.bind_output(self.logits_name, "cuda")
        else:
            logits = np.empty((stop - start, input_ids.shape[1], self.vocab_size), np.float32)
            binding.bind_output(self.logits_name, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        if self._prefill_options is None:
            self.session.run_with_iobinding(binding)
        else:
            self.session.run_with_iobinding(binding, self._prefill_options)
        return binding.get_outputs()[0].numpy() if self.on_cuda else logits


def _shape(buf: Any) -> tuple[int, ...]:
    return tuple(buf.shape()) if isinstance(buf, ort.OrtValue) else buf.shape


class StaticBatch(SlotRows):
    """The running batch on the static decode path (service.engine.kv.static_cache.StaticSlots).

    Same interface as service.engine.kv.inplace_batch.InplaceBatch (live_ids, decode, prefill,
    prefill_scored, keep, clear), without multi-token (speculative) steps: a captured graph feeds
    one token per row.
    """

    layout = "static"
    multi_token_steps = False
    prefix_reuse = False

    def __init__(self, runner: StaticRunner, pad_id: int):
        self.runner, self.pad_id = runner, pad_id
        self.slots = StaticSlots(runner.num_slots, runner.max_len)

    def decode(self, last_tokens: np.ndarray) -> np.ndarray:
        """One decode step of every live row; last_tokens (n,) in live_ids order. Returns logits (n, V)."""
        live = self.slots.live_slots
        logits = self.runner.decode(*self.slots.decode_inputs(np.asarray(last_tokens, np.int64), self.pad_id))
        self.slots.advance()
        return logits[live]

    def prefill(self, request_ids: list[str], prompts: list[list[int]]) -> np.ndarray:
        """Give the newcomers free slots and prefill them, one right-padded run per block of
        consecutive slots. Returns logits (k, V)."""
        return self.prefill_scored(request_ids, prompts, [False] * len(prompts))[0]

    def prefill_scored(
        self, request_ids: list[str], prompts: list[list[int]], want: list[bool]
    ) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """``prefill``, plus the logits of every prompt position (L_i, V) of the rows in ``want``."""
        slots = self.slots.join(request_ids, [len(p) for p in prompts])
        last = np.empty((len(prompts), self.runner.vocab_size), np.float32)
        whole: list[np.ndarray | None] = [None] * len(prompts)
        for start, stop, idx in contiguous_runs(slots):
            group = [prompts[i] for i in idx]
            ids, mask, pos = right_pad_prompts(group, self.pad_id)
            logits = self.runner.run(ids, mask, pos, start, stop)  # (k, T, V)
            for j, i in enumerate(idx):
                n = len(prompts[i])
                last[i] = logits[j, n - 1]
                if want[i]:
                    whole[i] = logits[j, :n].copy()
        return last, whole

    def keep(self, keep_ids: list[str]) -> None:
        """Free the slots of rows not in keep_ids; the others keep theirs (nothing is copied)."""
        self.slots.keep(keep_ids)

    def clear(self) -> None:
        self.slots.clear()
