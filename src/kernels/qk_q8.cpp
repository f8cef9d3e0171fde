// The int8 mode's driver and portable build (qk_q8.h has the arithmetic): quantize the activations
// once per call, then run the rows of every segment on the pool with the best int8 kernels the
// CPU has under the selected ISA (set_isa): avx512 + VNNI, avx2 + AVX-VNNI, avx2 (maddubs), or the
// scalar loops below, which compute the same numbers (integer dots, then the same fused float steps).
#include <algorithm>
#include <vector>

#include "qk_q8.h"

namespace qk {
namespace q8 {

namespace avx2 { RowsFn get(int type); QuantFn quant(); int64_t tile_rows(); int64_t small_rows(int type); }
namespace avxvnni { RowsFn get(int type); QuantFn quant(); int64_t tile_rows(); int64_t small_rows(int type); }
namespace avx512 { RowsFn get(int type); QuantFn quant(); int64_t tile_rows(); int64_t small_rows(int type); }

namespace generic {

static void quant_rows(const float* x, int64_t T, int64_t K, int64_t nt, int64_t t0, int64_t t1, int8_t* q,
                       float* d32, float* ms32, float* ms16) {
  const int64_t G = K / 32;
  (void)T, (void)nt;  // row-major: the portable loops read x's int8 rows whole (nt = 1)
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t g = 0; g < G; ++g)
      d32[t * G + g] = quant_block(x + t * K + g * 32, q + t * K + g * 32, ms32 + t * G + g, ms16 + t * 2 * G + 2 * g);
}

// Group g (32 weights) of a row, as the SIMD panels hold it: quants unsigned (Q6_K 0..63), and per
// half h of 16 the scale a[h] and the factor c[h] of the activations' sum (equal halves but in Q6_K).
static void decode(int type, const uint8_t* row, int64_t g, int32_t q[32], float a[2], float c[2]) {
  if (type == Q4_1) {
    const uint8_t* b = row + g * 20;
    a[0] = a[1] = f16_to_f32(rd16(b));
    c[0] = c[1] = -f16_to_f32(rd16(b + 2));
    for (int l = 0; l < 16; ++l) {
      q[l] = b[4 + l] & 15;
      q[l + 16] = b[4 + l] >> 4;
    }
  } else if (type == Q4_K) {
    const uint8_t* sb = row + (g / 8) * 144;
    const int j = (int)(g % 8);
    int sc, m;
    k4_scale_min(j, sb + 4, &sc, &m);
    a[0] = a[1] = f16_to_f32(rd16(sb)) * (float)sc;
    c[0] = c[1] = f16_to_f32(rd16(sb + 2)) * (float)m;
    const uint8_t* qs = sb + 16 + 32 * (j / 2);
    for (int l = 0; l < 32; ++l) q[l] = (qs[l] >> (4 * (j & 1))) & 15;
  } else {  // Q6_K
    const uint8_t* sb = row + (g / 8) * 210;
    const int j = (int)(g % 8), n = j / 4, k = j % 4;
    const float d = f16_to_f32(rd16(sb + 208));
    for (int h = 0; h < 2; ++h) {
      a[h] = d * (float)(int8_t)sb[192 + 2 * j + h];
      c[h] = a[h] * 32.f;
    }
    const uint8_t* ql = sb + 64 * n + 32 * (k & 1);
    const uint8_t* qh = sb + 128 + 32 * n;
    for (int l = 0; l < 32; ++l) q[l] = ((ql[l] >> (k >= 2 ? 4 : 0)) & 15) | (((qh[l] >> (2 * k)) & 3) << 4);
  }
}

static void rows(const Job& jb, int64_t r0, int64_t r1) {
  const XQ& x = jb.x;
  const int64_t K = x.K, G = K / 32;
  int32_t q[32];
  float a[2], c[2];
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t t = 0; t < x.T; ++t) {
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        decode(jb.type, jb.w + r * jb.row_bytes, g, q, a, c);
        const int8_t* xq = x.q + t * K + g * 32;
        if (jb.type == Q6_K) {  // two groups of 16
          for (int h = 0; h < 2; ++h) {
            int32_t A = 0;
            for (int l = 16 * h; l < 16 * h + 16; ++l) A += q[l] * xq[l];
            acc = __builtin_fmaf((float)A * a[h], x.d32[t * G + g], acc);
            acc = __builtin_fmaf(-c[h], x.ms16[t * 2 * G + 2 * g + h], acc);
          }
        } else {
          int32_t A = 0;
          for (int l = 0; l < 32; ++l) A += q[l] * xq[l];
          acc = __builtin_fmaf((float)A * a[0], x.d32[t * G + g], acc);
          acc = __builtin_fmaf(-c[0], x.ms32[t * G + g], acc);
        }
      }
      float* yt = jb.y + t * jb.ldy + r;
      *yt = jb.accumulate ? *yt + acc : acc;
    }
  }
}

}  // namespace generic

// ---------------------------------------------------------------- path selection
enum Path { GENERIC = 0, AVX2 = 1, AVX2_VNNI = 2, AVX512_VNNI = 3 };
static constexpr int64_t SMALL_ROWS_MAX = 1 << 30;
static const char* PATH_NAMES[] = {"generic", "avx2", "avx2-vnni", "avx512-vnni"};
static bool g_vnni = true;

static bool cpu_vnni(bool wide) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return wide ? __builtin_cpu_supports("avx512vnni") : __builtin_cpu_supports("avxvnni");
#else
  (void)wide;
  return false;
#endif
}

// isa: qk.cpp's selection (0 generic, 1 avx2, 2 avx512). AVX-512 without VNNI runs the AVX2 code.
static Path path_for(int isa) {
  if (isa == 2 && g_vnni && cpu_vnni(true)) return AVX512_VNNI;
  if (isa >= 1) return g_vnni && cpu_vnni(false) ? AVX2_VNNI : AVX2;
  return GENERIC;
}

const char* path_name(int isa) { return PATH_NAMES[path_for(isa)]; }
void set_vnni(bool on) { g_vnni = on; }

static RowsFn rows_for(Path p, int type) {
  switch (p) {
#if defined(__x86_64__) || defined(__i386__)
    case AVX512_VNNI: return avx512::get(type);
    case AVX2_VNNI: return avxvnni::get(type);
    case AVX2: return avx2::get(type);
#endif
    default: return generic::rows;
  }
}

static int64_t tile_rows_for(Path p) {
  switch (p) {
#if defined(__x86_64__) || defined(__i386__)
    case AVX512_VNNI: return avx512::tile_rows();
    case AVX2_VNNI: return avxvnni::tile_rows();
    case AVX2: return avx2::tile_rows();
#endif
    default: return 1;
  }
}

// Activation rows up to which the path reads x of every segment row-major (nt = 1; 0: never).
static int64_t small_rows_for(Path p, const Seg* segs, int nseg) {
#if defined(__x86_64__) || defined(__i386__)
  if (p != GENERIC) {
    int64_t n = SMALL_ROWS_MAX;
    for (int i = 0; i < nseg; ++i)
      n = std::min(n, p == AVX512_VNNI ? avx512::small_rows(segs[i].type)
                      : p == AVX2_VNNI ? avxvnni::small_rows(segs[i].type)
                                       : avx2::small_rows(segs[i].type));
    return n;
  }
#endif
  (void)p, (void)segs, (void)nseg;
  return 0;
}

static QuantFn quant_for(Path p) {
  switch (p) {
#if defined(__x86_64__) || defined(__i386__)
    case AVX512_VNNI: return avx512::quant();
    case AVX2_VNNI: return avxvnni::quant();
    case AVX2: return avx2::quant();
#endif
    default: return generic::quant_rows;
  }
}

// ---------------------------------------------------------------- one call
void run(const Seg* segs, int nseg, int64_t K, const float* x, int64_t T, float* y, int64_t ldy, bool accumulate,
         int isa, int threads, ParallelFor pf) {
  const Path path = path_for(isa);
  // The quantized activations: per calling thread, grown as needed (never shrunk).
  thread_local std::vector<int8_t> qb;
  thread_local std::vector<float> fb;  // d32 [T][K/32], ms32 [T][K/32], ms16 [T][K/16]
  if ((int64_t)qb.size() < T * K) qb.resize(T * K);
  if ((int64_t)fb.size() < T * (K / 8)) fb.resize(T * (K / 8));
  float *d32 = fb.data(), *ms32 = d32 + T * (K / 32), *ms16 = ms32 + T * (K / 32);
  // Row-major activations (nt = 1) where the path reads few rows that way (qk_q8_rows.h).
  const int64_t nt = T <= small_rows_for(path, segs, nseg) ? 1 : tile_rows_for(path);
  struct QCtx {
    QuantFn fn;
    const float* x;
    int64_t K, T, nt, step;
    int8_t* q;
    float *d32, *ms32, *ms16;
  } qc{quant_for(path), x, K, T, nt, 0, qb.data(), d32, ms32, ms16};
  auto quant_chunk = [](void* c, int64_t i) {
    const QCtx& q = *(const QCtx*)c;
    const int64_t t0 = i * q.step, t1 = t0 + q.step < q.T ? t0 + q.step : q.T;
    if (t0 < t1) q.fn(q.x, q.T, q.K, q.nt, t0, t1, q.q, q.d32, q.ms32, q.ms16);
  };
  if (threads > 1 && T >= 2 * threads && T * K >= (1 << 16)) {  // ~2 us of work or more: split the rows
    qc.step = (T + threads - 1) / threads;
    pf(quant_chunk, &qc, threads);
  } else {
    qc.step = T;
    quant_chunk(&qc, 0);
  }
  const XQ xq{qb.data(), d32, ms32, ms16, T, K, nt};

  // Items of rows, ~4 per thread per segment, whole panels (16 rows, a multiple of every width).
  std::vector<Job> jobs;
  std::vector<int64_t> items;
  int64_t col = 0;
  for (int i = 0; i < nseg; ++i) {
    const Seg& s = segs[i];
    jobs.push_back(Job{s.type, s.w, s.row_bytes, xq, y + col, ldy, accumulate});
    int64_t chunk = (s.rows + 4 * threads - 1) / (4 * threads);
    chunk = (chunk + 15) / 16 * 16;
    for (int64_t r = 0; r < s.rows; r += chunk) {
      items.push_back(i);
      items.push_back(r);
      items.push_back(r + chunk < s.rows ? r + chunk : s.rows);
    }
    col += s.rows;
  }
  struct Ctx {
    const Job* jobs;
    const int64_t* items;
    Path path;
  } c{jobs.data(), items.data(), path};
  pf(
      [](void* p, int64_t i) {
        const Ctx& c = *(const Ctx*)p;
        const int64_t* it = c.items + 3 * i;
        const Job& jb = c.jobs[it[0]];
        rows_for(c.path, jb.type)(jb, it[1], it[2]);
      },
      &c, (int64_t)items.size() / 3);
}

}  // namespace q8
}  // namespace qk
