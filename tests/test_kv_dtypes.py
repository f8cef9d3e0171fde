"""KV cache element types (node `kv_dtype`: f32, f16, bf16, q8_0; issue 27): the pool's arrays and
bytes, the engine's output against the f32 cache on SmolLM2 (logits close, greedy agreement
measured; prefix reuse and eviction within each type: tests/test_kv_cache.py), 3-node clusters with
f16 and q8_0 caches equal to one engine with the same type, and the refusals (a type not
implemented, in the config; q8_0 with a head_dim not a multiple of 32, at load), naming the key and
the value."""

from __future__ import annotations

import numpy as np
import pytest

from pipeserve.common.config import parse_config
from pipeserve.common.errors import ConfigError
from pipeserve.modeling.engine import SeqChunk, StageEngine
from pipeserve.modeling.generate import GREEDY, generate
from pipeserve.modeling.kv_cache import KVCachePool, kv_token_layer_bytes
from tests.engine_torch import run_stages
from tests.harness import greedy_through, start_cluster

EMBEDDED = "smollm2-135m-instruct"
PROMPTS = [
    [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 30, 1345, 28, 31, 1345, 28, 32],
    list(range(200, 260)),
    [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712],
]


def test_pool_arrays_and_bytes_follow_the_type():
    # bytes per row of 64 elements: 64 x 4, 64 x 2, and q8_0's two blocks of 34 (2 + 32)
    for name, dt, row in (
        ("f32", np.float32, 256),
        ("f16", np.float16, 128),
        ("bf16", np.uint16, 128),
        ("q8_0", np.uint8, 68),
    ):
        p = KVCachePool(2, 3, 64, 64, 1000, kv_dtype=name)
        assert p.k.dtype == dt and p.v.dtype == dt and p.kv_dtype == name
        assert p.block_bytes == 2 * 3 * 16 * row
        assert kv_token_layer_bytes(3, 64, name) == 2 * 3 * row
    with pytest.raises(ValueError, match="kv_dtype 'q8_0' stores blocks of 32 elements: head_dim 40"):
        KVCachePool(2, 3, 40, 64, 1000, kv_dtype="q8_0")
    with pytest.raises(ValueError, match="kv_dtype 'fp8' is not one of f32, f16, bf16, q8_0"):
        KVCachePool(2, 3, 64, 64, 1000, kv_dtype="fp8")


@pytest.mark.parametrize("kv_dtype", ["f16", "bf16", "q8_0"])
def test_smollm2_smaller_caches_stay_close_to_f32(smol_full, kv_dtype):
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


@pytest.mark.parametrize("kv_dtype", ["f16", "q8_0"])
def test_three_nodes_with_smaller_caches_equal_one_engine(smol_full, kv_dtype):
    c = start_cluster(EMBEDDED, parts=3, node_defaults={"kv_dtype": kv_dtype})
    try:
        got, nodes = greedy_through(c, PROMPTS, 16)
        assert [n.info.kv_dtype for n in nodes] == [kv_dtype] * 3
        assert got == generate([StageEngine(smol_full, kv_dtype=kv_dtype)], PROMPTS, 16)
    finally:
        c.stop()


def test_config_refuses_an_unimplemented_kv_dtype():
    base = {"model_name": EMBEDDED, "nodes": [{"id": "n1", "address": "127.0.0.1:1", "model_part": 0}]}
    for where, value in (
        ({"node_defaults": {"kv_dtype": "q4_0"}}, "q4_0"),
        ({"nodes": [{**base["nodes"][0], "kv_dtype": "fp8"}]}, "fp8"),
    ):
        with pytest.raises(ConfigError, match="kv_dtype") as e:
            parse_config({**base, **where})
        assert value in str(e.value)
    for ok in ("bf16", "q8_0"):
        assert parse_config({**base, "node_defaults": {"kv_dtype": ok}}).node_defaults.kv_dtype == ok


def test_a_node_refuses_q8_0_for_a_head_dim_not_in_blocks_of_32(tiny_llama):
    """The tiny Llama's head_dim is 16: a q8_0 node refuses before mapping anything, naming the
    node, the key, the value and the head_dim (the memory plan is where the KV row size is first needed)."""
    from pipeserve.common.memory import MemoryLimit
    from pipeserve.modeling.loader import read_config
    from pipeserve.modeling.source import resolve_model
    from pipeserve.node.capacity import NodeBudget

    source = resolve_model(str(tiny_llama))
    cfg = read_config(source)
    limit = MemoryLimit(2**32, "config", "test")
    args = (source, cfg, limit, 1024, 256, 8)
    with pytest.raises(ConfigError, match=r"node n1: kv_dtype='q8_0' .* head_dim 16 is not a multiple of 32"):
        NodeBudget.of("n1", 0, *args, kv_dtype="q8_0")
    assert NodeBudget.of("n1", 0, *args, kv_dtype="f16").kv_token_layer_bytes == 2 * cfg.n_kv_heads * 16 * 2
