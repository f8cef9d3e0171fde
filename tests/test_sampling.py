"""Tests for modeling/sampling.py: stateless seeding, filter properties, penalties, logprobs, validation."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeserve.common.errors import InvalidInputError
from pipeserve.modeling.sampling import SampleResult, SamplingParams, apply_penalties, sample

FAST = settings(max_examples=50, deadline=None)

logit_rows = st.lists(
    st.floats(min_value=-20, max_value=20, allow_nan=False, width=32), min_size=1, max_size=40
)


def _run_seeded(logits: torch.Tensor, params: list[SamplingParams], position: int) -> list[int]:
    return sample(logits, params, None, [position] * len(params)).token_ids


# --- stateless seeding ----------------------------------------------------------------------------


def test_seeded_runs_repeat_exactly() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 300)
    params = [SamplingParams(temperature=1.3, seed=s) for s in (1, 2, 3, 4)]
    runs = [[_run_seeded(logits, params, pos) for pos in range(20)] for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]


def test_same_seed_same_tokens_in_any_batch_composition() -> None:
    torch.manual_seed(0)
    vocab = 500
    mine = torch.randn(vocab)
    me = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    alone: list[int] = []
    crowded: list[int] = []
    for pos in range(30):
        alone += sample(mine[None], [me], None, [pos]).token_ids
        # Neighbours with other filters, seeds and positions, and `mine` in the middle of the batch.
        others = torch.randn(3, vocab)
        batch = torch.stack([others[0], others[1], mine, others[2]])
        params = [
            SamplingParams(temperature=0.7, top_k=5),
            SamplingParams(temperature=0.0),
            me,
            SamplingParams(temperature=2.0, min_p=0.1, seed=99),
        ]
        crowded.append(sample(batch, params, None, [pos + 7, 3, pos, 11]).token_ids[2])
    assert alone == crowded


def test_different_seeds_differ_on_a_flat_distribution() -> None:
    vocab = 1000
    logits = torch.zeros(200, vocab)
    params = [SamplingParams(seed=s) for s in range(200)]
    tokens = _run_seeded(logits, params, position=5)
    # 200 draws from 1000 equally likely tokens: about 18 collisions expected.
    assert len(set(tokens)) > 150
    # One seed over successive positions also moves around.
    walk = [_run_seeded(logits[:1], params[:1], pos)[0] for pos in range(50)]
    assert len(set(walk)) > 35


def test_draws_follow_the_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).expand(8000, 4).contiguous()
    params = [SamplingParams(seed=s) for s in range(8000)]
    tokens = torch.tensor(_run_seeded(logits, params, position=0))
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.02)


def test_each_row_draws_from_its_own_filtered_distribution() -> None:
    # One batch of rows with the same logits and different filters; each group's frequencies must
    # match its own renormalised distribution, whatever its neighbours ask for.
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    groups = {
        SamplingParams(): [0.1, 0.2, 0.3, 0.4],
        SamplingParams(top_k=3): [0.0, 2 / 9, 3 / 9, 4 / 9],
        SamplingParams(top_p=0.6): [0.0, 0.0, 3 / 7, 4 / 7],
        SamplingParams(min_p=0.6): [0.0, 0.0, 3 / 7, 4 / 7],
        SamplingParams(top_k=2, top_p=0.55): [0.0, 0.0, 0.0, 1.0],  # top-p over the renormalised top-2
        SamplingParams(temperature=0.5): (probs**2 / (probs**2).sum()).tolist(),
    }
    n = 2000
    params = [replace(g, seed=s) for g in groups for s in range(n)]
    logits = torch.log(probs).expand(len(params), 4).contiguous()
    tokens = torch.tensor(_run_seeded(logits, params, position=3)).view(len(groups), n)
    for (group, expected), row in zip(groups.items(), tokens, strict=True):
        freq = torch.bincount(row, minlength=4).float() / n
        assert torch.allclose(freq, torch.tensor(expected), atol=0.04), (group, freq)


def test_unseeded_rows_use_fresh_randomness() -> None:
    logits = torch.zeros(1, 10_000)
    draws = {sample(logits, [SamplingParams()], None, [0]).token_ids[0] for _ in range(20)}
    assert len(draws) > 15


# --- filter properties ----------------------------------------------------------------------------


@FAST
@given(rows=st.lists(logit_rows, min_size=1, max_size=4), data=st.data())
def test_top_k_emits_only_the_k_largest(rows: list[list[float]], data: st.DataObject) -> None:
    vocab = min(len(r) for r in rows)
    logits = torch.tensor([r[:vocab] for r in rows])
    ks = [data.draw(st.integers(1, vocab)) for _ in rows]
    params = [SamplingParams(top_k=k, seed=data.draw(st.integers(0, 2**32))) for k in ks]
    tokens = _run_seeded(logits, params, data.draw(st.integers(0, 10_000)))
    for row, k, t in zip(logits, ks, tokens, strict=True):
        assert int((row > row[t]).sum()) < k  # fewer than k tokens beat it: it is among the k largest


@FAST
@given(rows=st.lists(logit_rows, min_size=1, max_size=4), data=st.data())
def test_top_p_emits_only_the_smallest_nucleus(rows: list[list[float]], data: st.DataObject) -> None:
    vocab = min(len(r) for r in rows)
    logits = torch.tensor([r[:vocab] for r in rows])
    ps = [data.draw(st.floats(min_value=0.01, max_value=1.0)) for _ in rows]
    params = [SamplingParams(top_p=p, seed=data.draw(st.integers(0, 2**32))) for p in ps]
    tokens = _run_seeded(logits, params, data.draw(st.integers(0, 10_000)))
    probs = torch.softmax(logits.double(), dim=-1)
    for prob, p, t in zip(probs, ps, tokens, strict=True):
        # In the smallest nucleus with mass >= p (tokens tied with its last member included) iff
        # the tokens strictly more likely than t hold less than p.
        assert float(prob[prob > prob[t]].sum()) < p + 1e-5


@FAST
@given(rows=st.lists(logit_rows, min_size=1, max_size=5), data=st.data())
def test_top_k_then_top_p_in_a_mixed_batch(rows: list[list[float]], data: st.DataObject) -> None:
    vocab = min(len(r) for r in rows)
    logits = torch.tensor([r[:vocab] for r in rows])
    ks = [data.draw(st.integers(0, vocab)) for _ in rows]  # 0 and vocab both mean "off"
    ps = [data.draw(st.sampled_from([1.0, 0.3, 0.8, 0.95])) for _ in rows]
    params = [SamplingParams(top_k=k, top_p=p, seed=i) for i, (k, p) in enumerate(zip(ks, ps, strict=True))]
    tokens = _run_seeded(logits, params, data.draw(st.integers(0, 10_000)))
    for row, k, p, t in zip(logits.double(), ks, ps, tokens, strict=True):
        kept = row if k == 0 else row.masked_fill(row < row.topk(k).values[-1], -math.inf)
        prob = torch.softmax(kept, dim=-1)  # top-p sees the top-k survivors renormalised
        assert prob[t] > 0
        assert float(prob[prob > prob[t]].sum()) < p + 1e-5


@FAST
@given(rows=st.lists(logit_rows, min_size=1, max_size=4), data=st.data())
def test_min_p_never_emits_unlikely_tokens(rows: list[list[float]], data: st.DataObject) -> None:
    vocab = min(len(r) for r in rows)
    logits = torch.tensor([r[:vocab] for r in rows])
    min_ps = [data.draw(st.floats(min_value=0.0, max_value=1.0)) for _ in rows]
    params = [SamplingParams(min_p=m, seed=data.draw(st.integers(0, 2**32))) for m in min_ps]
    tokens = _run_seeded(logits, params, data.draw(st.integers(0, 10_000)))
    probs = torch.softmax(logits.double(), dim=-1)
    for prob, m, t in zip(probs, min_ps, tokens, strict=True):
        assert float(prob[t]) >= m * float(prob.max()) * (1 - 1e-5)


def test_top_k_one_and_min_p_one_are_greedy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 100)
    params = [SamplingParams(top_k=1, seed=i) for i in range(3)] + [
        SamplingParams(min_p=1.0, seed=i) for i in range(3)
    ]
    assert _run_seeded(logits, params, 0) == logits.argmax(-1).tolist()


# --- greedy and temperature -----------------------------------------------------------------------


def test_greedy_equals_argmax_on_the_fast_path() -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 1000)
    result = sample(logits, [SamplingParams(temperature=0.0)] * 16, None, list(range(16)))
    assert result == SampleResult(token_ids=logits.argmax(-1).tolist(), logprobs=None, top_logprobs=None)


def test_greedy_equals_argmax_of_the_penalized_logits() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
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
    torch.manual_seed(0)
    # Distinct logits, at least 0.05 apart: at T=1e-3 the runner-up is e^-50 as likely as the top.
    logits = torch.stack([torch.randperm(200).float() * 0.05 for _ in range(8)])
    params = [SamplingParams(temperature=1e-3, seed=i) for i in range(8)]
    for pos in range(5):
        assert _run_seeded(logits, params, pos) == logits.argmax(-1).tolist()


# --- penalties ------------------------------------------------------------------------------------


def test_repetition_penalty_pushes_seen_logits_down_only() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]])
    out = apply_penalties(logits, [SamplingParams(repetition_penalty=2.0)], [[0, 1, 1]])
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0, 0.5]]  # positive divided, negative multiplied


def test_presence_and_frequency_penalties_subtract_as_documented() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    pres = apply_penalties(logits, [SamplingParams(presence_penalty=0.5)], [[0, 2, 2, 2]])
    assert pres.tolist() == [[0.5, 1.0, 0.5, 1.0]]
    freq = apply_penalties(logits, [SamplingParams(frequency_penalty=0.5)], [[0, 2, 2, 2]])
    assert freq.tolist() == [[0.5, 1.0, -0.5, 1.0]]
    neg = apply_penalties(logits, [SamplingParams(presence_penalty=-1.0)], [[3]])
    assert neg.tolist() == [[1.0, 1.0, 1.0, 2.0]]  # a negative penalty encourages the token


def test_penalties_leave_other_rows_and_the_input_untouched() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 20)
    before = logits.clone()
    params = [SamplingParams(), SamplingParams(frequency_penalty=1.0), SamplingParams()]
    out = apply_penalties(logits, params, [[1, 2], [4, 4], [5]])
    assert torch.equal(logits, before)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    changed = (out[1] != logits[1]).nonzero().flatten().tolist()
    assert changed == [4] and float(out[1, 4]) == pytest.approx(float(logits[1, 4]) - 2.0)


def test_penalties_need_valid_histories() -> None:
    logits = torch.zeros(1, 10)
    params = [SamplingParams(presence_penalty=1.0)]
    with pytest.raises(InvalidInputError, match="histories"):
        sample(logits, params, None, [0])
    with pytest.raises(InvalidInputError, match=r"\[0, 10\)"):
        sample(logits, params, [[3, 10]], [0])


# --- logprobs -------------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_at_the_chosen_token() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 64) * 3
    params = [
        SamplingParams(temperature=0.5, top_k=10, seed=1, logprobs=True),
        SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5),
        SamplingParams(temperature=1.5, repetition_penalty=1.5, seed=2, top_logprobs=20),
        SamplingParams(seed=3),
    ]
    result = sample(logits, params, [[], [], [0, 1, 2], []], [0, 0, 0, 0])
    raw = torch.log_softmax(logits, dim=-1)
    assert result.logprobs is not None and result.top_logprobs is not None
    for i, t in enumerate(result.token_ids):
        assert result.logprobs[i] == pytest.approx(float(raw[i, t]), abs=1e-6)
    assert [len(top) for top in result.top_logprobs] == [0, 5, 20, 0]
    for i, top in enumerate(result.top_logprobs):
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        for token, value in top:
            assert value == pytest.approx(float(raw[i, token]), abs=1e-6)
    assert result.top_logprobs[1][0][0] == result.token_ids[1]  # greedy picks the most likely


def test_logprobs_absent_unless_asked() -> None:
    result = sample(torch.randn(2, 8), [SamplingParams(seed=1), SamplingParams(temperature=0)], None, [0, 0])
    assert result.logprobs is None and result.top_logprobs is None
    only_chosen = sample(torch.randn(1, 8), [SamplingParams(logprobs=True, seed=1)], None, [0])
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
        sample(torch.zeros(2, 4), [SamplingParams()], None, [0, 0])
