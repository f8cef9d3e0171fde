"""The node's chain worker (src/node/chain.py) without gRPC: real StageRunners on a tiny Llama
split in 3, wired by in-memory links; the last worker's reports are collected. Checks the step
path (hidden rows cut per next node, tokens equal to the whole model), the fan-out over replicas,
and that every failure is reported naming the part and node where it happened."""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any

import pytest

from pipeserve.common import wire
from pipeserve.common.errors import InvalidInputError
from pipeserve.common.sampling_params import SamplingParams
from pipeserve.modeling.engine import StageEngine
from pipeserve.modeling.generate import generate
from pipeserve.modeling.loader import load_stage
from pipeserve.node.chain import ChainWorker
from pipeserve.node.runner import StageRunner
from pipeserve.proto import model_service_pb2 as pb

SPLITS = [(0, 2), (2, 4), (4, 6)]  # the tiny Llama has 6 layers
GREEDY = SamplingParams(temperature=0.0)


class MemLink:
    """An in-memory link: `send` hands the step to the next worker (or fails, when told to)."""

    def __init__(self, hop: pb.RouteHop, workers: dict[str, ChainWorker], down: set[str]) -> None:
        self.hop, self.workers, self.down = hop, workers, down
        self.broken = False

    def send(self, msg: pb.ChainStep) -> None:
        if self.hop.node_id in self.down:
            raise ConnectionError(f"connection to {self.hop.address} refused")
        self.workers[self.hop.node_id].submit(msg)

    def close(self) -> None:
        pass


@pytest.fixture
def chain(tiny_llama) -> Any:
    """Workers n0 (part 0), n1 and n1b (part 1, replicas), n2 (part 2); reports go to one queue."""
    reports: queue.Queue[tuple[str, str, pb.StepResult]] = queue.Queue()
    workers: dict[str, ChainWorker] = {}
    down: set[str] = set()
    runners = []
    for node_id, part in (("n0", 0), ("n1", 1), ("n1b", 1), ("n2", 2)):
        runner = StageRunner(node_id, part, load_stage(str(tiny_llama), SPLITS[part]), 4096, 600)
        runners.append(runner)

        def report(cid: str, res: pb.StepResult, me: str = node_id) -> None:
            reports.put((me, cid, res))

        def link_to(hop: pb.RouteHop, on_broken: Callable) -> MemLink:
            return MemLink(hop, workers, down)

        workers[node_id] = ChainWorker(runner, node_id, None, report, link_to)
    yield workers, reports, down, tiny_llama
    for w in workers.values():
        w.stop()
    for r in runners:
        r.close()


def route(middle: str) -> list[pb.RouteHop]:
    return [pb.RouteHop(part=p, node_id=n, address=f"{n}:1") for p, n in enumerate(["n0", middle, "n2"])]


def step(step_id: str, seqs: list[tuple[str, int, list[int], bool, str]]) -> pb.ChainStep:
    """seqs: (request id, start, tokens, sample, middle node)."""
    msg = pb.ChainStep(step_id=step_id, coordinator_id="c", part=0, output_dtype=pb.DTYPE_FLOAT32)
    for rid, start, toks, sample, middle in seqs:
        msg.chunks.append(
            pb.SequenceChunk(
                request_id=rid,
                start_pos=start,
                token_ids=toks,
                sample=sample,
                sampling=wire.sampling_to_pb(GREEDY) if sample else None,
            )
        )
        msg.routes.append(pb.ChainRoute(request_id=rid, hops=route(middle)))
    return msg


def collect(reports: queue.Queue, step_id: str, n_requests: int) -> dict[str, tuple[str, pb.StepResult]]:
    """request id -> (reporting node, result) for one step."""
    out: dict[str, tuple[str, pb.StepResult]] = {}
    while len(out) < n_requests:
        me, _, res = reports.get(timeout=30)
        if res.step_id == step_id:
            out.update((rid, (me, res)) for rid in res.request_ids)
    return out


def test_steps_down_the_chain_equal_the_whole_model_with_fan_out(chain) -> None:
    workers, reports, _, model = chain
    prompts = {"a": [5, 6, 7, 8], "b": [9, 10, 11], "c": [12, 13, 14, 15, 16]}
    middle = {"a": "n1", "b": "n1b", "c": "n1"}
    toks = {rid: list(p) for rid, p in prompts.items()}
    done = {rid: 0 for rid in prompts}
    for i in range(6):
        sid = f"s{i}"
        workers["n0"].submit(
            step(sid, [(rid, done[rid], toks[rid][done[rid] :], True, middle[rid]) for rid in prompts])
        )
        out = collect(reports, sid, len(prompts))
        for rid in prompts:
            me, res = out[rid]
            assert me == "n2" and not res.failed
            assert [t.part for t in res.timings] == [0, 1, 2] and res.timings[1].node_id == middle[rid]
            done[rid] = len(toks[rid])
            toks[rid].append(next(t.token_id for t in res.tokens if t.request_id == rid))
    whole = StageEngine(load_stage(str(model)))
    for rid, p in prompts.items():
        assert toks[rid][len(p) :] == generate([whole], [p], 6)[0]
    assert workers["n1"].steps == 6 and workers["n1b"].steps == 6  # both replicas got their rows


def test_a_failure_is_reported_where_it_happened(chain) -> None:
    workers, reports, down, _ = chain
    # the stage's own error (a bad batch): reported by n1, as data (reason, message, param)
    real = workers["n1"].runner.forward

    def picky(chunks, hidden):  # type: ignore[no-untyped-def]
        if any(c.request_id == "bad" for c in chunks):
            raise InvalidInputError("no thanks", param="prompt")
        return real(chunks, hidden)

    workers["n1"].runner.forward = picky  # type: ignore[method-assign]
    workers["n0"].submit(step("f1", [("bad", 0, [5, 6], True, "n1"), ("ok", 0, [7, 8], True, "n1b")]))
    out = collect(reports, "f1", 2)
    me, res = out["bad"]
    assert (me, res.failed, res.failed_part, res.failed_node) == ("n1", True, 1, "n1")
    assert (res.error.reason, res.error.message, res.error.param) == (
        "invalid_parameter",
        "no thanks",
        "prompt",
    )
    assert out["ok"][0] == "n2" and not out["ok"][1].failed  # the replica's share went on
    # the next node unreachable: reported by the sender, naming the next node and part
    down.add("n2")
    workers["n0"].submit(step("f2", [("x", 0, [5, 6], True, "n1")]))
    me, res = collect(reports, "f2", 1)["x"]
    assert (me, res.failed_part, res.failed_node) == ("n1", 2, "n2")
    assert res.error.reason == "stage_unavailable" and "n2:1 is unreachable" in res.error.message
