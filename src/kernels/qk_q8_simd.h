// The int8 kernels (qk_q8.h has the arithmetic), written once over a small integer-vector wrapper
// `V` (V::L int32 lanes) that each ISA file defines before including this header inside its own
// namespace: qk_q8_avx512.cpp (16 lanes, AVX512-VNNI), qk_q8_avx2.cpp (8 lanes, with AVX-VNNI or
// with maddubs + madd). Everything here is `static`, as in qk_simd.h.
//
// Loop shape (a GEMM micro-kernel on int8, as llama.cpp's repacked Q4_K gemm): one lane per weight
// row. A panel of L rows is decoded a few super-blocks at a time into a scratch where each 4-byte
// lane holds 4 consecutive quants of one row (k-step s of a super-block: quants 4s..4s+3 of every
// row), with the rows' group scales and mins as fp32 lanes beside them. Then, for NT activation
// rows at once, each k-step is one load of the panel and NT dot products (dpbusd) against a
// broadcast of 4 activation bytes: NT accumulators of L outputs each, no horizontal sums, and each
// decoded panel is reused by every activation row of the call. At the end of each group (32 or 16
// quants) its integer dot is scaled into an fp32 accumulator (qk_q8.h's two steps).

static constexpr int L = V::L;
using I = typename V::I;
using F = typename V::F;

// One super-block of a panel of L rows, decoded: q[s * L + r] = quants 4s..4s+3 of row r (bytes,
// unsigned: Q4_K, Q4_1 0..15, Q6_K 0..63), and per group j (8 of 32 in Q4_K and Q4_1, 16 of 16 in
// Q6_K) and row r: a[j * L + r] = the group's scale (Q4_K d sc_j, Q4_1 d, Q6_K d sc_j) and
// c[j * L + r] = what multiplies (minus) the activations' sum (Q4_K dmin m_j, Q4_1 -m, Q6_K 32 d sc_j:
// its quants' offset).
struct alignas(64) PanelSB {
  int32_t q[64 * L];
  float a[16 * L];
  float c[16 * L];
};

// Bytes of one unit of 256 weights (a super-block; 8 blocks of 32 for Q4_1, the last unit of a row
// possibly shorter: `ng` groups).
template <int TY>
static constexpr int sb_bytes() { return TY == Q4_K ? 144 : TY == Q6_K ? 210 : 8 * 20; }

// The group scales of one super-block of the panel's rows (PanelSB's a and c; Q4_K, Q6_K).
template <int TY>
static inline void sb_scales(const uint8_t* const* rp, int64_t off, float* pa, float* pc) {
  const int m4 = 0x0f0f0f0f;
  I w[4];
  if constexpr (TY == Q4_K) {
    V::chunk4(rp, off, w);  // d | dmin, then the 12 bytes of 6-bit scales and mins
    const F d = V::half_lo(w[0]), dmin = V::half_lo(V::srl(w[0], 16));
    // the 8 scales and mins (k4_scale_min's packing), four per 32-bit word
    const I u0 = w[1], u1 = w[2], u2 = w[3];
    const I s0 = V::and_(u0, 0x3f3f3f3f), n0 = V::and_(u1, 0x3f3f3f3f);
    const I s1 = V::or_(V::and_(u2, m4), V::sll(V::and_(V::srl(u0, 6), 0x03030303), 4));
    const I n1 = V::or_(V::and_(V::srl(u2, 4), m4), V::sll(V::and_(V::srl(u1, 6), 0x03030303), 4));
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) {
      V::storef(pa + j * L, V::mul(d, V::cvt(V::and_(V::srl(s0, 8 * j), 0xff))));
      V::storef(pa + (j + 4) * L, V::mul(d, V::cvt(V::and_(V::srl(s1, 8 * j), 0xff))));
      V::storef(pc + j * L, V::mul(dmin, V::cvt(V::and_(V::srl(n0, 8 * j), 0xff))));
      V::storef(pc + (j + 4) * L, V::mul(dmin, V::cvt(V::and_(V::srl(n1, 8 * j), 0xff))));
    }
  } else {
    static_assert(TY == Q6_K, "Q4_K or Q6_K");
    (void)m4;
    V::chunk4(rp, off + 194, w);  // word 3: bytes 206..209, d in its high half
    const F d = V::half_lo(V::srl(w[3], 16)), c32 = V::set1f(32.f);
    V::chunk4(rp, off + 192, w);  // the 16 int8 scales
    _Pragma("GCC unroll 4") for (int c = 0; c < 4; ++c)
      _Pragma("GCC unroll 4") for (int b = 0; b < 4; ++b) {
        const F a = V::mul(d, V::cvt(V::sra(V::sll(w[c], 24 - 8 * b), 24)));
        V::storef(pa + (4 * c + b) * L, a);
        V::storef(pc + (4 * c + b) * L, V::mul(a, c32));
      }
  }
}

// Decode one super-block of the panel's rows (row l's block at rp[l] + off) into p. Each 16-byte
// chunk of the L blocks is loaded and transposed in registers (V::chunk4): out[u] lane l = 4-byte
// word u of row l's chunk, a lane's 4 quant bytes being contiguous in its row.
template <int TY>
static inline void decode_sb(const uint8_t* const* rp, int64_t off, PanelSB& p, int ng) {
  const int m4 = 0x0f0f0f0f;
  I w[4];
  if constexpr (TY == Q4_1) {  // ng blocks of d (fp16), m (fp16), 16 bytes: quants l (low) and l + 16 (high)
    for (int j = 0; j < ng; ++j) {
      const int64_t o = off + 20 * j;
      V::chunk4(rp, o, w);  // word 0: d | m
      V::storef(p.a + j * L, V::half_lo(w[0]));
      V::storef(p.c + j * L, V::neg(V::half_lo(V::srl(w[0], 16))));  // w = d q + m: the sum's factor is -(-m)
      V::chunk4(rp, o + 4, w);
      _Pragma("GCC unroll 4") for (int s = 0; s < 4; ++s) {
        V::store(p.q + (8 * j + s) * L, V::and_(w[s], m4));
        V::store(p.q + (8 * j + 4 + s) * L, V::and_(V::srl(w[s], 4), m4));
      }
    }
  } else if constexpr (TY == Q4_K) {
    sb_scales<TY>(rp, off, p.a, p.c);
    // groups 2i (low nibbles) and 2i + 1 (high nibbles) share the 32 bytes at 16 + 32i: word
    // 8i + s of the 128 bytes is k-step s of both groups
    _Pragma("GCC unroll 2") for (int o = 0; o < 32; o += L) {
      I q[L];
      V::words(rp, off + 16 + 4 * o, q);
      _Pragma("GCC unroll 16") for (int u = 0; u < L; ++u) {
        const int i = (o + u) / 8, s = (o + u) % 8;
        V::store(p.q + (16 * i + s) * L, V::and_(q[u], m4));
        V::store(p.q + (16 * i + 8 + s) * L, V::and_(V::srl(q[u], 4), m4));
      }
    }
  } else {  // Q6_K: ql[128] qh[64] scales[16] (int8) d (fp16 at 208)
    sb_scales<TY>(rp, off, p.a, p.c);
    // group j = 4n + k (n = half of the block, k = 0..3), k-step s: low (k < 2) or high nibbles of
    // ql word 16n + 8 (k & 1) + s, bits 2k, 2k + 1 of qh word 8n + s on top
    I qh[16], ql[L];
    _Pragma("GCC unroll 2") for (int o = 0; o < 16; o += L) V::words(rp, off + 128 + 4 * o, qh + o);
    _Pragma("GCC unroll 4") for (int o = 0; o < 32; o += L) {
      V::words(rp, off + 4 * o, ql);
      _Pragma("GCC unroll 16") for (int u = 0; u < L; ++u) {
        const int n = (o + u) / 16, h = (o + u) / 8 % 2, s = (o + u) % 8;
        const int j0 = 4 * n + h, j1 = j0 + 2;  // k = h (low nibbles), k = h + 2 (high)
        const I hb = qh[8 * n + s];
        V::store(p.q + (8 * j0 + s) * L, V::or_(V::and_(ql[u], m4), V::sll(V::and_(V::srl(hb, 2 * h), 0x03030303), 4)));
        V::store(p.q + (8 * j1 + s) * L,
                 V::or_(V::and_(V::srl(ql[u], 4), m4), V::sll(V::and_(V::srl(hb, 2 * h + 4), 0x03030303), 4)));
      }
    }
  }
}

static inline int32_t rd4(const void* p) {
  int32_t v;
  memcpy(&v, p, 4);
  return v;
}

// NT activation rows [t0, t0 + NT) against nsb decoded super-blocks (sb0, sb0 + 1, ...) of one
// panel: tot[t * L + r] accumulates y[t0 + t, r] over the groups in order (qk_q8.h's steps).
template <int TY, int NT>
static inline void tile(const PanelSB* P, int64_t nsb, int64_t sb0, const XQ& x, int64_t t0, float* tot) {
  const int64_t K = x.K, G = K / 32;  // (a Q4_1 row's last unit may hold fewer than 8 groups)
  F acc[NT];
  I A[NT];
  _Pragma("GCC unroll 16") for (int t = 0; t < NT; ++t) acc[t] = V::loadf(tot + t * L);
  for (int64_t b = 0; b < nsb; ++b) {
    const PanelSB& p = P[b];
    const int64_t sb = sb0 + b;
    const int8_t* xq = x.q + t0 * K + sb * 64 * NT * 4;  // this tile's k-step sb * 64 (xq_word)
    const float* d32 = x.d32 + t0 * G + sb * 8;
    if constexpr (TY == Q4_K || TY == Q4_1) {
      const float* ms = x.ms32 + t0 * G + sb * 8;
      const int ng = G - sb * 8 < 8 ? (int)(G - sb * 8) : 8;
      for (int j = 0; j < ng; ++j) {
        const int8_t* xj = xq + (int64_t)j * 8 * NT * 4;  // k-steps 8j .. 8j + 7: constant offsets below
        _Pragma("GCC unroll 16") for (int t = 0; t < NT; ++t) A[t] = V::zero();
        _Pragma("GCC unroll 8") for (int s = 0; s < 8; ++s) {
          const I w = V::load(p.q + (8 * j + s) * L);
          _Pragma("GCC unroll 16") for (int t = 0; t < NT; ++t) A[t] = V::dpbusd(A[t], w, rd4(xj + 4 * (s * NT + t)));
        }
        const F a = V::loadf(p.a + j * L), c = V::loadf(p.c + j * L);
        _Pragma("GCC unroll 16") for (int t = 0; t < NT; ++t) {
          acc[t] = V::fma(V::mul(V::cvt(A[t]), a), V::set1f(d32[t * G + j]), acc[t]);
          acc[t] = V::fnmadd(c, V::set1f(ms[t * G + j]), acc[t]);
        }
      }
    } else {  // Q6_K: 16 groups of 16, two per activation block of 32
      const float* ms = x.ms16 + t0 * 2 * G + sb * 16;
      for (int g = 0; g < 16; ++g) {
        const int8_t* xg = xq + (int64_t)g * 4 * NT * 4;  // k-steps 4g .. 4g + 3
        _Pragma("GCC unroll 16") for (int t = 0; t < NT; ++t) A[t] = V::zero();
        _Pragma("GCC unroll 4") for (int s = 0; s < 4; ++s) {
          const I w = V::load(p.q + (4 * g + s) * L);
          _Pragma("GCC unroll 16") for (int t = 0; t < NT; ++t) A[t] = V::dpbusd(A[t], w, rd4(xg + 4 * (s * NT + t)));
        }
        const F a = V::loadf(p.a + g * L), c = V::loadf(p.c + g * L);
        _Pragma("GCC unroll 16") for (int t = 0; t < NT; ++t) {
          acc[t] = V::fma(V::mul(V::cvt(A[t]), a), V::set1f(d32[t * G + g / 2]), acc[t]);
          acc[t] = V::fnmadd(c, V::set1f(ms[t * 2 * G + g]), acc[t]);
        }
      }
    }
  }
  _Pragma("GCC unroll 16") for (int t = 0; t < NT; ++t) V::storef(tot + t * L, acc[t]);
}

template <int TY, int NT>
static void tile_n(int64_t nt, const PanelSB* P, int64_t nsb, int64_t sb0, const XQ& x, int64_t t0, float* tot) {
  if constexpr (NT > 1) {
    if (nt < NT) return tile_n<TY, NT - 1>(nt, P, nsb, sb0, x, t0, tot);
  }
  tile<TY, NT>(P, nsb, sb0, x, t0, tot);
}

// Super-blocks decoded per panel chunk: 4 x 6 KiB (AVX-512) stays in L1 beside the activations.
static constexpr int64_t KC = 4;
static constexpr int64_t PF_AHEAD = 2;  // units (super-blocks) of the panel's rows prefetched ahead

// Rows [r0, r1) of a job, every activation row, L rows (one panel) at a time.
template <int TY>
static void rows(const Job& jb, int64_t r0, int64_t r1) {
  const int64_t T = jb.x.T, G = jb.x.K / 32, NB = (G + 7) / 8;
  thread_local std::vector<PanelSB> panel(KC);
  thread_local std::vector<float> tot_buf;
  if ((int64_t)tot_buf.size() < T * L) tot_buf.resize(T * L);
  float* tot = tot_buf.data();
  for (int64_t r = r0; r < r1; r += L) {
    const int nv = r1 - r < L ? (int)(r1 - r) : L;
    const uint8_t* rp[L];  // rows past the end read the last one again
    for (int l = 0; l < L; ++l) rp[l] = jb.w + (r + (l < nv ? l : nv - 1)) * jb.row_bytes;
    memset(tot, 0, sizeof(float) * T * L);
    for (int64_t b0 = 0; b0 < NB; b0 += KC) {
      const int64_t nsb = NB - b0 < KC ? NB - b0 : KC;
      for (int64_t b = 0; b < nsb; ++b) {
        // The panel's rows are L streams a row apart, too many for the hardware prefetcher at a
        // few activation rows: fetch the unit PF_AHEAD units on (past a row's end: the next panel's).
        int64_t u = b0 + b + PF_AHEAD, pr = 0;
        if (u >= NB) u -= NB, pr = L;
        if (u < NB)
          for (int l = 0; l < L; ++l)
            for (int64_t o = 0; o < sb_bytes<TY>(); o += 64) V::prefetch(rp[l] + pr * jb.row_bytes + u * sb_bytes<TY>() + o);
        const int ng = G - (b0 + b) * 8 < 8 ? (int)(G - (b0 + b) * 8) : 8;
        decode_sb<TY>(rp, (b0 + b) * sb_bytes<TY>(), panel[b], ng);
      }
      for (int64_t t = 0; t < T; t += V::NT) {
        const int64_t nt = T - t < V::NT ? T - t : V::NT;
        tile_n<TY, V::NT>(nt, panel.data(), nsb, b0, jb.x, t, tot + t * L);
      }
    }
    for (int64_t t = 0; t < T; ++t) {
      float* yt = jb.y + t * jb.ldy + r;
      const float* s = tot + t * L;
      if (nv == L) {
        V::storef(yt, jb.accumulate ? V::addf(V::loadf(yt), V::loadf(s)) : V::loadf(s));
      } else {
        for (int l = 0; l < nv; ++l) yt[l] = jb.accumulate ? yt[l] + s[l] : s[l];
      }
    }
  }
}

// x rows [t0, t1) -> q (tiles of nt rows), d32, ms32, ms16 (qk_q8.h: quant_block, bit for bit).
static void quant_rows(const float* x, int64_t T, int64_t K, int64_t nt, int64_t t0, int64_t t1, int8_t* q,
                       float* d32, float* ms32, float* ms16) {
  const int64_t G = K / 32;
  for (int64_t t = t0; t < t1; ++t) {
    int32_t* qw = (int32_t*)q + xq_word(t, 0, T, K, nt);
    const int64_t step = xq_word(t, 1, T, K, nt) - xq_word(t, 0, T, K, nt);  // words between k-steps
    for (int64_t g = 0; g < G; ++g) {
      const float* xb = x + t * K + g * 32;
      const float amax = V::amax32(xb);
      const float inv = amax > 0.f ? 127.f / amax : 0.f, d = amax / 127.f;
      alignas(32) int32_t qb[8];
      int s[2];
      V::quant32(xb, inv, (int8_t*)qb, s);
      for (int i = 0; i < 8; ++i) qw[(8 * g + i) * step] = qb[i];
      d32[t * G + g] = d;
      ms32[t * G + g] = d * (float)(s[0] + s[1]);
      ms16[t * 2 * G + 2 * g] = d * (float)s[0];
      ms16[t * 2 * G + 2 * g + 1] = d * (float)s[1];
    }
  }
}

static RowsFn rows_fn(int type) {
  switch (type) {
    case Q4_K: return rows<Q4_K>;
    case Q6_K: return rows<Q6_K>;
    case Q4_1: return rows<Q4_1>;
    default: return nullptr;
  }
}
