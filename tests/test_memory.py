"""Memory budgets (src/common/memory.py), pure: sizes, the `auto` limit from fake cgroup trees,
what a share needs, the KV pool `cache_budget_tokens: auto` gives, the refusal's text; and the
model's bytes read from the file's header alone, equal to what loading holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeserve.common import memory as m
from pipeserve.common.config import parse_config
from pipeserve.common.errors import ConfigError
from pipeserve.common.memory import GiB, MiB
from pipeserve.common.shard import Shard

V1_UNLIMITED = "9223372036854771712\n"


def test_sizes_parse_with_units_and_print_rounded() -> None:
    assert m.parse_bytes("6GiB") == 6 * GiB and m.parse_bytes("6Gi") == 6 * GiB
    assert m.parse_bytes("512MiB") == 512 * MiB and m.parse_bytes("1.5 GiB") == 3 * GiB // 2
    assert m.parse_bytes("2GB") == 2 * 10**9 and m.parse_bytes("2G") == 2 * 10**9
    assert m.parse_bytes(1048576) == MiB and m.parse_bytes("1048576") == MiB
    for bad in ("6 parsecs", "GiB", "-1", "", True, 0):
        with pytest.raises(ValueError):
            m.parse_bytes(bad)  # type: ignore[arg-type]
    assert m.format_bytes(2.41 * GiB) == "2.41 GiB" and m.format_bytes(512 * MiB) == "512.0 MiB"
    assert m.format_bytes(GiB + 1) == "1.00 GiB" and m.format_bytes(GiB + 1, up=True) == "1.01 GiB"
    assert m.format_bytes(-3 * MiB) == "-3.0 MiB" and m.format_bytes(12) == "12 B"


def test_config_takes_limits_with_units_and_auto() -> None:
    node = {"id": "n", "address": "h:1", "model_part": 0}
    cfg = parse_config({"nodes": [node | {"memory_limit": "2GiB", "cache_budget_tokens": 4096}]})
    assert cfg.nodes[0].memory_limit == 2 * GiB and cfg.nodes[0].cache_budget_tokens == 4096
    assert cfg.node_defaults.memory_limit == "auto" and cfg.node_defaults.cache_budget_tokens == "auto"
    with pytest.raises(ConfigError, match=r"nodes\[0\].memory_limit \(node 'n'\): '2 parsecs' is not a size"):
        parse_config({"nodes": [node | {"memory_limit": "2 parsecs"}]})
    with pytest.raises(ConfigError, match=r"cache_budget_tokens.*'auto' or a whole number"):
        parse_config({"nodes": [node], "node_defaults": {"cache_budget_tokens": 0}})


# ---- the `auto` limit from a fake cgroup tree ----------------------------------------------------
def test_auto_limit_from_cgroup_v2_memory_max(tmp_path: Path) -> None:
    """Inside a container (cgroup namespace): /proc/self/cgroup says 0::/ and the mount's root
    holds the container's memory.max."""
    (tmp_path / "memory.max").write_text("2147483648\n")
    assert m.cgroup_memory_limit(tmp_path, "0::/\n") == (2 * GiB, "cgroup v2 memory.max of /")
    lim = m.node_limit("auto", root=tmp_path, proc_cgroup="0::/\n", available=8 * GiB)
    assert (lim.bytes, lim.source) == (2 * GiB, "cgroup")
    assert lim.reason == "auto: cgroup v2 memory.max of /: 2.00 GiB"
    (tmp_path / "memory.max").write_text("max\n")
    assert m.cgroup_memory_limit(tmp_path, "0::/\n") is None


def test_auto_limit_is_the_smallest_over_the_cgroup_and_its_ancestors(tmp_path: Path) -> None:
    pod = tmp_path / "kubepods.slice" / "pod1"
    leaf = pod / "node"
    leaf.mkdir(parents=True)
    (tmp_path / "kubepods.slice" / "memory.max").write_text("max\n")
    (pod / "memory.max").write_text(str(3 * GiB))
    (leaf / "memory.max").write_text(str(5 * GiB))
    got = m.cgroup_memory_limit(tmp_path, "0::/kubepods.slice/pod1/node\n")
    assert got == (3 * GiB, "cgroup v2 memory.max of /kubepods.slice/pod1")


def test_auto_limit_from_cgroup_v1_beside_a_v2_mount(tmp_path: Path) -> None:
    """This machine's layout: v1 controllers (memory among them) and an empty unified hierarchy;
    the root's 'unlimited' is LONG_MAX rounded to a page."""
    mem = tmp_path / "memory"
    (mem / "ci" / "job").mkdir(parents=True)
    (tmp_path / "unified" / "ci").mkdir(parents=True)
    (mem / "memory.limit_in_bytes").write_text(V1_UNLIMITED)
    (mem / "ci" / "memory.limit_in_bytes").write_text(V1_UNLIMITED)
    (mem / "ci" / "job" / "memory.limit_in_bytes").write_text(str(768 * MiB))
    proc = "12:cpu,cpuacct:/ci\n4:memory:/ci/job\n0::/ci\n"
    assert m.cgroup_memory_limit(tmp_path, proc) == (768 * MiB, "cgroup v1 memory.limit_in_bytes of /ci/job")
    # the controller list must name memory: a cpu cgroup's path does not count
    assert m.cgroup_memory_limit(tmp_path, "4:cpu:/ci/job\n") is None


def test_auto_limit_without_a_cgroup_is_the_machine_shared_by_its_nodes(tmp_path: Path) -> None:
    lim = m.node_limit("auto", sharing=3, root=tmp_path, proc_cgroup="0::/\n", available=9 * GiB)
    assert (lim.bytes, lim.source) == (3 * GiB, "machine")
    assert lim.reason == "auto: the machine's available memory 9.00 GiB / 3 nodes on this host"
    # a cgroup limit above what the machine has left: the machine's figure
    (tmp_path / "memory.max").write_text(str(64 * GiB))
    lim = m.node_limit("auto", root=tmp_path, proc_cgroup="0::/\n", available=9 * GiB)
    assert (lim.bytes, lim.source) == (9 * GiB, "machine") and "below cgroup v2 memory.max of /" in lim.reason
    # an explicit limit wins over everything
    lim = m.node_limit(2 * GiB, root=tmp_path, proc_cgroup="0::/\n", available=9 * GiB)
    assert (lim.bytes, lim.source, lim.reason) == (2 * GiB, "config", "memory_limit 2.00 GiB in the config")


def test_the_limit_of_this_process_reads_without_error() -> None:
    lim = m.node_limit("auto")
    assert lim.bytes > 0 and lim.source in ("cgroup", "machine")


# ---- what a share needs ----------------------------------------------------------------------
def test_auto_kv_takes_what_is_left_within_its_bounds() -> None:
    per = 1536  # SmolLM2: k + v of one position of one layer (3 kv heads x 64 x 2 x fp32)
    # 10 layers, 512 MiB: (512 MiB - 100 MiB - 224 MiB) x 0.9 / (16 x 10 x 1536) -> 721 blocks
    tokens = m.auto_kv_tokens(512 * MiB, 100 * MiB, 224 * MiB, 10, per, 16, 256)
    assert tokens == 721 * 16
    assert m.auto_kv_tokens(64 * GiB, 0, 224 * MiB, 10, per, 16, 256) == m.KV_AUTO_MAX_TOKENS
    assert m.auto_kv_tokens(300 * MiB, 100 * MiB, 224 * MiB, 10, per, 16, 256) == 256  # the floor
    need = m.share_need(100 * MiB, 10, per, 16, "auto", 512 * MiB, 256, runtime=224 * MiB)
    assert need.kv_tokens == tokens and need.kv == tokens * 10 * per and need.total <= 512 * MiB
    explicit = m.share_need(100 * MiB, 10, per, 16, 1000, 512 * MiB, 256, runtime=224 * MiB)
    assert explicit.kv_tokens == 1008 and explicit.kv == 1008 * 10 * per  # whole blocks


MEASURED = sorted((Path(__file__).resolve().parents[1] / "bench").glob("runtime-memory-*.json"))


@pytest.mark.parametrize("path", MEASURED, ids=[p.stem for p in MEASURED])
def test_the_runtime_allowance_covers_what_was_measured(path: Path) -> None:
    """scripts/runtime_memory.py's worst step (bench/runtime-memory-*.json: SmolLM2-135M,
    Qwen2.5-Coder-1.5B, Llama-3.1-8B's shapes) stays under the allowance for its shapes with a
    fifth to spare."""
    r = json.loads(path.read_text())
    allowance = m.runtime_bytes(
        r["hidden_size"],
        r["intermediate_size"],
        r["vocab_size"],
        r["rope_table_bytes"],
        r["max_batch_tokens"],
        r["max_running"],
    )
    assert allowance >= 1.2 * r["peak"]["runtime_mib"] * MiB, (allowance / MiB, r["peak"])
    assert len(MEASURED) >= 3


def test_a_share_over_its_limit_is_refused_with_the_numbers() -> None:
    need = m.ShareNeed(weights=2 * GiB, kv=256 * MiB, kv_tokens=4096, runtime=224 * MiB)
    limit = m.MemoryLimit(2 * GiB, "cgroup", "auto: cgroup v2 memory.max of /: 2.00 GiB")
    with pytest.raises(ConfigError) as err:
        m.check_share("node2", 1, Shard(10, 20, 30), need, limit, auto_kv=False)
    msg = str(err.value)
    assert msg.startswith(
        "node node2: part 1, layers [10, 20) needs 2.47 GiB, limit 2.00 GiB (auto: cgroup v2"
    )
    assert "weights 2.00 GiB + KV 256.0 MiB (4096 tokens) + runtime 224.0 MiB" in msg
    assert "lower cache_budget_tokens" in msg and err.value.node == "node2" and err.value.part == 1
    m.check_share("node2", 1, Shard(10, 20, 30), need, m.MemoryLimit(3 * GiB, "config", ""), auto_kv=False)


# ---- the model's bytes from its header -------------------------------------------------------
def test_model_weights_from_the_header_equal_what_loading_holds() -> None:
    from pipeserve.common.model_files import resolve_model
    from pipeserve.modeling.loader import load_stage, model_weights

    src = resolve_model("smollm2-135m-instruct")
    w = model_weights(src)
    assert len(w.layers) == 30 and w.shared == w.first == w.last - 576 * 4  # tied head; final norm
    for r in [(0, 10), (10, 20), (20, 30), (0, 30), (29, 30)]:
        assert w.stage(*r) == load_stage(src, r).param_bytes, r


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3", "phi3", "gpt2"])
def test_model_weights_of_every_architecture_and_format(kind: str, tmp_path: Path) -> None:
    """fp32 checkpoint folders and their GGUF twins (F32 and Q8_0 matrices, fp32 vectors; llama's
    q/k rows permuted; tied and untied heads)."""
    from pipeserve.common.model_files import resolve_model
    from pipeserve.modeling.loader import load_stage, model_weights
    from tests.tiny_models import make_tiny, write_gguf

    folder = make_tiny(kind, tmp_path / kind)
    paths = [folder]
    if kind != "gemma3":  # the tiny Gemma's query_pre_attn_scalar has no GGUF key
        paths += [write_gguf(folder, tmp_path / "f32.gguf"), write_gguf(folder, tmp_path / "q8.gguf", "Q8_0")]
    for path in paths:
        src = resolve_model(str(path))
        w = model_weights(src)
        n = len(w.layers)
        for r in [(0, n), (0, 1), (1, n - 1), (n - 1, n)]:
            assert w.stage(*r) == load_stage(src, r).param_bytes, (path.name, r)


def test_the_kv_bytes_a_budget_counts_are_the_pools() -> None:
    from pipeserve.modeling.kv_cache import KVCachePool, kv_token_layer_bytes

    pool = KVCachePool(7, 3, 64, 1000, 512)
    per = kv_token_layer_bytes(3, 64)
    assert 2 * pool.block_bytes * pool.n_blocks == m.kv_pool_bytes(1000, 7, per, 16) == 1008 * 7 * per


def test_rope_tables_built_in_blocks_equal_the_one_shot_tables() -> None:
    """The tables are computed ROPE_BLOCK positions at a time (the float64 temporaries of a
    131072-position context would be ~4x the tables at load); every entry is what one pass over
    all positions gives."""
    import numpy as np

    from pipeserve.modeling.config import RopeConfig
    from pipeserve.modeling.layers import ROPE_BLOCK, rope_tables

    rope = RopeConfig(theta=500000.0)
    d, n = 128, 2 * ROPE_BLOCK + 123
    cos, sin = rope_tables(rope, d, n)
    inv = np.float32(1.0) / (
        np.float32(rope.theta) ** (np.arange(0, d, 2).astype(np.float32) / np.float32(d))
    )
    a64 = (
        np.outer(np.arange(n, dtype=np.float32), inv.astype(np.float32)).astype(np.float32).astype(np.float64)
    )
    assert np.array_equal(cos, np.cos(a64).astype(np.float32)) and np.array_equal(
        sin, np.sin(a64).astype(np.float32)
    )
