"""Native kernels vs their pure-torch reference, on every SIMD path this CPU can run (forced one by
one), every type, batch 1, 2, 7, 16, 64 (257 at the real shapes) and odd shapes, random blocks, the
real model shapes (Qwen2.5-Coder-1.5B's MLP and LM head) and the embedded GGUF's tensors.

The kernels take and return numpy arrays (the node runtime does not import torch); inputs are made
with numpy and the references run in torch on `torch.from_numpy` copies, in float64.

The bound is the issue's: relative error <= 1e-5, against float64 matmul on the reference-dequantized
weights: of the output norm (rel_err) for the small cases, of the largest output (max_rel_err, which
no single wrong row can hide in) at the real shapes.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeserve import kernels
from pipeserve.kernels import QLinear, QTensor, _qk, reference

ISAS = kernels.supported_isas()
BATCHES = (1, 2, 7, 16, 64)
TOL = 1e-5


@pytest.fixture(params=ISAS)
def isa(request):
    before = kernels.get_isa()
    kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa(before)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = kernels.get_threads()
    kernels.set_threads(request.param)
    yield request.param
    kernels.set_threads(before)


@pytest.fixture(autouse=True)
def kernel_settings_restored():
    """Every test leaves the process's ISA and thread count as it found them (later tests, and
    other files in the same process, assume the defaults)."""
    before = kernels.get_isa(), kernels.get_threads(), kernels.get_batch_invariant()
    yield
    after = kernels.get_isa(), kernels.get_threads(), kernels.get_batch_invariant()
    assert after == before, "a test left the kernel settings changed"


@contextmanager
def kernel_threads(n: int) -> Iterator[None]:
    """The kernel pool at n threads inside the block, restored after it whatever happens."""
    before = kernels.get_threads()
    kernels.set_threads(n)
    try:
        yield
    finally:
        kernels.set_threads(before)


def randn(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32)


def t64(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A float64 torch copy of a numpy array (or tensor), for the references."""
    return torch.from_numpy(np.array(a)).double() if isinstance(a, np.ndarray) else a.double()


def rel_err(y: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> float:
    y, ref = t64(y), t64(ref)
    assert y.shape == ref.shape, (y.shape, ref.shape)
    return ((y - ref).norm() / ref.norm()).item()


def bf16_bits(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A float32 matrix rounded to bfloat16: (its uint16 bits, its fp32 value)."""
    bf = torch.from_numpy(w).to(torch.bfloat16)
    return bf.view(torch.int16).numpy().view(np.uint16).copy(), bf.float().numpy()


# Offsets of the fp16 fields of each block type: d, then m (Q4_1, Q5_1) or dmin (Q4_K, Q5_K).
HALF_FIELDS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}


def random_halves(rng: np.random.Generator, n: int, subnormal: float = 0.0) -> np.ndarray:
    """n finite fp16 scales as a block stores them (uint8 [n, 2], little-endian), half of them
    negative: ggml writes d < 0 for Q4_0/Q5_0, and real Q4_1 tensors have m < 0 in every block.
    Magnitudes are log-uniform in [2^-7, 2^-2), so no block outweighs another by more than 32x
    (max_rel_err relies on it); a `subnormal` fraction has exponent field 0 instead, for the fp16
    conversions (such a block adds next to nothing to a matmul: only exact tests see it)."""
    bits = np.exp2(rng.uniform(-7, -2, n)).astype("<f2").view("<u2")
    tiny = rng.random(n) < subnormal
    bits[tiny] = rng.integers(1, 1 << 10, int(tiny.sum()), dtype=np.uint16)
    bits |= rng.integers(0, 2, n, dtype=np.uint16) << 15
    return bits.view(np.uint8).reshape(n, 2)


def random_qtensor(name: str, N: int, K: int, seed: int = 0, subnormal: float = 0.0) -> QTensor:
    """Random blocks of a type: random bytes, with every fp16 field (d, m, dmin) replaced by a
    finite value of either sign (random_halves). The other fields keep their random bytes: Q6_K's
    int8 sub-block scales are negative half of the time, Q8_0's int8 quants likewise. Dense types
    are standard normal values."""
    rng = np.random.default_rng(seed)
    tid = reference.TYPE_IDS[name]
    _, elems, nbytes = reference.TYPES[tid]
    if elems == 1:
        w = randn(rng, N, K)
        if name == "BF16":
            return QTensor.from_dense(bf16_bits(w)[0], "BF16")
        return QTensor.from_dense(w if name == "F32" else w.astype(np.float16))
    raw = rng.integers(0, 256, size=(N, K // elems * nbytes), dtype=np.uint8)
    blocks = raw.reshape(-1, nbytes)
    for off in HALF_FIELDS[name]:
        blocks[:, off : off + 2] = random_halves(rng, blocks.shape[0], subnormal)
    return QTensor(raw, tid, (N, K))


def ref_weights(qt: QTensor) -> torch.Tensor:
    """The torch reference's dequantization of a QTensor, in float64 (independent of the native code)."""
    return reference.dequantize(torch.from_numpy(qt.data.copy()), qt.qtype, qt.shape).double()


def test_cpu_paths_are_detected():
    assert ISAS[0] == "generic" and kernels.get_isa() == ISAS[-1]  # the best path is the default
    import platform

    if platform.machine() in ("x86_64", "AMD64"):
        flags = Path("/proc/cpuinfo").read_text()
        assert ("avx2" in ISAS) == (" avx2" in flags and " fma" in flags)
        assert ("avx512" in ISAS) == (" avx512bw" in flags and " avx512vl" in flags)
    with pytest.raises(ValueError, match="unknown kernel ISA"):
        kernels.set_isa("sse9")


def test_reference_matches_gguf_dequantize():
    """The torch reference and the native dequantization (`dequantize`, `rows`) both equal the gguf
    package's numpy dequantization exactly, every type."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    ids = np.array([5, 0, 3, 3], dtype=np.int64)
    for name in reference.TYPE_IDS:
        qt = random_qtensor(name, 6, 512, seed=1, subnormal=1 / 8)
        ref = dequantize(qt.data, GGMLQuantizationType[name]).reshape(6, 512)
        assert np.array_equal(ref_weights(qt).float().numpy(), ref), name
        native = qt.dequantize()
        assert native.dtype == np.float32 and np.array_equal(native, ref), name
        assert np.array_equal(qt.rows(ids), ref[ids]), name


def test_random_blocks_have_scales_of_both_signs():
    """The generator writes what real files hold: d, m and dmin of both signs, all finite; Q6_K's
    int8 sub-block scales of both signs; subnormal fields only when asked for."""
    seen_subnormal = False
    for name, offsets in HALF_FIELDS.items():
        nbytes = reference.TYPES[reference.TYPE_IDS[name]][2]
        for subnormal in (0.0, 1 / 8):
            blocks = random_qtensor(name, 64, 512, seed=3, subnormal=subnormal).data.reshape(-1, nbytes)
            for off in offsets:
                h = blocks[:, off : off + 2].copy().view("<f2").ravel().astype(np.float32)
                assert np.isfinite(h).all() and (h < 0).any() and (h > 0).any(), (name, off)
                tiny = (np.abs(h) < 2.0**-14).any()
                assert not tiny or subnormal, (name, off)
                seen_subnormal |= bool(tiny)
    assert seen_subnormal
    q6 = random_qtensor("Q6_K", 64, 512).data.reshape(-1, 210)[:, 192:208].view(np.int8)
    assert (q6 < 0).any() and (q6 > 0).any()


def test_matmul_path_per_batch_size(isa):
    """Every selection runs every size itself (5..8 rows used to take avx2 on avx512: they now take
    passes of the one-row loop, which must run on the ISA one row runs on to give its bits)."""
    want = {T: isa for T in (1, 2, 4, 5, 8, 9, 16, 191, 192, 256)}
    assert {T: kernels.matmul_isa(T) for T in want} == want


@pytest.mark.parametrize("name", list(reference.TYPE_IDS))
def test_up_to_8_rows_each_row_gets_the_bits_it_gets_alone(name, isa, threads):
    """A speculative step verifies a stream's token and up to 7 drafts in one call: each of those
    rows must equal, bit for bit, the row computed alone (one-token decoding), so that greedy
    output is identical with and without speculation (qk_types.h: MV_PASS_MAX_T)."""
    K = 512 if reference.TYPES[reference.TYPE_IDS[name]][1] > 1 else 96
    qt = random_qtensor(name, 70, K, seed=11)
    lin = QLinear([qt])
    x = randn(np.random.default_rng(3), 8, K)
    alone = np.concatenate([lin(x[t : t + 1]) for t in range(8)])
    for T in range(2, 9):
        y = lin(x[:T])
        assert np.array_equal(y, alone[:T]), f"{isa} {name} T={T}: rows differ from one-row calls"


@pytest.mark.parametrize("name", ["Q4_1", "Q4_K", "Q6_K", "Q8_0"])
def test_rows_past_the_last_whole_chunk_take_the_decode_loops(name, isa, threads):
    """A batched call of T rows (8 < T < 192) runs its rows in chunks of 16; the few rows past the
    last whole chunk (up to 8 on avx512, 4 on avx2) run as a call of their own in the decode loops
    (a partial chunk costs a whole one), and so do 9 to 12 rows of Q4_K / Q6_K (avx2: 9 to 11; 8,
    then the rest) and, on avx512, of Q4_1: those rows get the bits they get alone, and every row stays within the tolerance of
    the reference, with the split and without it (set_tail_rows(False))."""
    if isa == "generic":
        pytest.skip("the portable path has no chunks")
    K = 512
    qt = random_qtensor(name, 70, K, seed=7)
    w = ref_weights(qt)
    lin = QLinear([qt])
    x = randn(np.random.default_rng(5), 40, K)
    limit = 8 if isa == "avx512" else 4
    small_max = 12 if isa == "avx512" else 11  # Q4_K / Q6_K at 9..small_max rows: 8, then the rest
    try:
        for T in (9, 10, 11, 12, 13, 17, 18, 20, 21, 24, 25, 33, 36, 40):
            kernels.set_tail_rows(True)
            y = lin(x[:T])
            assert rel_err(y, t64(x[:T]) @ w.t()) <= TOL, f"{isa} {name} T={T}"
            if T > 16 and limit >= T % 16:
                calls = [(0, T - T % 16), (T - T % 16, T)]
            elif (name in ("Q4_K", "Q6_K") or (name == "Q4_1" and isa == "avx512")) and small_max >= T:
                calls = [(0, 8), (8, T)]
            else:
                calls = [(0, T)]
            for a, b in calls:
                if b > a and (a, b) != (0, T):
                    assert np.array_equal(y[a:b], lin(x[a:b])), (
                        f"{isa} {name} T={T}: rows {a}..{b} differ from their own call"
                    )
            kernels.set_tail_rows(False)
            y_chunks = lin(x[:T])
            assert rel_err(y_chunks, t64(x[:T]) @ w.t()) <= TOL, f"{isa} {name} T={T}, split off"
            if calls[0] != (0, T) and T > 16:
                assert np.array_equal(y_chunks[: calls[0][1]], y[: calls[0][1]]), (
                    f"{isa} {name} T={T}: whole chunks differ"
                )
    finally:
        kernels.set_tail_rows(True)


@pytest.mark.parametrize("name", list(reference.TYPE_IDS))
def test_batch_invariant_mode_gives_every_row_its_alone_bits(name, isa, threads):
    """set_batch_invariant(True): at any T (the batched shapes' 9..191 rows, the panels' 192 and up,
    partial chunks) each row equals, bit for bit, the row computed alone, and stays within the
    reference's tolerance. Off (the default), the batched shapes sum in another order: on a SIMD
    path some rows differ in their last bits (what the mode is for)."""
    blocks = reference.TYPES[reference.TYPE_IDS[name]][1] > 1
    K = 512 if blocks else 96
    qt = random_qtensor(name, 70, K, seed=13)
    w = ref_weights(qt)
    lin = QLinear([qt])
    x = randn(np.random.default_rng(9), 257, K)
    alone = np.concatenate([lin(x[t : t + 1]) for t in range(257)])
    sizes = (9, 16, 17, 40, 191, 192, 257)
    differs = [T for T in sizes if not np.array_equal(lin(x[:T]), alone[:T])]
    assert differs or isa == "generic", f"{isa} {name}: the batched shapes gave the alone bits already"
    assert not differs or isa != "generic", f"{isa} {name}: the portable path depends on T"
    kernels.set_batch_invariant(True)
    try:
        for T in sizes:
            y = lin(x[:T])
            assert np.array_equal(y, alone[:T]), f"{isa} {name} T={T}: rows differ from one-row calls"
            assert rel_err(y, t64(x[:T]) @ w.t()) <= TOL, f"{isa} {name} T={T}"
    finally:
        kernels.set_batch_invariant(False)


@pytest.mark.parametrize("name", list(reference.TYPE_IDS))
def test_kernel_matches_reference_random_blocks(name, isa, threads):
    dense = reference.TYPES[reference.TYPE_IDS[name]][1] == 1
    shapes = [(64, 512), (37, 256), (130, 1536)] + ([(9, 200), (5, 33)] if dense else [])
    rng = np.random.default_rng(0)
    for N, K in shapes:
        if K % reference.TYPES[reference.TYPE_IDS[name]][1]:
            continue
        qt = random_qtensor(name, N, K, seed=N + K, subnormal=1 / 16)
        w = ref_weights(qt)
        lin = QLinear([qt])
        for T in (*BATCHES, 3, 8, 70, 200):  # every loop shape (qk_simd.h), partial chunks
            x = randn(rng, T, K)
            y = lin(x)
            assert y.dtype == np.float32 and y.shape == (T, N)
            err = rel_err(y, t64(x) @ w.t())
            assert err <= TOL, f"{isa} {name} [{N}, {K}] T={T}: {err:.2e}"


def test_accumulate_adds_into_the_output(isa, threads):
    """add_to: out += x @ W^T, on every loop shape (T = 1, dot tiles, k-major x with and without
    rows past its last whole chunk, panels)."""
    qt = random_qtensor("Q4_K", 70, 512, seed=5)
    lin, w = QLinear([qt]), ref_weights(qt)
    rng = np.random.default_rng(5)
    for T in (1, 7, 16, 19, 64, 200):
        x, base = randn(rng, T, 512), randn(rng, T, 70)
        out = base.copy()
        assert lin.add_to(x, out) is out
        assert rel_err(out, t64(base) + t64(x) @ w.t()) <= TOL


def test_fused_segments_of_mixed_types(isa, threads):
    """One plan over rows of several types (Gemma-style q|k|v) equals the stacked reference."""
    parts = [
        random_qtensor(n, r, 512, seed=i)
        for i, (n, r) in enumerate([("Q5_0", 96), ("Q8_0", 32), ("Q6_K", 40), ("F16", 8)])
    ]
    w = torch.cat([ref_weights(p) for p in parts])
    rng = np.random.default_rng(2)
    bias = randn(rng, 176)
    lin = QLinear(parts, bias)
    for T in (*BATCHES, 18, 23):  # (and rows past the last whole chunk of 16, in their own call)
        x = randn(rng, T, 512)
        assert rel_err(lin(x), t64(x) @ w.t() + t64(bias)) <= TOL
        out = np.zeros((T, 176), np.float32)
        assert rel_err(lin.add_to(x, out), t64(x) @ w.t() + t64(bias)) <= TOL


def test_embedded_model_tensors(isa, smol_full):
    """Real Q4_1 and Q8_0 tensors of the embedded GGUF (q|k|v fused, gate|up fused, the tied head)."""
    model = smol_full.model
    layer = model.layers[7]
    a, m = layer.self_attn, layer.mlp
    rng = np.random.default_rng(7)
    for lin in (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj, model.lm_head):
        w = torch.cat([ref_weights(p) for p in lin.parts])
        for T in BATCHES:
            x = randn(rng, T, lin.in_features)
            err = rel_err(lin(x), t64(x) @ w.t())
            assert err <= TOL, f"{isa} {lin!r} T={T}: {err:.2e}"


# ---------------------------------------------------------------- real shapes


REAL_T = (1, 2, 7, 16, 64, 257)  # every loop shape (qk_simd.h): 1-4 rows, 5-7, k-major x, panels
# The generic path runs one loop for every T (qk_generic.cpp: rows), so at the real shapes it takes
# the small T only (T = 257 would cost it ~2.5 s a matrix here); the odd shapes give it every T.
GENERIC_REAL_T = (1, 2, 7, 16)
QWEN_NK = ((1536, 8960), (8960, 1536))  # Qwen2.5-Coder-1.5B's ffn_down and ffn_gate / ffn_up (N x K)
HEAD_NK = (151936, 1536)  # its LM head (Q6_K in the Q4_K_M file)
HEAD_PERIOD = 2053  # distinct rows of the random head (head_case)
Cases = dict[int, tuple[np.ndarray, np.ndarray]]  # T -> (x [T, K] fp32, float64 reference [T, N])


def max_rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    """max |y - ref| / max |ref| over one call's output [T, N] (ref in float64); inf if y has a
    NaN or an infinity (a NaN compares false with any bound).

    The worst element against the largest output, not the norm-wise rel_err: over 151936 outputs a
    norm shrinks one wrong row's error by ~1/sqrt(N). No output row is small beside the largest
    (activations are standard normal and random_halves keeps block scales within 32x), so a wrong
    row anywhere counts >= ~3e-3, 300x the bound, and one dropped group of 32 weights ~1e-2 at the
    median (measured on these generators). A correct kernel's fp32 sums land at 3e-7..1e-6 for
    T <= 7 and 3e-6..5e-6 from T = 8 on at K = 8960 (those loops, like the generic path, sum each
    output serially over K).
    """
    if not np.isfinite(y).all():
        return float("inf")
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def check_calls(label: str, lin: QLinear, cases: Cases, ts: tuple[int, ...], same_bits: bool) -> list[str]:
    """Runs lin on each cases[T] = (x, float64 reference) for T in ts with the pool at 2 threads
    (it splits the rows) and, if same_bits, again at 1 thread, which must give the same bits: each
    output row is computed by one thread whatever the split. Returns the failures, described."""
    bad = []
    for T in ts:
        x, ref = cases[T]
        with kernel_threads(2):
            y = lin(x)
        err = max_rel_err(y, ref)
        if not err <= TOL:
            bad.append(f"{label} T={T} on {kernels.matmul_isa(T)}: error {err:.2e}")
        if same_bits:
            with kernel_threads(1):
                y1 = lin(x)
            if not np.array_equal(y1, y, equal_nan=True):
                rows = np.unique(np.nonzero(y1 != y)[1])
                bad.append(
                    f"{label} T={T} on {kernels.matmul_isa(T)}: 1 and 2 threads differ in {rows.size} "
                    f"weight rows (first {rows[:5].tolist()}), by up to {max_rel_err(y1, y):.1e} of the output"
                )
    return bad


def reference_cases(w: torch.Tensor, ts: tuple[int, ...], rng: np.random.Generator) -> Cases:
    """T -> (x [T, K] fp32 standard normal, x @ w^T in float64) for each T, one matmul for all."""
    xs = [randn(rng, T, w.shape[1]) for T in ts]
    ref = (t64(np.concatenate(xs)) @ w.t()).numpy()
    return dict(zip(ts, zip(xs, np.split(ref, np.cumsum(ts)[:-1]), strict=True), strict=True))


@pytest.fixture(scope="module", params=list(reference.TYPE_IDS))
def qwen_case(request) -> list[tuple[QLinear, Cases]]:
    """One type's random blocks at both Qwen MLP shapes with every T's activations and float64
    references, built once for all ISAs. The [8960, 1536] matrix is the [1536, 8960] one's bytes
    read with 1536 weights a row (both are whole blocks, row-major): one dequantization serves both."""
    qt = random_qtensor(request.param, *QWEN_NK[0], seed=23)
    w = ref_weights(qt)
    rng = np.random.default_rng(23)
    out = []
    for N, K in QWEN_NK:
        view = QTensor(qt.data.reshape(N, -1), qt.qtype, (N, K))
        out.append((QLinear([view]), reference_cases(w.reshape(N, K), REAL_T, rng)))
    return out


def test_real_shapes_match_reference(qwen_case, isa):
    """Every type at Qwen2.5-Coder-1.5B's MLP shapes (N x K = 1536 x 8960, 8960 x 1536) for
    T = 1, 2, 7, 16, 64, 257 on the forced path, 2 threads: max_rel_err <= TOL for every call; on
    the 8960-row shape 1 thread gives the same bits (SIMD paths; the generic one is a plain loop
    over rows, checked at the odd shapes)."""
    bad = []
    for lin, cases in qwen_case:
        label = f"{lin.parts[0].type_name} [{lin.out_features}, {lin.in_features}]"
        ts = GENERIC_REAL_T if isa == "generic" else REAL_T
        bad += check_calls(label, lin, cases, ts, same_bits=isa != "generic" and lin.out_features == 8960)
    assert not bad, "\n".join(bad)


def odd_shapes(name: str) -> list[tuple[int, int]]:
    """N = 7, 33, 1000 (tails of every row tile, and of the pool's chunks: 33 rows split 16 + 16 + 1)
    by a K of one or three super-blocks, 3 or 47 blocks of 32, or a dense K that is no multiple
    of a vector."""
    elems = reference.TYPES[reference.TYPE_IDS[name]][1]
    ks = {256: (256, 768), 32: (96, 1504), 1: (33, 1001)}[elems]
    return [(N, K) for N in (7, 33, 1000) for K in ks]


@pytest.fixture(scope="module", params=list(reference.TYPE_IDS))
def odd_case(request) -> list[tuple[QLinear, Cases]]:
    rng = np.random.default_rng(7)
    out = []
    for i, (N, K) in enumerate(odd_shapes(request.param)):
        qt = random_qtensor(request.param, N, K, seed=100 + i)
        out.append((QLinear([qt]), reference_cases(ref_weights(qt), REAL_T, rng)))
    return out


def test_odd_shapes_match_reference(odd_case, isa):
    """Every type at odd shapes (odd_shapes), every T on every path (the generic one too), 2
    threads within TOL and 1 thread giving the same bits (generic: up to 33 rows, for time)."""
    bad = []
    for lin, cases in odd_case:
        label = f"{lin.parts[0].type_name} [{lin.out_features}, {lin.in_features}]"
        bad += check_calls(label, lin, cases, REAL_T, same_bits=isa != "generic" or lin.out_features <= 33)
    assert not bad, "\n".join(bad)


@pytest.fixture(scope="module", params=["Q4_K", "Q6_K"])
def head_case(request) -> tuple[QLinear, Cases]:
    """An LM head of Qwen's shape [151936, 1536]: the rows of a random [2053, 1536] matrix repeated
    in order, each copy negated at random by flipping the sign of its d (and dmin), which negates
    every weight exactly. The float64 reference costs 2053 rows, yet all 151936 outputs are
    checked, and a row read from a wrong place shows as a sign error half the time."""
    name = request.param
    N, K = HEAD_NK
    base = random_qtensor(name, HEAD_PERIOD, K, seed=151936)
    rng = np.random.default_rng(151936)
    src = np.arange(N) % HEAD_PERIOD
    data = base.data[src]
    neg = rng.random(N) < 0.5
    nbytes = reference.TYPES[base.qtype][2]
    blocks = data.reshape(N, -1, nbytes)  # [rows, super-blocks, bytes]
    for off in HALF_FIELDS[name]:
        blocks[neg, :, off + 1] ^= 0x80  # the sign bit of a little-endian fp16
    cases = reference_cases(ref_weights(base), (1, 16), rng)
    sign = np.where(neg, -1.0, 1.0)
    cases = {T: (x, ref[:, src] * sign) for T, (x, ref) in cases.items()}
    return QLinear([QTensor(data, base.qtype, HEAD_NK)]), cases


def test_lm_head_matches_reference(head_case, isa):
    """The LM head (Q4_K, Q6_K) for T = 1 and 16 (generic: 1), 2 threads within TOL, 1 thread the
    same bits."""
    lin, cases = head_case
    label = f"{lin.parts[0].type_name} head [{lin.out_features}, {lin.in_features}]"
    ts = (1,) if isa == "generic" else (1, 16)
    bad = check_calls(label, lin, cases, ts, same_bits=isa != "generic")
    assert not bad, "\n".join(bad)


def test_embedding_rows_are_exact(smol_full):
    emb = smol_full.model.embed_tokens.weight
    ids = np.array([0, 1, 49151, 123, 123], dtype=np.int64)
    want = reference.dequantize(torch.from_numpy(emb.data[ids].copy()), emb.qtype, (ids.size, emb.shape[1]))
    assert np.array_equal(emb.rows(ids), want.numpy())
    for bad in (49152, -1):
        with pytest.raises(IndexError, match="row ids outside"):
            emb.rows(np.array([3, bad]))


def test_dense_matrices_transpose_and_permute_exactly():
    """F32, F16 and BF16 (given as its uint16 bits) keep their values; transposed() and
    permute_rows() move whole rows / elements without changing one bit."""
    rng = np.random.default_rng(4)
    w = randn(rng, 5, 7)
    bits, bf_values = bf16_bits(w)
    cases = [
        (QTensor.from_dense(w), w, "F32"),
        (QTensor.from_dense(w.astype(np.float16)), w.astype(np.float16).astype(np.float32), "F16"),
        (QTensor.from_dense(bits, "BF16"), bf_values, "BF16"),
    ]
    for qt, dense, name in cases:
        assert qt.type_name == name and qt.shape == (5, 7)
        assert np.array_equal(qt.dequantize(), dense), name
        t = qt.transposed()
        assert t.type_name == name and t.shape == (7, 5) and np.array_equal(t.dequantize(), dense.T), name
    q4 = random_qtensor("Q4_K", 5, 256, seed=9)
    perm = np.array([3, 0, 4, 1, 2])
    assert np.array_equal(q4.permute_rows(perm).dequantize(), q4.dequantize()[perm])
    with pytest.raises(ValueError, match="only dense float matrices"):
        q4.transposed()


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        QTensor(np.zeros((4, 18), np.uint8), reference.TYPE_IDS["Q4_0"], (4, 40))
    with pytest.raises(ValueError, match="needs contiguous uint8 data"):
        QTensor(np.zeros((4, 17), np.uint8), reference.TYPE_IDS["Q4_0"], (4, 32))
    with pytest.raises(ValueError, match="share K"):
        QLinear([random_qtensor("Q8_0", 4, 64), random_qtensor("Q8_0", 4, 32)])
    with pytest.raises(ValueError, match="bias has shape"):
        QLinear([random_qtensor("Q8_0", 4, 64)], np.zeros(5, np.float32))
    lin = QLinear([random_qtensor("Q8_0", 4, 64)])
    with pytest.raises(ValueError, match=r"input must be \[T, 64\]"):
        lin(np.zeros((2, 32), np.float32))
    with pytest.raises(ValueError, match="out must be contiguous fp32"):
        lin.add_to(np.zeros((2, 64), np.float32), np.zeros((4, 2), np.float32).T)
    with pytest.raises(ValueError, match="threads must be"):
        kernels.set_threads(0)


def test_qtensor_refuses_non_contiguous_or_mistyped_data():
    q4_0 = reference.TYPE_IDS["Q4_0"]
    strided = np.zeros((4, 36), np.uint8)[:, ::2]  # [4, 18], the right shape, rows not packed
    fortran = np.asfortranarray(np.zeros((4, 18), np.uint8))
    for bad, got in (
        (strided, r"got uint8 \[4, 18\]"),
        (fortran, r"got uint8 \[4, 18\]"),
        (np.zeros((4, 18), np.int8), r"got int8 \[4, 18\]"),
        (np.zeros((4, 9), np.uint16), r"got uint16 \[4, 9\]"),
        (torch.zeros(4, 18, dtype=torch.uint8), "got Tensor"),
    ):
        with pytest.raises(ValueError, match=r"Q4_0 \[4, 32\] needs contiguous uint8 data \[4, 18\], " + got):
            QTensor(bad, q4_0, (4, 32))
    QTensor(np.zeros((4, 18), np.uint8), q4_0, (4, 32))  # the same shape, packed, is accepted
    for w, name in (
        (np.zeros((3, 4), np.float64), None),
        (np.zeros((3, 4), np.uint16), None),  # bf16 bits must say so
        (np.zeros((3, 4), np.float32), "BF16"),
        (np.zeros((3, 4), np.float16), "F32"),
        (np.zeros(4, np.float32), None),
    ):
        with pytest.raises(ValueError, match="expected a 2-D float32/float16"):
            QTensor.from_dense(w, name)


def test_addr_gives_the_data_pointer_of_contiguous_arrays():
    a = np.zeros((4, 6), np.float32)
    assert kernels.addr(a) == a.ctypes.data
    assert kernels.addr(a[1:]) == a.ctypes.data + 6 * 4  # a contiguous slice: its own start
    ro = np.zeros(3, np.int64)
    ro.flags.writeable = False  # read-only (a memory-mapped GGUF) is fine
    assert kernels.addr(ro) == ro.ctypes.data
    with pytest.raises(TypeError):
        kernels.addr(torch.zeros(3))


def test_addr_of_a_non_contiguous_array_is_refused():
    a = np.zeros((4, 6), np.float32)
    for bad in (a[:, ::2], a.T, a[:, 1:]):
        with pytest.raises(ValueError, match="contiguous"):
            kernels.addr(bad)


def test_concurrent_callers_get_right_answers():
    """Python threads calling at once: one uses the pool, the others run alone; all exact. The pool's
    size is restored afterwards (kernel_threads), so later tests run with the default."""
    import threading

    qt = random_qtensor("Q4_1", 256, 1536, seed=3)
    lin, w = QLinear([qt]), ref_weights(qt)
    errs: list[float] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for T in (1, 16, 1, 7) * 10:
            x = randn(rng, T, 1536)
            errs.append(rel_err(lin(x), t64(x) @ w.t()))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    with kernel_threads(2):
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert len(errs) == 120 and max(errs) <= TOL


def test_pool_runs_every_item_once_under_contention():
    """300000 calls whose item counts rise and fall from call to call (1..40), on pools of 2, 3, 4
    and 8 threads (more than a small host's cores, so workers are descheduled mid-call and wake
    late), with a second Python thread calling at the same time (it runs alone while the first
    holds the pool): every item of every call runs exactly once. A claim word that counted items
    up from 0 let a late worker claim past the end of a finished call once the next call, with more
    items, had written its count: 157 to 8194 items per million calls ran twice."""
    import threading

    results: list[tuple[int, float]] = []

    def calls() -> None:
        results.append(_qk.pool_check(300_000, 40, 0))

    for n in (2, 3, 4, 8):
        with kernel_threads(n):
            ts = [threading.Thread(target=calls) for _ in range(2)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
    assert len(results) == 8 and [e for e, _ in results] == [0] * 8


def test_pool_call_does_not_wait_for_a_worker_that_is_not_running():
    """A worker that the OS has descheduled (here: it sleeps 300 ms whenever a call wakes it) must
    not hold the call: the caller runs the items itself and returns. Before, every call waited for
    every worker to check in, so each of these took >= 300 ms. The late worker, once awake, claims
    nothing of the finished call (every item still ran exactly once)."""
    with kernel_threads(2):
        errors, slowest = _qk.pool_check(5, 64, 300_000)
        # the workers are still asleep from the last call: the next ones must not wait for them
        errors2, slowest2 = _qk.pool_check(5, 64, 0)
        # the benchmarks' switch back to the pool before: then a call does wait for the worker
        kernels.set_pool_wait_all(True)
        try:
            errors3, slowest3 = _qk.pool_check(2, 64, 300_000)
        finally:
            kernels.set_pool_wait_all(False)
    assert errors == 0 and errors2 == 0 and errors3 == 0
    assert slowest < 0.15, f"a call took {slowest * 1000:.0f} ms: it waited for the sleeping worker"
    assert slowest2 < 0.15
    assert slowest3 >= 0.25, "with set_pool_wait_all(True) a call should wait for the sleeping worker"


def _pool_race_check(tmp_path: Path, flags: list[str], calls: int) -> subprocess.CompletedProcess[str]:
    """Builds tests/native/pool_race_check.cpp against the kernels' pool and runs it."""
    root = Path(__file__).resolve().parent.parent
    cxx = shutil.which("g++")
    assert cxx, "g++ is needed to build the kernels"
    exe = tmp_path / "pool_race_check"
    src = root / "tests/native/pool_race_check.cpp"
    build = subprocess.run(
        [cxx, *flags, "-std=c++17", "-pthread", f"-I{root / 'src/kernels'}", str(src), "-o", str(exe)],
        capture_output=True,
        text=True,
    )
    if build.returncode != 0 and "-fsanitize=thread" in flags:
        pytest.skip(f"this toolchain cannot build with ThreadSanitizer: {build.stderr.strip()[-300:]}")
    assert build.returncode == 0, build.stderr
    return subprocess.run([str(exe), str(calls)], capture_output=True, text=True, timeout=300)


def test_pool_race_check(tmp_path):
    """1,000,000 calls on each pool of 2, 3, 4 and 8 threads, two item functions taking turns,
    contexts poisoned when their call returns, workers waking late every other 512 calls: no item
    runs twice, with another call's context or after its call (tests/native/pool_race_check.cpp).
    The claim word of the first version (items counted up from 0) gave 1466 errors here."""
    run = _pool_race_check(tmp_path, ["-O2"], 1_000_000)
    assert run.returncode == 0 and run.stdout.startswith("errors 0 "), run.stdout + run.stderr


def test_pool_race_check_under_threadsanitizer(tmp_path):
    """The same check built with -fsanitize=thread (50,000 calls per pool): no data race between
    the pool's threads and the caller (the first version's claim word: 3 reports)."""
    run = _pool_race_check(tmp_path, ["-O1", "-g", "-fsanitize=thread"], 50_000)
    assert "ThreadSanitizer" not in run.stderr, run.stderr[-4000:]
    assert run.returncode == 0 and run.stdout.startswith("errors 0 "), run.stdout + run.stderr


def test_sixteen_lane_logic_on_any_cpu(tmp_path):
    """The AVX-512 build's loop logic, checked even where no AVX-512 CPU is at hand."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parent.parent
    cxx = shutil.which("g++")
    assert cxx, "g++ is needed to build the kernels"
    exe = tmp_path / "lanes16"
    subprocess.run(
        [
            cxx,
            "-O1",
            "-std=c++17",
            f"-I{root / 'src/kernels'}",
            str(root / "tests/native/lanes16_check.cpp"),
            str(root / "src/kernels/qk_generic.cpp"),
            "-o",
            str(exe),
        ],
        check=True,
    )
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    assert "FAIL" not in out and out.startswith("worst "), out
    assert float(out.split()[1]) <= TOL


def test_fused_small_ops_match_reference(isa):
    rng = np.random.default_rng(0)
    # (40, 576) splits silu over the thread pool; C = 37 leaves a tail after the vectors
    for T, C in ((1, 576), (7, 640), (64, 64), (3, 37), (40, 576)):
        x, w = randn(rng, T, C, scale=3), randn(rng, C)
        for off in (0.0, 1.0):
            y = kernels.rms_norm(x, w, 1e-5, off)
            assert y.dtype == np.float32
            assert rel_err(y, reference.rms_norm(t64(x), t64(w), 1e-5, off)) <= 1e-6
        gu = randn(rng, T, 2 * C, scale=4)
        assert rel_err(kernels.silu_mul(gu), reference.silu_mul(t64(gu))) <= 1e-6, (isa, T, C)
    with pytest.raises(ValueError, match="norm weight must be float32"):
        kernels.rms_norm(x, w.astype(np.float64), 1e-5)


def test_silu_is_accurate_element_by_element_far_from_zero(isa):
    """Each output within a few ulp of the float64 reference, where silu saturates too. The vector
    exp stops at e^-87.3 (1.2e-38, the smallest normal float), so a gate g below -87 gives a
    y of at most |g| * 1.2e-38 * |up| where the exact value is a subnormal or 0: never NaN."""
    g = np.array(
        [-100.0, -87.0, -60.0, -20.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 20.0, 60.0, 100.0, 1e4, -1e4], np.float32
    )
    g = np.concatenate([g, -g[::-1], g[:5]])  # 33 values: two vectors of 16 and a tail
    gu = np.concatenate([g, np.full_like(g, 1.5)])[None]
    got, want = t64(kernels.silu_mul(gu)[0]), reference.silu_mul(t64(gu))[0]
    assert torch.isfinite(got).all(), got
    close = (got - want).abs() <= 4e-7 * want.abs() + 1e-30  # ~3 ulp; the floor: see above
    assert close.all(), [
        (float(a), float(b), float(c)) for a, b, c, ok in zip(g, got, want, close, strict=True) if not ok
    ]


GELU_FORMS = [pytest.param(False, "none", id="erf"), pytest.param(True, "tanh", id="tanh")]


@pytest.mark.parametrize(("approximate", "form"), GELU_FORMS)
def test_gelu_matches_torch(isa, threads, approximate, form):
    """gelu and gelu_mul (gate | up halves of one row) vs torch's gelu in float64: 1e-6 of the
    output norm; (64, 1536) splits the rows over the pool, I = 37 is no multiple of a vector."""
    rng = np.random.default_rng(1)
    for T, n in ((1, 576), (7, 640), (3, 37), (64, 1536)):
        x = randn(rng, T, n, scale=3)
        y = kernels.gelu(x, approximate)
        assert y.dtype == np.float32 and y.shape == (T, n)
        assert rel_err(y, F.gelu(t64(x), approximate=form)) <= 1e-6, (isa, T, n)
        gu = randn(rng, T, 2 * n, scale=3)
        y = kernels.gelu_mul(gu, approximate)
        assert y.shape == (T, n)
        gate, up = t64(gu).chunk(2, dim=-1)
        assert rel_err(y, F.gelu(gate, approximate=form) * up) <= 1e-6, (isa, T, n)
    x = randn(rng, 5, 80, scale=3)  # a strided view is copied, not misread
    assert np.array_equal(kernels.gelu(x[:, ::2], approximate), kernels.gelu(x, approximate)[:, ::2])


@pytest.mark.parametrize(("approximate", "form"), GELU_FORMS)
def test_gelu_is_accurate_element_by_element_out_to_large_inputs(isa, approximate, form):
    """Each output within 1e-6 of torch's float64 value plus 2e-7 |x| (|up|): the float rounding of
    the 1 + erf (1 + tanh) term, ~2 ulp of 1 times x / 2, which is all that is left where gelu(x)
    tends to 0 for x < 0; finite (0, not NaN) out to |x| = 1e4. The two forms differ by up to ~5e-4
    near |x| = 2, far outside this bound."""
    x = np.concatenate(
        [
            np.linspace(-20, 20, 801, dtype=np.float32),
            np.array([-1e4, -87.0, -1e-3, 1e-3, 87.0, 1e4], np.float32),
        ]
    )
    want = F.gelu(t64(x), approximate=form)
    for got, ref, bound in (
        (kernels.gelu(x[None], approximate)[0], want, 2e-7 * t64(x).abs()),
        (
            kernels.gelu_mul(np.concatenate([x, np.full_like(x, -1.5)])[None], approximate)[0],
            want * -1.5,
            3e-7 * t64(x).abs(),
        ),
    ):
        got = t64(got)
        assert torch.isfinite(got).all(), got
        close = (got - ref).abs() <= 1e-6 * ref.abs() + bound
        assert close.all(), [
            (float(a), float(b), float(c)) for a, b, c, ok in zip(x, got, ref, close, strict=True) if not ok
        ]


# ---------------------------------------------------------------- paged attention


def kv_pools(rng: np.random.Generator, n_blocks: int, layers: int, nkv: int, bs: int, hd: int):
    return randn(rng, n_blocks, layers, nkv, bs, hd), randn(rng, n_blocks, layers, nkv, bs, hd)


def pools_after_writes(kp, vp, tables, lengths, layer, qkv, nh, nkv, hd):
    """Copies of the pools with row b's k and v heads at position lengths[b] - 1 of its table:
    what one call must leave (and nothing else changed)."""
    k_want, v_want = kp.copy(), vp.copy()
    bs = kp.shape[3]
    for b, n in enumerate(lengths):
        blk, off = tables[b][(n - 1) // bs], (n - 1) % bs
        k_want[blk, layer, :, off] = qkv[b, nh * hd : (nh + nkv) * hd].reshape(nkv, hd)
        v_want[blk, layer, :, off] = qkv[b, (nh + nkv) * hd :].reshape(nkv, hd)
    return k_want, v_want


def cached(pool: np.ndarray, table, layer: int, n: int) -> np.ndarray:
    """[n_kv, n, hd]: positions 0..n-1 of a sequence's cache, in position order."""
    return np.concatenate([pool[blk, layer] for blk in table], axis=1)[:, :n]


def causal_sdpa(q, k, v, lengths, window=None, scale=None) -> torch.Tensor:
    """torch's attention on one sequence's rows, float64: q [t, nh, hd] at positions lengths - 1;
    k, v [n_kv, n, hd] its cache; row i sees positions [max(0, L_i - window) or 0, L_i)."""
    nh, nkv = q.shape[1], k.shape[0]
    k, v = t64(k).repeat_interleave(nh // nkv, 0), t64(v).repeat_interleave(nh // nkv, 0)
    pos, L = torch.arange(k.shape[1])[None], torch.as_tensor(np.asarray(lengths))[:, None]
    mask = pos < L
    if window is not None:
        mask &= pos >= L - window
    out = F.scaled_dot_product_attention(t64(q).transpose(0, 1), k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)  # [t, nh, hd]


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(("nh", "nkv"), [(6, 2), (10, 2), (3, 3)])  # query heads per kv head: 3, 5, 1
def test_paged_attention_decode_reads_caches_in_place(isa, window, nh, nkv):
    """Decode rows: ragged lengths (one exactly 2 blocks, one inside its first block), grouped
    heads, block tables out of order, a sliding window: the new k/v rows land in their blocks (and
    nothing else in the pools changes) and the output equals the reference."""
    rng = np.random.default_rng(0)
    layers, hd, bs, n_blocks = 3, 64, 16, 12
    kp, vp = kv_pools(rng, n_blocks, layers, nkv, bs, hd)
    kpk = kernels.kv_pack_k(kp, "f32")  # K as the pool stores it: transposed in each block
    lengths = [33, 32, 1]
    tables = np.array([[7, 2, 9], [0, 11, 0], [5, 0, 0]])  # padding past each table's end
    att = kernels.PagedAttention(kpk, vp, tables, lengths, window=window)
    first = [0 if window is None else max(0, n - window) for n in lengths]
    for layer in range(layers):
        qkv = randn(rng, 3, (nh + 2 * nkv) * hd)
        kp = kernels.kv_unpack_k(kpk, "f32")
        k_want, v_want = pools_after_writes(kp, vp, tables, lengths, layer, qkv, nh, nkv, hd)
        got = att(layer, qkv, nh)
        assert got.dtype == np.float32 and got.shape == (3, nh * hd)
        assert np.array_equal(kernels.kv_unpack_k(kpk, "f32"), k_want) and np.array_equal(vp, v_want)
        want = reference.attend_decode(
            t64(qkv[:, : nh * hd].reshape(3, nh, hd)),
            [
                t64(cached(k_want, tables[b], layer, n)[:, f:])
                for b, (n, f) in enumerate(zip(lengths, first, strict=True))
            ],
            [
                t64(cached(v_want, tables[b], layer, n)[:, f:])
                for b, (n, f) in enumerate(zip(lengths, first, strict=True))
            ],
        )
        assert rel_err(got.reshape(3, nh, hd), want) <= 1e-5
    with pytest.raises(ValueError, match="KV pools need"):
        kernels.PagedAttention(kp.transpose(0, 1, 2, 4, 3), vp, tables, lengths)
    with pytest.raises(ValueError, match="KV pools need"):
        kernels.PagedAttention(kp.astype(np.float64), vp, tables, lengths)
    with pytest.raises(ValueError, match="k and v pools differ"):
        kernels.PagedAttention(kp, vp[:, :1].copy(), tables, lengths)
    with pytest.raises(ValueError, match="outside the pool"):
        kernels.PagedAttention(kp, vp, tables + 10, lengths)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.PagedAttention(kp, vp, tables[:, :1], [33, 1, 1])
    with pytest.raises(ValueError, match="do not match 3 rows"):
        kernels.PagedAttention(kp, vp, tables, [33, 1])
    with pytest.raises(ValueError, match="qkv must be contiguous fp32"):
        att(0, qkv[:2], nh)
    with pytest.raises(ValueError, match="qkv must be contiguous fp32"):
        att(0, np.asfortranarray(qkv), nh)
    with pytest.raises(ValueError, match="do not match the pool"):
        att(layers, qkv, nh)


@pytest.mark.parametrize("order", ["ascending", "shuffled"])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize(("nh", "nkv", "hd"), [(6, 2, 64), (8, 1, 40), (4, 2, 36)])
def test_paged_attention_prefill_chunk_is_causal(isa, threads, window, nh, nkv, hd, order):
    """A prefill chunk: t rows sharing one sequence's table with lengths start+1 .. start+t after
    `start` cached positions (the chunk starts and ends inside a block of 8), grouped heads: each
    row sees the cache and the keys of the chunk's earlier rows (written by the same call) and no
    later ones, as torch's masked attention; with a window, only its last W positions. Shuffled
    rows: the keys are all written before any row attends, whatever the rows' order. hd 40 and 36
    take the narrower and the generic attention loops."""
    rng = np.random.default_rng(hd + nh)
    layers, bs, n_blocks = 2, 8, 10
    start, t = 21, 13  # positions 21..33: from inside block 2 to inside block 4
    table = np.array([9, 3, 6, 1, 4, 0])  # one padding entry past the end
    perm = np.arange(t) if order == "ascending" else rng.permutation(t)
    lengths = (start + 1 + np.arange(t))[perm]
    tables = np.tile(table, (t, 1))
    kp, vp = kv_pools(rng, n_blocks, layers, nkv, bs, hd)
    kpk = kernels.kv_pack_k(kp, "f32")
    att = kernels.PagedAttention(kpk, vp, tables, lengths, window=window)
    for layer, scale in ((0, None), (1, 0.1)):
        qkv = randn(rng, t, (nh + 2 * nkv) * hd)
        kp = kernels.kv_unpack_k(kpk, "f32")
        k_want, v_want = pools_after_writes(kp, vp, tables, lengths, layer, qkv, nh, nkv, hd)
        got = att(layer, qkv, nh, scale=scale)
        assert np.array_equal(kernels.kv_unpack_k(kpk, "f32"), k_want) and np.array_equal(vp, v_want)
        want = causal_sdpa(
            qkv[:, : nh * hd].reshape(t, nh, hd),
            cached(k_want, table, layer, start + t),
            cached(v_want, table, layer, start + t),
            lengths,
            window,
            scale,
        )
        err = rel_err(got.reshape(t, nh, hd), want)
        assert err <= 1e-5, (isa, layer, err)


@pytest.mark.parametrize("window", [None, 4])
def test_paged_attention_mixed_decode_and_prefill_rows(isa, threads, window):
    """One call over a decode row of one sequence and a 5-row prefill chunk of another: each row
    attends over its own table only. The chunk's table pads with a block of the other sequence,
    which must stay untouched; the raw-pointer `run` gives the same result as `__call__`."""
    rng = np.random.default_rng(3)
    nh, nkv, hd, bs, layers, n_blocks = 6, 2, 64, 8, 2, 10
    table_a, table_b = [5, 2, 7], [1, 8, 5]  # A: 18 cached, decodes position 18; B: 10 cached
    tables = np.array([table_a] + [table_b] * 5)
    lengths = np.array([19, 11, 12, 13, 14, 15])
    kp, vp = kv_pools(rng, n_blocks, layers, nkv, bs, hd)
    kpk = kernels.kv_pack_k(kp, "f32")
    att = kernels.PagedAttention(kpk, vp, tables, lengths, window=window)
    for layer in range(layers):
        qkv = randn(rng, 6, (nh + 2 * nkv) * hd)
        kp = kernels.kv_unpack_k(kpk, "f32")
        k_want, v_want = pools_after_writes(kp, vp, tables, lengths, layer, qkv, nh, nkv, hd)
        if layer == 0:
            got = att(layer, qkv, nh)
        else:
            got = np.full((6, nh * hd), np.nan, np.float32)
            att.run(layer, kernels.addr(qkv), qkv.shape[1], nh, kernels.addr(got), hd**-0.5)
        assert np.array_equal(kernels.kv_unpack_k(kpk, "f32"), k_want) and np.array_equal(vp, v_want)
        q = qkv[:, : nh * hd].reshape(6, nh, hd)
        f = 0 if window is None else 19 - window
        want_a = reference.attend_decode(
            t64(q[:1]),
            [t64(cached(k_want, table_a, layer, 19)[:, f:])],
            [t64(cached(v_want, table_a, layer, 19)[:, f:])],
        )
        want_b = causal_sdpa(
            q[1:], cached(k_want, table_b, layer, 15), cached(v_want, table_b, layer, 15), lengths[1:], window
        )
        got = got.reshape(6, nh, hd)
        assert rel_err(got[:1], want_a) <= 1e-5 and rel_err(got[1:], want_b) <= 1e-5
    with pytest.raises(ValueError, match="do not match the pool"):
        att.run(0, kernels.addr(qkv), qkv.shape[1] - hd, nh, kernels.addr(got), 1.0)


def test_rope_in_place_matches_reference():
    T, heads, extra, hd = 5, 4, 2, 64
    angles = torch.outer(
        torch.arange(100, dtype=torch.float32), 1.0 / (10000 ** (torch.arange(0, hd, 2) / hd))
    )
    cos, sin = angles.cos().contiguous().numpy(), angles.sin().contiguous().numpy()
    x = randn(np.random.default_rng(0), T, (heads + extra) * hd)
    pos = np.array([0, 7, 99, 3, 3], dtype=np.int64)
    view = x.reshape(T, heads + extra, hd)  # shares x's memory
    want = reference.rope(t64(view[:, :heads]), torch.from_numpy(pos), t64(cos), t64(sin))
    untouched = view[:, heads:].copy()
    kernels.rope_(x, heads, hd, pos, cos, sin)
    assert rel_err(view[:, :heads], want) <= 1e-6
    assert np.array_equal(view[:, heads:], untouched)  # v heads are left alone
    with pytest.raises(ValueError, match="int64 positions"):
        kernels.rope_(x, heads, hd, pos.astype(np.int32), cos, sin)
    with pytest.raises(ValueError, match="int64 positions"):
        kernels.rope_(x, heads, hd, pos[:4], cos, sin)


# ---- long contexts: splits, head sizes, KV dtypes (issue 27) ------------------------------------
def kv_round(x: np.ndarray, kv_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """fp32 x as a pool of `kv_dtype` stores it: (the pool's array, its values in fp32)."""
    if kv_dtype == "f32":
        return x.copy(), x
    if kv_dtype == "f16":
        h = x.astype(np.float16)  # numpy rounds to nearest even, as the kernels do
        return h, h.astype(np.float32)
    if kv_dtype == "q8_0":  # ggml's blocks by the numpy reference quantizer; d * q is exact in fp32
        hd = x.shape[-1]
        q = reference.quantize(x.reshape(-1, hd), "Q8_0").reshape(*x.shape[:-1], hd // 32 * 34)
        blocks = q.reshape(-1, 34)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        vals = (d * blocks[:, 2:].view(np.int8).astype(np.float32)).reshape(x.shape)
        return q, vals
    b = torch.from_numpy(x).to(torch.bfloat16)  # round to nearest even
    return b.view(torch.int16).numpy().view(np.uint16).copy(), b.float().numpy()


@pytest.mark.parametrize("kv_dtype", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize(
    ("nh", "nkv", "hd", "length"),
    [
        (6, 2, 64, 1),
        (6, 2, 64, 17),
        (12, 2, 128, 500),
        (9, 3, 64, 4096),
        (16, 2, 128, 16384),
        (8, 8, 256, 700),
        (4, 1, 40, 1100),
        (2, 1, 576, 40),  # above ATT_MAX_HD: the portable loops on every path
    ],
)
def test_paged_attention_long_contexts_every_kv_dtype(isa, kv_dtype, nh, nkv, hd, length):
    """Decode rows at 1 .. 16384 positions (splits of 512 merged), head_dim 64/128/256 and 40 (not a
    multiple of 16 or 8: the narrower and the portable loops), grouped heads up to 8 per kv head, the
    cache in f32, f16, bf16 and q8_0: the new rows are written rounded to nearest even (q8_0: the
    bytes of the numpy reference quantizer, ggml's rule), and the output equals a float64 reference
    over the cache's own (rounded) values within 1e-5. A row's bits do not depend on the batch it is
    in (the cut into splits is the row's own)."""
    if kv_dtype == "q8_0" and hd % 32:
        pytest.skip(
            "q8_0 needs a head_dim that is a multiple of 32 (refused: test_kv_pool_dtypes_refused_when_wrong)"
        )
    rng = np.random.default_rng(length + hd)
    bs, layers = 16, 1
    nblk = -(-length // bs)
    k32, v32 = kv_pools(rng, 2 * nblk + 1, layers, nkv, bs, hd)
    kp, k_val = kv_round(k32, kv_dtype)
    vp, v_val = kv_round(v32, kv_dtype)
    kp = kernels.kv_pack_k(kp, kv_dtype)
    tables = np.stack([rng.permutation(2 * nblk + 1)[:nblk] for _ in range(2)])
    lengths = [length, max(1, length // 3)]
    qkv = randn(rng, 2, (nh + 2 * nkv) * hd)
    att = kernels.PagedAttention(kp, vp, tables, lengths)
    got = att(0, qkv, nh)
    k_rows = kernels.kv_unpack_k(kp, kv_dtype)
    for b, n in enumerate(lengths):  # the new rows, rounded, in their blocks
        blk, off = tables[b][(n - 1) // bs], (n - 1) % bs
        k_new, k_new_val = kv_round(qkv[b : b + 1, nh * hd : (nh + nkv) * hd].reshape(nkv, hd), kv_dtype)
        v_new, v_new_val = kv_round(qkv[b : b + 1, (nh + nkv) * hd :].reshape(nkv, hd), kv_dtype)
        assert np.array_equal(k_rows[blk, 0, :, off], k_new) and np.array_equal(vp[blk, 0, :, off], v_new)
        k_val[blk, 0, :, off], v_val[blk, 0, :, off] = k_new_val, v_new_val
    want = reference.attend_decode(
        t64(qkv[:, : nh * hd].reshape(2, nh, hd)),
        [t64(cached(k_val, tables[b], 0, n)) for b, n in enumerate(lengths)],
        [t64(cached(v_val, tables[b], 0, n)) for b, n in enumerate(lengths)],
    )
    assert rel_err(got.reshape(2, nh, hd), want) <= 1e-5
    alone = kernels.PagedAttention(kp, vp, tables[:1], lengths[:1])(0, np.ascontiguousarray(qkv[:1]), nh)
    assert np.array_equal(alone[0], got[0])  # the same bits alone as in a batch (the row rewrote its own k/v)


def test_paged_attention_splits_bit_identical_across_threads():
    """A 5000-position row (10 splits) gives the same bits on 1 and 2 threads."""
    rng = np.random.default_rng(9)
    nh, nkv, hd, bs, n = 12, 2, 128, 16, 5000
    kp, vp = kv_pools(rng, n // bs + 1, 1, nkv, bs, hd)  # any values: K's layout does not matter here
    tables = rng.permutation(n // bs + 1)[None, :]
    qkv = randn(rng, 1, (nh + 2 * nkv) * hd)
    outs = []
    for t in (1, 2):
        with kernel_threads(t):
            outs.append(kernels.PagedAttention(kp, vp, tables, [n])(0, qkv, nh))
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("kv_dtype", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("bs", [16, 1])
def test_paged_attention_lookahead_changes_no_bit(isa, kv_dtype, bs):
    """The decode look-ahead (32 positions into L2, or 4 KiB into L1 with
    set_attention_lookahead(False), which benchmarks compare) only fetches: the outputs are the same
    bits, at the default block size and at blocks of one position (32 blocks ahead), over a
    shuffled table that reaches the pool's last block."""
    rng = np.random.default_rng(bs)
    nh, nkv, hd, n = 6, 2, 64, 1200
    nblk = -(-n // bs)
    k32, v32 = kv_pools(rng, nblk + 1, 1, nkv, bs, hd)
    kp, _ = kv_round(k32, kv_dtype)
    vp, _ = kv_round(v32, kv_dtype)
    kp = kernels.kv_pack_k(kp, kv_dtype)
    tables = rng.permutation(nblk + 1)[None, :nblk]
    qkv = randn(rng, 1, (nh + 2 * nkv) * hd)
    outs = []
    for on in (True, False):
        kernels.set_attention_lookahead(on)
        try:
            outs.append(kernels.PagedAttention(kp.copy(), vp.copy(), tables, [n])(0, qkv, nh))
        finally:
            kernels.set_attention_lookahead(True)
    assert np.array_equal(outs[0], outs[1])


def test_kv_pool_dtypes_refused_when_wrong():
    rng = np.random.default_rng(1)
    kp, vp = kv_pools(rng, 2, 1, 1, 16, 64)
    tables, lengths = np.array([[0, 1]]), [3]
    with pytest.raises(ValueError, match="differ in dtype"):
        kernels.PagedAttention(kp.astype(np.float16), vp, tables, lengths)
    with pytest.raises(ValueError, match="float32, float16, uint16"):
        kernels.PagedAttention(kp.astype(np.int16), vp.astype(np.int16), tables, lengths)
    rows = np.zeros((2, 1, 1, 16, 40), np.uint8)  # q8_0 rows are whole blocks of 34 bytes
    with pytest.raises(ValueError, match="whole blocks of 34 bytes"):
        kernels.PagedAttention(rows, rows.copy(), tables, lengths)
    with pytest.raises(ValueError, match="head_dim 40 is not a multiple of 32"):
        kernels.kv_row_items(40, "q8_0")
    assert kernels.kv_row_items(128, "q8_0") == 136 and kernels.kv_row_bytes(128, "bf16") == 256
    assert (
        kernels.PagedAttention(kp.astype(np.float16), vp.astype(np.float16), tables, lengths).kv_dtype
        == "f16"
    )
    empty = np.zeros((2, 1, 1, 16, 0), np.float32)  # head_dim 0 (it divided by zero in the kernel)
    with pytest.raises(ValueError, match="do not agree in shape"):
        kernels.PagedAttention(empty, empty.copy(), tables, lengths)


@pytest.mark.parametrize("kv_dtype", ["f32", "f16", "q8_0"])
def test_paged_attention_long_prefill_chunk_in_tiles(isa, threads, kv_dtype):
    """A 40-row prefill chunk at positions 1000..1039 (its rows cross the split at 1024: tiles whose
    rows have 2 and 3 splits) after 1000 cached positions: causal, equal to torch's masked attention
    in float64 over the cache's own values, and each row's bits equal the row computed alone."""
    rng = np.random.default_rng(27)
    nh, nkv, hd, bs, start, t = 12, 2, 128, 16, 1000, 40
    nblk = -(-(start + t) // bs)
    k32, v32 = kv_pools(rng, nblk + 3, 1, nkv, bs, hd)
    kp, k_val = kv_round(k32, kv_dtype)
    vp, v_val = kv_round(v32, kv_dtype)
    kp = kernels.kv_pack_k(kp, kv_dtype)
    table = rng.permutation(nblk + 3)[:nblk]
    lengths = start + 1 + np.arange(t)
    qkv = randn(rng, t, (nh + 2 * nkv) * hd)
    got = kernels.PagedAttention(kp, vp, np.tile(table, (t, 1)), lengths)(0, qkv, nh)
    for i, n in enumerate(lengths):  # the chunk's rows as the pool holds them
        blk, off = table[(n - 1) // bs], (n - 1) % bs
        k_val[blk, 0, :, off] = kv_round(qkv[i, nh * hd : (nh + nkv) * hd].reshape(nkv, hd), kv_dtype)[1]
        v_val[blk, 0, :, off] = kv_round(qkv[i, (nh + nkv) * hd :].reshape(nkv, hd), kv_dtype)[1]
    want = causal_sdpa(
        qkv[:, : nh * hd].reshape(t, nh, hd),
        cached(k_val, table, 0, start + t),
        cached(v_val, table, 0, start + t),
        lengths,
    )
    assert rel_err(got.reshape(t, nh, hd), want) <= 1e-5
    for i in (0, 23, 24, 39):  # alone (its own k/v rewritten with the same values)
        alone = kernels.PagedAttention(kp, vp, table[None, :], [lengths[i]])(
            0, np.ascontiguousarray(qkv[i : i + 1]), nh
        )
        assert np.array_equal(alone[0], got[i]), i


@pytest.mark.parametrize("kv_dtype", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize(
    "nh, nkv, hd, bs",
    [
        (4, 4, 64, 16),
        (4, 2, 64, 16),
        (9, 3, 64, 16),
        (4, 1, 256, 16),
        (12, 2, 128, 16),
        (8, 1, 64, 16),
        (12, 1, 32, 16),
        (10, 2, 80, 16),
        (8, 2, 72, 16),
        (9, 3, 64, 8),
    ],
    ids=["hg1", "hg2", "hg3", "hg4-hd256", "hg6", "hg8", "hg12-hd32", "hg5-hd80", "hg4-hd72", "hg3-bs8"],
)
def test_paged_attention_tiles_equal_rows_one_at_a_time(isa, threads, kv_dtype, nh, nkv, hd, bs):
    """Prefill chunks attend in tiles (each K/V block read once for all the tile's rows and heads):
    every row's output has exactly the bits it has when the rows attend one at a time, for every
    group size (the kernels' chain count per head depends on it), KV type, head size (80: a tail
    narrower than the output tile on AVX-512; 72 on AVX2), block size (8: one vector of positions
    per step on AVX2, as AVX-512 runs) and path; chunks that cross a split (partials that merge),
    rows of a 45-row chunk beside a decode row of another sequence, and a chunk at 0."""
    if kv_dtype == "q8_0" and hd % 32:
        pytest.skip("q8_0 needs head_dim % 32 == 0")
    rng = np.random.default_rng(nh * 100 + hd)
    nblk = 100 * (16 // bs)
    k32, v32 = kv_pools(rng, nblk, 1, nkv, bs, hd)
    kp, _ = kv_round(k32, kv_dtype)
    vp, _ = kv_round(v32, kv_dtype)
    kp = kernels.kv_pack_k(kp, kv_dtype)
    perm = rng.permutation(nblk)
    # rows 0..44: one sequence at positions 1000..1044 (crosses the 1024 split); row 45: another
    # sequence's decode row at 300; rows 46..57: a third sequence's first 12 positions
    per = 16 // bs  # blocks per 16 positions
    tables = np.zeros((58, 70 * per), np.int64)
    tables[:45, : 66 * per] = perm[: 66 * per]
    tables[45, : 19 * per] = perm[67 * per : 86 * per]
    tables[46:, :per] = perm[86 * per : 87 * per]
    lengths = np.concatenate([1001 + np.arange(45), [300], 1 + np.arange(12)])
    qkv = randn(rng, 58, (nh + 2 * nkv) * hd)
    outs = []
    try:
        for tiles in (True, False):
            kernels.set_attention_tiles(tiles)
            k_run, v_run = kp.copy(), vp.copy()
            outs.append(kernels.PagedAttention(k_run, v_run, tables, lengths)(0, qkv, nh))
    finally:
        kernels.set_attention_tiles(True)
    assert np.isfinite(outs[0]).all()
    for b in range(58):
        assert np.array_equal(outs[0][b], outs[1][b]), b


def test_paged_attention_shared_prefix_read_in_tiles(isa, threads):
    """Decode rows of three sequences, two of which share their first 1024 positions' blocks (two
    whole splits, read once for both) and one that shares none: each row equals float64 over its own
    cache and has the bits it has alone."""
    rng = np.random.default_rng(31)
    nh, nkv, hd, bs = 8, 2, 64, 16
    kp, vp = kv_pools(rng, 300, 1, nkv, bs, hd)
    kpk = kernels.kv_pack_k(kp, "f32")
    shared = rng.permutation(300)[:64]  # 1024 positions
    rest = [b for b in range(300) if b not in set(shared.tolist())]
    tables = np.zeros((3, 100), np.int64)
    tables[0, :94] = np.concatenate([shared, rest[:30]])  # 1500 positions
    tables[1, :82] = np.concatenate([shared, rest[30:48]])  # 1300 positions
    tables[2, :57] = rest[48:105]  # 900 positions
    lengths = [1500, 1300, 900]
    qkv = randn(rng, 3, (nh + 2 * nkv) * hd)
    got = kernels.PagedAttention(kpk, vp, tables, lengths)(0, qkv, nh)
    kp = kernels.kv_unpack_k(kpk, "f32")  # with the rows the call wrote
    want = reference.attend_decode(
        t64(qkv[:, : nh * hd].reshape(3, nh, hd)),
        [t64(cached(kp, tables[b], 0, n)) for b, n in enumerate(lengths)],
        [t64(cached(vp, tables[b], 0, n)) for b, n in enumerate(lengths)],
    )
    assert rel_err(got.reshape(3, nh, hd), want) <= 1e-5
    for b in range(3):
        alone = kernels.PagedAttention(kpk, vp, tables[b : b + 1], lengths[b : b + 1])(
            0, np.ascontiguousarray(qkv[b : b + 1]), nh
        )
        assert np.array_equal(alone[0], got[b]), b


def test_the_kernel_extension_rebuilds_when_any_header_changes() -> None:
    """setuptools recompiles an extension's sources only when they or its `depends` changed: a
    header missing from setup.py's list leaves a stale library behind after an edit (qk_pool.h was)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    tree = ast.parse((root / "setup.py").read_text())
    listed: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Extension":
            name = ast.literal_eval(node.args[0])
            if name != "pipeserve.kernels._qk":
                continue
            for kw in node.keywords:
                if kw.arg == "depends":
                    listed |= {
                        c.value
                        for c in ast.walk(kw.value)
                        if isinstance(c, ast.Constant) and str(c.value).endswith(".h")
                    }
    headers = {p.name for p in (root / "src" / "kernels").glob("*.h")}
    assert headers and listed, "setup.py's _qk extension lists no headers"
    assert headers <= listed, f"headers missing from setup.py's depends: {sorted(headers - listed)}"
