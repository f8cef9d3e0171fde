"""Phi-3 decoder: one pipeline stage. The math is llama.py's block; the checkpoint differs.

Phi-3 stores q|k|v as one `qkv_proj` matrix and gate|up as one `gate_up_proj` matrix (GGUF:
`attn_qkv`, and `ffn_up` with 2I rows): they are already the fused projections our kernels run, so
they load as single QTensors with no split and no copy. LongRoPE scaling and partial rotary
embeddings are refused at load (config.py).
"""

from __future__ import annotations

from pipeserve.kernels import QLinear
from pipeserve.modeling.config import ModelConfig, Shard
from pipeserve.modeling.llama import (
    LlamaLayer,
    LlamaStage,
    Weights,
    attention_shapes,
    check_shapes,
    end_shapes,
    load_attention,
    load_ends,
    matrix,
    vector,
)

Phi3Stage = LlamaStage


def hf_weight_shapes(cfg: ModelConfig, shard: Shard) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensors (Hugging Face Phi-3 names and [out, in] shapes) that a stage needs."""
    C, I = cfg.hidden_size, cfg.intermediate_size
    shapes = end_shapes(cfg, shard)
    for i in range(shard.start_layer, shard.end_layer):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,)}
        shapes |= attention_shapes(cfg, p + "self_attn.", fused=True)
        shapes |= {p + "mlp.gate_up_proj.weight": (2 * I, C), p + "mlp.down_proj.weight": (C, I)}
    return shapes


def load_hf_weights(stage: LlamaStage, w: Weights) -> None:
    cfg, shard = stage.cfg, stage.shard
    check_shapes(w, hf_weight_shapes(cfg, shard))
    load_ends(stage, w)
    for j, layer in enumerate(stage.layers):
        assert isinstance(layer, LlamaLayer)
        p = f"model.layers.{shard.start_layer + j}."
        layer.input_layernorm.weight[:] = vector(w, p + "input_layernorm.weight")
        layer.post_attention_layernorm.weight[:] = vector(w, p + "post_attention_layernorm.weight")
        load_attention(layer.self_attn, w, p + "self_attn.", cfg, fused=True)
        layer.mlp.gate_up_proj = QLinear([matrix(w, p + "mlp.gate_up_proj.weight")])
        layer.mlp.down_proj = QLinear([matrix(w, p + "mlp.down_proj.weight")])
