"""Building blocks shared by the architecture files: the flat-batch metadata, the transposed
linear layer, and per-sequence attention against each sequence's own KV cache.

A batch is flat: T tokens from many sequences, each sequence a contiguous run of rows. Linear
layers see the whole [T, C] matrix at once; attention runs per sequence (see `attend`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeserve.modeling.kv_cache import SeqCache


@dataclass
class SeqSlot:
    """One sequence's rows in a flat batch."""

    offset: int  # first row in the flat batch
    length: int  # tokens in this chunk
    start_pos: int  # position of its first token
    cache: SeqCache


@dataclass
class BatchMeta:
    slots: list[SeqSlot]
    positions: torch.Tensor  # [T] int64, absolute position of every row
    sample_rows: torch.Tensor  # [S] int64, rows whose next-token logits the last stage needs


class TLinear(nn.Module):
    """y = x @ W + b with W stored transposed, [in, out].

    On this CPU the [in, out] layout lets MKL use both cores for decode-shaped (few-row) matmuls;
    the usual [out, in] layout (F.linear) ran the LM head ~2x slower.
    """

    def __init__(self, n_in: int, n_out: int, bias: bool = False) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(torch.empty(n_in, n_out), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(n_out), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return x @ self.weight_t
        return torch.addmm(self.bias, x, self.weight_t)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: BatchMeta, layer: int) -> torch.Tensor:
    """Write this chunk's k/v into each sequence's cache, then attend over its cached prefix.

    q: [T, n_heads, hd]; k, v: [T, n_kv, hd]  ->  [T, n_heads * hd]
    """
    T, nh, hd = q.shape
    out = torch.empty(T, nh, hd)
    for s in meta.slots:
        rows = slice(s.offset, s.offset + s.length)
        end = s.start_pos + s.length
        kc, vc = s.cache.k[layer], s.cache.v[layer]  # [n_kv, capacity, hd]
        kc[:, s.start_pos : end] = k[rows].transpose(0, 1)
        vc[:, s.start_pos : end] = v[rows].transpose(0, 1)
        qi = q[rows].transpose(0, 1).unsqueeze(0)  # [1, nh, t, hd]
        ki, vi = kc[None, :, :end], vc[None, :, :end]  # [1, n_kv, end, hd]
        mask = None
        if s.length > 1 and s.start_pos > 0:  # a later prefill chunk: causal, offset by the prefix
            qpos = torch.arange(s.start_pos, end).unsqueeze(1)
            mask = torch.arange(end).unsqueeze(0) <= qpos  # [t, end]
        o = F.scaled_dot_product_attention(
            qi, ki, vi, attn_mask=mask, is_causal=s.length > 1 and s.start_pos == 0, enable_gqa=nh != ki.shape[1]
        )
        out[rows] = o[0].transpose(0, 1)
    return out.view(T, nh * hd)
