"""Where the prefix cache's blocks keep their KV data: one array per layer and kind, one row per block id.

Per layer, key and value: ``(num_blocks, H, block_size, D)``, allocated once with ``np.zeros``
(the OS commits a page only when a block is first written, so an unused cache costs no memory).
Block ids come from service.engine.prefix_cache.BlockIndex. Copies in and out are numpy only; the
running batch (either KV layout) hands over and receives a row's cache as (H, tokens, D) arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class BlockPool:
    """KV data of the cached blocks.

    Args:
        num_layers, num_heads, head_dim: the model's cache shape (heads: KV heads).
        num_blocks: rows of every array (the BlockIndex's num_ids).
        block_size: tokens per block.
        dtype: the cache's dtype.
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: np.dtype | type = np.float32,
    ):
        self.block_size = block_size
        shape = (num_blocks, num_heads, block_size, head_dim)
        self.arrays = [np.zeros(shape, dtype) for _ in range(2 * num_layers)]  # 2L x (N, H, bs, D)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def write(self, blocks: Sequence[tuple[int, int]], kv: Sequence[np.ndarray]) -> None:
        """Store blocks of a row's cache ``kv`` (2L x (H, tokens, D)): for each (position, id),
        the row's tokens ``position * bs .. (position + 1) * bs - 1`` go to block ``id``."""
        if not blocks:
            return
        bs = self.block_size
        pos = np.array([p for p, _ in blocks], np.int64)
        ids = np.array([i for _, i in blocks], np.int64)
        end = (int(pos.max()) + 1) * bs
        for dst, src in zip(self.arrays, kv, strict=True):
            if src.shape[1] < end:
                raise ValueError(f"the row holds {src.shape[1]} tokens, block {int(pos.max())} needs {end}")
            H, _, D = src.shape
            whole = src[:, :end, :].reshape(H, end // bs, bs, D)  # (H, blocks, bs, D)
            dst[ids] = whole[:, pos].transpose(1, 0, 2, 3)

    def read(self, ids: Sequence[int]) -> list[np.ndarray]:
        """The blocks ``ids`` in order as one row's cache: 2L x (H, n, bs, D), n = len(ids), the
        row's tokens 0..n*bs-1 (token t at [:, t // bs, t % bs]). One copy; each array is a
        transposed view, which the caller writes where it wants it (``as_tokens`` or in place)."""
        idx = np.asarray(ids, np.int64)
        return [a[idx].transpose(1, 0, 2, 3) for a in self.arrays]  # (n, H, bs, D) -> (H, n, bs, D)


def as_tokens(blocks: np.ndarray) -> np.ndarray:
    """(H, n, bs, D) blocks of ``BlockPool.read`` as a contiguous (H, n * bs, D) row cache."""
    H, n, bs, D = blocks.shape
    return np.ascontiguousarray(blocks).reshape(H, n * bs, D)
