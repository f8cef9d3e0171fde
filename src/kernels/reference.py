"""Pure-torch reference of every native kernel: dequantize GGUF blocks to fp32, then matmul.

Written from the block layouts (ggml's `block_q4_1` etc.), independently of the C++ code and of the
`gguf` package; tests check it against `gguf.quants.dequantize` and the kernels against it. The
quantizer's reference (`quantize`) is numpy: float32 operations in quantize.cpp's order.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeserve.kernels.types import TYPE_IDS, TYPES


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[B, 2] uint8 (one little-endian half per row) -> [B] fp32."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32]: low nibbles are elements 0..15, high nibbles 16..31."""
    return torch.cat([qs & 15, qs >> 4], dim=-1).to(torch.int32)


def _bits(qh: torch.Tensor) -> torch.Tensor:
    """[..., 4] bytes (a little-endian uint32) -> [..., 32] bit j of it as 0/1."""
    v = qh.to(torch.int64)
    word = v[..., 0] | (v[..., 1] << 8) | (v[..., 2] << 16) | (v[..., 3] << 24)
    return ((word.unsqueeze(-1) >> torch.arange(32)) & 1).to(torch.int32)


def _k4_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 12] packed 6-bit scales and mins of Q4_K / Q5_K -> ([B, 8], [B, 8])."""
    s = s.to(torch.int32)
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    mn = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return sc, mn


def dequantize(data: torch.Tensor, qtype: int, shape: tuple[int, int]) -> torch.Tensor:
    """data: uint8 [N, row_bytes] in GGUF block layout -> fp32 [N, K]."""
    name, _, nbytes = TYPES[qtype]
    N, K = shape
    raw = data.reshape(-1)
    if name == "F32":
        return raw.view(torch.float32).reshape(N, K).clone()
    if name == "F16":
        return raw.view(torch.float16).reshape(N, K).float()
    if name == "BF16":
        return raw.view(torch.bfloat16).reshape(N, K).float()
    b = raw.reshape(-1, nbytes)  # [blocks, bytes]
    if name in ("Q4_0", "Q4_1"):
        d = _f16(b[:, 0:2])
        if name == "Q4_0":
            w = d[:, None] * (_nibbles(b[:, 2:18]) - 8).float()
        else:
            w = d[:, None] * _nibbles(b[:, 4:20]).float() + _f16(b[:, 2:4])[:, None]
    elif name in ("Q5_0", "Q5_1"):
        o = 2 if name == "Q5_0" else 4
        q = _nibbles(b[:, o + 4 : o + 20]) | (_bits(b[:, o : o + 4]) << 4)
        d = _f16(b[:, 0:2])[:, None]
        w = d * (q - 16).float() if name == "Q5_0" else d * q.float() + _f16(b[:, 2:4])[:, None]
    elif name == "Q8_0":
        w = _f16(b[:, 0:2])[:, None] * b[:, 2:34].view(torch.int8).float()
    elif name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = _k4_scales(b[:, 4:16])
        qs = b[:, 16:144] if name == "Q4_K" else b[:, 48:176]
        qs = qs.reshape(-1, 4, 32).to(torch.int32)  # 4 chunks of 64 weights: low then high nibbles
        q = torch.stack([qs & 15, qs >> 4], dim=2).reshape(-1, 8, 32)  # [B, sub-block, 32]
        if name == "Q5_K":
            qh = b[:, 16:48].to(torch.int32)  # bit j of qh[l] is the 5th bit of sub-block j, weight l
            q = q | (((qh.unsqueeze(1) >> torch.arange(8).view(1, 8, 1)) & 1) << 4)
        w = (d[:, None] * sc.float())[..., None] * q.float() - (dmin[:, None] * mn.float())[..., None]
    elif name == "Q6_K":
        ql = b[:, 0:128].reshape(-1, 2, 64).to(torch.int32)
        qh = b[:, 128:192].reshape(-1, 2, 32).to(torch.int32)
        sc = b[:, 192:208].view(torch.int8).reshape(-1, 2, 8).float()
        d = _f16(b[:, 208:210])
        lo = torch.stack([ql[..., :32] & 15, ql[..., 32:] & 15, ql[..., :32] >> 4, ql[..., 32:] >> 4], dim=2)
        hi = torch.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2)
        q = (lo | (hi << 4)) - 32  # [B, half, 4 groups, 32]
        scale = sc.reshape(-1, 2, 4, 2).repeat_interleave(16, dim=-1)  # group k, weight l: sc[2k + l // 16]
        w = d[:, None, None, None] * scale * q.float()
    else:  # pragma: no cover - TYPES lists only what is handled above
        raise ValueError(f"no reference for {name}")
    return w.reshape(N, K)


def matmul(x: torch.Tensor, data: torch.Tensor, qtype: int, shape: tuple[int, int]) -> torch.Tensor:
    """The reference of a kernel call: x [T, K] fp32 @ dequantize(W)^T -> [T, N]."""
    return x @ dequantize(data, qtype, shape).t()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    """Reference of kernels.rms_norm (Hugging Face's LlamaRMSNorm in fp32)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (weight + weight_offset)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Reference of kernels.silu_mul."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def attend_decode(q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor:
    """Reference of kernels.PagedAttention (one row per sequence): q [B, nh, hd]; ks[b], vs[b] [n_kv, L_b, hd] -> [B, nh, hd]."""
    out = []
    for b, (k, v) in enumerate(zip(ks, vs, strict=True)):
        nh, hd = q.shape[1], q.shape[2]
        k, v = k.repeat_interleave(nh // k.shape[0], 0), v.repeat_interleave(nh // v.shape[0], 0)
        p = (q[b].unsqueeze(1) @ k.transpose(-1, -2) * hd**-0.5).softmax(-1)  # [nh, 1, L]
        out.append((p @ v).squeeze(1))
    return torch.stack(out)


def rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Reference of kernels.rope_ (Hugging Face's apply_rotary_pos_emb): x [T, heads, hd]."""
    c = torch.cat([cos[positions], cos[positions]], -1).unsqueeze(1)
    s = torch.cat([sin[positions], sin[positions]], -1).unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * c + torch.cat([-x2, x1], dim=-1) * s


def quantize_int8(x: torch.Tensor) -> torch.Tensor:
    """Reference of the lossy int8 mode's activations (qk_q8.h): x [T, K] fp32 (K % 32 == 0) -> the
    values the kernels use, fp64 q * d, with per 32 values d = max|x| / 127 and
    q = round-half-even(x * (127 / max|x|)), all in fp32 as the kernels compute them."""
    T, K = x.shape
    xb = x.float().reshape(T, K // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    # tensor / tensor: a true fp32 division (a scalar divisor may become a product by its reciprocal)
    c127 = torch.full_like(amax, 127.0)
    inv = torch.where(amax > 0, c127 / torch.where(amax > 0, amax, 1.0), 0.0)
    q = torch.round(xb * inv)  # half to even, as vcvtps2dq
    return (q.double() * (amax / c127).double()).reshape(T, K)


def matmul_int8(x: torch.Tensor, data: torch.Tensor, qtype: int, shape: tuple[int, int]) -> torch.Tensor:
    """The reference of a lossy-mode call: the int8-rounded x [T, K] @ dequantize(W)^T in fp64 (the
    kernels' integer sums are exact; only their float steps round)."""
    return quantize_int8(x) @ dequantize(data, qtype, shape).double().t()


def _as_f16_up(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scales as stored: (the smallest fp16 value >= v, 0 where v is not positive; its fp16 bits)."""
    with np.errstate(over="ignore"):
        h = v.astype(np.float16).view(np.uint16)
    h = np.where(h.view(np.float16).astype(np.float32) < v, h + np.uint16(1), h)  # rounded down: next half up
    h = np.where(v > 0, h, np.uint16(0)).astype(np.uint16)
    return h.view(np.float16).astype(np.float32), h


def _safe(d: np.ndarray) -> np.ndarray:
    return np.where(d > 0, d, np.float32(1))  # a divisor for the lanes np.where discards


def _u16_bytes(bits: np.ndarray) -> np.ndarray:
    return bits.astype("<u2").view(np.uint8).reshape(-1, 2)


def quantize(x: np.ndarray, type_name: str) -> np.ndarray:
    """Reference of kernels.quantize (quantize.cpp's algorithm, which its comment states): fp32 x
    [N, K] -> uint8 [N, row_bytes] of Q8_0, Q4_K or Q6_K blocks."""
    _, elems, nbytes = TYPES[TYPE_IDS[type_name]]
    N, K = x.shape
    xb = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, elems)  # [blocks, elems]
    out = np.zeros((xb.shape[0], nbytes), np.uint8)
    f32 = np.float32
    if type_name == "Q8_0":
        d = np.abs(xb).max(-1) / f32(127)
        inv = np.where(d != 0, f32(1) / _safe(d), f32(0))
        v = xb * inv[:, None]
        a = np.abs(v)  # roundf: half away from zero (gguf-py's np_roundf)
        q = np.sign(v) * (np.floor(a) + np.floor(f32(2) * (a - np.floor(a))))
        with np.errstate(over="ignore"):
            out[:, 0:2] = _u16_bytes(d.astype(np.float16).view(np.uint16))
        out[:, 2:34] = np.clip(q, -127, 127).astype(np.int8).view(np.uint8)
    elif type_name == "Q4_K":
        xs = xb.reshape(-1, 8, 32)
        lo = np.minimum(xs.min(-1), f32(0))  # [B, 8]
        hi = xs.max(-1)
        dmin, dmin_bits = _as_f16_up(np.maximum((-lo).max(-1), f32(0)) / f32(63))
        dm = dmin[:, None]
        mn = np.where(dm > 0, np.clip(np.ceil(-lo / _safe(dm)), 0, 63), 0).astype(np.int32)
        M = dm * mn.astype(f32)
        t = hi + M
        d, d_bits = _as_f16_up(np.maximum(t.max(-1), f32(0)) / f32(945))
        dd = d[:, None]
        sc = np.where(dd > 0, np.clip(np.ceil(t / _safe(f32(15) * dd)), 0, 63), 0).astype(np.int32)
        step = (dd * sc.astype(f32))[..., None]
        L = np.where(step > 0, np.clip(np.rint((xs + M[..., None]) / _safe(step)), 0, 15), 0).astype(np.uint8)
        s = np.zeros((xb.shape[0], 12), np.int32)
        s[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
        s[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
        s[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
        out[:, 0:2], out[:, 2:4], out[:, 4:16] = _u16_bytes(d_bits), _u16_bytes(dmin_bits), s
        L = L.reshape(-1, 4, 2, 32)  # 4 chunks of 64: first 32 low nibbles, next 32 high
        out[:, 16:144] = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    elif type_name == "Q6_K":
        xs = xb.reshape(-1, 16, 16)
        s = np.abs(xs).max(-1) / f32(31)  # [B, 16]
        d, d_bits = _as_f16_up(s.max(-1) / f32(127))
        dd = d[:, None]
        sc = np.where(dd > 0, np.clip(np.ceil(s / _safe(dd)), 0, 127), 0).astype(np.int32)
        step = (dd * sc.astype(f32))[..., None]
        q = np.where(step > 0, np.clip(np.rint(xs / _safe(step)), -32, 31), 0)
        L = (q + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # [B, half, group of 32, l]
        lo4 = L & 15
        ql = np.concatenate([lo4[:, :, 0] | (lo4[:, :, 2] << 4), lo4[:, :, 1] | (lo4[:, :, 3] << 4)], -1)
        qh = (
            (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
        )
        out[:, 0:128], out[:, 128:192] = ql.reshape(-1, 128), qh.reshape(-1, 64)
        out[:, 192:208] = sc.astype(np.int8).view(np.uint8)
        out[:, 208:210] = _u16_bytes(d_bits)
    else:
        raise ValueError(f"no quantizer for {type_name}")
    return out.reshape(N, K // elems * nbytes)
