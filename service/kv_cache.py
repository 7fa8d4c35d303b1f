"""Bookkeeping of the running batch's KV cache: rows join, rows leave, padding is trimmed.

Layout: per layer a key and a value array (B, H, S, D) for the whole running batch, rows left
padded to a common width S; ``mask`` (B, S) is 1 where a row has a real cached token. A row's
position ids continue from ``next_pos``. Pure numpy: no model, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class BatchCache:
    row_ids: list[str] = field(default_factory=list)
    past: list[np.ndarray] = field(default_factory=list)  # 2L arrays (B, H, S, D)
    mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))  # (B, S)
    next_pos: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (B,)

    def __len__(self) -> int:
        return len(self.row_ids)

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    @property
    def cached_tokens(self) -> int:
        """Real tokens held (excluding padding)."""
        return int(self.mask.sum())

    @property
    def allocated_tokens(self) -> int:
        """Slots the arrays occupy, padding included: B x S."""
        return len(self) * self.width

    def decode_inputs(self, last_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """input_ids (B, 1), attention_mask (B, S + 1), position_ids (B, 1) for one decode step."""
        B = len(self)
        mask = np.concatenate([self.mask, np.ones((B, 1), np.int64)], axis=1)
        return last_tokens.reshape(B, 1).astype(np.int64), mask, self.next_pos.reshape(B, 1).copy()

    def advance(self, presents: list[np.ndarray], step_mask: np.ndarray) -> None:
        """After a decode step: the presents (B, H, S + 1, D) become the cache."""
        self.past, self.mask = list(presents), step_mask
        self.next_pos = self.next_pos + 1

    def merge(self, row_ids: list[str], past: list[np.ndarray], mask: np.ndarray, next_pos: np.ndarray) -> None:
        """Append prefilled rows. Both groups are left padded to the wider one."""
        if not row_ids:
            return
        if not self.row_ids:
            self.row_ids, self.past, self.mask, self.next_pos = list(row_ids), list(past), mask, next_pos
            return
        S = max(self.width, mask.shape[1])
        self.past = [np.concatenate([_left_pad(a, S), _left_pad(b, S)], axis=0) for a, b in zip(self.past, past, strict=True)]
        self.mask = np.concatenate([_left_pad_mask(self.mask, S), _left_pad_mask(mask, S)], axis=0)
        self.next_pos = np.concatenate([self.next_pos, next_pos])
        self.row_ids += row_ids

    def keep(self, keep_ids: list[str]) -> None:
        """Drop every row not in keep_ids (order preserved), then trim padding no live row needs."""
        if keep_ids == self.row_ids:
            return
        keep = set(keep_ids)
        idx = np.array([i for i, r in enumerate(self.row_ids) if r in keep], dtype=np.int64)
        self.row_ids = [self.row_ids[i] for i in idx]
        if len(idx) == 0:
            self.past, self.mask, self.next_pos = [], np.zeros((0, 0), np.int64), np.zeros(0, np.int64)
            return
        mask = self.mask[idx]
        used = np.flatnonzero(mask.any(axis=0))
        start = int(used[0]) if len(used) else mask.shape[1]  # leading columns that are padding in every row
        self.mask = np.ascontiguousarray(mask[:, start:])
        self.past = [np.ascontiguousarray(a[idx][:, :, start:, :]) for a in self.past]
        self.next_pos = self.next_pos[idx]


def _left_pad(a: np.ndarray, width: int) -> np.ndarray:
    pad = width - a.shape[2]
    if pad == 0:
        return a
    return np.concatenate([np.zeros((*a.shape[:2], pad, a.shape[3]), a.dtype), a], axis=2)


def _left_pad_mask(m: np.ndarray, width: int) -> np.ndarray:
    pad = width - m.shape[1]
    return m if pad == 0 else np.concatenate([np.zeros((m.shape[0], pad), m.dtype), m], axis=1)


def left_pad_prompts(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, attention_mask, position_ids (B, T) for a left-padded prefill batch."""
    T = max(len(p) for p in prompts)
    ids = np.full((len(prompts), T), pad_id, np.int64)
    mask = np.zeros((len(prompts), T), np.int64)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = p
        mask[b, T - len(p) :] = 1
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, pos
