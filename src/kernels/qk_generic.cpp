// Portable build of the kernels (any CPU, no SIMD intrinsics): decode a group of 32 weights with
// the scalar decoder, dequantize, multiply-add in fp32. Slow but exact; the fallback path.
#include <cmath>

#include "qk_types.h"

namespace qk {
namespace generic {

static void dequant_row(const Job& jb, const uint8_t* row, float* out) {
  if (is_float_type_c(jb.type)) {
    for (int64_t k = 0; k < jb.K; ++k) out[k] = float_weight(jb.type, row, k);
    return;
  }
  int32_t q[32];
  float a0, a1, c;
  for (int64_t g = 0; g < jb.K / 32; ++g) {
    decode_group_scalar(jb.type, row, g, q, &a0, &a1, &c);
    for (int e = 0; e < 32; ++e) out[g * 32 + e] = (e < 16 ? a0 : a1) * (float)q[e] + c;
  }
}

static void rows(const Job& jb, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    dequant_row(jb, jb.w + r * jb.row_bytes, jb.scratch);
    for (int64_t t = 0; t < jb.T; ++t) {
      const float* x = jb.x + t * jb.K;
      float s = 0.f;
      for (int64_t k = 0; k < jb.K; ++k) s += jb.scratch[k] * x[k];
      jb.y[t * jb.ldy + r] = jb.accumulate ? jb.y[t * jb.ldy + r] + s : s;
    }
  }
}

RowsFn get(int type) { return block_info(type).elems ? rows : nullptr; }

// Dequantize rows `ids` of a matrix into out[n, K] (embedding lookups; exact, as the reference).
void dequant_rows(int type, const uint8_t* w, int64_t row_bytes, int64_t K, const int64_t* ids, int64_t n,
                  float* out) {
  Job jb{};
  jb.type = type;
  jb.K = K;
  for (int64_t i = 0; i < n; ++i) dequant_row(jb, w + ids[i] * row_bytes, out + i * K);
}

}  // namespace generic
}  // namespace qk

namespace qk {
namespace generic {

// The small per-layer ops of a decoder, fused into one pass each: at batch 1 torch spends more
// time dispatching their 4-6 elementwise ops than computing them. Plain C++ (the compiler
// vectorises the loops); the torch formulas in reference.py are what tests compare with.

// y[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * (w + w_offset)   (w_offset 1 for Gemma's (1 + w))
void rms_norm(const float* x, const float* w, float* y, int64_t T, int64_t C, float eps, float w_offset) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * C;
    float* yr = y + t * C;
    float ss = 0.f;
    for (int64_t c = 0; c < C; ++c) ss += xr[c] * xr[c];
    const float inv = 1.f / std::sqrt(ss / (float)C + eps);
    for (int64_t c = 0; c < C; ++c) yr[c] = xr[c] * inv * (w[c] + w_offset);
  }
}

// gate_up [T, 2I] (gate | up) -> y [T, I] = silu(gate) * up
void silu_mul(const float* gu, float* y, int64_t T, int64_t I) {
  for (int64_t t = 0; t < T; ++t) {
    const float* g = gu + t * 2 * I;
    const float* u = g + I;
    float* yr = y + t * I;
    for (int64_t i = 0; i < I; ++i) yr[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  }
}

// y[i] = gelu_tanh(x[i]) * (up ? up[i] : 1): one row (gelu_tanh_scalar, qk_types.h, has the formula)
void gelu_tanh_row(const float* x, const float* up, float* y, int64_t I) {
  for (int64_t i = 0; i < I; ++i) y[i] = gelu_tanh_scalar(x[i]) * (up ? up[i] : 1.f);
}

}  // namespace generic
}  // namespace qk

namespace qk {
namespace generic {

// Partial attention of one row's query heads over a range of its paged cache (AttendPartFn in
// qk_types.h has the contract), the portable version and the reference the SIMD ones follow: the
// scores, their max, exp(s - max) and its sum, then the exp-weighted sum of V rows. KT: the
// cache's element type (KvType), read by kv_at (qk_types.h).
template <int KT>
static void attend_part_t(const float* q, float* o, float* ml, const void* const* Kb, const void* const* Vb, int64_t bs,
                          int64_t p0, int64_t p1, int64_t hn, int64_t hd, float scale, float* scores) {
  const int64_t rb = kv_row_bytes(KT, hd), n = p1 - p0;
  for (int64_t h = 0; h < hn; ++h) {
    const float* qh = q + h * hd;
    float* sc = scores + h * n;
    float mx = -INFINITY;
    for (int64_t p = p0; p < p1; ++p) {
      const uint8_t* kb = (const uint8_t*)Kb[p / bs];  // K transposed in its block (kv_k_at)
      // 8 partial sums: a shape the compiler vectorises (a single float sum it may not reorder)
      float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      int64_t d = 0;
      for (; d + 8 <= hd; d += 8)
        for (int e = 0; e < 8; ++e) part[e] += qh[d + e] * kv_k_at<KT>(kb, bs, hd, p % bs, d + e);
      float s = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
      for (; d < hd; ++d) s += qh[d] * kv_k_at<KT>(kb, bs, hd, p % bs, d);
      s *= scale;
      sc[p - p0] = s;
      mx = s > mx ? s : mx;
    }
    ml[2 * h] = mx;
    ml[2 * h + 1] = softmax_exp(sc, n, mx);
    float* oh = o + h * hd;
    for (int64_t d = 0; d < hd; ++d) oh[d] = 0.f;
    for (int64_t p = p0; p < p1; ++p) {
      const float w = sc[p - p0];
      const uint8_t* vp = (const uint8_t*)Vb[p / bs] + (p % bs) * rb;
      for (int64_t d = 0; d < hd; ++d) oh[d] += w * kv_at<KT>(vp, d);
    }
  }
}

AttendPartFn get_attend(int kv_type) {
  switch (kv_type) {
    case KV_F16: return attend_part_t<KV_F16>;
    case KV_BF16: return attend_part_t<KV_BF16>;
    case KV_Q8_0: return attend_part_t<KV_Q8_0>;
    default: return attend_part_t<KV_F32>;
  }
}

}  // namespace generic
}  // namespace qk

namespace qk {
namespace generic {

// Rotary embedding in place, Hugging Face's rotate-half layout: in each of the first n_heads
// heads of row t (hd floats each, rows row_stride floats apart), for i < hd/2 with
// c = cos[pos[t], i], s = sin[pos[t], i]:  (x_i, x_{i+hd/2}) <- (x_i c - x_{i+hd/2} s, x_{i+hd/2} c + x_i s).
void rope(float* x, int64_t T, int64_t row_stride, int64_t n_heads, int64_t hd, const int64_t* pos,
          const float* cos_t, const float* sin_t) {
  const int64_t half = hd / 2;
  for (int64_t t = 0; t < T; ++t) {
    const float* c = cos_t + pos[t] * half;
    const float* s = sin_t + pos[t] * half;
    for (int64_t h = 0; h < n_heads; ++h) {
      float* a = x + t * row_stride + h * hd;
      float* b = a + half;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = a[i], x2 = b[i];
        a[i] = x1 * c[i] - x2 * s[i];
        b[i] = x2 * c[i] + x1 * s[i];
      }
    }
  }
}

}  // namespace generic
}  // namespace qk
