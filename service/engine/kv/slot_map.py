"""What the in-place and the static cache's bookkeeping share: which request holds which slot,
how many tokens each slot has cached, and the checks on newcomers. Pure: no model, no I/O.

Where a newcomer goes and what happens when a sequence leaves differ: the in-place cache keeps
its live slots at 0..n-1 (service/engine/kv/inplace_cache.py), the static one never moves a
sequence (service/engine/kv/static_cache.py).
"""

from __future__ import annotations

import numpy as np


class SlotMap:
    """Request ids to slots of ``max_len`` positions, and each slot's cached tokens.

    Args:
        num_slots: rows of the cache buffers (the engine's max_running).
        max_len: positions per row (the context length).
    """

    def __init__(self, num_slots: int, max_len: int):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.num_slots, self.max_len = num_slots, max_len
        self._slot: dict[str, int] = {}  # request id -> slot
        self.lengths = np.zeros(num_slots, np.int64)  # cached tokens per slot; 0 when free

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._slot

    @property
    def num_live(self) -> int:
        return len(self._slot)

    def slot(self, request_id: str) -> int:
        return self._slot[request_id]

    @property
    def cached_tokens(self) -> int:
        return int(self.lengths.sum())  # free slots hold 0

    def _check_join(self, request_ids: list[str], lengths: list[int] | np.ndarray) -> None:
        """Raise ValueError unless the newcomers fit in the free slots, none is live already, and
        each will hold 1..max_len tokens."""
        k = len(request_ids)
        if len(self) + k > self.num_slots:
            raise ValueError(f"{len(self)} live + {k} joining exceeds the {self.num_slots} slots")
        if len(lengths) != k:
            raise ValueError(f"{k} request ids but {len(lengths)} lengths")
        for rid, length in zip(request_ids, lengths, strict=True):
            if rid in self._slot:
                raise ValueError(f"request {rid!r} already holds slot {self._slot[rid]}")
            if not 1 <= length <= self.max_len:
                raise ValueError(f"request {rid!r}: length {length} is outside [1, {self.max_len}]")
