"""Building blocks shared by the architecture files: the flat-batch metadata, the embedding over
quantized rows, and attention against each sequence's own KV cache. Linear layers are
`pipeserve.kernels.QLinear` (native kernels on the GGUF blocks).

A batch is flat: T tokens from many sequences, each sequence a contiguous run of rows. Linear
layers see the whole [T, C] matrix at once; attention runs per sequence against its own cache,
with all single-token (decode) chunks of a step batched together (see `DecodeBatch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeserve.kernels import DecodeAttention, QTensor, silu_mul
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


class DecodeBatch:
    """The batch's single-token chunks (decode steps), attended together by one native call per layer.

    `kernels.DecodeAttention` writes each new k/v row into its sequence's last block and attends
    over the sequence's blocks in place (no gather, no padding, no per-layer torch ops). The
    block tables are packed once per step (and once per sliding window size), not per layer.
    """

    def __init__(self, slots: list[SeqSlot], n_tokens: int) -> None:
        rows = [s.offset for s in slots]
        self.rows = None if rows == list(range(n_tokens)) else torch.tensor(rows)  # None: every row
        self.slots = slots
        width = max(len(s.cache.blocks) for s in slots)
        self.tables = torch.zeros(len(slots), width, dtype=torch.int64)  # [B, max_blocks]
        for i, s in enumerate(slots):
            self.tables[i, : len(s.cache.blocks)] = torch.tensor(s.cache.blocks)
        self._attention: dict[int | None, DecodeAttention] = {}

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: int,
        window: int | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """q: [T, nh, hd]; k, v: [T, n_kv, hd], views of one fused q|k|v projection (all rows)
        ->  [B, nh, hd] for the decode rows."""
        return self.attention(window)(layer, q, k, v, self.rows, scale)

    def attention(self, window: int | None) -> DecodeAttention:
        """The step's native attention for layers with this window (built once per step)."""
        attention = self._attention.get(window)
        if attention is None:
            pool = self.slots[0].pool
            lengths = [x.start_pos + 1 for x in self.slots]
            attention = DecodeAttention(pool.k, pool.v, self.tables, lengths, window=window)
            self._attention[window] = attention
        return attention


@dataclass
class BatchMeta:
    slots: list[SeqSlot]
    positions: torch.Tensor  # [T] int64, absolute position of every row
    sample_rows: torch.Tensor  # [S] int64, rows whose next-token logits the last stage needs
    decode: DecodeBatch | None = None  # the single-token chunks, attended together
    prefill: list[SeqSlot] = field(default_factory=list)  # the longer chunks, attended one by one

    @classmethod
    def build(cls, slots: list[SeqSlot], sample_rows: list[int]) -> BatchMeta:
        n_tokens = sum(s.length for s in slots)
        positions = torch.cat([torch.arange(s.start_pos, s.start_pos + s.length) for s in slots])
        singles = [s for s in slots if s.length == 1]
        return cls(
            slots,
            positions,
            torch.tensor(sample_rows, dtype=torch.long),
            DecodeBatch(singles, n_tokens) if singles else None,
            [s for s in slots if s.length > 1],
        )


class QEmbedding(nn.Module):
    """Token (or position) embedding over a matrix kept in block form: only looked-up rows become fp32."""

    def __init__(self, weight: QTensor) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.rows(ids)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: BatchMeta,
    layer: int,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Write this batch's k/v into each sequence's cache, then attend over its cached prefix.

    q: [T, n_heads, hd]; k, v: [T, n_kv, hd]  ->  [T, n_heads * hd]. `layer` is the stage-local
    index; `window` W limits a query at position i to keys j with i - W < j <= i (sliding-window
    layers); `scale` is the softmax scale (None: hd ** -0.5).
    """
    T, nh, hd = q.shape
    d = meta.decode
    if d is not None and d.rows is None:  # a pure decode step: no per-sequence work at all
        return d.attend(q, k, v, layer, window, scale).view(T, nh * hd)
    out = torch.empty(T, nh, hd)
    if d is not None:
        out[d.rows] = d.attend(q, k, v, layer, window, scale)
    for s in meta.prefill:
        rows = slice(s.offset, s.offset + s.length)
        end = s.start_pos + s.length
        bs = s.pool.block_size
        blocks = torch.tensor(s.cache.blocks, dtype=torch.int64)
        pos = torch.arange(s.start_pos, end)
        kp, vp = s.pool.k, s.pool.v  # [n_blocks, layers, n_kv, bs, hd]
        kp[blocks[pos // bs], layer, :, pos % bs] = k[rows]  # [t, n_kv, hd] into their blocks
        vp[blocks[pos // bs], layer, :, pos % bs] = v[rows]
        first = 0 if window is None else max(0, s.start_pos - window + 1)  # oldest key any query sees
        kpos = torch.arange(first, end)
        ki = kp[blocks[kpos // bs], layer, :, kpos % bs].transpose(0, 1).unsqueeze(0)  # [1, n_kv, n, hd]
        vi = vp[blocks[kpos // bs], layer, :, kpos % bs].transpose(0, 1).unsqueeze(0)
        qi = q[rows].transpose(0, 1).unsqueeze(0)  # [1, nh, t, hd]
        mask = None
        causal = s.start_pos == 0 and (window is None or s.length <= window)
        if not causal:  # a later chunk (causal offset by the prefix) or one longer than the window
            qpos = pos.unsqueeze(1)
            mask = kpos.unsqueeze(0) <= qpos  # [t, end - first]
            if window is not None:
                mask &= kpos.unsqueeze(0) > qpos - window
        o = F.scaled_dot_product_attention(
            qi, ki, vi, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=nh != ki.shape[1]
        )
        out[rows] = o[0].transpose(0, 1)
    return out.view(T, nh * hd)


def rope_tables(
    rope: RopeConfig, head_dim: int, max_position: int, freq_factors: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_position, head_dim / 2] for rotate-half RoPE, as transformers computes
    them (fp32 inverse frequencies, rescaled as `rope.kind` says; GGUF rope_freqs divide them)."""
    d = head_dim
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # [d/2]
    if rope.kind == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.kind == "llama3":
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif rope.kind == "yarn":
        inv_freq = _yarn_inv_freq(rope, d)
    if freq_factors is not None:
        if tuple(freq_factors.shape) != (d // 2,):
            raise ValueError(f"rope_freqs has shape {list(freq_factors.shape)}, expected [{d // 2}]")
        inv_freq = inv_freq / freq_factors
    angles = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq.float())  # [P, d/2]
    scale = rope.attention_factor if rope.kind == "yarn" else 1.0
    return (angles.cos() * scale).contiguous(), (angles.sin() * scale).contiguous()


def _yarn_inv_freq(rope: RopeConfig, d: int) -> torch.Tensor:
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
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, d, 2).float() / d)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (rope.factor * pos_freqs)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep


def gated_act(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """gate_up [T, 2I] (gate | up) -> act(gate) * up [T, I]; silu is one native pass."""
    if act == "silu":
        return silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    approximate = "none" if act == "gelu" else "tanh"  # gelu_pytorch_tanh, gelu_new
    return F.gelu(gate, approximate=approximate) * up
