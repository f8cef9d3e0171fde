// The int8 mode's few-row dot products for the 8-lane (AVX2) builds (qk_q8_rows.h runs them),
// included after qk_q8_simd.h inside each of them (their V adds `dotv`: 32 unsigned weight bytes x
// 32 signed activation bytes, lane i the sum of products 4i .. 4i + 3): the partial sums of 8 rows
// are folded into one vector per group, lane r = row r, as qk_q8_avx512.cpp does for 16.

// Two vectors holding 2W partials per group -> one holding W: a's sums in the low W lanes of each
// 2W, b's in the high W.
template <int W>
static inline I fold(I a, I b) {
  constexpr int hi = W == 1 ? 0xaa : W == 2 ? 0xcc : 0xf0;  // lanes l with l % 2W >= W
  const I z = _mm256_blend_epi32(b, a, hi);                  // b's lower W, a's upper W of each 2W
  const I y = W == 1   ? _mm256_shuffle_epi32(z, 0xb1)       // swap the W-lane halves
              : W == 2 ? _mm256_shuffle_epi32(z, 0x4e)
                       : _mm256_permute2x128_si256(z, z, 0x01);
  return _mm256_add_epi32(_mm256_blend_epi32(a, b, hi), y);
}

// One super-block of 8 rows (rp[l] + off) against one activation row's 256 bytes xs: G[g] lane r =
// row r's integer dot over group g (Q4_K: 8 groups of 32, Q6_K: 16 of 16). Kind k (8 per
// super-block) is one 32-byte vector of each row: Q4_K, the low (k even) or high nibbles of quant
// bytes 32 (k / 2) .. + 31, group k; Q6_K, quants 32k .. 32k + 31, groups 2k and 2k + 1.
template <int TY>
static inline void sb_dots(const uint8_t* const* rp, int64_t off, const int8_t* xs, I* G) {
  const I m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(0x03);
  _Pragma("GCC unroll 8") for (int k = 0; k < 8; ++k) {
    const I X = _mm256_loadu_si256((const __m256i*)(xs + 32 * k));
    auto row = [&](int l) {
      const uint8_t* b = rp[l] + off;
      I w;
      if constexpr (TY == Q4_K) {
        const I v = _mm256_loadu_si256((const __m256i*)(b + 16 + 32 * (k / 2)));
        w = _mm256_and_si256(k % 2 ? _mm256_srli_epi16(v, 4) : v, m4);
      } else {  // quants 128n + 32j + i: ql[64n + 32 (j & 1) + i] (high nibble if j >= 2), qh[32n + i] bits 2j
        const int n = k / 4, j = k % 4;
        const I ql = _mm256_loadu_si256((const __m256i*)(b + 64 * n + 32 * (j & 1)));
        const I qh = _mm256_loadu_si256((const __m256i*)(b + 128 + 32 * n));
        const I lo = _mm256_and_si256(j >= 2 ? _mm256_srli_epi16(ql, 4) : ql, m4);
        const I hb = _mm256_and_si256(j ? _mm256_srli_epi16(qh, 2 * j) : qh, m2);
        w = _mm256_or_si256(lo, _mm256_slli_epi16(hb, 4));
      }
      return V::dotv(w, X);
    };
    const I c0 = fold<2>(fold<1>(row(0), row(1)), fold<1>(row(2), row(3)));
    const I c1 = fold<2>(fold<1>(row(4), row(5)), fold<1>(row(6), row(7)));
    if constexpr (TY == Q4_K) {
      G[k] = fold<4>(c0, c1);
    } else {  // c0: lanes 0-3 group 2k of rows 0-3, lanes 4-7 group 2k + 1; c1 the same of rows 4-7
      G[2 * k] = _mm256_permute2x128_si256(c0, c1, 0x20);
      G[2 * k + 1] = _mm256_permute2x128_si256(c0, c1, 0x31);
    }
  }
}

// Activation rows up to which a type takes rows_small (qk_q8.cpp lays x out row-major then).
// Measured on the AVX2 path of a Zen 4 (one thread, against the panels with their look-ahead into
// L2): at 1 row 1.1-1.4x faster; at 2 rows Q4_K about even from DRAM and 18% slower in cache.
static constexpr int64_t small_t(int type) {
  (void)type;
  return 1;
}
