// The int8 mode's few-row loops (decode, speculative verification), shared by the SIMD builds:
// included after qk_q8_simd.h and the build's own `sb_dots<TY>` and `small_t(type)` (AVX-512:
// qk_q8_avx512.cpp; AVX2: qk_q8_rows8.h). Weight rows are read where they lie, each super-block's
// integer dots come back one vector per group with lane r = row r, and the panel's fp32 steps
// follow in the panel's order, so every output has the panel's bits.

// Rows [r0, r1) of a job at NT <= small_t(TY) activation rows, x row-major (nt == 1): L rows at a
// time; per super-block the rows' scales, then per activation row the integer dots (sb_dots, the
// weights from L1 after the first row) and the float steps in the panel's order. The next L rows
// are prefetched in address order, a 1/NB of their bytes per super-block: one sequential stream
// (as the exact loops prefetch), where L streams a row apart outrun the prefetchers.
template <int TY, int NT>
static void rows_small(const Job& jb, int64_t r0, int64_t r1) {
  const XQ& x = jb.x;
  const int64_t K = x.K, G = K / 32, NB = K / 256;
  constexpr int NG = TY == Q4_K ? 8 : 16;
  alignas(64) float sa[16 * L], sc[16 * L];
  for (int64_t r = r0; r < r1; r += L) {
    const int nv = r1 - r < L ? (int)(r1 - r) : L;
    const uint8_t* rp[L];  // rows past the end read the last one again
    for (int l = 0; l < L; ++l) rp[l] = jb.w + (r + (l < nv ? l : nv - 1)) * jb.row_bytes;
    const uint8_t* ahead = jb.w + (r + L) * jb.row_bytes;
    F acc[NT];
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t) acc[t] = V::set1f(0.f);
    for (int64_t b = 0; b < NB; ++b) {
      if constexpr (TY == Q6_K && L == 16) {
        // except Q6_K on 16 rows, where each row's own super-block two on does better (from DRAM
        // on one Zen 4 thread: 1536 x 8960 rows -20%, the 151936 x 1536 head -9%; 8 rows and
        // Q4_K do better with the one stream)
        int64_t u = b + 2, pr = 0;
        if (u >= NB) u -= NB, pr = L;
        if (u < NB)
          for (int l = 0; l < L; ++l)
            for (int64_t o = 0; o < sb_bytes<TY>() + 64; o += 64) V::prefetch(rp[l] + pr * jb.row_bytes + u * sb_bytes<TY>() + o);
      } else {
        for (int64_t o = b * L * sb_bytes<TY>(); o < (b + 1) * L * sb_bytes<TY>(); o += 64) V::prefetch(ahead + o);
      }
      const int64_t off = b * sb_bytes<TY>();
      sb_scales<TY>(rp, off, sa, sc);
      _Pragma("GCC unroll 1") for (int t = 0; t < NT; ++t) {
        I Gd[NG];
        sb_dots<TY>(rp, off, x.q + t * K + b * 256, Gd);
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
      alignas(64) float s[L];
      V::storef(s, acc[t]);
      if (nv == L) {
        V::storef(yt, jb.accumulate ? V::addf(V::loadf(yt), acc[t]) : acc[t]);
      } else {
        for (int l = 0; l < nv; ++l) yt[l] = jb.accumulate ? yt[l] + s[l] : s[l];
      }
    }
  }
}

// qk_q8.cpp lays x out row-major (nt == 1) only when every segment of the call has T <=
// small_t(type), so a segment here runs rows_small, or the panel at T = 1 (the same layout).
template <int TY>
static void rows_any(const Job& jb, int64_t r0, int64_t r1) {
  if (jb.x.nt == 1 && jb.x.T <= small_t(TY)) {
    switch (jb.x.T) {
      case 1: return rows_small<TY, 1>(jb, r0, r1);
      case 2: return rows_small<TY, 2>(jb, r0, r1);  // (no build's small_t goes past 2)
      default: break;
    }
  }
  rows<TY>(jb, r0, r1);
}

static RowsFn rows_fn_small(int type) {
  switch (type) {
    case Q4_K: return rows_any<Q4_K>;
    case Q6_K: return rows_any<Q6_K>;
    default: return rows_fn(type);
  }
}
