"""The interface of a running batch and its KV cache, whatever the layout; and the choice of layout.

The engine (service/engine/engine.py) talks to the batch through ``KVBatch`` only; each layout is
one module pair: ``concat_batch.py`` over ``concat_cache.py`` (the generic model.onnx; rows left
padded, the cache goes in and comes out every step; any provider) and ``inplace_batch.py`` over
``inplace_cache.py`` (the bundle's in-place graph, GroupQueryAttention over buffers allocated
once; rows right padded; CPU). A layout says what it can do through its capabilities
(``multi_token_steps``), never through the engine checking its class.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Protocol

import numpy as np

from bundle.format import Bundle
from service.engine.config import KVInplace, Provider

log = logging.getLogger(__name__)

Layout = Literal["inplace", "concat"]


class KVBatch(Protocol):
    layout: Layout
    # Capability: decode_chunk/advance run several new tokens of a single sequence in one step and
    # keep any prefix of them (speculative decoding). The concat layout cannot drop positions.
    multi_token_steps: bool
    runner: Any  # the ONNX Runtime session wrapper (its ``provider`` is reported at start-up)

    @property
    def live_ids(self) -> list[str]:
        """Request ids of the rows, in the order decode takes and returns them."""
        ...

    @property
    def num_live(self) -> int: ...

    @property
    def cached_tokens(self) -> int: ...

    def __contains__(self, request_id: object) -> bool: ...

    def prefill(self, request_ids: list[str], prompts: list[list[int]]) -> np.ndarray:
        """Join: prefill the newcomers and add them as rows. Returns their last-position logits (k, V)."""
        ...

    def prefill_scored(self, request_ids: list[str], prompts: list[list[int]],
                       want: list[bool]) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """``prefill``, plus the logits of every prompt position (L_i, V) of the rows in ``want``."""
        ...

    def decode(self, last_tokens: np.ndarray) -> np.ndarray:
        """Step: one new token per live row (live_ids order). Returns logits (n, V)."""
        ...

    def decode_chunk(self, tokens: np.ndarray) -> np.ndarray:
        """Only with multi_token_steps: T new tokens of the only live row, uncounted. Returns (T, V)."""
        ...

    def advance(self, by: int) -> None:
        """Only with multi_token_steps: the only live row keeps ``by`` of its last chunk's positions."""
        ...

    def keep(self, keep_ids: list[str]) -> None:
        """Retire: drop the rows not in ``keep_ids`` (a subset of live_ids)."""
        ...

    def clear(self) -> None:
        """Drop every row (after a failed model run)."""
        ...


def open_batch(bundle: Bundle, provider: Provider, intra_op_threads: int, graph_opt_level: str,
               max_running: int, kv_inplace: KVInplace) -> KVBatch:
    """The running batch on the in-place layout where it can run, else on the concat one; logs which."""
    from service.engine.kv.concat_batch import ConcatBatch, Runner, want_cuda

    if kv_inplace not in ("auto", "off"):
        raise ValueError(f"kv_inplace must be 'auto' or 'off', got {kv_inplace!r}")
    if kv_inplace == "off":
        why = "TEXTGEN_KV_INPLACE=off"
    elif bundle.kv_inplace_path is None:
        why = "the bundle has no in-place decoder (config.json 'onnx_kv_inplace')"
    elif want_cuda(provider):
        why = "CUDA runs the generic decoder (the CUDA GroupQueryAttention kernel needs float16)"
    else:
        from service.engine.kv.inplace_batch import InplaceBatch, InplaceRunner

        runner = InplaceRunner(bundle, max_running, intra_op_threads, graph_opt_level)
        log.info("KV cache layout: inplace (%s, %d slots x %d positions, at most %.0f MB of cache)",
                 bundle.kv_inplace_path.name, max_running, runner.max_len, runner.cache_bytes / 1e6)
        return InplaceBatch(runner, bundle.padding_id)
    log.info("KV cache layout: concat (%s)", why)
    return ConcatBatch(Runner(bundle, provider, intra_op_threads, graph_opt_level), bundle.padding_id)
