// 256-bit helpers shared by the AVX2 and AVX-512 builds (qk_avx2.cpp, qk_avx512.cpp): 8-float
// vectors for the K-quants' per-super-block scales and mins, and 32-byte values for byte-wise
// decoding of quants. Included inside each build's own namespace (qk::avx2, qk::avx512), after its
// `#pragma GCC target`, so each gets its own copy compiled for its ISA: no symbol is shared
// between the two (an inline function shared across ISAs could be linked from the wider build).
#pragma once

struct Lanes256 {
  // 8-float vectors for the per-super-block scales and mins of the K-quants (qk_simd.h: kq_scales)
  using H = __m256;
  static inline H h_zero() { return _mm256_setzero_ps(); }
  static inline H h_ld(const float* p) { return _mm256_loadu_ps(p); }
  static inline void h_st(float* p, H a) { _mm256_storeu_ps(p, a); }
  static inline H h_fma(H a, H b, H c) { return _mm256_fmadd_ps(a, b, c); }
  static inline float h_sum(H a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static inline H h_u8(const uint8_t* p, float m) {  // m * 8 unsigned bytes
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p))), _mm256_set1_ps(m));
  }
  static inline H h_i8(const int8_t* p, float m) {  // m * 8 signed bytes
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))), _mm256_set1_ps(m));
  }
  static inline void prefetch(const uint8_t* p) { _mm_prefetch((const char*)p, _MM_HINT_T0); }
  static inline void prefetch_l2(const uint8_t* p) { _mm_prefetch((const char*)p, _MM_HINT_T1); }
  static constexpr bool PERM_MV = false;  // mv_rows_q6k_perm / q4k_perm (qk_simd.h): the AVX2 and AVX-512 builds set it
  // 32 bytes of quants as one value, for byte-wise decoding (q6k_quants in qk_simd.h)
  using B = __m256i;
  static inline B ld32(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
  static inline B band(B a, int m) { return _mm256_and_si256(a, _mm256_set1_epi8((char)m)); }
  static inline B bor(B a, B b) { return _mm256_or_si256(a, b); }
  static inline B bsub(B a, int m) { return _mm256_sub_epi8(a, _mm256_set1_epi8((char)m)); }
  template <int N> static inline B sl16(B a) { return _mm256_slli_epi16(a, N); }  // bits cross into the next byte
  template <int N> static inline B sr16(B a) { return _mm256_srli_epi16(a, N); }
};
