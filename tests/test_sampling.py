"""Tests for modeling/sampling.py: stateless seeding, filter properties, penalties, logprobs, validation.

`sample` and `apply_penalties` take numpy arrays; torch appears here only to compute references.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeserve.common.errors import InvalidInputError
from pipeserve.modeling import sampling
from pipeserve.modeling.sampling import SampleResult, SamplingParams, apply_penalties, sample

FAST = settings(max_examples=50, deadline=None)

logit_rows = st.lists(
    st.floats(min_value=-20, max_value=20, allow_nan=False, width=32), min_size=1, max_size=40
)


def _randn(*shape: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _run_seeded(logits: np.ndarray, params: list[SamplingParams], position: int) -> list[int]:
    return sample(logits, params, None, [position] * len(params)).token_ids


def _freq(tokens: list[int], vocab: int) -> np.ndarray:
    return np.bincount(np.asarray(tokens), minlength=vocab) / len(tokens)


# --- stateless seeding ----------------------------------------------------------------------------


def test_seeded_runs_repeat_exactly() -> None:
    logits = _randn(4, 300)
    params = [SamplingParams(temperature=1.3, seed=s) for s in (1, 2, 3, 4)]
    runs = [[_run_seeded(logits, params, pos) for pos in range(20)] for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    assert len({tuple(r) for r in runs[0]}) > 10  # and the positions do move the draws


ME = [
    SamplingParams(temperature=1.0, top_p=0.95, seed=1234),
    SamplingParams(temperature=0.8, top_k=50, seed=1234),
    SamplingParams(temperature=1.2, seed=77),
    SamplingParams(temperature=1.0, min_p=0.02, seed=5, logprobs=True),
    SamplingParams(temperature=0.9, top_k=400, top_p=0.9, seed=-3, presence_penalty=0.5),
]


@pytest.mark.parametrize("me", ME, ids=["top_p", "top_k", "plain", "min_p", "top_k_top_p_penalty"])
@pytest.mark.parametrize("vocab", [500, 20_000])
def test_same_seed_same_tokens_in_any_batch_composition(me: SamplingParams, vocab: int) -> None:
    mine = _randn(vocab, seed=1, scale=3.0)
    history = [3, 3, 17]
    alone: list[int] = []
    crowded: list[int] = []
    for pos in range(30):
        alone += sample(mine[None], [me], [history], [pos]).token_ids
        # Neighbours with other filters, seeds, penalties, logprobs and positions (some unseeded,
        # which draw from the shared generator first), and `mine` in the middle of the batch.
        others = _randn(4, vocab, seed=100 + pos, scale=3.0)
        batch = np.stack([others[0], others[1], mine, others[2], others[3]])
        params = [
            SamplingParams(temperature=0.7, top_k=5),
            SamplingParams(temperature=0.0),
            me,
            SamplingParams(temperature=2.0, min_p=0.1, seed=99, frequency_penalty=1.0),
            SamplingParams(top_p=0.5, top_logprobs=3),
        ]
        histories = [[1], [], history, [4, 4], []]
        crowded.append(sample(batch, params, histories, [pos + 7, 3, pos, 11, 2]).token_ids[2])
    assert alone == crowded
    assert len(set(alone)) > 2  # really sampled, not stuck on one token


_CROSS_PROCESS = """
import json, sys
import numpy as np
from pipeserve.modeling.sampling import SamplingParams, sample
x = (np.random.default_rng(0).standard_normal((3, 20_000)) * 3).astype(np.float32)
params = [SamplingParams(seed=11), SamplingParams(top_k=40, seed=-2), SamplingParams(top_p=0.9, seed=2**70)]
print(json.dumps([sample(x, params, None, [p, p, p]).token_ids for p in range(10)]))
"""


def test_seeded_tokens_repeat_in_a_fresh_process() -> None:
    # Nothing per process (hash seeds, the unseeded generator, import order) enters a seeded draw.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", _CROSS_PROCESS], capture_output=True, text=True, check=True, env=env
    )
    x = _randn(3, 20_000, scale=3.0)
    params = [
        SamplingParams(seed=11),
        SamplingParams(top_k=40, seed=-2),
        SamplingParams(top_p=0.9, seed=2**70),
    ]
    here = [sample(x, params, None, [p, p, p]).token_ids for p in range(10)]
    assert json.loads(out.stdout) == here


def test_seeded_noise_is_the_documented_stream() -> None:
    # A seeded row's token is argmax(x/T - log E) over the kept tokens, E = -log(u), with u the first
    # V float32s of default_rng(_stream_seed(seed, position)), u[i] for token i.
    vocab = 3000
    x = _randn(vocab, seed=4, scale=2.0)
    for seed, pos in [(0, 0), (42, 7), (-1, 123456), (2**64 + 5, 3)]:
        u = np.random.default_rng(sampling._stream_seed(seed, pos)).random(vocab, dtype=np.float32)
        log_e = np.log(-np.log(np.maximum(u, np.finfo(np.float32).tiny)))
        scores = x / np.float32(0.7) - log_e
        assert sample(x[None], [SamplingParams(temperature=0.7, seed=seed)], None, [pos]).token_ids == [
            int(scores.argmax())
        ]
        top = np.argsort(-x)[:10]  # top_k=10 keeps these (distinct values)
        expected = int(top[np.argmax(scores[top])])
        assert sample(
            x[None], [SamplingParams(temperature=0.7, top_k=10, seed=seed)], None, [pos]
        ).token_ids == [expected]


def test_different_seeds_differ_on_a_flat_distribution() -> None:
    vocab = 1000
    logits = np.zeros((200, vocab), dtype=np.float32)
    params = [SamplingParams(seed=s) for s in range(200)]
    tokens = _run_seeded(logits, params, position=5)
    # 200 draws from 1000 equally likely tokens: about 18 collisions expected.
    assert len(set(tokens)) > 150
    # One seed over successive positions also moves around.
    walk = [_run_seeded(logits[:1], params[:1], pos)[0] for pos in range(50)]
    assert len(set(walk)) > 35


@pytest.mark.parametrize("seeded", [True, False])
def test_draws_follow_the_softmax(seeded: bool) -> None:
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    logits = np.log(probs).astype(np.float32)[None].repeat(8000, axis=0)
    params = [SamplingParams(seed=s if seeded else None) for s in range(8000)]
    freq = _freq(_run_seeded(logits, params, position=0), 4)
    assert np.allclose(freq, probs, atol=0.025), freq  # 4.5 sigma: fresh noise must not flake


def test_one_seed_over_positions_follows_the_softmax() -> None:
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    logits = np.log(probs).astype(np.float32)[None]
    me = [SamplingParams(seed=2024)]
    freq = _freq([sample(logits, me, None, [pos]).token_ids[0] for pos in range(4000)], 4)
    assert np.allclose(freq, probs, atol=0.03), freq


def test_draws_follow_the_softmax_on_a_large_vocabulary() -> None:
    # 4 likely tokens spread over a 50k vocabulary whose other tokens share ~0.6% of the mass.
    vocab = 50_000
    logits = np.full(vocab, -16.0, dtype=np.float32)
    likely = np.array([7, 20_001, 33_333, 49_999])
    logits[likely] = np.log([0.1, 0.2, 0.3, 0.4])
    rest = 1 - np.exp(logits[likely].astype(np.float64)).sum() / np.exp(logits.astype(np.float64)).sum()
    batch = np.broadcast_to(logits, (200, vocab))  # a read-only view: 200 rows at a time
    for top_k in (0, 4):
        tokens = np.concatenate(
            [
                _run_seeded(batch, [SamplingParams(top_k=top_k, seed=s + b) for s in range(200)], position=1)
                for b in range(0, 3000, 200)
            ]
        )
        freq = np.array([np.mean(tokens == t) for t in likely])
        expected = np.array([0.1, 0.2, 0.3, 0.4]) * (1 if top_k else 1 - rest)
        assert np.allclose(freq, expected, atol=0.035), (top_k, freq)
        assert np.isin(tokens, likely).all() if top_k else not np.isin(tokens, likely).all()


@pytest.mark.parametrize("seeded", [True, False])
def test_each_row_draws_from_its_own_filtered_distribution(seeded: bool) -> None:
    # One batch of rows with the same logits and different filters; each group's frequencies must
    # match its own renormalised distribution, whatever its neighbours ask for.
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    groups = {
        SamplingParams(): [0.1, 0.2, 0.3, 0.4],
        SamplingParams(top_k=3): [0.0, 2 / 9, 3 / 9, 4 / 9],
        SamplingParams(top_p=0.6): [0.0, 0.0, 3 / 7, 4 / 7],
        SamplingParams(min_p=0.6): [0.0, 0.0, 3 / 7, 4 / 7],
        SamplingParams(top_k=2, top_p=0.55): [0.0, 0.0, 0.0, 1.0],  # top-p over the renormalised top-2
        SamplingParams(temperature=0.5): (probs**2 / (probs**2).sum()).tolist(),
    }
    n = 4000  # 5 sigma at atol=0.04: the unseeded run must not flake
    params = [replace(g, seed=s if seeded else None) for g in groups for s in range(n)]
    logits = np.log(probs).astype(np.float32)[None].repeat(len(params), axis=0)
    tokens = np.asarray(_run_seeded(logits, params, position=3)).reshape(len(groups), n)
    for (group, expected), row in zip(groups.items(), tokens, strict=True):
        freq = np.bincount(row, minlength=4) / n
        assert np.allclose(freq, expected, atol=0.04), (group, freq)


def test_unseeded_rows_use_fresh_randomness() -> None:
    logits = np.zeros((1, 10_000), dtype=np.float32)
    draws = {sample(logits, [SamplingParams()], None, [0]).token_ids[0] for _ in range(20)}
    assert len(draws) > 15
    filtered = {sample(logits, [SamplingParams(top_k=5000)], None, [0]).token_ids[0] for _ in range(20)}
    assert len(filtered) > 15


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_repeat_the_parents_unseeded_draws() -> None:
    logits = np.zeros((1, 1_000_000), dtype=np.float32)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report its next draws and leave at once
        try:
            tokens = [sample(logits, [SamplingParams()], None, [0]).token_ids[0] for _ in range(5)]
            os.write(write, repr(tokens).encode())
        finally:
            os._exit(0)
    os.close(write)
    mine = [sample(logits, [SamplingParams()], None, [0]).token_ids[0] for _ in range(5)]
    with os.fdopen(read) as f:
        theirs = eval(f.read())
    os.waitpid(pid, 0)
    assert len(theirs) == 5 and theirs != mine


# --- filter properties ----------------------------------------------------------------------------


@FAST
@given(rows=st.lists(logit_rows, min_size=1, max_size=4), data=st.data())
def test_top_k_emits_only_the_k_largest(rows: list[list[float]], data: st.DataObject) -> None:
    vocab = min(len(r) for r in rows)
    logits = np.array([r[:vocab] for r in rows], dtype=np.float32)
    ks = [data.draw(st.integers(1, vocab)) for _ in rows]
    params = [SamplingParams(top_k=k, seed=data.draw(st.integers(0, 2**32))) for k in ks]
    tokens = _run_seeded(logits, params, data.draw(st.integers(0, 10_000)))
    for row, k, t in zip(logits, ks, tokens, strict=True):
        assert int((row > row[t]).sum()) < k  # fewer than k tokens beat it: it is among the k largest


@FAST
@given(rows=st.lists(logit_rows, min_size=1, max_size=4), data=st.data())
def test_top_p_emits_only_the_smallest_nucleus(rows: list[list[float]], data: st.DataObject) -> None:
    vocab = min(len(r) for r in rows)
    logits = np.array([r[:vocab] for r in rows], dtype=np.float32)
    ps = [data.draw(st.floats(min_value=0.01, max_value=1.0)) for _ in rows]
    params = [SamplingParams(top_p=p, seed=data.draw(st.integers(0, 2**32))) for p in ps]
    tokens = _run_seeded(logits, params, data.draw(st.integers(0, 10_000)))
    probs = torch.softmax(torch.from_numpy(logits).double(), dim=-1)
    for prob, p, t in zip(probs, ps, tokens, strict=True):
        # In the smallest nucleus with mass >= p (tokens tied with its last member included) iff
        # the tokens strictly more likely than t hold less than p.
        assert float(prob[prob > prob[t]].sum()) < p + 1e-5


@FAST
@given(rows=st.lists(logit_rows, min_size=1, max_size=5), data=st.data())
def test_top_k_then_top_p_in_a_mixed_batch(rows: list[list[float]], data: st.DataObject) -> None:
    vocab = min(len(r) for r in rows)
    logits = np.array([r[:vocab] for r in rows], dtype=np.float32)
    ks = [data.draw(st.integers(0, vocab)) for _ in rows]  # 0 and vocab both mean "off"
    ps = [data.draw(st.sampled_from([1.0, 0.3, 0.8, 0.95])) for _ in rows]
    params = [SamplingParams(top_k=k, top_p=p, seed=i) for i, (k, p) in enumerate(zip(ks, ps, strict=True))]
    tokens = _run_seeded(logits, params, data.draw(st.integers(0, 10_000)))
    for row, k, p, t in zip(torch.from_numpy(logits).double(), ks, ps, tokens, strict=True):
        kept = row if k == 0 else row.masked_fill(row < row.topk(k).values[-1], -math.inf)
        prob = torch.softmax(kept, dim=-1)  # top-p sees the top-k survivors renormalised
        assert prob[t] > 0
        assert float(prob[prob > prob[t]].sum()) < p + 1e-5


@FAST
@given(rows=st.lists(logit_rows, min_size=1, max_size=4), data=st.data())
def test_min_p_never_emits_unlikely_tokens(rows: list[list[float]], data: st.DataObject) -> None:
    vocab = min(len(r) for r in rows)
    logits = np.array([r[:vocab] for r in rows], dtype=np.float32)
    min_ps = [data.draw(st.floats(min_value=0.0, max_value=1.0)) for _ in rows]
    params = [SamplingParams(min_p=m, seed=data.draw(st.integers(0, 2**32))) for m in min_ps]
    tokens = _run_seeded(logits, params, data.draw(st.integers(0, 10_000)))
    probs = torch.softmax(torch.from_numpy(logits).double(), dim=-1)
    for prob, m, t in zip(probs, min_ps, tokens, strict=True):
        assert float(prob[t]) >= m * float(prob.max()) * (1 - 1e-5)


def _large_rows(vocab: int) -> dict[str, np.ndarray]:
    """Layouts that stress the shortcuts: sorted either way, ties, spikes in one residue class."""
    rng = np.random.default_rng(vocab)
    spikes = rng.standard_normal(vocab).astype(np.float32)
    spikes[::2048] += 8  # every spike in the same group of `_largest`'s group maxima
    masked = np.full(vocab, -np.inf, dtype=np.float32)
    masked[: vocab // 3] = rng.standard_normal(vocab // 3)  # then -inf: fewer than k finite for big k
    return {
        "randn": rng.standard_normal(vocab).astype(np.float32),
        "peaked": (rng.standard_normal(vocab) * 4).astype(np.float32),
        "ascending": np.sort(rng.standard_normal(vocab)).astype(np.float32),
        "descending": np.sort(rng.standard_normal(vocab))[::-1].astype(np.float32),
        "ties": np.round(rng.standard_normal(vocab) * 2).astype(np.float32),
        "flat": np.zeros(vocab, dtype=np.float32),
        "spikes": spikes,
        "mostly_masked": masked,
    }


@pytest.mark.parametrize("vocab", [100, 5000, 20_000, 49_152])
def test_largest_matches_a_full_sort(vocab: int) -> None:
    for name, row in _large_rows(vocab).items():
        for k in (1, 3, 20, 40, 256, 1000, 4000, vocab):
            if k <= vocab:
                got = sampling._largest(np.stack([row, row[::-1]]), k)
                ref = -np.sort(-np.stack([row, row[::-1]]), axis=-1)[:, :k]
                assert np.array_equal(got, ref), (name, k)


def _reference_threshold(row: np.ndarray, p: SamplingParams) -> float:
    """The definition, on a full float64 sort: the smallest logit top-k, then top-p, then min-p keep."""
    x = torch.from_numpy(row).double()
    V = x.numel()
    cand = x.sort(descending=True).values
    k = p.top_k if 0 < p.top_k < V else V
    kth = float(cand[k - 1])
    threshold = kth if k < V else -math.inf
    if p.top_p < 1.0:  # over the top-k survivors: every logit >= the k-th, ties included
        kept = cand.masked_fill(cand < kth, -math.inf)
        before = torch.cat([torch.zeros(1, dtype=x.dtype), kept.softmax(-1).cumsum(-1)[:-1]])
        threshold = max(threshold, float(kept[int((before < p.top_p).sum()) - 1]))
    if p.min_p > 0:
        threshold = max(threshold, float(x.max()) + math.log(p.min_p))
    return threshold


FILTERS = [
    SamplingParams(top_k=1),
    SamplingParams(top_k=40),
    SamplingParams(top_k=3000),
    SamplingParams(top_p=0.9),
    SamplingParams(top_p=0.5),
    SamplingParams(top_p=0.999),
    SamplingParams(top_k=1000, top_p=0.7),
    SamplingParams(min_p=0.05),
    SamplingParams(top_k=50, top_p=0.95, min_p=0.01),
]


@pytest.mark.parametrize("vocab", [100, 5000, 49_152])
def test_thresholds_match_the_definition_on_large_rows(vocab: int) -> None:
    rows = _large_rows(vocab)
    for name, row in rows.items():
        got = sampling._thresholds(np.stack([row] * len(FILTERS)), FILTERS)
        for p, threshold in zip(FILTERS, got.tolist(), strict=True):
            ref = _reference_threshold(row, p)
            # top-k and top-p pick a logit, so they must agree exactly; min-p adds log(min_p) in float32.
            if p.min_p > 0 and math.isfinite(ref):
                assert threshold == pytest.approx(ref, rel=1e-6, abs=1e-6), (name, p, threshold, ref)
            else:
                assert threshold == ref, (name, p, threshold, ref)


def test_large_vocabulary_draws_respect_every_filter() -> None:
    vocab = 49_152
    rows = _large_rows(vocab)
    x = np.stack([rows["randn"] * 3, rows["peaked"], rows["spikes"], rows["ascending"] * 5])
    for p in FILTERS:
        batch = np.repeat(x, 8, axis=0)
        params = [replace(p, seed=s if s % 2 else None) for s in range(len(batch))]
        tokens = sample(batch, params, None, list(range(len(batch)))).token_ids
        for row, t in zip(batch, tokens, strict=True):
            assert row[t] >= _reference_threshold(row, p) - 1e-5 * max(1.0, abs(float(row[t]))), p


def test_top_k_one_and_min_p_one_are_greedy() -> None:
    logits = _randn(6, 100)
    params = [SamplingParams(top_k=1, seed=i) for i in range(3)] + [
        SamplingParams(min_p=1.0, seed=i) for i in range(3)
    ]
    assert _run_seeded(logits, params, 0) == torch.from_numpy(logits).argmax(-1).tolist()


# --- greedy and temperature -----------------------------------------------------------------------


def test_greedy_equals_argmax_on_the_fast_path() -> None:
    logits = _randn(16, 1000)
    result = sample(logits, [SamplingParams(temperature=0.0)] * 16, None, list(range(16)))
    reference = torch.from_numpy(logits).argmax(-1).tolist()
    assert result == SampleResult(token_ids=reference, logprobs=None, top_logprobs=None)


def test_greedy_ties_pick_the_first_index_as_torch_does() -> None:
    logits = np.array(
        [[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [-np.inf, -1.0, -np.inf, -1.0], [0.0, 0.0, 5.0, 5.0]],
        dtype=np.float32,
    )
    first = [1, 0, 1, 2]
    assert torch.from_numpy(logits).argmax(-1).tolist() == first  # what the torch sampler returned
    greedy = [SamplingParams(temperature=0.0)] * 4
    assert sample(logits, greedy, None, [0] * 4).token_ids == first  # fast path
    slow = [replace(p, logprobs=True) for p in greedy]  # the general path
    assert sample(logits, slow, None, [0] * 4).token_ids == first
    penalized = [SamplingParams(temperature=0.0, repetition_penalty=1.5)] * 4
    assert sample(logits, penalized, [[3]] * 4, [0] * 4).token_ids == first  # ties among unseen ids


def test_sample_never_writes_into_the_callers_logits() -> None:
    logits = _randn(6, 3000, scale=2.0)
    before = logits.copy()
    logits.setflags(write=False)  # any in-place write would raise
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=10, seed=1),
        SamplingParams(top_p=0.8, repetition_penalty=1.3, logprobs=True),
        SamplingParams(min_p=0.1, top_logprobs=4),
        SamplingParams(temperature=0.5, frequency_penalty=1.0, seed=2),
        SamplingParams(),
    ]
    sample(logits, params, [[1, 2]] * 6, list(range(6)))
    sample(logits[:, ::2], params, [[1, 2]] * 6, list(range(6)))  # a strided view works too
    assert np.array_equal(logits, before)


def test_greedy_equals_argmax_of_the_penalized_logits() -> None:
    logits = _randn(3, 50)
    histories = [[int(logits[0].argmax())] * 3, [1, 2, 3], []]
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=5.0, frequency_penalty=2.0),
        SamplingParams(temperature=0.0, presence_penalty=1.0, logprobs=True),
        SamplingParams(temperature=0.0),
    ]
    penalized = apply_penalties(logits, params, histories)
    tokens = sample(logits, params, histories, [3, 3, 0]).token_ids
    assert tokens == penalized.argmax(-1).tolist()
    assert tokens[0] != int(logits[0].argmax())  # the penalty moved it


def test_tiny_temperature_behaves_like_greedy() -> None:
    rng = np.random.default_rng(0)
    # Distinct logits, at least 0.05 apart: at T=1e-3 the runner-up is e^-50 as likely as the top.
    logits = np.stack([rng.permutation(200).astype(np.float32) * 0.05 for _ in range(8)])
    params = [SamplingParams(temperature=1e-3, seed=i) for i in range(8)]
    for pos in range(5):
        assert _run_seeded(logits, params, pos) == logits.argmax(-1).tolist()


# --- penalties ------------------------------------------------------------------------------------


def test_repetition_penalty_pushes_seen_logits_down_only() -> None:
    logits = np.array([[2.0, -2.0, 1.0, -1.0, 0.5]], dtype=np.float32)
    out = apply_penalties(logits, [SamplingParams(repetition_penalty=2.0)], [[0, 1, 1]])
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0, 0.5]]  # positive divided, negative multiplied


def test_presence_and_frequency_penalties_subtract_as_documented() -> None:
    logits = np.ones((1, 4), dtype=np.float32)
    pres = apply_penalties(logits, [SamplingParams(presence_penalty=0.5)], [[0, 2, 2, 2]])
    assert pres.tolist() == [[0.5, 1.0, 0.5, 1.0]]
    freq = apply_penalties(logits, [SamplingParams(frequency_penalty=0.5)], [[0, 2, 2, 2]])
    assert freq.tolist() == [[0.5, 1.0, -0.5, 1.0]]
    neg = apply_penalties(logits, [SamplingParams(presence_penalty=-1.0)], [[3]])
    assert neg.tolist() == [[1.0, 1.0, 1.0, 2.0]]  # a negative penalty encourages the token


def test_penalties_match_the_dense_formula() -> None:
    # The torch sampler's formula over [B, V] count matrices, in float32: the sparse update must
    # give bit-identical rows.
    rng = np.random.default_rng(3)
    logits = _randn(5, 700, seed=3, scale=3.0)
    params = [
        SamplingParams(repetition_penalty=1.7, presence_penalty=0.4, frequency_penalty=0.3),
        SamplingParams(),
        SamplingParams(repetition_penalty=0.6, frequency_penalty=-1.5),
        SamplingParams(presence_penalty=2.0),
        SamplingParams(repetition_penalty=1.2),
    ]
    histories = [rng.integers(0, 700, size=n).tolist() for n in (300, 50, 1000, 0, 5)]
    out = apply_penalties(logits, params, histories)
    x = torch.from_numpy(logits)
    for i, p in enumerate(params):
        counts = torch.bincount(torch.tensor(histories[i], dtype=torch.long), minlength=700).float()
        seen = counts > 0
        row = x[i]
        if p.has_penalties:
            row = torch.where(
                seen, torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty), row
            )
            row = row - p.frequency_penalty * counts - p.presence_penalty * seen.float()
        assert torch.equal(torch.from_numpy(out[i]), row), i


def test_penalties_leave_other_rows_and_the_input_untouched() -> None:
    logits = _randn(3, 20)
    before = logits.copy()
    params = [SamplingParams(), SamplingParams(frequency_penalty=1.0), SamplingParams()]
    out = apply_penalties(logits, params, [[1, 2], [4, 4], [5]])
    assert np.array_equal(logits, before) and not np.shares_memory(out, logits)
    assert np.array_equal(out[0], logits[0]) and np.array_equal(out[2], logits[2])
    changed = np.flatnonzero(out[1] != logits[1]).tolist()
    assert changed == [4] and float(out[1, 4]) == pytest.approx(float(logits[1, 4]) - 2.0)
    untouched = apply_penalties(logits, [SamplingParams()] * 3, None)  # no penalties: a plain copy
    assert np.array_equal(untouched, logits) and not np.shares_memory(untouched, logits)


def test_penalties_need_valid_histories() -> None:
    logits = np.zeros((1, 10), dtype=np.float32)
    params = [SamplingParams(presence_penalty=1.0)]
    with pytest.raises(InvalidInputError, match="histories"):
        sample(logits, params, None, [0])
    with pytest.raises(InvalidInputError, match=r"\[0, 10\)"):
        sample(logits, params, [[3, 10]], [0])
    with pytest.raises(InvalidInputError, match=r"\[0, 10\).*-1\.\.3"):
        sample(logits, params, [[3, -1]], [0])


# --- logprobs -------------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_at_the_chosen_token() -> None:
    logits = _randn(4, 64, scale=3.0)
    params = [
        SamplingParams(temperature=0.5, top_k=10, seed=1, logprobs=True),
        SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5),
        SamplingParams(temperature=1.5, repetition_penalty=1.5, seed=2, top_logprobs=20),
        SamplingParams(seed=3),
    ]
    result = sample(logits, params, [[], [], [0, 1, 2], []], [0, 0, 0, 0])
    raw = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1)
    assert result.logprobs is not None and result.top_logprobs is not None
    for i, t in enumerate(result.token_ids):
        assert result.logprobs[i] == pytest.approx(float(raw[i, t]), abs=2e-6)
    assert [len(top) for top in result.top_logprobs] == [0, 5, 20, 0]
    for i, top in enumerate(result.top_logprobs):
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        assert [t for t, _ in top] == raw[i].topk(len(top)).indices.tolist()  # distinct values here
        for token, value in top:
            assert isinstance(token, int) and isinstance(value, float)
            assert value == pytest.approx(float(raw[i, token]), abs=2e-6)
    assert result.top_logprobs[1][0][0] == result.token_ids[1]  # greedy picks the most likely


def test_logprobs_stay_accurate_on_a_large_vocabulary() -> None:
    logits = _randn(2, 262_144, seed=9, scale=4.0)
    logits[1, 1234] = 60.0  # one dominant token: its logprob is ~0, the others ~-60
    params = [SamplingParams(temperature=0.0, top_logprobs=20)] * 2
    result = sample(logits, params, None, [0, 0])
    raw = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1)
    assert result.logprobs is not None and result.top_logprobs is not None
    for i in range(2):
        assert result.logprobs[i] == pytest.approx(float(raw[i].max()), abs=1e-5)
        ref_values, ref_ids = raw[i].topk(20)
        assert [t for t, _ in result.top_logprobs[i]] == ref_ids.tolist()
        assert [v for _, v in result.top_logprobs[i]] == pytest.approx(ref_values.tolist(), abs=1e-5)
    assert result.token_ids[1] == 1234 and abs(result.logprobs[1]) < 1e-5


def test_top_logprobs_break_ties_by_ascending_token_id() -> None:
    logits = np.array([[0.0, 5.0, 1.0, 5.0, 5.0, 1.0]], dtype=np.float32)
    result = sample(logits, [SamplingParams(temperature=0.0, top_logprobs=4)], None, [0])
    assert result.top_logprobs is not None
    assert [t for t, _ in result.top_logprobs[0]] == [1, 3, 4, 2]  # the 5s by id, then the first 1
    values = [v for _, v in result.top_logprobs[0]]
    assert values[0] == values[1] == values[2] > values[3]


def test_logprobs_absent_unless_asked() -> None:
    x = _randn(2, 8)
    result = sample(x, [SamplingParams(seed=1), SamplingParams(temperature=0)], None, [0, 0])
    assert result.logprobs is None and result.top_logprobs is None
    only_chosen = sample(x[:1], [SamplingParams(logprobs=True, seed=1)], None, [0])
    assert only_chosen.logprobs is not None and only_chosen.top_logprobs is None


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", -1),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("top_logprobs", 21),
        ("top_logprobs", -1),
    ],
)
def test_validate_names_the_bad_field(field: str, value: float) -> None:
    with pytest.raises(InvalidInputError, match=field):
        SamplingParams(**{field: value}).validate()


def test_validate_accepts_defaults_and_edges() -> None:
    SamplingParams().validate()
    SamplingParams(temperature=0.0, top_p=1.0, min_p=1.0, top_k=0, top_logprobs=20, seed=-5).validate()
    assert SamplingParams(temperature=0.0).is_greedy and not SamplingParams().is_greedy


def test_mismatched_lengths_are_rejected() -> None:
    with pytest.raises(InvalidInputError, match="rows"):
        sample(np.zeros((2, 4), dtype=np.float32), [SamplingParams()], None, [0, 0])


@pytest.mark.parametrize("shape", [(4,), (1, 2, 4)])
def test_logits_must_be_two_dimensional(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInputError, match=r"\[batch, vocab\]"):
        sample(np.zeros(shape, dtype=np.float32), [SamplingParams()], None, [0])


def test_torch_tensors_are_refused() -> None:
    with pytest.raises(TypeError, match="numpy"):
        sample(torch.zeros(1, 4), [SamplingParams()], None, [0])  # type: ignore[arg-type]


# --- no torch -------------------------------------------------------------------------------------


def test_importing_the_sampler_does_not_import_torch() -> None:
    code = "import sys, pipeserve.modeling.sampling; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
