// AVX2 + FMA + F16C build of the kernels (the baseline x86-64 path): 8 float lanes.
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include <math.h>

#include "qk_types.h"

namespace qk {
namespace avx2 {

#include "qk_lanes256.h"  // struct Lanes256, in this namespace

struct S : Lanes256 {
  static constexpr int L = 8;
  using F = __m256;
  using I = __m256i;
  static inline I u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
  static inline I i8(const uint8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
  static inline I and_(I a, int m) { return _mm256_and_si256(a, _mm256_set1_epi32(m)); }
  static inline I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static inline I sub(I a, int m) { return _mm256_sub_epi32(a, _mm256_set1_epi32(m)); }
  template <int N> static inline I srli(I a) { return _mm256_srli_epi32(a, N); }
  template <int N> static inline I slli(I a) { return _mm256_slli_epi32(a, N); }
  static inline I srl(I a, int n) { return _mm256_srl_epi32(a, _mm_cvtsi32_si128(n)); }
  // bit 4 of the 5-bit quants e..e+7: bits e..e+7 of qh, moved to bit 4
  static inline I bit4(uint32_t qh, int e) {
    const I sh = _mm256_setr_epi32(e, e + 1, e + 2, e + 3, e + 4, e + 5, e + 6, e + 7);
    return _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)qh), sh), _mm256_set1_epi32(1)), 4);
  }
  static inline F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  // 32 signed bytes -> 4 float vectors, in order
  static inline void widen(__m256i b, F out[4]) {
    const __m128i lo = _mm256_castsi256_si128(b), hi = _mm256_extracti128_si256(b, 1);
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(lo, lo)));
    out[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    out[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(hi, hi)));
  }
  // The Q6_K / Q4_K rows against x permuted within groups of 32 (qk_simd.h mv_rows_q6k_perm,
  // mv_rows_q4k_perm) take this build's quants apart per 32-bit lane, without shuffles:
  static constexpr bool PERM_MV = true;
  static inline I ldq(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
  // bits [SH, SH + 8) (lane_byte_at) or the bits of m (lane_mask) of every lane, kept in place
  // (the value times a power of two): a mask only
  template <int SH> static inline I lane_byte_at(__m256i b) { return _mm256_and_si256(b, _mm256_set1_epi32(255 << SH)); }
  static inline I lane_mask(__m256i b, int m) { return _mm256_and_si256(b, _mm256_set1_epi32(m)); }
  // bits [SH, SH + 8) of every lane as a value: a shift and a mask (SH >= 24: a shift only)
  template <int SH> static inline I lane_byte(__m256i b) {
    if constexpr (SH >= 24) return _mm256_srli_epi32(b, SH);
    else if constexpr (SH == 0) return _mm256_and_si256(b, _mm256_set1_epi32(255));
    else return _mm256_and_si256(_mm256_srli_epi32(b, SH), _mm256_set1_epi32(255));
  }
  // Q6_K's 16 scales of a super-block, d * sc, as two vectors
  static inline void q6_scales(const uint8_t* sb, F a[2]) {
    const float d = h2f(sb + 208);
    a[0] = h_i8((const int8_t*)(sb + 192), d);
    a[1] = h_i8((const int8_t*)(sb + 200), d);
  }
  // [a[i] x 4, a[i + 1] x 4] of the 16 scales (Q6_K: group i / 2's two scales of 16 weights over
  // its permuted lanes)
  static inline F q6_gscale(const F a[2], int i) {
    const int i0 = i % 8;
    return _mm256_permutevar8x32_ps(a[i / 8], _mm256_setr_epi32(i0, i0, i0, i0, i0 + 1, i0 + 1, i0 + 1, i0 + 1));
  }
  // group g's scale in every lane (Q4_K: a vector is one group), from memory
  static inline F q4_gscale(const float* a, int g) { return _mm256_broadcast_ss(a + g); }
  static inline F h_f(H a) { return a; }  // Q4_K's 8 min terms: a vector as it is
  static inline F f32_8(const float* p) { return _mm256_loadu_ps(p); }
  static inline F f32(const float* p) { return _mm256_loadu_ps(p); }
  static inline F h16(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  static inline F bf16(const uint8_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
  static inline float h2f(const uint8_t* p) { return _cvtsh_ss(rd16(p)); }
  // two adjacent halves (a block's d and m) in one conversion
  static inline void h2f2(const uint8_t* p, float& a, float& b) {
    const __m128 v = _mm_cvtph_ps(_mm_cvtsi32_si128((int)rd32(p)));
    a = _mm_cvtss_f32(v);
    b = _mm_cvtss_f32(_mm_movehdup_ps(v));
  }
  static inline F zero() { return _mm256_setzero_ps(); }
  static inline F bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static inline F set1(float a) { return _mm256_set1_ps(a); }
  static inline F add(F a, F b) { return _mm256_add_ps(a, b); }
  static inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static inline F div(F a, F b) { return _mm256_div_ps(a, b); }
  static inline F neg_abs(F a) { return _mm256_or_ps(a, _mm256_set1_ps(-0.f)); }
  static inline F pick_neg(F s, F a, F b) { return _mm256_blendv_ps(a, b, s); }  // b where s < 0 (sign bit)
  // e^x for x <= 0 (softmax, silu), Cephes' expf polynomial (~1 ulp); x is clamped at -87.3, so
  // the smallest result is e^-87.3 = 1.2e-38 (the smallest normal float), never 0 or a subnormal
  static inline F exp_neg(F x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.33654f));
    const F fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    F r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
    F p = _mm256_fmadd_ps(_mm256_set1_ps(1.9875691500e-4f), r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static inline F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static inline void store(float* p, F a) { _mm256_storeu_ps(p, a); }
  static inline float hsum(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

#include "qk_simd.h"

RowsFn get(int type) { return rows_fn(type); }
AttendPartFn get_attend(int kv_type) { return attend_for_type(kv_type); }
AttendTileFn get_attend_tile(int kv_type) { return attend_tile_for_type(kv_type); }
SiluFn get_silu() { return silu_mul_v; }
GeluRowFn get_gelu_tanh() { return gelu_tanh_row_v; }
ProbeReadFn get_probe_read() { return probe_read; }
ProbeFmaFn get_probe_fma() { return probe_fma; }

}  // namespace avx2
}  // namespace qk
