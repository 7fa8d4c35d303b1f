"""The engine's options, in one frozen object.

``Settings.engine_config()`` builds it for the service (from the ``TEXTGEN_*`` variables); the
benchmarks build it from the same settings or directly, and tests directly. Its defaults are the
settings' defaults (service/settings.py reads them from here), so a benchmark that constructs
``EngineConfig(max_running=8)`` runs what the service runs with ``TEXTGEN_MAX_RUNNING=8``.
Pure data: no ONNX Runtime, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Provider = Literal["auto", "cpu", "cuda"]
GraphOptLevel = Literal["disable", "basic", "extended", "all"]
KVInplace = Literal["auto", "off"]
StaticDecode = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class EngineConfig:
    """What ``service.engine.engine.Engine`` is built with, besides the bundle.

    Args:
        provider: ONNX Runtime execution provider; "auto" takes CUDA where a GPU is usable.
        intra_op_threads: ONNX Runtime intra-op threads; 0 leaves the choice to ONNX Runtime
            (``Settings.engine_config()`` resolves the setting's 0 first: ``Settings.onnx_threads``).
        graph_opt_level: ONNX Runtime graph optimizations.
        kv_inplace: "auto" runs the in-place KV cache when the bundle has it and the provider is
            the CPU; "off" always runs the generic concat path.
        static_decode: the static-shape decode path (service/engine/kv/static_batch.py: the in-place
            decoder at fixed batch sizes, captured as CUDA graphs on the GPU). "auto": on CUDA
            when the bundle's in-place decoder is float16 (``--fp16``); "on": whenever the bundle
            has an in-place decoder (on the CPU without graphs: for tests); "off": never.
        cuda_graph: capture the static path's decode steps as CUDA graphs (CUDA only).
        speculative_tokens: most draft tokens a step checks when a single greedy sequence runs on
            the in-place cache (n-gram drafts, service/engine/ngram.py; the output does not change, except
            for int8 bundles, whose activation scale spans the run: docs/model.md); 0 turns
            speculation off.
        speculative_ngram: longest suffix n-gram that drafts are looked up by.
        prefix_caching: keep the KV cache of prompts' full blocks and skip recomputing them for
            later prompts that start with the same blocks (outputs do not change).
        prefix_block_size: tokens per prefix-cache block.
        max_running: most sequences in the running batch.
        max_waiting: most requests waiting for admission; more raise QueueFullError.
        kv_budget_tokens: cached-token budget; each running request reserves prompt + max_tokens.
            0 sizes it from ``kv_cache_mb`` (scheduler.size_kv_budget).
        kv_cache_mb: memory the KV cache may take, in MiB, at the model's bytes per token
            (bundle.kv_bytes_per_token), capped at max_running x context length tokens.
        max_prefill_tokens: prompt tokens prefilled per step (at least one request is always
            admitted), so a burst of long prompts cannot stall the running streams for long.
        seed: seeds the generators of requests that bring no seed of their own.
    """

    provider: Provider = "auto"
    intra_op_threads: int = 0
    graph_opt_level: GraphOptLevel = "all"
    kv_inplace: KVInplace = "auto"
    static_decode: StaticDecode = "auto"
    cuda_graph: bool = True
    speculative_tokens: int = 3
    speculative_ngram: int = 3
    prefix_caching: bool = True
    prefix_block_size: int = 16  # service.engine.prefix_cache.DEFAULT_BLOCK_SIZE
    max_running: int = 64
    max_waiting: int = 256
    kv_budget_tokens: int = 0
    kv_cache_mb: int = 4096
    max_prefill_tokens: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.speculative_tokens < 0 or self.speculative_ngram < 1:
            raise ValueError(f"speculative_tokens must be >= 0 and speculative_ngram >= 1, "
                             f"got {self.speculative_tokens} and {self.speculative_ngram}")
