"""Muon: momentum whose update is orthogonalized before it is applied, for 2-D hidden weights.

Why: an AdamW step on a weight matrix is dominated by a few directions; replacing the momentum
matrix M = U S V^T by (approximately) U V^T gives every direction the same step size, which trains
small transformers on fewer tokens (Jordan et al. 2024, "Muon"; Liu et al. 2025, "Muon is
scalable"). Our build is compute-bound on a 2-core CPU, so tokens are what we are short of.

U V^T is approximated by a quintic Newton-Schulz iteration (no SVD): five iterations of
X <- a X + (b A + c A^2) X with A = X X^T, starting from M / ||M||, with the published
coefficients (3.4445, -4.7750, 2.0315) that push singular values into about [0.7, 1.2] quickly.

The update is scaled by 0.2 * sqrt(max(rows, cols)) so its RMS matches a typical AdamW update: the
same learning rate and schedule then serve both optimizers (Liu et al.). Embeddings (the tied
head), LayerNorm gains and biases stay on AdamW.
"""

from __future__ import annotations

import math

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(m: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T for each matrix of ``m`` (..., rows, cols)."""
    a, b, c = NS_COEFFS
    x = m / (m.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.transpose(-2, -1)
    for _ in range(steps):
        g = x @ x.transpose(-2, -1)
        x = a * x + (b * g + c * (g @ g)) @ x
    return x.transpose(-2, -1) if tall else x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalized per matrix, decoupled weight decay.

    A parameter group may set ``split``: the weight's rows are that many stacked matrices (a fused
    Q/K/V projection is three), each orthogonalized on its own.
    """

    def __init__(self, params, lr: float, momentum: float = 0.95, weight_decay: float = 0.0,
                 ns_steps: int = 5, split: int = 1):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      ns_steps=ns_steps, split=split))

    @torch.no_grad()
    def step(self, closure=None):  # the torch.optim.Optimizer signature; closure unused
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                buf = state.setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
                rows, cols = p.shape
                k = group["split"]
                update = orthogonalize(update.view(k, rows // k, cols), group["ns_steps"]).view(rows, cols)
                scale = 0.2 * math.sqrt(max(rows // k, cols))
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * scale)


class OptimizerPair:
    """Muon for hidden matrices plus AdamW for the rest, driven as one optimizer by the train loop."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, sd: dict) -> None:
        for o, s in zip(self.optimizers, sd["optimizers"], strict=True):
            o.load_state_dict(s)
