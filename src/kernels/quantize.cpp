// pipeserve.kernels._qk_quant: fp32 rows -> GGUF blocks (Q8_0, Q4_K, Q6_K), for the synthetic models
// of `pipeserve synth` (modeling/synth.py) and tests. Plain scalar C++: the block layouts are ggml's,
// the scale choices are ours (simpler than ggml's search, written so that every rounding can be
// repeated in numpy: kernels/reference.py's quantize is the same algorithm and the tests compare
// the two bit for bit). Only correctly rounded float32 operations (+ - * / min max ceil, and
// round-to-nearest-even) are used, none reordered: built with -ffp-contract=off (no fused
// multiply-adds), it gives the same bytes on any IEEE machine. Inputs must be finite.
//
//   Q8_0 (32 weights): d = amax / 127, q = roundf(x / d) as ggml's quantize_row_q8_0_ref (and
//        gguf-py) compute it, so these blocks are ggml's own.
//   Q4_K (256 = 8 x 32): x ~ d*sc_j*q - dmin*m_j, q in 0..15, sc_j and m_j 6-bit. Per sub-block j:
//        lo = min(0, min x), hi = max x; dmin = max_j(-lo_j) / 63 and m_j = ceil(-lo_j / dmin)
//        (the offset reaches lo_j); t_j = hi_j + dmin*m_j, d = max_j t_j / (15*63) and
//        sc_j = ceil(t_j / (15 d)) (the range reaches hi_j); q = rne((x + dmin*m_j) / (d*sc_j)).
//   Q6_K (256 = 16 x 16): x ~ d*sc_j*q, q in -32..31 (we use -31..31), sc_j int8 (we use 0..127):
//        s_j = amax_j / 31, d = max_j s_j / 127, sc_j = ceil(s_j / d), q = rne(x / (d*sc_j)).
// Q4_K's and Q6_K's d and dmin are rounded up to fp16 (the smallest half >= the value) before
// anything uses them, as stored; with the ceilings, each step is at least what the range needs, so
// no weight is clipped: |error| <= step/2, step = d*sc_j <= t_j/15 + d (Q4_K), s_j + d (Q6_K).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cmath>
#include <thread>
#include <vector>

#include "qk_types.h"

namespace {

using qk::f16_to_f32;

// float -> IEEE half bits, round to nearest even; overflow -> inf (numpy's astype(float16)).
// Fabian Giesen's float_to_half_fast3_rtne.
uint16_t f32_to_f16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t o;
  if (u >= (127u + 16u) << 23) {  // >= 65536 (or inf / nan): inf, nan stays a (quiet) nan
    o = u > 0x7f800000u ? 0x7e00 : 0x7c00;
  } else if (u < 113u << 23) {  // below 2^-14: subnormal or zero; the add rounds to 2^-24 steps
    const uint32_t magic_u = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    float magic, v;
    memcpy(&magic, &magic_u, 4);
    memcpy(&v, &u, 4);
    v += magic;
    memcpy(&u, &v, 4);
    o = (uint16_t)(u - magic_u);
  } else {  // normal: rebias the exponent, round the 13 dropped bits to even (a carry may give inf)
    const uint32_t mant_odd = (u >> 13) & 1;
    u += ((uint32_t)(15 - 127) << 23) + 0xfff + mant_odd;
    o = (uint16_t)(u >> 13);
  }
  return (uint16_t)(o | (sign >> 16));
}

// A scale as it will be stored: the smallest fp16 value >= v (inf past 65504); 0 where v is not
// positive (-0 included: the stored bits never depend on a zero's sign).
inline float as_f16_up(float v, uint16_t* bits) {
  if (!(v > 0.f)) {
    *bits = 0;
    return 0.f;
  }
  uint16_t h = f32_to_f16(v);
  if (f16_to_f32(h) < v) ++h;  // rounded down: the next half up
  *bits = h;
  return f16_to_f32(h);
}

// Round to nearest, ties to even, for |v| < 2^22 (every use here is |v| <= 64): adding 1.5 * 2^23
// leaves no fraction bits, so the add rounds; numpy's np.rint gives the same.
inline float rne(float v) {
  const float magic = 12582912.f;
  return (v + magic) - magic;
}

inline int clampi(float v, int lo, int hi) { return (int)std::min(std::max(v, (float)lo), (float)hi); }

inline void put16(uint8_t* p, uint16_t v) { memcpy(p, &v, 2); }

// block_q8_0: d (f16), qs[32] (int8); the rule is qk_types.h's (the KV cache's Q8_0 rows use it too)
void q8_0_block(const float* x, uint8_t* out) { qk::quantize_q8_0_block(x, out); }

// block_q4_K: d (f16), dmin (f16), scales[12] (8 6-bit scales and 8 6-bit mins), qs[128]
void q4_k_block(const float* x, uint8_t* out) {
  float lo[8], hi[8], t[8], M[8];
  int mn[8], sc[8];
  float max_min = 0.f;
  for (int j = 0; j < 8; ++j) {
    float a = 0.f, b = x[32 * j];
    for (int i = 0; i < 32; ++i) {
      a = std::min(a, x[32 * j + i]);
      b = std::max(b, x[32 * j + i]);
    }
    lo[j] = a;
    hi[j] = b;
    max_min = std::max(max_min, -a);
  }
  uint16_t d_bits, dmin_bits;
  const float dmin = as_f16_up(max_min / 63.f, &dmin_bits);
  float max_t = 0.f;
  for (int j = 0; j < 8; ++j) {
    mn[j] = dmin > 0.f ? clampi(std::ceil(-lo[j] / dmin), 0, 63) : 0;
    M[j] = dmin * (float)mn[j];
    t[j] = hi[j] + M[j];
    max_t = std::max(max_t, t[j]);
  }
  const float d = as_f16_up(max_t / 945.f, &d_bits);
  for (int j = 0; j < 8; ++j) sc[j] = d > 0.f ? clampi(std::ceil(t[j] / (15.f * d)), 0, 63) : 0;
  put16(out, d_bits);
  put16(out + 2, dmin_bits);
  uint8_t* s = out + 4;  // ggml's packing: j < 4 in the low 6 bits of s[j] / s[j+4], the rest split
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      s[j] = (uint8_t)sc[j];
      s[j + 4] = (uint8_t)mn[j];
    } else {
      s[j + 4] = (uint8_t)((sc[j] & 0xF) | ((mn[j] & 0xF) << 4));
      s[j - 4] |= (uint8_t)((sc[j] >> 4) << 6);
      s[j] |= (uint8_t)((mn[j] >> 4) << 6);
    }
  }
  uint8_t L[256];
  for (int j = 0; j < 8; ++j) {
    const float step = d * (float)sc[j];
    for (int i = 0; i < 32; ++i)
      L[32 * j + i] = step > 0.f ? (uint8_t)clampi(rne((x[32 * j + i] + M[j]) / step), 0, 15) : 0;
  }
  uint8_t* qs = out + 16;  // 64 weights per 32 bytes: the first 32 in the low nibbles
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l) qs[32 * c + l] = (uint8_t)(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
}

// block_q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d (f16)
void q6_k_block(const float* x, uint8_t* out) {
  float s[16];
  float smax = 0.f;
  for (int j = 0; j < 16; ++j) {
    float a = 0.f;
    for (int i = 0; i < 16; ++i) a = std::max(a, std::fabs(x[16 * j + i]));
    s[j] = a / 31.f;
    smax = std::max(smax, s[j]);
  }
  uint16_t d_bits;
  const float d = as_f16_up(smax / 127.f, &d_bits);
  uint8_t L[256];  // q + 32, 0..63
  for (int j = 0; j < 16; ++j) {
    const int sc = d > 0.f ? clampi(std::ceil(s[j] / d), 0, 127) : 0;
    out[192 + j] = (uint8_t)(int8_t)sc;
    const float step = d * (float)sc;
    for (int i = 0; i < 16; ++i)
      L[16 * j + i] = (uint8_t)(32 + (step > 0.f ? clampi(rne(x[16 * j + i] / step), -32, 31) : 0));
  }
  uint8_t *ql = out, *qh = out + 128;  // per 128 weights: ql 64 bytes, qh 32 bytes (ggml's order)
  for (int h = 0; h < 2; ++h) {
    const uint8_t* q = L + 128 * h;
    for (int l = 0; l < 32; ++l) {
      ql[64 * h + l] = (uint8_t)((q[l] & 0xF) | ((q[l + 64] & 0xF) << 4));
      ql[64 * h + l + 32] = (uint8_t)((q[l + 32] & 0xF) | ((q[l + 96] & 0xF) << 4));
      qh[32 * h + l] = (uint8_t)((q[l] >> 4) | ((q[l + 32] >> 4) << 2) | ((q[l + 64] >> 4) << 4) | ((q[l + 96] >> 4) << 6));
    }
  }
  put16(out + 208, d_bits);
}

using BlockFn = void (*)(const float*, uint8_t*);

BlockFn block_fn(int type) {
  switch (type) {
    case qk::Q8_0: return q8_0_block;
    case qk::Q4_K: return q4_k_block;
    case qk::Q6_K: return q6_k_block;
    default: return nullptr;
  }
}

}  // namespace

// quantize(type, x_ptr, n_blocks, out_ptr, threads): n_blocks consecutive blocks of x (fp32) ->
// n_blocks * block bytes at out_ptr. Blocks are independent, so the threads' split changes nothing.
static PyObject* py_quantize(PyObject*, PyObject* args) {
  int type, threads;
  unsigned long long x, out;
  long long n;
  if (!PyArg_ParseTuple(args, "iKLKi", &type, &x, &n, &out, &threads)) return nullptr;
  const BlockFn fn = block_fn(type);
  if (!fn) return PyErr_Format(PyExc_ValueError, "no quantizer for ggml type %d (Q8_0, Q4_K, Q6_K)", type);
  const qk::BlockInfo bi = qk::block_info(type);
  const float* xs = (const float*)(uintptr_t)x;
  uint8_t* os = (uint8_t*)(uintptr_t)out;
  const long long nt = std::max(1LL, std::min((long long)threads, n / 64 + 1));
  Py_BEGIN_ALLOW_THREADS
  auto run = [&](long long t) {
    for (long long b = n * t / nt; b < n * (t + 1) / nt; ++b) fn(xs + b * bi.elems, os + b * bi.bytes);
  };
  std::vector<std::thread> pool;
  for (long long t = 1; t < nt; ++t) pool.emplace_back(run, t);
  run(0);
  for (auto& th : pool) th.join();
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// to_f16(x_ptr, n, out_ptr): n floats -> n half bits (uint16), as the quantizers round their scales.
static PyObject* py_to_f16(PyObject*, PyObject* args) {
  unsigned long long x, out;
  long long n;
  if (!PyArg_ParseTuple(args, "KLK", &x, &n, &out)) return nullptr;
  const float* xs = (const float*)(uintptr_t)x;
  uint16_t* os = (uint16_t*)(uintptr_t)out;
  for (long long i = 0; i < n; ++i) os[i] = f32_to_f16(xs[i]);
  Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"quantize", py_quantize, METH_VARARGS, "quantize(type, x, n_blocks, out, threads): fp32 -> GGUF blocks"},
    {"to_f16", py_to_f16, METH_VARARGS, "to_f16(x, n, out): fp32 -> fp16 bits, round to nearest even"},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_qk_quant", "fp32 -> GGUF blocks (see kernels/quantize.cpp)", -1, module_methods,
};

PyMODINIT_FUNC PyInit__qk_quant(void) { return PyModule_Create(&module_def); }
