"""Token sampling over the last stage's logits: penalties, temperature, top-k/top-p/min-p, logprobs.

The engine on the last pipeline stage calls `sample` once per step with one logits row per sequence
that needs a token. Seeded draws derive only from (seed, position), so a request replayed on another
node after a failover, or batched with different neighbours, produces the same tokens.

Everything here runs on numpy (float32 logits on the host), so importing it does not import torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import numpy.typing as npt

from pipeserve.common.errors import InvalidInputError
from pipeserve.common.sampling_params import (  # noqa: F401 (re-exported: the engine's API)
    GREEDY_TEMPERATURE,
    MAX_ABS_OPENAI_PENALTY,
    MAX_TOP_LOGPROBS,
    SamplingParams,
)

_MASK64 = (1 << 64) - 1
_TINY = np.float32(np.finfo(np.float32).tiny)
_NEG_INF = np.float32(-np.inf)
_NUCLEUS_FIRST_TRY = 256
"""Top-p without top-k first looks for the nucleus among this many largest logits (x8 per retry)
before sorting the whole vocabulary; with real model logits it is usually inside."""

Logits = npt.NDArray[np.floating]


def _fresh_rng() -> np.random.Generator:
    return np.random.default_rng()  # OS entropy


_rng = _fresh_rng()
"""Noise for unseeded rows. Reseeded in a forked child so that processes never share a stream."""


def _reseed_after_fork() -> None:
    global _rng
    _rng = _fresh_rng()


os.register_at_fork(after_in_child=_reseed_after_fork)


@dataclass
class SampleResult:
    """One step's output, one entry per logits row."""

    token_ids: list[int]
    logprobs: list[float] | None
    """None unless some row asked. Otherwise one value per row (rows that did not ask get one too,
    which the caller drops): log_softmax of the RAW model logits at the chosen token, i.e. before
    penalties, temperature and filtering, so it measures what the model thought of the token
    (vLLM's `raw_logprobs` mode)."""
    top_logprobs: list[list[tuple[int, float]]] | None
    """None unless some row asked. Otherwise per row the `top_logprobs` most likely (token id,
    raw logprob) pairs in descending order, equal logprobs by ascending token id (so which of
    several tied tokens make the cut is fixed too); an empty list for rows that asked for none."""


def apply_penalties(
    logits: Logits, params: Sequence[SamplingParams], histories: Sequence[Sequence[int]] | None
) -> Logits:
    """Return a copy of `logits` [B, V] with each row's repetition/presence/frequency penalties applied
    over its whole history (prompt + generated). Rows without penalties come back unchanged."""
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    out = logits.copy()
    if not rows:
        return out
    if histories is None:
        raise InvalidInputError(
            "histories is required when a request sets a repetition/presence/frequency penalty"
        )
    V = logits.shape[1]
    lengths = [len(histories[i]) for i in rows]
    ids = np.fromiter(chain.from_iterable(histories[i] for i in rows), dtype=np.int64, count=sum(lengths))
    if ids.size and not (int(ids.min()) >= 0 and int(ids.max()) < V):
        raise InvalidInputError(
            f"history token ids must be in [0, {V}); got {int(ids.min())}..{int(ids.max())}"
        )
    if not ids.size:
        return out
    # Only the (row, token) pairs that occur change, so work on those alone: [U] distinct pairs.
    keys = np.repeat(np.arange(len(rows), dtype=np.int64), lengths) * V + ids
    pairs, counts = np.unique(keys, return_counts=True)
    j, tok = np.divmod(pairs, V)
    row = np.asarray(rows, dtype=np.int64)[j]
    dt = logits.dtype
    rep = np.asarray([params[i].repetition_penalty for i in rows], dtype=dt)[j]
    pres = np.asarray([params[i].presence_penalty for i in rows], dtype=dt)[j]
    freq = np.asarray([params[i].frequency_penalty for i in rows], dtype=dt)[j]
    x = out[row, tok]  # [U]
    x = np.where(x > 0, x / rep, x * rep)
    out[row, tok] = x - freq * counts.astype(dt) - pres
    return out


def sample(
    logits: Logits,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]] | None,
    positions: Sequence[int],
) -> SampleResult:
    """Pick one token per row of `logits` [B, V] (a numpy float array, float32 expected).

    `params[i]` must already be validated; `histories[i]` is every token row i has seen (needed only
    when a row sets a penalty); `positions[i]` is the position of the token being sampled, which
    with the seed fixes a seeded row's noise. Order per row: penalties, then greedy argmax, or
    temperature → top-k → top-p → min-p → exponential race (Gumbel-max) draw.
    """
    if not isinstance(logits, np.ndarray):
        raise TypeError(f"logits must be a numpy array; got {type(logits).__name__}")
    if logits.ndim != 2:
        raise InvalidInputError(f"logits must be [batch, vocab]; got shape {tuple(logits.shape)}")
    B = logits.shape[0]
    if len(params) != B or len(positions) != B or (histories is not None and len(histories) != B):
        raise InvalidInputError(
            f"logits has {B} rows but params/positions/histories have {len(params)}/{len(positions)}/"
            f"{'None' if histories is None else len(histories)}"
        )
    any_penalty = any(p.has_penalties for p in params)
    any_logprobs = any(p.wants_logprobs for p in params)
    sampled = [i for i, p in enumerate(params) if not p.is_greedy]
    if not sampled and not any_penalty and not any_logprobs:
        # The common greedy step: one argmax per row, first index on ties (as torch's), no copy.
        return SampleResult(token_ids=logits.argmax(axis=-1).tolist(), logprobs=None, top_logprobs=None)

    x = apply_penalties(logits, params, histories) if any_penalty else logits  # [B, V]
    # [B]; greedy rows keep the argmax, sampled rows are overwritten below
    tokens = np.empty(B, dtype=np.int64) if len(sampled) == B else x.argmax(axis=-1)
    if sampled:
        temp = np.asarray([params[i].temperature for i in sampled], dtype=np.float32)[:, None]  # [S, 1]
        if len(sampled) == B:
            xs = np.divide(x, temp, dtype=np.float32)  # [S, V], a new array
        else:
            xs = x[sampled].astype(np.float32, copy=False)  # a copy (fancy index): divide in place
            np.divide(xs, temp, out=xs)
        tokens[sampled] = _draw(xs, [params[i] for i in sampled], [positions[i] for i in sampled])

    if not any_logprobs:
        return SampleResult(token_ids=tokens.tolist(), logprobs=None, top_logprobs=None)
    return _with_logprobs(logits, params, tokens)


def _with_logprobs(logits: Logits, params: Sequence[SamplingParams], tokens: np.ndarray) -> SampleResult:
    """Raw log_softmax in float32, computed as torch does: (x - max) - log(sum(exp(x - max)))."""
    raw = logits.astype(np.float32, copy=False)  # [B, V]
    B, V = raw.shape
    top_x = raw.max(axis=-1)  # [B]
    e = np.subtract(raw, top_x[:, None])  # [B, V] scratch
    np.exp(e, out=e)
    log_z = np.log(e.sum(axis=-1))  # [B]
    chosen = (raw[np.arange(B), tokens] - top_x) - log_z  # [B]
    top: list[list[tuple[int, float]]] | None = None
    if any(p.top_logprobs > 0 for p in params):
        top = []
        for i, p in enumerate(params):
            n = min(p.top_logprobs, V)
            if n == 0:
                top.append([])
                continue
            row = raw[i]
            nth = _largest(row[None], n)[0, n - 1]  # n-th largest logit
            ids = np.flatnonzero(row >= nth)  # >= n ids, ascending
            ids = ids[np.argsort(-row[ids], kind="stable")[:n]]  # descending, ties by ascending id
            values = (row[ids] - top_x[i]) - log_z[i]
            top.append(list(zip(ids.tolist(), values.tolist(), strict=True)))
    return SampleResult(token_ids=tokens.tolist(), logprobs=chosen.tolist(), top_logprobs=top)


def _draw(
    x: npt.NDArray[np.float32], params: Sequence[SamplingParams], positions: Sequence[int]
) -> np.ndarray:
    """Sample one token per row of tempered float32 logits `x` [S, V] (no greedy rows); returns [S]
    token ids.

    Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) draws i with probability p_i; in log space
    that is argmax(x_i - log E_i), which needs no softmax. Only the tokens the filters keep race.
    A seeded row's uniforms u_i (E_i = -log u_i) are the first V float32s of
    `np.random.default_rng(_stream_seed(seed, position)).random(V, dtype=np.float32)`, u_i going to
    token i whether or not a filter applies, so they depend on (seed, position) alone and are the same
    on every machine (PCG64 seeded through SeedSequence, whose stream numpy keeps stable; the logits
    themselves may still differ in the last bits between device kinds). Unseeded rows draw fresh
    uniforms for just the tokens that race.
    """
    S, V = x.shape
    threshold = _thresholds(x, params)  # [S]; -inf keeps every token
    out = np.empty(S, dtype=np.int64)
    for j, p in enumerate(params):
        row = x[j]
        ids: np.ndarray | None = None
        if threshold[j] > _NEG_INF:
            ids = np.flatnonzero(row >= threshold[j])  # ascending token ids that race
            if ids.size <= 1:  # one survivor; none only for NaN logits, where argmax picks the NaN
                out[j] = ids[0] if ids.size else row.argmax()
                continue
            row = row[ids]
        if p.seed is not None:
            u = np.empty(V, dtype=np.float32)
            np.random.default_rng(_stream_seed(p.seed, positions[j])).random(dtype=np.float32, out=u)
            if ids is not None:
                u = u[ids]
        else:
            u = np.empty(row.size, dtype=np.float32)
            _rng.random(dtype=np.float32, out=u)
        # u in [0, 1): clamp the zeros, then u <- log(E) with E = -log(u) > 0 (u < 1), all in place.
        np.maximum(u, _TINY, out=u)
        np.log(u, out=u)
        np.negative(u, out=u)
        np.log(u, out=u)
        np.subtract(row, u, out=u)
        k = int(u.argmax())
        out[j] = k if ids is None else ids[k]
    return out


def _thresholds(x: npt.NDArray[np.float32], params: Sequence[SamplingParams]) -> npt.NDArray[np.float32]:
    """Per row of `x` [S, V] the smallest logit that top-k, then top-p, then min-p keep (-inf where no
    filter applies). All cut-offs are thresholds on the logit value, so tokens tied with the last
    kept one are kept as well."""
    S, V = x.shape
    threshold = np.full(S, _NEG_INF, dtype=np.float32)
    with_k = [i for i, p in enumerate(params) if 0 < p.top_k < V]
    if with_k:
        rows = x if len(with_k) == S else x[with_k]  # [C, V]
        threshold[with_k] = _top_k_top_p_threshold(rows, [params[i] for i in with_k])
    for i, p in enumerate(params):
        if not 0 < p.top_k < V and p.top_p < 1.0:
            threshold[i] = _nucleus_threshold(x[i], p.top_p)
    if any(p.min_p > 0 for p in params):
        # p_i < min_p * p_max  <=>  x_i < x_max + log(min_p); log(0) = -inf keeps everything. The
        # maximum always survives top-k/top-p, so one combined threshold is the same as two cuts.
        log_min_p = np.asarray([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params], np.float32)
        np.maximum(threshold, x.max(axis=-1) + log_min_p, out=threshold)
    return threshold


def _top_k_top_p_threshold(x: npt.NDArray[np.float32], params: Sequence[SamplingParams]) -> np.ndarray:
    """Smallest logit each row of `x` [C, V] keeps under top-k (every row has 0 < k < V) then top-p
    over the renormalised top-k survivors (every logit >= the k-th largest); returns [C]. A row's
    result does not depend on the other rows' k."""
    C = x.shape[0]
    ks = np.asarray([p.top_k for p in params], dtype=np.int64)  # [C]
    cand = _largest(x, int(ks.max()))  # [C, K] descending
    rows = np.arange(C)
    kth = cand[rows, ks - 1]  # [C] k-th largest logit
    if all(p.top_p >= 1.0 for p in params):
        return kth
    top_p = np.asarray([p.top_p for p in params], dtype=np.float64)[:, None]  # [C, 1]
    e = np.exp(cand - cand[:, :1])  # [C, K]
    e[cand < kth[:, None]] = 0.0  # only the top-k survivors (ties with the k-th included) count
    z = e.sum(axis=-1, dtype=np.float64)  # [C]
    # Ties with the k-th largest that fall past the K candidates survive too. They come last in the
    # order, so they only add to the normaliser (and the threshold is kth if the nucleus gets there).
    for c in np.flatnonzero((cand[:, -1] == kth) & (top_p[:, 0] < 1.0)):
        past = np.count_nonzero(x[c] == kth[c]) - np.count_nonzero(cand[c] == kth[c])
        z[c] += past * float(e[c, ks[c] - 1])
    n_keep = _nucleus_size(e / z[:, None], top_p)  # [C]
    n_keep[top_p[:, 0] >= 1.0] = cand.shape[1]
    return np.maximum(kth, cand[rows, n_keep - 1])


def _nucleus_size(probs: np.ndarray, top_p: np.ndarray | float) -> np.ndarray:
    """How many of the descending `probs` [C, K] top-p keeps: index 0, and every index whose mass
    strictly before it is < top_p [C, 1] (monotone, so a prefix)."""
    before = np.cumsum(probs, axis=-1, dtype=np.float64)[:, :-1]  # [C, K-1] mass before index 1..K-1
    return 1 + np.count_nonzero(before < top_p, axis=-1)


def _nucleus_threshold(row: npt.NDArray[np.float32], top_p: float) -> np.float32:
    """Smallest logit top-p (alone) keeps in `row` [V]: first among the largest few logits, where the
    nucleus of real model logits lies, and only if it reaches past them, over the sorted row."""
    V = row.shape[0]
    top_x = row.max()
    e = np.exp(row - top_x)  # [V]
    z = e.sum(dtype=np.float64)
    m = _NUCLEUS_FIRST_TRY
    while m < V // 4:
        cand = _largest(row[None], m)  # [1, m] descending
        n = int(_nucleus_size(np.exp(cand - top_x) / z, top_p)[0])
        if n < m:  # the first excluded index lies inside: the full sort would give the same
            return cand[0, n - 1]
        m *= 8
    cand = np.sort(row)[None, ::-1]  # [1, V] descending
    n = int(_nucleus_size(np.exp(cand - top_x) / z, top_p)[0])
    return cand[0, n - 1]


def _largest(x: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.float32]:
    """The k largest values of each row of `x` [C, V], descending: [C, k].

    Partitions instead of sorting the vocabulary. When k is small next to V it first narrows each
    row with the k-th largest maximum `b` of G >= 4k disjoint groups (token i in group i mod G):
    k groups have a member >= b, so b bounds the k-th largest value from below, and the values
    > b lie in fewer than k groups, so at most V/4 (about k in practice) of them remain to partition.
    """
    C, V = x.shape
    if k >= V:
        return np.sort(x, axis=-1)[:, ::-1]
    n_groups = max(4 * k, 2048)
    size = V // n_groups
    if size < 8:  # too few values per group to pay off
        top = np.partition(x, V - k, axis=-1)[:, V - k :]  # [C, k] the k largest, unordered
        return np.sort(top, axis=-1)[:, ::-1]
    maxima = x[:, : size * n_groups].reshape(C, size, n_groups).max(axis=1)  # [C, n_groups]
    tail = x[:, size * n_groups :]  # [C, < n_groups] joins the first groups
    np.maximum(maxima[:, : tail.shape[1]], tail, out=maxima[:, : tail.shape[1]])
    bounds = np.partition(maxima, n_groups - k, axis=-1)[:, n_groups - k]  # [C]
    out = np.empty((C, k), dtype=x.dtype)
    for c in range(C):
        row, b = x[c], bounds[c]
        above = row[row > b]
        if above.size >= k:
            out[c] = np.sort(np.partition(above, above.size - k)[above.size - k :])[::-1]
        else:  # the k-th largest is b itself (any number of values may tie with it)
            out[c, : above.size] = np.sort(above)[::-1]
            out[c, above.size :] = b
    return out


def _stream_seed(seed: int, position: int) -> int:
    """Mix (seed, position) into a 64-bit generator seed (splitmix64), the same on every machine."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64))


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)
