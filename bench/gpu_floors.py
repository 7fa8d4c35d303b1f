"""The floor of a decode step: the least time the hardware allows it. Pure arithmetic, no I/O.

A decode step of batch B reads every weight once and each row's cached keys and values, and
does about 2 x parameters multiply-adds per row plus the attention over the cache. Its floor is
the larger of the bytes over the measured copy bandwidth (small batches: memory-bound) and the
FLOPs over the measured matrix rate (large batches: compute-bound); the ratio of a measured step
to it says how much of the machine a runner leaves unused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelShape:
    num_parameters: int  # the tied embedding counted once: it is read by the gather and the output head
    n_layer: int
    n_head: int
    head_dim: int

    @property
    def width(self) -> int:
        return self.n_head * self.head_dim


def step_bytes(m: ModelShape, batch: int, context: int, weight_bytes: int, kv_bytes: int) -> int:
    """Bytes a decode step must read: the weights once, and keys and values of ``context`` positions per row."""
    kv = batch * m.n_layer * 2 * m.n_head * context * m.head_dim * kv_bytes
    return m.num_parameters * weight_bytes + kv


def step_flops(m: ModelShape, batch: int, context: int) -> float:
    """FLOPs of a decode step: 2 per parameter per row, and Q K^T plus A V over ``context`` positions."""
    return 2.0 * m.num_parameters * batch + 4.0 * batch * m.n_layer * context * m.width


@dataclass(frozen=True)
class Floor:
    memory_s: float
    compute_s: float

    @property
    def seconds(self) -> float:
        return max(self.memory_s, self.compute_s)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"

    def to_dict(self) -> dict[str, float | str]:
        return {**asdict(self), "floor_s": self.seconds, "bound": self.bound}


def step_floor(m: ModelShape, batch: int, context: int, weight_bytes: int, kv_bytes: int,
               bandwidth: float, flop_rate: float) -> Floor:
    """The floor of one decode step at ``bandwidth`` bytes/s and ``flop_rate`` FLOP/s."""
    if bandwidth <= 0 or flop_rate <= 0:
        raise ValueError(f"bandwidth and flop_rate must be > 0, got {bandwidth} and {flop_rate}")
    return Floor(step_bytes(m, batch, context, weight_bytes, kv_bytes) / bandwidth,
                 step_flops(m, batch, context) / flop_rate)
