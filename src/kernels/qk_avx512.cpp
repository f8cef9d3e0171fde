// AVX-512 (F, BW, VL) build of the kernels: 16 float lanes, two vectors per group of 32.
// VNNI and BF16 dot products would round fp32 activations to int8 / bf16, so the exact kernels do
// not use them (see README "Quantized engine").
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include <immintrin.h>

#include <math.h>

#include "qk_types.h"

namespace qk {
namespace avx512 {

#include "qk_lanes256.h"  // struct Lanes256, in this namespace

struct S : Lanes256 {
  static constexpr int L = 16;
  using F = __m512;
  using I = __m512i;
  static inline I u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
  static inline I i8(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)); }
  static inline I and_(I a, int m) { return _mm512_and_si512(a, _mm512_set1_epi32(m)); }
  static inline I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static inline I sub(I a, int m) { return _mm512_sub_epi32(a, _mm512_set1_epi32(m)); }
  template <int N> static inline I srli(I a) { return _mm512_srli_epi32(a, N); }
  template <int N> static inline I slli(I a) { return _mm512_slli_epi32(a, N); }
  static inline I srl(I a, int n) { return _mm512_srl_epi32(a, _mm_cvtsi32_si128(n)); }
  static inline I bit4(uint32_t qh, int e) {
    const I sh = _mm512_add_epi32(_mm512_set1_epi32(e),
                                  _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    return _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)qh), sh), _mm512_set1_epi32(1)), 4);
  }
  static inline F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  // 32 signed bytes -> 2 float vectors, in order
  static inline void widen(__m256i b, F out[2]) {
    out[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
    out[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
  }
  // The Q6_K / Q4_K rows against x permuted within lanes (qk_simd.h mv_rows_q6k_perm,
  // mv_rows_q4k_perm) at 16 lanes: one 64-byte load holds 2 groups (Q6_K) or 2 pairs of groups
  // (Q4_K), taken apart per 32-bit lane by a mask or a shift (no shuffles), x permuted to match
  // (qk_types.h perm_x, H = 2)
  static constexpr bool PERM_MV = true;
  static inline I ldq(const uint8_t* p) { return _mm512_loadu_si512((const void*)p); }
  template <int SH> static inline I lane_byte_at(I b) { return _mm512_and_si512(b, _mm512_set1_epi32(255 << SH)); }
  static inline I lane_mask(I b, int m) { return _mm512_and_si512(b, _mm512_set1_epi32(m)); }
  template <int SH> static inline I lane_byte(I b) {
    if constexpr (SH >= 24) return _mm512_srli_epi32(b, SH);
    else if constexpr (SH == 0) return _mm512_and_si512(b, _mm512_set1_epi32(255));
    else return _mm512_and_si512(_mm512_srli_epi32(b, SH), _mm512_set1_epi32(255));
  }
  // Q6_K, half n of a super-block (groups 4n..4n + 3) as two 64-byte values of unsigned quants
  // (0..63), groups 4n, 4n + 1 in q[0] and 4n + 2, 4n + 3 in q[1]: the bytes of qk_simd.h's
  // q6k_half<false>, two of its 32-byte values per vector (the high bits' shifts differ per half,
  // so they are variable 16-bit shifts)
  static inline void q6k_half16(const uint8_t* sb, int n, I q[2]) {
    const I l = ldq(sb + 64 * n);
    const I h = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(sb + 128 + 32 * n)));
    const I m15 = _mm512_set1_epi8(15), m48 = _mm512_set1_epi8(0x30);
    const I sl = _mm512_sllv_epi16(h, _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1));
    const I sr = _mm512_srlv_epi16(h, _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1));
    // (a & 15) | b in one ternary-logic op (0xEC), b masked to 0x30 first
    q[0] = _mm512_ternarylogic_epi32(l, _mm512_and_si512(sl, m48), m15, 0xEC);
    q[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(l, 4), _mm512_and_si512(sr, m48), m15, 0xEC);
  }
  // Q6_K's 16 scales of a super-block, d * sc, as one vector
  static inline void q6_scales(const uint8_t* sb, F a[1]) {
    const __m128i sc = _mm_loadu_si128((const __m128i*)(sb + 192));
    a[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)), _mm512_set1_ps(h2f(sb + 208)));
  }
  // [a[i] x 4, a[i + 1] x 4, a[i + 2] x 4, a[i + 3] x 4] (Q6_K: two groups' scales of 16 weights
  // over their permuted lanes, groups i / 2 and i / 2 + 1)
  static inline F q6_gscale(const F a[1], int i) {
    return _mm512_permutexvar_ps(_mm512_add_epi32(_mm512_set1_epi32(i),
                                                  _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)), a[0]);
  }
  // [a[g] x 8, a[g + 2] x 8] from a super-block's 8 scales (Q4_K: a vector's two groups, 2p + n
  // and 2 (p + 1) + n)
  static inline F q4_gscale(const float* a, int g) {
    return _mm512_permutexvar_ps(_mm512_inserti64x4(_mm512_set1_epi32(g), _mm256_set1_epi32(g + 2), 1),
                                 _mm512_castps256_ps512(_mm256_loadu_ps(a)));
  }
  // 8 values in lanes 0..7, zeros above (Q4_K's 8 min terms of a super-block in a 16-lane fma)
  static inline F h_f(H a) { return _mm512_zextps256_ps512(a); }
  static inline F f32_8(const float* p) { return _mm512_maskz_loadu_ps(0xFF, p); }
  static inline F f32(const float* p) { return _mm512_loadu_ps(p); }
  static inline F h16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  static inline F bf16(const uint8_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  static inline float h2f(const uint8_t* p) { return _cvtsh_ss(rd16(p)); }
  // two adjacent halves (a block's d and m) in one conversion
  static inline void h2f2(const uint8_t* p, float& a, float& b) {
    const __m128 v = _mm_cvtph_ps(_mm_cvtsi32_si128((int)rd32(p)));
    a = _mm_cvtss_f32(v);
    b = _mm_cvtss_f32(_mm_movehdup_ps(v));
  }
  static inline F zero() { return _mm512_setzero_ps(); }
  static inline F bcast(const float* p) { return _mm512_set1_ps(*p); }
  static inline F set1(float a) { return _mm512_set1_ps(a); }
  static inline F add(F a, F b) { return _mm512_add_ps(a, b); }
  static inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static inline F div(F a, F b) { return _mm512_div_ps(a, b); }
  static inline F neg_abs(F a) { return _mm512_or_ps(a, _mm512_set1_ps(-0.f)); }
  static inline F pick_neg(F s, F a, F b) {  // b where s < 0 (sign bit)
    return _mm512_mask_blend_ps(_mm512_movepi32_mask(_mm512_castps_si512(s)), a, b);
  }
  // e^x for x <= 0 (softmax, silu), Cephes' expf polynomial (~1 ulp); x is clamped at -87.3, so
  // the smallest result is e^-87.3 = 1.2e-38 (the smallest normal float), never 0 or a subnormal
  static inline F exp_neg(F x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.33654f));
    const F fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    F r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
    F p = _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500e-4f), r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
  }
  static inline F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static inline void store(float* p, F a) { _mm512_storeu_ps(p, a); }
  static inline float hsum(F a) { return _mm512_reduce_add_ps(a); }
};

#include "qk_simd.h"

RowsFn get(int type) { return rows_fn(type); }
AttendPartFn get_attend(int kv_type) { return attend_for_type(kv_type); }
AttendTileFn get_attend_tile(int kv_type) { return attend_tile_for_type(kv_type); }
SiluFn get_silu() { return silu_mul_v; }
GeluRowFn get_gelu_tanh() { return gelu_tanh_row_v; }
ProbeReadFn get_probe_read() { return probe_read; }
ProbeFmaFn get_probe_fma() { return probe_fma; }

}  // namespace avx512
}  // namespace qk
