"""Building blocks shared by the architecture files: the flat-batch metadata, the embedding over
quantized rows, and attention against each sequence's own KV cache. Linear layers are
`pipeserve.kernels.QLinear` (native kernels on the GGUF blocks).

A batch is flat: T tokens from many sequences, each sequence a contiguous run of rows. Linear
layers see the whole [T, C] matrix at once; attention runs per sequence against its own cache,
with all single-token (decode) chunks of a step batched together (see `DecodeBatch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeserve.kernels import DecodeAttention, QTensor
from pipeserve.modeling.kv_cache import SeqCache


@dataclass
class SeqSlot:
    """One sequence's rows in a flat batch."""

    offset: int  # first row in the flat batch
    length: int  # tokens in this chunk
    start_pos: int  # position of its first token
    cache: SeqCache


class DecodeBatch:
    """The batch's single-token chunks (decode steps), attended together by one native call per layer.

    `kernels.DecodeAttention` writes each new k/v row into its sequence's cache and attends over the
    cached prefix in place (no gather into a padded buffer, no mask, no per-layer torch ops).
    Cache addresses are taken once per step, not per layer.
    """

    def __init__(self, slots: list[SeqSlot], n_tokens: int) -> None:
        rows = [s.offset for s in slots]
        self.rows = None if rows == list(range(n_tokens)) else torch.tensor(rows)  # None: every row
        self.attention = DecodeAttention(
            [s.cache.k for s in slots], [s.cache.v for s in slots], [s.start_pos + 1 for s in slots]
        )

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        """q: [T, nh, hd]; k, v: [T, n_kv, hd], views of one fused q|k|v projection (all rows)
        ->  [B, nh, hd] for the decode rows."""
        return self.attention(layer, q, k, v, self.rows)


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


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: BatchMeta, layer: int) -> torch.Tensor:
    """Write this batch's k/v into each sequence's cache, then attend over its cached prefix.

    q: [T, n_heads, hd]; k, v: [T, n_kv, hd]  ->  [T, n_heads * hd]
    """
    T, nh, hd = q.shape
    d = meta.decode
    if d is not None and d.rows is None:  # a pure decode step: no per-sequence work at all
        return d.attend(q, k, v, layer).view(T, nh * hd)
    out = torch.empty(T, nh, hd)
    if d is not None:
        out[d.rows] = d.attend(q, k, v, layer)
    for s in meta.prefill:
        rows = slice(s.offset, s.offset + s.length)
        end = s.start_pos + s.length
        kc, vc = s.cache.k[layer], s.cache.v[layer]  # [n_kv, capacity, hd]
        kc[:, s.start_pos : end] = k[rows].transpose(0, 1)
        vc[:, s.start_pos : end] = v[rows].transpose(0, 1)
        qi = q[rows].transpose(0, 1).unsqueeze(0)  # [1, nh, t, hd]
        ki, vi = kc[None, :, :end], vc[None, :, :end]  # [1, n_kv, end, hd]
        mask = None
        if s.start_pos > 0:  # a later prefill chunk: causal, offset by the prefix
            qpos = torch.arange(s.start_pos, end).unsqueeze(1)
            mask = torch.arange(end).unsqueeze(0) <= qpos  # [t, end]
        o = F.scaled_dot_product_attention(
            qi, ki, vi, attn_mask=mask, is_causal=s.start_pos == 0, enable_gqa=nh != ki.shape[1]
        )
        out[rows] = o[0].transpose(0, 1)
    return out.view(T, nh * hd)
