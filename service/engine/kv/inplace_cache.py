"""Bookkeeping of the in-place KV cache: which request holds which slot, and how many tokens.

The in-place decoder (model/export_inplace.py) reads and writes one preallocated buffer per layer
and kind, ``(num_slots, H, max_len, D)``; a slot is one row. Live sequences hold slots
0..n-1 with no gaps, so ``buf[:n]`` (a C-contiguous view) is what a decode step binds as both
past and present. A sequence's tokens occupy positions 0..length-1 of its slot (right
padding): nothing is ever shifted.

Newcomers take slots n, n+1, ...; a sequence that leaves hands its hole to the last live slot,
which the caller copies (only its ``length`` valid positions, see ``Move``). Pure: no model,
no buffers, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.engine.kv.slot_map import SlotMap


@dataclass(frozen=True, slots=True)
class Move:
    """Copy positions 0..length-1 of slot ``src`` into slot ``dst`` (src is then free)."""

    src: int
    dst: int
    length: int


class DecodeBuffers:
    """Flat int64 buffers a decode step's inputs are written into (rows x 1, rows x 1, rows x width)."""

    def __init__(self, rows: int, width: int):
        self.ids = np.zeros(rows, np.int64)
        self.positions = np.zeros(rows, np.int64)
        self.mask = np.zeros(rows * width, np.int64)
        self.columns = np.arange(width, dtype=np.int64)  # a mask row's positions


class InplaceCache(SlotMap):
    """Slots of the in-place cache (a SlotMap whose live slots are 0..n-1).

    Args:
        num_slots: rows of the buffers (the engine's max_running).
        max_len: positions per row (the context length).
    """

    def __init__(self, num_slots: int, max_len: int):
        super().__init__(num_slots, max_len)
        self._ids: list[str] = []  # slot -> request id, slots 0..n-1
        self._positions = np.arange(max_len + 1, dtype=np.int64)  # chunk_inputs' positions

    @property
    def live_ids(self) -> list[str]:
        """Request ids in slot order (slot i holds live_ids[i])."""
        return list(self._ids)

    # ---- membership ----------------------------------------------------------------------
    def join(self, request_ids: list[str], lengths: list[int] | np.ndarray) -> int:
        """Give the newcomers slots n, n+1, ...; return n. ``lengths``: tokens each will hold."""
        self._check_join(request_ids, lengths)
        n, k = len(self._ids), len(request_ids)
        for j, rid in enumerate(request_ids):
            self._slot[rid] = n + j
            self._ids.append(rid)
        self.lengths[n : n + k] = lengths
        return n

    def remove(self, request_id: str) -> Move | None:
        """Free a request's slot; the last live slot fills the hole (the Move to apply), if any."""
        s = self._slot.pop(request_id)
        last = len(self._ids) - 1
        move = None
        if s != last:
            moved = self._ids[last]
            self._ids[s], self._slot[moved] = moved, s
            move = Move(src=last, dst=s, length=int(self.lengths[last]))
            self.lengths[s] = self.lengths[last]
        self._ids.pop()
        self.lengths[last] = 0
        return move

    def keep(self, keep_ids: list[str] | set[str]) -> list[Move]:
        """Free every slot whose request is not in keep_ids; return the moves to apply.

        The survivors above the new count fill the holes below it, so each moves at most once
        (the moves touch distinct slots: their order does not matter).
        """
        keep = set(keep_ids)
        n = len(self._ids)
        leaving = [s for s, r in enumerate(self._ids) if r not in keep]
        if not leaving:
            return []
        n_new = n - len(leaving)
        holes = [s for s in leaving if s < n_new]
        movers = [s for s in range(n_new, n) if self._ids[s] in keep]  # as many as holes
        moves = [
            Move(src=src, dst=dst, length=int(self.lengths[src]))
            for src, dst in zip(movers, holes, strict=True)
        ]
        for s in leaving:
            del self._slot[self._ids[s]]
        for m in moves:
            rid = self._ids[m.src]
            self._ids[m.dst], self._slot[rid] = rid, m.dst
            self.lengths[m.dst] = self.lengths[m.src]
        del self._ids[n_new:]
        self.lengths[n_new:n] = 0
        return moves

    def clear(self) -> None:
        self._ids.clear()
        self._slot.clear()
        self.lengths[:] = 0

    # ---- one decode step -----------------------------------------------------------------
    def advance(self, by: int = 1) -> None:
        """After a decode step: every live slot holds ``by`` more tokens."""
        self.lengths[: len(self._ids)] += by

    def chunk_inputs(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """input_ids (1, T), attention_mask (1, L + T), position_ids (1, T) to run T new tokens of
        the only live slot (L cached) in one call: a speculative step (service/engine/ngram.py).

        One slot only: ONNX Runtime's CPU GroupQueryAttention refuses T > 1 over a non-empty past
        for more than one row (model/export_inplace.py).
        """
        if len(self._ids) != 1:
            raise ValueError(f"a multi-token step needs exactly one live slot, not {len(self._ids)}")
        new, cached = len(tokens), int(self.lengths[0])
        if cached + new > self.max_len:
            raise ValueError(f"{cached} cached + {new} new tokens exceed the cache's {self.max_len} positions")
        ids = np.asarray(tokens, np.int64).reshape(1, new)
        return ids, np.ones((1, cached + new), np.int64), self._positions[cached : cached + new].reshape(1, new).copy()

    # ---- checks --------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Assert that the bookkeeping is consistent (tests and debug mode)."""
        n = len(self._ids)
        assert n <= self.num_slots, (n, self.num_slots)
        assert len(self._slot) == n and len(set(self._ids)) == n, "duplicate or missing ids"
        assert all(self._slot[r] == i for i, r in enumerate(self._ids)), "slot map out of sync"
        assert (self.lengths[:n] >= 1).all() and (self.lengths[:n] <= self.max_len).all(), self.lengths[:n]
        assert not self.lengths[n:].any(), "a free slot holds tokens"


MASK_WIDTH_STEP = 64  # a decode step's mask width is rounded up to a multiple of this (see decode_inputs)


def decode_inputs(
    out: DecodeBuffers, last_tokens: np.ndarray, lengths: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids (n, 1), attention_mask (n, W), position_ids (n, 1) of one decode step of n rows
    holding ``lengths`` tokens, written into ``out`` (the arrays returned are C-contiguous views
    of its buffers, so a step allocates nothing).

    Row i's new token goes to position lengths[i]; its mask row is lengths[i] + 1 ones, right
    padded to W: the longest row after the step rounded up to a multiple of MASK_WIDTH_STEP
    (at most max_len), so that the inputs keep their shapes for many steps and the runner
    rebinds nothing. The padding is free: GroupQueryAttention takes each row's length from the
    mask's sum (seqlens_k), and the width only as an upper bound (total_sequence_length).
    """
    n = len(lengths)
    longest = int(lengths.max()) + 1 if n else 1
    if longest > max_len:
        raise ValueError(f"a sequence would exceed the cache's {max_len} positions")
    width = min(max_len, -(-longest // MASK_WIDTH_STEP) * MASK_WIDTH_STEP)
    ids, pos = out.ids[:n].reshape(n, 1), out.positions[:n].reshape(n, 1)
    mask = out.mask[: n * width].reshape(n, width)
    ids[:, 0] = last_tokens
    pos[:, 0] = lengths
    np.less_equal(out.columns[:width], pos, out=mask)  # ones up to and including the new position
    return ids, mask, pos


def right_pad_prompts(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, attention_mask, position_ids (B, T) for a right-padded prefill batch.

    Row b's tokens sit at positions 0..len_b-1; padding has mask 0 and positions len_b..T-1
    (any position below the context length would do: nothing reads a padding position).
    """
    T = max(len(p) for p in prompts)
    ids = np.full((len(prompts), T), pad_id, np.int64)
    mask = np.zeros((len(prompts), T), np.int64)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
        mask[b, : len(p)] = 1
    pos = np.broadcast_to(np.arange(T, dtype=np.int64), (len(prompts), T)).copy()
    return ids, mask, pos
