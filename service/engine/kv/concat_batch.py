"""One ONNX Runtime session running the generic decoder (model.onnx), with its KV cache in and out.

CPU: the cache lives in numpy arrays (ONNX Runtime's arena reuses the output buffers).
CUDA: the cache stays on the device as OrtValues between steps through IO binding; only the
logits of the last position come back to the host.

``ConcatBatch`` is the running batch on this runner (the "concat" KV layout); the in-place
layout, for bundles that carry model.kvinplace.onnx, is service/engine/kv/inplace_batch.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from bundle.format import Bundle
from service.engine.config import Provider
from service.engine.kv.batch import SlotRows
from service.engine.kv.concat_cache import BatchCache, left_pad_prompts, pad_rows
from service.engine.kv.prefix_pool import as_tokens

log = logging.getLogger(__name__)

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def cuda_driver_present() -> bool:
    """True when the NVIDIA driver library loads (a GPU is usable), without initializing CUDA."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


class ProviderError(RuntimeError):
    """The requested execution provider is not what ONNX Runtime actually runs."""


@dataclass
class RunnerOutput:
    logits: np.ndarray  # float32 (B, V): the last position of each row
    presents: list[Any]  # 2L cache tensors (numpy on CPU, OrtValue on CUDA), each (B, H, S, D)


def want_cuda(provider: Provider) -> bool:
    """Whether to ask ONNX Runtime for CUDA: "cuda", or "auto" where CUDA is built in and a driver loads."""
    # onnxruntime-gpu lists CUDA as available even with no GPU; only ask for it where a driver loads.
    return provider == "cuda" or (
        provider == "auto" and "CUDAExecutionProvider" in ort.get_available_providers() and cuda_driver_present())


def session_options(intra_op_threads: int = 0, graph_opt_level: str = "all") -> ort.SessionOptions:
    """The service's ONNX Runtime session options (shared by both KV cache layouts)."""
    if graph_opt_level not in _OPT_LEVELS:
        raise ValueError(f"graph_opt_level must be one of {sorted(_OPT_LEVELS)}, got {graph_opt_level!r}")
    so = ort.SessionOptions()
    so.graph_optimization_level = _OPT_LEVELS[graph_opt_level]
    so.log_severity_level = 3
    if intra_op_threads:
        so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    # Spinning intra-op threads burn the cores the HTTP process and the sampler need between runs;
    # measured under load on 2 cores: 1.7x more tokens per CPU-second with spinning off.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class Runner:
    def __init__(self, bundle: Bundle, provider: Provider = "auto", intra_op_threads: int = 0,
                 graph_opt_level: str = "all"):
        so = session_options(intra_op_threads, graph_opt_level)
        available = ort.get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda(provider) else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(bundle.onnx_path), so, providers=providers)
        # ONNX Runtime falls back to CPU silently when CUDA cannot start: check what really runs.
        self.provider = self.session.get_providers()[0]
        self.on_cuda = self.provider == "CUDAExecutionProvider"
        if provider == "cuda" and not self.on_cuda:
            raise ProviderError(f"TEXTGEN_PROVIDER=cuda but ONNX Runtime runs {self.provider} "
                                f"(available: {available}); is a GPU and CUDA 13 + cuDNN 9 present?")
        log.info("ONNX Runtime %s running %s on %s, intra-op threads: %s", ort.__version__, bundle.onnx_path.name,
                 self.provider, intra_op_threads or "ONNX Runtime's default")

        names = bundle.io_names
        self.num_layers, self.num_heads, self.head_dim = bundle.num_layers, bundle.num_kv_heads, bundle.head_dim
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.has_position_ids = names["position_ids"] in inputs  # e.g. some Optimum GPT-2 exports lack it
        self.in_ids, self.in_mask, self.in_pos = names["input_ids"], names["attention_mask"], names["position_ids"]
        self.past_names = [names[k].format(i=i) for i in range(self.num_layers) for k in ("past_key", "past_value")]
        self.present_names = [names[k].format(i=i) for i in range(self.num_layers) for k in ("present_key", "present_value")]
        self.logits_name = names["logits"]
        missing = [n for n in (self.in_ids, self.in_mask, *self.past_names) if n not in inputs]
        outputs = {o.name for o in self.session.get_outputs()}
        missing += [n for n in (self.logits_name, *self.present_names) if n not in outputs]
        if missing:
            raise ValueError(f"{bundle.onnx_path} does not follow the decoder convention: missing {missing}")
        self.kv_dtype = np.float16 if inputs[self.past_names[0]].type == "tensor(float16)" else np.float32
        self._output_names = [self.logits_name, *self.present_names]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.num_heads, 0, self.head_dim)
        return [np.zeros(shape, self.kv_dtype) for _ in self.past_names]

    def to_host(self, tensors: list[Any]) -> list[np.ndarray]:
        """Cache tensors as numpy (a device-to-host copy on CUDA) for row joins and leaves."""
        return [t.numpy() if isinstance(t, ort.OrtValue) else t for t in tensors]

    def to_device(self, tensors: list[Any]) -> list[Any]:
        """Cache tensors where the next run wants them: OrtValues on the GPU under CUDA, else numpy."""
        if not self.on_cuda:
            return tensors
        return [t if isinstance(t, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(t, "cuda", 0) for t in tensors]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            past: list[Any], all_positions: bool = False) -> RunnerOutput:
        """input_ids, position_ids (B, T) int64; attention_mask (B, P + T) int64; past 2L x (B, H, P, D).

        ``all_positions``: logits (B, T, V) of every position instead of the last one's (B, V).
        """
        if self.on_cuda:
            return self._run_cuda(input_ids, attention_mask, position_ids, past, all_positions)
        feed = {self.in_ids: input_ids, self.in_mask: attention_mask}
        if self.has_position_ids:
            feed[self.in_pos] = position_ids
        feed.update(zip(self.past_names, past, strict=True))
        outs = self.session.run(self._output_names, feed)
        logits = outs[0] if all_positions else outs[0][:, -1, :]
        return RunnerOutput(np.ascontiguousarray(logits, dtype=np.float32), outs[1:])

    def _run_cuda(self, input_ids, attention_mask, position_ids, past, all_positions=False) -> RunnerOutput:
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.in_ids, input_ids)
        binding.bind_cpu_input(self.in_mask, attention_mask)
        if self.has_position_ids:
            binding.bind_cpu_input(self.in_pos, position_ids)
        for name, value in zip(self.past_names, past, strict=True):
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)  # already on the device: no copy
            else:
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        binding.bind_output(self.logits_name, "cuda")
        for name in self.present_names:
            binding.bind_output(name, "cuda")  # presents stay on the device for the next step
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        logits = outs[0].numpy()
        logits = (logits if all_positions else logits[:, -1, :]).astype(np.float32)
        return RunnerOutput(logits, list(outs[1:]))


class ConcatBatch(SlotRows):
    """The running batch on the generic decoder (model.onnx): the model concatenates past and new keys.

    A ``KVBatch`` (service/engine/kv/batch.py). Rows are left padded to a common width
    (service.engine.kv.concat_cache.BatchCache); the cache goes in and a
    new one comes out every step. Works with any bundle and provider; on CUDA the cache stays on
    the device and visits the host only when rows join or leave.
    """

    layout = "concat"
    prefix_reuse = True
    multi_token_steps = False

    def __init__(self, runner: Runner, pad_id: int):
        self.runner, self.pad_id = runner, pad_id
        self.slots = BatchCache()

    def decode(self, last_tokens: np.ndarray) -> np.ndarray:
        """One decode step of every live row; last_tokens (n,) in live_ids order. Returns logits (n, V)."""
        live = self.slots.live_indices
        tokens = np.full(len(self.slots), self.pad_id, np.int64)  # free slots decode padding
        tokens[live] = last_tokens
        ids, mask, pos = self.slots.decode_inputs(tokens)
        out = self.runner.run(ids, mask, pos, self.slots.past)
        self.slots.advance(out.presents, mask)
        return out.logits if len(live) == len(self.slots) else out.logits[live]

    def prefill(self, request_ids: list[str], prompts: list[list[int]]) -> np.ndarray:
        """Prefill the newcomers (one left-padded run) and add them to the batch. Returns logits (k, V)."""
        return self.prefill_scored(request_ids, prompts, [False] * len(prompts))[0]

    def prefill_scored(
        self, request_ids: list[str], prompts: list[list[int]], want: list[bool]
    ) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """``prefill``, plus the logits of every prompt position (L_i, V) of the rows in ``want``."""
        ids, mask, pos = left_pad_prompts(prompts, self.pad_id)
        out = self.runner.run(ids, mask, pos, self.runner.empty_past(len(prompts)), all_positions=any(want))
        self._join(request_ids, self.runner.to_host(out.presents), mask, prompts)
        if not any(want):
            return out.logits, [None] * len(prompts)
        T = ids.shape[1]  # left padded: row i's tokens are its last len(p) positions
        whole = [out.logits[i, T - len(p) :].copy() if w else None
                 for i, (p, w) in enumerate(zip(prompts, want, strict=True))]
        return np.ascontiguousarray(out.logits[:, -1]), whole

    def prefill_cached(self, request_ids: list[str], prompts: list[list[int]],
                       cached: list[list[np.ndarray]]) -> np.ndarray:
        """Prefill newcomers whose leading tokens' cache is given (per row 2L x (H, n, bs, D): n
        blocks of bs tokens, service.engine.kv.prefix_pool, n * bs < the prompt's length): one run per row
        over that past computes the rest. Returns logits (k, V).

        One row per run: rows with different cached lengths would leave holes between past and
        new tokens, which the batch's bookkeeping (right-aligned rows) does not hold.
        """
        logits, rows = [], []
        for p, kv in zip(prompts, cached, strict=True):
            past = self.runner.to_device([as_tokens(a)[None] for a in kv])  # 2L x (1, H, P, D)
            P = kv[0].shape[1] * kv[0].shape[2]
            T = len(p) - P
            ids = np.asarray(p[P:], np.int64).reshape(1, T)
            pos = np.arange(P, len(p), dtype=np.int64).reshape(1, T)
            out = self.runner.run(ids, np.ones((1, len(p)), np.int64), pos, past)
            logits.append(out.logits)
            rows.append(self.runner.to_host(out.presents))  # 2L x (1, H, len(p), D)
        presents, mask = pad_rows([[a[0] for a in r] for r in rows])
        self._join(request_ids, presents, mask, prompts)
        return np.concatenate(logits)

    def _join(self, request_ids: list[str], presents: list[np.ndarray], mask: np.ndarray,
              prompts: list[list[int]]) -> None:
        """Merge prefilled rows (left padded, host arrays) into the batch; joins happen on the host."""
        next_pos = np.array([len(p) for p in prompts], np.int64)
        self.slots.past = self.runner.to_host(self.slots.past)  # CUDA: a copy
        self.slots.merge(request_ids, presents, mask, next_pos)
        self.slots.past = self.runner.to_device(self.slots.past)

    def row_kv(self, request_ids: list[str]) -> dict[str, list[np.ndarray]]:
        """Each row's cached tokens, 2L x (H, tokens, D) host views (CUDA: one copy of the batch)."""
        past, c = self.runner.to_host(self.slots.past), self.slots
        out = {}
        for rid in request_ids:
            i = c.row_ids.index(rid)
            n = int(c.mask[i].sum())  # a live row's tokens are its last n columns
            out[rid] = [a[i, :, c.width - n :, :] for a in past]
        return out

    def keep(self, keep_ids: list[str]) -> None:
        """Drop rows that left the batch; on CUDA the cache visits the host only when membership changes."""
        if keep_ids == self.slots.live_ids:
            return
        self.slots.past = self.runner.to_host(self.slots.past)
        self.slots.keep(keep_ids)
        self.slots.past = self.runner.to_device(self.slots.past)

    def clear(self) -> None:
        self.slots = BatchCache()
