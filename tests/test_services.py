"""The gRPC services on loopback: a real tokenizer, three nodes and a coordinator in-process.

Greedy output through the cluster equals the single-process engine; streaming is incremental;
caches are released after completion, cancel and disconnect; bad RPC input is INVALID_ARGUMENT
and the node keeps serving; bad configs and mismatched nodes are refused with named reasons.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from pipeserve.common.config import parse_config
from pipeserve.common.errors import ConfigError
from pipeserve.modeling.engine import StageEngine
from pipeserve.modeling.generate import generate
from pipeserve.node import codec
from pipeserve.node.node_server import NodeServer
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc
from pipeserve.proto import tokenizer_service_pb2 as tpb
from pipeserve.proto import tokenizer_service_pb2_grpc as tpb_grpc
from pipeserve.tokenizer.core import TokenizerCore
from pipeserve.tokenizer.tokenizer_server import TokenizerServer
from tests.harness import InProcessCluster, cluster_config, paced, start_cluster

EMBEDDED = "smollm2-135m-instruct"
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write one sentence about rain."]


@pytest.fixture(scope="module")
def cluster():
    c = start_cluster(EMBEDDED, parts=3)
    yield c
    c.stop()


def generate_rpc(address: str, req: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    with grpc.insecure_channel(address) as ch:
        return list(pb_grpc.CoordinatorStub(ch).Generate(req, timeout=120))


def chat_req(q: str, max_tokens: int = 32, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[tpb.ChatMessage(role="user", content=q)],
        max_tokens=max_tokens,
        sampling=pb.SamplingParams(temperature=0),
        **kw,
    )


def wait_caches_empty(c: InProcessCluster, timeout: float = 5.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        used = c.cache_used()
        if not any(used.values()):
            return used
        time.sleep(0.05)
    return c.cache_used()


def test_cluster_greedy_equals_single_process_engine(cluster, smol_full):
    tok = TokenizerCore.from_model(EMBEDDED)
    for q in QUESTIONS:
        msgs = generate_rpc(cluster.cfg.coordinator.address, chat_req(q, ignore_eos=True))
        got = [t for m in msgs for t in m.token_ids]
        prompt = tok.encode(
            tok.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False
        )
        ref = generate([StageEngine(smol_full)], [prompt], 32)[0]
        assert got == ref
        final = msgs[-1]
        assert final.finished and final.completion_tokens == 32
        assert final.finish_reason == pb.FINISH_REASON_LENGTH
        assert [r.node_id for r in final.route] == ["node1", "node2", "node3"]
        assert "".join(m.text for m in msgs) == tok.decode(got)


def test_streaming_is_incremental_and_text_is_right(cluster):
    msgs = generate_rpc(cluster.cfg.coordinator.address, chat_req("What is the capital of France?", 40))
    pieces = [m for m in msgs if not m.finished]
    assert len(pieces) >= 5 and all(len(m.token_ids) == 1 for m in pieces)
    text = "".join(m.text for m in msgs)
    assert "Paris" in text
    assert msgs[-1].finish_reason == pb.FINISH_REASON_STOP  # the model ends its answer with EOS
    assert msgs[-1].ttft_ms > 0 and len(msgs[-1].stage_timings) == 3


def test_stop_strings_cut_the_text(cluster):
    msgs = generate_rpc(
        cluster.cfg.coordinator.address, chat_req("What is the capital of France?", 40, stop=["Paris"])
    )
    text = "".join(m.text for m in msgs)
    assert "Paris" not in text and text.startswith("The capital")
    assert msgs[-1].finish_reason == pb.FINISH_REASON_STOP


def test_caches_released_after_completion_cancel_and_disconnect(cluster):
    addr = cluster.cfg.coordinator.address
    generate_rpc(addr, chat_req("Count to five.", 8))
    assert wait_caches_empty(cluster) == {"node1": 0, "node2": 0, "node3": 0}

    async def cancel_and_disconnect() -> None:
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            call = stub.Generate(
                chat_req("Tell me a long story about a dragon.", 200, request_id="cancel-me", ignore_eos=True)
            )
            n = 0
            async for _ in call:
                n += 1
                if n == 3:
                    assert (await stub.Cancel(pb.CancelRequest(request_id="cancel-me"))).found
            # the stream ends with a final CANCELLED message
            call2 = stub.Generate(chat_req("Tell me another long story.", 200, ignore_eos=True))
            n = 0
            async for _ in call2:
                n += 1
                if n == 3:
                    call2.cancel()  # the client goes away mid-stream
                    break

    # paced: each 200-token story takes >= 10 s, so only the cancel and the disconnect can free
    # the caches within wait_caches_empty's bound
    with paced(cluster.nodes[0]):
        asyncio.run(cancel_and_disconnect())
        assert wait_caches_empty(cluster) == {"node1": 0, "node2": 0, "node3": 0}


def test_bad_rpc_input_is_invalid_argument_and_node_keeps_serving(cluster):
    first, middle = cluster.cfg.nodes[0].address, cluster.cfg.nodes[1].address
    with grpc.insecure_channel(middle) as ch:
        stub = pb_grpc.ModelNodeStub(ch)
        chunk = pb.SequenceChunk(request_id="bad", start_pos=0, token_ids=[1, 2])
        cases = {
            "dtype DTYPE_UNSPECIFIED is not supported": pb.Tensor(
                data=b"\0" * 16 * 576, shape=[2, 576], dtype=pb.DTYPE_UNSPECIFIED
            ),
            "needs 4608 bytes": pb.Tensor(data=b"\0" * 12, shape=[2, 576], dtype=pb.DTYPE_FLOAT32),
            "[2, 576]": codec.encode_tensor(np.zeros((3, 576), np.float32)),
        }
        for expect, tensor in cases.items():
            with pytest.raises(grpc.RpcError) as err:
                stub.Forward(pb.ForwardRequest(chunks=[chunk], hidden=tensor), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert expect in err.value.details(), err.value.details()
    with grpc.insecure_channel(first) as ch:
        stub = pb_grpc.ModelNodeStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Forward(
                pb.ForwardRequest(chunks=[pb.SequenceChunk(request_id="ghost", start_pos=5, token_ids=[1])]),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ghost" in err.value.details()
        stub.Forward(
            pb.ForwardRequest(chunks=[pb.SequenceChunk(request_id="ooo", start_pos=0, token_ids=[1, 2, 3])]),
            timeout=10,
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.Forward(
                pb.ForwardRequest(chunks=[pb.SequenceChunk(request_id="ooo", start_pos=7, token_ids=[4])]),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "out of order" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Forward(pb.ForwardRequest(chunks=[]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty batch" in err.value.details()
        released = stub.Release(pb.ReleaseRequest(request_ids=["ooo"]), timeout=10)
        assert released.released[0].tokens_freed == 3
    # the cluster still serves
    msgs = generate_rpc(cluster.cfg.coordinator.address, chat_req("Say hi.", 4))
    assert msgs[-1].finished


def test_node_info_and_cluster_status(cluster):
    with grpc.insecure_channel(cluster.cfg.coordinator.address) as ch:
        st = pb_grpc.CoordinatorStub(ch).ClusterStatus(pb.ClusterStatusRequest(), timeout=5)
    assert st.ready and not st.problems and st.n_parts == 3 and st.n_layers == 30
    layers = [(n.info.layers.start_layer, n.info.layers.end_layer) for n in st.nodes]
    assert layers == [(0, 10), (10, 20), (20, 30)]
    assert len({n.info.model_checksum for n in st.nodes}) == 1
    assert st.tokenizer.vocab_size == 49152 and st.tokenizer.model_checksum == st.model_checksum
    with grpc.insecure_channel(cluster.cfg.tokenizer.address) as ch:
        tok = tpb_grpc.TokenizerStub(ch)
        ids = tok.Encode(tpb.EncodeRequest(text="héllo 👋 world"), timeout=5).token_ids
        assert tok.Decode(tpb.DecodeRequest(token_ids=ids), timeout=5).text == "héllo 👋 world"


def test_prompt_longer_than_context_is_invalid_argument(tiny_llama):
    c = start_cluster(str(tiny_llama), parts=2, max_context=32)
    try:
        req = pb.GenerateRequest(prompt_token_ids=list(range(3, 40)), max_tokens=4)
        with pytest.raises(grpc.RpcError) as err:
            generate_rpc(c.cfg.coordinator.address, req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "37" in err.value.details() and "32" in err.value.details()
        ok = generate_rpc(
            c.cfg.coordinator.address,
            pb.GenerateRequest(prompt_token_ids=[5, 6, 7], max_tokens=4, ignore_eos=True),
        )
        assert ok[-1].completion_tokens == 4
    finally:
        c.stop()


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        ([("a", "h:1", 0, None), ("b", "h:2", 2, None)], "no node serves part(s) [1]"),
        ([("a", "h:1", 0, [0, 3]), ("b", "h:2", 1, [4, 6])], "gap"),
        ([("a", "h:1", 0, [0, 4]), ("b", "h:2", 1, [3, 6])], "overlaps"),
        ([("a", "h:1", 0, None), ("b", "h:1", 1, None)], "nodes[1].address='h:1' repeats nodes[0].address"),
        ([("a", "h:1", 0, None), ("a", "h:2", 1, None)], "nodes[1].id='a' repeats"),
    ],
)
def test_bad_configs_are_refused_with_the_reason(nodes, message):
    raw = {
        "nodes": [
            {"id": i, "address": a, "model_part": p, **({"layers": ls} if ls else {})}
            for i, a, p, ls in nodes
        ]
    }
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert message in str(err.value)


def test_coordinator_refuses_a_node_holding_another_model(tiny_llama, tmp_path_factory):
    from tests.conftest import make_tiny_checkpoint

    other = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("other-llama"), seed=1)
    cfg = cluster_config(str(tiny_llama), parts=2)
    odd_cfg = cfg.model_copy(update={"model_name": str(other)})
    c = InProcessCluster(cfg, TokenizerServer(cfg), [NodeServer(cfg, "node1"), NodeServer(odd_cfg, "node2")])
    co = c.start(wait_ready=False).coordinator
    assert co is not None
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "node2 holds model" not in " ".join(co.cluster.problems):
            time.sleep(0.1)
        problems = " ".join(co.cluster.problems)
        assert not co.cluster.ready
        assert "part 1 has no healthy node" in problems and "node2 holds model other-llama" in problems
        from pipeserve.common.grpc_util import probe

        assert not probe(cfg.coordinator.address)  # health says NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            generate_rpc(cfg.coordinator.address, pb.GenerateRequest(prompt_token_ids=[5, 6], max_tokens=2))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "node2" in err.value.details()
    finally:
        c.stop()
