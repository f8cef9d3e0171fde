"""KV cache element types (node `kv_dtype`: f32, f16, bf16; issue 27): the pool's arrays and bytes,
the engine's output against the f32 cache on SmolLM2 (logits close, greedy agreement measured;
prefix reuse and eviction within each type: tests/test_kv_cache.py), a 3-node cluster with f16 caches equal to one engine with f16, and the config refusing what is
not implemented, naming the key and the value."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from pipeserve.common.config import parse_config
from pipeserve.common.errors import ConfigError
from pipeserve.modeling.engine import SeqChunk, StageEngine
from pipeserve.modeling.generate import GREEDY, generate
from pipeserve.modeling.kv_cache import KVCachePool, kv_token_layer_bytes
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc
from tests.engine_torch import run_stages
from tests.harness import start_cluster

EMBEDDED = "smollm2-135m-instruct"
PROMPTS = [
    [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 30, 1345, 28, 31, 1345, 28, 32],
    list(range(200, 260)),
    [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712],
]


def test_pool_arrays_and_bytes_follow_the_type():
    for name, dt, item in (("f32", np.float32, 4), ("f16", np.float16, 2), ("bf16", np.uint16, 2)):
        p = KVCachePool(2, 3, 64, 64, 1000, kv_dtype=name)
        assert p.k.dtype == dt and p.v.dtype == dt and p.kv_dtype == name
        assert p.block_bytes == 2 * 3 * 16 * 64 * item
        assert kv_token_layer_bytes(3, 64, name) == 2 * 3 * 64 * item
    with pytest.raises(ValueError, match="kv_dtype 'q8_0'"):
        KVCachePool(2, 3, 64, 64, 1000, kv_dtype="q8_0")


@pytest.mark.parametrize("kv_dtype", ["f16", "bf16"])
def test_smollm2_half_caches_stay_close_to_f32(smol_full, kv_dtype):
    """Last-position logits of a 60-token prompt within 2% (relative norm) of the f32 cache's, and
    greedy continuations that agree on most tokens (the figure the README reports comes from
    scripts/bench_kv.py on longer prompts)."""
    ref, half = StageEngine(smol_full), StageEngine(smol_full, kv_dtype=kv_dtype)
    a = run_stages([ref], [SeqChunk("a", 0, PROMPTS[1], GREEDY)])[0]
    b = run_stages([half], [SeqChunk("a", 0, PROMPTS[1], GREEDY)])[0]
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.02
    want = generate([StageEngine(smol_full)], PROMPTS, 24)
    got = generate([StageEngine(smol_full, kv_dtype=kv_dtype)], PROMPTS, 24)
    same = sum(x == y for w, g in zip(want, got, strict=True) for x, y in zip(w, g, strict=True))
    assert same >= 0.5 * 24 * len(PROMPTS), (same, want, got)
    assert [w[0] for w in want] == [g[0] for g in got]  # the first token after each prompt


def test_three_nodes_with_f16_caches_equal_one_engine(smol_full):
    c = start_cluster(EMBEDDED, parts=3, node_defaults={"kv_dtype": "f16"})
    try:
        with grpc.insecure_channel(c.cfg.coordinator.address) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            got = []
            for p in PROMPTS:
                req = pb.GenerateRequest(
                    max_tokens=16, sampling=pb.SamplingParams(temperature=0), ignore_eos=True
                )
                req.prompt_token_ids.extend(p)
                req.speculative = False
                got.append([t for m in stub.Generate(req, timeout=120) for t in m.token_ids])
            nodes = stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=10).nodes
        assert [n.info.kv_dtype for n in nodes] == ["f16"] * 3
        assert got == generate([StageEngine(smol_full, kv_dtype="f16")], PROMPTS, 16)
    finally:
        c.stop()


def test_config_refuses_an_unimplemented_kv_dtype():
    base = {"model_name": EMBEDDED, "nodes": [{"id": "n1", "address": "127.0.0.1:1", "model_part": 0}]}
    for where in (
        {"node_defaults": {"kv_dtype": "q8_0"}},
        {"nodes": [{**base["nodes"][0], "kv_dtype": "fp8"}]},
    ):
        with pytest.raises(ConfigError, match="kv_dtype") as e:
            parse_config({**base, **where})
        assert "q8_0" in str(e.value) or "fp8" in str(e.value)
    assert parse_config({**base, "node_defaults": {"kv_dtype": "bf16"}}).node_defaults.kv_dtype == "bf16"
