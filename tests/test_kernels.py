"""Native kernels vs their pure-torch reference, on every SIMD path this CPU can run (forced one by
one), every type, batch 1, 2, 7, 16, 64 and odd shapes, random blocks and the embedded GGUF's tensors.

The kernels take and return numpy arrays (the node runtime does not import torch); inputs are made
with numpy and the references run in torch on `torch.from_numpy` copies, in float64.

The bound is the issue's: relative error <= 1e-5 of the output norm, against float64 matmul on the
reference-dequantized weights (fp32 with another summation order lands near 1e-7).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeserve import kernels
from pipeserve.kernels import QLinear, QTensor, reference

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


def random_qtensor(name: str, N: int, K: int, seed: int = 0) -> QTensor:
    """Random blocks of a type: random bytes, with every fp16 scale field made finite."""
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
    halves = {"Q6_K": [208], "Q4_1": [0, 2], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2]}.get(name, [0])
    for off in halves:
        blocks[:, off + 1] &= 0x3B  # exponent < 15: finite and of modest size
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
        qt = random_qtensor(name, 6, 512, seed=1)
        ref = dequantize(qt.data, GGMLQuantizationType[name]).reshape(6, 512)
        assert np.array_equal(ref_weights(qt).float().numpy(), ref), name
        native = qt.dequantize()
        assert native.dtype == np.float32 and np.array_equal(native, ref), name
        assert np.array_equal(qt.rows(ids), ref[ids]), name


def test_matmul_path_per_batch_size(isa):
    """avx512 runs every size but 5..8 rows, which take the 8-lane loops (16-lane chunks of
    activations would be half empty; qk.cpp: call_isa). Every other selection runs every size itself."""
    want = {1: isa, 2: isa, 4: isa, 5: isa, 8: isa, 9: isa, 16: isa, 191: isa, 192: isa, 256: isa}
    if isa == "avx512":
        want.update({5: "avx2", 8: "avx2"})
    assert {T: kernels.matmul_isa(T) for T in want} == want


@pytest.mark.parametrize("name", list(reference.TYPE_IDS))
def test_kernel_matches_reference_random_blocks(name, isa, threads):
    dense = reference.TYPES[reference.TYPE_IDS[name]][1] == 1
    shapes = [(64, 512), (37, 256), (130, 1536)] + ([(9, 200), (5, 33)] if dense else [])
    rng = np.random.default_rng(0)
    for N, K in shapes:
        if K % reference.TYPES[reference.TYPE_IDS[name]][1]:
            continue
        qt = random_qtensor(name, N, K, seed=N + K)
        w = ref_weights(qt)
        lin = QLinear([qt])
        for T in (*BATCHES, 3, 8, 70, 200):  # every loop shape (qk_simd.h), partial chunks
            x = randn(rng, T, K)
            y = lin(x)
            assert y.dtype == np.float32 and y.shape == (T, N)
            err = rel_err(y, t64(x) @ w.t())
            assert err <= TOL, f"{isa} {name} [{N}, {K}] T={T}: {err:.2e}"


def test_accumulate_adds_into_the_output(isa, threads):
    """add_to: out += x @ W^T, on every loop shape (T = 1, dot tiles, k-major x, panels)."""
    qt = random_qtensor("Q4_K", 70, 512, seed=5)
    lin, w = QLinear([qt]), ref_weights(qt)
    rng = np.random.default_rng(5)
    for T in (1, 7, 16, 64, 200):
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
    for T in BATCHES:
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
    """Two Python threads calling at once: one uses the pool, the other runs alone; both exact."""
    import threading

    kernels.set_threads(2)
    qt = random_qtensor("Q4_1", 256, 1536, seed=3)
    lin, w = QLinear([qt]), ref_weights(qt)
    errs: list[float] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for T in (1, 16, 1, 7) * 10:
            x = randn(rng, T, 1536)
            errs.append(rel_err(lin(x), t64(x) @ w.t()))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(errs) == 120 and max(errs) <= TOL


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
    lengths = [33, 32, 1]
    tables = np.array([[7, 2, 9], [0, 11, 0], [5, 0, 0]])  # padding past each table's end
    att = kernels.PagedAttention(kp, vp, tables, lengths, window=window)
    first = [0 if window is None else max(0, n - window) for n in lengths]
    for layer in range(layers):
        qkv = randn(rng, 3, (nh + 2 * nkv) * hd)
        k_want, v_want = pools_after_writes(kp, vp, tables, lengths, layer, qkv, nh, nkv, hd)
        got = att(layer, qkv, nh)
        assert got.dtype == np.float32 and got.shape == (3, nh * hd)
        assert np.array_equal(kp, k_want) and np.array_equal(vp, v_want)
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
    att = kernels.PagedAttention(kp, vp, tables, lengths, window=window)
    for layer, scale in ((0, None), (1, 0.1)):
        qkv = randn(rng, t, (nh + 2 * nkv) * hd)
        k_want, v_want = pools_after_writes(kp, vp, tables, lengths, layer, qkv, nh, nkv, hd)
        got = att(layer, qkv, nh, scale=scale)
        assert np.array_equal(kp, k_want) and np.array_equal(vp, v_want)
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
    att = kernels.PagedAttention(kp, vp, tables, lengths, window=window)
    for layer in range(layers):
        qkv = randn(rng, 6, (nh + 2 * nkv) * hd)
        k_want, v_want = pools_after_writes(kp, vp, tables, lengths, layer, qkv, nh, nkv, hd)
        if layer == 0:
            got = att(layer, qkv, nh)
        else:
            got = np.full((6, nh * hd), np.nan, np.float32)
            att.run(layer, kernels.addr(qkv), qkv.shape[1], nh, kernels.addr(got), hd**-0.5)
        assert np.array_equal(kp, k_want) and np.array_equal(vp, v_want)
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
