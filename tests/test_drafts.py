"""Speculative decoding's coordinator policies (coordinator/drafts.py), without a model: n-gram
proposals against a brute-force search, the acceptance estimate, the step-cost model and the
allocation of drafts in a step (the off-switch for busy batches included); and through the
scheduler over fake stages, that a batch of many streams never drafts while one stream does."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from pipeserve.common.config import MAX_DRAFT, parse_config
from pipeserve.common.errors import ConfigError
from pipeserve.coordinator.drafts import (
    MAX_ROWS,
    NGRAM_MAX,
    NGRAM_MIN,
    Acceptance,
    Candidate,
    NgramDrafts,
    StepCost,
    allocate,
)
from tests.fake_stages import VOCAB, FakeStage, reference, word
from tests.test_scheduler_units import GREEDY, FakeCluster, collect, prompt_of, run


def brute_force(tokens: list[int], k: int) -> list[int]:
    """The longest suffix n-gram (NGRAM_MAX..NGRAM_MIN) that occurred earlier, at its most recent
    earlier end, and the k tokens after it."""
    L = len(tokens)
    for n in range(min(NGRAM_MAX, L - 1), NGRAM_MIN - 1, -1):
        suffix = tokens[L - n :]
        for end in range(L - 2, n - 2, -1):
            if tokens[end - n + 1 : end + 1] == suffix:
                return tokens[end + 1 : end + 1 + k]
    return []


@pytest.mark.parametrize("seed", range(6))
def test_ngram_proposals_equal_a_brute_force_search_as_tokens_grow(seed):
    rng = random.Random(seed)
    vocab = rng.choice([3, 5, 12])  # small vocabularies repeat n-grams often
    tokens = [rng.randrange(vocab) for _ in range(5)]
    drafts = NgramDrafts()
    for _ in range(120):
        k = rng.randrange(0, 9)
        assert drafts.propose(tokens, k) == (brute_force(tokens, k) if k else [])
        tokens += [rng.randrange(vocab) for _ in range(rng.choice([1, 1, 1, 3]))]


def test_ngram_copies_a_repeated_span_and_never_matches_itself():
    d = NgramDrafts()
    code = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    assert d.propose(code, 4) == []  # nothing repeats yet
    tokens = [*code, 99, 10, 11, 12]  # the span starts again
    assert d.propose(tokens, 4) == [13, 14, 15, 16]
    assert d.propose(tokens, 20) == [13, 14, 15, 16, 17, 18, 19, 99, 10, 11, 12]
    assert d.propose([1, 2], 4) == []


def test_acceptance_follows_what_passes_accept():
    a = Acceptance()
    start = a.rate
    for _ in range(10):
        a.update(4, 4)
    assert a.rate > 0.9
    for _ in range(10):
        a.update(4, 0)
    assert a.rate < 0.35 < start
    c = Candidate([1, 2, 3, 4], a.rate)  # where a row costs half a step, that no longer pays
    assert allocate([c], 1, cheap(0.5), 1) == 1 and c.k == 0
    before = a.rate
    a.update(0, 0)  # nothing drafted: nothing learned
    assert a.rate == before


def test_step_cost_measured_interpolated_and_extrapolated():
    c = StepCost()
    assert c.ratio(1) == 1.0 and c.ratio(3) == 1.5  # the prior: a quarter step per extra row
    c.add(2, 12.5)  # one size measured: the prior's shape through it
    assert c.ratio(3) == pytest.approx(1.5) and c.estimate(1) == pytest.approx(10.0)
    c.add(1, 10.0)
    c.add(3, 14.0)
    assert c.ratio(3) == pytest.approx(1.4)
    assert c.ratio(5) == pytest.approx(1.7)  # 1.5 ms per row, along the last two measured (2, 3)
    c.add(7, 30.0)
    assert c.estimate(5) == pytest.approx(22.0)  # between 3 and 7
    c.add(MAX_ROWS + 5, 100.0)  # beyond the rows a drafting step has: not kept
    assert MAX_ROWS + 5 not in c.ms
    c2 = StepCost()
    c2.add(4, 20.0)
    c2.add(6, 24.0)
    assert c2.estimate(1) == pytest.approx(14.0)  # below every measured size: their slope


def cheap(per_row: float) -> StepCost:
    c = StepCost()
    for rows in range(1, MAX_ROWS + 1):
        c.add(rows, 10.0 * (1 + per_row * (rows - 1)))
    return c


def test_allocate_drafts_while_they_pay():
    # one stream whose drafts are usually accepted, on a step whose extra rows are cheap: all of them
    c = Candidate(list(range(10)), rate=0.95)
    assert allocate([c], 1, cheap(0.05), 1) == MAX_ROWS and c.k == MAX_DRAFT
    # drafts that are rarely accepted on a costly step: none
    c = Candidate(list(range(10)), rate=0.2)
    assert allocate([c], 1, cheap(0.6), 1) == 1 and c.k == 0
    # in between: a few
    c = Candidate(list(range(10)), rate=0.8)
    rows = allocate([c], 1, cheap(0.4), 1)
    assert 1 < rows < MAX_ROWS and c.k == rows - 1
    # never more than proposed
    c = Candidate([5, 6], rate=0.99)
    assert allocate([c], 1, cheap(0.01), 1) == 3 and c.k == 2


def test_allocate_shares_rows_and_stops_at_the_cap():
    cands = [Candidate(list(range(8)), rate=r) for r in (0.9, 0.6, 0.95)]
    rows = allocate(cands, 3, cheap(0.02), 3)
    assert rows == MAX_ROWS and sum(c.k for c in cands) == MAX_ROWS - 3
    assert cands[2].k >= cands[0].k >= cands[1].k  # the likelier drafts first
    # a step that is already full (a busy batch, or a prefill chunk) drafts nothing
    cands = [Candidate(list(range(8)), rate=0.99) for _ in range(MAX_ROWS)]
    assert allocate(cands, MAX_ROWS, cheap(0.0), MAX_ROWS) == MAX_ROWS
    assert all(c.k == 0 for c in cands)


def test_config_bounds_max_draft():
    base = {"model_name": "toy", "nodes": [{"id": "n", "address": "127.0.0.1:1", "model_part": 0}]}
    cfg = parse_config({**base, "coordinator": {"speculative": {"method": "off"}}})
    assert cfg.coordinator.speculative.method == "off"
    with pytest.raises(ConfigError, match=r"speculative\.max_draft.*less than or equal to 7"):
        parse_config({**base, "coordinator": {"speculative": {"max_draft": MAX_DRAFT + 1}}})
    with pytest.raises(ConfigError, match=r"speculative\.method"):
        parse_config({**base, "coordinator": {"speculative": {"method": "eagle"}}})


# ---- through the scheduler, over fake stages ---------------------------------------------------
def oracle(miss_every: int):
    """A draft source that knows the toy model: it proposes its true continuation, except that
    the draft at index (len(tokens) % miss_every) is wrong (0 = never), so passes accept all,
    some or none of their drafts."""

    def propose(self, tokens, k):  # type: ignore[no-untyped-def]
        out = reference(list(tokens), k)
        if miss_every and k:
            j = len(tokens) % miss_every
            if j < k:
                out[j] = (out[j] + 1) % VOCAB or 2
        return out

    return propose


def measured_cheap(sch: Any) -> None:
    """Steps of any size measured as costing the same: draft whenever the rows allow."""
    for rows in range(1, MAX_ROWS + 1):
        sch.step_cost.add(rows, 1.0)


@pytest.mark.parametrize("miss_every", [0, 3, 1])
def test_speculative_output_equals_plain_with_stops_lengths_and_rollback(monkeypatch, miss_every):
    """Drafts that are all right, partly right and always wrong (the first is wrong: miss 1) give
    the reference tokens and text; max_tokens lands inside a pass, a stop id and a stop string
    inside accepted drafts end the stream at the same token; the caches end consistent."""
    monkeypatch.setattr(NgramDrafts, "propose", oracle(miss_every))

    async def main() -> None:
        async with FakeCluster(parts=3) as fc:
            measured_cheap(fc.scheduler)
            prompt = prompt_of(1, 9)
            ref = reference(prompt, 40)
            for n in (1, 2, 5, 13, 40):  # max_tokens in the middle of a pass
                toks, text, reason = await collect(fc.submit(prompt, n, ignore_eos=True))
                assert (toks, reason) == (ref[:n], "length")
                assert text == "".join(map(word, ref[:n]))
            stop_at = 11  # a stop id deep inside: the stream ends on it
            toks, _, reason = await collect(fc.submit(prompt, 40, stop_ids=[ref[stop_at]]))
            first = ref.index(ref[stop_at])
            assert (toks, reason) == (ref[: first + 1], "stop")
            cut = word(ref[6]) + word(ref[7])  # a stop string spanning two tokens of one pass
            toks, text, reason = await collect(fc.submit(prompt, 40, stop=[cut.strip()], ignore_eos=True))
            full = "".join(map(word, ref))
            assert reason == "stop" and text == full[: full.index(cut.strip())]
            assert toks == ref[: len(toks)] and len(toks) <= 8
            sp = fc.scheduler.spec
            assert sp.drafted > 0 and sp.passes > 0
            if miss_every == 0:
                assert sp.accepted == sp.drafted and sp.tokens > 2 * sp.passes
            if miss_every == 1:
                assert sp.accepted == 0
            await fc.settle()

    run(main())


def test_a_busy_batch_never_drafts_and_one_stream_does(monkeypatch):
    """16 streams that all have proposals: no step carries a draft (MAX_ROWS); a stream alone
    does; every output is the reference."""
    monkeypatch.setattr(NgramDrafts, "propose", oracle(0))
    drafted: list[int] = []
    real = FakeStage.compute

    async def compute(self, chunks, hidden):  # type: ignore[no-untyped-def]
        if self.part == 0:
            drafted.append(sum(c[4] for c in chunks))
        return await real(self, chunks, hidden)

    monkeypatch.setattr(FakeStage, "compute", compute)

    async def main(n: int) -> None:
        async with FakeCluster(parts=2) as fc:
            measured_cheap(fc.scheduler)
            prompts = [prompt_of(i, 6) for i in range(n)]
            # all admitted before the first step: submit, then let the group loop run
            reqs = [fc.submit(p, 12, ignore_eos=True) for p in prompts]
            outs = await asyncio.gather(*(collect(r) for r in reqs))
            assert [o[0] for o in outs] == [reference(p, 12) for p in prompts]

    run(main(16))
    busy = [d for d in drafted]
    drafted.clear()
    run(main(1))
    assert max(busy) == 0
    assert max(drafted) > 0


def test_opting_out_per_request_and_method_off(monkeypatch):
    monkeypatch.setattr(NgramDrafts, "propose", oracle(0))

    async def main(**coord: Any) -> tuple[int, list[int]]:
        async with FakeCluster(parts=2, **coord) as fc:
            measured_cheap(fc.scheduler)
            r = fc.scheduler.submit("a", prompt_of(2, 6), 10, GREEDY, [], [], True, speculative=False)
            toks, _, _ = await collect(r)
            return fc.scheduler.spec.drafted, toks

    assert run(main()) == (0, reference(prompt_of(2, 6), 10))
    assert run(main(speculative={"method": "off"}))[0] == 0


def test_a_request_that_stopped_drafting_starts_again_when_its_proposals_come_true(monkeypatch):
    """A request whose acceptance has fallen below what a draft row costs sends no drafts, but
    its proposals are still compared with the tokens that come out (at no cost), so once they
    come true it drafts again; the output is the reference throughout."""
    monkeypatch.setattr(NgramDrafts, "propose", oracle(0))

    async def main() -> None:
        async with FakeCluster(parts=2) as fc:
            for rows in range(1, MAX_ROWS + 1):  # a draft row costs half a step: worth it above 0.5
                fc.scheduler.step_cost.add(rows, 1.0 + 0.5 * (rows - 1))
            monkeypatch.setattr(fc.scheduler.step_cost, "add", lambda rows, ms: None)  # not the fakes' timing
            prompt = prompt_of(3, 6)
            req = fc.submit(prompt, 40, ignore_eos=True)
            req.acceptance = Acceptance(accepted=0.1, rejected=5.0)  # as if rejected a lot before
            toks, _, _ = await collect(req)
            assert toks == reference(prompt, 40)
            assert req.spec.drafted > 0 and req.spec.accepted == req.spec.drafted
            assert req.spec.passes < 40  # drafting resumed: fewer passes than tokens

    run(main())


def test_the_first_draft_not_sent_is_evidence_after_accepted_drafts(monkeypatch):
    """A step that sends fewer drafts than proposed, all accepted, also learns whether the first
    one it held back came out (the token after them): the acceptance estimate counts one draft
    more than were sent in such steps, and as accepted while the proposals are right. The output is
    the reference throughout."""
    monkeypatch.setattr(NgramDrafts, "propose", oracle(0))  # always right
    calls: list[tuple[int, int]] = []
    update = Acceptance.update

    def spy(self, drafted, accepted):  # type: ignore[no-untyped-def]
        calls.append((drafted, accepted))
        update(self, drafted, accepted)

    monkeypatch.setattr(Acceptance, "update", spy)

    async def main() -> None:
        async with FakeCluster(parts=2) as fc:
            for rows in range(1, MAX_ROWS + 1):  # rows cost more and more: a few drafts pay, not all
                fc.scheduler.step_cost.add(rows, 1.0 + 0.3 * (rows - 1) + 0.05 * (rows - 1) ** 2)
            monkeypatch.setattr(fc.scheduler.step_cost, "add", lambda rows, ms: None)
            prompt = prompt_of(3, 6)
            req = fc.submit(prompt, 40, ignore_eos=True)
            toks, _, _ = await collect(req)
            assert toks == reference(prompt, 40)
            sent = req.spec.drafted
            assert sent > 0 and req.spec.accepted == sent
            learned = sum(d for d, _ in calls)
            assert learned > sent  # steps that held drafts back learned from the first of them
            assert all(a == d for d, a in calls)  # and counted it as right: it was

    run(main())
