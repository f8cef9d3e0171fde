// pipeserve.kernels._qk, the Python binding of the kernels: matrix x (small) matrix products on
// GGUF-quantized weights, fp32 activations. The Python side (kernels/__init__.py) owns the weight
// bytes and builds one `Plan` per linear layer (several row segments, possibly of different types,
// e.g. fused q|k|v); a call runs the plan on x [T, K] into y [T, N] on the process's thread pool
// (qk_pool.h). A `PagedKV` is one step's view of a paged KV cache, for attention. The SIMD path is
// chosen at import from the CPU (avx512 > avx2 > generic) and can be forced with set_isa() for tests.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "qk_pool.h"
#include "qk_q8.h"
#include "qk_types.h"

namespace qk {
namespace avx2 { RowsFn get(int type); AttendPartFn get_attend(int kv_type); AttendTileFn get_attend_tile(int kv_type); SiluFn get_silu(); GeluRowFn get_gelu_tanh();
                 ProbeReadFn get_probe_read(); ProbeFmaFn get_probe_fma(); }
namespace avx512 { RowsFn get(int type); AttendPartFn get_attend(int kv_type); AttendTileFn get_attend_tile(int kv_type); SiluFn get_silu(); GeluRowFn get_gelu_tanh();
                   ProbeReadFn get_probe_read(); ProbeFmaFn get_probe_fma(); }
namespace generic {
RowsFn get(int type);
void dequant_rows(int type, const uint8_t* w, int64_t row_bytes, int64_t K, const int64_t* ids, int64_t n, float* out);
void rms_norm(const float* x, const float* w, float* y, int64_t T, int64_t C, float eps, float w_offset);
void silu_mul(const float* gu, float* y, int64_t T, int64_t I);
void gelu_tanh_row(const float* x, const float* up, float* y, int64_t I);
void rope(float* x, int64_t T, int64_t row_stride, int64_t n_heads, int64_t hd, const int64_t* pos, const float* cos_t,
          const float* sin_t);
AttendPartFn get_attend(int kv_type);
}
}  // namespace qk

using namespace qk;

// ---------------------------------------------------------------- ISA selection
enum Isa { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
static const char* ISA_NAMES[] = {"generic", "avx2", "avx512"};

static bool cpu_has(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (isa == ISA_AVX2)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == ISA_AVX512)
    return cpu_has(ISA_AVX2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
  return isa == ISA_GENERIC;
}

static Isa g_isa = ISA_GENERIC;

static RowsFn rows_for(int type, Isa isa) {
  switch (isa) {
#if defined(__x86_64__) || defined(__i386__)
    case ISA_AVX512: return avx512::get(type);
    case ISA_AVX2: return avx2::get(type);
#endif
    default: return generic::get(type);
  }
}

// The path a matmul of T activation rows runs on: the selected one for every T. (The AVX-512
// selection used to run 5..8 rows on the 8-lane AVX2 tiles; those rows now take passes of the
// register loop on the selected ISA, as one row does, so that each row's bits do not depend on T:
// qk_types.h, MV_PASS_MAX_T.)
static Isa call_isa(int64_t) { return g_isa; }

// The SIMD attention reads S::L positions of a block at once and S::L elements of a row: both the
// head size and the block size must be multiples of the width, and the head size at most
// ATT_MAX_HD (else the portable loops run).
static AttendPartFn attend_for(int64_t hd, int64_t bs, int kv_type) {
#if defined(__x86_64__) || defined(__i386__)
  if (hd > ATT_MAX_HD) return generic::get_attend(kv_type);
  if (g_isa == ISA_AVX512 && hd % 16 == 0 && bs % 16 == 0) return avx512::get_attend(kv_type);
  if (g_isa >= ISA_AVX2 && hd % 8 == 0 && bs % 8 == 0) return avx2::get_attend(kv_type);
#endif
  (void)hd;
  (void)bs;
  return generic::get_attend(kv_type);
}

// The prefill tile kernel of the same path (qk_types.h AttendTileFn), or null: the portable
// path, or tiles turned off (set_attention_tiles(False): tests compare the two), runs a tile's rows
// one at a time through attend_for.
static bool g_att_tiles = true;
static AttendTileFn attend_tile_for(int64_t hd, int64_t bs, int kv_type) {
  if (!g_att_tiles) return nullptr;
#if defined(__x86_64__) || defined(__i386__)
  if (hd > ATT_MAX_HD) return nullptr;
  if (g_isa == ISA_AVX512 && hd % 16 == 0 && bs % 16 == 0) return avx512::get_attend_tile(kv_type);
  if (g_isa >= ISA_AVX2 && hd % 8 == 0 && bs % 8 == 0) return avx2::get_attend_tile(kv_type);
#endif
  (void)hd;
  (void)bs;
  (void)kv_type;
  return nullptr;
}

static SiluFn silu_for() {
#if defined(__x86_64__) || defined(__i386__)
  if (g_isa == ISA_AVX512) return avx512::get_silu();
  if (g_isa == ISA_AVX2) return avx2::get_silu();
#endif
  return generic::silu_mul;
}

static GeluRowFn gelu_tanh_for() {
#if defined(__x86_64__) || defined(__i386__)
  if (g_isa == ISA_AVX512) return avx512::get_gelu_tanh();
  if (g_isa == ISA_AVX2) return avx2::get_gelu_tanh();
#endif
  return generic::gelu_tanh_row;
}

// ---------------------------------------------------------------- Plan
struct Segment {
  const uint8_t* w;
  int type;
  int64_t rows, row_bytes;
};

typedef struct {
  PyObject_HEAD
  std::vector<Segment>* segs;
  int64_t K, N;
  bool needs_xsum;
  bool has_q6k, has_q4k;  // a Q6_K / Q4_K segment: SIMD mv calls permute x (perm_x)
  bool kperm_only;        // every segment is Q4_K or Q6_K (the permuted-x decode loops)
  bool q41_only;          // every segment is Q4_1
  bool int8_ok, lossy;  // every segment has int8 kernels (qk_q8.h); the opt-in lossy mode is on
} PlanObject;

static int Plan_init(PlanObject* self, PyObject* args, PyObject*) {
  PyObject* seq;
  long long K;
  if (!PyArg_ParseTuple(args, "OL", &seq, &K)) return -1;
  PyObject* fast = PySequence_Fast(seq, "segments must be a sequence of (ptr, type, rows, row_bytes)");
  if (!fast) return -1;
  self->segs = new std::vector<Segment>();
  self->K = K;
  self->N = 0;
  self->needs_xsum = false;
  self->has_q6k = self->has_q4k = false;
  self->kperm_only = true;
  self->q41_only = true;
  self->int8_ok = true;
  self->lossy = false;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast); ++i) {
    unsigned long long ptr;
    int type;
    long long rows, rb;
    if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "KiLL", &ptr, &type, &rows, &rb)) {
      Py_DECREF(fast);
      return -1;
    }
    BlockInfo bi = block_info(type);
    if (bi.elems == 0 || K % bi.elems != 0 || rb != K / bi.elems * bi.bytes || rows <= 0) {
      PyErr_Format(PyExc_ValueError, "segment %zd: type %d with K=%lld and row_bytes=%lld is not a valid layout",
                   i, type, K, rb);
      Py_DECREF(fast);
      return -1;
    }
    self->segs->push_back({(const uint8_t*)ptr, type, rows, rb});
    self->N += rows;
    if (type == Q4_1 || type == Q5_1 || type == Q4_K || type == Q5_K) self->needs_xsum = true;
    if (type == Q6_K) self->has_q6k = true;
    if (type == Q4_K) self->has_q4k = true;
    if (type != Q4_K && type != Q6_K) self->kperm_only = false;
    if (type != Q4_1) self->q41_only = false;
    self->int8_ok = self->int8_ok && q8::supports(type, K);
  }
  Py_DECREF(fast);
  if (34 * K > pool::scratch_floats()) {  // a panel of up to 32 rows [K][32] and one row (qk_simd.h)
    Py_BEGIN_ALLOW_THREADS
    pool::reserve_scratch(34 * K);
    Py_END_ALLOW_THREADS
  }
  return 0;
}

static void Plan_dealloc(PlanObject* self) {
  delete self->segs;
  Py_TYPE(self)->tp_free((PyObject*)self);
}

static void run_exact(PlanObject* self, const float* x, int64_t T, float* y, bool accumulate);
static bool g_tail_rows = true;  // set_tail_rows(False): a partial last chunk runs as a chunk (benchmarks, tests)
// set_batch_invariant(True): every exact matmul runs its rows through the decode loops, whatever T,
// in calls of up to MV_PASS_MAX_T rows, so each activation row's result has the bits it gets alone
// (T == 1) in any batch, prefill chunk or replay (the decode loops sum each row in one order
// whatever the rows beside it, qk_simd.h), and a call's scratch stays a decode step's. The batched
// shapes (k-major x, panels) sum in another order and are faster from 9 rows on: this costs prefill
// and large batches (docs/engine.md, "Batch-invariant mode"). Calls of 8 rows were as fast as one
// call running every row through the decode loops (2 threads, Zen 4, 16 to 256 rows of Q4_K, Q6_K,
// Q4_1), without its T x K permuted copies of x. The int8 mode's rows are batch-invariant already
// (qk_q8.h) and the portable path sums each row alone.
static bool g_batch_invariant = false;

// Where a matmul of T rows splits: rows [0, head) in one call, [head, T) in a call of their own.
// A batched call's last chunk of cw activation rows costs a whole chunk however few rows it
// holds (its lanes run empty): on one Zen 4 thread T = 17 took 1.8x T = 16 (Q4_K 8960 x 1536)
// where one more row of the decode loop adds a tenth. So the rows past the last whole chunk, when
// few, take the decode loops instead, as a call of their own (and get the bits they get alone):
// up to 8 on AVX-512, where that was faster at every tail (Q4_K, Q6_K, Q4_1; by 5-40%); up to 4
// on AVX2, whose last chunk runs half its FMAs when it holds 8 rows or fewer, and where 5 rows
// broke even and 6 lost.
// Likewise 9 to 12 rows of Q4_K / Q6_K (AVX2: 9 to 11), below one whole chunk: 8 rows, then the
// rest, in the decode loops (on one Zen 4 thread 20-37% faster on AVX-512; on its AVX2 path 7-28%
// at 9 to 11 rows, 1-3% at 12). Q4_1 too on AVX-512: SmolLM2's whole forward at 2 threads on Zen 4,
// prefill of 9 / 10 / 12 tokens 1.19 / 1.15 / 1.03x faster, a decode step of 9 / 12 streams 1.15 /
// 1.02x (bench/tail-rows-q41.json); on its AVX2 path Q4_1 lost at 10 to 12 rows and tied at 9.
static int64_t split_head(const PlanObject* self, int64_t T) {
  const Isa isa = call_isa(T);
  if (!g_tail_rows || isa == ISA_GENERIC) return T;
  const int64_t cw = xt_width(T, isa == ISA_AVX512 ? 16 : 8), tail = T % cw;
  const int64_t tail_max = isa == ISA_AVX512 ? MV_PASS_MAX_T : MV_MAX_T;
  const int64_t small_max = isa == ISA_AVX512 ? MV_PASS_MAX_T + MV_MAX_T : MV_PASS_MAX_T + MV_MAX_T - 1;
  const bool small_split = self->kperm_only || (self->q41_only && isa == ISA_AVX512);
  if (small_split && T > MV_PASS_MAX_T && T <= small_max) return MV_PASS_MAX_T;
  if (T > cw && T < PANEL_MIN_T && tail <= tail_max) return T - tail;
  return T;
}

// run(x_ptr, T, y_ptr): y[T, N] = x[T, K] @ W^T, both contiguous fp32.
static PyObject* Plan_run(PlanObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3 && nargs != 4) {
    PyErr_SetString(PyExc_TypeError, "run(x_ptr, T, y_ptr[, accumulate])");
    return nullptr;
  }
  const bool accumulate = nargs == 4 && PyObject_IsTrue(args[3]) == 1;
  const float* x = (const float*)PyLong_AsUnsignedLongLong(args[0]);
  long long T = PyLong_AsLongLong(args[1]);
  float* y = (float*)PyLong_AsUnsignedLongLong(args[2]);
  if (PyErr_Occurred()) return nullptr;
  if (T <= 0) Py_RETURN_NONE;
  if (self->lossy) {  // the opt-in int8 mode: int8 activations (qk_q8.cpp)
    std::vector<q8::Seg> segs;
    for (const Segment& s : *self->segs) segs.push_back({s.w, s.type, s.rows, s.row_bytes});
    Py_BEGIN_ALLOW_THREADS
    q8::run(segs.data(), (int)segs.size(), self->K, x, T, y, self->N, accumulate, g_isa, pool::size(),
            pool::parallel_for);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
  }
  const int64_t K = self->K;
  Py_BEGIN_ALLOW_THREADS
  if (g_batch_invariant) {  // calls of up to 8 rows, each through the decode loops
    for (int64_t t0 = 0; t0 < T; t0 += MV_PASS_MAX_T)
      run_exact(self, x + t0 * K, T - t0 < MV_PASS_MAX_T ? T - t0 : MV_PASS_MAX_T, y + t0 * self->N, accumulate);
  } else {
    const int64_t head = split_head(self, T);
    run_exact(self, x, head, y, accumulate);
    if (head < T) run_exact(self, x + head * K, T - head, y + head * self->N, accumulate);
  }
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// The exact matmul of T activation rows (called without the GIL).
static void run_exact(PlanObject* self, const float* x, int64_t T, float* y, bool accumulate) {
  const int64_t K = self->K, G = K / 32;
  std::vector<float> xsum;
  if (self->needs_xsum && T <= MV_PASS_MAX_T) {  // per-group sums of x for the "min" term of Q4_1 / Q5_1 / Q4_K / Q5_K (mv path)
    xsum.resize(T * G);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.f;
        for (int e = 0; e < 32; ++e) s += x[t * K + g * 32 + e];
        xsum[t * G + g] = s;
      }
  }
  const Isa isa = call_isa(T);
  std::vector<float> xt;  // x k-major for the batched-decode shape (qk_types.h: make_xt)
  const int64_t cw = xt_width(T, isa == ISA_AVX512 ? 16 : 8);
  if (isa != ISA_GENERIC && T >= XT_MIN_T && T < PANEL_MIN_T) {
    xt.resize(xt_floats(T, K, cw));
    make_xt(x, T, K, cw, xt.data());
  }
  std::vector<float> xp, xs16, xp4;  // x permuted for the SIMD Q6_K and Q4_K rows (qk_types.h: perm_x)
  const int H = isa == ISA_AVX512 ? 2 : 1;  // 8-float chunks per vector
  if (isa != ISA_GENERIC && self->has_q6k && T <= MV_PASS_MAX_T) {
    xp.resize(T * K);
    xs16.resize(T * (K / 16));
    perm_x<false>(x, T, K, xp.data(), Q6kShift{}, H);
    sums16_x(x, T, K, xs16.data());
  }
  if (isa != ISA_GENERIC && self->has_q4k && T <= MV_PASS_MAX_T) {
    xp4.resize(T * K);
    perm_x<true>(x, T, K, xp4.data(), Q4kShift{}, H);
  }
  std::vector<Job> jobs;
  std::vector<int64_t> items;  // triples (job index, r0, r1)
  pool::Use use;  // all the pool's threads, or 1 while another thread of this process computes
  const int threads = use.threads();
  int64_t col = 0;
  for (const Segment& s : *self->segs) {
    Job jb{s.type, s.w, s.row_bytes, K, x, xsum.empty() ? nullptr : xsum.data(), T, y + col, self->N, nullptr,
           accumulate, xt.empty() ? nullptr : xt.data(), cw};
    if (!xp.empty()) jb.xp = xp.data(), jb.xs16 = xs16.data();
    if (!xp4.empty()) jb.xp4 = xp4.data();
    const int64_t j = (int64_t)jobs.size();
    jobs.push_back(jb);
    // chunks of rows: ~4 per thread per segment, at least 16 rows, a multiple of 4; from
    // PANEL_MIN_T rows of x, a multiple of 32 (the widest panel), so that a row takes the same
    // loop, and gets the same bits, whatever the thread count (rows past the last whole panel of
    // a segment take the dot tiles, on one thread as on many)
    const int64_t align = T >= PANEL_MIN_T ? 32 : 4;
    int64_t chunk = (s.rows + 4 * threads - 1) / (4 * threads);
    chunk = ((chunk < 16 ? 16 : chunk) + align - 1) / align * align;
    if (threads == 1) chunk = s.rows;
    for (int64_t r = 0; r < s.rows; r += chunk) {
      items.push_back(j);
      items.push_back(r);
      items.push_back(r + chunk < s.rows ? r + chunk : s.rows);
    }
    col += s.rows;
  }
  struct Call {
    const std::vector<Job>* jobs;
    const int64_t* items;
    Isa isa;
  } call{&jobs, items.data(), isa};
  use.run(
      [](void* c, int64_t i, float* scratch) {
        const Call& k = *(const Call*)c;
        const int64_t* it = k.items + 3 * i;
        Job jb = (*k.jobs)[it[0]];
        jb.scratch = scratch;
        rows_for(jb.type, k.isa)(jb, it[1], it[2]);
      },
      &call, (int64_t)items.size() / 3, 34 * K);
}

static PyObject* Plan_get_n(PlanObject* self, void*) { return PyLong_FromLongLong(self->N); }
static PyObject* Plan_get_k(PlanObject* self, void*) { return PyLong_FromLongLong(self->K); }
static PyObject* Plan_get_lossy(PlanObject* self, void*) { return PyBool_FromLong(self->lossy); }
// Setting True takes effect only where every segment has int8 kernels (read it back to know).
static int Plan_set_lossy(PlanObject* self, PyObject* v, void*) {
  const int on = v ? PyObject_IsTrue(v) : 0;
  if (on < 0) return -1;
  self->lossy = on && self->int8_ok;
  return 0;
}

static PyMethodDef Plan_methods[] = {
    {"run", (PyCFunction)(void (*)(void))Plan_run, METH_FASTCALL, "run(x_ptr, T, y_ptr[, accumulate]): y[T, N] = (or +=) x[T, K] @ W^T"},
    {nullptr, nullptr, 0, nullptr}};
static PyGetSetDef Plan_getset[] = {
    {"n", (getter)Plan_get_n, nullptr, "output features (rows of all segments)", nullptr},
    {"k", (getter)Plan_get_k, nullptr, "input features", nullptr},
    {"lossy", (getter)Plan_get_lossy, (setter)Plan_set_lossy,
     "the opt-in int8 mode (int8 activations, qk_q8.h); stays False where a segment has no int8 kernel", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

static PyType_Slot Plan_slots[] = {
    {Py_tp_init, (void*)Plan_init},
    {Py_tp_dealloc, (void*)Plan_dealloc},
    {Py_tp_methods, (void*)Plan_methods},
    {Py_tp_getset, (void*)Plan_getset},
    {Py_tp_new, (void*)PyType_GenericNew},
    {Py_tp_doc, (void*)"Plan(segments, K): a linear layer over row segments (ptr, ggml type, rows, row_bytes)."},
    {0, nullptr}};
static PyType_Spec Plan_spec = {"pipeserve.kernels._qk.Plan", sizeof(PlanObject), 0, Py_TPFLAGS_DEFAULT, Plan_slots};

// ---------------------------------------------------------------- module functions
static PyObject* py_set_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (!name) return nullptr;
  for (int i = 0; i < 3; ++i)
    if (std::string(name) == ISA_NAMES[i]) {
      if (!cpu_has((Isa)i)) {
        PyErr_Format(PyExc_ValueError, "this CPU cannot run the %s kernels", name);
        return nullptr;
      }
      g_isa = (Isa)i;
      Py_RETURN_NONE;
    }
  PyErr_Format(PyExc_ValueError, "unknown kernel ISA %R (generic, avx2, avx512)", arg);
  return nullptr;
}

static PyObject* py_get_isa(PyObject*, PyObject*) { return PyUnicode_FromString(ISA_NAMES[g_isa]); }

static PyObject* py_matmul_isa(PyObject*, PyObject* arg) {
  const long long T = PyLong_AsLongLong(arg);
  if (PyErr_Occurred()) return nullptr;
  return PyUnicode_FromString(ISA_NAMES[call_isa(T)]);
}

static PyObject* py_supported(PyObject*, PyObject*) {
  PyObject* out = PyList_New(0);
  for (int i = 0; i < 3; ++i)
    if (cpu_has((Isa)i)) {
      PyObject* s = PyUnicode_FromString(ISA_NAMES[i]);
      PyList_Append(out, s);
      Py_DECREF(s);
    }
  return out;
}

static PyObject* py_set_threads(PyObject*, PyObject* arg) {
  long n = PyLong_AsLong(arg);
  if (PyErr_Occurred()) return nullptr;
  if (n < 1 || n > 256) {
    PyErr_Format(PyExc_ValueError, "threads must be in [1, 256], got %ld", n);
    return nullptr;
  }
  // Without the GIL: another thread may be inside a kernel call (holding the pool shared) or in
  // set_threads itself (several in-process nodes start at once); waiting with the GIL held would
  // deadlock against their return into Python.
  Py_BEGIN_ALLOW_THREADS
  pool::resize((int)n);  // no call in flight while the pool changes
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// pool_check(calls, max_items, late_worker_us) -> (errors, slowest call's seconds): `calls` calls on
// the pool, call c of 1 + (13 c mod max_items) items (counts that rise and fall from call to call),
// every item counting its runs; errors = items not run exactly once. late_worker_us > 0 makes the
// workers sleep that long whenever a call wakes them (tests: a call must end when its items are
// done, without waiting for a worker that is not running).
static PyObject* py_pool_check(PyObject*, PyObject* args) {
  long long calls, max_items;
  int late_us;
  if (!PyArg_ParseTuple(args, "LLi", &calls, &max_items, &late_us)) return nullptr;
  if (calls < 1 || max_items < 1 || max_items > (1 << 20) || late_us < 0) {
    PyErr_SetString(PyExc_ValueError, "pool_check(calls >= 1, 1 <= max_items <= 2**20, late_worker_us >= 0)");
    return nullptr;
  }
  std::vector<std::atomic<int>> counts(max_items);
  long long errors = 0;
  double slowest = 0;
  Py_BEGIN_ALLOW_THREADS
  pool::g_late_worker_us.store(late_us);
  for (long long c = 0; c < calls; ++c) {
    const int64_t items = 1 + (13 * c) % max_items;
    for (auto& n : counts) n.store(0, std::memory_order_relaxed);
    const auto t0 = std::chrono::steady_clock::now();
    {
      pool::Use use;
      use.run([](void* p, int64_t i, float*) { ((std::atomic<int>*)p)[i].fetch_add(1); }, counts.data(), items, 0);
    }
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    slowest = dt > slowest ? dt : slowest;
    for (int64_t i = 0; i < max_items; ++i) errors += counts[i].load() != (i < items ? 1 : 0);
  }
  pool::g_late_worker_us.store(0);
  Py_END_ALLOW_THREADS
  return Py_BuildValue("(Ld)", errors, slowest);
}

static PyObject* py_get_threads(PyObject*, PyObject*) { return PyLong_FromLong(pool::size()); }

// dequant_rows(ptr, type, row_bytes, K, ids_ptr, n, out_ptr): out[n, K] = rows `ids` as fp32.
static PyObject* py_dequant_rows(PyObject*, PyObject* args) {
  unsigned long long w, ids, out;
  int type;
  long long rb, K, n;
  if (!PyArg_ParseTuple(args, "KiLLKLK", &w, &type, &rb, &K, &ids, &n, &out)) return nullptr;
  if (block_info(type).elems == 0) {
    PyErr_Format(PyExc_ValueError, "unsupported ggml type %d", type);
    return nullptr;
  }
  Py_BEGIN_ALLOW_THREADS
  generic::dequant_rows(type, (const uint8_t*)w, rb, K, (const int64_t*)ids, n, (float*)out);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// rms_norm(x_ptr, w_ptr, y_ptr, T, C, eps, w_offset): y[T, C] = x * rsqrt(mean(x^2) + eps) * (w + w_offset)
static PyObject* py_rms_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 7) {
    PyErr_SetString(PyExc_TypeError, "rms_norm(x_ptr, w_ptr, y_ptr, T, C, eps, w_offset)");
    return nullptr;
  }
  const float* x = (const float*)PyLong_AsUnsignedLongLong(args[0]);
  const float* w = (const float*)PyLong_AsUnsignedLongLong(args[1]);
  float* y = (float*)PyLong_AsUnsignedLongLong(args[2]);
  long long T = PyLong_AsLongLong(args[3]), C = PyLong_AsLongLong(args[4]);
  double eps = PyFloat_AsDouble(args[5]), off = PyFloat_AsDouble(args[6]);
  if (PyErr_Occurred()) return nullptr;
  generic::rms_norm(x, w, y, T, C, (float)eps, (float)off);
  Py_RETURN_NONE;
}

// silu_mul(gu_ptr, y_ptr, T, I): y[T, I] = silu(gu[:, :I]) * gu[:, I:]
static PyObject* py_silu_mul(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4) {
    PyErr_SetString(PyExc_TypeError, "silu_mul(gu_ptr, y_ptr, T, I)");
    return nullptr;
  }
  const float* gu = (const float*)PyLong_AsUnsignedLongLong(args[0]);
  float* y = (float*)PyLong_AsUnsignedLongLong(args[1]);
  long long T = PyLong_AsLongLong(args[2]), I = PyLong_AsLongLong(args[3]);
  if (PyErr_Occurred()) return nullptr;
  struct Ctx {
    const float* gu;
    float* y;
    int64_t T, I, step;
    SiluFn fn;
  } ctx{gu, y, T, I, T >= 2 ? (T + 1) / 2 : 1, silu_for()};
  Py_BEGIN_ALLOW_THREADS
  if (T * I < 16384) {
    ctx.fn(gu, y, T, I);
  } else {
    pool::parallel_for(
        [](void* c, int64_t i) {
          const Ctx& x = *(const Ctx*)c;
          const int64_t t0 = i * x.step, n = t0 + x.step < x.T ? x.step : x.T - t0;
          if (n > 0) x.fn(x.gu + t0 * 2 * x.I, x.y + t0 * x.I, n, x.I);
        },
        &ctx, (T + ctx.step - 1) / ctx.step);
  }
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// ---------------------------------------------------------------- PagedKV
// One step's paged KV cache as attention writes and reads it. The pools are [n_blocks, layers,
// n_kv, bs, row] of the KV type (kv_type: fp32, 16-bit f16 / bf16: row = hd elements; Q8_0: row =
// kv_row_bytes bytes of blocks); batch row b owns the blocks
// tables[b] (int64 [B, max_blocks], in position order), its new token sits at position
// lengths[b] - 1 and it attends to positions [starts[b], lengths[b]) (starts: 0, or where a
// sliding window begins). Strides count bytes.
struct PagedKV {
  uint8_t *k_pool, *v_pool;
  int kv_type;  // KvType
  int64_t n_layers, n_kv, bs, hd, rb;  // hd: elements of a head; rb: bytes of its cached row
  int64_t block_stride, layer_stride, head_stride;  // bytes
  const int64_t *tables, *lengths, *starts;
  int64_t max_blocks, B;
};

// Positions per split of a row's attention: a row's range is cut into splits of ATT_SPLIT positions
// (rounded down to whole blocks) from its start, each split of each kv head is one item on the
// pool, and the splits merge as flash-decoding does. The cut depends on the row and the block size
// alone (never on the batch or the threads), so a row's result has the same bits in any batch, on
// any pool.
static constexpr int64_t ATT_SPLIT = 512;
static constexpr int64_t ATT_MAX_BLOCKS = ATT_SPLIT + 2;  // blocks a split can touch (block size 1)
static constexpr int64_t ATT_WAVE_FLOATS = 1 << 20;  // partials held at once (4 MiB): rows go in waves
static constexpr int64_t ATT_QROWS = 32;  // rows of one prefill chunk that share a K/V split in turn

static void write_row(uint8_t* dst, const float* src, int64_t hd, int kv_type) {
  if (kv_type == KV_F32) {
    memcpy(dst, src, hd * sizeof(float));
    return;
  }
  if (kv_type == KV_Q8_0) {
    quantize_q8_0_row(src, dst, hd);
    return;
  }
  uint16_t* d = (uint16_t*)dst;
  for (int64_t i = 0; i < hd; ++i) d[i] = kv_type == KV_F16 ? f32_to_f16(src[i]) : f32_to_bf16(src[i]);
}

// Row b of qkv (fp32, rows row_stride floats apart: nh q heads, then n_kv k heads, n_kv v heads)
// first writes its k/v at position lengths[b] - 1 of its blocks in `layer` (rounded to the KV
// type); then the rows attend, in parallel -> out [B, nh, hd]. Written first, rows that share a
// block table see each other's keys: a prefill chunk of t tokens is t rows over one table with
// lengths start+1 .. start+t. Items are (tile of rows, kv head, split): consecutive rows of one
// sequence (a prefill chunk) take turns on a split while its K/V rows are in cache, so a chunk of
// 256 rows reads the sequence's cache from memory 16 times, not 256 (each row's arithmetic is the
// same as alone). A row of one split is divided by its softmax sum in place; the others leave
// partials (o, max, sum) that a second pass merges.
static void paged_attend(const PagedKV& kv, int64_t layer, const float* qkv, int64_t row_stride, int64_t nh,
                         float* out, float scale) {
  const int64_t hd = kv.hd, nkv = kv.n_kv, group = nh / nkv, layer_offset = layer * kv.layer_stride;
  const float *k = qkv + nh * hd, *v = qkv + (nh + nkv) * hd;
  for (int64_t b = 0; b < kv.B; ++b) {
    const int64_t p = kv.lengths[b] - 1;
    const int64_t blk = kv.tables[b * kv.max_blocks + p / kv.bs] * kv.block_stride + layer_offset;
    for (int64_t j = 0; j < nkv; ++j) {  // K transposed in its block, V a row (qk_types.h kv_k_at)
      write_k_row(kv.k_pool + blk + j * kv.head_stride, kv.bs, p % kv.bs, k + b * row_stride + j * hd, hd, kv.kv_type);
      write_row(kv.v_pool + blk + j * kv.head_stride + (p % kv.bs) * kv.rb, v + b * row_stride + j * hd, hd, kv.kv_type);
    }
  }
  struct Row {
    int64_t ns;    // its splits
    int64_t part;  // where its partials start (floats into parts), -1: one split, straight into out
  };
  // rows b0..b1-1 (consecutive rows of one sequence with one start: a prefill chunk) x kv head x
  // split s: the rows take turns on the same K/V split while it is in cache (a query tile)
  struct Item {
    int64_t b0, b1, kvh, s;
  };
  struct Ctx {
    const PagedKV* kv;
    const float* q;
    int64_t row_stride, nh, group, layer_offset, split, part_floats;
    float* out;
    float scale;
    AttendPartFn attend;
    AttendTileFn tile;
    const Item* items;
    const Row* rows;
    float* parts;
  } c{&kv,  qkv,   row_stride, nh, group, layer_offset, 0, group * (hd + 2), out, scale, attend_for(hd, kv.bs, kv.kv_type),
      group <= 64 ? attend_tile_for(hd, kv.bs, kv.kv_type) : nullptr, nullptr, nullptr, nullptr};
  // one split's partials: o [group, hd], then (max, sum) for each of the group's heads
  const int64_t part_floats = c.part_floats;
  c.split = ATT_SPLIT / kv.bs > 0 ? ATT_SPLIT / kv.bs * kv.bs : kv.bs;
  const int64_t split = c.split;
  // a tile's scores and fp32 panels (one row alone needs group * split)
  const int64_t scratch_need = att_tile_scratch(ATT_QROWS, group, split, hd, kv.bs);
  if (scratch_need > pool::scratch_floats()) pool::reserve_scratch(scratch_need);
  std::vector<Row> rows(kv.B);
  std::vector<Item> items;
  std::vector<float> parts;
  for (int64_t b0 = 0; b0 < kv.B;) {  // a wave of rows whose partials fit ATT_WAVE_FLOATS
    int64_t n_parts = 0, b1 = b0;
    for (; b1 < kv.B; ++b1) {
      const int64_t ns = (kv.lengths[b1] - kv.starts[b1] + split - 1) / split;
      const int64_t need = ns > 1 ? ns * nkv * part_floats : 0;
      if (b1 > b0 && n_parts + need > ATT_WAVE_FLOATS) break;
      rows[b1] = {ns, ns > 1 ? n_parts : -1};
      n_parts += need;
    }
    items.clear();
    for (int64_t g0 = b0; g0 < b1;) {  // query tiles: up to ATT_QROWS rows sharing a table and a start
      int64_t g1 = g0 + 1, max_ns = rows[g0].ns;
      while (g1 < b1 && g1 - g0 < ATT_QROWS && kv.starts[g1] == kv.starts[g0] &&
             memcmp(kv.tables + g1 * kv.max_blocks, kv.tables + g0 * kv.max_blocks, kv.max_blocks * sizeof(int64_t)) == 0) {
        max_ns = rows[g1].ns > max_ns ? rows[g1].ns : max_ns;
        ++g1;
      }
      for (int64_t j = 0; j < nkv; ++j)
        for (int64_t s = 0; s < max_ns; ++s) items.push_back({g0, g1, j, s});
      g0 = g1;
    }
    parts.resize(n_parts);
    c.items = items.data();
    c.rows = rows.data();
    c.parts = parts.data();
    {  // the items; the pool is released before the merge takes it again
      pool::Use use;
      use.run(
        [](void* p, int64_t i, float* scores) {
          const Ctx& x = *(const Ctx*)p;
          const PagedKV& kv = *x.kv;
          const Item& it = x.items[i];
          const int64_t* table = kv.tables + it.b0 * kv.max_blocks;
          const int64_t p0 = kv.starts[it.b0] + it.s * x.split, hd = kv.hd, h0 = it.kvh * x.group;
          int64_t p_end = p0;  // the furthest position any of the tile's rows reads in this split
          for (int64_t r = it.b0; r < it.b1; ++r) {
            const int64_t p1 = p0 + x.split < kv.lengths[r] ? p0 + x.split : kv.lengths[r];
            p_end = p1 > p_end ? p1 : p_end;
          }
          const int64_t j0 = p0 / kv.bs, j1 = (p_end + kv.bs - 1) / kv.bs;
          const void* kb[ATT_MAX_BLOCKS];
          const void* vb[ATT_MAX_BLOCKS];
          const int64_t head_off = x.layer_offset + it.kvh * kv.head_stride;
          for (int64_t j = j0; j < j1; ++j) {
            kb[j - j0] = kv.k_pool + table[j] * kv.block_stride + head_off;
            vb[j - j0] = kv.v_pool + table[j] * kv.block_stride + head_off;
          }
          // the tile's rows with positions in this split, at once: a prefill chunk's rows come in
          // position order, so those with none (the shorter ones) come first; otherwise one at a time
          int64_t ra = it.b0;
          while (ra < it.b1 && it.s >= x.rows[ra].ns) ++ra;
          bool tiled = x.tile != nullptr && it.b1 - ra > 1;
          for (int64_t r = ra; tiled && r < it.b1; ++r) tiled = it.s < x.rows[r].ns;
          if (tiled) {
            const int64_t R = it.b1 - ra;
            int64_t p1s[ATT_QROWS];
            float* os[ATT_QROWS];
            float* mls[ATT_QROWS];
            float mlb[ATT_QROWS][2 * 64];
            for (int64_t r = ra; r < it.b1; ++r) {
              const Row& row = x.rows[r];
              p1s[r - ra] = (p0 + x.split < kv.lengths[r] ? p0 + x.split : kv.lengths[r]) - j0 * kv.bs;
              os[r - ra] = row.part < 0 ? x.out + (r * x.nh + h0) * hd
                                        : x.parts + row.part + (it.kvh * row.ns + it.s) * x.part_floats;
              mls[r - ra] = row.part < 0 ? mlb[r - ra] : os[r - ra] + x.group * hd;
            }
            x.tile(x.q + ra * x.row_stride + h0 * hd, x.row_stride, R, p1s, os, mls, kb, vb, kv.bs, p0 - j0 * kv.bs,
                     x.group, hd, x.scale, scores);
            for (int64_t r = ra; r < it.b1; ++r) {
              if (x.rows[r].part >= 0) continue;
              for (int64_t h = 0; h < x.group; ++h) {  // the row's only split: divided by its sum
                const float inv = 1.f / mlb[r - ra][2 * h + 1];
                for (int64_t d = 0; d < hd; ++d) os[r - ra][h * hd + d] *= inv;
              }
            }
            return;
          }
          for (int64_t r = it.b0; r < it.b1; ++r) {
            const Row& row = x.rows[r];
            if (it.s >= row.ns) continue;  // a shorter row of the tile: no positions in this split
            const int64_t p1 = p0 + x.split < kv.lengths[r] ? p0 + x.split : kv.lengths[r];
            const float* q = x.q + r * x.row_stride + h0 * hd;
            if (row.part < 0) {  // the row's only split: straight into out, divided by the sum
              float* o = x.out + (r * x.nh + h0) * hd;
              float ml[2 * 64];
              for (int64_t g0 = 0; g0 < x.group; g0 += 64) {  // heads in groups of at most 64 (ml's size)
                const int64_t hn = x.group - g0 < 64 ? x.group - g0 : 64;
                x.attend(q + g0 * hd, o + g0 * hd, ml, kb, vb, kv.bs, p0 - j0 * kv.bs, p1 - j0 * kv.bs, hn, hd, x.scale,
                         scores);
                for (int64_t h = 0; h < hn; ++h) {
                  const float inv = 1.f / ml[2 * h + 1];
                  for (int64_t d = 0; d < hd; ++d) o[(g0 + h) * hd + d] *= inv;
                }
              }
            } else {
              float* o = x.parts + row.part + (it.kvh * row.ns + it.s) * x.part_floats;
              x.attend(q, o, o + x.group * hd, kb, vb, kv.bs, p0 - j0 * kv.bs, p1 - j0 * kv.bs, x.group, hd, x.scale,
                       scores);
            }
          }
        },
        &c, (int64_t)items.size(), scratch_need);
    }
    if (n_parts) {  // merge each split row's partials: out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s
      struct Merge {
        const Ctx* c;
        int64_t b0;
      } m{&c, b0};
      pool::parallel_for(
          [](void* p, int64_t i) {
            const Merge& m = *(const Merge*)p;
            const Ctx& x = *m.c;
            const int64_t nkv = x.kv->n_kv, r = m.b0 + i / nkv, kvh = i % nkv, hd = x.kv->hd;
            const Row& row = x.rows[r];
            if (row.part < 0) return;
            const float* first = x.parts + row.part + kvh * row.ns * x.part_floats;
            for (int64_t h = 0; h < x.group; ++h) {
              float M = -INFINITY;
              for (int64_t s = 0; s < row.ns; ++s) {
                const float ms = first[s * x.part_floats + x.group * hd + 2 * h];
                M = ms > M ? ms : M;
              }
              float* o = x.out + (r * x.nh + kvh * x.group + h) * hd;
              for (int64_t d = 0; d < hd; ++d) o[d] = 0.f;
              float den = 0.f;
              for (int64_t s = 0; s < row.ns; ++s) {
                const float* part = first + s * x.part_floats;
                const float w = __builtin_expf(part[x.group * hd + 2 * h] - M);
                den += w * part[x.group * hd + 2 * h + 1];
                for (int64_t d = 0; d < hd; ++d) o[d] += w * part[h * hd + d];
              }
              const float inv = 1.f / den;
              for (int64_t d = 0; d < hd; ++d) o[d] *= inv;
            }
          },
          &m, (b1 - b0) * nkv);
    }
    b0 = b1;
  }
}

typedef struct {
  PyObject_HEAD
  PagedKV kv;
  Py_buffer views[5];  // k_pool, v_pool, tables, lengths, starts: held while the object lives
  int n_views;
} PagedKVObject;

// A C-contiguous buffer of `ndim` dimensions of fp32 (itemsize 4, format "f") or int64 (8, "l"/"q").
static bool get_view(PyObject* obj, Py_buffer* view, int ndim, bool fp32, bool writable, const char* name) {
  if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) != 0)
    return false;
  const char f = view->format ? view->format[view->format[0] == '<' || view->format[0] == '=' ? 1 : 0] : 'B';
  const bool ok = fp32 ? (view->itemsize == 4 && f == 'f') : (view->itemsize == 8 && (f == 'l' || f == 'q'));
  if (view->ndim != ndim || !ok) {
    PyErr_Format(PyExc_ValueError, "%s must be a C-contiguous %s array of %d dimensions", name,
                 fp32 ? "float32" : "int64", ndim);
    PyBuffer_Release(view);
    return false;
  }
  return true;
}

static void PagedKV_dealloc(PagedKVObject* self) {
  for (int i = 0; i < self->n_views; ++i) PyBuffer_Release(&self->views[i]);
  Py_TYPE(self)->tp_free((PyObject*)self);
}

// PagedKV(k_pool, v_pool, tables, lengths, starts, kv_type=0): the arrays themselves (see struct
// PagedKV); the pools are float32 for KV_F32, 16-bit (uint16 / float16 views) for KV_F16 and KV_BF16,
// uint8 for KV_Q8_0 (rows of whole blocks: the last dimension a multiple of 34 bytes).
static int PagedKV_init(PagedKVObject* self, PyObject* args, PyObject*) {
  PyObject *k, *v, *tables, *lengths, *starts;
  int kv_type = KV_F32;
  if (!PyArg_ParseTuple(args, "OOOOO|i", &k, &v, &tables, &lengths, &starts, &kv_type)) return -1;
  for (int i = 0; i < self->n_views; ++i) PyBuffer_Release(&self->views[i]);
  self->n_views = 0;
  if (kv_type != KV_F32 && kv_type != KV_F16 && kv_type != KV_BF16 && kv_type != KV_Q8_0) {
    PyErr_Format(PyExc_ValueError, "kv_type %d is not one of 0 (f32), 1 (f16), 2 (bf16), 3 (q8_0)", kv_type);
    return -1;
  }
  const int esz = kv_type == KV_F32 ? 4 : kv_type == KV_Q8_0 ? 1 : 2;  // bytes per array item
  for (int i = 0; i < 2; ++i) {  // the pools: written to, of the KV type's element size
    Py_buffer* view = &self->views[i];
    if (PyObject_GetBuffer(i ? v : k, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) != 0) return -1;
    self->n_views = i + 1;
    const char f = view->format ? view->format[view->format[0] == '<' || view->format[0] == '=' ? 1 : 0] : 'B';
    const bool ok = esz == 4 ? (view->itemsize == 4 && f == 'f')
                    : esz == 2 ? (view->itemsize == 2 && (f == 'H' || f == 'e'))
                               : (view->itemsize == 1 && f == 'B');
    if (view->ndim != 5 || !ok) {
      PyErr_Format(PyExc_ValueError, "%s must be a C-contiguous %s array of 5 dimensions", i ? "v_pool" : "k_pool",
                   esz == 4 ? "float32" : esz == 2 ? "16-bit (uint16 or float16)" : "uint8");
      return -1;
    }
  }
  const struct {
    PyObject* obj;
    const char* name;
  } arrays[3] = {{tables, "tables"}, {lengths, "lengths"}, {starts, "starts"}};
  for (int i = 0; i < 3; ++i) {
    if (!get_view(arrays[i].obj, &self->views[2 + i], i == 0 ? 2 : 1, false, false, arrays[i].name)) return -1;
    self->n_views = 3 + i;
  }
  const Py_buffer* w = self->views;
  const Py_ssize_t* sh = w[0].shape;  // [n_blocks, layers, n_kv, bs, row]
  const int64_t B = w[2].shape[0], max_blocks = w[2].shape[1];
  if (memcmp(sh, w[1].shape, 5 * sizeof(Py_ssize_t)) != 0 || w[3].shape[0] != B || w[4].shape[0] != B ||
      sh[2] <= 0 || sh[3] <= 0 || sh[3] > ATT_SPLIT || sh[4] <= 0) {
    PyErr_SetString(PyExc_ValueError, "k and v pools, tables, lengths and starts do not agree in shape");
    return -1;
  }
  const int64_t rb = sh[4] * esz;  // bytes of a cached row
  const int64_t hd = kv_type == KV_Q8_0 ? rb / Q8_BLOCK_BYTES * 32 : sh[4];
  if (kv_row_bytes(kv_type, hd) != rb) {
    PyErr_Format(PyExc_ValueError, "a q8_0 pool's rows are whole blocks of %d bytes, got %lld", (int)Q8_BLOCK_BYTES,
                 (long long)rb);
    return -1;
  }
  PagedKV& kv = self->kv;
  kv = {(uint8_t*)w[0].buf, (uint8_t*)w[1].buf, kv_type, sh[1], sh[2], sh[3], hd, rb,
        sh[1] * sh[2] * sh[3] * rb, sh[2] * sh[3] * rb, sh[3] * rb, (const int64_t*)w[2].buf,
        (const int64_t*)w[3].buf, (const int64_t*)w[4].buf, max_blocks, B};
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = kv.lengths[b], s0 = kv.starts[b];
    if (L <= 0 || L > max_blocks * kv.bs || s0 < 0 || s0 >= L) {
      PyErr_Format(PyExc_ValueError, "sequence %lld: length %lld / start %lld do not fit %lld blocks of %lld",
                   (long long)b, (long long)L, (long long)s0, (long long)max_blocks, (long long)kv.bs);
      return -1;
    }
  }
  return 0;
}

// attend(layer, qkv_ptr, row_stride, n_heads, out_ptr, scale): paged_attend on this step's cache.
static PyObject* PagedKV_attend(PagedKVObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 6) {
    PyErr_SetString(PyExc_TypeError, "attend(layer, qkv_ptr, row_stride, n_heads, out_ptr, scale)");
    return nullptr;
  }
  const long long layer = PyLong_AsLongLong(args[0]);
  const float* qkv = (const float*)PyLong_AsUnsignedLongLong(args[1]);
  const long long row_stride = PyLong_AsLongLong(args[2]), nh = PyLong_AsLongLong(args[3]);
  float* out = (float*)PyLong_AsUnsignedLongLong(args[4]);
  const float scale = (float)PyFloat_AsDouble(args[5]);
  if (PyErr_Occurred()) return nullptr;
  const PagedKV& kv = self->kv;
  if (self->n_views != 5) {
    PyErr_SetString(PyExc_ValueError, "PagedKV was not initialized");
    return nullptr;
  }
  if (nh <= 0 || nh % kv.n_kv) {
    PyErr_Format(PyExc_ValueError, "%lld query heads do not group over %lld kv heads", nh, (long long)kv.n_kv);
    return nullptr;
  }
  if (layer < 0 || layer >= kv.n_layers || row_stride != (nh + 2 * kv.n_kv) * kv.hd) {
    PyErr_Format(PyExc_ValueError, "layer %lld / row stride %lld do not match the pool", layer, row_stride);
    return nullptr;
  }
  Py_BEGIN_ALLOW_THREADS
  paged_attend(kv, layer, qkv, row_stride, nh, out, scale);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyMethodDef PagedKV_methods[] = {
    {"attend", (PyCFunction)(void (*)(void))PagedKV_attend, METH_FASTCALL,
     "attend(layer, qkv_ptr, row_stride, n_heads, out_ptr, scale): write every row's k/v, then attend"},
    {nullptr, nullptr, 0, nullptr}};
static PyType_Slot PagedKV_slots[] = {
    {Py_tp_init, (void*)PagedKV_init},
    {Py_tp_dealloc, (void*)PagedKV_dealloc},
    {Py_tp_methods, (void*)PagedKV_methods},
    {Py_tp_new, (void*)PyType_GenericNew},
    {Py_tp_doc, (void*)"PagedKV(k_pool, v_pool, tables, lengths, starts, kv_type=0): one step's paged KV cache."},
    {0, nullptr}};
static PyType_Spec PagedKV_spec = {"pipeserve.kernels._qk.PagedKV", sizeof(PagedKVObject), 0, Py_TPFLAGS_DEFAULT,
                                   PagedKV_slots};

// addr(buffer): the address of a C-contiguous buffer (a numpy array): what the kernels take as
// x_ptr etc. (numpy's own `.ctypes.data` costs ~5 us a call; this ~0.1 us).
static PyObject* py_addr(PyObject*, PyObject* obj) {
  Py_buffer view;
  if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS) != 0) return nullptr;
  void* p = view.buf;
  PyBuffer_Release(&view);
  return PyLong_FromVoidPtr(p);
}

// gelu(x_ptr, y_ptr, T, I, x_stride, up_ptr, up_stride, approximate): y[T, I] = gelu(x) (* up when
// up_ptr is not 0); x rows x_stride floats apart, up rows up_stride apart (a fused gate|up: x =
// gu, up = gu + I, both strides 2I). approximate 0: x/2 (1 + erf(x/sqrt 2)); 1: the tanh form
// x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as torch's gelu(approximate="tanh"), in vectors
// on the SIMD paths (gelu_tanh_row_v: x sigmoid(2u), the same number); the erf form is scalar libm
// (erff, exact to float rounding: only checkpoints with hidden_act=gelu use it). Rows split over
// the pool.
static PyObject* py_gelu(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 8) {
    PyErr_SetString(PyExc_TypeError, "gelu(x_ptr, y_ptr, T, I, x_stride, up_ptr, up_stride, approximate)");
    return nullptr;
  }
  struct Ctx {
    const float *x, *up;
    float* y;
    int64_t T, I, xs, us;
    int approx;
    GeluRowFn tanh_row;
  } c;
  c.x = (const float*)PyLong_AsUnsignedLongLong(args[0]);
  c.y = (float*)PyLong_AsUnsignedLongLong(args[1]);
  c.T = PyLong_AsLongLong(args[2]);
  c.I = PyLong_AsLongLong(args[3]);
  c.xs = PyLong_AsLongLong(args[4]);
  c.up = (const float*)PyLong_AsUnsignedLongLong(args[5]);
  c.us = PyLong_AsLongLong(args[6]);
  c.approx = (int)PyLong_AsLong(args[7]);
  c.tanh_row = gelu_tanh_for();
  if (PyErr_Occurred()) return nullptr;
  Py_BEGIN_ALLOW_THREADS
  pool::parallel_for(
      [](void* p, int64_t t) {
        const Ctx& c = *(const Ctx*)p;
        const float* x = c.x + t * c.xs;
        const float* up = c.up ? c.up + t * c.us : nullptr;
        float* y = c.y + t * c.I;
        if (c.approx) {
          c.tanh_row(x, up, y, c.I);
          return;
        }
        const float inv_sqrt2 = 0.7071067811865476f;
        for (int64_t i = 0; i < c.I; ++i) {
          const float g = 0.5f * x[i] * (1.0f + erff(x[i] * inv_sqrt2));
          y[i] = up ? g * up[i] : g;
        }
      },
      &c, c.T);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// rope(x, T, row_stride, n_heads, hd, pos, cos, sin): rotate-half RoPE in place (qk_generic.cpp).
static PyObject* py_rope(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 8) {
    PyErr_SetString(PyExc_TypeError, "rope(x, T, row_stride, n_heads, hd, pos, cos, sin)");
    return nullptr;
  }
  float* x = (float*)PyLong_AsUnsignedLongLong(args[0]);
  long long T = PyLong_AsLongLong(args[1]), stride = PyLong_AsLongLong(args[2]), nh = PyLong_AsLongLong(args[3]),
            hd = PyLong_AsLongLong(args[4]);
  const int64_t* pos = (const int64_t*)PyLong_AsUnsignedLongLong(args[5]);
  const float* c = (const float*)PyLong_AsUnsignedLongLong(args[6]);
  const float* sn = (const float*)PyLong_AsUnsignedLongLong(args[7]);
  if (PyErr_Occurred()) return nullptr;
  generic::rope(x, T, stride, nh, hd, pos, c, sn);
  Py_RETURN_NONE;
}

// probe(kind, n) -> (seconds, units): the roofline probes on every thread of the pool at once
// (scripts/bench_engine.py). kind "read": each thread sums its share of an n-byte buffer
// (allocated and written first), 3 passes, the fastest counted: units = bytes read. kind "fma":
// each thread runs n iterations of 12 FMA chains of the selected ISA's width: units = flops.
static PyObject* py_probe(PyObject*, PyObject* args) {
  const char* kind;
  long long n;
  if (!PyArg_ParseTuple(args, "sL", &kind, &n)) return nullptr;
  const std::string k(kind);
  if ((k != "read" && k != "fma") || n <= 0 || g_isa == ISA_GENERIC) {
    PyErr_Format(PyExc_ValueError, "probe(kind, n): kind read or fma, n > 0, on a SIMD path (got %s, %lld, %s)", kind, n,
                 ISA_NAMES[g_isa]);
    return nullptr;
  }
#if defined(__x86_64__) || defined(__i386__)
  const bool wide = g_isa == ISA_AVX512;
  struct Ctx {
    const float* p;
    int64_t per;  // floats (read) or iterations (fma) per thread
    ProbeReadFn rd;
    ProbeFmaFn fm;
    float sink[256];
  } c{};
  c.rd = wide ? avx512::get_probe_read() : avx2::get_probe_read();
  c.fm = wide ? avx512::get_probe_fma() : avx2::get_probe_fma();
  const int lanes = wide ? 16 : 8;
  double best = 1e30, units = 0;
  std::vector<float> buf;
  Py_BEGIN_ALLOW_THREADS
  pool::Use use;
  const int nt = use.threads();
  if (k == "read") {
    const int64_t floats = n / 4 / (nt * 4 * lanes) * (nt * 4 * lanes);
    buf.assign(floats, 1.f);
    c.p = buf.data();
    c.per = floats / nt;
    units = 4.0 * floats;
  } else {
    c.per = n;
    units = 2.0 * 12 * lanes * n * nt;
  }
  for (int pass = 0; pass < 3; ++pass) {
    const auto t0 = std::chrono::steady_clock::now();
    use.run(
        [](void* p, int64_t i, float*) {
          Ctx& x = *(Ctx*)p;
          x.sink[i % 256] = x.p ? x.rd(x.p + i * x.per, x.per) : x.fm(x.per);
        },
        &c, nt, 0);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = dt < best ? dt : best;
  }
  Py_END_ALLOW_THREADS
  return Py_BuildValue("(dd)", best, units);
#else
  PyErr_SetString(PyExc_ValueError, "probe needs an x86-64 SIMD path");
  return nullptr;
#endif
}

static PyObject* py_int8_path(PyObject*, PyObject*) { return PyUnicode_FromString(q8::path_name(g_isa)); }
static PyObject* py_set_int8_vnni(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  q8::set_vnni(on);
  Py_RETURN_NONE;
}

// The switches tests and benchmarks flip: flag = the truth of arg (a bool or an atomic one).
template <class Flag>
static PyObject* set_flag(PyObject* arg, Flag& flag) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  flag = on != 0;
  Py_RETURN_NONE;
}
static PyObject* py_set_attention_tiles(PyObject*, PyObject* arg) { return set_flag(arg, g_att_tiles); }
static PyObject* py_set_attention_lookahead(PyObject*, PyObject* arg) { return set_flag(arg, g_att_far); }
static PyObject* py_set_tail_rows(PyObject*, PyObject* arg) { return set_flag(arg, g_tail_rows); }
static PyObject* py_set_batch_invariant(PyObject*, PyObject* arg) { return set_flag(arg, g_batch_invariant); }
static PyObject* py_get_batch_invariant(PyObject*, PyObject*) { return PyBool_FromLong(g_batch_invariant); }
static PyObject* py_set_pool_wait_all(PyObject*, PyObject* arg) { return set_flag(arg, pool::g_wait_all_workers); }

static PyObject* py_block_info(PyObject*, PyObject* arg) {
  long t = PyLong_AsLong(arg);
  if (PyErr_Occurred()) return nullptr;
  BlockInfo bi = block_info((int)t);
  return Py_BuildValue("(ii)", bi.elems, bi.bytes);
}

static PyMethodDef module_methods[] = {
    {"set_isa", py_set_isa, METH_O, "set_isa(name): force the generic, avx2 or avx512 kernels"},
    {"get_isa", py_get_isa, METH_NOARGS, "the kernels in use"},
    {"matmul_isa", py_matmul_isa, METH_O, "matmul_isa(T): the path a matmul of T activation rows runs on"},
    {"supported_isas", py_supported, METH_NOARGS, "kernel paths this CPU can run, lowest first"},
    {"set_threads", py_set_threads, METH_O, "set_threads(n): size of the kernel thread pool"},
    {"get_threads", py_get_threads, METH_NOARGS, "size of the kernel thread pool"},
    {"pool_check", py_pool_check, METH_VARARGS,
     "pool_check(calls, max_items, late_worker_us) -> (errors, slowest call's seconds) (tests)"},
    {"dequant_rows", py_dequant_rows, METH_VARARGS, "dequant_rows(ptr, type, row_bytes, K, ids_ptr, n, out_ptr)"},
    {"rms_norm", (PyCFunction)(void (*)(void))py_rms_norm, METH_FASTCALL, "rms_norm(x, w, y, T, C, eps, w_offset)"},
    {"silu_mul", (PyCFunction)(void (*)(void))py_silu_mul, METH_FASTCALL, "silu_mul(gu, y, T, I)"},
    {"rope", (PyCFunction)(void (*)(void))py_rope, METH_FASTCALL, "rope(x, T, row_stride, n_heads, hd, pos, cos, sin)"},
    {"addr", py_addr, METH_O, "addr(buffer) -> the address of a C-contiguous buffer"},
    {"gelu", (PyCFunction)(void (*)(void))py_gelu, METH_FASTCALL,
     "gelu(x, y, T, I, x_stride, up, up_stride, approximate): y = gelu(x) (* up)"},
    {"probe", py_probe, METH_VARARGS, "probe(kind, n) -> (seconds, units): read bandwidth or FMA peak on the pool"},
    {"int8_path", py_int8_path, METH_NOARGS, "the kernels a lossy Plan runs on now (qk_q8.h)"},
    {"set_int8_vnni", py_set_int8_vnni, METH_O, "set_int8_vnni(False): the int8 kernels without VNNI (tests)"},
    {"set_attention_lookahead", py_set_attention_lookahead, METH_O,
     "set_attention_lookahead(False): decode attention fetches 4 KiB ahead into L1 (the look-ahead before; benchmarks)"},
    {"set_attention_tiles", py_set_attention_tiles, METH_O,
     "set_attention_tiles(False): prefill rows attend one at a time (the tiles' bits are the same; tests)"},
    {"set_batch_invariant", py_set_batch_invariant, METH_O,
     "set_batch_invariant(True): every exact matmul row gets the bits it gets alone, in any batch (slower prefill)"},
    {"get_batch_invariant", py_get_batch_invariant, METH_NOARGS, "whether set_batch_invariant(True) is in effect"},
    {"set_tail_rows", py_set_tail_rows, METH_O,
     "set_tail_rows(False): a batched matmul's rows past its last whole chunk run as a chunk (benchmarks)"},
    {"set_pool_wait_all", py_set_pool_wait_all, METH_O,
     "set_pool_wait_all(True): a pool call also waits for every worker to check in (the pool before; benchmarks)"},
    {"block_info", py_block_info, METH_O, "block_info(type) -> (elements, bytes) per block; (0, 0) if unknown"},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_qk", "GGUF block kernels (see kernels/__init__.py)", -1, module_methods,
    nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__qk(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (!m) return nullptr;
  PyObject* plan = PyType_FromSpec(&Plan_spec);
  if (!plan || PyModule_AddObject(m, "Plan", plan) < 0) return nullptr;
  PyObject* paged = PyType_FromSpec(&PagedKV_spec);
  if (!paged || PyModule_AddObject(m, "PagedKV", paged) < 0) return nullptr;
  g_isa = cpu_has(ISA_AVX512) ? ISA_AVX512 : cpu_has(ISA_AVX2) ? ISA_AVX2 : ISA_GENERIC;
  if (pool::size() == 0) pool::resize(1);
  return m;
}
