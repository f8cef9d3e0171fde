"""Llama-family decoder (SmolLM2, TinyLlama, Llama 2/3, Mistral-style): one pipeline stage of it.

RMSNorm, rotary position embeddings (Hugging Face's rotate-half layout), grouped-query attention,
SwiGLU MLP. Built by modeling.loader for a `Shard`; the first stage owns the embedding, the last
the final norm and the head. Weights arrive under Hugging Face checkpoint names (`load_hf_weights`):
matrices as `QTensor`s in their stored form (GGUF blocks, or the checkpoint's fp32/fp16/bf16), run by
`QLinear`; q|k|v and gate|up are fused into one native call each, whatever their types.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeserve.common.errors import InvalidInputError, ModelFormatError
from pipeserve.kernels import QLinear, QTensor, rms_norm, rope_, silu_mul
from pipeserve.modeling.config import ModelConfig, Shard
from pipeserve.modeling.layers import BatchMeta, QEmbedding, attend


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # one native pass (torch's is 5 dispatched ops here)


class LlamaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        C, hd = cfg.hidden_size, cfg.head_dim
        self.nh, self.nkv, self.hd = cfg.n_heads, cfg.n_kv_heads, hd
        self.input_layernorm = RMSNorm(C, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(C, cfg.norm_eps)
        # set by load_hf_weights: the matrices come in the form they are stored in
        self.qkv_proj: QLinear  # q, k, v fused: [T, C] -> [T, (nh + 2 nkv) hd]
        self.o_proj: QLinear
        self.gate_up_proj: QLinear  # gate, up fused: [T, C] -> [T, 2 I]
        self.down_proj: QLinear

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: BatchMeta, layer: int
    ) -> torch.Tensor:
        T = x.shape[0]  # x: [T, C]
        qkv = self.qkv_proj(self.input_layernorm(x))  # [T, (nh + 2 nkv) hd]
        rope_(qkv, self.nh + self.nkv, self.hd, meta.positions, cos, sin)  # q and k heads, in place
        qkv = qkv.view(T, self.nh + 2 * self.nkv, self.hd)
        q, k, v = qkv[:, : self.nh], qkv[:, self.nh : self.nh + self.nkv], qkv[:, self.nh + self.nkv :]
        x = self.o_proj.add_to(attend(q, k, v, meta, layer), x)  # x += o(attn), in place
        gate_up = self.gate_up_proj(self.post_attention_layernorm(x))  # [T, 2I]: gate | up
        return self.down_proj.add_to(silu_mul(gate_up), x)


class LlamaStage(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard) -> None:
        super().__init__()
        self.cfg, self.shard = cfg, shard
        self.embed_tokens: QEmbedding | None = None  # first stage, set by load_hf_weights
        self.layers = nn.ModuleList(LlamaLayer(cfg) for _ in range(shard.n_local))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps) if shard.is_last else None
        self.lm_head: QLinear | None = None  # last stage; a tied head shares the embedding's QTensor
        inv_freq = 1.0 / (
            cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
        )
        angles = torch.outer(torch.arange(cfg.max_position, dtype=torch.float32), inv_freq)  # [P, hd/2]
        # [P, hd/2] tables; rotate-half pairs element i with i + hd/2 (Hugging Face's layout)
        self.register_buffer("rope_cos", angles.cos().contiguous(), persistent=False)
        self.register_buffer("rope_sin", angles.sin().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        """x: token ids [T] (first stage) or hidden [T, C]. Returns hidden [T, C], or on the last
        stage logits [S, V] for meta.sample_rows."""
        # the layers add into their residual stream in place, so a received hidden state is copied once
        x = self.embed_tokens(x) if self.embed_tokens is not None else x.clone()
        if meta.positions.numel() and int(meta.positions.max()) >= self.rope_cos.shape[0]:
            raise InvalidInputError(
                f"position {int(meta.positions.max())} is past the model's {self.rope_cos.shape[0]}"
            )
        for i, layer in enumerate(self.layers):
            x = layer(x, self.rope_cos, self.rope_sin, meta, i)
        if self.norm is None or self.lm_head is None:
            return x
        return self.lm_head(self.norm(x[meta.sample_rows]))


Weights = dict[str, "QTensor | torch.Tensor"]  # matrices as QTensor, vectors (norms, biases) fp32


def hf_weight_shapes(cfg: ModelConfig, shard: Shard) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensors (Hugging Face names and [out, in] shapes) that a stage needs."""
    C, hd, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {}
    if shard.is_first or (shard.is_last and cfg.tie_word_embeddings):
        shapes["model.embed_tokens.weight"] = (cfg.vocab_size, C)
    for i in range(shard.start_layer, shard.end_layer):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (C,),
            p + "self_attn.q_proj.weight": (cfg.n_heads * hd, C),
            p + "self_attn.k_proj.weight": (cfg.n_kv_heads * hd, C),
            p + "self_attn.v_proj.weight": (cfg.n_kv_heads * hd, C),
            p + "self_attn.o_proj.weight": (C, cfg.n_heads * hd),
            p + "post_attention_layernorm.weight": (C,),
            p + "mlp.gate_proj.weight": (I, C),
            p + "mlp.up_proj.weight": (I, C),
            p + "mlp.down_proj.weight": (C, I),
        }
    if shard.is_last:
        shapes["model.norm.weight"] = (C,)
        if not cfg.tie_word_embeddings:
            shapes["lm_head.weight"] = (cfg.vocab_size, C)
    return shapes


@torch.inference_mode()
def load_hf_weights(stage: LlamaStage, w: Weights) -> None:
    """Put checkpoint tensors into the stage, as they are: no dequantization, no transposed copy."""
    cfg, shard = stage.cfg, stage.shard
    check_shapes(w, hf_weight_shapes(cfg, shard))
    if shard.is_first:
        stage.embed_tokens = QEmbedding(matrix(w, "model.embed_tokens.weight"))
    for j, layer in enumerate(stage.layers):
        p = f"model.layers.{shard.start_layer + j}."
        layer.input_layernorm.weight.copy_(w[p + "input_layernorm.weight"])
        layer.post_attention_layernorm.weight.copy_(w[p + "post_attention_layernorm.weight"])
        layer.qkv_proj = QLinear([matrix(w, p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        layer.o_proj = QLinear([matrix(w, p + "self_attn.o_proj.weight")])
        layer.gate_up_proj = QLinear(
            [matrix(w, p + "mlp.gate_proj.weight"), matrix(w, p + "mlp.up_proj.weight")]
        )
        layer.down_proj = QLinear([matrix(w, p + "mlp.down_proj.weight")])
    if stage.norm is not None:
        stage.norm.weight.copy_(w["model.norm.weight"])
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        stage.lm_head = QLinear([matrix(w, head)])


def matrix(w: Weights, name: str) -> QTensor:
    t = w[name]
    if not isinstance(t, QTensor):
        raise ModelFormatError(f"tensor {name} should be a matrix, got {type(t).__name__}")
    return t


def check_shapes(w: Weights, expected: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(w))
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelFormatError(f"checkpoint is missing tensors: {', '.join(missing[:5])}{more}")
    for name, shape in expected.items():
        if tuple(w[name].shape) != shape:
            raise ModelFormatError(f"tensor {name} has shape {tuple(w[name].shape)}, expected {shape}")
