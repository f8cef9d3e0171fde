// Portable build of the kernels (any CPU, no SIMD intrinsics): decode a group of 32 weights with
// the scalar decoder, dequantize, multiply-add in fp32. Slow but exact; the fallback path.
#include "qk_types.h"

namespace qk {
namespace generic {

static void dequant_row(const Job& jb, const uint8_t* row, float* out) {
  if (is_float_type_c(jb.type)) {
    for (int64_t k = 0; k < jb.K; ++k) out[k] = float_weight(jb.type, row, k);
    return;
  }
  int32_t q[32];
  float a0, a1, c;
  for (int64_t g = 0; g < jb.K / 32; ++g) {
    decode_group_scalar(jb.type, row, g, q, &a0, &a1, &c);
    for (int e = 0; e < 32; ++e) out[g * 32 + e] = (e < 16 ? a0 : a1) * (float)q[e] + c;
  }
}

static void rows(const Job& jb, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    dequant_row(jb, jb.w + r * jb.row_bytes, jb.scratch);
    for (int64_t t = 0; t < jb.T; ++t) {
      const float* x = jb.x + t * jb.K;
      float s = 0.f;
      for (int64_t k = 0; k < jb.K; ++k) s += jb.scratch[k] * x[k];
      jb.y[t * jb.ldy + r] = s;
    }
  }
}

RowsFn get(int type) { return block_info(type).elems ? rows : nullptr; }

// Dequantize rows `ids` of a matrix into out[n, K] (embedding lookups; exact, as the reference).
void dequant_rows(int type, const uint8_t* w, int64_t row_bytes, int64_t K, const int64_t* ids, int64_t n,
                  float* out) {
  Job jb{};
  jb.type = type;
  jb.K = K;
  for (int64_t i = 0; i < n; ++i) dequant_row(jb, w + ids[i] * row_bytes, out + i * K);
}

}  // namespace generic
}  // namespace qk
