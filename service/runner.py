"""One ONNX Runtime session running the decoder, with its KV cache in and out.

CPU: the cache lives in numpy arrays (ONNX Runtime's arena reuses the output buffers).
CUDA: the cache stays on the device as OrtValues between steps through IO binding; only the
logits of the last position come back to the host.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from service.bundle import Bundle

log = logging.getLogger(__name__)

Provider = Literal["auto", "cpu", "cuda"]
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


class Runner:
    def __init__(self, bundle: Bundle, provider: Provider = "auto", intra_op_threads: int = 0,
                 graph_opt_level: str = "all"):
        if graph_opt_level not in _OPT_LEVELS:
            raise ValueError(f"graph_opt_level must be one of {sorted(_OPT_LEVELS)}, got {graph_opt_level!r}")
        available = ort.get_available_providers()
        # onnxruntime-gpu lists CUDA as available even with no GPU; only ask for it where a driver loads.
        want_cuda = provider == "cuda" or (
            provider == "auto" and "CUDAExecutionProvider" in available and cuda_driver_present())
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
        so = ort.SessionOptions()
        so.graph_optimization_level = _OPT_LEVELS[graph_opt_level]
        so.log_severity_level = 3
        if intra_op_threads:
            so.intra_op_num_threads = intra_op_threads
        so.inter_op_num_threads = 1
        # Spinning intra-op threads burn the cores the HTTP process and the sampler need between runs;
        # measured under load on 2 cores: 1.7x more tokens per CPU-second with spinning off.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(bundle.onnx_path), so, providers=providers)
        # ONNX Runtime falls back to CPU silently when CUDA cannot start: check what really runs.
        self.provider = self.session.get_providers()[0]
        self.on_cuda = self.provider == "CUDAExecutionProvider"
        if provider == "cuda" and not self.on_cuda:
            raise ProviderError(f"TEXTGEN_PROVIDER=cuda but ONNX Runtime runs {self.provider} "
                                f"(available: {available}); is a GPU and CUDA 13 + cuDNN 9 present?")
        log.info("ONNX Runtime %s running %s on %s", ort.__version__, bundle.onnx_path.name, self.provider)

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
            past: list[Any]) -> RunnerOutput:
        """input_ids, position_ids (B, T) int64; attention_mask (B, P + T) int64; past 2L x (B, H, P, D)."""
        if self.on_cuda:
            return self._run_cuda(input_ids, attention_mask, position_ids, past)
        feed = {self.in_ids: input_ids, self.in_mask: attention_mask}
        if self.has_position_ids:
            feed[self.in_pos] = position_ids
        feed.update(zip(self.past_names, past, strict=True))
        outs = self.session.run(self._output_names, feed)
        return RunnerOutput(np.ascontiguousarray(outs[0][:, -1, :], dtype=np.float32), outs[1:])

    def _run_cuda(self, input_ids, attention_mask, position_ids, past) -> RunnerOutput:
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
        logits = outs[0].numpy()[:, -1, :].astype(np.float32)
        return RunnerOutput(logits, list(outs[1:]))
