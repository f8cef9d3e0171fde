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

from collections.abc import Callable
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
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else self.hd**-0.5  # softmax scale
        self.q_norm = RMSNorm(self.hd, cfg.norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        # set by load_hf_weights: the matrices come in the form they are stored in
        self.qkv_proj: QLinear  # q, k, v fused: [T, C] -> [T, (nh + 2 nkv) hd]
        self.o_proj: QLinear

    def forward(self, x: np.ndarray, rope: RopeTables, meta: BatchMeta, layer: int) -> np.ndarray:
        nh, nkv, hd = self.nh, self.nkv, self.hd
        qkv = self.qkv_proj.forward(x)  # [T, (nh + 2 nkv) hd]
        self.norm_qk_(qkv)
        cos, sin = rope[self.rope_kind]
        rope_(qkv, nh + nkv, hd, meta.positions, cos, sin)  # q and k heads, in place
        return attend(qkv, nh, meta, layer, self.window, self.scale)

    __call__ = forward

    def norm_qk_(self, qkv: np.ndarray) -> None:
        """The per-head q and k RMSNorms (Qwen3, Gemma 3), in place on qkv [T, (nh + 2 nkv) hd]
        before RoPE; nothing for a model without them."""
        if self.q_norm is None or self.k_norm is None:
            return
        T, nh, nkv, hd = qkv.shape[0], self.nh, self.nkv, self.hd
        qkv[:, : nh * hd] = self.q_norm(qkv[:, : nh * hd].reshape(T * nh, hd)).reshape(T, nh * hd)
        qkv[:, nh * hd : (nh + nkv) * hd] = self.k_norm(
            qkv[:, nh * hd : (nh + nkv) * hd].reshape(T * nkv, hd)
        ).reshape(T, nkv * hd)


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
    """x += o(attn(norm1(x))); x += down(act(gate_up(norm2(x)))): the pre-norm block of the family."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        C = cfg.hidden_size
        self.input_layernorm = RMSNorm(C, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(C, cfg.norm_eps)
        self.mlp = GatedMLP(cfg)
        # the buffer widths of a step (the loader checks the weights' shapes against cfg)
        nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.widths = _Widths(C, (nh + 2 * nkv) * hd, nh * hd, cfg.intermediate_size)
        self.native: _Native | None = None  # set by the first forward, from the loaded modules

    def forward(self, x: np.ndarray, rope: RopeTables, meta: BatchMeta, layer: int) -> np.ndarray:
        """x: the residual stream [T, C] (C-contiguous fp32), added to in place and returned.

        Native calls on raw pointers into buffers made once per step (`_scratch`), in the order the
        modules' own calls make them (Attention.forward, QLinear.add_to, GatedMLP.forward), so the
        result is theirs bit for bit without their per-call Python (~80 us a layer at batch 1, a
        fifth of a step). Biases are added after their matmul, as QLinear does.
        """
        p = self.native or self.bind()
        C, n_qkv, _, n_i = w = self.widths
        T, xp = x.shape[0], addr(x)
        s = meta.scratch.get(w) or _scratch(meta, rope, w)
        h, qkv, qkv_p, att, gate_up, gate_up_p, act, R, pos, rope_p, _ = s
        _qk.rms_norm(xp, p.norm1, h, T, C, p.eps1, p.offset1)
        p.qkv.run(h, T, qkv_p)
        if p.qkv_bias is not None:
            qkv += p.qkv_bias
        if p.qk_norm is not None:
            p.qk_norm(qkv)
        cos, sin = rope_p[p.rope_kind]
        _qk.rope(qkv_p, T, n_qkv, p.n_rotated, p.head_dim, pos, cos, sin)  # q and k heads, in place
        meta.attention(p.window).run(layer, qkv_p, n_qkv, p.n_heads, att, p.scale)  # writes k/v, attends
        p.o.run(att, T, xp, True)  # x += o(attn)
        if p.o_bias is not None:
            x += p.o_bias
        _qk.rms_norm(xp, p.norm2, h, T, C, p.eps2, p.offset2)
        for r in range(0, T, R):  # rows [r, r + n): x += down(act(gate_up(h))), in place
            n, off = min(R, T - r), 4 * r * C
            p.gate_up.run(h + off, n, gate_up_p)
            if p.gate_up_bias is not None:
                gate_up[:n] += p.gate_up_bias
            if p.gelu is None:
                _qk.silu_mul(gate_up_p, act, n, n_i)
            else:
                _qk.gelu(gate_up_p, act, n, n_i, 2 * n_i, gate_up_p + 4 * n_i, 2 * n_i, p.gelu)
            p.down.run(act, n, xp + off, True)
            if p.down_bias is not None:
                x[r : r + n] += p.down_bias
        return x

    def bind(self) -> _Native:
        """Take what forward calls from the modules, once the loader has filled them (forward does
        at its first call; code that replaces a module or a bias later calls bind again)."""
        a, m, n1, n2 = self.self_attn, self.mlp, self.input_layernorm, self.post_attention_layernorm
        self.native = _Native(
            addr(n1.weight), n1.eps, n1.offset, a.qkv_proj.plan, a.qkv_proj.bias,
            a.norm_qk_ if a.q_norm is not None else None, a.rope_kind, a.nh + a.nkv, a.hd, a.window,
            a.nh, a.scale, a.o_proj.plan, a.o_proj.bias, addr(n2.weight), n2.eps, n2.offset,
            m.gate_up_proj.plan, m.gate_up_proj.bias, None if m.act == "silu" else int(m.act != "gelu"),
            m.down_proj.plan, m.down_proj.bias,
        )  # fmt: skip
        return self.native


class _Native(NamedTuple):
    """A LlamaLayer as its forward calls it, in one tuple. The modules' objects are scattered in
    memory and leave the CPU caches while the matmuls stream the weights: reading them through
    attribute chains (layer.self_attn.qkv_proj.plan, ...) on every call made SmolLM2's 30 layers
    3% slower than reading this."""

    norm1: int  # input_layernorm's weight [C] (address), eps, offset
    eps1: float
    offset1: float
    qkv: Any  # _qk.Plan: q|k|v [C -> (nh + 2 nkv) hd]
    qkv_bias: np.ndarray | None  # added after the matmul, as QLinear does
    qk_norm: Callable[[np.ndarray], None] | None  # Attention.norm_qk_ (Qwen3), None without
    rope_kind: str  # which rope table
    n_rotated: int  # nh + nkv heads (q and k)
    head_dim: int
    window: int | None
    n_heads: int
    scale: float  # softmax scale
    o: Any  # _qk.Plan
    o_bias: np.ndarray | None
    norm2: int
    eps2: float
    offset2: float
    gate_up: Any  # _qk.Plan: gate|up [C -> 2I]
    gate_up_bias: np.ndarray | None
    gelu: int | None  # None: SiLU; 1: GELU's tanh form (gelu_pytorch_tanh, gelu_new); 0: erf (gelu)
    down: Any  # _qk.Plan
    down_bias: np.ndarray | None


class _Widths(NamedTuple):
    """A LlamaLayer's buffer widths; also the key of its step's scratch in BatchMeta.scratch."""

    C: int  # hidden
    qkv: int  # (nh + 2 nkv) hd
    att: int  # nh hd
    inter: int  # I, the MLP's width


def _scratch(meta: BatchMeta, rope: RopeTables, w: _Widths) -> tuple[Any, ...]:
    """One step's buffers for LlamaLayer.forward, made by the stage's first layer and reused by the
    others (they run one after another; the step has one row per position of `meta`): addresses of
    h [T, C] (a norm's output), q|k|v [T, (nh + 2 nkv) hd] (also as an array, for biases and q/k
    norms), the attention output [T, nh hd], gate|up [R, 2I] (also as an array) and act [R, I] for
    R = min(T, MLP_ROWS) rows a call, then R, the positions and the rope tables' (cos, sin) by
    layer type, and last the arrays behind the addresses (kept alive with the step)."""
    pos = meta.positions
    if pos.dtype != np.int64 or pos.ndim != 1:
        raise ValueError("positions must be int64, one per row")
    T, e = pos.shape[0], np.empty
    R = min(T, MLP_ROWS)
    h, qkv, att = e((T, w.C), np.float32), e((T, w.qkv), np.float32), e((T, w.att), np.float32)
    gate_up, act = e((R, 2 * w.inter), np.float32), e((R, w.inter), np.float32)
    rope_p = {kind: (addr(cos), addr(sin)) for kind, (cos, sin) in rope.items()}
    keep = (h, att, act, pos)
    s = (addr(h), qkv, addr(qkv), addr(att), gate_up, addr(gate_up), addr(act), R, addr(pos), rope_p, keep)
    meta.scratch[w] = s
    return s


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
        for i, layer in enumerate(self.layers):
            x = layer.forward(x, self.rope, meta, i)
        if self.norm is None or self.lm_head is None:
            return x
        return self.lm_head(self.norm(x[meta.sample_rows]))

    __call__ = forward


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
