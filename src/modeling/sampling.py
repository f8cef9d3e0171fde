"""Token sampling over the last stage's logits: penalties, temperature, top-k/top-p/min-p, logprobs.

The engine on the last pipeline stage calls `sample` once per step with one logits row per sequence
that needs a token. Seeded draws derive only from (seed, position), so a request replayed on another
node after a failover, or batched with different neighbours, produces the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeserve.common.errors import InvalidInputError
from pipeserve.common.sampling_params import (  # noqa: F401 (re-exported: the engine's API)
    GREEDY_TEMPERATURE,
    MAX_ABS_OPENAI_PENALTY,
    MAX_TOP_LOGPROBS,
    SamplingParams,
)

_MASK64 = (1 << 64) - 1


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
    raw logprob) pairs in descending order; an empty list for rows that asked for none."""


def apply_penalties(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[Sequence[int]] | None
) -> torch.Tensor:
    """Return a copy of `logits` [B, V] with each row's repetition/presence/frequency penalties applied
    over its whole history (prompt + generated). Rows without penalties come back unchanged."""
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    if not rows:
        return logits.clone()
    if histories is None:
        raise InvalidInputError(
            "histories is required when a request sets a repetition/presence/frequency penalty"
        )
    V = logits.shape[1]
    flat_ids: list[int] = []
    flat_rows: list[int] = []
    for j, i in enumerate(rows):
        flat_ids.extend(histories[i])
        flat_rows.extend([j] * len(histories[i]))
    ids = torch.tensor(flat_ids, dtype=torch.long)  # [N] on the host: the range check costs no sync
    if ids.numel() and not (int(ids.min()) >= 0 and int(ids.max()) < V):
        raise InvalidInputError(
            f"history token ids must be in [0, {V}); got {int(ids.min())}..{int(ids.max())}"
        )

    dev = logits.device
    counts = torch.zeros(len(rows), V, dtype=logits.dtype, device=dev)  # [R, V] occurrences in the history
    counts.index_put_(
        (torch.tensor(flat_rows, dtype=torch.long).to(dev), ids.to(dev)),
        torch.ones(ids.numel(), dtype=logits.dtype, device=dev),
        accumulate=True,
    )
    seen = counts > 0  # [R, V]
    rep = torch.tensor([params[i].repetition_penalty for i in rows], dtype=logits.dtype).to(dev)[:, None]
    pres = torch.tensor([params[i].presence_penalty for i in rows], dtype=logits.dtype).to(dev)[:, None]
    freq = torch.tensor([params[i].frequency_penalty for i in rows], dtype=logits.dtype).to(dev)[:, None]

    row_idx = torch.tensor(rows, dtype=torch.long).to(dev)
    x = logits[row_idx]  # [R, V]
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - freq * counts - pres * seen.to(x.dtype)
    out = logits.clone()
    out[row_idx] = x
    return out


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]] | None,
    positions: Sequence[int],
) -> SampleResult:
    """Pick one token per row of `logits` [B, V].

    `params[i]` must already be validated; `histories[i]` is every token row i has seen (needed only
    when a row sets a penalty); `positions[i]` is the position of the token being sampled, which
    with the seed fixes a seeded row's noise. Order per row: penalties, then greedy argmax, or
    temperature → top-k → top-p → min-p → exponential race (Gumbel-max) draw.
    """
    if logits.dim() != 2:
        raise InvalidInputError(f"logits must be [batch, vocab]; got shape {tuple(logits.shape)}")
    B = logits.shape[0]
    if len(params) != B or len(positions) != B or (histories is not None and len(histories) != B):
        raise InvalidInputError(
            f"logits has {B} rows but params/positions/histories have {len(params)}/{len(positions)}/"
            f"{'None' if histories is None else len(histories)}"
        )
    with torch.inference_mode():
        return _sample(logits, params, histories, positions)


def _sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]] | None,
    positions: Sequence[int],
) -> SampleResult:
    any_penalty = any(p.has_penalties for p in params)
    any_logprobs = any(p.wants_logprobs for p in params)
    sampled = [i for i, p in enumerate(params) if not p.is_greedy]
    if not sampled and not any_penalty and not any_logprobs:
        return SampleResult(token_ids=logits.argmax(dim=-1).tolist(), logprobs=None, top_logprobs=None)

    x = apply_penalties(logits, params, histories) if any_penalty else logits  # [B, V]
    tokens = x.argmax(dim=-1)  # [B]; greedy rows keep this, sampled rows are overwritten below
    if sampled:
        tokens = tokens.clone()
        rows = torch.tensor(sampled, dtype=torch.long).to(logits.device)
        tokens[rows] = _draw(x[rows].float(), [params[i] for i in sampled], [positions[i] for i in sampled])

    if not any_logprobs:
        return SampleResult(token_ids=tokens.tolist(), logprobs=None, top_logprobs=None)
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, V] raw model distribution
    chosen = logp.gather(1, tokens[:, None])[:, 0]  # [B]
    n_top = min(max(p.top_logprobs for p in params), logits.shape[1])
    top: list[list[tuple[int, float]]] | None = None
    if n_top > 0:
        values, ids = logp.topk(n_top, dim=-1)  # [B, n_top], sorted descending
        value_rows, id_rows = values.tolist(), ids.tolist()
        top = [
            list(zip(id_rows[i][: p.top_logprobs], value_rows[i][: p.top_logprobs], strict=True))
            for i, p in enumerate(params)
        ]
    return SampleResult(token_ids=tokens.tolist(), logprobs=chosen.tolist(), top_logprobs=top)


def _draw(x: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int]) -> torch.Tensor:
    """Sample one token per row of float32 logits `x` [S, V] (no greedy rows); returns [S] token ids."""
    S, V = x.shape
    dev = x.device
    temp = torch.tensor([p.temperature for p in params], dtype=x.dtype).to(dev)[:, None]  # [S, 1]
    x = _filter(x / temp, params)

    # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) draws i with probability p_i; in log
    # space that is argmax(x_i - log E_i), which needs no softmax and keeps -inf (filtered) at -inf.
    seeded = [(j, p.seed) for j, p in enumerate(params) if p.seed is not None]
    # [S, V] uniform noise: fresh for unseeded rows; seeded rows are overwritten below.
    u = torch.empty(S, V, device=dev) if len(seeded) == S else torch.rand(S, V, device=dev)
    if seeded:
        # Seeded noise comes from a CPU generator, so it is bit-identical on every machine and device
        # (the logits themselves may still differ in the last bits between device kinds).
        host = torch.empty(len(seeded), V)  # [n_seeded, V]
        for k, (j, seed) in enumerate(seeded):
            gen = torch.Generator().manual_seed(_stream_seed(seed, positions[j]))
            host[k] = torch.rand(V, generator=gen)
        u[torch.tensor([j for j, _ in seeded], dtype=torch.long).to(dev)] = host.to(dev)
    exp_noise = -torch.log(u.clamp_min(torch.finfo(u.dtype).tiny))  # [S, V] Exp(1), > 0
    return (x - torch.log(exp_noise)).argmax(dim=-1)


def _filter(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Set to -inf the logits of `x` [S, V] that top-k, then top-p, then min-p exclude. All cut-offs
    are thresholds on the logit value, so tokens tied with the last kept one are kept as well."""
    S, V = x.shape
    dev = x.device
    cut = [i for i, p in enumerate(params) if 0 < p.top_k < V or p.top_p < 1.0]
    if cut:
        threshold = _top_k_top_p_threshold(x[torch.tensor(cut).to(dev)], [params[i] for i in cut])
        if len(cut) < S:
            full = torch.full((S, 1), -math.inf, dtype=x.dtype, device=dev)  # [S, 1] -inf keeps all
            full[torch.tensor(cut).to(dev)] = threshold
            threshold = full
        x = x.masked_fill(x < threshold, -math.inf)
    if any(p.min_p > 0 for p in params):
        # p_i < min_p * p_max  <=>  x_i < x_max + log(min_p); log(0) = -inf keeps everything.
        log_min_p = torch.tensor([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params]).to(dev)
        x = x.masked_fill(x < x.amax(dim=-1, keepdim=True) + log_min_p.to(x.dtype)[:, None], -math.inf)
    return x


def _top_k_top_p_threshold(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Smallest logit each row of `x` [C, V] keeps under top-k then top-p; returns [C, 1]."""
    V = x.shape[1]
    dev = x.device
    ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    # When every row has a top-k its nucleus lies inside the K largest, and topk is far cheaper
    # than a full sort of the vocabulary on CPU. Candidates come in descending order either way.
    K = max(ks)
    cand = x.topk(K, dim=-1).values if K < V else x.sort(dim=-1, descending=True).values  # [C, K]
    k = torch.tensor(ks).to(dev)  # [C], each <= K
    kth = cand.gather(1, (k - 1)[:, None])  # [C, 1] k-th largest logit
    if all(p.top_p >= 1.0 for p in params):
        return kth
    cand = cand.masked_fill(cand < kth, -math.inf)
    top_p = torch.tensor([p.top_p for p in params], dtype=x.dtype).to(dev)[:, None]  # [C, 1]
    probs = cand.softmax(dim=-1)  # [C, K] renormalised over the top-k survivors
    # Mass strictly before each sorted index; monotone, so `keep` is a prefix of the candidates.
    before = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(dim=-1)[:, :-1]], dim=-1)
    keep = (before < top_p) | (top_p >= 1.0)  # [C, K]; index 0 is always kept
    nucleus_min = cand.gather(1, keep.sum(dim=-1, keepdim=True) - 1)  # [C, 1]
    return torch.maximum(kth, nucleus_min)


def _stream_seed(seed: int, position: int) -> int:
    """Mix (seed, position) into a 64-bit generator seed (splitmix64), the same on every machine."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64))


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)
