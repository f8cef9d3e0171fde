// The SIMD kernels, written once over a small vector wrapper `S` (S::L float lanes) that each ISA
// file defines before including this header inside its own namespace (qk_avx2.cpp: 8 lanes,
// qk_avx512.cpp: 16). Nothing here may be an external inline symbol: the same names are compiled
// for several ISAs into one library, so everything is `static` inside the includer's namespace.
//
// Four loop shapes (see ../../README.md "Quantized engine"):
// - T <= MV_MAX_T (decode, small batches; up to MV_PASS_MAX_T in passes of 4): each group of 32 weights is decoded to small integers
//   in registers and dotted with each activation row; the group's scale multiplies that dot and
//   its min multiplies the group's sum of x (precomputed once per call):
//   sum((a*q + c) * x) = a * sum(q*x) + c * sum(x). Four weight rows (two from 3 activation rows
//   on) share every load of x.
// - T >= PANEL_MIN_T's leftover rows: two rows dequantized into scratch, then a 2 x 4 dot-product
//   tile (2 weight rows x 4 activation rows) over the batch.
// - XT_MIN_T <= T < PANEL_MIN_T (batched decode, prefill chunks beside decodes): x arrives
//   k-major (Job::xt, 16 activation rows per chunk); 6 (or 12) dequantized weight rows are each
//   broadcast into one or two vectors of activations: 6 x 2 register accumulators, 2/3 of a load
//   per FMA, no horizontal sums, and x streams from L2 once per 6 rows.
// - T >= PANEL_MIN_T (long prefill chunks): a panel of P = 2 * S::L weight rows is dequantized
//   once into an fp32 scratch stored k-major ([K][P]), then a 6 x P register tile (6 activation
//   rows x P outputs, each activation broadcast) runs over a block of activation rows that stays
//   in L2: the classic GEMM micro-kernel shape; rows left over after the panels take the dot tiles.
// Activations and accumulation are fp32 throughout.

static constexpr int NV = 32 / S::L;  // vectors per group of 32

// Decode group g of a row into NV float vectors of integers q, with the constants of
// w = a(e) * q + c (a0 on the first half of the vectors, a1 on the second).
template <int TY>
static inline void decode(const uint8_t* row, int64_t g, typename S::F q[NV], float& a0, float& a1, float& c) {
  using I = typename S::I;
  c = 0.f;
  if constexpr (TY == Q4_0 || TY == Q4_1) {
    const uint8_t* b = row + g * (TY == Q4_0 ? 18 : 20);
    const uint8_t* qs = b + (TY == Q4_0 ? 2 : 4);
    if constexpr (TY == Q4_1) S::h2f2(b, a0, c);
    else a0 = S::h2f(b);
    a1 = a0;
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) {
      const int e = v * S::L;
      I iv = e < 16 ? S::and_(S::u8(qs + e), 15) : S::template srli<4>(S::u8(qs + e - 16));
      if constexpr (TY == Q4_0) iv = S::sub(iv, 8);
      q[v] = S::cvt(iv);
    }
  } else if constexpr (TY == Q5_0 || TY == Q5_1) {
    const uint8_t* b = row + g * (TY == Q5_0 ? 22 : 24);
    const uint8_t* hb = b + (TY == Q5_0 ? 2 : 4);
    const uint32_t qh = rd32(hb);
    const uint8_t* qs = hb + 4;
    if constexpr (TY == Q5_1) S::h2f2(b, a0, c);
    else a0 = S::h2f(b);
    a1 = a0;
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) {
      const int e = v * S::L;
      I iv = e < 16 ? S::and_(S::u8(qs + e), 15) : S::template srli<4>(S::u8(qs + e - 16));
      iv = S::or_(iv, S::bit4(qh, e));
      if constexpr (TY == Q5_0) iv = S::sub(iv, 16);
      q[v] = S::cvt(iv);
    }
  } else if constexpr (TY == Q8_0) {
    const uint8_t* b = row + g * 34;
    a0 = a1 = S::h2f(b);
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) q[v] = S::cvt(S::i8(b + 2 + v * S::L));
  } else if constexpr (TY == Q4_K || TY == Q5_K) {
    const uint8_t* sb = row + (g / 8) * (TY == Q4_K ? 144 : 176);
    const int j = (int)(g % 8);
    int sc, m;
    k4_scale_min(j, sb + 4, &sc, &m);
    float d, dmin;
    S::h2f2(sb, d, dmin);
    a0 = a1 = d * (float)sc;
    c = -(dmin * (float)m);
    const uint8_t* qs = sb + (TY == Q4_K ? 16 : 48) + 32 * (j / 2);
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) {
      const int e = v * S::L;
      I iv = (j & 1) ? S::template srli<4>(S::u8(qs + e)) : S::and_(S::u8(qs + e), 15);
      if constexpr (TY == Q5_K) iv = S::or_(iv, S::template slli<4>(S::and_(S::srl(S::u8(sb + 16 + e), j), 1)));
      q[v] = S::cvt(iv);
    }
  } else if constexpr (TY == Q6_K) {
    const uint8_t* sb = row + (g / 8) * 210;
    const int j = (int)(g % 8), n = j / 4, k = j % 4;
    const uint8_t* ql = sb + 64 * n + 32 * (k & 1);
    const uint8_t* qh = sb + 128 + 32 * n;
    const int8_t* sc = (const int8_t*)(sb + 192) + 8 * n + 2 * k;
    const float d = S::h2f(sb + 208);
    a0 = d * (float)sc[0];
    a1 = d * (float)sc[1];
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) {
      const int e = v * S::L;
      I lo = k >= 2 ? S::template srli<4>(S::u8(ql + e)) : S::and_(S::u8(ql + e), 15);
      I hi = S::template slli<4>(S::and_(S::srl(S::u8(qh + e), 2 * k), 3));
      q[v] = S::cvt(S::sub(S::or_(lo, hi), 32));
    }
  } else {  // dense float types: the "integers" are the weights themselves, a = 1, c = 0
    a0 = a1 = 1.f;
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) {
      const int64_t k = g * 32 + v * S::L;
      if constexpr (TY == F32) q[v] = S::f32((const float*)row + k);
      else if constexpr (TY == F16) q[v] = S::h16(row + 2 * k);
      else q[v] = S::bf16(row + 2 * k);
    }
  }
}

template <int TY>
static constexpr bool has_min() { return TY == Q4_1 || TY == Q5_1 || TY == Q4_K || TY == Q5_K; }

// The decode loops' look-ahead: the bytes of the NR rows two passes on, at the pace the current
// ones are read. Into L1 while that lies a few KiB ahead; into L2 once it would evict what L1
// holds (long rows: Q6_K 1536 x 8960 at 4 rows is 59 KiB ahead, and the L2 hint is ~25% faster
// from DRAM on Zen 4, ~14% on its AVX2 path; at K = 1536 the L1 hint is ~2% faster).
static constexpr int64_t PF_L1_BYTES = 16384;
template <class SS>
struct Ahead {
  const uint8_t* base;  // the first of the NR rows two passes on
  bool far;
  Ahead(const uint8_t* row, int NR, int64_t row_bytes)
      : base(row + 2 * NR * row_bytes), far(2 * NR * row_bytes > PF_L1_BYTES) {}
  void fetch(int64_t off) const {
    if (far) SS::prefetch_l2(base + off);
    else SS::prefetch(base + off);
  }
};

// T <= MV_MAX_T: y[t, r] for NR consecutive weight rows starting at `row` and NT activation rows
// from x_t (jb.x row t0 + t). Each group is decoded once into registers and dotted with every
// activation row; each (t, r) is summed in the same order as at T == 1, so a row's result does not
// depend on the batch it came in.
template <int TY, int NR, int NT>
static inline void mv_rows(const Job& jb, const uint8_t* row, int64_t t0, float* y) {
  using F = typename S::F;
  const int64_t G = jb.K / 32;
  const Ahead<S> ahead(row, NR, jb.row_bytes);
  const int64_t step = (NR * jb.row_bytes + G - 1) / (G ? G : 1);  // bytes of the next block per group
  const float* x0 = jb.x + t0 * jb.K;
  const float* xs0 = jb.xsum ? jb.xsum + t0 * G : nullptr;
  F tot[NR][NT];
  float ct[NR][NT];
  _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r)
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t) { tot[r][t] = S::zero(); ct[r][t] = 0.f; }
  for (int64_t g = 0; g < G; ++g) {
    // Prefetch a later block of NR rows at the pace this block is read, in the
    // contiguous weight stream, two blocks ahead (a row alone is shorter than RAM latency needs).
    ahead.fetch(g * step);
    ahead.fetch(g * step + 64);
    _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r) {
      F q[NV];
      float a0, a1, c;
      decode<TY>(row + r * jb.row_bytes, g, q, a0, a1, c);
      _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t) {
        const float* xg = x0 + t * jb.K + g * 32;
        if constexpr (TY == Q6_K) {
          F b0 = S::mul(q[0], S::f32(xg)), b1 = S::mul(q[NV / 2], S::f32(xg + 16));
          _Pragma("GCC unroll 8") for (int v = 1; v < NV / 2; ++v) {
            b0 = S::fma(q[v], S::f32(xg + v * S::L), b0);
            b1 = S::fma(q[NV / 2 + v], S::f32(xg + 16 + v * S::L), b1);
          }
          tot[r][t] = S::fma(S::set1(a0), b0, tot[r][t]);
          tot[r][t] = S::fma(S::set1(a1), b1, tot[r][t]);
        } else if constexpr (is_float_type_c(TY)) {
          _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) tot[r][t] = S::fma(q[v], S::f32(xg + v * S::L), tot[r][t]);
        } else {
          F b = S::mul(q[0], S::f32(xg));
          _Pragma("GCC unroll 8") for (int v = 1; v < NV; ++v) b = S::fma(q[v], S::f32(xg + v * S::L), b);
          tot[r][t] = S::fma(S::set1(a0), b, tot[r][t]);
          if constexpr (has_min<TY>()) ct[r][t] += c * xs0[t * G + g];
        }
      }
    }
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r)
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t) {
      float s = S::hsum(tot[r][t]) + ct[r][t];
      if constexpr (is_float_type_c(TY)) {
        const uint8_t* rw = row + r * jb.row_bytes;
        const float* xt = x0 + t * jb.K;
        for (int64_t k = G * 32; k < jb.K; ++k) s += float_weight(TY, rw, k) * xt[k];
      }
      float* yt = y + (t0 + t) * jb.ldy + r;
      *yt = jb.accumulate ? *yt + s : s;
    }
}

// ---- K-quant super-blocks (Q4_K, Q5_K, Q6_K) decoded whole, with byte operations
// A super-block holds 256 weights in 8 groups of 32. Decoding one group at a time (decode<TY>
// above) repeats the scale unpacking and works on 32-bit lanes; here the 8 scales and mins are
// unpacked once per super-block (straight-line code) and the quants of a group come out as 32
// signed bytes by a few 256-bit byte operations, widened to floats only for the dot product.
// Dequantized weights are the same numbers as decode<TY>'s.
template <int TY>
static constexpr bool is_kquant() { return TY == Q4_K || TY == Q5_K || TY == Q6_K; }

// q[j]: group j's quants (Q4_K 0..15, Q5_K 0..31, Q6_K -32..31); a[2j], a[2j + 1]: the scales of
// its two halves (equal except in Q6_K); c[j]: its min term (Q4_K / Q5_K; w = a * q + c).
// The 8 scales and mins of a Q4_K / Q5_K super-block (12 bytes of 6-bit fields, k4_scale_min's
// packing) unpacked with 32-bit word operations (llama.cpp's trick): sc8[j], m8[j].
static inline void k4_scales_mins(const uint8_t* q, uint8_t sc8[8], uint8_t m8[8]) {
  const uint32_t m6 = 0x3f3f3f3fu, m4 = 0x0f0f0f0fu, m2 = 0x03030303u;
  const uint32_t u0 = rd32(q), u1 = rd32(q + 4), u2 = rd32(q + 8);
  const uint32_t s0 = u0 & m6, s1 = (u2 & m4) | (((u0 >> 6) & m2) << 4);
  const uint32_t n0 = u1 & m6, n1 = ((u2 >> 4) & m4) | (((u1 >> 6) & m2) << 4);
  memcpy(sc8, &s0, 4);
  memcpy(sc8 + 4, &s1, 4);
  memcpy(m8, &n0, 4);
  memcpy(m8 + 4, &n1, 4);
}

// a[2j], a[2j + 1]: the scales of group j's two halves of 16 weights (equal except in Q6_K);
// c[j]: its min term (Q4_K / Q5_K: w = a * q + c), 8 lanes at a time.
template <int TY>
static inline void kq_scales(const uint8_t* sb, float a[16], float c[8]) {
  if constexpr (TY == Q6_K) {
    const float d = S::h2f(sb + 208);
    S::h_st(a, S::h_i8((const int8_t*)(sb + 192), d));
    S::h_st(a + 8, S::h_i8((const int8_t*)(sb + 200), d));
  } else {
    float d, dmin;
    S::h2f2(sb, d, dmin);
    uint8_t sc8[8], m8[8];
    k4_scales_mins(sb + 4, sc8, m8);
    float a8[8];
    S::h_st(a8, S::h_u8(sc8, d));
    S::h_st(c, S::h_u8(m8, -dmin));  // -(dmin * m): the same number
    _Pragma("GCC unroll 16") for (int j = 0; j < 16; ++j) a[j] = a8[j / 2];
  }
}

// Q6_K: the 4 groups of half n of a super-block (groups 4n..4n + 3) as 32 bytes each, by 256-bit
// byte operations on ql / qh: signed (-32..31, the same integers as decode<Q6_K>), or with OFF
// false unsigned (0..63, the offset of 32 not taken off).
template <bool OFF>
static inline void q6k_half(const uint8_t* sb, int n, typename S::B q[4]) {
  using B = typename S::B;
  const B l0 = S::ld32(sb + 64 * n), l1 = S::ld32(sb + 64 * n + 32), h = S::ld32(sb + 128 + 32 * n);
  // 16-bit shifts carry bits across bytes; each mask keeps only the byte's own bits
  q[0] = S::bor(S::band(l0, 15), S::band(S::template sl16<4>(h), 0x30));
  q[1] = S::bor(S::band(l1, 15), S::band(S::template sl16<2>(h), 0x30));
  q[2] = S::bor(S::band(S::template sr16<4>(l0), 15), S::band(h, 0x30));
  q[3] = S::bor(S::band(S::template sr16<4>(l1), 15), S::band(S::template sr16<2>(h), 0x30));
  if constexpr (OFF)
    _Pragma("GCC unroll 4") for (int m = 0; m < 4; ++m) q[m] = S::bsub(q[m], 32);
}
// the 8 groups of a super-block, signed
static inline void q6k_quants(const uint8_t* sb, typename S::B q[8]) {
  q6k_half<true>(sb, 0, q);
  q6k_half<true>(sb, 1, q + 4);
}

// Q4_K / Q5_K: the quants of groups 2i (low nibbles) and 2i + 1 (high nibbles) of a super-block
// as NV float vectors each: one load-and-widen of L bytes serves both groups.
template <int TY>
static inline void k4_pair(const uint8_t* sb, int i, typename S::F lo[NV], typename S::F hi[NV]) {
  using I = typename S::I;
  const uint8_t* qs = sb + (TY == Q4_K ? 16 : 48) + 32 * i;
  _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) {
    const I e = S::u8(qs + v * S::L);
    I l = S::and_(e, 15), h = S::template srli<4>(e);
    if constexpr (TY == Q5_K) {  // bit 4 of group j's quants is bit j of qh[l]
      const I qh = S::u8(sb + 16 + v * S::L);
      l = S::or_(l, S::template slli<4>(S::and_(S::srl(qh, 2 * i), 1)));
      h = S::or_(h, S::template slli<4>(S::and_(S::srl(qh, 2 * i + 1), 1)));
    }
    lo[v] = S::cvt(l);
    hi[v] = S::cvt(h);
  }
}

// mv_rows for the K-quants: a super-block of each of NR rows at a time (the same dot products as
// mv_rows; the min terms are summed 8 groups at a time).
template <int TY, int NR, int NT>
static inline void mv_rows_k(const Job& jb, const uint8_t* row, int64_t t0, float* y) {
  using F = typename S::F;
  constexpr int SB = TY == Q4_K ? 144 : TY == Q5_K ? 176 : 210;
  const int64_t NB = jb.K / 256, G = jb.K / 32;
  const Ahead<S> ahead(row, NR, jb.row_bytes);
  const int64_t step = NR * jb.row_bytes / (NB ? NB : 1);  // bytes of the block two ahead per super-block
  const float* x0 = jb.x + t0 * jb.K;
  const float* xs0 = jb.xsum ? jb.xsum + t0 * G : nullptr;
  F tot[NR][NT];
  typename S::H ct[NR][NT];  // the min terms, 8 groups' lanes apart
  _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r)
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t) { tot[r][t] = S::zero(); ct[r][t] = S::h_zero(); }
  // the group's dot product with each activation row, scaled into tot (a0 on the first half of
  // the vectors, a1 on the second: one scale per 16 weights in Q6_K)
  auto group = [&](int r, const F w[NV], int64_t k, float a0, float a1) {
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t) {
      const float* xg = x0 + t * jb.K + k;
      if constexpr (TY == Q6_K) {
        F b0 = S::mul(w[0], S::f32(xg)), b1 = S::mul(w[NV / 2], S::f32(xg + 16));
        _Pragma("GCC unroll 8") for (int v = 1; v < NV / 2; ++v) {
          b0 = S::fma(w[v], S::f32(xg + v * S::L), b0);
          b1 = S::fma(w[NV / 2 + v], S::f32(xg + 16 + v * S::L), b1);
        }
        tot[r][t] = S::fma(S::set1(a0), b0, tot[r][t]);
        tot[r][t] = S::fma(S::set1(a1), b1, tot[r][t]);
      } else {
        F bb = S::mul(w[0], S::f32(xg));
        _Pragma("GCC unroll 8") for (int v = 1; v < NV; ++v) bb = S::fma(w[v], S::f32(xg + v * S::L), bb);
        tot[r][t] = S::fma(S::set1(a0), bb, tot[r][t]);
      }
    }
  };
  for (int64_t b = 0; b < NB; ++b) {
    for (int64_t o = 0; o < step + 64; o += 64) ahead.fetch(b * step + o);
    _Pragma("GCC unroll 4") for (int r = 0; r < NR; ++r) {
      const uint8_t* sb = row + r * jb.row_bytes + b * SB;
      float a[16], c[8];
      kq_scales<TY>(sb, a, c);
      if constexpr (TY == Q6_K) {
        typename S::B q[8];
        q6k_quants(sb, q);
        _Pragma("GCC unroll 8") for (int j = 0; j < 8; ++j) {
          F w[NV];
          S::widen(q[j], w);
          group(r, w, b * 256 + j * 32, a[2 * j], a[2 * j + 1]);
        }
      } else {
        _Pragma("GCC unroll 4") for (int i = 0; i < 4; ++i) {
          F lo[NV], hi[NV];
          k4_pair<TY>(sb, i, lo, hi);
          group(r, lo, b * 256 + i * 64, a[4 * i], a[4 * i]);
          group(r, hi, b * 256 + i * 64 + 32, a[4 * i + 2], a[4 * i + 2]);
        }
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t)
          ct[r][t] = S::h_fma(S::h_ld(c), S::h_ld(xs0 + t * G + b * 8), ct[r][t]);
      }
    }
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r)
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t) {
      const float s = S::hsum(tot[r][t]) + S::h_sum(ct[r][t]);
      float* yt = y + (t0 + t) * jb.ldy + r;
      *yt = jb.accumulate ? *yt + s : s;
    }
}

// ---- Q6_K and Q4_K rows against x permuted within groups of 32 (SS::PERM_MV: the AVX2 and
// AVX-512 builds; T <= 8)
// mv_rows_k widens a group's 32 quant bytes to 4 float vectors in order, by sign-extending moves
// and lane extracts: 7 shuffles per 32 weights of Q6_K, and this CPU's shuffle port takes one a
// cycle (a 1-thread Zen 3 VM: ~12.7 cycles per 32 weights at T == 1, where cvtdq2ps and the FMAs
// run two a cycle each). Here a vector holds byte k of each 32-bit lane (SS::lane_byte: a mask,
// or a shift), i.e. the weights 4 i + k of a group for its lanes i = 0..7, so x is permuted the
// same way once per call (qk_types.h perm_x, Q6kShift): xp[32 g + 8 k + i] = x[32 g + 4 i + k].
// Bytes 1 and 2 are left in place (the quant times 2^8, 2^16; SS::lane_byte_at): xp holds those
// lanes' x times 2^-8 and 2^-16, so each product is the same number (a power of two in and out;
// x below 2^-110 in magnitude would lose bits to subnormals). Lanes 0..3 of a group are its first
// 16 weights and lanes 4..7 its second, so Q6_K's two scales of a group are [a0 x 4, a1 x 4]. The
// quants stay unsigned (0..63) and the offset of 32 goes into the sums of x per 16 (Job::xs16
// holds -32 times them):
//   sum_i d sc (q_i - 32) x_i = sum_i (d sc) q_i x_i - 32 (d sc) sum_i x_i.
// A vector is H = L / 8 such 8-lane chunks: AVX2 one group per vector, AVX-512 two (one 64-byte
// load holds two Q6_K groups or two Q4_K pairs of groups, and perm_x lays x out to match, H = 2);
// where the two builds differ, S says how (PERM_MV's members in qk_avx2.cpp, qk_avx512.cpp).
// The same weights and products as mv_rows_k in another summation order; each row's chain is the
// same whatever NT, NR and NG, so a row's bits do not depend on the rows beside it
// (speculation's verify rows still equal one-token decoding).

// y[t0 + t, r] (=, or += with jb.accumulate) the lanes' sum of tot[r][t]
template <class SS, int NR, int NT>
static inline void perm_store(const Job& jb, typename SS::F tot[NR][NT], int64_t t0, float* y) {
  _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r)
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t) {
      const float s = SS::hsum(tot[r][t]);
      float* yt = y + (t0 + t) * jb.ldy + r;
      *yt = jb.accumulate ? *yt + s : s;
    }
}

// Q6_K: per super-block, its 16 scales (SS::q6_scales: in 16 / L vectors) against the sums of x
// per 16 (the offsets), then each half's quants (4 / H vectors of lane bytes), each vector's 4 lane
// bytes dotted with x and scaled by its groups' scales (SS::q6_gscale) into tot.
template <class SS, int NR, int NT>
static inline void mv_rows_q6k_perm(const Job& jb, const uint8_t* row, int64_t t0, float* y) {
  using F = typename SS::F;
  using I = typename SS::I;
  constexpr int SB = 210, H = SS::L / 8, NS = 16 / SS::L;
  const int64_t NB = jb.K / 256;
  const Ahead<SS> ahead(row, NR, jb.row_bytes);
  const int64_t step = NR * jb.row_bytes / (NB ? NB : 1);  // bytes of the block two ahead per super-block
  const float* x0 = jb.xp + t0 * jb.K;
  const float* xs0 = jb.xs16 + t0 * (jb.K / 16);
  F tot[NR][NT];
  _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r)
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t) tot[r][t] = SS::zero();
  for (int64_t b = 0; b < NB; ++b) {
    for (int64_t o = 0; o < step + 64; o += 64) ahead.fetch(b * step + o);
    _Pragma("GCC unroll 4") for (int r = 0; r < NR; ++r) {
      const uint8_t* sb = row + r * jb.row_bytes + b * SB;
      F a[NS];  // d * the 16 scales
      SS::q6_scales(sb, a);
      _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t)  // the offsets: -32 x's sums per 16 (xs16)
        _Pragma("GCC unroll 2") for (int v = 0; v < NS; ++v)
          tot[r][t] = SS::fma(a[v], SS::f32(xs0 + t * (jb.K / 16) + b * 16 + v * SS::L), tot[r][t]);
      _Pragma("GCC unroll 2") for (int n = 0; n < 2; ++n) {
        I q[4 / H];  // groups 4n + H j .. 4n + H j + H - 1 in q[j]: unsigned quants in lane bytes
        if constexpr (H == 1) q6k_half<false>(sb, n, q);
        else SS::q6k_half16(sb, n, q);
        _Pragma("GCC unroll 4") for (int j = 0; j < 4 / H; ++j) {
          // bytes 1 and 2 stay in place (x 2^8, x 2^16): xp holds those lanes' x times 2^-8 and
          // 2^-16, so every product is the same number (powers of two)
          const F w[4] = {SS::cvt(SS::template lane_byte<0>(q[j])), SS::cvt(SS::template lane_byte_at<8>(q[j])),
                          SS::cvt(SS::template lane_byte_at<16>(q[j])), SS::cvt(SS::template lane_byte<24>(q[j]))};
          const F sv = SS::q6_gscale(a, 2 * (4 * n + H * j));
          const float* xg = x0 + b * 256 + (4 * n + H * j) * 32;
          _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t) {
            F acc = SS::mul(w[0], SS::f32(xg + t * jb.K));
            _Pragma("GCC unroll 3") for (int k = 1; k < 4; ++k) acc = SS::fma(w[k], SS::f32(xg + t * jb.K + 8 * H * k), acc);
            tot[r][t] = SS::fma(sv, acc, tot[r][t]);
          }
        }
      }
    }
  }
  perm_store<SS, NR, NT>(jb, tot, t0, y);
}

// Q4_K the same way (Job::xp4, perm_x with Q4kShift): the 32 bytes of groups 2p (low nibbles) and
// 2p + 1 (high nibbles) are 8 lanes of 4 bytes; vector k of nibble n is the nibble at bit
// s = 8 k + 4 n of each lane, kept in place by a mask (q times 2^s; xp4 holds those lanes' x times
// 2^-s, x below 2^-102 would lose bits) but for s = 28, shifted down (15 << 28 does not fit a
// signed lane). A vector spans H pairs, so its groups are 2 (H j + h) + n for h < H (their scales:
// SS::q4_gscale). The min term is one fma per super-block: the 8 groups' -dmin m_j against their
// sums of x (Job::xsum). The loops run x-vector-major over the rows (each mask and each x vector
// loaded once for all NR rows, each row's bytes once per load) with the prefetches unrolled: ~12%
// more on one AVX2 thread at T = 1 than a row at a time (fewer loads and instructions per 32
// weights; the same operations per row, so the same bits). NG = 2 runs nibbles 0 and 1 side by
// side: twice the independent FMA chains (each 4 deep) for the same rows; mv_range takes it where
// the accumulators fit in registers (AVX2 at NT == 2 with 2 rows: ~10% faster there than 4 rows
// one nibble at a time, which spill).
template <class SS, int NR, int NT, int NG>
static inline void mv_rows_q4k_perm(const Job& jb, const uint8_t* row, int64_t t0, float* y) {
  using F = typename SS::F;
  using I = typename SS::I;
  constexpr int SB = 144, H = SS::L / 8;
  const int64_t NB = jb.K / 256, G = jb.K / 32, rb = jb.row_bytes;
  const Ahead<SS> ahead(row, NR, rb);
  const float* x0 = jb.xp4 + t0 * jb.K;
  const float* xs0 = jb.xsum + t0 * G;
  F tot[NR][NT];
  alignas(32) float a[NR][8];  // d * the 8 scales of the rows' super-block
  _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r)
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t) tot[r][t] = SS::zero();
  for (int64_t b = 0; b < NB; ++b) {
    // the rows' super-blocks two ahead (NR * 144 bytes; unrolled: no loop branch)
    _Pragma("GCC unroll 16") for (int o = 0; o < NR * SB + 64; o += 64) ahead.fetch(b * NR * SB + o);
    _Pragma("GCC unroll 4") for (int r = 0; r < NR; ++r) {
      const uint8_t* sb = row + r * rb + b * SB;
      float d, dmin;
      SS::h2f2(sb, d, dmin);
      uint8_t sc8[8], m8[8];
      k4_scales_mins(sb + 4, sc8, m8);
      SS::h_st(a[r], SS::h_u8(sc8, d));
      const F C = SS::h_f(SS::h_u8(m8, -dmin));  // -(dmin * m): the same number (lanes 8.. zero)
      _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t) tot[r][t] = SS::fma(C, SS::f32_8(xs0 + t * G + b * 8), tot[r][t]);
    }
    // each load of H pairs of groups: every row's bytes loaded once; then for each of the 4
    // vectors of a nibble, every row's quants masked and converted, against each x vector loaded
    // once for all rows (the rows' chains interleave)
    const uint8_t* q = row + b * SB + 16;
    _Pragma("GCC unroll 4") for (int j = 0; j < 4 / H; ++j) {
      I e[NR];
      _Pragma("GCC unroll 4") for (int r = 0; r < NR; ++r) e[r] = SS::ldq(q + r * rb + 32 * H * j);
      _Pragma("GCC unroll 2") for (int n0 = 0; n0 < 2; n0 += NG) {
        F acc[NG][NR][NT];
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; ++k) {
          _Pragma("GCC unroll 2") for (int i = 0; i < NG; ++i) {
            const int n = n0 + i;
            const float* xg = x0 + b * 256 + 64 * H * j + 8 * H * (4 * n + k);
            F xv[NT];
            _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t) xv[t] = SS::f32(xg + t * jb.K);
            _Pragma("GCC unroll 4") for (int r = 0; r < NR; ++r) {
              const F w = SS::cvt(n == 1 && k == 3 ? SS::template lane_byte<28>(e[r]) : SS::lane_mask(e[r], 15 << (8 * k + 4 * n)));
              _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t) acc[i][r][t] = k == 0 ? SS::mul(w, xv[t]) : SS::fma(w, xv[t], acc[i][r][t]);
            }
          }
        }
        _Pragma("GCC unroll 4") for (int r = 0; r < NR; ++r)
          _Pragma("GCC unroll 2") for (int i = 0; i < NG; ++i) {
            const F sv = SS::q4_gscale(a[r], 2 * H * j + n0 + i);
            _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t) tot[r][t] = SS::fma(sv, acc[i][r][t], tot[r][t]);
          }
      }
    }
  }
  perm_store<SS, NR, NT>(jb, tot, t0, y);
}

// Rows r0..r1 for the activation rows [t0, t0 + NT): four weight rows at a time (two from three
// activation rows on, so the accumulators stay in registers), then one.
template <int TY, int NT>
static inline void mv_range(const Job& jb, int64_t r0, int64_t r1, int64_t t0) {
  constexpr int NR = NT <= 2 ? 4 : 2;
  int64_t r = r0;
  if constexpr (TY == Q6_K && S::PERM_MV) {
    if (jb.xp != nullptr) {
      constexpr int NR6 = S::L == 16 && NT <= 4 ? 4 : NR;  // 32 registers hold 4 rows' sums to 4 x rows
      for (; r + NR6 <= r1; r += NR6) mv_rows_q6k_perm<S, NR6, NT>(jb, jb.w + r * jb.row_bytes, t0, jb.y + r);
      for (; r < r1; ++r) mv_rows_q6k_perm<S, 1, NT>(jb, jb.w + r * jb.row_bytes, t0, jb.y + r);
      return;
    }
  }
  if constexpr (TY == Q4_K && S::PERM_MV) {
    if (jb.xp4 != nullptr) {
      // nibbles side by side while the accumulators fit: AVX2 (16 registers) at NT == 2 with 2
      // rows, AVX-512 (32) up to NT == 2 with NR rows
      constexpr bool avx2_pair = S::L == 8 && NT == 2;
      constexpr int NG = avx2_pair || (S::L == 16 && NT <= 2) ? 2 : 1, NR4 = avx2_pair ? 2 : NR;
      for (; r + NR4 <= r1; r += NR4) mv_rows_q4k_perm<S, NR4, NT, NG>(jb, jb.w + r * jb.row_bytes, t0, jb.y + r);
      for (; r < r1; ++r) mv_rows_q4k_perm<S, 1, NT, NG>(jb, jb.w + r * jb.row_bytes, t0, jb.y + r);
      return;
    }
  }
  if constexpr (is_kquant<TY>()) {
    for (; r + NR <= r1; r += NR) mv_rows_k<TY, NR, NT>(jb, jb.w + r * jb.row_bytes, t0, jb.y + r);
    for (; r < r1; ++r) mv_rows_k<TY, 1, NT>(jb, jb.w + r * jb.row_bytes, t0, jb.y + r);
    return;
  }
  for (; r + NR <= r1; r += NR) mv_rows<TY, NR, NT>(jb, jb.w + r * jb.row_bytes, t0, jb.y + r);
  for (; r < r1; ++r) mv_rows<TY, 1, NT>(jb, jb.w + r * jb.row_bytes, t0, jb.y + r);
}

// Dequantize one row into fp32 (K tail included for the float types).
template <int TY>
static inline void dequant_row(const Job& jb, const uint8_t* row, float* out) {
  using F = typename S::F;
  const int64_t G = jb.K / 32;
  if constexpr (is_kquant<TY>()) {  // a super-block at a time (kq_scales), the same numbers
    constexpr int SB = TY == Q4_K ? 144 : TY == Q5_K ? 176 : 210;
    for (int64_t b = 0; b < G / 8; ++b) {
      const uint8_t* sb = row + b * SB;
      float a[16], c[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      kq_scales<TY>(sb, a, c);
      F w[8][NV];
      if constexpr (TY == Q6_K) {
        typename S::B q[8];
        q6k_quants(sb, q);
        _Pragma("GCC unroll 8") for (int j = 0; j < 8; ++j) S::widen(q[j], w[j]);
      } else {
        _Pragma("GCC unroll 4") for (int i = 0; i < 4; ++i) k4_pair<TY>(sb, i, w[2 * i], w[2 * i + 1]);
      }
      _Pragma("GCC unroll 8") for (int j = 0; j < 8; ++j) {
        const F A0 = S::set1(a[2 * j]), A1 = S::set1(a[2 * j + 1]), C = S::set1(c[j]);
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v)
          S::store(out + b * 256 + j * 32 + v * S::L, S::fma(w[j][v], v < NV / 2 ? A0 : A1, C));
      }
    }
    return;
  }
  for (int64_t g = 0; g < G; ++g) {
    F q[NV];
    float a0, a1, c;
    decode<TY>(row, g, q, a0, a1, c);
    if constexpr (is_float_type_c(TY)) {
      _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) S::store(out + g * 32 + v * S::L, q[v]);
    } else {
      const F A0 = S::set1(a0), A1 = S::set1(a1), C = S::set1(c);
      _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) S::store(out + g * 32 + v * S::L, S::fma(q[v], v < NV / 2 ? A0 : A1, C));
    }
  }
  if constexpr (is_float_type_c(TY))
    for (int64_t k = G * 32; k < jb.K; ++k) out[k] = float_weight(TY, row, k);
}

// fp32 tile: NR (1..2) dequantized rows w[NR][K] x NT (1..4) activation rows.
template <int NR, int NT>
static inline void tile(const float* w, int64_t K, const float* x, float* y, int64_t ldy, bool acc_out) {
  using F = typename S::F;
  F acc[NR][NT];
  _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r)
    _Pragma("GCC unroll 8") for (int t = 0; t < NT; ++t) acc[r][t] = S::zero();
  const int64_t KV = K / S::L * S::L;
  for (int64_t k = 0; k < KV; k += S::L) {
    F wv[NR];
    _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r) wv[r] = S::f32(w + r * K + k);
    _Pragma("GCC unroll 8") for (int t = 0; t < NT; ++t) {
      const F xv = S::f32(x + t * K + k);
      _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r) acc[r][t] = S::fma(wv[r], xv, acc[r][t]);
    }
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r)
    _Pragma("GCC unroll 8") for (int t = 0; t < NT; ++t) {
      float s = S::hsum(acc[r][t]);
      for (int64_t k = KV; k < K; ++k) s += w[r * K + k] * x[t * K + k];
      y[t * ldy + r] = acc_out ? y[t * ldy + r] + s : s;
    }
}

template <int NR>
static inline void tile_rows(const float* w, int64_t K, const float* x, int64_t nt, float* y, int64_t ldy, bool a) {
  int64_t t = 0;
  for (; t + 4 <= nt; t += 4) tile<NR, 4>(w, K, x + t * K, y + t * ldy, ldy, a);
  switch (nt - t) {
    case 3: tile<NR, 3>(w, K, x + t * K, y + t * ldy, ldy, a); break;
    case 2: tile<NR, 2>(w, K, x + t * K, y + t * ldy, ldy, a); break;
    case 1: tile<NR, 1>(w, K, x + t * K, y + t * ldy, ldy, a); break;
    default: break;
  }
}

// The batched loops' look-ahead (the next pass's rows, whole): into L2, as the rows can be long
// (from DRAM on one Zen 4 thread at T = 16: Q6_K 12288 x 8960 -6%, Q4_K at K = 1536 -1%).
static inline void prefetch_bytes(const uint8_t* p, int64_t n) {
  for (int64_t o = 0; o < n; o += 64) S::prefetch_l2(p + o);
}

static constexpr int64_t T_BLOCK = 64;  // activation rows kept hot in L2 while rows stream past
static constexpr int P = 2 * S::L;      // weight rows per panel
static constexpr int MT = 6;            // activation rows per micro-tile

// y[t, 0..P) for NT activation rows, from the k-major panel wp [K][P].
template <int NT>
static inline void micro(const float* wp, int64_t K, const float* x, float* y, int64_t ldy, bool a) {
  using F = typename S::F;
  F acc[NT][2];
  _Pragma("GCC unroll 8") for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = S::zero();
  for (int64_t k = 0; k < K; ++k) {
    const F w0 = S::f32(wp + k * P), w1 = S::f32(wp + k * P + S::L);
    _Pragma("GCC unroll 8") for (int t = 0; t < NT; ++t) {
      const F xb = S::bcast(x + t * K + k);
      acc[t][0] = S::fma(w0, xb, acc[t][0]);
      acc[t][1] = S::fma(w1, xb, acc[t][1]);
    }
  }
  _Pragma("GCC unroll 8") for (int t = 0; t < NT; ++t) {
    if (a) {
      acc[t][0] = S::add(acc[t][0], S::f32(y + t * ldy));
      acc[t][1] = S::add(acc[t][1], S::f32(y + t * ldy + S::L));
    }
    S::store(y + t * ldy, acc[t][0]);
    S::store(y + t * ldy + S::L, acc[t][1]);
  }
}

static inline void micro_rows(const float* wp, int64_t K, const float* x, int64_t nt, float* y, int64_t ldy, bool a) {
  int64_t t = 0;
  for (; t + MT <= nt; t += MT) micro<MT>(wp, K, x + t * K, y + t * ldy, ldy, a);
  switch (nt - t) {
    case 5: micro<5>(wp, K, x + t * K, y + t * ldy, ldy, a); break;
    case 4: micro<4>(wp, K, x + t * K, y + t * ldy, ldy, a); break;
    case 3: micro<3>(wp, K, x + t * K, y + t * ldy, ldy, a); break;
    case 2: micro<2>(wp, K, x + t * K, y + t * ldy, ldy, a); break;
    case 1: micro<1>(wp, K, x + t * K, y + t * ldy, ldy, a); break;
    default: break;
  }
}

// Batched decode from k-major activations (Job::xt, chunk width cw): NR dequantized rows w[NR][K]
// against one chunk of nt activation rows held as NVT vectors per k. Per k: NVT loads of x, NR
// broadcasts of a weight, NR * NVT FMAs into register accumulators; x streams from L2 once per NR
// rows, and there are no horizontal sums. Lane t of acc[r][.] is y[t, r].
template <int NR, int NVT>
static inline void tile_xt(const float* w, int64_t K, const float* xt, int64_t cw, float* y, int64_t ldy, int64_t nt,
                           bool a) {
  using F = typename S::F;
  F acc[NR][NVT];
  _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r)
    _Pragma("GCC unroll 4") for (int v = 0; v < NVT; ++v) acc[r][v] = S::zero();
  for (int64_t k = 0; k < K; ++k) {
    F xv[NVT];
    _Pragma("GCC unroll 4") for (int v = 0; v < NVT; ++v) xv[v] = S::f32(xt + k * cw + v * S::L);
    _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r) {
      const F wb = S::bcast(w + r * K + k);
      _Pragma("GCC unroll 4") for (int v = 0; v < NVT; ++v) acc[r][v] = S::fma(wb, xv[v], acc[r][v]);
    }
  }
  // (every acc index constant, so the accumulators stay in registers through the loop above)
  float out[NR][NVT * S::L];
  _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r)
    _Pragma("GCC unroll 4") for (int v = 0; v < NVT; ++v) S::store(out[r] + v * S::L, acc[r][v]);
  for (int r = 0; r < NR; ++r)
    for (int64_t t = 0; t < nt; ++t) y[t * ldy + r] = a ? y[t * ldy + r] + out[r][t] : out[r][t];
}

// Rows per tile_xt pass: as many as the 16 (AVX2) or 32 (AVX-512) vector registers allow.
template <int NVT>
static constexpr int xt_rows() { return NVT == 1 ? 12 : 6; }

template <int NVT>
static inline void tile_xt_n(int nr, const float* w, int64_t K, const float* xt, int64_t cw, float* y, int64_t ldy,
                             int64_t nt, bool a) {
  if constexpr (xt_rows<NVT>() >= 12) {
    if (nr == 12) return tile_xt<12, NVT>(w, K, xt, cw, y, ldy, nt, a);
  }
  int r = 0;  // a full pass above; the rows left at the end of a range below
  for (; r + 6 <= nr; r += 6) tile_xt<6, NVT>(w + r * K, K, xt, cw, y + r, ldy, nt, a);
  for (; r + 4 <= nr; r += 4) tile_xt<4, NVT>(w + r * K, K, xt, cw, y + r, ldy, nt, a);
  for (; r + 2 <= nr; r += 2) tile_xt<2, NVT>(w + r * K, K, xt, cw, y + r, ldy, nt, a);
  if (r < nr) tile_xt<1, NVT>(w + r * K, K, xt, cw, y + r, ldy, nt, a);
}

template <int TY>
static void rows_xt(const Job& jb, int64_t r0, int64_t r1) {
  const int64_t K = jb.K, cw = jb.cw;
  const int nvt_max = (int)(cw / S::L);  // 1 or 2 vectors per full chunk
  const int nr_max = nvt_max == 1 ? xt_rows<1>() : xt_rows<2>();
  float* w = jb.scratch;  // [nr_max][K] dequantized rows
  // Blocks of T_BLOCK activation rows (<= 64 * K floats of xt) stay in L2 while the rows stream
  // past; a weight row is dequantized once per block.
  for (int64_t tb = 0; tb < jb.T; tb += T_BLOCK) {
    const int64_t te = jb.T - tb < T_BLOCK ? jb.T : tb + T_BLOCK;
    for (int64_t r = r0; r < r1; r += nr_max) {
      const int nr = r1 - r < nr_max ? (int)(r1 - r) : nr_max;
      for (int i = 0; i < nr; ++i) {
        if (r + nr + i < r1) prefetch_bytes(jb.w + (r + nr + i) * jb.row_bytes, jb.row_bytes);  // the next pass
        dequant_row<TY>(jb, jb.w + (r + i) * jb.row_bytes, w + i * K);
      }
      for (int64_t t0 = tb; t0 < te; t0 += cw) {
        const int64_t nt = te - t0 < cw ? te - t0 : cw;
        const float* xt = jb.xt + t0 * K;  // chunk t0 / cw
        float* y = jb.y + t0 * jb.ldy + r;
        if (nt > S::L) tile_xt_n<2>(nr, w, K, xt, cw, y, jb.ldy, nt, jb.accumulate);
        else tile_xt_n<1>(nr, w, K, xt, cw, y, jb.ldy, nt, jb.accumulate);
      }
    }
  }
}

template <int TY>
static void rows_impl(const Job& jb, int64_t r0, int64_t r1) {
  if (jb.xt != nullptr && jb.T < PANEL_MIN_T) return rows_xt<TY>(jb, r0, r1);
  if (jb.T <= MV_PASS_MAX_T) {  // passes of up to 4 activation rows: each row's bits as at T == 1
    for (int64_t t0 = 0; t0 < jb.T; t0 += MV_MAX_T) {
      switch (jb.T - t0 < MV_MAX_T ? jb.T - t0 : MV_MAX_T) {
        case 1: mv_range<TY, 1>(jb, r0, r1, t0); break;
        case 2: mv_range<TY, 2>(jb, r0, r1, t0); break;
        case 3: mv_range<TY, 3>(jb, r0, r1, t0); break;
        default: mv_range<TY, 4>(jb, r0, r1, t0); break;
      }
    }
    return;
  }
  const int64_t K = jb.K;
  int64_t rp = r0;  // rows [r0, rp) go through panels
  if (jb.T >= PANEL_MIN_T) {
    float* wp = jb.scratch;          // [K][P]
    float* tmp = jb.scratch + K * P;  // one dequantized row
    for (; rp + P <= r1; rp += P) {
      for (int i = 0; i < P; ++i) {
        if (rp + i + 1 < r1) prefetch_bytes(jb.w + (rp + i + 1) * jb.row_bytes, jb.row_bytes);
        dequant_row<TY>(jb, jb.w + (rp + i) * jb.row_bytes, tmp);
        for (int64_t k = 0; k < K; ++k) wp[k * P + i] = tmp[k];
      }
      for (int64_t t0 = 0; t0 < jb.T; t0 += T_BLOCK) {
        const int64_t nt = jb.T - t0 < T_BLOCK ? jb.T - t0 : T_BLOCK;
        micro_rows(wp, K, jb.x + t0 * K, nt, jb.y + t0 * jb.ldy + rp, jb.ldy, jb.accumulate);
      }
    }
  }
  for (int64_t t0 = 0; t0 < jb.T; t0 += T_BLOCK) {
    const int64_t nt = jb.T - t0 < T_BLOCK ? jb.T - t0 : T_BLOCK;
    const float* x = jb.x + t0 * K;
    float* y = jb.y + t0 * jb.ldy;
    int64_t r = rp;
    for (; r + 2 <= r1; r += 2) {
      if (r + 4 <= r1) prefetch_bytes(jb.w + (r + 2) * jb.row_bytes, 2 * jb.row_bytes);  // the next pair
      dequant_row<TY>(jb, jb.w + r * jb.row_bytes, jb.scratch);
      dequant_row<TY>(jb, jb.w + (r + 1) * jb.row_bytes, jb.scratch + K);
      tile_rows<2>(jb.scratch, K, x, nt, y + r, jb.ldy, jb.accumulate);
    }
    if (r < r1) {
      dequant_row<TY>(jb, jb.w + r * jb.row_bytes, jb.scratch);
      tile_rows<1>(jb.scratch, K, x, nt, y + r, jb.ldy, jb.accumulate);
    }
  }
}

// scores[p] <- exp(scores[p] - mx) for p < n, L at a time (S::exp_neg); returns their sum.
static float softmax_exp_v(float* scores, int64_t n, float mx) {
  using F = typename S::F;
  const F neg = S::set1(-mx);
  F sum = S::zero();
  int64_t p = 0;
  for (; p + S::L <= n; p += S::L) {
    const F e = S::exp_neg(S::add(S::f32(scores + p), neg));
    S::store(scores + p, e);
    sum = S::add(sum, e);
  }
  float den = S::hsum(sum);
  for (; p < n; ++p) {
    scores[p] = __builtin_expf(scores[p] - mx);
    den += scores[p];
  }
  return den;
}

// y[T, I] = silu(g) * u for rows gu = [g | u] (generic::silu_mul has the contract), L at a time.
// sigmoid(g) comes from e = exp(-|g|), which never overflows: 1 / (1 + e) for g >= 0 and
// e / (1 + e) for g < 0, so a large negative g gives a tiny sigmoid, not 1 - 1 rounded.
static void silu_mul_v(const float* gu, float* y, int64_t T, int64_t I) {
  using F = typename S::F;
  const F one = S::set1(1.f);
  for (int64_t t = 0; t < T; ++t) {
    const float* g = gu + t * 2 * I;
    const float* u = g + I;
    float* yr = y + t * I;
    int64_t i = 0;
    for (; i + S::L <= I; i += S::L) {
      const F gv = S::f32(g + i);
      const F e = S::exp_neg(S::neg_abs(gv));
      const F sig = S::div(S::pick_neg(gv, one, e), S::add(one, e));
      S::store(yr + i, S::mul(S::mul(gv, sig), S::f32(u + i)));
    }
    for (; i < I; ++i) yr[i] = g[i] / (1.f + __builtin_expf(-g[i])) * u[i];
  }
}

// One row of y = gelu_tanh(x) (* up), L at a time (gelu_tanh_scalar in qk_types.h has the formula).
// The last partial vector goes through a padded copy, so an element's value never depends on
// where it sits in the row.
static inline typename S::F gelu_tanh_vec(typename S::F v) {
  using F = typename S::F;
  const F one = S::set1(1.f);
  const F z = S::mul(v, S::fma(S::mul(S::set1(GELU_K3), v), v, S::set1(GELU_K1)));  // v (K1 + K3 v^2)
  const F e = S::exp_neg(S::neg_abs(z));
  return S::mul(v, S::div(S::pick_neg(z, one, e), S::add(one, e)));
}

static void gelu_tanh_row_v(const float* x, const float* up, float* y, int64_t I) {
  int64_t i = 0;
  for (; i + S::L <= I; i += S::L) {
    const typename S::F g = gelu_tanh_vec(S::f32(x + i));
    S::store(y + i, up ? S::mul(g, S::f32(up + i)) : g);
  }
  if (i < I) {
    float xb[S::L] = {0.f}, ub[S::L] = {0.f}, yb[S::L];
    for (int64_t j = i; j < I; ++j) xb[j - i] = x[j], ub[j - i] = up ? up[j] : 1.f;
    S::store(yb, S::mul(gelu_tanh_vec(S::f32(xb)), S::f32(ub)));
    for (int64_t j = i; j < I; ++j) y[j] = yb[j - i];
  }
}

// ---------------------------------------------------------------- attention
// The cache's rows widened to fp32 vectors, by element type (KvType in qk_types.h).
// How far ahead the decode loop fetches K and V blocks (attend_group_t). f32, f16 and bf16: 32
// positions (2 blocks at the default block size), into L2. On the Zen 4 VM (SmolLM2's and Qwen2.5's
// shapes at 4096 and 16384 positions, 2 threads) that beat 4 KiB into L1 by 1.2-1.4x for f32 and
// 1.2-1.3x for f16 (bench/attention-zen4.json, the two in turn in one run; 1 thread and the AVX2
// path gained as much in trials): L1 holds too little for that distance, and a prefetch into L1
// that misses holds one of its few fill buffers. q8_0 widens each element with more instructions
// and is bound by them, not by memory; its look-ahead stays 4 KiB into L1 (in trials the far one
// was no faster for it, and slower on the AVX2 path).
static constexpr int64_t ATT_PREFETCH_POSITIONS = 32;
static constexpr int64_t ATT_PREFETCH_BYTES = 4096;  // q8_0
// Query heads per pass over a kv head's K and V (attend_part, attend_tile): up to 8 heads' accumulators fit
// the registers on both ISAs (AVX2's P V takes one output vector per head at 5-8 heads), so a GQA group
// of up to 8 (Qwen2.5's 6, Llama 3's 4) reads its K and V once per step. (AVX2 ran passes of 4: Qwen's
// 6 heads read them twice, at 0.41 of the read probe in bench/attention.json against SmolLM2's 0.8.)
static constexpr int64_t ATT_MAXG = 8;
// Accumulator chains per head and vector of positions in the scores loop (attend_group, attend_tile:
// the same, so their bits match): 8-12 FMAs in flight hide the FMA latency. AVX2 takes two vectors
// of positions per step (a 16-position block), so from 4 heads one chain each gives 8-12; 7-8 heads
// take one vector. AVX-512 takes one vector of 16 positions: two chains up to 6 heads.
static constexpr int att_chains(int64_t heads) {
  if (S::L == 8) return heads >= 4 ? 1 : heads >= 2 ? 2 : 4;
  return heads >= 7 ? 1 : heads >= 3 ? 2 : 8 / (2 * (int)heads);
}
// Reading element d.. d + S::L of a cached row of the KV type as fp32 lanes (d % S::L == 0).
template <int KT> struct Kv;
template <> struct Kv<KV_F32> {
  static inline typename S::F ld(const uint8_t* row, int64_t d) { return S::f32((const float*)row + d); }
};
template <> struct Kv<KV_F16> {
  static inline typename S::F ld(const uint8_t* row, int64_t d) { return S::h16(row + 2 * d); }
};
template <> struct Kv<KV_BF16> {
  static inline typename S::F ld(const uint8_t* row, int64_t d) { return S::bf16(row + 2 * d); }
};
template <> struct Kv<KV_Q8_0> {  // d * q of the element's block (qk_types.h kv_at: the same numbers)
  static inline typename S::F ld(const uint8_t* row, int64_t d) {
    const uint8_t* b = row + (d >> 5) * Q8_BLOCK_BYTES;
    return S::mul(S::set1(S::h2f(b)), S::cvt(S::i8(b + 2 + (d & 31))));
  }
};

// The cache is paged: a block's rows of one layer and kv head are contiguous, but the next block is
// elsewhere, so the hardware prefetcher loses the stream at every block (and 4 KiB page): the K
// and V blocks ahead (ATT_PREFETCH_POSITIONS) are fetched by hand (inline: a helper function for it
// measured 1.6x slower on a cache larger than L3).
// HG query heads (q: HG rows of hd floats) sharing one kv head, over positions [p0, p1): the
// AttendPartFn contract (qk_types.h). Each vector of K (S::L positions of one element) is loaded
// once for the HG heads. The weighted V sum keeps HG x VC vectors of the output in registers and
// reads each V row once for all HG heads.
template <int HG, int KT, int NPV>
static void attend_group_t(const float* q, float* o, float* ml, const uint8_t* const* Kb, const uint8_t* const* Vb,
                           int64_t bs, int64_t p0, int64_t p1, int64_t hd, float scale, float* scores) {
  using F = typename S::F;
  const int64_t n = p1 - p0, RB = kv_row_bytes(KT, hd);  // bytes per cached row
  float mx[HG];
  for (int i = 0; i < HG; ++i) mx[i] = -INFINITY;
  // Scores: K is transposed in its block (kv_k_at), so S::L consecutive positions' dot products
  // are NA accumulator chains per head of broadcast q element x a vector of positions, summed at
  // the end: no horizontal sum per position. NPV vectors of positions (a block's 16 on AVX2) share
  // each broadcast of q. Lanes outside [p0, p1) are computed and dropped.
  constexpr int NA = att_chains(HG);
  constexpr int64_t PW = NPV * S::L;  // positions per step
  const int64_t kblock = bs * RB;     // bytes of one kv head's K block
  const bool to_l2 = KT != KV_Q8_0 && g_att_far;  // ATT_PREFETCH_POSITIONS
  const int64_t kahead = to_l2 ? (ATT_PREFETCH_POSITIONS / bs > 1 ? ATT_PREFETCH_POSITIONS / bs : 1)
                               : (ATT_PREFETCH_BYTES / kblock > 1 ? ATT_PREFETCH_BYTES / kblock : 1);  // blocks ahead
  const int64_t lines = (kblock + 63) / 64;  // cache lines of a block's K (and of its V)
  const int64_t kstride = bs * (RB / hd);    // bytes from one element's positions to the next's
  // q transposed, element-major ([d][HG]): the HG broadcasts of an element come from one base
  // address at constant offsets (per-head row pointers ran out of registers and were reloaded
  // from the stack in the loop); the same numbers, so the same bits.
  alignas(64) float qt[HG * ATT_MAX_HD];
  for (int i = 0; i < HG; ++i)
    for (int64_t d = 0; d < hd; ++d) qt[d * HG + i] = q[i * hd + d];
  alignas(64) float lanes[S::L];
  for (int64_t p = p0; p < p1;) {
    const int64_t j = p / bs, base = j * bs, end = base + bs < p1 ? base + bs : p1;
    // the K and V blocks kahead blocks on, a cache line of each per step of the element loop
    // below (a burst of a whole block's lines at once measured 1.3x slower beyond L3)
    const bool fetch = base + kahead * bs < p1;
    const uint8_t* kf = fetch ? Kb[j + kahead] : nullptr;
    const uint8_t* vf = fetch ? Vb[j + kahead] : nullptr;
    for (int64_t c = (p - base) / PW * PW; base + c < end; c += PW) {
      const uint8_t* kc = Kb[j];
      const bool fetch_c = fetch && c == 0;
      int64_t fsum = 0, fline = 0;
      auto fetch_step = [&]() {  // one element's share of the lines of the blocks ahead (Bresenham)
        if (fetch_c)
          for (fsum += lines; fsum >= hd; fsum -= hd, ++fline) {
            if (to_l2) {
              S::prefetch_l2(kf + 64 * fline);
              S::prefetch_l2(vf + 64 * fline);
            } else {
              S::prefetch(kf + 64 * fline);
              S::prefetch(vf + 64 * fline);
            }
          }
      };
      F acc[HG][NA][NPV];
      if constexpr (KT == KV_Q8_0) {  // per 32 elements: the int8 dot, then times the positions' scales
        // the running sums wait in memory between groups of 32 (the dots' accumulators fill the
        // registers); acc = part * scale + acc, group by group, as ever
        alignas(64) float accm[HG][NA][NPV][S::L];
        for (int64_t d0 = 0; d0 < hd; d0 += 32) {
          F part[HG][NA][NPV];
          for (int i = 0; i < HG; ++i)
            for (int a = 0; a < NA; ++a)
              for (int v = 0; v < NPV; ++v) part[i][a][v] = S::zero();
          for (int64_t d = d0; d < d0 + 32; d += NA) {
#pragma GCC unroll 8
            for (int a = 0; a < NA; ++a) {
              fetch_step();
              F kk[NPV];
              for (int v = 0; v < NPV; ++v) kk[v] = S::cvt(S::i8(kc + (d + a) * bs + c + v * S::L));
              const float* qd = qt + (d + a) * HG;
              for (int i = 0; i < HG; ++i) {
                const F qq = S::set1(qd[i]);
                for (int v = 0; v < NPV; ++v) part[i][a][v] = S::fma(qq, kk[v], part[i][a][v]);
              }
            }
          }
          for (int v = 0; v < NPV; ++v) {
            const F sc = S::h16(kc + hd * bs + 2 * ((d0 / 32) * bs + c + v * S::L));
            for (int i = 0; i < HG; ++i)
              for (int a = 0; a < NA; ++a)
                S::store(accm[i][a][v], S::fma(part[i][a][v], sc, d0 == 0 ? S::zero() : S::f32(accm[i][a][v])));
          }
        }
        for (int i = 0; i < HG; ++i)
          for (int a = 0; a < NA; ++a)
            for (int v = 0; v < NPV; ++v) acc[i][a][v] = S::f32(accm[i][a][v]);
      } else {
        for (int i = 0; i < HG; ++i)
          for (int a = 0; a < NA; ++a)
            for (int v = 0; v < NPV; ++v) acc[i][a][v] = S::zero();
        for (int64_t d = 0; d < hd; d += NA) {
#pragma GCC unroll 8
          for (int a = 0; a < NA; ++a) {
            fetch_step();
            F kk[NPV];
            for (int v = 0; v < NPV; ++v) kk[v] = Kv<KT>::ld(kc + (d + a) * kstride, c + v * S::L);
            const float* qd = qt + (d + a) * HG;
            for (int i = 0; i < HG; ++i) {
              const F qq = S::set1(qd[i]);
              for (int v = 0; v < NPV; ++v) acc[i][a][v] = S::fma(qq, kk[v], acc[i][a][v]);
            }
          }
        }
      }
      for (int v = 0; v < NPV; ++v) {
        const int64_t cv = c + v * S::L;
        const int64_t lo = p0 > base + cv ? p0 - base - cv : 0;
        const int64_t hi = end - base - cv < S::L ? end - base - cv : S::L;
        if (hi <= lo) continue;
        for (int i = 0; i < HG; ++i) {
          F sum = acc[i][0][v];
          for (int a = 1; a < NA; ++a) sum = S::add(sum, acc[i][a][v]);
          S::store(lanes, S::mul(sum, S::set1(scale)));
          float* out = scores + i * n + (base + cv - p0);
          for (int64_t l = lo; l < hi; ++l) {
            out[l] = lanes[l];
            mx[i] = lanes[l] > mx[i] ? lanes[l] : mx[i];
          }
        }
      }
    }
    p = end;
  }
  for (int i = 0; i < HG; ++i) {
    ml[2 * i] = mx[i];
    ml[2 * i + 1] = softmax_exp_v(scores + i * n, n, mx[i]);
  }
  // P V, block by block: a block's V rows (bs x RB bytes, contiguous) are read for every output
  // vector while they sit in L1, the next block's lines fetched meanwhile; HG * VC accumulators
  // per pass (AVX2's 16 registers: 5-8 heads take one vector) go back to o between blocks. Each
  // (head, element) still sums over the positions in order from zero, one chain, so the bits are
  // those of a pass over all positions per output vector. (That order, d outer and positions
  // inner, read each V row once per output vector, 512 B apart, and waited on L2/L3: about 40%
  // of Qwen2.5's decode attention at 16k positions.)
  constexpr int VC = HG <= 2 ? 4 : (S::L == 8 && HG >= 7) ? 1 : 2;
  for (int64_t e = 0; e < HG * hd; e += S::L) S::store(o + e, S::zero());
  const int64_t vblock = bs * RB, vlines = (vblock + 63) / 64;
  for (int64_t p = p0; p < p1;) {
    const int64_t j = p / bs, pe = (j + 1) * bs < p1 ? (j + 1) * bs : p1;
    // the next block's V lines (the scores' loop fetched them once, going through this split's
    // K: most have left L1 since; dropping that fetch measured no faster, if anything slower)
    const uint8_t* vnext = pe < p1 ? Vb[j + 1] : nullptr;
    const uint8_t* vrow0 = Vb[j] + (p - j * bs) * RB;
    const float* sc = scores + (p - p0);
    const int64_t m = pe - p;
    int64_t fl = 0;  // the next block's lines fetched so far
    for (int64_t d0 = 0; d0 < hd; d0 += VC * S::L) {
      if (vnext != nullptr) {  // the next block's lines, spread over this block's output vectors
        const int64_t upto = vlines * (d0 + VC * S::L) / hd;
        for (; fl < upto && fl < vlines; ++fl) S::prefetch(vnext + 64 * fl);
      }
      if (hd - d0 < VC * S::L) {  // a tail narrower than VC vectors: one vector at a time
        for (int64_t d = d0; d < hd; d += S::L) {
          F acc[HG];
          for (int i = 0; i < HG; ++i) acc[i] = S::f32(o + i * hd + d);
          const uint8_t* vr = vrow0;
          for (int64_t t = 0; t < m; ++t, vr += RB) {
            const F vv = Kv<KT>::ld(vr, d);
            for (int i = 0; i < HG; ++i) acc[i] = S::fma(S::set1(sc[i * n + t]), vv, acc[i]);
          }
          for (int i = 0; i < HG; ++i) S::store(o + i * hd + d, acc[i]);
        }
        break;
      }
      F acc[HG][VC];
#pragma GCC unroll 8
      for (int i = 0; i < HG; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < VC; ++v) acc[i][v] = S::f32(o + i * hd + d0 + v * S::L);
      const uint8_t* vr = vrow0;
      for (int64_t t = 0; t < m; ++t, vr += RB) {
#pragma GCC unroll 8
        for (int i = 0; i < HG; ++i) {
          const F w = S::set1(sc[i * n + t]);
#pragma GCC unroll 4
          for (int v = 0; v < VC; ++v) acc[i][v] = S::fma(w, Kv<KT>::ld(vr, d0 + v * S::L), acc[i][v]);
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < HG; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < VC; ++v) S::store(o + i * hd + d0 + v * S::L, acc[i][v]);
    }
    p = pe;
  }
}

// HG heads over [p0, p1): two vectors of positions per step where a block holds them and the
// accumulators fit AVX2's 16 registers (HG <= 6), else one. The chains (NA) do not depend on
// this, so neither do the bits.
template <int HG, int KT>
static void attend_group(const float* q, float* o, float* ml, const uint8_t* const* Kb, const uint8_t* const* Vb,
                         int64_t bs, int64_t p0, int64_t p1, int64_t hd, float scale, float* scores) {
  if constexpr (S::L == 8 && HG <= 6) {
    if (bs % 16 == 0) return attend_group_t<HG, KT, 2>(q, o, ml, Kb, Vb, bs, p0, p1, hd, scale, scores);
  }
  attend_group_t<HG, KT, 1>(q, o, ml, Kb, Vb, bs, p0, p1, hd, scale, scores);
}

// AttendPartFn for element type KT: the heads in passes of up to ATT_MAXG (attend_group). hd must be a
// multiple of S::L (else the portable version runs: qk.cpp attend_for).
template <int KT>
static void attend_part(const float* q, float* o, float* ml, const void* const* Kb, const void* const* Vb, int64_t bs,
                        int64_t p0, int64_t p1, int64_t hn, int64_t hd, float scale, float* scores) {
  const uint8_t* const* K = (const uint8_t* const*)Kb;
  const uint8_t* const* V = (const uint8_t* const*)Vb;
  const int64_t n = p1 - p0;
  constexpr int64_t MAXG = ATT_MAXG;
  for (int64_t h0 = 0; h0 < hn; h0 += MAXG) {
    const int64_t hg = hn - h0 < MAXG ? hn - h0 : MAXG;
    const float* qh = q + h0 * hd;
    float *oh = o + h0 * hd, *mh = ml + 2 * h0, *sh = scores + h0 * n;
    switch (hg) {
      case 1: attend_group<1, KT>(qh, oh, mh, K, V, bs, p0, p1, hd, scale, sh); break;
      case 2: attend_group<2, KT>(qh, oh, mh, K, V, bs, p0, p1, hd, scale, sh); break;
      case 3: attend_group<3, KT>(qh, oh, mh, K, V, bs, p0, p1, hd, scale, sh); break;
      case 4: attend_group<4, KT>(qh, oh, mh, K, V, bs, p0, p1, hd, scale, sh); break;
      case 5: attend_group<5, KT>(qh, oh, mh, K, V, bs, p0, p1, hd, scale, sh); break;
      case 6: attend_group<6, KT>(qh, oh, mh, K, V, bs, p0, p1, hd, scale, sh); break;
      case 7: attend_group<7, KT>(qh, oh, mh, K, V, bs, p0, p1, hd, scale, sh); break;
      default: attend_group<8, KT>(qh, oh, mh, K, V, bs, p0, p1, hd, scale, sh); break;
    }
  }
}

// ---- Prefill attention: a tile of query rows against one split, each K/V block read once for all
// A prefill chunk's consecutive rows (one sequence, one block table) attend to the same cached
// positions. attend_group runs one row at a time, so each row streams the split's K and V again
// (from L3 or memory at long contexts: bound by bytes, ~10% of the FMA peak). Here the R rows x hn
// heads of a tile are "query vectors" m = r * hn + h, and the loops are those of a small GEMM:
// - scores: per vector of S::L positions of a K block (in L1 while every query vector uses it), a
//   register tile of MQ query vectors: per element d one K load, MQ broadcasts of q, MQ FMAs;
// - softmax per query vector over its own positions (softmax_exp_v, as attend_group);
// - o = P V: per VC x S::L output elements, MQ2 query vectors: per position the V vectors once,
//   MQ2 broadcasts of P, MQ2 x VC FMAs; the V column stays in L1 across the query vectors.
// Every score and every output element is computed with the same operations in the same order as
// attend_group<HG, KT> computes it for that row alone (NA chains over d, the scale, the exps, the
// FMAs over positions in order): the results are bit-identical to one attend_group call per row,
// which tests/test_kernels.py asserts. A row's positions past its own end (rows end at different
// positions of the tile's last blocks) get P = 0 and add exact zeros.
template <int KT, int NA, int NPV>
static void attend_tile_t(const float* q, int64_t q_stride, int64_t R, const int64_t* p1s, float* const* os,
                          float* const* mls, const void* const* Kbv, const void* const* Vbv, int64_t bs, int64_t p0,
                          int64_t hn, int64_t hd, float scale, float* scores) {
  using F = typename S::F;
  const uint8_t* const* Kb = (const uint8_t* const*)Kbv;
  const uint8_t* const* Vb = (const uint8_t* const*)Vbv;
  constexpr int RACC = S::L == 16 ? 24 : 12;                           // accumulator registers of a tile
  constexpr int MQ_ = RACC / (NA * NPV);  // query vectors per score tile (q8_0: its sums wait in memory)
  constexpr int MQ = MQ_ > 0 ? MQ_ : 1;
  constexpr int VC = 2, MQ2 = RACC / VC;  // output vectors x query vectors of the P V tile
  constexpr int64_t KC = ATT_TILE_KC;     // positions per pass of P V (a V panel of KC x VC vectors in L1)
  const int64_t RB = kv_row_bytes(KT, hd), NQ = R * hn;
  int64_t p_end = p0;
  for (int64_t r = 0; r < R; ++r) p_end = p1s[r] > p_end ? p1s[r] : p_end;
  const int64_t n = p_end - p0;
  // after the scores: a K block and a V panel converted to fp32 (att_tile_scratch)
  float* kpack = scores + (NQ * n + 15) / 16 * 16;
  float* vpack = kpack + hd * bs;
  const float* qv[ATT_TILE_MAX_ROWS * 8];  // query vector m (hn <= 8: attend_tile's passes)
  int64_t pend[ATT_TILE_MAX_ROWS * 8];     // and its row's end
  for (int64_t m = 0; m < NQ; ++m) qv[m] = q + (m / hn) * q_stride + (m % hn) * hd, pend[m] = p1s[m / hn];
  alignas(64) float lanes[S::L];
  // scores[m * n + (p - p0)] for every query vector and every position of the tile: NPV vectors of
  // S::L positions per step (NPV * S::L <= bs: lanes past the range are computed and dropped)
  for (int64_t p = p0; p < p_end;) {
    const int64_t j = p / bs, base = j * bs, end = base + bs < p_end ? base + bs : p_end;
    if (end < p_end) {  // the next block's K, while this one is in use
      const int64_t kb_bytes = bs * RB;
      for (int64_t o = 0; o < kb_bytes; o += 64) S::prefetch(Kb[j + 1] + o);
    }
    const uint8_t* kc = Kb[j];
    // K of the block as fp32 [hd][bs] (f16 / bf16 widened, q8_0's int8 as floats, its scales left in
    // place): converted once for every query vector, the same numbers attend_group converts
    const float* kf = (const float*)kc;
    if constexpr (KT != KV_F32) {
      for (int64_t d = 0; d < hd; ++d)
        for (int64_t cc = 0; cc < bs; cc += S::L)
          S::store(kpack + d * bs + cc,
                   KT == KV_Q8_0 ? S::cvt(S::i8(kc + d * bs + cc)) : Kv<KT>::ld(kc + d * bs * (RB / hd), cc));
      kf = kpack;
    }
    int64_t c = (p - base) / S::L * S::L;
    if (NPV > 1) c = c / (NPV * S::L) * (NPV * S::L);
    for (; base + c < end; c += NPV * S::L) {
      for (int64_t m0 = 0; m0 < NQ; m0 += MQ) {
        const float* qm[MQ];  // a short last tile repeats its last query vector (stored once)
        for (int i = 0; i < MQ; ++i) qm[i] = qv[m0 + i < NQ ? m0 + i : NQ - 1];
        F acc[MQ][NA][NPV];
        _Pragma("GCC unroll 24") for (int i = 0; i < MQ; ++i)
          _Pragma("GCC unroll 8") for (int a = 0; a < NA; ++a)
            _Pragma("GCC unroll 2") for (int v = 0; v < NPV; ++v) acc[i][a][v] = S::zero();
        if constexpr (KT == KV_Q8_0) {  // attend_group's order: int8 dot per 32 elements, then x scales
          alignas(64) float accm[MQ][NA][NPV][S::L];  // the running sums between groups of 32
          for (int64_t d0 = 0; d0 < hd; d0 += 32) {
            F part[MQ][NA][NPV];
            _Pragma("GCC unroll 24") for (int i = 0; i < MQ; ++i)
              _Pragma("GCC unroll 8") for (int a = 0; a < NA; ++a)
                _Pragma("GCC unroll 2") for (int v = 0; v < NPV; ++v) part[i][a][v] = S::zero();
            for (int64_t d = d0; d < d0 + 32; d += NA) {
              _Pragma("GCC unroll 8") for (int a = 0; a < NA; ++a) {
                F kk[NPV];
                _Pragma("GCC unroll 2") for (int v = 0; v < NPV; ++v) kk[v] = S::f32(kf + (d + a) * bs + c + v * S::L);
                _Pragma("GCC unroll 24") for (int i = 0; i < MQ; ++i) {
                  const F qq = S::set1(qm[i][d + a]);
                  _Pragma("GCC unroll 2") for (int v = 0; v < NPV; ++v) part[i][a][v] = S::fma(qq, kk[v], part[i][a][v]);
                }
              }
            }
            _Pragma("GCC unroll 2") for (int v = 0; v < NPV; ++v) {
              const F sc = S::h16(kc + hd * bs + 2 * ((d0 / 32) * bs + c + v * S::L));
              _Pragma("GCC unroll 24") for (int i = 0; i < MQ; ++i)
                _Pragma("GCC unroll 8") for (int a = 0; a < NA; ++a)
                  S::store(accm[i][a][v], S::fma(part[i][a][v], sc, d0 == 0 ? S::zero() : S::f32(accm[i][a][v])));
            }
          }
          _Pragma("GCC unroll 24") for (int i = 0; i < MQ; ++i)
            _Pragma("GCC unroll 8") for (int a = 0; a < NA; ++a)
              _Pragma("GCC unroll 2") for (int v = 0; v < NPV; ++v) acc[i][a][v] = S::f32(accm[i][a][v]);
        } else {
          for (int64_t d = 0; d < hd; d += NA) {
            _Pragma("GCC unroll 8") for (int a = 0; a < NA; ++a) {
              F kk[NPV];
              _Pragma("GCC unroll 2") for (int v = 0; v < NPV; ++v) kk[v] = S::f32(kf + (d + a) * bs + c + v * S::L);
              _Pragma("GCC unroll 24") for (int i = 0; i < MQ; ++i) {
                const F qq = S::set1(qm[i][d + a]);
                _Pragma("GCC unroll 2") for (int v = 0; v < NPV; ++v) acc[i][a][v] = S::fma(qq, kk[v], acc[i][a][v]);
              }
            }
          }
        }
        for (int v = 0; v < NPV; ++v) {
          const int64_t cv = c + v * S::L;
          const int64_t lo = p0 > base + cv ? p0 - base - cv : 0;
          const int64_t hi = end - base - cv < S::L ? end - base - cv : S::L;
          if (hi <= lo) continue;
          _Pragma("GCC unroll 24") for (int i = 0; i < MQ; ++i) {
            if (m0 + i >= NQ) break;
            F sum = acc[i][0][v];
            _Pragma("GCC unroll 8") for (int a = 1; a < NA; ++a) sum = S::add(sum, acc[i][a][v]);
            S::store(lanes, S::mul(sum, S::set1(scale)));
            float* out = scores + (m0 + i) * n + (base + cv - p0);
            for (int64_t l = lo; l < hi; ++l) out[l] = lanes[l];
          }
        }
      }
    }
    p = end;
  }
  // softmax of each query vector over its own row's positions; P = 0 past them
  for (int64_t m = 0; m < NQ; ++m) {
    const int64_t r = m / hn, h = m % hn, nr = pend[m] - p0;
    float* s = scores + m * n;
    float mx = -INFINITY;
    for (int64_t i = 0; i < nr; ++i) mx = s[i] > mx ? s[i] : mx;
    mls[r][2 * h] = mx;
    mls[r][2 * h + 1] = softmax_exp_v(s, nr, mx);
    for (int64_t i = nr; i < n; ++i) s[i] = 0.f;
  }
  // o = P V: passes of KC positions (a GEMM's k blocking), each over VC x S::L output elements (one
  // vector for a narrower tail) x MQ2 query vectors; the accumulators start at 0 in the first pass
  // and go through o between passes (the FMAs over positions stay in order: the same bits).
  for (int64_t k0 = p0; k0 < p_end; k0 += KC) {
    const int64_t k1 = k0 + KC < p_end ? k0 + KC : p_end;
    const bool first = k0 == p0;
    for (int64_t dd = 0; dd < hd;) {
      const int vc = hd - dd >= VC * S::L ? VC : 1;
      // V[k0..k1) x [dd, dd + vc S::L) as a contiguous fp32 panel: rows a KV row apart map to a
      // few L1 sets (a power-of-two stride) and would be evicted between query groups; the panel is
      // read by every group from L1 (and converted once for f16 / bf16 / q8_0: the same numbers)
      for (int64_t p = k0; p < k1;) {
        const int64_t j = p / bs, end = (j + 1) * bs < k1 ? (j + 1) * bs : k1;
        const uint8_t* vr = Vb[j] + (p - j * bs) * RB;
        for (; p < end; ++p, vr += RB)
          for (int v = 0; v < vc; ++v) S::store(vpack + (p - k0) * VC * S::L + v * S::L, Kv<KT>::ld(vr, dd + v * S::L));
      }
      for (int64_t m0 = 0; m0 < NQ; m0 += MQ2) {
        const float* pm[MQ2];
        int64_t pe = p0;  // the furthest position of this group's query vectors
        for (int i = 0; i < MQ2; ++i) {
          const int64_t m = m0 + i < NQ ? m0 + i : NQ - 1;
          pm[i] = scores + m * n - p0;
          pe = pend[m] > pe ? pend[m] : pe;
        }
        if (k0 >= pe) continue;  // none of the group's rows reach this pass (its o is final)
        const int64_t ke = k1 < pe ? k1 : pe;
        F acc[MQ2][VC];
        _Pragma("GCC unroll 12") for (int i = 0; i < MQ2; ++i) {
          const int64_t m = m0 + i < NQ ? m0 + i : NQ - 1;
          const float* o = os[m / hn] + (m % hn) * hd + dd;
          _Pragma("GCC unroll 2") for (int v = 0; v < VC; ++v)
            acc[i][v] = first || v >= vc ? S::zero() : S::f32(o + v * S::L);
        }
        const float* vp = vpack - k0 * VC * S::L;
        if (vc == VC) {
          for (int64_t p = k0; p < ke; ++p) {
            const F v0 = S::f32(vp + p * VC * S::L), v1 = S::f32(vp + p * VC * S::L + S::L);
            _Pragma("GCC unroll 12") for (int i = 0; i < MQ2; ++i) {
              const F w = S::set1(pm[i][p]);
              acc[i][0] = S::fma(w, v0, acc[i][0]);
              acc[i][1] = S::fma(w, v1, acc[i][1]);
            }
          }
        } else {
          for (int64_t p = k0; p < ke; ++p) {
            const F v0 = S::f32(vp + p * VC * S::L);
            _Pragma("GCC unroll 12") for (int i = 0; i < MQ2; ++i) acc[i][0] = S::fma(S::set1(pm[i][p]), v0, acc[i][0]);
          }
        }
        _Pragma("GCC unroll 12") for (int i = 0; i < MQ2; ++i) {
          if (m0 + i >= NQ) break;
          const int64_t m = m0 + i;
          float* o = os[m / hn] + (m % hn) * hd + dd;
          for (int v = 0; v < vc; ++v) S::store(o + v * S::L, acc[i][v]);
        }
      }
      dd += vc * S::L;
    }
  }
}

// The tile for HG heads per kv head: attend_group's chain count NA for HG (so the bits match).
template <int KT>
static void attend_tile(const float* q, int64_t q_stride, int64_t R, const int64_t* p1s, float* const* os,
                        float* const* mls, const void* const* Kb, const void* const* Vb, int64_t bs, int64_t p0,
                        int64_t hn, int64_t hd, float scale, float* scores) {
  // attend_group runs heads in passes of up to ATT_MAXG: its NA is that of the pass's size
  constexpr int64_t MAXG = ATT_MAXG;
  static_assert(MAXG <= 8, "attend_tile_t holds ATT_TILE_MAX_ROWS * 8 query vectors");
  if (hn > MAXG) {  // several passes with different NA: one tile per pass, as attend_part does
    for (int64_t h0 = 0; h0 < hn; h0 += MAXG) {
      const int64_t hg = hn - h0 < MAXG ? hn - h0 : MAXG;
      float* o2[ATT_TILE_MAX_ROWS];
      float* m2[ATT_TILE_MAX_ROWS];
      float mlb[ATT_TILE_MAX_ROWS][2 * MAXG];
      for (int64_t r = 0; r < R; ++r) o2[r] = os[r] + h0 * hd, m2[r] = mlb[r];
      // query rows of q + h0 * hd keep their stride; the tile sees hg heads per row
      attend_tile<KT>(q + h0 * hd, q_stride, R, p1s, o2, m2, Kb, Vb, bs, p0, hg, hd, scale, scores);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t i = 0; i < 2 * hg; ++i) mls[r][2 * h0 + i] = mlb[r][i];
    }
    return;
  }
  const int na = att_chains(hn);
  constexpr int NPV = S::L == 8 ? 2 : 1;  // AVX2: a block of 16 positions is two vectors, taken together
  if (NPV > 1 && bs % (NPV * S::L) == 0) {
    switch (na) {
      case 1: return attend_tile_t<KT, 1, NPV>(q, q_stride, R, p1s, os, mls, Kb, Vb, bs, p0, hn, hd, scale, scores);
      case 2: return attend_tile_t<KT, 2, NPV>(q, q_stride, R, p1s, os, mls, Kb, Vb, bs, p0, hn, hd, scale, scores);
      default: return attend_tile_t<KT, 4, NPV>(q, q_stride, R, p1s, os, mls, Kb, Vb, bs, p0, hn, hd, scale, scores);
    }
  }
  switch (na) {
    case 1: return attend_tile_t<KT, 1, 1>(q, q_stride, R, p1s, os, mls, Kb, Vb, bs, p0, hn, hd, scale, scores);
    case 2: return attend_tile_t<KT, 2, 1>(q, q_stride, R, p1s, os, mls, Kb, Vb, bs, p0, hn, hd, scale, scores);
    default: return attend_tile_t<KT, 4, 1>(q, q_stride, R, p1s, os, mls, Kb, Vb, bs, p0, hn, hd, scale, scores);
  }
}

static AttendTileFn attend_tile_for_type(int kv_type) {
  switch (kv_type) {
    case KV_F16: return attend_tile<KV_F16>;
    case KV_BF16: return attend_tile<KV_BF16>;
    case KV_Q8_0: return attend_tile<KV_Q8_0>;
    default: return attend_tile<KV_F32>;
  }
}

static AttendPartFn attend_for_type(int kv_type) {
  switch (kv_type) {
    case KV_F16: return attend_part<KV_F16>;
    case KV_BF16: return attend_part<KV_BF16>;
    case KV_Q8_0: return attend_part<KV_Q8_0>;
    default: return attend_part<KV_F32>;
  }
}

// Roofline probes (scripts/bench_engine.py): what one thread of this ISA reaches reading memory
// and issuing FMAs; qk.cpp's `probe` runs them on every thread of the pool at once.
static float probe_read(const float* p, int64_t n) {  // the sum of n floats (n % (4 L) == 0)
  using F = typename S::F;
  F a0 = S::zero(), a1 = S::zero(), a2 = S::zero(), a3 = S::zero();
  for (int64_t i = 0; i < n; i += 4 * S::L) {
    a0 = S::add(a0, S::f32(p + i));
    a1 = S::add(a1, S::f32(p + i + S::L));
    a2 = S::add(a2, S::f32(p + i + 2 * S::L));
    a3 = S::add(a3, S::f32(p + i + 3 * S::L));
  }
  return S::hsum(S::add(S::add(a0, a1), S::add(a2, a3)));
}

static float probe_fma(int64_t iters) {  // iters x 12 independent FMA chains of S::L lanes
  using F = typename S::F;
  F acc[12];
  const F m = S::set1(0.999999f), c = S::set1(1e-7f);
  for (int i = 0; i < 12; ++i) acc[i] = S::set1((float)i);
  for (int64_t it = 0; it < iters; ++it)
    _Pragma("GCC unroll 12") for (int i = 0; i < 12; ++i) acc[i] = S::fma(acc[i], m, c);
  F s = acc[0];
  for (int i = 1; i < 12; ++i) s = S::add(s, acc[i]);
  return S::hsum(s);
}

static RowsFn rows_fn(int type) {
  switch (type) {
    case F32: return rows_impl<F32>;
    case F16: return rows_impl<F16>;
    case BF16: return rows_impl<BF16>;
    case Q4_0: return rows_impl<Q4_0>;
    case Q4_1: return rows_impl<Q4_1>;
    case Q5_0: return rows_impl<Q5_0>;
    case Q5_1: return rows_impl<Q5_1>;
    case Q8_0: return rows_impl<Q8_0>;
    case Q4_K: return rows_impl<Q4_K>;
    case Q5_K: return rows_impl<Q5_K>;
    case Q6_K: return rows_impl<Q6_K>;
    default: return nullptr;
  }
}
