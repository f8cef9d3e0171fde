"""Native kernels vs their pure-torch reference, on every SIMD path this CPU can run (forced one by
one), every type, batch 1, 2, 7, 16, 64 and odd shapes, random blocks and the embedded GGUF's tensors.

The bound is the issue's: relative error <= 1e-5 of the output norm, against float64 matmul on the
reference-dequantized weights (fp32 with another summation order lands near 1e-7).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

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


def random_qtensor(name: str, N: int, K: int, seed: int = 0) -> QTensor:
    """Random blocks of a type: random bytes, with every fp16 scale field made finite."""
    rng = np.random.default_rng(seed)
    tid = reference.TYPE_IDS[name]
    _, elems, nbytes = reference.TYPES[tid]
    if elems == 1:
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[name]
        return QTensor.from_dense(torch.from_numpy(rng.standard_normal((N, K)).astype(np.float32)).to(dtype))
    raw = rng.integers(0, 256, size=(N, K // elems * nbytes), dtype=np.uint8)
    blocks = raw.reshape(-1, nbytes)
    halves = {"Q6_K": [208], "Q4_1": [0, 2], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2]}.get(name, [0])
    for off in halves:
        blocks[:, off + 1] &= 0x3B  # exponent < 15: finite and of modest size
    return QTensor(torch.from_numpy(raw), tid, (N, K))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


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
    """The torch reference equals the gguf package's numpy dequantization exactly, every type."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    for name in reference.TYPE_IDS:
        qt = random_qtensor(name, 6, 512, seed=1)
        ref = dequantize(qt.data.numpy(), GGMLQuantizationType[name]).reshape(6, 512)
        assert np.array_equal(qt.dequantize().numpy(), ref), name


def test_matmul_path_per_batch_size(isa):
    """avx512 runs decode and long prefill chunks; 2..191 rows take the 8-lane loops, which win
    there (qk.cpp: call_isa). Every other selection runs every size itself."""
    want = {1: isa, 2: isa, 8: isa, 191: isa, 192: isa, 256: isa}
    if isa == "avx512":
        want.update({2: "avx2", 8: "avx2", 191: "avx2"})
    assert {T: kernels.matmul_isa(T) for T in want} == want


@pytest.mark.parametrize("name", list(reference.TYPE_IDS))
def test_kernel_matches_reference_random_blocks(name, isa, threads):
    dense = reference.TYPES[reference.TYPE_IDS[name]][1] == 1
    shapes = [(64, 512), (37, 256), (130, 1536)] + ([(9, 200), (5, 33)] if dense else [])
    for N, K in shapes:
        if K % reference.TYPES[reference.TYPE_IDS[name]][1]:
            continue
        qt = random_qtensor(name, N, K, seed=N + K)
        w = qt.dequantize().double()
        lin = QLinear([qt])
        for T in (*BATCHES, 3, 8, 70, 200):  # every loop shape (qk_simd.h), partial chunks
            x = torch.randn(T, K)
            err = rel_err(lin(x), x.double() @ w.t())
            assert err <= TOL, f"{isa} {name} [{N}, {K}] T={T}: {err:.2e}"


def test_accumulate_adds_into_the_output(isa, threads):
    """add_to: out += x @ W^T, on every loop shape (T = 1, dot tiles, k-major x, panels)."""
    qt = random_qtensor("Q4_K", 70, 512, seed=5)
    lin, w = QLinear([qt]), qt.dequantize().double()
    for T in (1, 7, 16, 64, 200):
        x, base = torch.randn(T, 512), torch.randn(T, 70)
        out = lin.add_to(x, base.clone())
        assert rel_err(out, base.double() + x.double() @ w.t()) <= TOL


def test_fused_segments_of_mixed_types(isa, threads):
    """One plan over rows of several types (Gemma-style q|k|v) equals the stacked reference."""
    parts = [
        random_qtensor(n, r, 512, seed=i)
        for i, (n, r) in enumerate([("Q5_0", 96), ("Q8_0", 32), ("Q6_K", 40), ("F16", 8)])
    ]
    w = torch.cat([p.dequantize() for p in parts]).double()
    bias = torch.randn(176)
    lin = QLinear(parts, bias)
    for T in BATCHES:
        x = torch.randn(T, 512)
        assert rel_err(lin(x), x.double() @ w.t() + bias.double()) <= TOL


def test_embedded_model_tensors(isa, smol_full):
    """Real Q4_1 and Q8_0 tensors of the embedded GGUF (q|k|v fused, gate|up fused, the tied head)."""
    model = smol_full.model
    layer = model.layers[7]
    a, m = layer.self_attn, layer.mlp
    for lin in (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj, model.lm_head):
        w = torch.cat([p.dequantize() for p in lin.parts]).double()
        for T in BATCHES:
            x = torch.randn(T, lin.in_features)
            err = rel_err(lin(x), x.double() @ w.t())
            assert err <= TOL, f"{isa} {lin.extra_repr()} T={T}: {err:.2e}"


def test_embedding_rows_are_exact(smol_full):
    emb = smol_full.model.embed_tokens.weight
    ids = torch.tensor([0, 1, 49151, 123, 123])
    assert torch.equal(emb.rows(ids), emb.dequantize()[ids])


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        QTensor(torch.zeros(4, 18, dtype=torch.uint8), reference.TYPE_IDS["Q4_0"], (4, 40))
    with pytest.raises(ValueError, match="needs contiguous uint8 data"):
        QTensor(torch.zeros(4, 17, dtype=torch.uint8), reference.TYPE_IDS["Q4_0"], (4, 32))
    with pytest.raises(ValueError, match="share K"):
        QLinear([random_qtensor("Q8_0", 4, 64), random_qtensor("Q8_0", 4, 32)])
    with pytest.raises(ValueError, match="threads must be"):
        kernels.set_threads(0)


def test_concurrent_callers_get_right_answers():
    """Two Python threads calling at once: one uses the pool, the other runs alone; both exact."""
    import threading

    kernels.set_threads(2)
    qt = random_qtensor("Q4_1", 256, 1536, seed=3)
    lin, w = QLinear([qt]), qt.dequantize().double()
    errs: list[float] = []

    def work(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for T in (1, 16, 1, 7) * 10:
            x = torch.randn(T, 1536, generator=g)
            errs.append(rel_err(lin(x), x.double() @ w.t()))

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
    torch.manual_seed(0)
    # (40, 576) splits silu over the thread pool; C = 37 leaves a tail after the vectors
    for T, C in ((1, 576), (7, 640), (64, 64), (3, 37), (40, 576)):
        x, w = torch.randn(T, C) * 3, torch.randn(C)
        for off in (0.0, 1.0):
            assert (
                rel_err(
                    kernels.rms_norm(x, w, 1e-5, off), reference.rms_norm(x.double(), w.double(), 1e-5, off)
                )
                <= 1e-6
            )
        gu = torch.randn(T, 2 * C) * 4
        assert rel_err(kernels.silu_mul(gu), reference.silu_mul(gu.double())) <= 1e-6, (isa, T, C)


def test_silu_is_accurate_element_by_element_far_from_zero(isa):
    """Each output within a few ulp of the float64 reference, where silu saturates too. The vector
    exp stops at e^-87.3 (1.2e-38, the smallest normal float), so a gate g below -87 gives a
    y of at most |g| * 1.2e-38 * |up| where the exact value is a subnormal or 0: never NaN."""
    g = torch.tensor([-100.0, -87.0, -60.0, -20.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 20.0, 60.0, 100.0, 1e4, -1e4])
    g = torch.cat([g, -g.flip(0), g[:5]])  # 33 values: two vectors of 16 and a tail
    gu = torch.cat([g, torch.full_like(g, 1.5)])[None]
    got, want = kernels.silu_mul(gu)[0].double(), reference.silu_mul(gu.double())[0]
    assert torch.isfinite(got).all(), got
    close = (got - want).abs() <= 4e-7 * want.abs() + 1e-30  # ~3 ulp; the floor: see above
    assert close.all(), [
        (float(a), float(b), float(c)) for a, b, c, ok in zip(g, got, want, close, strict=True) if not ok
    ]


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(("nh", "nkv"), [(6, 2), (10, 2), (3, 3)])  # query heads per kv head: 3, 5, 1
def test_decode_attention_reads_paged_caches_in_place(isa, window, nh, nkv):
    """Ragged lengths (one exactly 2 blocks, one inside its first block), grouped heads, block
    tables out of order, a subset of batch rows from one fused q|k|v buffer, a sliding window:
    the new k/v rows land in their blocks and the output equals the reference."""
    torch.manual_seed(0)
    layers, hd, bs, n_blocks = 3, 64, 16, 12
    kp, vp = torch.randn(n_blocks, layers, nkv, bs, hd), torch.randn(n_blocks, layers, nkv, bs, hd)
    lengths = [33, 32, 1]
    tables = torch.tensor([[7, 2, 9], [0, 11, 0], [5, 0, 0]])  # padding past each table's end
    att = kernels.DecodeAttention(kp, vp, tables, lengths, window=window)
    rows = torch.tensor([4, 0, 2])

    def cached(pool, b, layer, n):  # [n_kv, n, hd] in position order
        return torch.cat([pool[blk, layer] for blk in tables[b].tolist()], dim=1)[:, :n]

    for layer in range(layers):
        qkv = torch.randn(5, nh + 2 * nkv, hd)
        q, k, v = qkv[:, :nh], qkv[:, nh : nh + nkv], qkv[:, nh + nkv :]
        got = att(layer, q, k, v, rows)
        for b, (r, n) in enumerate(zip(rows.tolist(), lengths, strict=True)):
            blk, off = tables[b, (n - 1) // bs], (n - 1) % bs
            assert torch.equal(kp[blk, layer, :, off], k[r]) and torch.equal(vp[blk, layer, :, off], v[r])
        first = [0 if window is None else max(0, n - window) for n in lengths]
        want = reference.attend_decode(
            q[rows].double(),
            [
                cached(kp, b, layer, n)[:, f:].double()
                for b, (n, f) in enumerate(zip(lengths, first, strict=True))
            ],
            [
                cached(vp, b, layer, n)[:, f:].double()
                for b, (n, f) in enumerate(zip(lengths, first, strict=True))
            ],
        )
        assert rel_err(got, want) <= 1e-5
    with pytest.raises(ValueError, match="KV pools need"):
        kernels.DecodeAttention(kp.transpose(3, 4), vp, tables, lengths)
    with pytest.raises(ValueError, match="outside the pool"):
        kernels.DecodeAttention(kp, vp, tables + 10, lengths)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.DecodeAttention(kp, vp, tables[:, :1], [33, 1, 1])(0, q, k, v, rows)


def test_rope_in_place_matches_reference():
    torch.manual_seed(0)
    T, heads, extra, hd = 5, 4, 2, 64
    angles = torch.outer(
        torch.arange(100, dtype=torch.float32), 1.0 / (10000 ** (torch.arange(0, hd, 2) / hd))
    )
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
    x = torch.randn(T, (heads + extra) * hd)
    pos = torch.tensor([0, 7, 99, 3, 3])
    want = reference.rope(x.view(T, heads + extra, hd)[:, :heads].double(), pos, cos.double(), sin.double())
    untouched = x.view(T, heads + extra, hd)[:, heads:].clone()
    kernels.rope_(x, heads, hd, pos, cos, sin)
    assert rel_err(x.view(T, heads + extra, hd)[:, :heads], want) <= 1e-6
    assert torch.equal(x.view(T, heads + extra, hd)[:, heads:], untouched)  # v heads are left alone
