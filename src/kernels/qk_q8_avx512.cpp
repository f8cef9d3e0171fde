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
  // Into L2: the panel's and rows_small's look-ahead (16 rows' bytes) would evict what L1 holds.
  static inline void prefetch(const uint8_t* p) { _mm_prefetch((const char*)p, _MM_HINT_T1); }
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

// ---- Few activation rows (decode): weight rows read in their own order, no panel ---------------
// At a few rows the panel's transposes and stores cost more than the dot products they feed.
// Here each weight row's super-block is loaded as it lies (64 bytes: 128 Q4_K quants, 64 Q6_K),
// dotted with matching activation bytes (vpdpbusd: lane i sums 4 products), and the partial sums
// of 16 rows are folded into one vector per group, lane r = row r: a transpose-and-add tree whose
// step `fold<W>` turns two vectors holding 2W partials per group into one holding W, one row's
// sums in the low W lanes of each 2W, the other's in the high W. The integers of a group are
// exact whatever order they are summed in, so the fp32 steps that follow (the panel's, group by
// group) give every output the panel's bits.

// Activation rows up to which a type takes this path (measured on Zen 4, one thread, against the
// panels with their look-ahead into L2: at 1 row 1.2-1.6x faster, weights in cache or DRAM; at 2
// rows Q4_K 3-9% faster from DRAM and even in cache, Q6_K 7% slower; from 3 rows the panels win.
// Q4_1 has no row-major loop, and at one row its panel reads the same x layout).
static constexpr int64_t small_t(int type) { return type == Q4_K ? 2 : 1; }

template <int W>
static inline I fold(I a, I b) {
  const __mmask16 hi = (__mmask16)(W == 1 ? 0xAAAA : W == 2 ? 0xCCCC : 0xF0F0);  // l % 2W >= W
  const I z = _mm512_mask_blend_epi32(hi, b, a);  // b's lower W, a's upper W of each 2W
  const I y = W == 1 ? _mm512_shuffle_epi32(z, (_MM_PERM_ENUM)0xb1)  // swap the W-lane halves
            : W == 2 ? _mm512_shuffle_epi32(z, (_MM_PERM_ENUM)0x4e)
                     : _mm512_shuffle_i32x4(z, z, 0xb1);
  return _mm512_add_epi32(_mm512_mask_blend_epi32(hi, a, b), y);
}

// One super-block of 16 rows (rp[l] + off) against one activation row's bytes xs (its 256 values
// of this super-block): G[g] lane r = row r's integer dot over group g (Q4_K: 8 groups of 32,
// Q6_K: 16 groups of 16, quants unsigned as in the panel). Two vectors of each row at a time (one
// 64-byte load of quants: Q4_K's low and high nibbles, Q6_K's two quarters), so that the tree of
// 16 rows stays in registers.
template <int TY>
static inline void sb_dots(const uint8_t* const* rp, int64_t off, const int8_t* xs, I* G) {
  const I m4 = _mm512_set1_epi32(0x0f0f0f0f);
  _Pragma("GCC unroll 2") for (int h = 0; h < 2; ++h) {
    I X[2];
    if constexpr (TY == Q4_K) {
      // the 64 bytes at 16 + 64h hold groups 4h, 4h + 2 (low nibbles) and 4h + 1, 4h + 3 (high)
      _Pragma("GCC unroll 2") for (int k = 0; k < 2; ++k) {
        const int8_t* b = xs + 128 * h + 32 * k;
        X[k] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)b)),
                                  _mm256_loadu_si256((const __m256i*)(b + 64)), 1);
      }
    } else {  // 64 consecutive quants per vector: groups 8h + 4k .. 8h + 4k + 3
      _Pragma("GCC unroll 2") for (int k = 0; k < 2; ++k) X[k] = _mm512_loadu_si512(xs + 128 * h + 64 * k);
    }
    auto row = [&](int l, I R[2]) {
      const uint8_t* b = rp[l] + off;
      if constexpr (TY == Q4_K) {
        const I v = _mm512_loadu_si512(b + 16 + 64 * h);
        R[0] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v, m4), X[0]);
        R[1] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(_mm512_srli_epi32(v, 4), m4), X[1]);
      } else {
        const I sh_lo = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0), sh_hi = _mm512_set_epi64(6, 6, 6, 6, 4, 4, 4, 4);
        const I m2 = _mm512_set1_epi32(0x03030303);
        const I ql = _mm512_loadu_si512(b + 64 * h);
        const I qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(b + 128 + 32 * h)));
        const I lo = _mm512_or_si512(_mm512_and_si512(ql, m4), _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi64(qh, sh_lo), m2), 4));
        const I hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(ql, 4), m4),
                                     _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi64(qh, sh_hi), m2), 4));
        R[0] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, X[0]);
        R[1] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, X[1]);
      }
    };
    if constexpr (TY == Q4_K) {  // 8 partials per group: three folds, then the two halves of 8 rows
      I E[2][2];
      _Pragma("GCC unroll 2") for (int q = 0; q < 2; ++q) {
        I D[2];
        _Pragma("GCC unroll 2") for (int p = 0; p < 2; ++p) {
          I C[2];
          _Pragma("GCC unroll 2") for (int m = 0; m < 2; ++m) {
            I R0[2], R1[2];
            const int l = 8 * q + 4 * p + 2 * m;
            row(l, R0);
            row(l + 1, R1);
            _Pragma("GCC unroll 2") for (int k = 0; k < 2; ++k) {
              const I f = fold<1>(R0[k], R1[k]);
              C[k] = m == 0 ? f : fold<2>(C[k], f);
            }
          }
          _Pragma("GCC unroll 2") for (int k = 0; k < 2; ++k) D[k] = p == 0 ? C[k] : fold<4>(D[k], C[k]);
        }
        _Pragma("GCC unroll 2") for (int k = 0; k < 2; ++k) E[q][k] = D[k];
      }
      // E[q][k]: lanes 0-7 group 4h + k of rows 8q .. 8q + 7, lanes 8-15 group 4h + k + 2
      _Pragma("GCC unroll 2") for (int k = 0; k < 2; ++k) {
        G[4 * h + k] = _mm512_shuffle_i32x4(E[0][k], E[1][k], 0x44);
        G[4 * h + k + 2] = _mm512_shuffle_i32x4(E[0][k], E[1][k], 0xee);
      }
    } else {  // 4 partials per group: two folds, then a 4 x 4 transpose of 128-bit lanes
      I Q[4][2];
      _Pragma("GCC unroll 4") for (int q = 0; q < 4; ++q) {
        _Pragma("GCC unroll 2") for (int m = 0; m < 2; ++m) {
          I R0[2], R1[2];
          row(4 * q + 2 * m, R0);
          row(4 * q + 2 * m + 1, R1);
          _Pragma("GCC unroll 2") for (int k = 0; k < 2; ++k) {
            const I f = fold<1>(R0[k], R1[k]);
            Q[q][k] = m == 0 ? f : fold<2>(Q[q][k], f);
          }
        }
      }
      // Q[q][k] 128-bit lane i: group 8h + 4k + i of rows 4q .. 4q + 3
      _Pragma("GCC unroll 2") for (int k = 0; k < 2; ++k) {
        const I a = _mm512_shuffle_i32x4(Q[0][k], Q[1][k], 0x44), b = _mm512_shuffle_i32x4(Q[0][k], Q[1][k], 0xee);
        const I c = _mm512_shuffle_i32x4(Q[2][k], Q[3][k], 0x44), d = _mm512_shuffle_i32x4(Q[2][k], Q[3][k], 0xee);
        I* g = G + 8 * h + 4 * k;
        g[0] = _mm512_shuffle_i32x4(a, c, 0x88);
        g[1] = _mm512_shuffle_i32x4(a, c, 0xdd);
        g[2] = _mm512_shuffle_i32x4(b, d, 0x88);
        g[3] = _mm512_shuffle_i32x4(b, d, 0xdd);
      }
    }
  }
}

#include "qk_q8_rows.h"

RowsFn get(int type) { return rows_fn_small(type); }
QuantFn quant() { return quant_rows; }
int64_t tile_rows() { return V::NT; }
int64_t small_rows(int type) { return small_t(type); }

}  // namespace avx512
}  // namespace q8
}  // namespace qk
