"""The prefix-cache index: which full token blocks have a KV cache held, and which to drop first.

A prompt is cut into blocks of ``block_size`` tokens. Block i is named by a chained hash of the
salt (anything besides the tokens that changes the cache: the model) and the tokens of blocks
0..i, so two prompts share exactly their common leading full blocks, and a block's name says
everything that came before it. A block's KV data live in a pool slot (service/engine/kv/prefix_pool.py)
whose number, the block id, this index hands out.

Life of a block: ``insert`` after a prefill computed it; ``acquire`` pins it while a newcomer's
prefill copies it (a pinned block is never evicted); ``release`` unpins it. Unpinned blocks are
evictable, least recently used first; a chain is touched tail first, so that its tail goes before
its head (a tail is useless without its head). Pure: no model, no arrays, no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

DEFAULT_BLOCK_SIZE = 16  # tokens per block (vLLM's default)


def block_hashes(
    tokens: Sequence[int], block_size: int, salt: bytes, num_blocks: int | None = None
) -> list[bytes]:
    """The chained hashes of the first ``num_blocks`` full blocks of ``tokens`` (default: all).

    hash_i = blake2b(hash_{i-1} + tokens of block i as int64), hash_{-1} = blake2b(salt).
    """
    full = len(tokens) // block_size
    n = full if num_blocks is None else min(num_blocks, full)
    if n <= 0:
        return []
    ids = np.asarray(tokens[: n * block_size], np.int64).reshape(n, block_size)
    parent = hashlib.blake2b(salt, digest_size=16).digest()
    out = []
    for row in ids:
        parent = hashlib.blake2b(parent + row.tobytes(), digest_size=16).digest()
        out.append(parent)
    return out


def lookup_blocks(num_prompt_tokens: int, block_size: int) -> int:
    """Blocks a prompt may take from the cache: its last token is always computed (its logits are
    what the first output token is sampled from), so a fully cached prompt still runs one token."""
    return max(num_prompt_tokens - 1, 0) // block_size


class BlockIndex:
    """Block hash -> block id, with pins and least-recently-used eviction.

    Args:
        num_ids: block ids 0..num_ids-1 (the pool's size); at most this many blocks are held.
    """

    def __init__(self, num_ids: int):
        if num_ids < 0:
            raise ValueError(f"num_ids must be >= 0, got {num_ids}")
        self.num_ids = num_ids
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._pins: dict[int, int] = {}  # block id -> pin count, pinned blocks only
        self._lru: OrderedDict[int, None] = OrderedDict()  # unpinned blocks, least recent first
        self._free: list[int] = list(range(num_ids - 1, -1, -1))  # pop() gives the lowest id

    # ---- lookups -------------------------------------------------------------------------
    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The ids of the longest leading run of ``hashes`` held. No side effects."""
        ids = []
        for h in hashes:
            i = self._by_hash.get(h)
            if i is None:
                break
            ids.append(i)
        return ids

    def __contains__(self, h: object) -> bool:
        return h in self._by_hash

    # ---- pins ----------------------------------------------------------------------------
    def acquire(self, ids: Sequence[int]) -> None:
        """Pin blocks (a newcomer is about to copy them): they cannot be evicted until released."""
        for i in ids:
            if i not in self._hash_of:
                raise ValueError(f"acquire: block {i} is not held")
            self._lru.pop(i, None)
            self._pins[i] = self._pins.get(i, 0) + 1

    def release(self, ids: Sequence[int]) -> None:
        """Unpin blocks acquired before; a block whose last pin goes becomes the most recently used
        (the chain's tail first, so that eviction takes tails before heads)."""
        for i in reversed(ids):
            n = self._pins.get(i, 0)
            if n < 1:
                raise ValueError(f"release: block {i} is not pinned")
            if n == 1:
                del self._pins[i]
                self._lru[i] = None
            else:
                self._pins[i] = n - 1

    # ---- inserts and evictions -----------------------------------------------------------
    def insert(self, hashes: Sequence[bytes], max_blocks: int) -> list[tuple[int, int]]:
        """Make room for the blocks of ``hashes`` not held yet, keeping at most ``max_blocks`` in all.

        Blocks already held are touched (most recently used). New ones take free ids while the
        total stays within ``max_blocks``, then the ids of evicted least-recently-used blocks
        (never a pinned one, never one of this call's). Stops at the first block that finds no room:
        a block is useless without the ones before it.

        Returns:
            (position in ``hashes``, block id) of each new block; the caller fills the id's pool slot.
        """
        new: list[tuple[int, int]] = []
        mine: set[int] = set()
        for pos, h in enumerate(hashes):
            i = self._by_hash.get(h)
            if i is not None:
                mine.add(i)
                continue
            i = self._take_id(max_blocks, mine)
            if i is None:
                break
            self._by_hash[h], self._hash_of[i] = i, h
            mine.add(i)
            new.append((pos, i))
        touched = [self._by_hash[h] for h in hashes if h in self._by_hash]
        for i in reversed(touched):  # tail first: the head ends most recently used
            if i in self._lru:
                self._lru.move_to_end(i)
            elif i not in self._pins:
                self._lru[i] = None
        return new

    def _take_id(self, max_blocks: int, keep: set[int]) -> int | None:
        if len(self._hash_of) < max_blocks and self._free:
            return self._free.pop()
        for i in self._lru:
            if i not in keep:
                self._drop(i)
                return self._free.pop()
        return None

    def evict(self, num_blocks: int) -> int:
        """Drop up to ``num_blocks`` unpinned blocks, least recently used first. Returns how many."""
        dropped = 0
        while dropped < num_blocks and self._lru:
            self._drop(next(iter(self._lru)))
            dropped += 1
        return dropped

    def forget(self, ids: Sequence[int]) -> None:
        """Drop these unpinned blocks now (their data could not be written)."""
        for i in ids:
            if i in self._pins:
                raise ValueError(f"forget: block {i} is pinned")
            if i in self._lru:
                self._drop(i)

    def _drop(self, i: int) -> None:
        del self._lru[i]
        del self._by_hash[self._hash_of.pop(i)]
        self._free.append(i)

    def clear(self) -> None:
        """Forget every block (pinned ones too: the caller drops the requests that pinned them)."""
        self.__init__(self.num_ids)

    # ---- state ---------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """Blocks held, pinned or not."""
        return len(self._hash_of)

    @property
    def num_evictable(self) -> int:
        return len(self._lru)

    @property
    def num_pinned(self) -> int:
        return len(self._pins)

    def check_invariants(self) -> None:
        """Assert that the bookkeeping is consistent (tests and debug mode)."""
        held = set(self._hash_of)
        assert len(self._by_hash) == len(held), "hash map out of sync"
        assert all(self._hash_of[i] == h for h, i in self._by_hash.items()), "hash map out of sync"
        assert set(self._lru) | set(self._pins) == held, "a block is neither pinned nor evictable"
        assert not set(self._lru) & set(self._pins), "a block is both pinned and evictable"
        assert all(n >= 1 for n in self._pins.values()), self._pins
        assert not held & set(self._free), "a held block's id is free"
        assert len(held) + len(self._free) == self.num_ids, "block ids leaked"
