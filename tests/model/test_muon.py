"""Muon: the orthogonalization, the parameter split between Muon and AdamW, training and resume."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from model.config import GPTConfig, TrainConfig
from model.gpt import GPT
from model.muon import Muon, OptimizerPair, orthogonalize
from model.train import make_optimizer


@pytest.mark.parametrize("shape", [(64, 64), (48, 160), (160, 48), (3, 32, 32)])
def test_orthogonalize_flattens_the_singular_values(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    *batch, rows, cols = shape
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(*batch, rows, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(*batch, cols, k, generator=g))
    s = torch.logspace(0, -2, k)  # badly conditioned, as a gradient is: condition number 100
    m = u @ torch.diag(s) @ v.transpose(-2, -1)
    out = orthogonalize(m)
    assert out.shape == m.shape
    after = torch.linalg.svdvals(out)
    # The quintic iteration does not converge to exactly 1: it maps every direction into about [0.6, 1.25].
    assert after.min() > 0.6 and after.max() < 1.25
    # and keeps the singular vectors: U^T out V is diagonal
    d = u.transpose(-2, -1) @ out @ v
    off = d - torch.diag_embed(torch.diagonal(d, dim1=-2, dim2=-1))
    assert off.abs().max() < 1e-3


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest() -> None:
    model = GPT(GPTConfig(vocab_size=64, context_length=32, n_layer=2, n_head=2, n_embd=32))
    opt = make_optimizer(model, TrainConfig(optimizer="muon"), "cpu")
    assert isinstance(opt, OptimizerPair)
    muon, adamw = opt.optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = sorted(names[id(p)] for g in muon.param_groups for p in g["params"])
    on_adamw = sorted(names[id(p)] for g in adamw.param_groups for p in g["params"])
    assert on_muon == sorted(n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks."))
    assert "wte.weight" in on_adamw and not set(on_muon) & set(on_adamw)
    assert len(on_muon) + len(on_adamw) == len(list(model.parameters()))
    splits = {names[id(g["params"][0])]: g["split"] for g in muon.param_groups}
    assert splits["blocks.0.attn.qkv.weight"] == 3 and splits["blocks.0.ffn.fc.weight"] == 1
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer(model, TrainConfig(optimizer="sgd"), "cpu")


def _fit(optimizer: str, steps: int = 60) -> tuple[float, float]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, context_length=16, n_layer=1, n_head=2, n_embd=32))
    opt = make_optimizer(model, TrainConfig(optimizer=optimizer, lr=3e-3), "cpu")
    x = torch.arange(16).remainder(8).repeat(4, 1)  # a periodic sequence: learnable from context
    first = None
    for _ in range(steps):
        loss = model.loss(x[:, :-1], x[:, 1:])
        first = loss.item() if first is None else first
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return first, model.loss(x[:, :-1], x[:, 1:]).item()


def test_muon_trains() -> None:
    first, last = _fit("muon")
    assert last < 0.5 * first


def test_muon_state_survives_a_checkpoint() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    opt = OptimizerPair(Muon([{"params": [w]}], lr=0.01))
    w.grad = torch.randn(8, 4)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())  # as torch.save and torch.load would
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = OptimizerPair(Muon([{"params": [w2]}], lr=0.01))
    opt2.load_state_dict(sd)
    g = torch.randn(8, 4)
    w.grad, w2.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    np.testing.assert_array_equal(w.detach().numpy(), w2.detach().numpy())


def test_training_with_muon_resumes_and_refuses_a_different_optimizer(tmp_path) -> None:
    from model.train import train

    rng = np.random.default_rng(0)
    data = rng.integers(4, 64, size=4000).astype(np.int64)
    mc = GPTConfig(vocab_size=64, context_length=32, n_layer=1, n_head=2, n_embd=32)
    tc = TrainConfig(max_steps=4, batch_size=2, block_size=32, warmup_steps=1, eval_interval=2, optimizer="muon")
    first = train(mc, tc, data, data[:600], 1000, tmp_path, device="cpu")
    assert first.steps == 4
    more = train(mc, dataclasses.replace(tc, max_steps=6), data, data[:600], 1000, tmp_path, resume=True, device="cpu")
    assert more.steps == 6
    with pytest.raises(ValueError, match="trained with optimizer 'muon'"):
        train(mc, dataclasses.replace(tc, max_steps=8, optimizer="adamw"), data, data[:600], 1000, tmp_path,
              resume=True, device="cpu")
