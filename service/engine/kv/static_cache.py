"""Bookkeeping of the static-shape decode path (service/engine/kv/static_batch.py). Pure: no model, no I/O.

A CUDA graph replays the kernels it captured with the shapes and addresses it captured, so the
static path decodes at a few fixed batch sizes (buckets) over slots 0..b-1 of the cache
buffers, whatever lives there. Unlike service.engine.kv.inplace_cache.InplaceCache, a sequence keeps its slot
until it leaves (nothing is ever moved: ONNX Runtime's Python API has no device-to-device copy);
a newcomer takes the lowest free slot. A step runs the smallest bucket covering the highest
occupied slot; free slots below it are padding rows that nobody reads.

Every input of a step has a fixed shape: input_ids and position_ids (b, 1), attention_mask
(b, max_len), right padded (a live row holds length + 1 ones: its cached tokens and the new
one), so GroupQueryAttention's ``total_sequence_length`` (the mask's width) never changes.
Padding rows feed the pad token at position 0 with a mask of one 1 (a length of 0 would make
seqlens_k -1): they write position 0 of a free slot, which a newcomer's prefill overwrites
before anything reads it.
"""

from __future__ import annotations

import numpy as np

from service.engine.kv.slot_map import SlotMap


def decode_buckets(max_running: int) -> tuple[int, ...]:
    """The bucket sizes for a cache of ``max_running`` slots: the powers of two below it, and
    ``max_running`` itself (the largest bucket is the whole cache).

    >>> decode_buckets(48)
    (1, 2, 4, 8, 16, 32, 48)
    """
    if max_running < 1:
        raise ValueError(f"max_running must be >= 1, got {max_running}")
    sizes, b = [], 1
    while b < max_running:
        sizes.append(b)
        b *= 2
    return (*sizes, max_running)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket of at least n rows (buckets ascending)."""
    if not 1 <= n <= buckets[-1]:
        raise ValueError(f"a decode step over {n} slots does not fit the buckets {buckets} (1..{buckets[-1]})")
    return next(b for b in buckets if b >= n)


def contiguous_runs(slots: list[int]) -> list[tuple[int, int, list[int]]]:
    """Split ascending slots into runs of consecutive ones: (start, stop, positions in ``slots``).

    >>> contiguous_runs([0, 1, 4, 5, 6, 9])
    [(0, 2, [0, 1]), (4, 7, [2, 3, 4]), (9, 10, [5])]
    """
    runs: list[tuple[int, int, list[int]]] = []
    for i, s in enumerate(slots):
        if runs and runs[-1][1] == s:
            start, _, idx = runs[-1]
            runs[-1] = (start, s + 1, [*idx, i])
        else:
            runs.append((s, s + 1, [i]))
    return runs


class StaticSlots(SlotMap):
    """Which request holds which slot (a SlotMap whose sequences never move), and the buckets.

    Args:
        num_slots: rows of the cache buffers (the engine's max_running, the largest bucket).
        max_len: positions per row (the context length; the attention mask's width).
    """

    def __init__(self, num_slots: int, max_len: int):
        super().__init__(num_slots, max_len)
        self.buckets = decode_buckets(num_slots)
        self._owner: list[str | None] = [None] * num_slots  # slot -> request id
        self._positions = np.arange(max_len, dtype=np.int64)

    @property
    def live_slots(self) -> list[int]:
        """Occupied slots, ascending: the order of live_ids and of a decode step's logits."""
        return [s for s, r in enumerate(self._owner) if r is not None]

    @property
    def live_ids(self) -> list[str]:
        return [r for r in self._owner if r is not None]

    @property
    def top(self) -> int:
        """One past the highest occupied slot (0 when empty): a decode step covers slots 0..top-1."""
        return max(self._slot.values(), default=-1) + 1

    def join(self, request_ids: list[str], lengths: list[int] | np.ndarray) -> list[int]:
        """Give each newcomer the lowest free slot, in order; return their slots (ascending)."""
        self._check_join(request_ids, lengths)
        slots = [s for s, r in enumerate(self._owner) if r is None][: len(request_ids)]
        for rid, s, length in zip(request_ids, slots, lengths, strict=True):
            self._slot[rid], self._owner[s], self.lengths[s] = s, rid, length
        return slots

    def keep(self, keep_ids: list[str] | set[str]) -> None:
        """Free the slot of every request not in keep_ids; the others stay where they are."""
        keep = set(keep_ids)
        for rid in [r for r in self._slot if r not in keep]:
            s = self._slot.pop(rid)
            self._owner[s], self.lengths[s] = None, 0

    def clear(self) -> None:
        self._slot.clear()
        self._owner = [None] * self.num_slots
        self.lengths[:] = 0

    def decode_inputs(self, last_tokens: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """input_ids (b, 1), attention_mask (b, max_len), position_ids (b, 1) of one decode step, for
        the bucket b covering slots 0..top-1; last_tokens (n,) in live_ids order."""
        live = self.live_slots
        if len(last_tokens) != len(live):
            raise ValueError(f"{len(live)} live slots but {len(last_tokens)} tokens")
        b = bucket_for(self.top, self.buckets)
        if live and int(self.lengths[live].max()) + 1 > self.max_len:
            raise ValueError(f"a sequence would exceed the cache's {self.max_len} positions")
        lengths = self.lengths[:b]  # free slots: 0, i.e. position 0 and one mask 1
        ids = np.full((b, 1), pad_id, np.int64)
        ids[live, 0] = last_tokens
        mask = (self._positions <= lengths[:, None]).astype(np.int64)  # (b, M)
        return ids, mask, lengths.reshape(b, 1).copy()

    def advance(self) -> None:
        """After a decode step: every live slot holds one more token."""
        live = self.live_slots
        self.lengths[live] += 1

    def check_invariants(self) -> None:
        """Assert that the bookkeeping is consistent (tests)."""
        assert all(self._owner[s] == r for r, s in self._slot.items()), "slot map out of sync"
        assert sum(r is not None for r in self._owner) == len(self._slot), "an owner without a slot"
        live = self.live_slots
        assert (self.lengths[live] >= 1).all() and (self.lengths[live] <= self.max_len).all(), self.lengths
        free = [s for s in range(self.num_slots) if self._owner[s] is None]
        assert not self.lengths[free].any(), "a free slot holds tokens"
