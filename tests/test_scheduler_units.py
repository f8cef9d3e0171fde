"""Unit tests of the coordinator's scheduling modules, without gRPC servers or model weights.

The pure policies (planner, output, failover, admission) are tested on plain Request objects; the
Scheduler itself runs over `tests/fake_stages.py` (in-process stages with the real KV block pool
and a toy model whose every answer depends on all earlier tokens), so continuous batching,
preemption, failover, culprit isolation and queue bounds are checked in milliseconds, and every
output is compared with the toy model run alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from pipeserve.common.errors import (
    CacheBudgetError,
    ContextLengthError,
    DeadlineError,
    InvalidInputError,
    PipeserveError,
    QueueFullError,
    Reason,
    ServiceUnavailableError,
    StageUnavailableError,
    UnknownRequestError,
)
from pipeserve.coordinator import admission, output
from pipeserve.coordinator.cluster import Cluster
from pipeserve.coordinator.failover import Failure, classify, failovers_exhausted, preemption_victim
from pipeserve.coordinator.planner import plan_step
from pipeserve.coordinator.requests import ErrorEvent, FinalEvent, Request, TokenEvent
from pipeserve.coordinator.scheduler import Scheduler
from pipeserve.modeling.sampling import SamplingParams
from tests.fake_stages import EOS, FakePath, FakeStage, FakeTokenizer, fake_cluster_config, reference, word

GREEDY = SamplingParams(temperature=0.0)


def req(rid: str, n_prompt: int, n_computed: int = 0, arrival: float = 0.0, **kw: Any) -> Request:
    r = Request(rid, list(range(2, 2 + n_prompt)), kw.pop("max_tokens", 8), GREEDY, kw.pop("stop", []), set())
    r.tokens = list(r.prompt_ids) + kw.pop("generated", [])
    r.n_computed, r.arrival = n_computed, arrival
    for k, v in kw.items():
        setattr(r, k, v)
    return r


# ---- planner ------------------------------------------------------------------------------------
def test_plan_puts_decodes_first_and_cuts_prefill_to_the_chunk_size() -> None:
    long_prompt = req("p", 1000, arrival=0.0)
    decode = req("d", 10, n_computed=10, arrival=5.0, generated=[7])  # 1 token left: a decode
    plan = plan_step([long_prompt, decode], max_batch_tokens=512, prefill_chunk_tokens=64)
    assert [(r.id, s, n) for r, s, n in plan] == [("d", 11 - 1, 1), ("p", 0, 64)]
    alone = plan_step([long_prompt], max_batch_tokens=512, prefill_chunk_tokens=64)
    assert [(r.id, s, n) for r, s, n in alone] == [("p", 0, 512)]  # no decode waiting: a big chunk


def test_plan_is_first_come_first_served_within_the_batch_budget() -> None:
    a, b, c = req("a", 300, arrival=1.0), req("b", 300, arrival=2.0), req("c", 300, arrival=3.0)
    plan = plan_step([c, b, a], max_batch_tokens=512, prefill_chunk_tokens=64)
    assert [(r.id, n) for r, _, n in plan] == [("a", 300), ("b", 212)]


def test_plan_runs_one_suspect_at_a_time_and_skips_stopping_and_unroutable() -> None:
    s1, s2 = req("s1", 4, suspect=True, arrival=1.0), req("s2", 4, suspect=True, arrival=2.0)
    ok = req("ok", 4, arrival=0.0)
    assert [r.id for r, _, _ in plan_step([s1, s2, ok], 512, 64)] == ["s2"]
    stopping = req("x", 4, stopping=True)
    asked: list[str] = []

    def routable(r: Request) -> bool:
        asked.append(r.id)
        return r.id != "ok"

    assert plan_step([stopping, ok], 512, 64, routable) == []
    assert asked == ["ok"]  # a stopping request is not even routed


# ---- output -------------------------------------------------------------------------------------
def test_stop_reason_is_stop_id_then_length() -> None:
    r = req("r", 3, max_tokens=2)
    r.stop_ids = {9}
    r.tokens += [5]
    assert output.stop_reason(r, len(r.tokens)) is None
    r.tokens += [9]
    assert output.stop_reason(r, len(r.tokens)) == "stop"
    r.tokens[-1] = 6
    assert output.stop_reason(r, len(r.tokens)) == "length"
    assert output.stop_reason(r, len(r.prompt_ids)) is None  # the prompt's own last token never stops it


def test_stop_string_split_over_pieces_is_held_back_then_cut() -> None:
    r = req("r", 3, max_tokens=100, stop=["END"])
    pieces = []
    for i, text in enumerate(["hello E", "N", "D and more"]):
        r.tokens.append(10 + i)
        piece, reason = output.take_text(r, text, len(r.tokens))
        pieces.append((piece, reason))
    assert pieces == [("hello ", None), ("", None), ("", "stop")]
    assert output.final_tail(r, "stop") == ""
    r2 = req("r2", 3, max_tokens=100, stop=["END"])
    r2.tokens.append(10)
    assert output.take_text(r2, "to be E", len(r2.tokens)) == ("to be ", None)
    assert output.final_tail(r2, "length") == "E"  # held back text goes out at the end
    assert output.final_tail(r2, "cancelled") == ""


# ---- failover -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("err", "kind"),
    [
        (StageUnavailableError("the link to node n2 broke"), Failure.NODE_DOWN),
        (ServiceUnavailableError("the node n2 at x:1 is unreachable"), Failure.NODE_DOWN),
        (DeadlineError("no answer in time"), Failure.NODE_DOWN),
        (PipeserveError("ValueError: a bug"), Failure.BUG),
        (PipeserveError("odd answer", reason=Reason.UPSTREAM_ERROR), Failure.BUG),
        (CacheBudgetError("KV cache full"), Failure.CACHE_FULL),
        (UnknownRequestError("no cache for request 'r'"), Failure.LOST_CACHE),
        (InvalidInputError("bad positions", param="prompt"), Failure.REJECTED),
        (ContextLengthError("too long"), Failure.REJECTED),
    ],
)
def test_classify_by_reason(err: PipeserveError, kind: Failure) -> None:
    assert classify(err) is kind


def test_preemption_victim_is_the_youngest_live_request() -> None:
    old, young = req("old", 4, admitted_at=1.0), req("young", 4, admitted_at=2.0)
    done = req("done", 4, admitted_at=3.0, finish_reason="stop")
    assert preemption_victim([old, young, done]) is young
    assert preemption_victim([old, done]) is None  # preempting the only one makes no room
    r = req("r", 4)
    r.failovers = 4
    assert not failovers_exhausted(r, max_retries=2, n_parts=2)
    r.failovers = 5
    assert failovers_exhausted(r, max_retries=2, n_parts=2)


# ---- admission ----------------------------------------------------------------------------------
def test_check_request_names_the_numbers() -> None:
    assert admission.check_request([1, 2, 3], 0, context=10, vocab=64, part_budgets=[100]) == 7
    with pytest.raises(InvalidInputError, match=r"max_tokens=8 is more than the 7 tokens .* 3-token prompt"):
        admission.check_request([1, 2, 3], 8, context=10, vocab=64, part_budgets=[100])
    with pytest.raises(ContextLengthError, match="the prompt has 10 tokens but the context length is 10"):
        admission.check_request(list(range(10)), 1, context=10, vocab=64, part_budgets=[])
    with pytest.raises(InvalidInputError, match=r"token id 70 is outside the vocabulary \[0, 64\)") as e:
        admission.check_request([1, 70], 1, context=10, vocab=64, part_budgets=[])
    assert e.value.param == "prompt"
    with pytest.raises(ContextLengthError, match="can never fit part 1's KV-cache budget of 32") as e2:
        admission.check_request(list(range(30)), 5, context=100, vocab=64, part_budgets=[64, 32])
    assert e2.value.part == 1 and e2.value.param == "max_tokens"
    with pytest.raises(InvalidInputError, match="empty"):
        admission.check_request([], 1, context=10, vocab=64, part_budgets=[])


def test_retry_after_follows_the_measured_rate() -> None:
    meter = admission.RateMeter()
    assert meter.rate(now=10.0) == 0.0
    for i in range(11):
        meter.add(10, now=10.0 + i * 0.1)  # 100 tokens/s
    rate = meter.rate(now=11.0)
    assert rate == pytest.approx(110 / 1.0)
    assert admission.retry_after(0.0, 100, 1, 1) == 2.0  # nothing measured yet
    # 4 requests with 400 tokens left share 110 tok/s over 4 running: ~3.6 s each
    assert admission.retry_after(rate, 1600, 4, 4) == pytest.approx(400 / (110 / 4))
    assert admission.retry_after(rate, 10**9, 1, 1) == 60.0 and admission.retry_after(rate, 1, 1, 1) == 1.0
    assert admission.blocks(1) == 16 and admission.blocks(16) == 16 and admission.blocks(17) == 32


# ---- the Scheduler over fake stages -------------------------------------------------------------
class FakeCluster:
    def __init__(
        self, parts: int = 2, replicas: dict[int, int] | None = None, stage: Any = None, **coord: Any
    ):
        self.cfg = fake_cluster_config(parts, replicas, **coord)
        kw = stage or {}
        self.stages = {
            n.id: FakeStage(n.id, n.model_part, parts, **kw.get(n.id, kw.get("*", {})))
            for n in self.cfg.nodes
        }
        by_address = {n.address: self.stages[n.id] for n in self.cfg.nodes}
        self.tokenizer = FakeTokenizer()
        self.cluster = Cluster(self.cfg, node_client=by_address.__getitem__, tokenizer=self.tokenizer)  # type: ignore[arg-type]
        self.scheduler = Scheduler(self.cfg, self.cluster, FakePath(self.stages))
        self._watch: asyncio.Task | None = None
        self._n = 0

    async def __aenter__(self) -> FakeCluster:
        await self.cluster.refresh()
        assert self.cluster.ready, self.cluster.problems
        self.scheduler.eos_ids = {EOS}
        self.scheduler.start()
        self._watch = asyncio.create_task(self._watch_loop())
        return self

    async def _watch_loop(self) -> None:  # what CoordinatorServer._watch does
        while True:
            await self.cluster.refresh()
            await self.scheduler.expire_waiting()
            await asyncio.sleep(self.cfg.coordinator.health_interval_s)

    async def __aexit__(self, *exc: object) -> None:
        assert self._watch is not None
        self._watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watch
        await self.scheduler.stop()

    def submit(self, prompt: list[int], max_tokens: int, **kw: Any) -> Request:
        self._n += 1
        return self.scheduler.submit(
            kw.pop("rid", f"r{self._n}"),
            prompt,
            max_tokens,
            GREEDY,
            kw.pop("stop", []),
            kw.pop("stop_ids", []),
            kw.pop("ignore_eos", False),
        )

    async def settle(self, timeout_s: float = 5.0) -> None:
        """Wait until every release reached the stages (they are sent in the background)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while any(s.pool.seqs for s in self.stages.values() if not s.down):
            assert asyncio.get_running_loop().time() < deadline, {
                i: list(s.pool.seqs) for i, s in self.stages.items()
            }
            await asyncio.sleep(0.01)
        for s in self.stages.values():
            s.pool.check()


async def collect(r: Request, timeout_s: float = 20.0) -> tuple[list[int], str, str]:
    """(tokens, text, finish reason or 'error: <reason>') of a request's stream."""
    toks, text = [], ""
    while True:
        ev = await asyncio.wait_for(r.events.get(), timeout_s)
        if isinstance(ev, TokenEvent):
            toks += ev.token_ids
            text += ev.text
        elif isinstance(ev, FinalEvent):
            return toks, text + ev.text, ev.finish_reason
        else:
            assert isinstance(ev, ErrorEvent)
            return toks, text, f"error: {ev.error.reason.value}: {ev.error.message}"


def prompt_of(i: int, n: int) -> list[int]:
    return [2 + (i * 7 + j * 3) % 60 for j in range(n)]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_continuous_batch_equals_each_request_alone() -> None:
    async def main() -> None:
        async with FakeCluster(parts=3, max_batch_tokens=64, prefill_chunk_tokens=16) as fc:
            prompts = [prompt_of(i, 5 + 9 * i) for i in range(10)]
            reqs = [fc.submit(p, 12 + i) for i, p in enumerate(prompts)]
            outs = await asyncio.gather(*(collect(r) for r in reqs))
            for i, (toks, text, reason) in enumerate(outs):
                assert reason == "length" and toks == reference(prompts[i], 12 + i)
                assert text == "".join(map(word, toks))
            assert max(s.max_batch for s in fc.stages.values()) > 1  # they really were batched
            await fc.settle()

    run(main())


def test_eos_stops_and_stop_strings_cut_the_text() -> None:
    async def main() -> None:
        async with FakeCluster() as fc:
            p = prompt_of(1, 6)
            ref = reference(p, 10)
            r = fc.submit(p, 10, stop_ids=[ref[3]])
            toks, _, reason = await collect(r)
            assert (toks, reason) == (ref[:4], "stop")
            r = fc.submit(p, 10, stop=[word(ref[5])])
            toks, text, reason = await collect(r)
            assert reason == "stop" and text == "".join(map(word, ref[:5]))
            await fc.settle()

    run(main())


def test_a_token_the_tokenizer_cannot_decode_fails_its_request_alone() -> None:
    """In-process detokenization gives a per-request error (e.g. a padded head row the model
    sampled): that request fails naming the id, the others of its step complete, and the
    tokenizer stays healthy (nothing was wrong with it)."""

    async def main() -> None:
        async with FakeCluster() as fc:
            bad_p, good_p = prompt_of(1, 6), prompt_of(8, 6)
            bad = reference(bad_p, 10)[4]
            assert bad not in reference(good_p, 10) + reference(bad_p, 4)
            fc.tokenizer.bad_ids = {bad}
            r1, r2 = fc.submit(bad_p, 10), fc.submit(good_p, 10)
            (toks1, _, reason1), (toks2, _, reason2) = await asyncio.gather(collect(r1), collect(r2))
            assert reason1.startswith("error: internal: the model generated a token the tokenizer cannot")
            assert f"token id {bad} is outside" in reason1 and toks1 == reference(bad_p, 4)
            assert (toks2, reason2) == (reference(good_p, 10), "length")
            assert fc.cluster.tokenizer_healthy
            await fc.settle()

    run(main())


def test_preemption_when_a_stage_runs_out_of_blocks_completes_everyone_exactly() -> None:
    async def main() -> None:
        # 8 blocks of 16 on part 1: four requests of 20 + 40 tokens need 16 blocks at the end
        async with FakeCluster(stage={"node2": {"budget_tokens": 128}}) as fc:
            prompts = [prompt_of(i, 20) for i in range(4)]
            reqs = [fc.submit(p, 40) for p in prompts]
            outs = await asyncio.gather(*(collect(r) for r in reqs))
            for p, (toks, _, reason) in zip(prompts, outs, strict=True):
                assert reason == "length" and toks == reference(p, 40)
            assert (
                fc.scheduler.preemptions > 0 and sum(r.preemptions for r in reqs) == fc.scheduler.preemptions
            )
            await fc.settle()

    run(main())


def test_a_request_that_makes_a_node_fail_fails_alone() -> None:
    async def main() -> None:
        async with FakeCluster() as fc:
            fc.stages["node2"].poison = {63}
            good = [fc.submit(prompt_of(i, 8), 10) for i in range(3)]
            bad = fc.submit([5, 6, 63, 7], 10)
            outs = await asyncio.gather(*(collect(r) for r in [*good, bad]))
            for i, (toks, _, reason) in enumerate(outs[:3]):
                assert reason == "length" and toks == reference(prompt_of(i, 8), 10)
            assert (
                outs[3][2].startswith("error: ") and "node node2 (part 1) failed this request" in outs[3][2]
            )
            assert all(n.healthy for n in fc.cluster.nodes)
            await fc.settle()

    run(main())


def test_failover_to_a_replica_mid_generation_gives_the_same_tokens() -> None:
    async def main() -> None:
        async with FakeCluster(replicas={1: 2}, stage={"*": {}}) as fc:
            for s in fc.stages.values():
                s.delay_s = 0.002
            prompts = [prompt_of(i, 10) for i in range(6)]
            reqs = [fc.submit(p, 30) for p in prompts]
            while min(len(r.generated) for r in reqs) < 5:
                await asyncio.sleep(0.005)
            victim = next(n for n in fc.cluster.nodes if n.part == 1 and n.running)
            fc.stages[victim.id].down = True
            outs = await asyncio.gather(*(collect(r) for r in reqs))
            for p, (toks, _, reason) in zip(prompts, outs, strict=True):
                assert reason == "length" and toks == reference(p, 30)
            assert not victim.healthy and victim.failures == 1
            assert sum(r.failovers for r in reqs) > 0

    run(main())


def test_a_node_back_from_a_failure_waits_its_backoff_while_a_replica_serves() -> None:
    async def main() -> None:
        async with FakeCluster(replicas={1: 2}, stage={"*": {}}) as fc:
            node2, node2b = (n for n in fc.cluster.nodes if n.part == 1)
            fc.stages[node2.id].down = True
            await fc.cluster.refresh()
            assert not node2.healthy and node2.failures == 1 and node2.backoff_s > 0
            fc.stages[node2.id].down = False  # it answers again within its 1 s backoff
            await fc.cluster.refresh()
            assert not node2.healthy and "trusted in" in node2.error and node2b.healthy
            before = fc.stages[node2.id].forwards
            toks, _, reason = await collect(fc.submit(prompt_of(1, 8), 6))
            assert reason == "length" and toks == reference(prompt_of(1, 8), 6)
            assert fc.stages[node2.id].forwards == before  # the replica took it

    run(main())


def test_the_last_node_of_a_part_is_trusted_early_rather_than_failing_its_requests() -> None:
    """node2 answers again but is in its backoff (or banned as flapping) when node2b, the part's
    other node, dies: node2 is trusted at once, and requests are served instead of failing."""

    async def main() -> None:
        async with FakeCluster(replicas={1: 2}, stage={"*": {}}) as fc:
            node2, node2b = (n for n in fc.cluster.nodes if n.part == 1)
            for _ in range(3):  # three downs within a minute: banned for 60 s as flapping
                fc.stages[node2.id].down = True
                await fc.cluster.refresh()
                fc.stages[node2.id].down = False
                node2.trust_after = 0.0  # skip the short backoff, so it is healthy in between
                await fc.cluster.refresh()
            assert not node2.healthy and "banned" in node2.error and node2.backoff_s > 50
            assert fc.cluster.ready  # node2b serves part 1
            fc.stages[node2b.id].down = True
            await fc.cluster.refresh()
            assert not node2b.healthy and node2.healthy and fc.cluster.ready, fc.cluster.problems
            toks, _, reason = await collect(fc.submit(prompt_of(2, 8), 6))
            assert reason == "length" and toks == reference(prompt_of(2, 8), 6)

    run(main())


def test_a_stage_that_lost_its_caches_gets_them_replayed() -> None:
    async def main() -> None:
        async with FakeCluster() as fc:
            fc.stages["node1"].delay_s = 0.002
            prompts = [prompt_of(i, 12) for i in range(3)]
            reqs = [fc.submit(p, 25) for p in prompts]
            while min(len(r.generated) for r in reqs) < 5:
                await asyncio.sleep(0.005)
            fc.stages["node2"].restart()
            outs = await asyncio.gather(*(collect(r) for r in reqs))
            for p, (toks, _, reason) in zip(prompts, outs, strict=True):
                assert reason == "length" and toks == reference(p, 25)
            await fc.settle()

    run(main())


def test_the_queue_is_bounded_and_says_when_to_retry() -> None:
    async def main() -> None:
        async with FakeCluster(max_running=2, max_waiting=2) as fc:
            for s in fc.stages.values():
                s.delay_s = 0.005
            accepted, refused = [], []
            for i in range(7):
                try:
                    accepted.append(fc.submit(prompt_of(i, 4), 8))
                except QueueFullError as exc:
                    refused.append(exc)
            assert len(accepted) == 4 and len(refused) == 3
            assert all(
                e.reason is Reason.QUEUE_FULL and e.retry_after_s and e.retry_after_s >= 1 for e in refused
            )
            outs = await asyncio.gather(*(collect(r) for r in accepted))
            assert [o[2] for o in outs] == ["length"] * 4
            await fc.settle()

    run(main())


def test_the_queue_bound_holds_when_kv_blocks_block_admission() -> None:
    async def main() -> None:
        # 2 blocks on part 0: one 20-token prompt fills it, the batch has room for 8
        async with FakeCluster(max_running=8, max_waiting=1, stage={"node1": {"budget_tokens": 32}}) as fc:
            fc.stages["node1"].delay_s = 0.005
            first = fc.submit(prompt_of(0, 20), 8)
            second = fc.submit(prompt_of(1, 20), 8)  # waits: no blocks
            with pytest.raises(QueueFullError):
                fc.submit(prompt_of(2, 20), 8)
            assert second.group < 0 and first.group >= 0
            outs = await asyncio.gather(collect(first), collect(second))
            assert [o[0] for o in outs] == [reference(prompt_of(i, 20), 8) for i in range(2)]
            await fc.settle()

    run(main())


def test_cancel_mid_stream_frees_every_stage() -> None:
    async def main() -> None:
        async with FakeCluster(parts=3) as fc:
            for s in fc.stages.values():
                s.delay_s = 0.002
            r = fc.submit(prompt_of(0, 10), 200)
            other = fc.submit(prompt_of(1, 10), 20)
            while len(r.generated) < 3:
                await asyncio.sleep(0.005)
            assert fc.scheduler.cancel(r.id)
            toks, _, reason = await collect(r)
            assert reason == "cancelled" and 3 <= len(toks) < 200
            assert (await collect(other))[0] == reference(prompt_of(1, 10), 20)
            await fc.settle()
            assert not fc.scheduler.requests and fc.scheduler.running == 0

    run(main())


def test_shared_prefix_starts_on_cached_blocks_of_every_stage() -> None:
    async def main() -> None:
        async with FakeCluster(parts=3) as fc:
            system = prompt_of(9, 48)  # three full blocks
            a = await collect(fc.submit([*system, 5, 6], 6))
            r = fc.submit([*system, 7, 8, 9], 6)
            b = await collect(r)
            assert a[0] == reference([*system, 5, 6], 6) and b[0] == reference([*system, 7, 8, 9], 6)
            assert r.cached_tokens == 48 and fc.scheduler.prefix_hit_tokens == 48
            assert all(s.pool.hit_tokens == 48 for s in fc.stages.values())
            await fc.settle()

    run(main())


def test_a_request_preempted_while_its_prefix_lookup_is_in_flight_still_completes() -> None:
    """Another group's step may preempt a request while its LookupPrefix calls are out (seen in
    tests/test_scheduler.py::test_preemption_instead_of_failure: the group's step crashed on the
    emptied route, failing the request, and the hits of the requests after it were misread).
    Here the stage preempts the first request as its lookup arrives: both requests still finish
    with their exact tokens, and the preempted one looks up again when it is re-admitted."""

    async def main() -> None:
        async with FakeCluster(parts=2, micro_batches=1) as fc:  # a and b in one group
            system = prompt_of(9, 32)  # two full blocks, cached by a first request
            await collect(fc.submit([*system, 1], 4))
            a = fc.submit([*system, 5, 6], 6)
            b = fc.submit([*system, 7, 8, 9], 6)
            hit: list[str] = []

            def preempt_a_once(rid: str) -> None:
                if rid == a.id and not hit:
                    hit.append(rid)
                    fc.scheduler._preempt(a)
                    # keep it out of admission until its group has read the lookups' answers
                    fc.scheduler.waiting.remove(a)
                    asyncio.get_running_loop().call_later(0.1, fc.scheduler.waiting.appendleft, a)

            fc.stages["node2"].on_lookup = preempt_a_once
            outs = await asyncio.gather(collect(a), collect(b))
            assert hit == [a.id] and a.preemptions == 1
            assert outs[0] == (reference([*system, 5, 6], 6), outs[0][1], "length")
            assert outs[1][0] == reference([*system, 7, 8, 9], 6) and outs[1][2] == "length"
            assert b.cached_tokens == 32 and a.cached_tokens == 32  # a's second lookup hit too
            await fc.settle()

    run(main())


def test_a_request_admitted_while_lookups_are_in_flight_is_looked_up_before_it_prefills() -> None:
    """A burst: b arrives while a's LookupPrefix calls are out. The step must look b up too before
    planning (it was planned from position 0 and recomputed its cached prompt: seen as a 16-stream
    burst's latecomers prefilling whole prompts that every stage held)."""

    async def main() -> None:
        async with FakeCluster(parts=2, micro_batches=1) as fc:
            system = prompt_of(9, 32)  # two full blocks, cached by a first request
            await collect(fc.submit([*system, 1], 4))
            a = fc.submit([*system, 5, 6], 6)
            late: list[Any] = []

            def admit_b_once(rid: str) -> None:
                if rid == a.id and not late:
                    late.append(fc.submit([*system, 7, 8, 9], 6))

            fc.stages["node1"].on_lookup = admit_b_once
            outs = await collect(a)
            (b,) = late
            outb = await collect(b)
            assert outs[0] == reference([*system, 5, 6], 6) and outb[0] == reference([*system, 7, 8, 9], 6)
            assert a.cached_tokens == 32 and b.cached_tokens == 32
            await fc.settle()

    run(main())


def test_orphan_caches_are_released_after_a_coordinator_restart() -> None:
    async def main() -> None:
        async with FakeCluster() as fc:
            stage = fc.stages["node2"]
            await stage.lookup_prefix("left-by-a-dead-coordinator", [3, 4, 5])
            assert "left-by-a-dead-coordinator" in stage.pool.seqs
            await fc.settle()  # the next health check releases it

    run(main())


def test_a_sliding_window_part_serves_sequences_longer_than_its_budget() -> None:
    """Part 1's node frees the blocks behind a 16-position window (as a Mistral-style share does)
    and holds at most the window + one 16-token step + a block (48 positions) per sequence: two
    90-token sequences complete on its 64-position pool (without the window such a request is
    refused at submit); the other part holds them whole."""

    async def main() -> None:
        stage = {"node2": {"budget_tokens": 64, "window": 16}}
        async with FakeCluster(stage=stage, max_batch_tokens=16) as fc:
            node = next(n for n in fc.cluster.nodes if n.id == "node2")
            assert node.holds(90) == 48 and node.holds(20) == 32
            assert fc.cluster.max_budget(1) == 0 and fc.cluster.max_budget(0) == 4096
            prompts = [prompt_of(i, 40) for i in range(2)]
            outs = await asyncio.gather(*(collect(fc.submit(p, 50, ignore_eos=True)) for p in prompts))
            for p, (toks, _, reason) in zip(prompts, outs, strict=True):
                assert reason == "length" and toks == reference(p, 50)
            await fc.settle()
            assert fc.stages["node2"].pool.hit_tokens == 0 and fc.stages["node2"].pool.used_blocks == 0
        async with FakeCluster(stage={"node2": {"budget_tokens": 64}}, max_batch_tokens=16) as fc:
            with pytest.raises(ContextLengthError, match="part 1's KV-cache budget of 64"):
                fc.submit(prompt_of(0, 40), 50)

    run(main())


def test_a_prompt_the_budget_can_never_hold_is_refused_at_submit() -> None:
    async def main() -> None:
        async with FakeCluster(stage={"node2": {"budget_tokens": 64}}) as fc:
            with pytest.raises(ContextLengthError, match="part 1's KV-cache budget of 64"):
                fc.submit(prompt_of(0, 40), 30)
            assert not fc.scheduler.requests and not fc.scheduler.waiting

    run(main())
