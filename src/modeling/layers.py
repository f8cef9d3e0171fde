"""Building blocks shared by the architecture files: the flat-batch metadata, the embedding over
quantized rows, norms, and attention against each sequence's own KV cache. Linear layers are
`pipeserve.kernels.QLinear` (native kernels on the GGUF blocks). Arrays are numpy float32.

A batch is flat: T tokens from many sequences, each sequence a contiguous run of rows. Linear
layers see the whole [T, C] matrix at once; attention is one native call per layer for every row
of the batch (decode steps and prefill chunks alike), each row against its own sequence's
blocks (see `BatchMeta.attention`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeserve.kernels import PagedAttention, QLinear, QTensor, f32, gelu_mul, rms_norm, silu_mul
from pipeserve.modeling.config import RopeConfig
from pipeserve.modeling.kv_cache import KVCachePool, SeqCache


@dataclass
class SeqSlot:
    """One sequence's rows in a flat batch."""

    offset: int  # first row in the flat batch
    length: int  # tokens in this chunk
    start_pos: int  # position of its first token
    cache: SeqCache  # its block table in `pool`
    pool: KVCachePool


@dataclass
class BatchMeta:
    slots: list[SeqSlot]
    positions: np.ndarray  # [T] int64, absolute position of every row
    sample_rows: np.ndarray  # [S] int64, rows whose next-token logits the last stage needs
    tables: np.ndarray  # [T, max_blocks] int64: row t's sequence's block table
    _attention: dict[int | None, PagedAttention] = field(default_factory=dict)
    # buffers a step's layers share (they run one after another), keyed by their owner and shapes
    scratch: dict[tuple[object, ...], Any] = field(default_factory=dict)

    @classmethod
    def build(cls, slots: list[SeqSlot], sample_rows: list[int]) -> BatchMeta:
        n_tokens = sum(s.length for s in slots)
        positions = (
            np.concatenate([np.arange(s.start_pos, s.start_pos + s.length, dtype=np.int64) for s in slots])
            if slots
            else np.zeros(0, np.int64)
        )
        width = max((len(s.cache.blocks) for s in slots), default=1)
        tables = np.zeros((n_tokens, width), np.int64)
        for s in slots:
            tables[s.offset : s.offset + s.length, : len(s.cache.blocks)] = s.cache.blocks
        if any(s.cache.holes for s in slots):  # blocks given up behind a sliding window: never read
            np.maximum(tables, 0, out=tables)
        return cls(slots, positions, np.asarray(sample_rows, dtype=np.int64), tables)

    def attention(self, window: int | None) -> PagedAttention:
        """The step's native attention for layers with this window (built once per step): row t
        writes its k/v at position positions[t] and attends causally over its sequence."""
        attention = self._attention.get(window)
        if attention is None:
            pool = self.slots[0].pool
            attention = PagedAttention(pool.k, pool.v, self.tables, self.positions + 1, window=window)
            self._attention[window] = attention
        return attention


def attend(
    qkv: np.ndarray,
    n_heads: int,
    meta: BatchMeta,
    layer: int,
    window: int | None = None,
    scale: float | None = None,
) -> np.ndarray:
    """Write this batch's k/v into each sequence's cache, then attend over its cached prefix.

    qkv: [T, (n_heads + 2 n_kv) hd], one fused projection (q heads, then k, then v) -> [T, n_heads
    * hd]. `layer` is the stage-local index; `window` W limits a query at position i to keys j with
    i - W < j <= i (sliding-window layers); `scale` is the softmax scale (None: hd ** -0.5).
    """
    return meta.attention(window)(layer, f32(qkv), n_heads, scale)


class QEmbedding:
    """Token (or position) embedding over a matrix kept in block form: only looked-up rows become fp32."""

    def __init__(self, weight: QTensor) -> None:
        self.weight = weight

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        return self.weight.rows(ids)


class RMSNorm:
    """x * rsqrt(mean(x^2) + eps) * (offset + weight); Gemma's norms have offset 1."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        self.weight = np.ones(dim, np.float32) - np.float32(offset)
        self.eps, self.offset = eps, offset

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return rms_norm(x, self.weight, self.eps, self.offset)  # one native pass

    forward = __call__


class LayerNorm:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dimension (GPT-2), in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        self.weight, self.bias = np.ones(dim, np.float32), np.zeros(dim, np.float32)
        self.eps = eps

    def __call__(self, x: np.ndarray) -> np.ndarray:
        mean = x.mean(axis=-1, keepdims=True, dtype=np.float32)
        d = x - mean
        var = np.mean(d * d, axis=-1, keepdims=True, dtype=np.float32)
        return d / np.sqrt(var + np.float32(self.eps)) * self.weight + self.bias


def modules(obj: object) -> Iterator[object]:
    """`obj` and every layer object reachable through its attributes and lists (each once)."""
    seen: set[int] = set()
    todo = [obj]
    while todo:
        o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        yield o
        if isinstance(o, (list, tuple)):
            todo.extend(o)
            continue
        if isinstance(o, (QTensor, np.ndarray)) or not hasattr(o, "__dict__"):
            continue
        if type(o).__module__.startswith("pipeserve."):
            todo.extend(v for v in vars(o).values() if isinstance(v, (list, tuple)) or hasattr(v, "__dict__"))


def weight_bytes(stage: object) -> tuple[int, dict[str, int]]:
    """Bytes of every weight the stage holds (each QTensor once, however many layers use it: a
    tied head shares the embedding's) and how many matrices of each type."""
    seen: dict[int, QTensor] = {}
    dense = 0
    for m in modules(stage):
        if isinstance(m, QLinear):
            seen |= {id(q): q for q in m.parts}
            dense += 0 if m.bias is None else m.bias.size * 4
        elif isinstance(m, QEmbedding):
            seen[id(m.weight)] = m.weight
        elif isinstance(m, RMSNorm):
            dense += m.weight.nbytes
        elif isinstance(m, LayerNorm):
            dense += m.weight.nbytes + m.bias.nbytes
    types: dict[str, int] = {}
    for q in seen.values():
        types[q.type_name] = types.get(q.type_name, 0) + 1
    return dense + sum(q.nbytes for q in seen.values()), types


def set_lossy_int8(stage: object, on: bool) -> tuple[int, int]:
    """The opt-in int8 mode (QLinear.lossy) on or off for the linear layers of a stage's blocks (a
    node's `lossy_int8`); returns (layers now in it, linear layers). Types without int8 kernels stay
    exact, and so does the LM head: it runs on one row per sequence (decode-shaped, where int8
    gains nothing: a 151936-row Q6_K head took 1.6x longer at one row) and its logits are what
    sampling sees."""
    head = getattr(stage, "lm_head", None)
    lins = [m for m in modules(stage) if isinstance(m, QLinear)]
    for lin in lins:
        lin.lossy = on and lin is not head
    return sum(lin.lossy for lin in lins), len(lins)


ROPE_BLOCK = 4096  # positions of the rope tables computed at once


def rope_tables(
    rope: RopeConfig, head_dim: int, max_position: int, freq_factors: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables [max_position, head_dim / 2] for rotate-half RoPE, as transformers computes
    them (fp32 inverse frequencies, rescaled as `rope.kind` says; GGUF rope_freqs divide them; the
    fp32 angles' cos and sin rounded from float64)."""
    d = head_dim
    f = np.float32
    inv_freq: np.ndarray = f(1.0) / (
        f(rope.theta) ** (np.arange(0, d, 2, dtype=np.int64).astype(f) / f(d))
    )  # [d/2]
    if rope.kind == "linear":
        inv_freq = inv_freq / f(rope.factor)
    elif rope.kind == "llama3":
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = f(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > f(low_wavelen), inv_freq / f(rope.factor), inv_freq)
        smooth = (f(rope.original_max_position) / wavelen - f(rope.low_freq_factor)) / f(
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (f(1) - smooth) * scaled / f(rope.factor) + smooth * scaled
        medium = ~(wavelen < f(high_wavelen)) & ~(wavelen > f(low_wavelen))
        inv_freq = np.where(medium, smoothed, scaled)
    elif rope.kind == "yarn":
        inv_freq = _yarn_inv_freq(rope, d)
    inv_freq = inv_freq.astype(f)
    if freq_factors is not None:
        if freq_factors.shape != (d // 2,):
            raise ValueError(f"rope_freqs has shape {list(freq_factors.shape)}, expected [{d // 2}]")
        inv_freq = inv_freq / freq_factors.astype(f)
    scale = rope.attention_factor if rope.kind == "yarn" else 1.0
    cos, sin = np.empty((max_position, d // 2), f), np.empty((max_position, d // 2), f)
    # in blocks of positions: the float64 temporaries stay a few MiB however long the context
    # (a node's memory budget counts the tables, not 4x them at load); the same values per entry
    for p in range(0, max_position, ROPE_BLOCK):
        angles = np.outer(np.arange(p, min(p + ROPE_BLOCK, max_position), dtype=f), inv_freq).astype(f)
        a64 = angles.astype(np.float64)  # [block, d/2] fp32 products, then cos/sin in float64
        cos[p : p + len(a64)] = np.cos(a64) * scale
        sin[p : p + len(a64)] = np.sin(a64) * scale
    return cos, sin


def _yarn_inv_freq(rope: RopeConfig, d: int) -> np.ndarray:
    f = np.float32

    def correction_dim(rotations: float) -> float:
        return (d * math.log(rope.original_max_position / (rotations * 2 * math.pi))) / (
            2 * math.log(rope.theta)
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = np.clip((np.arange(d // 2, dtype=f) - f(low)) / f(high - low), 0, 1).astype(f)
    pos_freqs = f(rope.theta) ** (np.arange(0, d, 2).astype(f) / f(d))
    extrapolation, interpolation = f(1.0) / pos_freqs, f(1.0) / (f(rope.factor) * pos_freqs)
    keep = f(1) - ramp  # 1: extrapolate (high frequencies), 0: interpolate
    return (interpolation * (f(1) - keep) + extrapolation * keep).astype(f)


# Rows per MLP call. The MLP's fp32 scratch is [rows, 3I] (gate|up, then act), the largest of a
# step: a 1024-token batch of Qwen2.5-1.5B (I = 8960) would take 105 MiB at once, 26 MiB in calls
# of 256 rows. A step of at most this many rows (the scheduler's max_batch_tokens by default) is one call.
MLP_ROWS = 256


def row_chunks(x: np.ndarray) -> Iterator[np.ndarray]:
    """Views of x [T, C] (contiguous) MLP_ROWS rows at a time, for an MLP that adds into x in place."""
    for r in range(0, x.shape[0], MLP_ROWS):
        yield x[r : r + MLP_ROWS]


def gated_act(gate_up: np.ndarray, act: str) -> np.ndarray:
    """gate_up [T, 2I] (gate | up) -> act(gate) * up [T, I]: one native pass."""
    if act == "silu":
        return silu_mul(gate_up)
    return gelu_mul(gate_up, approximate=act != "gelu")  # gelu_pytorch_tanh, gelu_new: the tanh form
