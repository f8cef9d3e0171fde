"""Native kernels on GGUF-quantized weights: the one place with compiled code (see qk.cpp).

`QTensor` is a weight matrix kept in its on-disk block form ([N rows, row_bytes] uint8, each row K
weights); `QLinear` is the linear layer the model files use: y = x @ W^T (+ b) over one or more
QTensors stacked by rows (fused q|k|v, gate|up), computed by one native call on fp32 activations.
`reference.py` has the pure-torch version of every kernel; tests compare the two on every path
the CPU can run (`set_isa`). `PIPESERVE_KERNEL_ISA=generic|avx2|avx512` forces a path at import.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pipeserve.kernels import reference
from pipeserve.kernels.reference import TYPE_IDS, TYPES

log = logging.getLogger(__name__)

try:
    from pipeserve.kernels import _qk  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - a source tree where `make` has not built it yet
    raise ImportError(
        "pipeserve's native kernels (pipeserve.kernels._qk) are not built: run `make deps` "
        f"(or `pip install -e .`, which compiles src/kernels/*.cpp with g++) ({exc})"
    ) from exc

if os.environ.get("PIPESERVE_KERNEL_ISA"):
    _qk.set_isa(os.environ["PIPESERVE_KERNEL_ISA"])

KERNEL_TYPES = tuple(name for name, _, _ in TYPES.values())  # every type with a native kernel


def supported_isas() -> list[str]:
    """Kernel paths this CPU can run, lowest first (generic, avx2, avx512)."""
    return list(_qk.supported_isas())


def get_isa() -> str:
    return str(_qk.get_isa())


def matmul_isa(rows: int) -> str:
    """The path a matmul of `rows` activation rows runs on: the selected one, except that the
    avx512 selection runs 2..191 rows on the 8-lane avx2 loops (faster there; qk.cpp: call_isa)."""
    return str(_qk.matmul_isa(int(rows)))


def set_isa(name: str) -> None:
    _qk.set_isa(name)


def set_threads(n: int) -> None:
    """Threads of the process's kernel pool (the calling thread is one of them)."""
    _qk.set_threads(int(n))


def get_threads() -> int:
    return int(_qk.get_threads())


@dataclass(eq=False)
class QTensor:
    """A [N, K] weight matrix in GGUF block form: `data` is uint8 [N, row_bytes], row-major."""

    data: torch.Tensor
    qtype: int  # ggml type id (reference.TYPES)
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        name, elems, nbytes = TYPES[self.qtype]
        N, K = self.shape
        if K % elems:
            raise ValueError(f"{name} rows need a multiple of {elems} weights, got K={K}")
        want = (N, K // elems * nbytes)
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != want or not self.data.is_contiguous():
            raise ValueError(
                f"{name} [{N}, {K}] needs contiguous uint8 data {list(want)}, got {self.data.dtype} {list(self.data.shape)}"
            )

    @property
    def type_name(self) -> str:
        return TYPES[self.qtype][0]

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> QTensor:
        """A 2-D float tensor kept in its own dtype (fp32, fp16 or bf16), as the checkpoint stored it."""
        names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
        if w.dtype not in names or w.dim() != 2:
            raise ValueError(f"expected a 2-D fp32/fp16/bf16 tensor, got {w.dtype} {list(w.shape)}")
        w = w.contiguous()
        return cls(
            w.view(torch.uint8).reshape(w.shape[0], -1), TYPE_IDS[names[w.dtype]], (w.shape[0], w.shape[1])
        )

    def dequantize(self) -> torch.Tensor:
        """fp32 copy of the whole matrix (tests and load-time conversions, never the hot path)."""
        return reference.dequantize(self.data, self.qtype, self.shape)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 [len(ids), K] of the given rows: the embedding lookup, exact as the reference."""
        ids = ids.to(torch.int64).contiguous()
        out = torch.empty(ids.numel(), self.shape[1])
        _qk.dequant_rows(
            self.data.data_ptr(),
            self.qtype,
            self.data.shape[1],
            self.shape[1],
            ids.data_ptr(),
            ids.numel(),
            out.data_ptr(),
        )
        return out

    def transposed(self) -> QTensor:
        """[K, N] copy of a dense float matrix in its own dtype (GPT-2's Conv1D weights are [in, out])."""
        dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        if self.type_name not in dtypes:
            raise ValueError(f"only dense float matrices can be transposed, not {self.type_name}")
        dense = self.data.view(dtypes[self.type_name]).reshape(self.shape)
        return QTensor.from_dense(dense.t().contiguous())

    def permute_rows(self, perm: torch.Tensor) -> QTensor:
        """The matrix with its rows reordered (a row holds whole blocks, so this is exact)."""
        return QTensor(self.data[perm].contiguous(), self.qtype, self.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    """x [T, C] fp32 -> x * rsqrt(mean(x^2) + eps) * (weight + weight_offset), one native pass."""
    x = x.contiguous()
    y = torch.empty_like(x)
    _qk.rms_norm(
        x.data_ptr(),
        weight.data_ptr(),
        y.data_ptr(),
        x.shape[0],
        x.shape[1],
        float(eps),
        float(weight_offset),
    )
    return y


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate | up, as the fused projection returns it) -> silu(gate) * up [T, I]."""
    gate_up = gate_up.contiguous()
    T, two_i = gate_up.shape
    y = torch.empty(T, two_i // 2)
    _qk.silu_mul(gate_up.data_ptr(), y.data_ptr(), T, two_i // 2)
    return y


def rope_(
    x: torch.Tensor,
    n_heads: int,
    head_dim: int,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> None:
    """Rotate-half RoPE in place on the first `n_heads` heads of each row of x [T, >= n_heads*hd]
    (contiguous rows); cos, sin: [max_position, hd/2] fp32 tables; positions: int64 [T], every one
    below max_position (the caller checks that once per batch: this runs once per layer)."""
    if not (x.is_contiguous() and positions.dtype == torch.int64 and positions.is_contiguous()):
        raise ValueError("rope_ needs contiguous x and int64 positions")
    _qk.rope(
        x.data_ptr(),
        x.shape[0],
        x.stride(0),
        n_heads,
        head_dim,
        positions.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
    )


class DecodeAttention:
    """Decode attention for B single-token sequences over a paged KV cache, read in place.

    `k_pool` / `v_pool`: fp32 [n_blocks, layers, n_kv, block_size, hd] (contiguous); `tables`:
    int64 [B, max_blocks], sequence b's block ids in position order; its new token sits at position
    lengths[b] - 1. Tables are built once per step; each layer is then one native call that writes
    the new k/v rows into their blocks and attends: `__call__(layer, q, k, v, rows, scale)` with
    q [T, nh, hd] and k, v [T, n_kv, hd] views of one fused q|k|v projection, `rows` the B batch
    rows (None: rows 0..B-1). With `window` W, each sequence attends to its last W positions only.
    """

    def __init__(
        self,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        tables: torch.Tensor,
        lengths: Sequence[int],
        window: int | None = None,
    ) -> None:
        if k_pool.dtype != torch.float32 or not k_pool.is_contiguous() or k_pool.shape != v_pool.shape:
            raise ValueError(
                f"KV pools need contiguous fp32 [blocks, layers, n_kv, bs, hd], got {k_pool.dtype}"
            )
        if not v_pool.is_contiguous() or v_pool.dtype != torch.float32:
            raise ValueError("KV pools need contiguous fp32 [blocks, layers, n_kv, bs, hd]")
        self.k_pool, self.v_pool = k_pool, v_pool
        self.B = tables.shape[0]
        _, self.n_layers, self.n_kv, self.bs, self.hd = k_pool.shape
        self.tables = tables.to(torch.int64).contiguous()
        if self.tables.numel() and (int(self.tables.min()) < 0 or int(self.tables.max()) >= k_pool.shape[0]):
            raise ValueError(f"block ids outside the pool's {k_pool.shape[0]} blocks")
        self.lengths = torch.tensor(list(lengths), dtype=torch.int64)
        if self.lengths.numel() != self.B or (self.lengths <= 0).any():
            raise ValueError(f"lengths {list(lengths)} do not match {self.B} sequences")
        self.starts = (
            (self.lengths - window).clamp(min=0) if window is not None else torch.zeros_like(self.lengths)
        )
        # what every layer's call shares, taken once per step (each layer then adds only its own)
        pool = self.k_pool
        self._layer_stride = pool.stride(1)
        self._pools = (pool.data_ptr(), self.v_pool.data_ptr(), pool.stride(0))
        self._seqs = (
            pool.stride(2),
            self.bs,
            self.tables.data_ptr(),
            self.tables.shape[1],
            self.lengths.data_ptr(),
            self.starts.data_ptr(),
            self.B,
        )

    def __call__(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rows: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        _, nh, hd = q.shape
        stride, ok = q.stride(0), (hd, 1)
        if (
            q.stride()[1:] != ok
            or k.stride() != (stride, *ok)
            or v.stride() != (stride, *ok)
            or q.dtype != torch.float32
            or k.dtype != torch.float32
            or v.dtype != torch.float32
        ):
            raise ValueError("q, k, v must be fp32 views of one [T, heads, hd] projection")
        if rows is not None and (rows.dtype != torch.int64 or rows.numel() != self.B):
            raise ValueError(f"rows must be int64 [{self.B}]")
        if not 0 <= layer < self.n_layers or hd != self.hd or k.shape[1] != self.n_kv:
            raise ValueError(f"layer {layer} / heads {k.shape[1]}x{hd} do not match the pool")
        out = torch.empty(self.B, nh, hd)
        ptrs = (q.data_ptr(), k.data_ptr(), v.data_ptr())
        rows_ptr = 0 if rows is None else rows.data_ptr()
        self._attend(layer, ptrs, stride, rows_ptr, out.data_ptr(), nh, hd**-0.5 if scale is None else scale)
        return out

    def run(
        self, layer: int, qkv_ptr: int, row_stride: int, n_heads: int, out_ptr: int, scale: float
    ) -> None:
        """The same call on raw pointers, for a caller that checked the shapes once per step:
        rows 0..B-1 of a contiguous fp32 q|k|v projection [B, row_stride] at `qkv_ptr` (q: n_heads
        heads, then n_kv of k and of v) -> out [B, n_heads, hd] at `out_ptr`."""
        hd, nkv = self.hd, self.n_kv
        if not 0 <= layer < self.n_layers or row_stride != (n_heads + 2 * nkv) * hd:
            raise ValueError(f"layer {layer} / row stride {row_stride} do not match the pool")
        ptrs = (qkv_ptr, qkv_ptr + 4 * n_heads * hd, qkv_ptr + 4 * (n_heads + nkv) * hd)
        self._attend(layer, ptrs, row_stride, 0, out_ptr, n_heads, scale)

    def _attend(
        self, layer: int, qkv: tuple[int, int, int], stride: int, rows: int, out: int, nh: int, scale: float
    ) -> None:
        _qk.attend_decode(
            *qkv,
            stride,
            rows,
            out,
            *self._pools,
            layer * self._layer_stride,
            *self._seqs,
            nh,
            self.n_kv,
            self.hd,
            scale,
        )


class QLinear(nn.Module):
    """y = x @ W^T (+ b), W = the row-wise concatenation of `parts` (kept in block form).

    x: [T, K] fp32 -> y: [T, sum of parts' N]. One native call per forward whatever the parts'
    types are; the pool's threads split the output rows.
    """

    def __init__(self, parts: Sequence[QTensor], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        K = parts[0].shape[1]
        if any(p.shape[1] != K for p in parts):
            raise ValueError(f"fused parts must share K, got {[p.shape for p in parts]}")
        self.parts = list(parts)
        self.in_features, self.out_features = K, sum(p.shape[0] for p in parts)
        self.plan = _qk.Plan([(p.data.data_ptr(), p.qtype, p.shape[0], p.data.shape[1]) for p in parts], K)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias has shape {list(bias.shape)}, expected [{self.out_features}]")
        self.bias = None if bias is None else bias.to(torch.float32).contiguous()

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts) + (0 if self.bias is None else self.bias.numel() * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        y = torch.empty(x.shape[0], self.out_features)
        self.plan.run(x.data_ptr(), x.shape[0], y.data_ptr())
        if self.bias is not None:
            y += self.bias
        return y

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out += x @ W^T (+ b), in place: the residual add fused into the matmul. out: [T, N] fp32, contiguous."""
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        if (
            out.dtype != torch.float32
            or not out.is_contiguous()
            or tuple(out.shape) != (x.shape[0], self.out_features)
        ):
            raise ValueError(f"out must be contiguous fp32 [{x.shape[0]}, {self.out_features}]")
        self.plan.run(x.data_ptr(), x.shape[0], out.data_ptr(), True)
        if self.bias is not None:
            out += self.bias
        return out

    def extra_repr(self) -> str:
        types = "|".join(p.type_name for p in self.parts)
        return f"in={self.in_features}, out={self.out_features}, types={types}"
