"""The chain data path on real gRPC servers (in process): steps go node to node, the coordinator
sees only token ids, failures come back naming the part and node. (Killing processes mid-stream
on the chain: tests/test_fault_tolerance.py, which runs on the default data path, the chain.)"""

from __future__ import annotations

import threading

import grpc
import pytest

from pipeserve.common.errors import InvalidInputError
from pipeserve.modeling.engine import StageEngine
from pipeserve.modeling.generate import generate
from pipeserve.node.node_server import ModelNodeServicer
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc
from tests.harness import start_cluster

EMBEDDED = "smollm2-135m-instruct"
PROMPTS = [[1, 2364, 314, 253, 6134, 288, 2], [1, 504, 3458, 282, 4052, 314], [1, 17, 18, 19, 20, 21, 22, 23]]


def greedy(ids: list[int], n: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt_token_ids=ids, max_tokens=n, sampling=pb.SamplingParams(temperature=0), ignore_eos=True
    )


def run_all(address: str, prompts: list[list[int]], n: int) -> list[list[pb.GenerateResponse]]:
    out: list[list[pb.GenerateResponse]] = [[] for _ in prompts]

    def one(i: int) -> None:
        with grpc.insecure_channel(address) as ch:
            out[i] = list(pb_grpc.CoordinatorStub(ch).Generate(greedy(prompts[i], n), timeout=120))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.fixture
def no_forward_rpc(monkeypatch):
    """The node's unary Forward RPC (one stage alone, for tools) is not the data path."""

    def refuse(self, request, context):  # type: ignore[no-untyped-def]
        raise AssertionError("Forward was called on the chain data path")

    monkeypatch.setattr(ModelNodeServicer, "Forward", refuse)


def test_chain_with_a_replicated_middle_part_equals_the_reference(smol_full, no_forward_rpc) -> None:
    c = start_cluster(EMBEDDED, 3, replicas={1: 2})
    try:
        outs = run_all(c.cfg.coordinator.address, PROMPTS * 2, 12)
        engine = StageEngine(smol_full)
        for ids, msgs in zip(PROMPTS * 2, outs, strict=True):
            assert [t for m in msgs for t in m.token_ids] == generate([engine], [ids], 12)[0]
            final = msgs[-1]
            assert [t.part for t in final.stage_timings] == [0, 1, 2]
            assert all(t.forward_ms > 0 and t.bytes_sent > 0 for t in final.stage_timings)
        steps = {n.node_id: n.servicer.chain.steps for n in c.nodes}  # type: ignore[union-attr]
        assert all(steps.values()), steps  # node1 fanned out to both replicas of part 1
        middle = {r.node_id for msgs in outs for r in msgs[-1].route if r.part == 1}
        assert middle == {"node2", "node2b"}
    finally:
        c.stop()


def test_hidden_states_travel_node_to_node_and_only_token_ids_reach_the_first(smol_full) -> None:
    """Per request, parts 1 and 2 receive every position's hidden state (fp32 on the wire, 576
    wide) and part 0 only token ids: the bytes per hop say which way the data went."""
    c = start_cluster(EMBEDDED, 3)
    try:
        msgs = run_all(c.cfg.coordinator.address, PROMPTS[:1], 10)[0]
    finally:
        c.stop()
    assert [t for m in msgs for t in m.token_ids] == generate([StageEngine(smol_full)], PROMPTS[:1], 10)[0]
    hidden_bytes = (len(PROMPTS[0]) + 10 - 1) * 576 * 4  # the prompt, then one position per step
    first, *later = msgs[-1].stage_timings
    assert 0 < first.bytes_sent < hidden_bytes / 10
    assert all(hidden_bytes <= t.bytes_sent < hidden_bytes * 1.5 for t in later), later


def test_a_failure_in_the_middle_of_the_chain_names_the_part_and_node() -> None:
    c = start_cluster(EMBEDDED, 3)
    try:
        node2 = next(n for n in c.nodes if n.node_id == "node2")
        assert node2.runner is not None
        real = node2.runner.forward

        def picky(chunks, hidden):  # type: ignore[no-untyped-def]
            if any(999 in ch.token_ids for ch in chunks):
                raise InvalidInputError("token 999 is not welcome here", param="prompt")
            return real(chunks, hidden)

        node2.runner.forward = picky  # type: ignore[method-assign]
        outs = []
        with grpc.insecure_channel(c.cfg.coordinator.address) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(greedy([1, 999, 5], 4), timeout=60))
            outs = list(stub.Generate(greedy(PROMPTS[0], 4), timeout=60))  # the node still serves
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "node node2 (part 1)" in e.value.details() and "not welcome" in e.value.details()  # type: ignore[attr-defined]
        assert len([t for m in outs for t in m.token_ids]) == 4
    finally:
        c.stop()
