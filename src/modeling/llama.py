"""Llama-family decoder (SmolLM2, TinyLlama, Llama 2/3, Mistral, Qwen2/2.5, Qwen3): one pipeline stage.

RMSNorm, rotary position embeddings (Hugging Face's rotate-half layout, optionally rescaled:
linear / llama3 / yarn / GGUF rope_freqs), grouped-query attention, gated MLP. The members of the
family are the same block; what differs is data in `ModelConfig`: q/k/v (and o, MLP) biases (Qwen2,
Llama's attention_bias / mlp_bias), a per-head RMSNorm on q and k (Qwen3), a sliding window on some
or all layers (Mistral, Qwen), the MLP's activation. `Attention` and `GatedMLP` are shared with
phi3.py and gemma3.py. Weights arrive under Hugging Face checkpoint names (`load_hf_weights`):
matrices as `QTensor`s in their stored form, run by `QLinear`; q|k|v and gate|up are fused into one
native call each, whatever their types.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from pipeserve.common.errors import InvalidInputError, ModelFormatError
from pipeserve.kernels import QLinear, QTensor, _qk, addr, rope_
from pipeserve.modeling.config import ModelConfig, Shard
from pipeserve.modeling.layers import (
    MLP_ROWS,
    BatchMeta,
    QEmbedding,
    RMSNorm,
    attend,
    gated_act,
    rope_tables,
    row_chunks,
)

Weights = dict[str, "QTensor | np.ndarray"]  # matrices as QTensor, vectors (norms, biases) fp32
RopeTables = dict[str, tuple[np.ndarray, np.ndarray]]  # layer type -> (cos, sin) [P, hd/2]


class Attention:
    """q|k|v projection, optional per-head q/k RMSNorm, RoPE, attention over the KV cache.

    forward returns the attention output [T, nh * hd] before o_proj, so that each architecture
    places o_proj and its residual add as its own block does.
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        self.nh, self.nkv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = cfg.window(layer)  # None: full attention
        self.rope_kind = cfg.layer_type(layer)  # which rope table (Gemma 3's local layers have their own)
        self.scale = cfg.attn_scale
        self.q_norm = RMSNorm(self.hd, cfg.norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        # set by load_hf_weights: the matrices come in the form they are stored in
        self.qkv_proj: QLinear  # q, k, v fused: [T, C] -> [T, (nh + 2 nkv) hd]
        self.o_proj: QLinear

    def forward(self, x: np.ndarray, rope: RopeTables, meta: BatchMeta, layer: int) -> np.ndarray:
        T = x.shape[0]
        nh, nkv, hd = self.nh, self.nkv, self.hd
        qkv = self.qkv_proj.forward(x)  # [T, (nh + 2 nkv) hd]
        if self.q_norm is not None and self.k_norm is not None:  # per head, before RoPE
            qkv[:, : nh * hd] = self.q_norm(qkv[:, : nh * hd].reshape(T * nh, hd)).reshape(T, nh * hd)
            qkv[:, nh * hd : (nh + nkv) * hd] = self.k_norm(
                qkv[:, nh * hd : (nh + nkv) * hd].reshape(T * nkv, hd)
            ).reshape(T, nkv * hd)
        cos, sin = rope[self.rope_kind]
        rope_(qkv, nh + nkv, hd, meta.positions, cos, sin)  # q and k heads, in place
        return attend(qkv, nh, meta, layer, self.window, self.scale)

    __call__ = forward


class GatedMLP:
    """act(x W_gate) * (x W_up), before down_proj: [T, C] -> [T, I]."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.act = cfg.hidden_act
        self.gate_up_proj: QLinear  # gate, up fused: [T, C] -> [T, 2I]
        self.down_proj: QLinear

    def forward(self, x: np.ndarray) -> np.ndarray:
        return gated_act(self.gate_up_proj.forward(x), self.act)

    __call__ = forward


class LlamaLayer:
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        C = cfg.hidden_size
        self.input_layernorm = RMSNorm(C, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(C, cfg.norm_eps)
        self.mlp = GatedMLP(cfg)

    def forward(self, x: np.ndarray, rope: RopeTables, meta: BatchMeta, layer: int) -> np.ndarray:
        attn, mlp = self.self_attn, self.mlp
        a = attn.forward(self.input_layernorm.forward(x), rope, meta, layer)  # x: [T, C]
        x = attn.o_proj.add_to(a, x)  # x += o(attn), in place
        for xr in row_chunks(x):  # x += down(act(gate_up(norm(x)))), in place, MLP_ROWS rows a call
            mlp.down_proj.add_to(mlp.forward(self.post_attention_layernorm.forward(xr)), xr)
        return x


class LlamaStage:
    layer_cls: type = LlamaLayer

    def __init__(self, cfg: ModelConfig, shard: Shard) -> None:
        self.cfg, self.shard = cfg, shard
        self.embed_tokens: QEmbedding | None = None  # first stage, set by load_hf_weights
        self.layers = [self.layer_cls(cfg, i) for i in range(shard.start_layer, shard.end_layer)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_offset) if shard.is_last else None
        self.lm_head: QLinear | None = None  # last stage; a tied head shares the embedding's QTensor
        self.set_rope(None)

    def set_rope(self, freq_factors: np.ndarray | None) -> None:
        """RoPE tables per layer type in this stage; `freq_factors`: a GGUF rope_freqs tensor."""
        cfg = self.cfg
        kinds = {cfg.layer_type(i) for i in range(self.shard.start_layer, self.shard.end_layer)}
        self.rope: RopeTables = {}
        for kind in sorted(kinds):
            rope = cfg.rope_local if kind == "sliding" and cfg.rope_local is not None else cfg.rope
            self.rope[kind] = rope_tables(rope, cfg.head_dim, cfg.max_position, freq_factors)

    def forward(self, x: np.ndarray, meta: BatchMeta) -> np.ndarray:
        """x: token ids [T] (first stage) or hidden [T, C]. Returns hidden [T, C], or on the last
        stage logits [S, V] for meta.sample_rows."""
        # the layers add into their residual stream in place, so a received hidden state is copied once
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
            if self.cfg.embed_scale != 1.0:
                x *= np.float32(self.cfg.embed_scale)
        else:
            x = np.array(x, dtype=np.float32, order="C")  # a copy
        if meta.positions.size and int(meta.positions.max()) >= self.cfg.max_position:
            raise InvalidInputError(
                f"position {int(meta.positions.max())} is past the model's {self.cfg.max_position}"
            )
        plan = self._decode_plan() if self.fast_decode else None
        if plan is not None:
            self._fast_layers(x, plan, meta)  # x is updated in place
        else:
            for i, layer in enumerate(self.layers):
                x = layer.forward(x, self.rope, meta, i)
        if self.norm is None or self.lm_head is None:
            return x
        return self.lm_head(self.norm(x[meta.sample_rows]))

    __call__ = forward

    # Plain Llama layers (no biases but q|k|v's, no q/k norms, SiLU, norm offset 0: SmolLM2, Llama,
    # Mistral, TinyLlama, Qwen2) run each layer as ten native calls on raw pointers into buffers made once per
    # step: the same kernels in the same order as the layer objects above (bit for bit the same
    # result), without the per-op Python overhead (~80 us a layer at batch 1, a fifth of a
    # step). Anything else takes the layer objects. `fast_decode = False` turns it off (tests
    # compare the two).
    fast_decode = True
    _plan: list[_LayerPlan] | None = None
    _plan_built = False

    def _decode_plan(self) -> list[_LayerPlan] | None:
        """Per layer what the fast path calls, or None when some layer does not qualify."""
        if not self._plan_built:
            entries = [_LayerPlan.of(layer, self.cfg) for layer in self.layers]
            self._plan = None if any(e is None for e in entries) else entries  # type: ignore[assignment]
            self._plan_built = True
        return self._plan

    def _fast_layers(self, x: np.ndarray, plan: list[_LayerPlan], meta: BatchMeta) -> None:
        T, C = x.shape
        cfg = self.cfg
        nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        n_qkv, n_i = (nh + 2 * nkv) * hd, cfg.intermediate_size  # checked by _LayerPlan.of
        e, R = np.empty, min(T, MLP_ROWS)  # the MLP runs R rows a call (see MLP_ROWS)
        h, qkv, att = e((T, C), np.float32), e((T, n_qkv), np.float32), e((T, nh * hd), np.float32)
        gu, act = e((R, 2 * n_i), np.float32), e((R, n_i), np.float32)
        xp, hp, qp, ap, gp, up = (addr(t) for t in (x, h, qkv, att, gu, act))
        pos = meta.positions
        if pos.dtype != np.int64 or pos.shape != (T,):
            raise ValueError("positions must be int64, one per row")
        pp = addr(pos)
        tables = {k: (addr(cos), addr(sin)) for k, (cos, sin) in self.rope.items()}
        norm, rope, silu = _qk.rms_norm, _qk.rope, _qk.silu_mul
        for i, p in enumerate(plan):
            norm(xp, p.norm1, hp, T, C, p.eps1, 0.0)
            p.qkv.run(hp, T, qp)
            if p.qkv_bias is not None:  # Qwen2: as QLinear.forward adds it, after the matmul
                qkv += p.qkv_bias
            cos, sin = tables[p.rope_kind]
            rope(qp, T, n_qkv, nh + nkv, hd, pp, cos, sin)  # q and k heads, in place
            meta.attention(p.window).run(i, qp, n_qkv, nh, ap, p.scale)  # writes k/v rows, attends
            p.o.run(ap, T, xp, True)  # x += o(attn)
            norm(xp, p.norm2, hp, T, C, p.eps2, 0.0)
            for r in range(0, T, R):  # rows [r, r + n): x += down(silu(gate) * up)
                n, off = min(R, T - r), 4 * r * C
                p.gate_up.run(hp + off, n, gp)
                silu(gp, up, n, n_i)
                p.down.run(up, n, xp + off, True)


class _LayerPlan(NamedTuple):
    """One plain Llama layer as the decode fast path calls it: norm weight pointers, the native
    matmul plans, the attention window and scale, the rope table."""

    norm1: int
    eps1: float
    qkv: Any  # _qk.Plan
    o: Any
    norm2: int
    eps2: float
    gate_up: Any
    down: Any
    window: int | None
    scale: float
    rope_kind: str
    qkv_bias: np.ndarray | None  # q|k|v biases (Qwen2), added after the projection

    @classmethod
    def of(cls, layer: object, cfg: ModelConfig) -> _LayerPlan | None:
        if type(layer) is not LlamaLayer:
            return None
        a, m = layer.self_attn, layer.mlp
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        lins = (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)
        n_qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        shapes = (a.qkv_proj.out_features, m.gate_up_proj.out_features)
        if (
            a.q_norm is not None
            or m.act != "silu"
            or n1.offset
            or n2.offset
            or any(lin.bias is not None for lin in lins[1:])
            or shapes != (n_qkv, 2 * cfg.intermediate_size)
        ):
            return None
        scale = a.scale if a.scale is not None else a.hd**-0.5
        return cls(
            addr(n1.weight), n1.eps, a.qkv_proj.plan, a.o_proj.plan, addr(n2.weight), n2.eps,
            m.gate_up_proj.plan, m.down_proj.plan, a.window, float(scale), a.rope_kind, a.qkv_proj.bias,
        )  # fmt: skip


def end_shapes(cfg: ModelConfig, shard: Shard) -> dict[str, tuple[int, ...]]:
    """The embedding (first stage; last too when the head is tied), final norm and head (last)."""
    C = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {}
    if shard.is_first or (shard.is_last and cfg.tie_word_embeddings):
        shapes["model.embed_tokens.weight"] = (cfg.vocab_size, C)
    if shard.is_last:
        shapes["model.norm.weight"] = (C,)
        if not cfg.tie_word_embeddings:
            shapes["lm_head.weight"] = (cfg.vocab_size, C)
    return shapes


def hf_weight_shapes(cfg: ModelConfig, shard: Shard) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensors (Hugging Face names and [out, in] shapes) that a stage needs."""
    C, I = cfg.hidden_size, cfg.intermediate_size
    shapes = end_shapes(cfg, shard)
    for i in range(shard.start_layer, shard.end_layer):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,)}
        shapes |= attention_shapes(cfg, p + "self_attn.", fused=False)
        shapes |= {
            p + "mlp.gate_proj.weight": (I, C),
            p + "mlp.up_proj.weight": (I, C),
            p + "mlp.down_proj.weight": (C, I),
        }
        if cfg.mlp_bias:
            shapes |= {
                p + "mlp.gate_proj.bias": (I,),
                p + "mlp.up_proj.bias": (I,),
                p + "mlp.down_proj.bias": (C,),
            }
    return shapes


def attention_shapes(cfg: ModelConfig, p: str, fused: bool) -> dict[str, tuple[int, ...]]:
    """The attention tensors under prefix p (`model.layers.N.self_attn.`)."""
    C, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    s: dict[str, tuple[int, ...]] = {p + "o_proj.weight": (C, q)}
    if fused:
        s[p + "qkv_proj.weight"] = (q + 2 * kv, C)
    else:
        s |= {p + "q_proj.weight": (q, C), p + "k_proj.weight": (kv, C), p + "v_proj.weight": (kv, C)}
    if cfg.qkv_bias:
        s |= {p + "q_proj.bias": (q,), p + "k_proj.bias": (kv,), p + "v_proj.bias": (kv,)}
    if cfg.o_bias:
        s[p + "o_proj.bias"] = (C,)
    if cfg.qk_norm:
        s |= {p + "q_norm.weight": (hd,), p + "k_norm.weight": (hd,)}
    return s


def load_attention(attn: Attention, w: Weights, p: str, cfg: ModelConfig, fused: bool = False) -> None:
    """Fill an Attention from the tensors under prefix p (q|k|v fused into one QLinear)."""
    parts = (
        [matrix(w, p + "qkv_proj.weight")] if fused else [matrix(w, p + f"{n}_proj.weight") for n in "qkv"]
    )
    bias = np.concatenate([vector(w, p + f"{n}_proj.bias") for n in "qkv"]) if cfg.qkv_bias else None
    attn.qkv_proj = QLinear(parts, bias)
    attn.o_proj = QLinear(
        [matrix(w, p + "o_proj.weight")], vector(w, p + "o_proj.bias") if cfg.o_bias else None
    )
    if attn.q_norm is not None and attn.k_norm is not None:
        attn.q_norm.weight[:] = vector(w, p + "q_norm.weight")
        attn.k_norm.weight[:] = vector(w, p + "k_norm.weight")


def load_hf_weights(stage: LlamaStage, w: Weights) -> None:
    """Put checkpoint tensors into the stage, as they are: no dequantization, no transposed copy."""
    cfg, shard = stage.cfg, stage.shard
    check_shapes(w, hf_weight_shapes(cfg, shard))
    load_ends(stage, w)
    for j, layer in enumerate(stage.layers):
        assert isinstance(layer, LlamaLayer)
        p = f"model.layers.{shard.start_layer + j}."
        layer.input_layernorm.weight[:] = vector(w, p + "input_layernorm.weight")
        layer.post_attention_layernorm.weight[:] = vector(w, p + "post_attention_layernorm.weight")
        load_attention(layer.self_attn, w, p + "self_attn.", cfg)
        m = p + "mlp."
        b = (
            {n: vector(w, m + n + ".bias") for n in ("gate_proj", "up_proj", "down_proj")}
            if cfg.mlp_bias
            else {}
        )
        gate_up = [matrix(w, m + "gate_proj.weight"), matrix(w, m + "up_proj.weight")]
        layer.mlp.gate_up_proj = QLinear(
            gate_up, np.concatenate([b["gate_proj"], b["up_proj"]]) if b else None
        )
        layer.mlp.down_proj = QLinear([matrix(w, m + "down_proj.weight")], b.get("down_proj"))


def load_ends(stage: LlamaStage, w: Weights) -> None:
    """The embedding (first stage), the final norm and head (last stage), the rope_freqs factors."""
    cfg = stage.cfg
    if stage.shard.is_first:
        stage.embed_tokens = QEmbedding(matrix(w, "model.embed_tokens.weight"))
    if "rope_freqs.weight" in w:
        stage.set_rope(vector(w, "rope_freqs.weight"))
    if stage.norm is not None:
        stage.norm.weight[:] = vector(w, "model.norm.weight")
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        stage.lm_head = QLinear([matrix(w, head)])


def matrix(w: Weights, name: str) -> QTensor:
    t = w[name]
    if not isinstance(t, QTensor):
        raise ModelFormatError(f"tensor {name} should be a matrix, got {type(t).__name__}")
    return t


def vector(w: Weights, name: str) -> np.ndarray:
    t = w[name]
    if not isinstance(t, np.ndarray) or t.ndim != 1:
        raise ModelFormatError(f"tensor {name} should be a vector, got {type(t).__name__}")
    return t.astype(np.float32)


def check_shapes(w: Weights, expected: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(w))
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelFormatError(f"checkpoint is missing tensors: {', '.join(missing[:5])}{more}")
    for name, shape in expected.items():
        if tuple(w[name].shape) != shape:
            raise ModelFormatError(f"tensor {name} has shape {tuple(w[name].shape)}, expected {shape}")
