"""A pure, batch-vectorized token sampler (numpy only; no I/O, no global state).

``sample`` picks one token for every row of a batch of logits, in vLLM's order:

1. logit bias (OpenAI's ``logit_bias``: added to the chosen tokens' logits), then repetition
   penalty (HF/vLLM) over prompt + output tokens, then presence/frequency penalties (OpenAI) over
   output tokens, then the grammar's allowed tokens (structured output: the rest are impossible);
2. logprobs: log_softmax of the penalized logits (before temperature and truncation);
3. temperature 0 (or below ``GREEDY_BELOW``, as vLLM does) → argmax, whatever the other knobs say;
4. otherwise logits / temperature → top-k → top-p → min-p → one inverse-CDF draw.

Batch invariance: a row's token depends only on its own logits, parameters and generator.
Truncation keeps the best tokens in the order (logit desc, token id asc), decided from the row's
sorted values alone; the draw walks the kept probabilities in token-id order and consumes
exactly one ``rng.random()`` per sampled row (greedy rows consume none; greedy ties go to the
lowest id). So the same seed gives the same tokens whatever else shares the batch.

Cost: greedy-only batches do an argmax (and a batch of plain greedy rows never calls ``sample``:
``argmax_only``); temperature-only batches go straight to the draw; penalties cost O(tokens seen); top-k and top-p find their
candidates with one comparison pass against a threshold estimated from a sample of the row, then
sort and draw among those few (at 152k tokens a full partition per row cost more than the rest of
the sampler); the full-vocabulary draw is a two-level inverse CDF.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.engine.types import SamplingParams, TopLogprob


@dataclass(slots=True)
class SamplerOutput:
    token_ids: np.ndarray  # int64 [B]
    logprobs: np.ndarray | None  # float32 [B], logprob of the chosen token; NaN for rows that did not ask
    top_logprobs: list[list[TopLogprob]] | None  # per row, best first; [] for rows that did not ask


GREEDY_BELOW = 1e-5  # a smaller temperature is argmax: dividing by it would overflow float32
_LOGIT_LIMIT = 1e6  # penalized logits are clipped to ±this: a penalty near 0 must not make inf (NaN logprobs)
_TOP_P_CANDIDATES = 1024  # largest logits examined for top-p before falling back to a full sort
_BLOCK = 256  # tokens per block of the two-level inverse CDF
_ROW_BY_ROW = 2  # batches of at most this many rows search the inverse CDF row by row (45 -> 34 µs at batch 1)
_THRESHOLD_SAMPLE = 4096  # values per row a candidate threshold is estimated from
_CANDIDATE_SHARE = 8  # the candidate path only for rows needing at most 1/8 of the vocabulary
# top-p without top-k: candidates the fast path gathers; a wider nucleus is drawn by the full path
# (a trained model's nucleus is usually a few tokens, a random model's most of the vocabulary)
_TOP_P_FAST_CANDIDATES = 256


def sample(
    logits: np.ndarray,
    params: Sequence[SamplingParams],
    rngs: Sequence[np.random.Generator],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    allowed: dict[int, np.ndarray] | None = None,
) -> SamplerOutput:
    """Sample one token per row.

    Args:
        logits: (B, V) next-token logits.
        params: B validated sampling parameters.
        rngs: B generators; row i draws from rngs[i] (the same generator may serve several rows).
        prompt_ids: B prompts, for the repetition penalty.
        output_ids: B lists of tokens generated so far, for all penalties.
        allowed: row -> bool (V,) of the tokens a grammar allows there (structured output); the
            others get a logit of -1e30 after penalties, so that logprobs, greedy and sampling
            all see the constrained distribution. Rows not listed are unconstrained.

    Returns:
        SamplerOutput; ``logprobs`` and ``top_logprobs`` are None when no row has ``params.logprobs`` set.
    """
    logits = np.asarray(logits, dtype=np.float32)
    B, _ = logits.shape
    if not len(params) == len(rngs) == len(prompt_ids) == len(output_ids) == B:
        raise ValueError(
            f"batch size mismatch: logits {B}, params {len(params)}, rngs {len(rngs)}, "
            f"prompt_ids {len(prompt_ids)}, output_ids {len(output_ids)}"
        )
    logits = apply_logit_bias(logits, params)  # (B, V)
    logits = apply_penalties(logits, params, prompt_ids, output_ids)
    if allowed:
        logits = apply_allowed(logits, allowed)

    token_ids = logits.argmax(axis=1).astype(np.int64)  # greedy for every row; sampled rows overwritten
    rows = [i for i, p in enumerate(params) if p.temperature >= GREEDY_BELOW]
    if rows:
        token_ids[rows] = _draw(_rows(logits, rows), [params[i] for i in rows], [rngs[i] for i in rows])

    logprobs, top_logprobs = _logprobs(logits, params, token_ids)
    return SamplerOutput(token_ids=token_ids, logprobs=logprobs, top_logprobs=top_logprobs)


def argmax_only(p: SamplingParams) -> bool:
    """``sample`` gives such a row its logits' argmax and nothing else: greedy, no logit bias, no
    penalty, no logprobs, no grammar. A batch of such rows needs no call to ``sample`` at all."""
    return (p.temperature < GREEDY_BELOW and not p.logit_bias and p.repetition_penalty == 1.0
            and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0 and p.logprobs is None
            and p.grammar is None)


def _rows(a: np.ndarray, rows: list[int]) -> np.ndarray:
    """a[rows], without a copy when rows are all of them."""
    return a if len(rows) == len(a) else a[rows]


def apply_logit_bias(logits: np.ndarray, params: Sequence[SamplingParams]) -> np.ndarray:
    """Return (B, V) logits with each row's ``logit_bias`` added; the input itself when no row has one."""
    rows = [i for i, p in enumerate(params) if p.logit_bias]
    if not rows:
        return logits
    r = np.concatenate([np.full(len(params[i].logit_bias), i) for i in rows])
    t = np.array([tok for i in rows for tok, _ in params[i].logit_bias], dtype=np.int64)
    b = np.array([bias for i in rows for _, bias in params[i].logit_bias], dtype=np.float32)
    out = logits.copy()
    np.add.at(out, (r, t), b)  # a token listed twice gets both biases
    return out


DISALLOWED = -1e30  # a token a grammar forbids: exp() of it is 0, and its logprob stays a finite number


def apply_allowed(logits: np.ndarray, allowed: dict[int, np.ndarray]) -> np.ndarray:
    """(B, V) logits with the tokens outside each listed row's allowed set pushed to DISALLOWED."""
    out = logits.copy()  # the caller's logits (e.g. the runner's buffer) stay as they were
    rows = list(allowed)
    out[rows] = np.where(np.stack([allowed[r] for r in rows]), out[rows], DISALLOWED)
    return out


def prompt_logprobs(logits: np.ndarray, prompt: Sequence[int], n: int) -> tuple[list[float | None], list[list[TopLogprob]]]:
    """Each prompt token's logprob under the model, and the top-n alternatives at its position.

    Args:
        logits: (T, V) raw logits of the prompt's positions; row t predicts token t + 1.
        prompt: the T prompt tokens.
        n: alternatives per position (0: none).

    Returns:
        T logprobs, the first None (nothing predicts the first token); T lists of alternatives, the first empty.
    """
    T = len(prompt)
    if T < 2:
        return [None], [[]]
    x = np.asarray(logits[: T - 1], dtype=np.float32)  # (T-1, V)
    lp = _log_softmax(x)
    nxt = np.asarray(prompt[1:], dtype=np.int64)
    chosen: list[float | None] = [None, *lp[np.arange(T - 1), nxt].tolist()]
    tops: list[list[TopLogprob]] = [[]]
    tops += [[TopLogprob(int(t), float(v)) for t, v in alts] for alts in _top_n(lp, min(n, lp.shape[1]))]
    return chosen, tops


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log_softmax of (R, V) logits."""
    lp = x - x.max(axis=1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
    return lp


def _top_n(lp: np.ndarray, n: int) -> list[list[tuple[int, float]]]:
    """Per row of (R, V) logprobs, the n best (token id, logprob), best first, ties by token id."""
    if n <= 0:
        return [[] for _ in range(len(lp))]
    cand = np.argpartition(-lp, n - 1, axis=1)[:, :n]  # (R, n) unordered
    vals = np.take_along_axis(lp, cand, axis=1)
    order = np.lexsort((cand, -vals), axis=1)
    cand = np.take_along_axis(cand, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    return [list(zip(c.tolist(), v.tolist(), strict=True)) for c, v in zip(cand, vals, strict=True)]


def apply_penalties(
    logits: np.ndarray,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
) -> np.ndarray:
    """Return (B, V) logits with repetition, presence and frequency penalties applied.

    Returns the input array itself when no row uses a penalty, a new array otherwise. Work is
    proportional to the tokens seen, not to B * V.
    """
    rows = [
        i
        for i, p in enumerate(params)
        if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
    ]
    if not rows:
        return logits
    row_idx, tok_idx, out_counts = [], [], []  # one entry per (row, distinct token seen in prompt or output)
    for i in rows:
        out = np.asarray(output_ids[i], dtype=np.int64)
        seen = np.concatenate([out, np.asarray(prompt_ids[i], dtype=np.int64)])
        ids, inverse = np.unique(seen, return_inverse=True)
        row_idx.append(np.full(len(ids), i))
        tok_idx.append(ids)
        out_counts.append(np.bincount(inverse[: len(out)], minlength=len(ids)))
    r, t = np.concatenate(row_idx), np.concatenate(tok_idx)  # (N,)
    count = np.concatenate(out_counts).astype(np.float32)  # (N,) occurrences in the output

    def per_pair(name: str) -> np.ndarray:  # (N,)
        return np.array([getattr(p, name) for p in params], dtype=np.float32)[r]

    x = logits[r, t]  # (N,)
    rep = per_pair("repetition_penalty")
    with np.errstate(over="ignore"):
        x = np.where(x > 0, x / rep, x * rep)
    x -= per_pair("presence_penalty") * (count > 0) + per_pair("frequency_penalty") * count
    out = logits.copy()
    out[r, t] = np.clip(x, -_LOGIT_LIMIT, _LOGIT_LIMIT)
    return out


def _draw(
    logits: np.ndarray, params: Sequence[SamplingParams], rngs: Sequence[np.random.Generator]
) -> np.ndarray:
    """Temperature, top-k, top-p, min-p, then one inverse-CDF draw per row. (R, V) → int64 (R,).

    Rows that truncate to a few tokens (top-k, or top-p within the largest ``_TOP_P_CANDIDATES``)
    take the candidate path (``_draw_candidates``): only the tokens at or above a threshold are
    sorted and drawn from, with no (R, V) mask. The others, and candidate rows it cannot decide
    exactly, take the full path. Which path a row takes depends on its own values and parameters.
    """
    z = logits / np.array([p.temperature for p in params], dtype=np.float32)[:, None]  # (R, V)
    u = np.array([rng.random() for rng in rngs])  # (R,) exactly one draw per row
    if not any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0 for p in params):
        # Temperature alone (the API's default): what _draw_full does for such rows, without the
        # per-row parameter arrays, which at batch 1 cost as much as the draw itself.
        return _inverse_cdf(np.exp(z - z.max(axis=1, keepdims=True)), u)
    R, V = z.shape
    top_k = np.array([min(p.top_k, V) for p in params], dtype=np.int64)  # any int: no overflow
    top_p = np.array([p.top_p for p in params], dtype=np.float32)
    min_p = np.array([p.min_p for p in params], dtype=np.float32)
    need = np.where(top_k > 0, top_k, _TOP_P_FAST_CANDIDATES)  # candidates a row must have
    fast = ((top_k > 0) | (top_p < 1.0)) & (need * _CANDIDATE_SHARE <= V)
    out = np.empty(R, dtype=np.int64)
    rest = np.ones(R, dtype=bool)
    if fast.any():
        rows = np.flatnonzero(fast)
        ids, ok = _draw_candidates(_rows(z, rows.tolist()), top_k[rows], top_p[rows], min_p[rows], u[rows], need[rows])
        out[rows[ok]] = ids[ok]
        rest[rows[ok]] = False
    if rest.any():
        rows = np.flatnonzero(rest).tolist()
        out[rows] = _draw_full(_rows(z, rows), top_k[rows], top_p[rows], min_p[rows], u[rows])
    return out


def _draw_full(z: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The draw over the whole vocabulary: (R, V) tempered logits → int64 (R,)."""
    zmax = z.max(axis=1, keepdims=True)  # (R, 1)
    w = np.exp(z - zmax)  # (R, V) unnormalized probabilities
    keep: np.ndarray | None = None  # (R, V) bool, None when nothing is truncated

    trunc = np.flatnonzero((top_k > 0) | (top_p < 1.0)).tolist()
    if trunc:
        mask = _top_k_top_p_mask(_rows(z, trunc), _rows(w, trunc).sum(axis=1), top_k[trunc], top_p[trunc])
        if len(trunc) == len(z):
            keep = mask
        else:
            keep = np.ones(z.shape, dtype=bool)
            keep[trunc] = mask

    if (min_p > 0).any():
        # p_i >= min_p * p_max  <=>  z_i - z_max >= log(min_p); ratios survive renormalization.
        with np.errstate(divide="ignore"):
            above = z - zmax >= np.log(min_p)[:, None]
        keep = above if keep is None else keep & above

    if keep is not None:
        w *= keep
    return _inverse_cdf(w, u)


def _draw_candidates(
    z: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray, u: np.ndarray, need: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The draw over each row's candidates: every token at or above a threshold low enough that at
    least ``need`` tokens pass it. (R, V) tempered logits → (token ids (R,), ok (R,)).

    The threshold is a high order statistic of a strided sample of the row; a row where fewer than
    ``need`` tokens pass it, or whose nucleus reaches the last candidate, is not ok (the caller
    draws it over the full vocabulary). Since every token tied with a kept value passes the
    threshold too, the kept set is exactly the full sort's (logit desc, token id asc).
    """
    R, V = z.shape
    ok = np.zeros(R, dtype=bool)
    ids = np.zeros(R, dtype=np.int64)
    stride = max(1, V // _THRESHOLD_SAMPLE)
    sample = np.sort(z[:, ::stride], axis=1)  # (R, S) ascending
    S = sample.shape[1]
    rank = np.minimum(S, 2 * (need * S // V + 1) + 16)  # twice the expected rank of the need-th largest, + margin
    threshold = sample[np.arange(R), S - rank]  # (R,)
    passed = z >= threshold[:, None]  # (R, V)
    count = np.count_nonzero(passed, axis=1)
    good = np.flatnonzero((count >= need) & (count <= V // _CANDIDATE_SHARE)).tolist()  # few: worth it
    if not good:
        return ids, ok
    zg, count = _rows(z, good), count[good]
    flat = np.flatnonzero(_rows(passed, good))  # row-major: token ids ascending within a row (40x faster
    rows, cols = np.divmod(flat, V)  # than a 2-D nonzero)
    G, C = len(good), int(count.max())
    pos = np.arange(len(cols)) - np.repeat(np.cumsum(count) - count, count)
    cid = np.full((G, C), V, dtype=np.int64)  # (G, C) candidate ids in id order, padded with V
    cval = np.full((G, C), -np.inf, dtype=np.float32)
    cid[rows, pos] = cols
    cval[rows, pos] = zg[rows, cols]
    order = np.argsort(-cval, axis=1, kind="stable")  # (logit desc, token id asc): candidates are in id order
    sv = np.take_along_axis(cval, order, axis=1)
    zmax = sv[:, :1]  # (G, 1)
    e = np.exp(sv - zmax)  # (G, C) unnormalized probabilities, 0 on padding
    cum = np.cumsum(e, axis=1)
    k, p = top_k[good], top_p[good]
    j = np.arange(C)[None, :]
    kept_k = np.where(k > 0, np.minimum(k, count), count)  # top-k survivors
    nucleus = p < 1.0
    norm = np.where(k > 0, cum[np.arange(G), kept_k - 1], 1.0)
    if (nucleus & (k == 0)).any():  # top-p alone renormalizes over the whole vocabulary
        only_p = np.flatnonzero(nucleus & (k == 0)).tolist()
        norm[only_p] = np.exp(_rows(zg, only_p) - zmax[only_p]).sum(axis=1)
    inside = ((cum - e) < (p * norm)[:, None]) & (j < kept_k[:, None])
    m = np.where(nucleus, inside.sum(axis=1), kept_k)  # >= 1: the top token always stays
    keep_sorted = j < m[:, None]
    mp = min_p[good]
    if (mp > 0).any():
        with np.errstate(divide="ignore"):
            keep_sorted &= sv - zmax >= np.log(mp)[:, None]
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=1)  # back to token-id order
    w = (np.exp(cval - zmax) * keep).astype(np.float64)  # (G, C) id order
    cdf = np.cumsum(w, axis=1)
    pick = _first_above(cdf, u[good] * cdf[:, -1], w > 0)
    decided = ~((k == 0) & (m >= count))  # a nucleus that reaches the last candidate may extend past it
    g = np.asarray(good)
    ids[g] = cid[np.arange(G), pick]
    ok[g] = decided
    return ids, ok


def _inverse_cdf(w: np.ndarray, u: np.ndarray) -> np.ndarray:
    """First token, in token-id order, whose cumulative weight exceeds u * total. (R, V), (R,) → int64 (R,).

    Two levels (block sums, then one block) instead of a cumsum over the whole vocabulary: the same
    arithmetic for a row whatever the batch, at a fraction of the cost. Zero-weight tokens are never chosen.
    """
    R, V = w.shape
    nb = -(-V // _BLOCK)
    if V % _BLOCK:
        w = np.concatenate([w, np.zeros((R, nb * _BLOCK - V), dtype=w.dtype)], axis=1)
    blocks = w.reshape(R, nb, _BLOCK)
    block_sum = blocks.sum(axis=2, dtype=np.float64)  # (R, nb)
    block_cdf = np.cumsum(block_sum, axis=1)
    target = u * block_cdf[:, -1]  # (R,)
    if R <= _ROW_BY_ROW and np.isfinite(target).all():
        return np.array([_search_row(blocks[r], block_sum[r], block_cdf[r], float(target[r])) for r in range(R)],
                        dtype=np.int64)
    rows = np.arange(R)
    b = _first_above(block_cdf, target, block_sum > 0)  # (R,) chosen block
    target -= np.where(b > 0, block_cdf[rows, b - 1], 0.0)
    inner = blocks[rows, b].astype(np.float64)  # (R, BLOCK)
    i = _first_above(np.cumsum(inner, axis=1), target, inner > 0)
    return (b * _BLOCK + i).astype(np.int64)


def _search_row(blocks: np.ndarray, block_sum: np.ndarray, block_cdf: np.ndarray, target: float) -> int:
    """``_inverse_cdf``'s two levels for one row, with binary searches: the same arithmetic and
    the same token (a row's draw never depends on its batch), in a third of the numpy calls."""
    b = _first_above_row(block_cdf, target, block_sum)
    if b > 0:
        target -= float(block_cdf[b - 1])
    inner = blocks[b].astype(np.float64)
    return b * _BLOCK + _first_above_row(np.cumsum(inner), target, inner)


def _first_above_row(cdf: np.ndarray, target: float, weights: np.ndarray) -> int:
    """``_first_above`` for one row: a cumulative sum of non-negative weights never decreases, so
    the count of entries <= target is a binary search."""
    first = int(np.searchsorted(cdf, target, side="right"))
    return min(first, len(weights) - 1 - int(np.argmax(weights[::-1] > 0)))


def _first_above(cdf: np.ndarray, target: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Per row, the first index with cdf > target, clipped to the last positive entry (rounding)."""
    first = (cdf <= target[:, None]).sum(axis=1)
    last = cdf.shape[1] - 1 - positive[:, ::-1].argmax(axis=1)
    return np.minimum(first, last)


def _top_k_top_p_mask(z: np.ndarray, total: np.ndarray, top_k: np.ndarray, top_p: np.ndarray) -> np.ndarray:
    """Boolean (R, V) mask of the tokens kept by top-k (0 = off), then top-p over the survivors.

    Both keep the m best tokens in the order (logit desc, token id asc); m depends on sorted values
    only, found among the largest few logits (a full sort only for a very wide nucleus). No argsort.

    Args:
        z: (R, V) logits after temperature.
        total: (R,) sum of exp(z - max z), the softmax normalizer.
    """
    V = z.shape[1]
    k = np.where(top_k > 0, np.minimum(top_k, V), V)  # (R,) top-k survivors
    n = min(V, int(np.where(top_k > 0, k, _TOP_P_CANDIDATES).max()))
    m, v = _kept_count(z, total, k, top_p, n)
    wide = (m == n) & (k > n)  # the nucleus may extend past the candidates
    if wide.any():
        m[wide], v[wide] = _kept_count(z[wide], total[wide], k[wide], top_p[wide], V)

    above = z > v[:, None]  # (R, V)
    tied = z == v[:, None]
    need = m - above.sum(axis=1)  # tokens at the threshold value to keep, lowest ids first
    keep = above | tied
    extra = np.flatnonzero(tied.sum(axis=1) > need)
    if len(extra):
        keep[extra] = above[extra] | (tied[extra] & (np.cumsum(tied[extra], axis=1) <= need[extra, None]))
    return keep


def _kept_count(
    z: np.ndarray, total: np.ndarray, k: np.ndarray, top_p: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """How many tokens top-k then top-p keep per row, looking at the n largest logits; and the last kept value."""
    neg = -z if n == z.shape[1] else np.partition(-z, n - 1, axis=1)[:, :n]
    vals = -np.sort(neg, axis=1)  # (R, n) descending
    e = np.exp(vals - vals[:, :1])  # (R, n) unnormalized probabilities, vals[:, 0] is the max
    cum = np.cumsum(e, axis=1)
    rows = np.arange(len(z))
    # top-p renormalizes over the top-k survivors; keep a token while the mass before it is < top_p.
    norm = np.where(k < z.shape[1], cum[rows, np.minimum(k, n) - 1], total)  # (R,)
    inside = ((cum - e) < (top_p * norm)[:, None]) & (np.arange(n)[None, :] < k[:, None])
    m = np.where(top_p < 1.0, inside.sum(axis=1), np.minimum(k, n))  # >= 1: the top token always stays
    return m, vals[rows, m - 1]


def _logprobs(
    logits: np.ndarray, params: Sequence[SamplingParams], token_ids: np.ndarray
) -> tuple[np.ndarray | None, list[list[TopLogprob]] | None]:
    """Chosen-token logprobs (B,) and top-n alternatives, from the log_softmax of (B, V) logits."""
    ask = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not ask:
        return None, None
    B, V = logits.shape
    x = _rows(logits, ask)  # (A, V)
    # Only the normalizer is computed over the vocabulary (one exp pass): logprob = logit - logsumexp.
    xmax = x.max(axis=1, keepdims=True)
    lse = (xmax + np.log(np.exp(x - xmax).sum(axis=1, keepdims=True)))[:, 0]  # (A,)

    chosen = np.full(B, np.nan, dtype=np.float32)
    chosen[ask] = x[np.arange(len(ask)), token_ids[ask]] - lse

    top: list[list[TopLogprob]] = [[] for _ in range(B)]
    n_max = min(max(params[i].logprobs or 0 for i in ask), V)
    for i, norm, alts in zip(ask, lse.tolist(), _top_n(x, n_max), strict=True):
        top[i] = [TopLogprob(t, v - norm) for t, v in alts[: params[i].logprobs or 0]]
    return chosen, top
