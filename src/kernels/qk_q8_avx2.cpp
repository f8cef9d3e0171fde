// AVX2 builds of the int8 kernels (qk_q8_simd.h): 8 rows per panel. Two variants, chosen at run
// time (qk_q8.cpp): `avxvnni` (vpdpbusd / vpdpwssd on 256-bit vectors, Alder Lake, Zen 5) and
// `avx2` for CPUs without VNNI: 4 byte products summed by _mm256_maddubs_epi16 (pairs, into int16:
// at most 2 x 63 x 127, no saturation) then _mm256_madd_epi16 by ones (into int32).
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include <string.h>

#include <vector>

#include "qk_q8.h"

namespace qk {
namespace q8 {

// Everything but the dot products, shared by both variants.
struct V256 {
  static constexpr int L = 8;
  using I = __m256i;
  using F = __m256;
  static inline I zero() { return _mm256_setzero_si256(); }
  static inline I load(const int32_t* p) { return _mm256_load_si256((const __m256i*)p); }
  static inline void store(int32_t* p, I a) { _mm256_store_si256((__m256i*)p, a); }
  static inline I mullo(I a, I b) { return _mm256_mullo_epi32(a, b); }
  static inline I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static inline I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static inline I and_(I a, int m) { return _mm256_and_si256(a, _mm256_set1_epi32(m)); }
  static inline I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static inline I srl(I a, int n) { return _mm256_srl_epi32(a, _mm_cvtsi32_si128(n)); }
  static inline I sll(I a, int n) { return _mm256_sll_epi32(a, _mm_cvtsi32_si128(n)); }
  static inline I sra(I a, int n) { return _mm256_sra_epi32(a, _mm_cvtsi32_si128(n)); }
  // 16-byte chunk at rp[l] + off of the 8 rows, transposed: out[u] lane l = 4-byte word u of row l
  // (z[k] holds rows k, k + 4, so a 4 x 4 transpose inside each 128-bit lane leaves them in order)
  static inline void chunk4(const uint8_t* const* rp, int64_t off, I out[4]) {
    I z[4];
    _Pragma("GCC unroll 4") for (int k = 0; k < 4; ++k)
      z[k] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)(rp[k] + off))),
                                     _mm_loadu_si128((const __m128i*)(rp[k + 4] + off)), 1);
    const I t0 = _mm256_unpacklo_epi32(z[0], z[1]), t1 = _mm256_unpackhi_epi32(z[0], z[1]);
    const I t2 = _mm256_unpacklo_epi32(z[2], z[3]), t3 = _mm256_unpackhi_epi32(z[2], z[3]);
    out[0] = _mm256_unpacklo_epi64(t0, t2);
    out[1] = _mm256_unpackhi_epi64(t0, t2);
    out[2] = _mm256_unpacklo_epi64(t1, t3);
    out[3] = _mm256_unpackhi_epi64(t1, t3);
  }
  // 32 bytes at rp[l] + off of the 8 rows, transposed: out[u] lane l = 4-byte word u of row l
  // (an 8 x 8 transpose: 8 loads, 24 shuffles)
  static inline void words(const uint8_t* const* rp, int64_t off, I out[8]) {
    I r[8], t[8];
    _Pragma("GCC unroll 8") for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_si256((const __m256i*)(rp[i] + off));
    _Pragma("GCC unroll 4") for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // r[4i + w], 128-bit lane q: word 4q + w of rows 4i .. 4i + 3
    _Pragma("GCC unroll 2") for (int i = 0; i < 2; ++i) {
      r[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
      r[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
      r[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
      r[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    _Pragma("GCC unroll 4") for (int w = 0; w < 4; ++w) {
      out[w] = _mm256_permute2x128_si256(r[w], r[4 + w], 0x20);
      out[4 + w] = _mm256_permute2x128_si256(r[w], r[4 + w], 0x31);
    }
  }
  // Into L2: the panel's look-ahead (8 rows' bytes) would evict what L1 holds (on a Zen 4's AVX2
  // path from DRAM: 22-37% faster at K = 1536, 4% slower at K = 8960).
  static inline void prefetch(const uint8_t* p) { _mm_prefetch((const char*)p, _MM_HINT_T1); }
  static inline F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static inline F half_lo(I a) {  // the fp16 in bits 0..15 of each lane
    const __m256i lo = _mm256_shuffle_epi8(a, _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,
                                                                0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1));
    return _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(lo, 0x08)));
  }
  static inline F neg(F a) { return _mm256_sub_ps(_mm256_setzero_ps(), a); }
  static inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static inline F addf(F a, F b) { return _mm256_add_ps(a, b); }
  static inline F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static inline F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a * b, one rounding
  static inline F set1f(float a) { return _mm256_set1_ps(a); }
  static inline F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static inline void storef(float* p, F a) { _mm256_storeu_ps(p, a); }
  static inline int hsum(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
  }
  static inline float amax32(const float* x) {
    const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x), abs), _mm256_and_ps(_mm256_loadu_ps(x + 8), abs));
    m = _mm256_max_ps(m, _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + 16), abs), _mm256_and_ps(_mm256_loadu_ps(x + 24), abs)));
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // q = rint(x * inv) (round to nearest even, as the scalar form); s = sums of each 16
  static inline void quant32(const float* x, float inv, int8_t* q, int s[2]) {
    const __m256 iv = _mm256_set1_ps(inv);
    __m256i v[4];
    _Pragma("GCC unroll 4") for (int k = 0; k < 4; ++k) v[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * k), iv));
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256((__m256i*)q, _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    s[0] = hsum(_mm256_add_epi32(v[0], v[1]));
    s[1] = hsum(_mm256_add_epi32(v[2], v[3]));
  }
};

namespace avx2 {

struct V : V256 {
  static constexpr int NT = 4;  // the maddubs sequence needs two more registers than VNNI
  static inline I dpbusd(I acc, I w, int32_t x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_set1_epi32(x)), _mm256_set1_epi16(1)));
  }
  static inline I dpwssd(I acc, I a, int32_t x) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, _mm256_set1_epi32(x))); }
  static inline I dotv(I w, I x) { return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)); }
};

#include "qk_q8_simd.h"
#include "qk_q8_rows8.h"
#include "qk_q8_rows.h"

RowsFn get(int type) { return rows_fn_small(type); }
QuantFn quant() { return quant_rows; }
int64_t tile_rows() { return V::NT; }
int64_t small_rows(int type) { return small_t(type); }

}  // namespace avx2
}  // namespace q8
}  // namespace qk

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")

namespace qk {
namespace q8 {
namespace avxvnni {

struct V : V256 {
  static constexpr int NT = 6;
  static inline I dpbusd(I acc, I w, int32_t x) { return _mm256_dpbusd_avx_epi32(acc, w, _mm256_set1_epi32(x)); }
  static inline I dpwssd(I acc, I a, int32_t x) { return _mm256_dpwssd_avx_epi32(acc, a, _mm256_set1_epi32(x)); }
  static inline I dotv(I w, I x) { return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w, x); }
};

#include "qk_q8_simd.h"
#include "qk_q8_rows8.h"
#include "qk_q8_rows.h"

RowsFn get(int type) { return rows_fn_small(type); }
QuantFn quant() { return quant_rows; }
int64_t tile_rows() { return V::NT; }
int64_t small_rows(int type) { return small_t(type); }

}  // namespace avxvnni
}  // namespace q8
}  // namespace qk

#pragma GCC pop_options
