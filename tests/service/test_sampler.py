"""Tests for service.engine.sampler: greedy, seeds and batch invariance, truncation, penalties, logprobs, stops."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from service.engine.sampler import GREEDY_BELOW, argmax_only, sample
from service.engine.types import SamplingParams

V = 50


def make_logits(B: int = 1, V: int = V, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((B, V)) * scale).astype(np.float32)


def run(
    logits: np.ndarray,
    params: list[SamplingParams],
    seeds: list[int] | None = None,
    prompts=None,
    outputs=None,
):
    B = logits.shape[0]
    seeds = seeds if seeds is not None else list(range(B))
    return sample(
        logits,
        params,
        [np.random.default_rng(s) for s in seeds],
        prompts if prompts is not None else [[] for _ in range(B)],
        outputs if outputs is not None else [[] for _ in range(B)],
    )


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_greedy_is_argmax_whatever_the_other_knobs() -> None:
    logits = make_logits(B=8)
    params = [SamplingParams(temperature=0.0, top_k=5, top_p=0.3, min_p=0.5)] * 8
    out = run(logits, params)
    assert out.token_ids.dtype == np.int64
    np.testing.assert_array_equal(out.token_ids, logits.argmax(axis=1))
    assert out.logprobs is None and out.top_logprobs is None


def test_greedy_consumes_no_randomness() -> None:
    rng = np.random.default_rng(7)
    sample(make_logits(), [SamplingParams(temperature=0.0)], [rng], [[]], [[]])
    assert rng.random() == np.random.default_rng(7).random()


@pytest.mark.parametrize(
    "p",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=10),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=1.0, min_p=0.05),
        SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.2),
    ],
)
def test_seed_gives_same_tokens_alone_and_in_any_batch(p: SamplingParams) -> None:
    row = make_logits(seed=1)
    alone = [run(row, [p], seeds=[1234]).token_ids[0] for _ in range(3)]
    assert len(set(alone)) == 1
    # Same row in the middle of a batch of other rows with other knobs (including ones that sort).
    others = make_logits(B=4, seed=2)
    batch = np.concatenate([others[:2], row, others[2:]])
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.5, top_k=3),
        p,
        SamplingParams(temperature=0.5, top_p=0.5, presence_penalty=1.0),
        SamplingParams(temperature=1.0, logprobs=3),
    ]
    prompts = [[1, 2], [3], [], [4, 5, 6], [7]]
    outputs = [[8], [], [], [9, 9], []]
    out = run(batch, params, seeds=[5, 6, 1234, 8, 9], prompts=prompts, outputs=outputs)
    assert out.token_ids[2] == alone[0]


def test_different_seeds_differ() -> None:
    logits = np.zeros((1, 1000), dtype=np.float32)
    tokens = {int(run(logits, [SamplingParams()], seeds=[s]).token_ids[0]) for s in range(20)}
    assert len(tokens) > 10


def test_top_k_1_equals_greedy() -> None:
    logits = make_logits(B=16, seed=3)
    out = run(logits, [SamplingParams(temperature=2.0, top_k=1)] * 16)
    np.testing.assert_array_equal(out.token_ids, logits.argmax(axis=1))


def test_tiny_top_p_keeps_only_the_top_token() -> None:
    logits = make_logits(B=16, seed=4, scale=0.1)  # nearly flat: the top token has little mass
    out = run(logits, [SamplingParams(temperature=1.0, top_p=1e-6)] * 16)
    np.testing.assert_array_equal(out.token_ids, logits.argmax(axis=1))


def test_top_k_and_top_p_draw_only_from_the_kept_set() -> None:
    logits = np.log(np.array([[0.4, 0.3, 0.2, 0.1]], dtype=np.float32))
    many = np.repeat(logits, 2000, axis=0)
    rng = np.random.default_rng(0)
    top_p = sample(many, [SamplingParams(top_p=0.65)] * 2000, [rng] * 2000, [[]] * 2000, [[]] * 2000)
    assert set(top_p.token_ids.tolist()) == {0, 1}  # 0.4 < 0.65 <= 0.4 + 0.3
    top_k = sample(many, [SamplingParams(top_k=3)] * 2000, [rng] * 2000, [[]] * 2000, [[]] * 2000)
    assert set(top_k.token_ids.tolist()) == {0, 1, 2}


def test_min_p_drops_tokens_below_a_fraction_of_the_max() -> None:
    probs = np.array([0.5, 0.3, 0.12, 0.08], dtype=np.float32)  # relative to max: 1, 0.6, 0.24, 0.16
    many = np.repeat(np.log(probs)[None], 2000, axis=0)
    rng = np.random.default_rng(0)
    out = sample(many, [SamplingParams(min_p=0.2)] * 2000, [rng] * 2000, [[]] * 2000, [[]] * 2000)
    assert set(out.token_ids.tolist()) == {0, 1, 2}
    out = sample(many[:10], [SamplingParams(min_p=1.0)] * 10, [rng] * 10, [[]] * 10, [[]] * 10)
    assert set(out.token_ids.tolist()) == {0}


def test_empirical_distribution_matches_softmax_over_temperature() -> None:
    logits = np.array([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5]], dtype=np.float32)
    T, N = 0.8, 40_000
    rng = np.random.default_rng(2024)
    out = sample(
        np.repeat(logits, N, axis=0), [SamplingParams(temperature=T)] * N, [rng] * N, [[]] * N, [[]] * N
    )
    observed = np.bincount(out.token_ids, minlength=logits.shape[1])
    expected = softmax(logits[0].astype(np.float64) / T) * N
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 30.0, (chi2, observed, expected)  # 7 dof: P(chi2 > 30) ~ 1e-4; the seed is fixed


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = np.array([[2.0, -2.0, 1.0, -1.0, 0.5]], dtype=np.float32)
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0, logprobs=0)
    # token 0 (positive) is in the prompt, token 1 (negative) in the output; others untouched.
    out = run(logits, [p], prompts=[[0]], outputs=[[1]])
    penalized = np.array([1.0, -4.0, 1.0, -1.0, 0.5])
    assert out.logprobs is not None
    expected = penalized - np.log(np.exp(penalized).sum())
    assert out.token_ids[0] == 0  # tie 1.0 vs 1.0 → lowest id
    np.testing.assert_allclose(out.logprobs[0], expected[0], rtol=1e-6)
    # A penalty < 1 encourages repetition instead.
    out = run(logits, [SamplingParams(temperature=0.0, repetition_penalty=0.25)], prompts=[[3]])
    assert out.token_ids[0] == 0  # 2.0 stays top; -1 * 0.25 = -0.25 moves but stays below
    out = run(logits, [SamplingParams(temperature=0.0, repetition_penalty=0.1)], prompts=[[4]])
    assert out.token_ids[0] == 4  # 0.5 / 0.1 = 5 > 2


def test_presence_and_frequency_penalties_use_output_tokens_only() -> None:
    logits = np.array([[3.0, 2.9, 2.8, 0.0]], dtype=np.float32)
    greedy = dict(temperature=0.0)
    # presence: token 0 appeared (any count) → 3.0 - 0.5 = 2.5 < 2.9
    assert (
        run(logits, [SamplingParams(presence_penalty=0.5, **greedy)], outputs=[[0, 0, 0]]).token_ids[0] == 1
    )
    # prompt tokens do not count for presence/frequency
    assert run(logits, [SamplingParams(presence_penalty=2.0, **greedy)], prompts=[[0]]).token_ids[0] == 0
    # frequency: token 0 three times, token 1 once → 3 - 0.6 = 2.4, 2.9 - 0.2 = 2.7, 2.8 wins
    out = run(logits, [SamplingParams(frequency_penalty=0.2, **greedy)], outputs=[[0, 0, 0, 1]])
    assert out.token_ids[0] == 2
    # negative penalties encourage repetition
    out = run(logits, [SamplingParams(presence_penalty=-2.0, **greedy)], outputs=[[3]])
    assert out.token_ids[0] == 0  # 0 + 2 = 2 < 3
    out = run(logits, [SamplingParams(frequency_penalty=-2.0, **greedy)], outputs=[[3, 3]])
    assert out.token_ids[0] == 3  # 0 + 4 = 4 > 3


def test_penalties_leave_other_rows_untouched() -> None:
    logits = make_logits(B=3, seed=5)
    params = [SamplingParams(temperature=0.0, logprobs=0)] * 3
    plain = run(logits, params)
    params[1] = SamplingParams(temperature=0.0, logprobs=0, repetition_penalty=1.5, frequency_penalty=1.0)
    mixed = run(logits, params, outputs=[[], list(range(V)), []])
    assert plain.logprobs is not None and mixed.logprobs is not None
    np.testing.assert_array_equal(plain.logprobs[[0, 2]], mixed.logprobs[[0, 2]])


def test_logprobs_equal_log_softmax_of_penalized_logits_before_temperature() -> None:
    logits = make_logits(B=3, seed=6)
    params = [
        SamplingParams(temperature=0.5, top_k=3, logprobs=5),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, logprobs=0),
    ]
    out = run(logits, params)
    assert out.logprobs is not None and out.top_logprobs is not None
    assert out.logprobs.dtype == np.float32
    for i in (0, 2):
        x = logits[i].astype(np.float64)
        ref = x - x.max() - np.log(np.exp(x - x.max()).sum())
        np.testing.assert_allclose(out.logprobs[i], ref[out.token_ids[i]], rtol=1e-5)
        n = params[i].logprobs
        assert [t.token_id for t in out.top_logprobs[i]] == np.argsort(-ref)[:n].tolist()
        np.testing.assert_allclose(
            [t.logprob for t in out.top_logprobs[i]], np.sort(ref)[::-1][:n], rtol=1e-6
        )
    assert np.isnan(out.logprobs[1])
    assert out.top_logprobs[1] == [] and out.top_logprobs[2] == []


def test_length_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="batch size mismatch"):
        sample(make_logits(B=2), [SamplingParams()], [np.random.default_rng(0)], [[]], [[]])


def reference_keep(z: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Straightforward top-k then top-p over a full stable sort (logit desc, token id asc)."""
    order = np.argsort(-z, kind="stable")
    p = np.exp(z[order].astype(np.float64) - z.max())
    k = top_k if top_k > 0 else len(z)
    p[k:] = 0.0
    before = np.cumsum(p) - p
    kept = order[:k] if top_p >= 1 else order[: max(1, int((before < top_p * p.sum())[:k].sum()))]
    keep = np.zeros(len(z), dtype=bool)
    keep[kept] = True
    return keep


@pytest.mark.parametrize("V", [7, 300, 3000])
@pytest.mark.parametrize("ties", [False, True])
def test_truncation_mask_matches_a_full_sort(V: int, ties: bool) -> None:
    from service.engine.sampler import _top_k_top_p_mask

    rnd = np.random.default_rng(V)
    settings = [(0, 0.9), (0, 0.5), (5, 1.0), (1, 1.0), (3, 0.7), (V + 10, 0.95), (0, 0.999), (50, 0.3)]
    z = rnd.standard_normal((len(settings), V)).astype(np.float32) * (0.05 if V == 3000 else 2.0)
    if ties:
        z = np.round(z * 2) / 2  # many equal logits, including at the cut
        z[:, -3:] = -np.inf
    top_k = np.array([k for k, _ in settings])
    top_p = np.array([p for _, p in settings], dtype=np.float32)
    total = np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)
    keep = _top_k_top_p_mask(z, total, top_k, top_p)
    for r, (k, p) in enumerate(settings):
        ref = reference_keep(z[r], k, p)
        # float32 vs float64 mass may disagree only for a token sitting exactly on the top-p cut
        assert (keep[r] != ref).sum() <= 1, (r, k, p, keep[r].sum(), ref.sum())
        if p == 1.0:
            np.testing.assert_array_equal(keep[r], ref)


def test_wide_nucleus_is_batch_invariant() -> None:
    row = (np.random.default_rng(9).standard_normal((1, 5000)) * 0.05).astype(np.float32)  # nucleus > 1024
    p = SamplingParams(temperature=1.0, top_p=0.95)
    alone = run(row, [p], seeds=[77]).token_ids[0]
    batch = np.concatenate([make_logits(V=5000, seed=3), row])
    out = run(batch, [SamplingParams(top_k=2), p], seeds=[1, 77])
    assert out.token_ids[1] == alone


@pytest.mark.parametrize("V", [1, 255, 256, 1000, 32000])
def test_inverse_cdf_matches_a_plain_cumsum(V: int) -> None:
    from service.engine.sampler import _inverse_cdf

    rnd = np.random.default_rng(V)
    R = 64
    w = rnd.random((R, V)).astype(np.float32) ** 4
    w[rnd.random((R, V)) < 0.3] = 0.0  # truncated tokens
    w[:, 0] += 1e-3  # at least one positive weight per row
    u = rnd.random(R)
    u[:3] = [0.0, 1.0 - 1e-16, 0.5]
    got = _inverse_cdf(w, u)
    cdf = np.cumsum(w.astype(np.float64), axis=1)
    target = u * cdf[:, -1]
    ref = np.minimum((cdf <= target[:, None]).sum(axis=1), V - 1 - (w > 0)[:, ::-1].argmax(axis=1))
    assert (w[np.arange(R), got] > 0).all()  # never a zero-weight token
    close = np.abs(cdf[np.arange(R), np.minimum(ref, got)] - target) < 1e-5 * cdf[:, -1]
    assert ((got == ref) | close).all()


def peaked(R: int, V: int, seed: int) -> np.ndarray:
    """Logits like a trained model's: a Zipf-like head over a permuted vocabulary."""
    rnd = np.random.default_rng(seed)
    base = (-3.3 * np.log(np.arange(1, V + 1))).astype(np.float32)
    return np.stack([rnd.permutation(base) + 0.3 * rnd.standard_normal(V).astype(np.float32) for _ in range(R)])


CANDIDATE_SETTINGS = [(50, 1.0), (50, 0.9), (0, 0.9), (0, 0.5), (20, 0.8), (1, 1.0), (0, 0.999), (3000, 0.95)]


@pytest.mark.parametrize("V", [32000, 152064])
@pytest.mark.parametrize("ties", [False, True])
def test_candidate_path_draws_from_exactly_the_full_sort_set(V: int, ties: bool) -> None:
    """Top-k/top-p at real vocabulary sizes decide their kept set from a thresholded candidate set;
    it must be the full sort's set (ties at the cut included), and draw as the full path does."""
    from service.engine.sampler import _draw_candidates, _draw_full

    R = len(CANDIDATE_SETTINGS)
    z = peaked(R, V, seed=V)
    z[2] /= 8.0  # a flatter row: its nucleus spans hundreds of tokens
    if ties:
        z = np.round(z)  # many equal logits, including at the cut
    top_k = np.array([k for k, _ in CANDIDATE_SETTINGS])
    top_p = np.array([p for _, p in CANDIDATE_SETTINGS], dtype=np.float32)
    need = np.where(top_k > 0, top_k, 256)
    zero = np.zeros(R, dtype=np.float32)
    refs = [reference_keep(z[r], k, p) for r, (k, p) in enumerate(CANDIDATE_SETTINGS)]
    agree = decided = 0
    for u in np.random.default_rng(0).random((50, R)):
        ids, ok = _draw_candidates(z, top_k, top_p, zero, u, need)
        full = _draw_full(z, top_k, top_p, zero, u)
        for r in np.flatnonzero(ok):
            assert refs[r][ids[r]], (r, CANDIDATE_SETTINGS[r], ids[r])
            agree += ids[r] == full[r]
            decided += 1
    assert decided >= 50 * (R - 2)  # the candidate path decides nearly every row
    assert agree >= 0.99 * decided  # the same token but where float sums round differently at a boundary


def test_candidate_path_is_batch_invariant_and_matches_the_distribution() -> None:
    V = 32000
    row = peaked(1, V, seed=5)
    p = SamplingParams(temperature=0.9, top_k=5)
    alone = [run(row, [p], seeds=[s]).token_ids[0] for s in range(40)]
    others = peaked(3, V, seed=6)
    mates = [SamplingParams(temperature=1.0, top_p=0.999), SamplingParams(temperature=0.0),
             SamplingParams(temperature=1.0, min_p=0.1, logprobs=2)]
    for s in range(40):
        batch = np.concatenate([others[:1], row, others[1:]])
        out = run(batch, [mates[0], p, *mates[1:]], seeds=[100, s, 101, 102])
        assert out.token_ids[1] == alone[s]
    N = 20_000
    many = np.repeat(row, N, axis=0)
    out = sample(many, [p] * N, [np.random.default_rng(7)] * N, [[]] * N, [[]] * N)
    top5 = np.argsort(-row[0])[:5]
    assert set(out.token_ids.tolist()) <= set(top5.tolist())
    expected = softmax(row[0, top5].astype(np.float64) / 0.9) * N
    observed = np.array([(out.token_ids == t).sum() for t in top5])
    keep = expected > 5
    chi2 = float((((observed - expected) ** 2 / expected)[keep]).sum())
    assert chi2 < 25.0, (chi2, observed, expected)


@pytest.mark.parametrize("V", [32000, 152064])
@pytest.mark.parametrize(("k", "p"), [(20, 0.8), (50, 1.0), (0, 0.95), (1, 1.0)])
def test_real_vocabularies_take_the_candidate_path(V: int, k: int, p: float) -> None:
    """The fast path is really taken for trained-model-like logits (a regression guard: a too tight
    candidate cap sent every top-k 20 row at 152k through the full-vocabulary path)."""
    from service.engine.sampler import _draw_candidates

    z = peaked(8, V, seed=k)
    R = len(z)
    _, ok = _draw_candidates(z, np.full(R, k), np.full(R, p, dtype=np.float32), np.zeros(R, dtype=np.float32),
                             np.full(R, 0.5), np.full(R, k if k else 256))
    assert ok.all()


def test_argmax_only_rows_get_exactly_the_samplers_choice() -> None:
    """The engine skips ``sample`` for a batch of argmax_only rows: their token must be what it gives."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 50)).astype(np.float32)
    logits[0, [4, 9]] = logits[0].max() + 1  # a tie: the lowest id wins, in both
    plain = SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.1, stop=("x",), stop_token_ids=(3,))
    assert argmax_only(plain) and argmax_only(SamplingParams(temperature=GREEDY_BELOW / 2))
    res = sample(logits, [plain] * 6, [np.random.default_rng(0)] * 6, [[1, 2]] * 6, [[5]] * 6)
    assert res.token_ids.tolist() == logits.argmax(axis=1).tolist() and res.token_ids[0] == 4
    for change in ({"temperature": 0.5}, {"logit_bias": ((1, 2.0),)}, {"repetition_penalty": 1.1},
                   {"presence_penalty": 0.5}, {"frequency_penalty": -0.5}, {"logprobs": 0}, {"grammar": "start: \"a\""}):
        assert not argmax_only(replace(plain, **change)), change


def test_temperature_alone_takes_the_full_draw_s_arithmetic() -> None:
    """Rows with no top-k, top-p or min-p skip the per-row parameter arrays: same tokens as the full draw."""
    from service.engine.sampler import _draw_full

    rng = np.random.default_rng(5)
    for V in (4096, 1000):  # a multiple of the CDF's block and not
        logits = (rng.normal(size=(5, V)) * 3).astype(np.float32)
        temps = np.array([0.3, 0.8, 1.0, 1.5, 2.0], np.float32)
        params = [SamplingParams(temperature=float(t)) for t in temps]
        got = sample(logits, params, [np.random.default_rng(i) for i in range(5)], [[1]] * 5, [[2]] * 5)
        u = np.array([np.random.default_rng(i).random() for i in range(5)])
        want = _draw_full(logits / temps[:, None], np.zeros(5, np.int64), np.ones(5, np.float32),
                          np.zeros(5, np.float32), u)
        assert got.token_ids.tolist() == want.tolist()


@pytest.mark.parametrize("V", [1, 255, 256, 4096, 32000])
def test_a_row_draws_the_same_token_alone_and_in_a_batch(V: int) -> None:
    """Small batches search the inverse CDF row by row, larger ones all rows at once: every row
    must get the same token either way (zero weights, ties, u at both ends included)."""
    from service.engine.sampler import _ROW_BY_ROW, _inverse_cdf

    rnd = np.random.default_rng(V + 1)
    R = 200
    w = rnd.random((R, V)).astype(np.float32) ** 4
    w[rnd.random((R, V)) < 0.3] = 0.0
    w[:20] = np.round(w[:20] * 4) / 4  # many ties
    w[20:40, : V // 2] = 0.0  # the first blocks empty
    w[:, -1] += 1e-3
    w[40] = 0.0  # no positive weight at all
    u = rnd.random(R)
    u[:6] = [0.0, 1.0 - 1e-16, 0.5, 0.25, 1e-300, 0.999999]
    batched = _inverse_cdf(w, u)
    assert len(w) > _ROW_BY_ROW
    alone = [int(_inverse_cdf(w[i : i + 1], u[i : i + 1])[0]) for i in range(R)]
    pairs = [int(x) for i in range(0, R, 2) for x in _inverse_cdf(w[i : i + 2], u[i : i + 2])]
    assert alone == batched.tolist() == pairs
