"""GPT-2 family decoder: one pipeline stage of it.

Learned position embeddings, pre-LayerNorm blocks, fused c_attn, GELU (tanh) MLP, head tied to
the token embedding. Matrices arrive [out, in], as every other model's: a GGUF stores them so
(in any block type), and the loader transposes a safetensors checkpoint's Conv1D [in, out] weights
once at load (dense, in the checkpoint's dtype).
"""

from __future__ import annotations

import numpy as np

from pipeserve.kernels import QLinear, gelu
from pipeserve.modeling.config import ModelConfig, Shard
from pipeserve.modeling.layers import BatchMeta, LayerNorm, QEmbedding, attend, row_chunks
from pipeserve.modeling.llama import Weights, check_shapes, matrix


class GPT2Block:
    def __init__(self, cfg: ModelConfig) -> None:
        C = cfg.hidden_size
        self.nh, self.hd = cfg.n_heads, cfg.head_dim
        self.ln_1 = LayerNorm(C, cfg.norm_eps)
        self.ln_2 = LayerNorm(C, cfg.norm_eps)
        self.c_attn: QLinear  # set by load_hf_weights, with their biases
        self.c_proj: QLinear
        self.c_fc: QLinear
        self.mlp_c_proj: QLinear

    def __call__(self, x: np.ndarray, meta: BatchMeta, layer: int) -> np.ndarray:
        qkv = self.c_attn(self.ln_1(x))  # [T, 3C]: q | k | v, n_heads each
        x = x + self.c_proj(attend(qkv, self.nh, meta, layer))
        for xr in row_chunks(x):  # MLP_ROWS rows a call, added into x in place
            xr += self.mlp_c_proj(gelu(self.c_fc(self.ln_2(xr)), approximate=True))
        return x


class GPT2Stage:
    def __init__(self, cfg: ModelConfig, shard: Shard) -> None:
        self.cfg, self.shard = cfg, shard
        C = cfg.hidden_size
        self.wte: QEmbedding | None = None  # first stage, set by load_hf_weights
        self.wpe: QEmbedding | None = None
        self.h = [GPT2Block(cfg) for _ in range(shard.n_local)]
        self.ln_f = LayerNorm(C, cfg.norm_eps) if shard.is_last else None
        self.lm_head: QLinear | None = None  # last stage: tied to wte's QTensor

    def __call__(self, x: np.ndarray, meta: BatchMeta) -> np.ndarray:
        """x: token ids [T] (first stage) or hidden [T, C]. Returns hidden [T, C], or on the last
        stage logits [S, V] for meta.sample_rows."""
        if self.wte is not None and self.wpe is not None:
            x = self.wte(x) + self.wpe(meta.positions)
        for i, block in enumerate(self.h):
            x = block(x, meta, i)
        if self.ln_f is None or self.lm_head is None:
            return x
        return self.lm_head(self.ln_f(x[meta.sample_rows]))


def hf_weight_shapes(cfg: ModelConfig, shard: Shard) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensors (Hugging Face GPT-2 names, `transformer.` prefix stripped) a stage needs."""
    C, I = cfg.hidden_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {}
    if shard.is_first or (shard.is_last and cfg.tie_word_embeddings):
        shapes["wte.weight"] = (cfg.vocab_size, C)
    if shard.is_last and not cfg.tie_word_embeddings:  # a GGUF with its own output.weight
        shapes["lm_head.weight"] = (cfg.vocab_size, C)
    if shard.is_first:
        shapes["wpe.weight"] = (cfg.max_position, C)
    for i in range(shard.start_layer, shard.end_layer):
        p = f"h.{i}."
        shapes |= {
            p + "ln_1.weight": (C,),
            p + "ln_1.bias": (C,),
            p + "attn.c_attn.weight": (3 * C, C),
            p + "attn.c_attn.bias": (3 * C,),
            p + "attn.c_proj.weight": (C, C),
            p + "attn.c_proj.bias": (C,),
            p + "ln_2.weight": (C,),
            p + "ln_2.bias": (C,),
            p + "mlp.c_fc.weight": (I, C),
            p + "mlp.c_fc.bias": (I,),
            p + "mlp.c_proj.weight": (C, I),
            p + "mlp.c_proj.bias": (C,),
        }
    if shard.is_last:
        shapes |= {"ln_f.weight": (C,), "ln_f.bias": (C,)}
    return shapes


def load_hf_weights(stage: GPT2Stage, w: Weights) -> None:
    cfg, shard = stage.cfg, stage.shard
    check_shapes(w, hf_weight_shapes(cfg, shard))
    if shard.is_first:
        stage.wte = QEmbedding(matrix(w, "wte.weight"))
        stage.wpe = QEmbedding(matrix(w, "wpe.weight"))
    for j, b in enumerate(stage.h):
        p = f"h.{shard.start_layer + j}."
        for ln, name in ((b.ln_1, "ln_1"), (b.ln_2, "ln_2")):
            ln.weight[:] = w[p + name + ".weight"]
            ln.bias[:] = w[p + name + ".bias"]
        for attr, name in (
            ("c_attn", "attn.c_attn"),
            ("c_proj", "attn.c_proj"),
            ("c_fc", "mlp.c_fc"),
            ("mlp_c_proj", "mlp.c_proj"),
        ):
            bias = w[p + name + ".bias"]
            assert isinstance(bias, np.ndarray)
            setattr(b, attr, QLinear([matrix(w, p + name + ".weight")], bias))
    if stage.ln_f is not None:
        stage.ln_f.weight[:] = w["ln_f.weight"]
        stage.ln_f.bias[:] = w["ln_f.bias"]
        stage.lm_head = QLinear([matrix(w, "wte.weight" if cfg.tie_word_embeddings else "lm_head.weight")])
