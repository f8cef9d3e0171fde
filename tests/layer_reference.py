"""LlamaLayer's math composed from its modules (Attention, GatedMLP, QLinear.add_to, RMSNorm), as
Gemma3Layer composes its own: the reference that LlamaLayer.forward, native calls on raw pointers,
equals bit for bit (tests/test_engine.py, test_engine_memory.py patch it in with `module_forward`)."""

from __future__ import annotations

import numpy as np

from pipeserve.modeling.layers import BatchMeta, row_chunks
from pipeserve.modeling.llama import LlamaLayer, RopeTables


def module_forward(layer: LlamaLayer, x: np.ndarray, rope: RopeTables, meta: BatchMeta, i: int) -> np.ndarray:
    """x [T, C] += o(attn(norm1(x))); x += down(act(gate_up(norm2(x)))), MLP_ROWS rows a call."""
    attn, mlp = layer.self_attn, layer.mlp
    a = attn.forward(layer.input_layernorm.forward(x), rope, meta, i)
    x = attn.o_proj.add_to(a, x)
    for xr in row_chunks(x):
        mlp.down_proj.add_to(mlp.forward(layer.post_attention_layernorm.forward(xr)), xr)
    return x
