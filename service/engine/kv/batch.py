"""The interface of a running batch and its KV cache, whatever the layout; and the choice of layout.

The engine (service/engine/engine.py) talks to the batch through ``KVBatch`` only; each layout is
one module pair: ``concat_batch.py`` over ``concat_cache.py`` (the generic model.onnx; rows left
padded, the cache goes in and comes out every step; any provider) and ``inplace_batch.py`` over
``inplace_cache.py`` (the bundle's in-place graph, GroupQueryAttention over buffers allocated
once; rows right padded; CPU). A layout says what it can do through its capabilities
(``multi_token_steps``, ``prefix_reuse``), never through the engine checking its class. The static
path (``static_batch.py`` over ``static_cache.py``) is the in-place graph at fixed batch-size buckets
for CUDA graphs.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Protocol

import numpy as np

from bundle.format import Bundle
from service.engine.config import EngineConfig

log = logging.getLogger(__name__)

Layout = Literal["inplace", "concat", "static"]


class KVBatch(Protocol):
    layout: Layout
    # Capability: decode_chunk/advance run several new tokens of a single sequence in one step and
    # keep any prefix of them (speculative decoding). The concat layout cannot drop positions.
    multi_token_steps: bool
    # Capability: prefill_cached/row_kv copy cached prefix blocks in and a row's cache out (prefix caching).
    prefix_reuse: bool
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


class SlotRows:
    """Membership and sizes of a batch whose rows are kept by ``self.slots`` (an InplaceCache,
    StaticSlots or BatchCache): the part of KVBatch every layout shares."""

    slots: Any

    @property
    def live_ids(self) -> list[str]:
        return self.slots.live_ids

    @property
    def num_live(self) -> int:
        return self.slots.num_live

    @property
    def cached_tokens(self) -> int:
        return self.slots.cached_tokens

    def __contains__(self, request_id: object) -> bool:
        return request_id in self.slots


def open_batch(bundle: Bundle, config: EngineConfig) -> KVBatch:
    """The running batch: the static path where it is asked for, else the in-place layout where it
    can run, else the concat one; logs which."""
    from service.engine.kv.concat_batch import ConcatBatch, Runner, want_cuda

    c = config
    if c.kv_inplace not in ("auto", "off"):
        raise ValueError(f"kv_inplace must be 'auto' or 'off', got {c.kv_inplace!r}")
    if c.static_decode not in ("auto", "on", "off"):
        raise ValueError(f"static_decode must be 'auto', 'on' or 'off', got {c.static_decode!r}")
    inplace_dtype = (bundle.kv_inplace or {}).get("kv_dtype", "float32")
    if c.static_decode == "on" and bundle.kv_inplace_path is None:
        raise ValueError("TEXTGEN_STATIC_DECODE=on needs a bundle with an in-place decoder "
                         "(config.json 'onnx_kv_inplace'; see `python -m model export --help`)")
    static = _open_static(bundle, c, inplace_dtype, want_cuda(c.provider))
    if static is not None:
        return static
    if c.kv_inplace == "off":
        why = "TEXTGEN_KV_INPLACE=off"
    elif bundle.kv_inplace_path is None:
        why = "the bundle has no in-place decoder (config.json 'onnx_kv_inplace')"
    elif want_cuda(c.provider):
        why = "CUDA runs the generic decoder unless the static path runs (TEXTGEN_STATIC_DECODE)"
    elif inplace_dtype != "float32":
        why = f"the in-place decoder is {inplace_dtype}, for CUDA"
    else:
        from service.engine.kv.inplace_batch import InplaceBatch, InplaceRunner

        runner = InplaceRunner(bundle, c.max_running, c.intra_op_threads, c.graph_opt_level)
        log.info("KV cache layout: inplace (%s, %d slots x %d positions, at most %.0f MB of cache)",
                 bundle.kv_inplace_path.name, c.max_running, runner.max_len, runner.cache_bytes / 1e6)
        return InplaceBatch(runner, bundle.padding_id)
    log.info("KV cache layout: concat (%s)", why)
    return ConcatBatch(Runner(bundle, c.provider, c.intra_op_threads, c.graph_opt_level), bundle.padding_id)


def _open_static(bundle: Bundle, c: EngineConfig, inplace_dtype: str, cuda: bool) -> KVBatch | None:
    """The static path (CUDA graphs) when asked for ("on") or when it applies ("auto": CUDA and a
    float16 in-place decoder); None otherwise, or when "auto" could not start it."""
    auto = c.static_decode == "auto" and bundle.kv_inplace_path is not None and inplace_dtype == "float16" and cuda
    if c.static_decode != "on" and not auto:
        return None
    from service.engine.kv.static_batch import StaticBatch, StaticRunner

    try:
        runner = StaticRunner(bundle, c.max_running, c.provider, c.cuda_graph, c.intra_op_threads, c.graph_opt_level)
    except Exception:
        if c.static_decode == "on":
            raise
        log.exception("the static decode path could not start; serving model.onnx instead")
        return None
    log.info("KV cache layout: static (%s, %d slots x %d positions, %.0f MB of cache, buckets %s, CUDA graphs: %s)",
             bundle.kv_inplace_path.name, c.max_running, runner.max_len, runner.cache_bytes / 1e6, runner.buckets,
             runner.cuda_graph)
    return StaticBatch(runner, bundle.padding_id)
