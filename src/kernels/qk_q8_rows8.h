// The int8 mode's few-row loops for the 8-lane (AVX2) builds, included after qk_q8_simd.h inside
// each of them (their V adds `dotv`: 32 unsigned weight bytes x 32 signed activation bytes, lane i
// the sum of products 4i .. 4i + 3). The idea is qk_q8_avx512.cpp's rows_small: weight rows read
// where they lie, the partial sums of 8 rows folded into one vector per group (lane r = row r),
// then the panel's float steps, so the bits are the panel's.

// Two vectors holding 2W partials per group -> one holding W: a's sums in the low W lanes of each
// 2W, b's in the high W.
template <int W>
static inline I fold8(I a, I b) {
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
static inline void sb_dots8(const uint8_t* const* rp, int64_t off, const int8_t* xs, I* G) {
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
    const I c0 = fold8<2>(fold8<1>(row(0), row(1)), fold8<1>(row(2), row(3)));
    const I c1 = fold8<2>(fold8<1>(row(4), row(5)), fold8<1>(row(6), row(7)));
    if constexpr (TY == Q4_K) {
      G[k] = fold8<4>(c0, c1);
    } else {  // c0: lanes 0-3 group 2k of rows 0-3, lanes 4-7 group 2k + 1; c1 the same of rows 4-7
      G[2 * k] = _mm256_permute2x128_si256(c0, c1, 0x20);
      G[2 * k + 1] = _mm256_permute2x128_si256(c0, c1, 0x31);
    }
  }
}

// Activation rows up to which a type takes rows_small8 (qk_q8.cpp lays x out row-major then).
// Measured on the AVX2 path of a Zen 4 (weights from DRAM, 1 thread): Q4_K 2.0x faster at 1 row,
// 1.5x at 2 (but 16% slower at 2 rows with the weights in cache); Q6_K 1.3x at 1 row, even at 2.
static constexpr int64_t small_t8(int type) { return type == Q4_K ? 2 : 1; }

// Rows [r0, r1) of a job at NT <= small_t8(TY) activation rows, x row-major (nt == 1): 8 rows at a
// time; per super-block the rows' scales, then per activation row the integer dots and the float
// steps in the panel's order. The next 8 rows are prefetched into L2 in address order.
template <int TY, int NT>
static void rows_small8(const Job& jb, int64_t r0, int64_t r1) {
  const XQ& x = jb.x;
  const int64_t K = x.K, G = K / 32, NB = K / 256;
  constexpr int NG = TY == Q4_K ? 8 : 16;
  alignas(32) float sa[16 * L], sc[16 * L];
  for (int64_t r = r0; r < r1; r += L) {
    const int nv = r1 - r < L ? (int)(r1 - r) : L;
    const uint8_t* rp[L];  // rows past the end read the last one again
    for (int l = 0; l < L; ++l) rp[l] = jb.w + (r + (l < nv ? l : nv - 1)) * jb.row_bytes;
    const uint8_t* ahead = jb.w + (r + L) * jb.row_bytes;
    F acc[NT];
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < NB; ++b) {
      for (int64_t o = b * L * sb_bytes<TY>(); o < (b + 1) * L * sb_bytes<TY>(); o += 64)
        V::prefetch(ahead + o);
      const int64_t off = b * sb_bytes<TY>();
      sb_scales<TY>(rp, off, sa, sc);
      _Pragma("GCC unroll 1") for (int t = 0; t < NT; ++t) {
        I Gd[NG];
        sb_dots8<TY>(rp, off, x.q + t * K + b * 256, Gd);
        const float* d32 = x.d32 + t * G + b * 8;
        const float* ms = TY == Q4_K ? x.ms32 + t * G + b * 8 : x.ms16 + t * 2 * G + b * 16;
        _Pragma("GCC unroll 16") for (int g = 0; g < NG; ++g) {
          acc[t] = V::fma(V::mul(V::cvt(Gd[g]), V::loadf(sa + g * L)), V::set1f(d32[TY == Q4_K ? g : g / 2]), acc[t]);
          acc[t] = V::fnmadd(V::loadf(sc + g * L), V::set1f(ms[g]), acc[t]);
        }
      }
    }
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t) {
      float* yt = jb.y + t * jb.ldy + r;
      alignas(32) float s[L];
      V::storef(s, acc[t]);
      if (nv == L) {
        V::storef(yt, jb.accumulate ? V::addf(V::loadf(yt), acc[t]) : acc[t]);
      } else {
        for (int l = 0; l < nv; ++l) yt[l] = jb.accumulate ? yt[l] + s[l] : s[l];
      }
    }
  }
}

template <int TY>
static void rows_any8(const Job& jb, int64_t r0, int64_t r1) {
  if (jb.x.nt == 1 && jb.x.T <= small_t8(TY)) {
    switch (jb.x.T) {
      case 1: return rows_small8<TY, 1>(jb, r0, r1);
      case 2: return rows_small8<TY, 2>(jb, r0, r1);
      case 3: return rows_small8<TY, 3>(jb, r0, r1);
      case 4: return rows_small8<TY, 4>(jb, r0, r1);
      default: break;
    }
  }
  rows<TY>(jb, r0, r1);
}

static RowsFn rows_fn8(int type) {
  switch (type) {
    case Q4_K: return rows_any8<Q4_K>;
    case Q6_K: return rows_any8<Q6_K>;
    default: return rows_fn(type);
  }
}
