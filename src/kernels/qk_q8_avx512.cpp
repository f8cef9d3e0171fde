// AVX-512 build of the int8 kernels (qk_q8_simd.h): 16 rows per panel, VNNI dot products
// (vpdpbusd: 4 unsigned weight bytes x 4 signed activation bytes per lane; vpdpwssd for the mins).
// Only runs where the CPU has AVX512-VNNI (qk_q8.cpp checks); the exact kernels never use it.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#include <immintrin.h>

#include <string.h>

#include <vector>

#include "qk_q8.h"

namespace qk {
namespace q8 {
namespace avx512 {

struct V {
  static constexpr int L = 16;
  static constexpr int NT = 12;  // activation rows per tile: 2 x 12 accumulators + weights in 32 registers
  using I = __m512i;
  using F = __m512;
  static inline I zero() { return _mm512_setzero_si512(); }
  static inline I load(const int32_t* p) { return _mm512_load_si512(p); }
  static inline void store(int32_t* p, I a) { _mm512_store_si512(p, a); }
  static inline I dpbusd(I acc, I w, int32_t x) { return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(x)); }
  static inline I dpwssd(I acc, I a, int32_t x) { return _mm512_dpwssd_epi32(acc, a, _mm512_set1_epi32(x)); }
  static inline I mullo(I a, I b) { return _mm512_mullo_epi32(a, b); }
  static inline I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static inline I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static inline I and_(I a, int m) { return _mm512_and_si512(a, _mm512_set1_epi32(m)); }
  static inline I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static inline I srl(I a, int n) { return _mm512_srl_epi32(a, _mm_cvtsi32_si128(n)); }
  static inline I sll(I a, int n) { return _mm512_sll_epi32(a, _mm_cvtsi32_si128(n)); }
  static inline I sra(I a, int n) { return _mm512_sra_epi32(a, _mm_cvtsi32_si128(n)); }
  // 16-byte chunk at rp[l] + off of the 16 rows, transposed: out[u] lane l = 4-byte word u of row l
  // (z[k] holds rows k, k + 4, k + 8, k + 12, so a 4 x 4 transpose inside each 128-bit lane
  // leaves the rows in order)
  static inline void chunk4(const uint8_t* const* rp, int64_t off, I out[4]) {
    I z[4];
    _Pragma("GCC unroll 4") for (int k = 0; k < 4; ++k) {
      z[k] = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)(rp[k] + off)));
      z[k] = _mm512_inserti32x4(z[k], _mm_loadu_si128((const __m128i*)(rp[k + 4] + off)), 1);
      z[k] = _mm512_inserti32x4(z[k], _mm_loadu_si128((const __m128i*)(rp[k + 8] + off)), 2);
      z[k] = _mm512_inserti32x4(z[k], _mm_loadu_si128((const __m128i*)(rp[k + 12] + off)), 3);
    }
    const I t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]);
    const I t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
    out[0] = _mm512_unpacklo_epi64(t0, t2);
    out[1] = _mm512_unpackhi_epi64(t0, t2);
    out[2] = _mm512_unpacklo_epi64(t1, t3);
    out[3] = _mm512_unpackhi_epi64(t1, t3);
  }
  // 64 bytes at rp[l] + off of the 16 rows, transposed: out[u] lane l = 4-byte word u of row l
  // (a 16 x 16 transpose: 16 loads, 64 shuffles)
  static inline void words(const uint8_t* const* rp, int64_t off, I out[16]) {
    I r[16], t[16];
    _Pragma("GCC unroll 16") for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(rp[i] + off);
    _Pragma("GCC unroll 8") for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // r[4i + w], 128-bit lane q: word 4q + w of rows 4i .. 4i + 3
    _Pragma("GCC unroll 4") for (int i = 0; i < 4; ++i) {
      r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
      r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
      r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
      r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    _Pragma("GCC unroll 4") for (int w = 0; w < 4; ++w) {  // a 4 x 4 transpose of 128-bit lanes
      const I a = _mm512_shuffle_i32x4(r[w], r[4 + w], 0x44), b = _mm512_shuffle_i32x4(r[w], r[4 + w], 0xee);
      const I c = _mm512_shuffle_i32x4(r[8 + w], r[12 + w], 0x44), d = _mm512_shuffle_i32x4(r[8 + w], r[12 + w], 0xee);
      out[w] = _mm512_shuffle_i32x4(a, c, 0x88);
      out[4 + w] = _mm512_shuffle_i32x4(a, c, 0xdd);
      out[8 + w] = _mm512_shuffle_i32x4(b, d, 0x88);
      out[12 + w] = _mm512_shuffle_i32x4(b, d, 0xdd);
    }
  }
  static inline void prefetch(const uint8_t* p) { _mm_prefetch((const char*)p, _MM_HINT_T0); }
  static inline F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static inline F half_lo(I a) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(a)); }  // the fp16 in bits 0..15
  static inline F neg(F a) { return _mm512_sub_ps(_mm512_setzero_ps(), a); }
  static inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static inline F addf(F a, F b) { return _mm512_add_ps(a, b); }
  static inline F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static inline F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b, one rounding
  static inline F set1f(float a) { return _mm512_set1_ps(a); }
  static inline F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static inline void storef(float* p, F a) { _mm512_storeu_ps(p, a); }
  static inline float amax32(const float* x) {
    return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x)), _mm512_abs_ps(_mm512_loadu_ps(x + 16))));
  }
  // q = rint(x * inv) (round to nearest even, as the scalar form); s = sums of each 16
  static inline void quant32(const float* x, float inv, int8_t* q, int s[2]) {
    const __m512 iv = _mm512_set1_ps(inv);
    _Pragma("GCC unroll 2") for (int h = 0; h < 2; ++h) {
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 16 * h), iv));
      _mm_storeu_si128((__m128i*)(q + 16 * h), _mm512_cvtepi32_epi8(v));
      s[h] = _mm512_reduce_add_epi32(v);
    }
  }
};

#include "qk_q8_simd.h"

RowsFn get(int type) { return rows_fn(type); }
QuantFn quant() { return quant_rows; }
int64_t tile_rows() { return V::NT; }

}  // namespace avx512
}  // namespace q8
}  // namespace qk
