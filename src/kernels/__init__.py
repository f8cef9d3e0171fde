"""Native kernels on GGUF-quantized weights: the one place with compiled code (see qk.cpp).

`QTensor` is a weight matrix kept in its on-disk block form ([N rows, row_bytes] uint8, each row K
weights); `QLinear` is the linear layer the model files use: y = x @ W^T (+ b) over one or more
QTensors stacked by rows (fused q|k|v, gate|up), computed by one native call on fp32 activations.
Arrays are numpy (C-contiguous float32 activations): the node runtime does not import torch.
`reference.py` has the pure-torch version of every kernel (tests only); tests compare the two on
every path the CPU can run (`set_isa`). `PIPESERVE_KERNEL_ISA=generic|avx2|avx512` forces a path
at import. `quantize` (fp32 -> Q8_0 / Q4_K / Q6_K blocks, for synthetic models) is a separate,
scalar module (quantize.cpp).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeserve.common import env
from pipeserve.kernels.types import TYPE_IDS, TYPES

log = logging.getLogger(__name__)

try:
    from pipeserve.kernels import _qk  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - a source tree where `make` has not built it yet
    raise ImportError(
        "pipeserve's native kernels (pipeserve.kernels._qk) are not built: run `make deps` "
        f"(or `pip install -e .`, which compiles src/kernels/*.cpp with g++) ({exc})"
    ) from exc

if isa := env.get("PIPESERVE_KERNEL_ISA"):
    _qk.set_isa(isa)

KERNEL_TYPES = tuple(name for name, _, _ in TYPES.values())  # every type with a native kernel

addr = _qk.addr  # addr(array) -> its data pointer; raises (ValueError from numpy) unless C-contiguous


def f32(x: np.ndarray) -> np.ndarray:
    """x as a C-contiguous float32 array (no copy when it is one already)."""
    return np.ascontiguousarray(x, dtype=np.float32)


def supported_isas() -> list[str]:
    """Kernel paths this CPU can run, lowest first (generic, avx2, avx512)."""
    return list(_qk.supported_isas())


def get_isa() -> str:
    return str(_qk.get_isa())


def matmul_isa(rows: int) -> str:
    """The path a matmul of `rows` activation rows runs on: the selected one, except that the
    avx512 selection runs 5..8 rows on the 8-lane avx2 loops (faster there; qk.cpp: call_isa)."""
    return str(_qk.matmul_isa(int(rows)))


def set_isa(name: str) -> None:
    _qk.set_isa(name)


def int8_path() -> str:
    """The kernels a QLinear in the lossy int8 mode runs on now (they follow set_isa): avx512-vnni,
    avx2-vnni, avx2 (maddubs, for CPUs without VNNI) or generic (qk_q8.h)."""
    return str(_qk.int8_path())


def set_int8_vnni(on: bool) -> None:
    """Tests: False runs the int8 kernels without VNNI (maddubs + madd) on a CPU that has it."""
    _qk.set_int8_vnni(bool(on))


def set_attention_lookahead(on: bool) -> None:
    """False: decode attention fetches the K and V blocks 4 KiB ahead into L1 (the look-ahead
    before 2026-12-07) instead of 32 positions ahead into L2 (f32, f16, bf16 caches). Only the
    speed differs, not the bits (benchmarks compare the two in one run)."""
    _qk.set_attention_lookahead(bool(on))


def set_pool_wait_all(on: bool) -> None:
    """True: a call on the kernels' pool also waits for every worker to have woken and looked for
    items, as calls did before 2026-12-07 (a worker the OS had descheduled then held the call until
    it ran again). Only the speed differs, not the bits (benchmarks compare the two in one run)."""
    _qk.set_pool_wait_all(bool(on))


def set_attention_tiles(on: bool) -> None:
    """False: a prefill chunk's rows attend one at a time instead of in tiles that read each K/V
    block once for all of them. The results are the same bits either way (tests compare them)."""
    _qk.set_attention_tiles(bool(on))


def set_tail_rows(on: bool) -> None:
    """False: a batched matmul's activation rows past its last whole chunk of 16 run as a chunk of
    their own (the cost of 16 rows) instead of in the decode loops (benchmarks compare the two)."""
    _qk.set_tail_rows(bool(on))


def set_batch_invariant(on: bool) -> None:
    """True: every exact matmul runs each activation row through the decode loops, whatever the
    batch, so a row's result has the bits it gets alone: a token's logits no longer depend on the
    requests it was batched with, on prefill chunking, on a failover replay or on the prefix cache
    (vLLM's VLLM_BATCH_INVARIANT, SGLang's deterministic inference). Costs prefill and large
    batches (the batched shapes are faster from 9 rows on). The int8 mode's rows are
    batch-invariant already; the portable (generic) path always is. Process-wide."""
    _qk.set_batch_invariant(bool(on))


def get_batch_invariant() -> bool:
    return bool(_qk.get_batch_invariant())


def set_threads(n: int) -> None:
    """Threads of the process's kernel pool (the calling thread is one of them)."""
    _qk.set_threads(int(n))


def get_threads() -> int:
    return int(_qk.get_threads())


@dataclass(eq=False)
class QTensor:
    """A [N, K] weight matrix in GGUF block form: `data` is uint8 [N, row_bytes], row-major (it may
    be a read-only view of a memory-mapped file)."""

    data: np.ndarray
    qtype: int  # ggml type id (types.TYPES)
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        name, elems, nbytes = TYPES[self.qtype]
        N, K = self.shape
        if K % elems:
            raise ValueError(f"{name} rows need a multiple of {elems} weights, got K={K}")
        want = (N, K // elems * nbytes)
        d = self.data
        if (
            not isinstance(d, np.ndarray)
            or d.dtype != np.uint8
            or d.shape != want
            or not d.flags.c_contiguous
        ):
            got = f"{d.dtype} {list(d.shape)}" if isinstance(d, np.ndarray) else type(d).__name__
            raise ValueError(f"{name} [{N}, {K}] needs contiguous uint8 data {list(want)}, got {got}")

    @property
    def type_name(self) -> str:
        return TYPES[self.qtype][0]

    @property
    def nbytes(self) -> int:
        return int(self.data.size)

    @classmethod
    def from_dense(cls, w: np.ndarray, type_name: str | None = None) -> QTensor:
        """A 2-D float matrix kept in its own dtype: float32 (F32), float16 (F16), or the raw
        uint16 bits of a bfloat16 matrix with type_name="BF16" (numpy has no bfloat16)."""
        names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
        name = type_name or names.get(w.dtype)
        ok = (name in ("F32", "F16") and names.get(w.dtype) == name) or (
            name == "BF16" and w.dtype == np.uint16
        )
        if not ok or w.ndim != 2:
            raise ValueError(
                f"expected a 2-D float32/float16 (or BF16 uint16) matrix, got {w.dtype} {list(w.shape)}"
            )
        w = np.ascontiguousarray(w)
        return cls(w.view(np.uint8).reshape(w.shape[0], -1), TYPE_IDS[name], (w.shape[0], w.shape[1]))

    def dequantize(self) -> np.ndarray:
        """fp32 copy of the whole matrix (tests and load-time conversions, never the hot path)."""
        return self.rows(np.arange(self.shape[0], dtype=np.int64))

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """fp32 [len(ids), K] of the given rows: the embedding lookup, exact as the reference."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((ids.size, self.shape[1]), np.float32)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.shape[0]):
            raise IndexError(f"row ids outside [0, {self.shape[0]})")
        _qk.dequant_rows(
            addr(self.data), self.qtype, self.data.shape[1], self.shape[1], addr(ids), ids.size, addr(out)
        )
        return out

    def transposed(self) -> QTensor:
        """[K, N] copy of a dense float matrix in its own dtype (GPT-2's Conv1D weights are [in, out])."""
        dtypes = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
        if self.type_name not in dtypes:
            raise ValueError(f"only dense float matrices can be transposed, not {self.type_name}")
        dense = self.data.view(dtypes[self.type_name]).reshape(self.shape)
        return QTensor.from_dense(np.ascontiguousarray(dense.T), self.type_name)

    def permute_rows(self, perm: np.ndarray) -> QTensor:
        """The matrix with its rows reordered (a row holds whole blocks, so this is exact)."""
        return QTensor(np.ascontiguousarray(self.data[perm]), self.qtype, self.shape)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, weight_offset: float = 0.0) -> np.ndarray:
    """x [T, C] fp32 -> x * rsqrt(mean(x^2) + eps) * (weight + weight_offset), one native pass."""
    x = f32(x)
    if weight.dtype != np.float32 or weight.shape != (x.shape[1],):
        raise ValueError(
            f"norm weight must be float32 [{x.shape[1]}], got {weight.dtype} {list(weight.shape)}"
        )
    y = np.empty_like(x)
    _qk.rms_norm(addr(x), addr(weight), addr(y), x.shape[0], x.shape[1], float(eps), float(weight_offset))
    return y


def _gate_up(gate_up: np.ndarray) -> np.ndarray:
    if gate_up.ndim != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate|up must be [T, 2I], got {list(gate_up.shape)}")
    return f32(gate_up)


def silu_mul(gate_up: np.ndarray) -> np.ndarray:
    """gate_up [T, 2I] (gate | up, as the fused projection returns it) -> silu(gate) * up [T, I]."""
    gate_up = _gate_up(gate_up)
    T, two_i = gate_up.shape
    y = np.empty((T, two_i // 2), np.float32)
    _qk.silu_mul(addr(gate_up), addr(y), T, two_i // 2)
    return y


def gelu(x: np.ndarray, approximate: bool) -> np.ndarray:
    """gelu(x) for x [T, I] fp32: exact (erf), or torch's approximate="tanh" form."""
    x = f32(x)
    T, n = x.shape
    y = np.empty_like(x)
    _qk.gelu(addr(x), addr(y), T, n, n, 0, 0, int(approximate))
    return y


def gelu_mul(gate_up: np.ndarray, approximate: bool) -> np.ndarray:
    """gate_up [T, 2I] (gate | up) -> gelu(gate) * up [T, I] (exact, or the tanh form)."""
    gate_up = _gate_up(gate_up)
    T, two_i = gate_up.shape
    n = two_i // 2
    y = np.empty((T, n), np.float32)
    a = addr(gate_up)
    _qk.gelu(a, addr(y), T, n, two_i, a + 4 * n, two_i, int(approximate))
    return y


def rope_(
    x: np.ndarray,
    n_heads: int,
    head_dim: int,
    positions: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
) -> None:
    """Rotate-half RoPE in place on the first `n_heads` heads of each row of x [T, >= n_heads*hd]
    (contiguous rows); cos, sin: [max_position, hd/2] fp32 tables; positions: int64 [T], every one
    below max_position (the caller checks that once per batch: this runs once per layer)."""
    if x.dtype != np.float32 or positions.dtype != np.int64 or positions.shape != (x.shape[0],):
        raise ValueError("rope_ needs float32 x [T, ...] and int64 positions [T]")
    if not x.flags.writeable or x.shape[1] < n_heads * head_dim:
        raise ValueError(
            f"rope_ rotates x [T, >= {n_heads * head_dim}] in place: got a read-only or narrower array"
        )
    for t in (cos, sin):
        if t.dtype != np.float32 or t.ndim != 2 or t.shape[1] != head_dim // 2:
            raise ValueError(
                f"rope tables must be float32 [max_position, {head_dim // 2}], got {t.dtype} {list(t.shape)}"
            )
    _qk.rope(addr(x), x.shape[0], x.shape[1], n_heads, head_dim, addr(positions), addr(cos), addr(sin))


# The KV cache's element types (`kv_dtype`): the numpy dtype a pool of that type has (bfloat16 is
# kept as its uint16 bits: numpy has no bfloat16; q8_0 as the bytes of ggml's block_q8_0, 34 per 32
# elements) and the native KvType (qk_types.h).
KV_DTYPES: dict[str, tuple[type[np.generic], int]] = {
    "f32": (np.float32, 0),
    "f16": (np.float16, 1),
    "bf16": (np.uint16, 2),
    "q8_0": (np.uint8, 3),
}
Q8_BLOCK_BYTES = 34  # block_q8_0: an fp16 scale, then 32 int8


def kv_row_items(head_dim: int, kv_dtype: str) -> int:
    """Items (of KV_DTYPES' numpy dtype) of one cached row of `head_dim` elements: the pool's last
    dimension. q8_0 needs a head_dim that is a multiple of 32 (ValueError naming both otherwise)."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype {kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
    if kv_dtype == "q8_0":
        if head_dim <= 0 or head_dim % 32:
            raise ValueError(
                f"kv_dtype 'q8_0' stores blocks of 32 elements: head_dim {head_dim} is not a multiple of 32"
            )
        return head_dim // 32 * Q8_BLOCK_BYTES
    return head_dim


def kv_row_bytes(head_dim: int, kv_dtype: str) -> int:
    """Bytes of one cached row (one position, one kv head, k or v) of `head_dim` elements."""
    return kv_row_items(head_dim, kv_dtype) * np.dtype(KV_DTYPES[kv_dtype][0]).itemsize


def kv_pack_k(rows: np.ndarray, kv_dtype: str) -> np.ndarray:
    """K as a pool stores it, from one row per position (the layout V keeps): [..., bs, row] of
    the kv_dtype's items -> the same shape, each block's [bs, hd] transposed to [hd, bs] (q8_0: the
    int8 as [hd, bs], then the half scales as [hd / 32, bs]; qk_types.h kv_k_at). For tests and
    benchmarks that write pools directly; the kernels write K this way themselves."""
    lead, bs, row = rows.shape[:-2], rows.shape[-2], rows.shape[-1]
    if kv_dtype != "q8_0":
        return np.ascontiguousarray(np.swapaxes(rows, -1, -2)).reshape(rows.shape)
    blocks = rows.reshape(*lead, bs, row // Q8_BLOCK_BYTES, Q8_BLOCK_BYTES)
    q = np.swapaxes(blocks[..., 2:].reshape(*lead, bs, -1), -1, -2).reshape(*lead, -1)  # [hd, bs]
    d = np.moveaxis(blocks[..., :2], -3, -2).reshape(*lead, -1)  # [hd / 32, bs, 2 bytes]
    return np.ascontiguousarray(np.concatenate([q, d], axis=-1)).reshape(rows.shape)


def kv_unpack_k(pool: np.ndarray, kv_dtype: str) -> np.ndarray:
    """The inverse of kv_pack_k: a pool's K blocks as one row per position."""
    lead, bs, row = pool.shape[:-2], pool.shape[-2], pool.shape[-1]
    if kv_dtype != "q8_0":
        flat = pool.reshape(*lead, row, bs)
        return np.ascontiguousarray(np.swapaxes(flat, -1, -2))
    nb = row // Q8_BLOCK_BYTES
    hd = nb * 32
    flat = pool.reshape(*lead, bs * row)
    q = np.swapaxes(flat[..., : hd * bs].reshape(*lead, hd, bs), -1, -2).reshape(*lead, bs, nb, 32)
    d = np.moveaxis(flat[..., hd * bs :].reshape(*lead, nb, bs, 2), -3, -2)  # [bs, nb, 2]
    return np.ascontiguousarray(np.concatenate([d, q], axis=-1)).reshape(pool.shape)


def kv_dtype_of(pool: np.ndarray) -> str:
    """The kv_dtype name of a pool array (ValueError for any other dtype)."""
    for name, (dt, _) in KV_DTYPES.items():
        if pool.dtype == dt:
            return name
    raise ValueError(
        "KV pools are float32 (f32), float16 (f16), uint16 bits of bfloat16 (bf16) or uint8 Q8_0 blocks "
        f"(q8_0), got {pool.dtype}"
    )


def kv_head_dim(pool: np.ndarray) -> int:
    """head_dim of a pool [blocks, layers, n_kv, bs, row] (a q8_0 row holds blocks of 32)."""
    row = pool.shape[-1]
    return row // Q8_BLOCK_BYTES * 32 if kv_dtype_of(pool) == "q8_0" else row


class PagedAttention:
    """Causal attention of a flat batch's rows over a paged KV cache, read in place.

    `k_pool` / `v_pool`: [n_blocks, layers, n_kv, block_size, row] (contiguous) of float32, float16,
    bfloat16 bits (uint16), row = hd, or Q8_0 blocks (uint8, row = kv_row_items): the kv_dtype
    (KV_DTYPES); a block's K is stored transposed (`kv_pack_k`), V one row per position. Row b of the
    batch belongs to a sequence whose block ids (in position order) are tables[b] (int64
    [B, max_blocks]) and sits at position lengths[b] - 1: a decode step is one row per sequence;
    a prefill chunk of t tokens is t rows with the same table and consecutive lengths. Each layer
    is one native call (`run`) that first writes every row's new k/v into its block (rounded to the
    kv_dtype: to nearest even, or ggml's Q8_0 rule), then lets each row attend to positions [starts[b], lengths[b])
    (with `window` W: its last W positions), in fp32. A row's positions are cut into splits of 512
    (whole blocks) that run in parallel and merge (flash-decoding); the cut depends on the row alone.
    Built once per step (and per window size), not per layer.
    """

    def __init__(
        self,
        k_pool: np.ndarray,
        v_pool: np.ndarray,
        tables: np.ndarray,
        lengths: Sequence[int] | np.ndarray,
        window: int | None = None,
    ) -> None:
        for pool in (k_pool, v_pool):
            if (
                pool.dtype not in [dt for dt, _ in KV_DTYPES.values()]
                or not pool.flags.c_contiguous
                or not pool.flags.writeable
                or pool.ndim != 5
            ):
                raise ValueError(
                    "KV pools need contiguous writable [blocks, layers, n_kv, bs, row] of float32, float16, "
                    f"uint16 (bf16 bits) or uint8 (q8_0 blocks), got {pool.dtype}"
                )
        if k_pool.dtype != v_pool.dtype:
            raise ValueError(f"k and v pools differ in dtype: {k_pool.dtype} vs {v_pool.dtype}")
        self.kv_dtype = kv_dtype_of(k_pool)
        if k_pool.shape != v_pool.shape:
            raise ValueError(f"k and v pools differ: {k_pool.shape} vs {v_pool.shape}")
        self.k_pool, self.v_pool = k_pool, v_pool
        self.tables = np.ascontiguousarray(tables, dtype=np.int64)
        if self.tables.ndim != 2:
            raise ValueError(f"tables must be [B, max_blocks], got {list(self.tables.shape)}")
        self.B = self.tables.shape[0]
        _, self.n_layers, self.n_kv, self.bs, _ = k_pool.shape
        self.hd = kv_head_dim(k_pool)
        if self.tables.size and (int(self.tables.min()) < 0 or int(self.tables.max()) >= k_pool.shape[0]):
            raise ValueError(f"block ids outside the pool's {k_pool.shape[0]} blocks")
        self.lengths = np.ascontiguousarray(lengths, dtype=np.int64).reshape(-1)
        if self.lengths.size != self.B or (self.lengths <= 0).any():
            raise ValueError(f"lengths {self.lengths.tolist()} do not match {self.B} rows")
        if (self.lengths > self.tables.shape[1] * self.bs).any():
            raise ValueError(f"lengths {self.lengths.tolist()} do not fit {self.tables.shape[1]} blocks")
        if window is not None and window < 1:
            raise ValueError(f"a sliding window must hold at least one position, got {window}")
        self.starts = (
            np.maximum(self.lengths - window, 0) if window is not None else np.zeros_like(self.lengths)
        )
        kv_type = KV_DTYPES[self.kv_dtype][1]
        self._kv = _qk.PagedKV(
            k_pool, v_pool, self.tables, self.lengths, self.starts, kv_type
        )  # native, per step

    def __call__(self, layer: int, qkv: np.ndarray, n_heads: int, scale: float | None = None) -> np.ndarray:
        """qkv: fp32 [B, (n_heads + 2 n_kv) hd], one fused projection (q heads, then k, then v)
        -> [B, n_heads * hd]."""
        hd, nkv = self.hd, self.n_kv
        if (
            qkv.dtype != np.float32
            or not qkv.flags.c_contiguous
            or qkv.shape != (self.B, (n_heads + 2 * nkv) * hd)
        ):
            raise ValueError(
                f"qkv must be contiguous fp32 [{self.B}, {(n_heads + 2 * nkv) * hd}], got {qkv.dtype} {list(qkv.shape)}"
            )
        out = np.empty((self.B, n_heads * hd), np.float32)
        self.run(layer, addr(qkv), qkv.shape[1], n_heads, addr(out), hd**-0.5 if scale is None else scale)
        return out

    def run(
        self, layer: int, qkv_ptr: int, row_stride: int, n_heads: int, out_ptr: int, scale: float
    ) -> None:
        """The same call on raw pointers, for a caller that checked the shapes once per step:
        rows 0..B-1 of a contiguous fp32 q|k|v projection [B, row_stride] at `qkv_ptr` (q: n_heads
        heads, then n_kv of k and of v) -> out [B, n_heads, hd] at `out_ptr`. A layer outside the
        pool or a row stride that is not (n_heads + 2 n_kv) hd raises ValueError."""
        self._kv.attend(layer, qkv_ptr, row_stride, n_heads, out_ptr, scale)


class QLinear:
    """y = x @ W^T (+ b), W = the row-wise concatenation of `parts` (kept in block form).

    x: [T, K] fp32 -> y: [T, sum of parts' N]. One native call per forward whatever the parts'
    types are; the pool's threads split the output rows.
    """

    def __init__(self, parts: Sequence[QTensor], bias: np.ndarray | None = None) -> None:
        K = parts[0].shape[1]
        if any(p.shape[1] != K for p in parts):
            raise ValueError(f"fused parts must share K, got {[p.shape for p in parts]}")
        self.parts = list(parts)
        self.in_features, self.out_features = K, sum(p.shape[0] for p in parts)
        self.plan = _qk.Plan([(addr(p.data), p.qtype, p.shape[0], p.data.shape[1]) for p in parts], K)
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"bias has shape {list(bias.shape)}, expected [{self.out_features}]")
        self.bias = None if bias is None else f32(bias)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts) + (0 if self.bias is None else self.bias.size * 4)

    @property
    def lossy(self) -> bool:
        """The opt-in int8 mode, off by default: x rounded to int8 (a scale per 32 values) and dotted
        with the weight blocks in integers, as llama.cpp does (faster, not exact; qk_q8.h). Setting it
        True takes effect only where every part is Q4_K or Q6_K (K % 256 == 0) or Q4_1: read it back."""
        return bool(self.plan.lossy)

    @lossy.setter
    def lossy(self, on: bool) -> None:
        self.plan.lossy = bool(on)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def _input(self, x: np.ndarray) -> np.ndarray:
        x = f32(x)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"input must be [T, {self.in_features}], got {list(x.shape)}")
        return x

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = self._input(x)
        y = np.empty((x.shape[0], self.out_features), np.float32)
        self.plan.run(addr(x), x.shape[0], addr(y))
        if self.bias is not None:
            y += self.bias
        return y

    def add_to(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out += x @ W^T (+ b), in place: the residual add fused into the matmul. out: [T, N] fp32, contiguous."""
        x = self._input(x)
        if (
            out.dtype != np.float32
            or not out.flags.c_contiguous
            or not out.flags.writeable
            or out.shape != (x.shape[0], self.out_features)
        ):
            raise ValueError(f"out must be contiguous fp32 [{x.shape[0]}, {self.out_features}]")
        self.plan.run(addr(x), x.shape[0], addr(out), True)
        if self.bias is not None:
            out += self.bias
        return out

    def __repr__(self) -> str:
        types = "|".join(p.type_name for p in self.parts)
        return f"QLinear(in={self.in_features}, out={self.out_features}, types={types})"


QUANTIZE_TYPES = ("Q8_0", "Q4_K", "Q6_K")  # what `quantize` writes


def quantize(x: np.ndarray, type_name: str, threads: int = 1) -> np.ndarray:
    """fp32 x [N, K] (finite; K a multiple of the type's block) -> its GGUF blocks, uint8
    [N, K / block * block_bytes], on `threads` threads. ggml's block layouts with our own scale
    choices (quantize.cpp); `reference.quantize` is the same algorithm in numpy, byte for byte."""
    try:
        from pipeserve.kernels import _qk_quant  # type: ignore[attr-defined]
    except ImportError as exc:  # pragma: no cover - built by `make kernels` with _qk
        raise ImportError(f"pipeserve.kernels._qk_quant is not built: run `make kernels` ({exc})") from exc
    if type_name not in QUANTIZE_TYPES:
        raise ValueError(f"no quantizer for {type_name} (have {', '.join(QUANTIZE_TYPES)})")
    tid = TYPE_IDS[type_name]
    _, elems, nbytes = TYPES[tid]
    x = f32(x)
    if x.ndim != 2 or x.shape[1] % elems:
        raise ValueError(f"{type_name} needs [N, K] with K a multiple of {elems}, got {list(x.shape)}")
    out = np.empty((x.shape[0], x.shape[1] // elems * nbytes), np.uint8)
    _qk_quant.quantize(tid, addr(x), x.size // elems, addr(out), int(threads))
    return out


def to_f16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> IEEE half bits (uint16), rounded as the quantizer rounds its scales (tests)."""
    from pipeserve.kernels import _qk_quant  # type: ignore[attr-defined]

    x = f32(x).reshape(-1)
    out = np.empty(x.size, np.uint16)
    _qk_quant.to_f16(addr(x), x.size, addr(out))
    return out
