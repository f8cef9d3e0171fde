// GGUF block formats shared by every ISA build of the kernels (qk_*.cpp), plus portable scalar
// helpers. Layouts follow ggml's block structs; the type ids are ggml's (they appear in GGUF files).
#pragma once
#include <stdint.h>
#include <string.h>

namespace qk {

enum Type : int {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
  Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30,
};

// Elements and bytes of one block (one element for the dense float types).
struct BlockInfo { int elems; int bytes; };
static inline BlockInfo block_info(int t) {
  switch (t) {
    case F32: return {1, 4};
    case F16: return {1, 2};
    case BF16: return {1, 2};
    case Q4_0: return {32, 18};   // d(f16) qs[16]
    case Q4_1: return {32, 20};   // d(f16) m(f16) qs[16]
    case Q5_0: return {32, 22};   // d(f16) qh[4] qs[16]
    case Q5_1: return {32, 24};   // d(f16) m(f16) qh[4] qs[16]
    case Q8_0: return {32, 34};   // d(f16) qs[32] (int8)
    case Q4_K: return {256, 144}; // d dmin scales[12] qs[128]
    case Q5_K: return {256, 176}; // d dmin scales[12] qh[32] qs[128]
    case Q6_K: return {256, 210}; // ql[128] qh[64] scales[16](int8) d
    default: return {0, 0};
  }
}

static inline float f16_to_f32(uint16_t h) {  // IEEE half -> float, portable and exact
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static inline uint16_t rd16(const uint8_t* p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t rd32(const uint8_t* p) { uint32_t v; memcpy(&v, p, 4); return v; }

// 6-bit scale and min of sub-block j (0..7) of a Q4_K / Q5_K super-block (ggml's packing).
static inline void k4_scale_min(int j, const uint8_t* q, int* sc, int* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Every kernel works in groups of 32 weights along K. Inside group g of a row the weights are
//   w[e] = a(e) * q[e] + c,  a(e) = a0 for e < 16 and a1 for e >= 16,
// with small integers q (a0 == a1 except in Q6_K, whose scales cover 16 weights). This decodes a
// group to those integers and constants with plain C; the SIMD builds do the same in registers.
static inline void decode_group_scalar(int t, const uint8_t* row, int64_t g, int32_t q[32], float* a0,
                                       float* a1, float* c) {
  *c = 0.f;
  switch (t) {
    case Q4_0: case Q4_1: {
      const uint8_t* b = row + g * (t == Q4_0 ? 18 : 20);
      const uint8_t* qs = b + (t == Q4_0 ? 2 : 4);
      *a0 = *a1 = f16_to_f32(rd16(b));
      if (t == Q4_1) *c = f16_to_f32(rd16(b + 2));
      int off = t == Q4_0 ? 8 : 0;
      for (int j = 0; j < 16; ++j) { q[j] = (qs[j] & 15) - off; q[j + 16] = (qs[j] >> 4) - off; }
      return;
    }
    case Q5_0: case Q5_1: {
      const uint8_t* b = row + g * (t == Q5_0 ? 22 : 24);
      const uint8_t* hb = b + (t == Q5_0 ? 2 : 4);
      uint32_t qh = rd32(hb);
      const uint8_t* qs = hb + 4;
      *a0 = *a1 = f16_to_f32(rd16(b));
      if (t == Q5_1) *c = f16_to_f32(rd16(b + 2));
      int off = t == Q5_0 ? 16 : 0;
      for (int j = 0; j < 16; ++j) {
        q[j] = ((qs[j] & 15) | (((qh >> j) & 1) << 4)) - off;
        q[j + 16] = ((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - off;
      }
      return;
    }
    case Q8_0: {
      const uint8_t* b = row + g * 34;
      *a0 = *a1 = f16_to_f32(rd16(b));
      for (int j = 0; j < 32; ++j) q[j] = (int8_t)b[2 + j];
      return;
    }
    case Q4_K: case Q5_K: {
      const int bytes = t == Q4_K ? 144 : 176;
      const uint8_t* sb = row + (g / 8) * bytes;
      int j = (int)(g % 8), sc, m;
      float d = f16_to_f32(rd16(sb)), dmin = f16_to_f32(rd16(sb + 2));
      k4_scale_min(j, sb + 4, &sc, &m);
      *a0 = *a1 = d * (float)sc;
      *c = -(dmin * (float)m);
      const uint8_t* qs = sb + (t == Q4_K ? 16 : 48) + 32 * (j / 2);
      int shift = (j & 1) * 4;
      for (int l = 0; l < 32; ++l) {
        q[l] = (qs[l] >> shift) & 15;
        if (t == Q5_K) q[l] |= ((sb[16 + l] >> j) & 1) << 4;
      }
      return;
    }
    case Q6_K: {
      const uint8_t* sb = row + (g / 8) * 210;
      int j = (int)(g % 8), n = j / 4, k = j % 4;
      const uint8_t* ql = sb + 64 * n + 32 * (k & 1);
      const uint8_t* qh = sb + 128 + 32 * n;
      const int8_t* sc = (const int8_t*)(sb + 192) + 8 * n + 2 * k;
      float d = f16_to_f32(rd16(sb + 208));
      *a0 = d * (float)sc[0];
      *a1 = d * (float)sc[1];
      int lo = (k >= 2) * 4, hs = 2 * k;
      for (int l = 0; l < 32; ++l) q[l] = (((ql[l] >> lo) & 15) | (((qh[l] >> hs) & 3) << 4)) - 32;
      return;
    }
    default:  // not a block type: callers check block_info() first
      *a0 = *a1 = 0.f;
      for (int j = 0; j < 32; ++j) q[j] = 0;
      return;
  }
}

static constexpr bool is_float_type_c(int t) { return t == F32 || t == F16 || t == BF16; }

// One weight of a dense float row (used for K tails and by the portable build).
static inline float float_weight(int t, const uint8_t* row, int64_t k) {
  if (t == F32) { float f; memcpy(&f, row + 4 * k, 4); return f; }
  if (t == F16) return f16_to_f32(rd16(row + 2 * k));
  return bf16_to_f32(rd16(row + 2 * k));
}

// The work of one kernel call over one contiguous run of weight rows:
//   y[t * ldy + r] = sum_k W[r, k] * x[t * K + k]   for r in [r0, r1), t in [0, T)
struct Job {
  int type;
  const uint8_t* w;   // row 0 of the segment
  int64_t row_bytes;
  int64_t K;
  const float* x;     // [T, K] contiguous
  const float* xsum;  // [T, K/32] sums of x per group (quant types with a min), else null
  int64_t T;
  float* y;           // column 0 of the segment in a [T, ldy] output
  int64_t ldy;
  float* scratch;     // per-thread buffer (see qk.cpp for its size)
  bool accumulate;    // y += x @ W^T instead of y = (a residual add fused into the matmul)
  const float* xt = nullptr;  // x transposed in chunks of `cw` rows (make_xt), for the batched-decode shape
  int64_t cw = 0;
  const float* xp = nullptr;    // [T, K] x permuted within groups of 32 (perm_x, Q6kShift), for the SIMD Q6_K mv
  const float* xs16 = nullptr;  // [T, K/16] -32 times the sums of x per 16, with xp
  const float* xp4 = nullptr;   // [T, K] x permuted for the SIMD Q4_K mv (perm_x, Q4kShift)
};

// x permuted for the Q6_K and Q4_K rows against lane bytes (qk_simd.h mv_rows_q6k_perm,
// mv_rows_q4k_perm, at 8 or 16 lanes): 8-float chunk (g, k) holds x[32 g + 4 i + k] *
// 2^-shift(g, k) for i < 8, where shift is the bit at which the kernel leaves lane byte or nibble k
// of group g in place (0 where it shifts it down). Q6_K: bytes 1 and 2 (8, 16); Q4_K: nibble k of
// group g at 8 k + 4 (g % 2), but 28 shifted. Powers of two, so x times the factor is exact.
// H = 1 (AVX2, 8 lanes): chunk (g, k) at 32 g + 8 k, a group's 4 vectors in order.
// H = 2 (AVX-512, 16 lanes: one vector is H chunks): Q6_K (PAIRS false) loads 2 groups' bytes at a
// time, so vector k of groups 2c, 2c + 1 is chunks (2c, k), (2c + 1, k), at 64 c + 16 k; Q4_K (PAIRS
// true) loads 2 pairs (groups 4c..4c + 3), and vector k of nibble n is chunks (4c + n, k),
// (4c + 2 + n, k), at 128 c + 16 (4 n + k).
template <bool PAIRS, class Shift>
static inline void perm_x(const float* x, int64_t T, int64_t K, float* xp, Shift shift, int H = 1) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < K / 32; ++g)
      for (int k = 0; k < 4; ++k) {
        int64_t at;  // where chunk (g, k) goes
        if (PAIRS) {
          const int64_t p = g / 2, n = g % 2;  // pair p, nibble n
          at = 64 * H * (p / H) + 8 * H * (4 * n + k) + 8 * (p % H);
        } else {
          at = 32 * H * (g / H) + 8 * H * k + 8 * (g % H);
        }
        const float f = 1.f / (float)(1u << shift(g, k));
        for (int i = 0; i < 8; ++i) xp[t * K + at + i] = x[t * K + 32 * g + 4 * i + k] * f;
      }
}
struct Q6kShift {  // (types, not functions, so that perm_x inlines them)
  int operator()(int64_t, int k) const { return k == 1 ? 8 : k == 2 ? 16 : 0; }
};
struct Q4kShift {
  int operator()(int64_t g, int k) const { return k == 3 && g % 2 ? 0 : 8 * k + 4 * (int)(g % 2); }
};

// -32 times the sums of x per 16, in order (Q6_K's offset of 32, mv_rows_q6k_perm)
static inline void sums16_x(const float* x, int64_t T, int64_t K, float* xs16) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < K / 16; ++h) {
      float s = 0.f;
      for (int e = 0; e < 16; ++e) s += x[t * K + 16 * h + e];
      xs16[t * (K / 16) + h] = -32.f * s;
    }
}

// From this many activation rows on, matmuls run on k-major weight panels (qk_simd.h); from
// XT_MIN_T to here, on k-major activations (measured on SmolLM2's matmuls, 2 AVX2 threads: at
// T = 16 the k-major x path takes 52 ms where 2 x 4 dot tiles took 62-66 and panels ~70; at T = 256
// panels win by ~10%; below T = 8 the dot tiles win).
static constexpr int64_t PANEL_MIN_T = 192;
// Batched decode (XT_MIN_T <= T < PANEL_MIN_T) reads x k-major: chunk c holds the
// activation rows [c * cw, c * cw + cw) as xt[c][k][cw] (rows past T are zero), so the kernel loads
// one vector of cw activations per k and broadcasts each dequantized weight into it. Made once per
// call (Plan_run) and shared by every thread; cw is 8 or 16 (the SIMD width, or two AVX2 vectors).
static constexpr int64_t XT_MIN_T = 9;
// Up to this many activation rows, each weight group is decoded in registers once and dotted with
// every row (the T == 1 loop, several rows at a time): no dequantized scratch row, and every row's
// result is the one it gets alone. Measured on SmolLM2's matmuls (1 thread, Zen 4), against the
// 2 x 4 dot tiles on dequantized rows used before: T = 2 12.2 ms against 24.5 (T = 1: 8.9), T = 4
// 21.1 against 26.4.
static constexpr int64_t MV_MAX_T = 4;
// 5..8 rows run as passes of up to MV_MAX_T rows of that loop (the weights are read twice), so
// that every row's result is still the one it gets alone: a speculative step verifies a stream's
// next token and up to 7 drafts in one call, and each of those rows must give the bits one-token
// decoding gives (greedy output identical with and without speculation). They used to take the
// 2 x 4 dot tiles, which took over twice the time of 4 rows on a whole decode step of SmolLM2 or
// Qwen2.5-Coder-1.5B (Zen 4, 2 threads); two passes take less.
static constexpr int64_t MV_PASS_MAX_T = 8;
static inline int64_t xt_width(int64_t T, int lanes) { return lanes >= 16 || T > 8 ? 16 : 8; }
static inline int64_t xt_floats(int64_t T, int64_t K, int64_t cw) { return (T + cw - 1) / cw * cw * K; }
static inline void make_xt(const float* x, int64_t T, int64_t K, int64_t cw, float* xt) {
  for (int64_t c = 0; c * cw < T; ++c) {
    float* out = xt + c * K * cw;
    const int64_t n = T - c * cw < cw ? T - c * cw : cw;
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t t = 0; t < n; ++t) out[k * cw + t] = x[(c * cw + t) * K + k];
      for (int64_t t = n; t < cw; ++t) out[k * cw + t] = 0.f;
    }
  }
}

typedef void (*RowsFn)(const Job& job, int64_t r0, int64_t r1);
// The KV cache's element types (kv_dtype): fp32, IEEE half, bfloat16, and ggml's Q8_0 blocks. Rows
// are written from fp32 (rounded to nearest even; Q8_0: quantize_q8_0_row) and read back as fp32
// numbers; all arithmetic is fp32.
enum KvType { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2, KV_Q8_0 = 3 };
// A Q8_0 row of hd elements (hd % 32 == 0) is hd / 32 blocks of ggml's block_q8_0: an IEEE half
// scale d, then 32 int8 q; element e is d * q[e] (exact in fp32: 11 x 8 significant bits).
static constexpr int64_t Q8_BLOCK_BYTES = 34;
// Bytes of one cached row of hd elements of the KV type (0 for an unknown type, or Q8_0 with hd
// not a multiple of 32).
static inline int64_t kv_row_bytes(int kv_type, int64_t hd) {
  switch (kv_type) {
    case KV_F32: return 4 * hd;
    case KV_F16: case KV_BF16: return 2 * hd;
    case KV_Q8_0: return hd % 32 == 0 ? hd / 32 * Q8_BLOCK_BYTES : 0;
    default: return 0;
  }
}

// The SIMD attention kernels keep a row's query heads transposed on the stack (qk_simd.h
// attend_group): head sizes above this take the portable loops, rows and tiles alike.
static constexpr int64_t ATT_MAX_HD = 512;

// The decode attention's look-ahead (qk_simd.h ATT_PREFETCH_POSITIONS): true, K and V blocks 32
// positions ahead into L2; false, 4 KiB ahead into L1 as before 2026-12-07 (set_attention_lookahead:
// benchmarks compare the two in one run; the results are the same bits).
inline bool g_att_far = true;

// Partial attention of one sequence's row: the `hn` query heads q[0..hn) (hd floats each, all
// reading one kv head) over cache positions [p0, p1). Kb[j] / Vb[j] point at the kv head's part of
// the j-th block of the range (bs x kv_row_bytes(KT, hd) bytes: K transposed, V in rows; see
// kv_k_at), p0 and p1
// count from the start of Kb[0]. Writes, per head i: o[i] = sum_p exp(s_p - m_i) V_p (not yet
// divided), ml[2i] = m_i = max_p s_p, ml[2i+1] = l_i = sum_p exp(s_p - m_i), where
// s_p = scale * q_i . K_p. `scores` holds hn * (p1 - p0) floats. Splits of a row merge as
// flash-decoding does (qk.cpp paged_attend); one split is o / l.
typedef void (*AttendPartFn)(const float* q, float* o, float* ml, const void* const* Kb, const void* const* Vb,
                             int64_t bs, int64_t p0, int64_t p1, int64_t hn, int64_t hd, float scale, float* scores);

// The rows [0, R) of a prefill tile (one sequence's consecutive rows over one block table) over
// cache positions [p0, p1s[r]) each, every row's hn heads at once: row r's heads are at
// q + r * q_stride (hn x hd floats), its o at os[r] (hn x hd) and its (max, sum) pairs at mls[r];
// each row's results are those of an AttendPartFn call for that row alone, bit for bit. `scores`
// holds att_tile_scratch(R, hn, max p1s - p0, hd, bs) floats. R <= ATT_TILE_MAX_ROWS.
static constexpr int64_t ATT_TILE_MAX_ROWS = 32;
static constexpr int64_t ATT_TILE_KC = 128;  // positions per P V pass of a tile (qk_simd.h)
// The floats an AttendTileFn's `scores` must hold: the scores, then a K block and a V panel in fp32.
static inline int64_t att_tile_scratch(int64_t R, int64_t hn, int64_t n, int64_t hd, int64_t bs) {
  return (R * hn * n + 15) / 16 * 16 + hd * bs + ATT_TILE_KC * 32;
}
typedef void (*AttendTileFn)(const float* q, int64_t q_stride, int64_t R, const int64_t* p1s, float* const* os,
                             float* const* mls, const void* const* Kb, const void* const* Vb, int64_t bs, int64_t p0,
                             int64_t hn, int64_t hd, float scale, float* scores);

static inline uint16_t f32_to_f16(float f) {  // IEEE half, round to nearest even (portable)
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0));  // inf, nan
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);  // rounds past 65504: inf
  if (ax < 0x38800000u) {  // below the smallest normal half (2^-14): a subnormal or 0
    if (ax < 0x33000000u) return (uint16_t)sign;  // under half the smallest subnormal
    const uint32_t e = ax >> 23, m = (ax & 0x7fffff) | 0x800000;
    const uint32_t shift = 126 - e;  // m * 2^(e-150) in units of 2^-24: m >> (150 - 24 - e)
    uint32_t h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1))) ++h;
    return (uint16_t)(sign | h);
  }
  uint32_t h = ((ax >> 13) - ((127 - 15) << 10));  // exponent rebias, 10 mantissa bits
  const uint32_t rem = ax & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;  // a carry into the exponent is right
  return (uint16_t)(sign | h);
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even; nan stays nan
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40);
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}

// 32 floats -> one block_q8_0, ggml's quantize_row_q8_0_ref rule: d = max|x| / 127, q = roundf(x / d)
// (half away from zero, with 1/d as a float), d stored as half. The synthetic models' quantizer
// (quantize.cpp) and the Q8_0 KV cache both use it; kernels/reference.py repeats it in numpy.
static inline void quantize_q8_0_block(const float* x, uint8_t* out) {
  float amax = 0.f;
  for (int i = 0; i < 32; ++i) amax = __builtin_fabsf(x[i]) > amax ? __builtin_fabsf(x[i]) : amax;
  const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
  const uint16_t h = f32_to_f16(d);
  memcpy(out, &h, 2);
  for (int i = 0; i < 32; ++i) {
    const float r = __builtin_roundf(x[i] * id);
    out[2 + i] = (uint8_t)(int8_t)(r > 127.f ? 127.f : r < -127.f ? -127.f : r);
  }
}

static inline void quantize_q8_0_row(const float* x, uint8_t* out, int64_t hd) {  // hd % 32 == 0
  for (int64_t b = 0; b < hd / 32; ++b) quantize_q8_0_block(x + 32 * b, out + Q8_BLOCK_BYTES * b);
}

// K is stored transposed within a block: the bs positions of one kv head's block hold, element by
// element, [hd][bs] (position p's element d at d * bs + p), so that attention computes the scores of
// S::L consecutive positions with plain FMAs, one vector of positions per element of the query (no
// horizontal sum per position). Q8_0 keeps the same bytes per position: the int8 q as [hd][bs],
// then each position's half scales as [hd / 32][bs]. V stays one row per position ([bs][row]).
// The block's element (p, d) of K, as fp32 (the portable reader; the same numbers as a V row's).
template <int KT>
static inline float kv_k_at(const uint8_t* blk, int64_t bs, int64_t hd, int64_t p, int64_t d) {
  if constexpr (KT == KV_F32) { float f; memcpy(&f, blk + 4 * (d * bs + p), 4); return f; }
  else if constexpr (KT == KV_F16) return f16_to_f32(rd16(blk + 2 * (d * bs + p)));
  else if constexpr (KT == KV_BF16) return bf16_to_f32(rd16(blk + 2 * (d * bs + p)));
  else return f16_to_f32(rd16(blk + hd * bs + 2 * ((d / 32) * bs + p))) * (float)(int8_t)blk[d * bs + p];
}

// Write position p of a K block (transposed layout above) from hd floats, rounded to the KV type.
static inline void write_k_row(uint8_t* blk, int64_t bs, int64_t p, const float* x, int64_t hd, int kv_type) {
  if (kv_type == KV_F32) {
    for (int64_t d = 0; d < hd; ++d) memcpy(blk + 4 * (d * bs + p), x + d, 4);
  } else if (kv_type == KV_F16 || kv_type == KV_BF16) {
    for (int64_t d = 0; d < hd; ++d) {
      const uint16_t h = kv_type == KV_F16 ? f32_to_f16(x[d]) : f32_to_bf16(x[d]);
      memcpy(blk + 2 * (d * bs + p), &h, 2);
    }
  } else {  // Q8_0: quantized by blocks of 32 as a V row is, then scattered
    uint8_t q[Q8_BLOCK_BYTES];
    for (int64_t b = 0; b < hd / 32; ++b) {
      quantize_q8_0_block(x + 32 * b, q);
      memcpy(blk + hd * bs + 2 * (b * bs + p), q, 2);
      for (int i = 0; i < 32; ++i) blk[(32 * b + i) * bs + p] = q[2 + i];
    }
  }
}

// Element d of a cached row of the KV type, as fp32 (the portable reader).
template <int KT>
static inline float kv_at(const uint8_t* row, int64_t d) {
  if constexpr (KT == KV_F32) { float f; memcpy(&f, row + 4 * d, 4); return f; }
  else if constexpr (KT == KV_F16) return f16_to_f32(rd16(row + 2 * d));
  else if constexpr (KT == KV_BF16) return bf16_to_f32(rd16(row + 2 * d));
  else {
    const uint8_t* b = row + (d / 32) * Q8_BLOCK_BYTES;
    return f16_to_f32(rd16(b)) * (float)(int8_t)b[2 + d % 32];
  }
}

// y[T, I] = silu(gu[:, :I]) * gu[:, I:] (generic::silu_mul has the contract).
typedef void (*SiluFn)(const float* gu, float* y, int64_t T, int64_t I);
// One row of the tanh-form GELU: y[i] = gelu_tanh(x[i]) * (up ? up[i] : 1) (generic::gelu_tanh_row).
typedef void (*GeluRowFn)(const float* x, const float* up, float* y, int64_t I);
// Roofline probes (qk_simd.h): a sum of n floats; iters x 12 FMA chains of the ISA's width.
typedef float (*ProbeReadFn)(const float* p, int64_t n);
typedef float (*ProbeFmaFn)(int64_t iters);

// gelu_tanh(v) = v/2 (1 + tanh(u)), u = sqrt(2/pi) (v + 0.044715 v^3), computed as v * sigmoid(2u)
// (the same number: 1 + tanh(u) = 2 sigmoid(2u)); the sigmoid from e = exp(-|2u|), which never
// overflows, as silu's: so far out on the negative side the result is a tiny product, not the
// rounding error of 1 + tanh(u) ~ 1 - 1 that the tanh form keeps.
static constexpr float GELU_K1 = 1.5957691216057308f, GELU_K3 = 0.044715f * GELU_K1;  // 2 sqrt(2/pi), its cubic term
static inline float gelu_tanh_scalar(float v) {
  const float z = v * (GELU_K1 + GELU_K3 * v * v);  // 2 sqrt(2/pi) (v + 0.044715 v^3)
  const float e = __builtin_expf(-__builtin_fabsf(z));
  return v * (z >= 0.f ? 1.f : e) / (1.f + e);
}

// scores[p] <- exp(scores[p] - mx) for p < L; returns their sum (the softmax denominator).
static inline float softmax_exp(float* scores, int64_t L, float mx) {
  float den = 0.f;
  for (int64_t p = 0; p < L; ++p) {
    scores[p] = __builtin_expf(scores[p] - mx);
    den += scores[p];
  }
  return den;
}

}  // namespace qk
