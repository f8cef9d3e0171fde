// The opt-in lossy int8 mode (a Plan's `lossy` flag; README "Quantized engine"): activations are
// rounded to int8 once per call and each weight super-block is dotted with them in integers (VNNI
// where the CPU has it), as llama.cpp does. Shared by the portable driver (qk_q8.cpp) and the SIMD
// builds (qk_q8_avx512.cpp, qk_q8_avx2.cpp, which include qk_q8_simd.h).
//
// Activations x [T, K] (K % 256 == 0) become, per row t and block g of 32 values:
//   d32[t][g] = max|x| / 127,  q = rint(x * (127 / max|x|)) in [-127, 127] (int8, row-major [T][K]),
//   ms32[t][g] = d32 * (sum of q over the 32), ms16[t][2g + h] = d32 * (sum of q over half h).
// One scale per 32 values, as ggml's Q8_0 / Q8_1, rather than Q8_K's one per 256: Qwen2.5's first
// token carries activations ~100x the rest of its row, which a 256-value scale rounds to zero.
// A weight row's group of 32 (Q4_K, Q4_1) or 16 (Q6_K) then adds to y[t, r], integers A exact:
//   Q4_K group j of 32:  acc = fma(float(A) * (d sc_j), d32, acc);  acc = fma(-(dmin m_j), ms32, acc)
//   Q4_1 block of 32:    acc = fma(float(A) * d, d32, acc);         acc = fma(-(-m), ms32, acc)
//   Q6_K group g of 16:  acc = fma(float(A) * (d sc_g), d32, acc);  acc = fma(-(32 d sc_g), ms16, acc)
// with A = q_w . q_x over the group (Q6_K's quants taken unsigned, 0..63, their offset of 32 in the
// second step), over the groups in order from acc = 0, each step one fp32 rounding (fma fused). So
// every path (generic, avx2, avx2 + VNNI, avx512 + VNNI) gives the same bits, whatever the batch
// size or the thread that computed the row.
#pragma once
#include <stdint.h>

#include "qk_types.h"

namespace qk {
namespace q8 {

// Quantized activations (see above); the driver owns the buffers.
struct XQ {
  const int8_t* q;     // [T][K] in tiles of nt rows (xq_word)
  const float* d32;    // [T][K/32]
  const float* ms32;   // [T][K/32]
  const float* ms16;   // [T][K/16]
  int64_t T, K, nt;
};

// The int8 activations are stored in tiles of nt rows (the kernels' NT activation rows at once):
// the 4 bytes of k-step s (values 4s..4s+3) of row t are word xq_word(t, s) of q, so a tile's rows
// at one k-step are consecutive words (one base pointer in the kernel's loop). nt = 1 is row-major.
static inline int64_t xq_word(int64_t t, int64_t s, int64_t T, int64_t K, int64_t nt) {
  const int64_t t0 = t / nt * nt, n = T - t0 < nt ? T - t0 : nt;  // the tile's first row, its rows
  return t0 * (K / 4) + s * n + (t - t0);
}

// The work of one call over one row segment: y[t * ldy + r] (+)= sum_k W[r, k] x[t, k] for rows
// [r0, r1) of the segment and every t.
struct Job {
  int type;            // Q4_K, Q6_K or Q4_1
  const uint8_t* w;    // row 0 of the segment
  int64_t row_bytes;
  XQ x;
  float* y;            // column 0 of the segment in a [T, ldy] output
  int64_t ldy;
  bool accumulate;
};

typedef void (*RowsFn)(const Job& jb, int64_t r0, int64_t r1);
// x [T, K] fp32 -> the XQ buffers (q in tiles of nt rows, d32, ms32, ms16), rows [t0, t1)
typedef void (*QuantFn)(const float* x, int64_t T, int64_t K, int64_t nt, int64_t t0, int64_t t1, int8_t* q,
                        float* d32, float* ms32, float* ms16);

static inline bool supports(int type, int64_t K) {
  return ((type == Q4_K || type == Q6_K) && K % 256 == 0) || (type == Q4_1 && K % 32 == 0);
}

// The driver (qk_q8.cpp), called by a Plan with `lossy` set (qk.cpp). A segment is a block of
// weight rows of one type, as a Plan holds them; `pf` runs fn(ctx, i) for i < n on the pool.
struct Seg {
  const uint8_t* w;
  int type;
  int64_t rows, row_bytes;
};
typedef void (*ParallelFor)(void (*fn)(void*, int64_t), void* ctx, int64_t n);
// y[T, ldy] (+)= x[T, K] @ W^T over the segments (their rows side by side); isa: qk.cpp's
// selection (0 generic, 1 avx2, 2 avx512); threads: the pool's size (for splitting the work).
void run(const Seg* segs, int nseg, int64_t K, const float* x, int64_t T, float* y, int64_t ldy, bool accumulate,
         int isa, int threads, ParallelFor pf);
// The int8 kernels a call runs on under `isa`: "avx512-vnni", "avx2-vnni", "avx2" or "generic".
const char* path_name(int isa);
// Tests: false makes the AVX2 code without VNNI (maddubs) run on a CPU that has VNNI.
void set_vnni(bool on);

// The scalar form of one 32-value block's quantization (every SIMD build reproduces it exactly):
// returns d32, writes q and the block's ms32, ms16[0..1].
static inline float quant_block(const float* x, int8_t q[32], float* ms32, float* ms16) {
  float amax = 0.f;
  for (int i = 0; i < 32; ++i) {
    const float a = __builtin_fabsf(x[i]);
    amax = a > amax ? a : amax;
  }
  const float inv = amax > 0.f ? 127.f / amax : 0.f, d = amax / 127.f;
  int s[2] = {0, 0};
  for (int i = 0; i < 32; ++i) {
    q[i] = (int8_t)__builtin_rintf(x[i] * inv);
    s[i / 16] += q[i];
  }
  *ms32 = d * (float)(s[0] + s[1]);
  ms16[0] = d * (float)s[0];
  ms16[1] = d * (float)s[1];
  return d;
}

}  // namespace q8
}  // namespace qk
