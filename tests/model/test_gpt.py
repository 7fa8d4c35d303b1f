"""The transformer's contract: shapes, causality, KV-cache equivalence, left padding."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import GPTConfig
from model.gpt import GPT, generate_greedy, left_pad_batch, sinusoidal_table


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, context_length=64, n_layer=2, n_head=4, n_embd=32)).eval()


def test_shapes(model: GPT) -> None:
    ids = torch.randint(0, 97, (3, 11))
    logits, present = model(ids)
    assert logits.shape == (3, 11, 97)
    assert len(present) == 2
    assert all(k.shape == (3, 4, 11, 8) and v.shape == (3, 4, 11, 8) for k, v in present)


def test_sinusoidal_formula() -> None:
    pe = sinusoidal_table(50, 16)
    pos, i = 7, 3
    assert pe[pos, 2 * i] == pytest.approx(math.sin(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    assert pe[pos, 2 * i + 1] == pytest.approx(math.cos(pos / 10000 ** (2 * i / 16)), abs=1e-6)


def test_output_head_is_tied(model: GPT) -> None:
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()


@torch.no_grad()
def test_causality(model: GPT) -> None:
    ids = torch.randint(0, 97, (1, 12))
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % 97
    a, _ = model(ids)
    b, _ = model(changed)
    torch.testing.assert_close(a[0, :8], b[0, :8])
    assert not torch.allclose(a[0, 8:], b[0, 8:])


@torch.no_grad()
def test_cached_decoding_equals_full_recompute(model: GPT) -> None:
    ids = torch.randint(0, 97, (2, 20))
    full, _ = model(ids)
    logits, past = model(ids[:, :5])
    steps = [logits]
    for t in range(5, 20):
        logits, past = model(ids[:, t : t + 1], past_key_values=past)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_left_padding_does_not_change_a_rows_logits(model: GPT) -> None:
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    ids, mask, pos = left_pad_batch(prompts, pad_id=0)
    batched, past = model(ids, mask, pos)
    for b, p in enumerate(prompts):
        alone, _ = model(torch.tensor([p]))
        torch.testing.assert_close(batched[b, -len(p) :], alone[0], atol=1e-5, rtol=1e-5)
    # one decode step for the padded batch equals each row's own next step
    nxt = batched[:, -1].argmax(-1, keepdim=True)
    mask2 = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
    step, _ = model(nxt, mask2, pos[:, -1:] + 1, past)
    for b, p in enumerate(prompts):
        alone, _ = model(torch.tensor([[*p, int(nxt[b])]]))
        torch.testing.assert_close(step[b, 0], alone[0, -1], atol=1e-5, rtol=1e-5)


def test_generate_greedy_is_deterministic(model: GPT) -> None:
    assert generate_greedy(model, [1, 2, 3], 8) == generate_greedy(model, [1, 2, 3], 8)


def test_config_rejects_bad_heads() -> None:
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="activation"):
        GPTConfig(activation="swish")


@torch.no_grad()
def test_training_loss_path_equals_the_masked_formula(model: GPT) -> None:
    """loss() uses torch's fused causal attention; it must equal the explicit masked softmax."""
    ids = torch.randint(0, 97, (2, 16))
    logits, _ = model(ids)  # explicit mask path
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert float(model.loss(ids[:, :-1], ids[:, 1:])) == pytest.approx(float(expected), abs=1e-5)
