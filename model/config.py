"""Model and training configuration, and the named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

ACTIVATIONS = ("gelu", "relu", "relu2")


@dataclass
class GPTConfig:
    vocab_size: int = 2048
    context_length: int = 512  # maximum positions (prompt + generated tokens)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    ffn_mult: int = 4  # feed-forward hidden size = ffn_mult * n_embd
    dropout: float = 0.0
    bias: bool = False  # biases in Linear layers (LayerNorm always has them)
    pad_id: int = 0
    activation: str = "gelu"  # of the feed-forward: "gelu" (exact), "relu" (the original transformer's), "relu2" (relu squared)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_embd % 2:
            raise ValueError(f"n_embd ({self.n_embd}) must be even for the sinusoidal encoding")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainConfig:
    max_steps: int = 2000
    batch_size: int = 32  # sequences per step
    block_size: int = 256  # tokens per training sequence (<= context_length)
    lr: float = 5e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_batches: int = 0  # 0: the whole validation set at the end; periodic evals use 8 batches
    seed: int = 1337
    bf16: bool = True  # bf16 autocast on CUDA; weights stay fp32
    time_limit_s: float = 0.0  # 0: none; otherwise stop (and decay to min lr) at this wall time
    # 0: train exactly max_steps. Otherwise a short timing probe picks the largest of
    # BUDGET_STEP_MULTIPLES x max_steps projected to fit this many seconds of training (never fewer
    # than max_steps): a faster machine trains longer within the same build time.
    budget_s: float = 0.0
    # On a CPU with native bf16 (AVX512_BF16 or AMX flags), time a few steps with and without bf16
    # autocast and train with whichever is faster (weights stay fp32). Off elsewhere: on this project's
    # AVX2-only machines bf16 was 17x slower, and the probe would cost more than it could save.
    cpu_bf16: bool = False
    threads: int = 0  # torch intra-op threads; 0 = torch default
    optimizer: str = "adamw"  # "adamw", or "muon": Muon for hidden matrices, AdamW for the rest (model/muon.py)
    muon_momentum: float = 0.95
    muon_lr_scale: float = 1.0  # Muon's learning rate = lr * this (its updates are RMS-matched to AdamW's)


# Coarse on purpose: the same machine picks the same step count run after run (reproducible builds),
# and only a machine about 1.5x, 1.75x, 2x, ... as fast moves to the next one. 1.75 is there because
# `small` meets its 2.10 bits/char target from 1.75x its steps (2.078; 1.5x: 2.103, docs/model.md).
BUDGET_STEP_MULTIPLES = (1.0, 1.5, 1.75, 2.0, 3.0, 4.0)


@dataclass
class Preset:
    name: str
    model: GPTConfig
    train: TrainConfig
    vocab_size: int
    tokenizer_sentences: int = 0  # 0 = train the tokenizer on the whole training text
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _preset(name: str, vocab: int, ctx: int, layers: int, heads: int, d: int, train: TrainConfig, **kw: Any) -> Preset:
    return Preset(name, GPTConfig(vocab, ctx, layers, heads, d), train, vocab, **kw)


PRESETS: dict[str, Preset] = {
    # Used by the tests: builds in well under 90 s on 2 CPU cores.
    "tiny": _preset(
        "tiny", 512, 256, 2, 2, 64,
        TrainConfig(max_steps=150, batch_size=16, block_size=128, lr=5e-3, warmup_steps=20, eval_interval=75),
        tokenizer_sentences=20000,
        notes="test model; quality is not a goal",
    ),
    # The default served model: about 7 minutes on 2 idle CPU cores. Trained on the full 512-token
    # context (the fused causal kernel makes 512 cost per token what 256 does). Bounded by steps,
    # not wall time, so the same seed gives the same model on machines of one speed; budget_s lets a
    # machine 1.5x, 1.75x, 2x, ... as fast train that many times the steps in the same build time
    # (1.75x the steps reach 2.078 bits/char, 2x 2.074). --max-steps pins the count; --time-limit-s caps the time.
    # Vocabulary 4096 with the paragraph tokenizer (3.03 characters per token): at 2,100 AdamW steps
    # of batch 2, 2.290 bits/char vs 2.398 for 2048 and 2.254 for 6144 (docs/model.md).
    # Muon for the blocks' matrices (model/muon.py): at the same wall time as 2,100 AdamW steps of
    # batch 2 (2.290), 830 Muon steps of batch 4 reach 2.179, 2.170 with Muon's learning rate x 2,
    # 2.152 with momentum 0.9 instead of 0.95; batch 8 (2.202), ReLU^2 (2.192), Muon lr x 4 (2.188),
    # decay to 0 (2.185), warm-up 40 (2.178) and AdamW lr x 2 (2.194) were worse.
    "small": _preset(
        "small", 4096, 512, 4, 4, 192,
        TrainConfig(max_steps=830, batch_size=4, block_size=512, lr=5e-3, warmup_steps=100, eval_interval=280,
                    optimizer="muon", muon_lr_scale=2.0, muon_momentum=0.9, budget_s=420.0,
                    cpu_bf16=True),
        notes="default served model, CPU build budget 8 minutes",
    ),
    # For a GPU: tens of millions of parameters.
    "base": _preset(
        "base", 4096, 512, 8, 8, 512,
        TrainConfig(max_steps=6000, batch_size=64, block_size=512, lr=1.5e-3, warmup_steps=300, eval_interval=500,
                    weight_decay=0.1, bf16=True),
        notes="GPU preset",
    ),
}
