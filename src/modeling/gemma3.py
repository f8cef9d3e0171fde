"""Gemma 3 text decoder (gemma3_text; Gemma 3 270M / 1B): one pipeline stage.

Differences from llama.py's block, all from the checkpoint's config: the embedding is multiplied
by sqrt(hidden); every RMSNorm multiplies by (1 + weight); norms sit before *and after* attention
and the MLP (pre/post), with the residual added after the post-norm; q and k get a per-head
RMSNorm; layers alternate 5 sliding-window (local rope base) : 1 global (global rope base);
the softmax scale is query_pre_attn_scalar ** -0.5; the MLP is GELU-tanh gated; the head is tied.
"""

from __future__ import annotations

import numpy as np

from pipeserve.kernels import QLinear
from pipeserve.modeling.config import ModelConfig, Shard
from pipeserve.modeling.layers import BatchMeta, RMSNorm, row_chunks
from pipeserve.modeling.llama import (
    Attention,
    GatedMLP,
    LlamaStage,
    RopeTables,
    Weights,
    attention_shapes,
    check_shapes,
    end_shapes,
    load_attention,
    load_ends,
    matrix,
    vector,
)

_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)


class Gemma3Layer:
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        C, eps = cfg.hidden_size, cfg.norm_eps
        self.input_layernorm = RMSNorm(C, eps, 1.0)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(C, eps, 1.0)
        self.pre_feedforward_layernorm = RMSNorm(C, eps, 1.0)
        self.mlp = GatedMLP(cfg)
        self.post_feedforward_layernorm = RMSNorm(C, eps, 1.0)

    def forward(self, x: np.ndarray, rope: RopeTables, meta: BatchMeta, layer: int) -> np.ndarray:
        a = self.self_attn.o_proj(self.self_attn(self.input_layernorm(x), rope, meta, layer))  # [T, C]
        x = x + self.post_attention_layernorm(a)
        for xr in row_chunks(x):  # MLP_ROWS rows a call, added into x in place
            m = self.mlp.down_proj(self.mlp(self.pre_feedforward_layernorm(xr)))
            xr += self.post_feedforward_layernorm(m)
        return x


class Gemma3Stage(LlamaStage):
    layer_cls = Gemma3Layer


def hf_weight_shapes(cfg: ModelConfig, shard: Shard) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensors (Hugging Face gemma3_text names and [out, in] shapes) that a stage needs."""
    C, I = cfg.hidden_size, cfg.intermediate_size
    shapes = end_shapes(cfg, shard)
    for i in range(shard.start_layer, shard.end_layer):
        p = f"model.layers.{i}."
        shapes |= {p + n + ".weight": (C,) for n in _NORMS}
        shapes |= attention_shapes(cfg, p + "self_attn.", fused=False)
        shapes |= {
            p + "mlp.gate_proj.weight": (I, C),
            p + "mlp.up_proj.weight": (I, C),
            p + "mlp.down_proj.weight": (C, I),
        }
    return shapes


def load_hf_weights(stage: Gemma3Stage, w: Weights) -> None:
    cfg, shard = stage.cfg, stage.shard
    check_shapes(w, hf_weight_shapes(cfg, shard))
    load_ends(stage, w)
    for j, layer in enumerate(stage.layers):
        assert isinstance(layer, Gemma3Layer)
        p = f"model.layers.{shard.start_layer + j}."
        for n in _NORMS:
            getattr(layer, n).weight[:] = vector(w, p + n + ".weight")
        load_attention(layer.self_attn, w, p + "self_attn.", cfg)
        m = p + "mlp."
        layer.mlp.gate_up_proj = QLinear([matrix(w, m + "gate_proj.weight"), matrix(w, m + "up_proj.weight")])
        layer.mlp.down_proj = QLinear([matrix(w, m + "down_proj.weight")])
