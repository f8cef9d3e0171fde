"""What a node knows about its memory and speed before it loads its layers.

`NodeBudget` is its memory plan: its limit (common/memory.py: config, cgroup or machine), the
model's weight bytes per layer from the file's header, and the KV pool it will allocate; the node
server checks its share against it before mapping any weight. `measure` adds, for `layers: auto`
(common/placement.py), how fast one layer runs: it loads one layer (a middle one when there is
one), times a forward of 8 tokens on it (the median of 5 after a warm-up, with the node's kernel
threads), and drops it again before the real load.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeserve.common.errors import ConfigError
from pipeserve.common.kvblocks import BLOCK_SIZE
from pipeserve.common.memory import (
    MemoryLimit,
    ModelWeights,
    ShareNeed,
    check_share,
    kv_pool_bytes,
    runtime_bytes,
    share_need,
)
from pipeserve.common.shard import Shard
from pipeserve.modeling.config import ModelConfig
from pipeserve.modeling.engine import SeqChunk, StageEngine
from pipeserve.modeling.kv_cache import kv_token_layer_bytes
from pipeserve.modeling.layers import MLP_ROWS
from pipeserve.modeling.loader import load_stage, model_weights
from pipeserve.modeling.source import ModelSource, release_file_caches
from pipeserve.proto import model_service_pb2 as pb


@dataclass(frozen=True)
class NodeBudget:
    """A node's memory plan for any share of its model."""

    node_id: str
    part: int
    limit: MemoryLimit
    weights: ModelWeights
    kv_token_layer_bytes: int  # k + v of one position of one layer
    cache_tokens: int | Literal["auto"]  # the config's cache_budget_tokens
    min_tokens: int  # the smallest pool `auto` gives: coordinator.max_batch_tokens
    runtime: int  # the runtime allowance for this model's shapes (common/memory.py runtime_bytes)

    @classmethod
    def of(
        cls,
        node_id: str,
        part: int,
        source: ModelSource,
        cfg: ModelConfig,
        limit: MemoryLimit,
        cache_tokens: int | Literal["auto"],
        max_batch_tokens: int,
        max_running: int,
        kv_dtype: str = "f32",
    ) -> NodeBudget:
        """The plan for `source`, from its files' headers only (no tensor data is read);
        `max_batch_tokens` and `max_running` (the coordinator's) bound one step's scratch, and the
        smallest pool `auto` gives is one step."""
        try:
            kv = kv_token_layer_bytes(cfg.n_kv_heads, cfg.head_dim, kv_dtype)
        except ValueError as e:  # q8_0 with a head_dim that is not whole blocks: refused before loading
            raise ConfigError(f"node {node_id}: kv_dtype={kv_dtype!r} does not fit this model: {e}") from None
        runtime = runtime_bytes(
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.vocab_size,
            rope_table_bytes(cfg),
            max_batch_tokens,
            max_running,
            MLP_ROWS,
        )
        weights = model_weights(source, cfg)
        return cls(node_id, part, limit, weights, kv, cache_tokens, max_batch_tokens, runtime)

    def need(self, layers: Shard) -> ShareNeed:
        start, end = layers.range
        return share_need(
            self.weights.stage(start, end),
            end - start,
            self.kv_token_layer_bytes,
            BLOCK_SIZE,
            self.cache_tokens,
            self.limit.bytes,
            self.min_tokens,
            self.runtime,
        )

    def check(self, layers: Shard) -> ShareNeed:
        """The share's need; ConfigError with the numbers when it exceeds the limit."""
        need = self.need(layers)
        check_share(self.node_id, self.part, layers, need, self.limit, self.cache_tokens == "auto")
        return need

    @property
    def plan_tokens(self) -> int:
        """KV positions placement counts for this node: the configured pool, or auto's minimum."""
        tokens = self.min_tokens if self.cache_tokens == "auto" else self.cache_tokens
        return -(-tokens // BLOCK_SIZE) * BLOCK_SIZE

    def capacity(self, ms_per_layer: float) -> pb.Capacity:
        w = self.weights
        return pb.Capacity(
            limit_bytes=self.limit.bytes,
            limit_reason=self.limit.reason,
            layer_bytes=max(w.layers, default=0),
            ms_per_layer=ms_per_layer,
            layer_weight_bytes=list(w.layers),
            first_bytes=w.first,
            last_bytes=w.last,
            shared_bytes=w.shared,
            kv_layer_bytes=kv_pool_bytes(self.plan_tokens, 1, self.kv_token_layer_bytes, BLOCK_SIZE),
            kv_tokens=self.plan_tokens,
            runtime_bytes=self.runtime,
        )

    def to_pb(self, need: ShareNeed) -> pb.MemoryBudget:
        return pb.MemoryBudget(
            limit_bytes=self.limit.bytes,
            source=self.limit.source,
            reason=self.limit.reason,
            weights_bytes=need.weights,
            kv_bytes=need.kv,
            runtime_bytes=need.runtime,
        )


def rope_table_bytes(cfg: ModelConfig) -> int:
    """Bytes of a stage's RoPE tables (cos and sin, [max_position, head_dim / 2] fp32, one pair per
    layer type: Gemma 3 has two); GPT-2 has learned positions instead."""
    if cfg.arch == "gpt2":
        return 0
    kinds = {cfg.layer_type(i) for i in range(cfg.n_layers)}
    return len(kinds) * cfg.max_position * cfg.head_dim * 4


def measure(source: ModelSource, n_layers: int, budget: NodeBudget, reps: int = 5) -> pb.Capacity:
    """The node's capacity for `layers: auto`: its budget and the time one layer takes."""
    k = 1 if n_layers > 2 else 0
    stage = load_stage(source, (k, k + 1))
    engine = StageEngine(stage, cache_budget_tokens=256)
    x = (
        None
        if stage.shard.is_first
        else np.random.default_rng(0).standard_normal((8, stage.cfg.hidden_size), np.float32)
    )
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        engine.forward([SeqChunk(f"measure-{i}", 0, list(range(1, 9)))], x)
        times.append((time.perf_counter() - t0) * 1e3)
        engine.release([f"measure-{i}"])
    del engine, stage
    release_file_caches()
    return budget.capacity(statistics.median(times[1:]))
