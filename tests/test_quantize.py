"""The quantizer (kernels.quantize, quantize.cpp) against its numpy reference (reference.quantize),
byte for byte, and its blocks against the dequantizers: every weight within the step its 4-, 6- or
8-bit scheme allows. Q8_0 is ggml's own algorithm: equal to gguf-py's quantizer too."""

from __future__ import annotations

import hashlib

import gguf
import numpy as np
import pytest
import torch

from pipeserve.kernels import QTensor, quantize, reference, to_f16_bits
from pipeserve.kernels.types import TYPE_IDS, TYPES

QTYPES = ("Q8_0", "Q4_K", "Q6_K")


def _blocks(name: str) -> int:
    return TYPES[TYPE_IDS[name]][1]


def hard_cases(rng: np.random.Generator, K: int = 512) -> np.ndarray:
    """Rows that stress the scale choices: zeros, constants, one-signed rows, a spike among tiny
    values, signed zeros, and magnitudes from 1e-7 to 1e5 (fp16 scales stay finite)."""
    n = rng.standard_normal
    rows = [
        np.zeros(K),
        np.full(K, 3.0),
        np.full(K, -2.5),
        np.abs(n(K)),
        -np.abs(n(K)),
        np.where(np.arange(K) % 2, -0.0, 0.0),
        np.where(np.arange(K) == 7, 100.0, 1e-3 * n(K)),  # a spike among small values
        np.where(np.arange(K) < 32, 0.0, n(K)),  # one all-zero sub-block among normal ones
        np.round(n(K) * 4) / 4,  # ties of the rounding
        *(n(K) * s for s in (1e-7, 1e-5, 1e-2, 1.0, 1e3, 1e5)),
        n(K) * np.exp(n(K) * 3),  # heavy tails
    ]
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("qtype", QTYPES)
def test_native_equals_reference_bit_for_bit(qtype):
    rng = np.random.default_rng(1)
    x = np.concatenate([hard_cases(rng), rng.standard_normal((64, 512)).astype(np.float32)])
    got = quantize(x, qtype)
    want = reference.quantize(x, qtype)
    assert got.dtype == np.uint8 and got.shape == (
        x.shape[0],
        512 // _blocks(qtype) * TYPES[TYPE_IDS[qtype]][2],
    )
    bad = np.flatnonzero((got != want).any(1))
    assert bad.size == 0, f"rows {bad.tolist()} differ"
    # blocks are independent: any thread count and any row split give the same bytes
    assert np.array_equal(quantize(x, qtype, threads=3), got)
    assert np.array_equal(np.concatenate([quantize(x[:5], qtype), quantize(x[5:], qtype)]), got)


def test_q8_0_is_ggmls_own():
    x = np.concatenate([hard_cases(np.random.default_rng(2)), np.random.default_rng(3).normal(size=(8, 512))])
    x = x.astype(np.float32)
    assert np.array_equal(quantize(x, "Q8_0"), gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0))


# |error| per block of a weight, as a fraction of the block's max |x|: Q8_0 d/2 = amax/254 plus the
# fp16 rounding of d (127 * 2^-11 d); Q4_K a step of (range + dmin)/15 + d, range <= 2 amax, over 2;
# Q6_K a step of amax/31 + d over 2 (their fp16 scales are rounded up: 2^-10 relative). SLACK: where
# a scale is an fp16 subnormal it is off by up to 2^-24 (Q8_0: 127 times that, in q * d).
BOUNDS = {
    "Q8_0": 1 / 254 + 1 / 2048,
    "Q4_K": (2 + 1 / 63) * (1 / 15 + 1 / 945) / 2 * 1.01,
    "Q6_K": 1 / 62 * 1.02,
}
SLACK = 4e-6


@pytest.mark.parametrize("qtype", QTYPES)
def test_round_trip_error_is_within_a_step(qtype):
    rng = np.random.default_rng(4)
    x = np.concatenate([hard_cases(rng), rng.standard_normal((32, 512)).astype(np.float32)])
    q = quantize(x, qtype)
    y = reference.dequantize(torch.from_numpy(q), TYPE_IDS[qtype], x.shape).numpy()
    assert np.array_equal(y, QTensor(q, TYPE_IDS[qtype], x.shape).dequantize())  # the kernels read them alike
    b = _blocks(qtype)
    err = np.abs(y - x).reshape(-1, b).max(1)
    amax = np.abs(x).reshape(-1, b).max(1)
    assert (err <= BOUNDS[qtype] * amax + SLACK).all(), (err / np.maximum(amax, 1e-30)).max()
    # normal weights use the scheme's resolution: the RMS error is about a step / sqrt(12)
    g = rng.standard_normal((64, 512)).astype(np.float32)
    yg = reference.dequantize(torch.from_numpy(quantize(g, qtype)), TYPE_IDS[qtype], g.shape).numpy()
    levels = {"Q8_0": 254, "Q4_K": 15, "Q6_K": 62}[qtype]
    assert np.sqrt(np.mean((yg - g) ** 2)) < 2 * np.abs(g).max() / levels / 12**0.5


# sha256 (first 16 hex digits) of the blocks of PCG64(7)'s 16 x 1024 standard normals
PINNED = {"Q8_0": "efa13e694928a341", "Q4_K": "cc82317ca5e0d17e", "Q6_K": "c1af1dfbe7e30a50"}


def test_bytes_are_pinned():
    """The quantizer's output is part of every synthetic model's bytes: a change to it must be
    deliberate (update these digests and say so)."""
    x = np.random.Generator(np.random.PCG64(7)).standard_normal((16, 1024), dtype=np.float32)
    digests = {t: hashlib.sha256(quantize(x, t).tobytes()).hexdigest()[:16] for t in QTYPES}
    assert digests == PINNED


def test_fp16_rounding_equals_numpy():
    """The scales' float -> half conversion (round to nearest even, overflow to inf), on a sweep of
    float32 bit patterns: every exponent, random mantissas, halfway cases, the subnormal edges."""
    bits = np.arange(0, 2**32, 4093, dtype=np.uint64).astype(np.uint32)
    edges = np.array(
        [0x477FE000, 0x477FEFFF, 0x477FF000, 0x33000000, 0x33000001, 0x38800000, 0x387FFFFF], np.uint32
    )
    bits = np.concatenate(
        [bits, edges, edges | 0x80000000, bits | 0x1000, bits & ~np.uint32(0x1FFF) | 0x1000]
    )
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(to_f16_bits(x), want)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="no quantizer for Q4_0"):
        quantize(np.zeros((1, 32), np.float32), "Q4_0")
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(np.zeros((2, 100), np.float32), "Q4_K")
