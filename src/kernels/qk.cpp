// pipeserve.kernels._qk: matrix x (small) matrix products on GGUF-quantized weights, fp32
// activations. The Python side (kernels/__init__.py) owns the weight bytes and builds one `Plan`
// per linear layer (several row segments, possibly of different types, e.g. fused q|k|v); a call
// runs the plan on x [T, K] into y [T, N] on the process's thread pool. The SIMD path is chosen
// at import from the CPU (avx512 > avx2 > generic) and can be forced with set_isa() for tests.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <thread>
#include <vector>

#include "qk_q8.h"
#include "qk_types.h"

namespace qk {
namespace avx2 { RowsFn get(int type); AttendFn get_attend(); SiluFn get_silu(); GeluRowFn get_gelu_tanh();
                 ProbeReadFn get_probe_read(); ProbeFmaFn get_probe_fma(); }
namespace avx512 { RowsFn get(int type); AttendFn get_attend(); SiluFn get_silu(); GeluRowFn get_gelu_tanh();
                   ProbeReadFn get_probe_read(); ProbeFmaFn get_probe_fma(); }
namespace generic {
RowsFn get(int type);
void dequant_rows(int type, const uint8_t* w, int64_t row_bytes, int64_t K, const int64_t* ids, int64_t n, float* out);
void rms_norm(const float* x, const float* w, float* y, int64_t T, int64_t C, float eps, float w_offset);
void silu_mul(const float* gu, float* y, int64_t T, int64_t I);
void gelu_tanh_row(const float* x, const float* up, float* y, int64_t I);
void rope(float* x, int64_t T, int64_t row_stride, int64_t n_heads, int64_t hd, const int64_t* pos, const float* cos_t,
          const float* sin_t);
void attend_decode(const float* q, float* out, const float* const* Kb, const float* const* Vb, int64_t bs,
                   int64_t head_stride, int64_t start, int64_t L, int64_t nh, int64_t nkv, int64_t hd, float scale,
                   float* scores);
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

// The path a matmul of T activation rows runs on: the selected one, except that the AVX-512
// selection runs 5..8 rows on the 8-lane AVX2 code, where 16-lane chunks of activations would be
// half empty. Measured on Qwen2.5-Coder-1.5B's ffn_gate (8960 x 1536, Q4_K; Zen 4, 2 threads, the
// two paths in turn): AVX-512 took 1.2 / 1.6 / 1.5 / 1.6x less time at T = 2 / 4 / 16 / 64 and
// about the same at T = 8. (On SmolLM2's small matrices with the older per-group decoding the two
// were equal, and 2..191 rows ran on AVX2.)
static Isa call_isa(int64_t T) {
  return g_isa == ISA_AVX512 && T >= 5 && T <= 8 ? ISA_AVX2 : g_isa;
}

static AttendFn attend_for(int64_t hd) {
#if defined(__x86_64__) || defined(__i386__)
  if (g_isa == ISA_AVX512 && hd % 16 == 0) return avx512::get_attend();
  if (g_isa >= ISA_AVX2 && hd % 8 == 0) return avx2::get_attend();
#endif
  (void)hd;
  return generic::attend_decode;
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

// ---------------------------------------------------------------- thread pool
// Workers spin briefly after each task (calls come every few microseconds inside a forward) and
// then sleep on a condition variable, so an idle node or one waiting on the network costs no CPU.
struct Task {
  std::vector<Job>* jobs = nullptr;
  Isa isa = ISA_GENERIC;  // the path these jobs run on (Plan_run: call_isa)
  const std::vector<int64_t>* items = nullptr;  // triples (job index, r0, r1)
  // or, instead of jobs: fn(ctx, i) for i in [0, n_items) (attention, elementwise ops)
  void (*fn)(void* ctx, int64_t i) = nullptr;
  void* ctx = nullptr;
  int64_t n_items = 0;
  std::atomic<int64_t> next{0};
};

class Pool {
 public:
  explicit Pool(int n) : n_(n < 1 ? 1 : n) {
    for (int i = 1; i < n_; ++i) workers_.emplace_back([this, i] { loop(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_ = true;
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return n_; }
  std::mutex& busy() { return busy_; }
  float* scratch(int tid, int64_t floats) {
    if ((int64_t)scratch_[tid].size() < floats) scratch_[tid].resize(floats);
    return scratch_[tid].data();
  }
  void prepare(int64_t floats) {  // scratch for every thread, allocated before workers start
    scratch_.resize(n_);
    for (int i = 0; i < n_; ++i) scratch(i, floats);
  }
  void run(Task* task, int n_threads) {
    if (n_threads > n_) n_threads = n_;
    active_ = n_threads;
    if (n_threads > 1) {
      task_ = task;
      done_.store(0);
      gen_.fetch_add(1, std::memory_order_seq_cst);
      if (sleeping_.load(std::memory_order_seq_cst) > 0) {
        std::lock_guard<std::mutex> lk(m_);
        cv_.notify_all();
      }
    }
    work(task, 0);
    if (n_threads > 1)
      while (done_.load(std::memory_order_acquire) < n_ - 1) cpu_relax();
  }

 private:
  static inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
  void work(Task* t, int tid) {
    if (tid >= active_) return;
    if (t->fn) {
      for (;;) {
        const int64_t i = t->next.fetch_add(1, std::memory_order_relaxed);
        if (i >= t->n_items) return;
        t->fn(t->ctx, i);
      }
    }
    const int64_t n_items = (int64_t)t->items->size() / 3;
    for (;;) {
      const int64_t i = t->next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n_items) break;
      const int64_t* it = t->items->data() + 3 * i;
      Job jb = (*t->jobs)[it[0]];
      jb.scratch = scratch_[tid].data();
      rows_for(jb.type, t->isa)(jb, it[1], it[2]);
    }
  }
  void loop(int tid) {
    uint64_t seen = 0;  // gen_ starts at 0; reading it here could miss a task posted before we ran
    for (;;) {
      auto t0 = std::chrono::steady_clock::now();
      int spins = 0;
      while (gen_.load(std::memory_order_acquire) == seen) {
        cpu_relax();
        if (++spins % 256 == 0 && std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(100)) {
          std::unique_lock<std::mutex> lk(m_);
          sleeping_.fetch_add(1);
          cv_.wait(lk, [&] { return gen_.load() != seen; });
          sleeping_.fetch_sub(1);
        }
      }
      seen = gen_.load();
      if (stop_) return;
      work(task_, tid);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  int n_;
  std::vector<std::thread> workers_;
  std::vector<std::vector<float>> scratch_;
  std::mutex m_, busy_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> done_{0}, sleeping_{0};
  Task* task_ = nullptr;
  int active_ = 1;
  bool stop_ = false;
};

static Pool* g_pool = nullptr;
static int64_t g_scratch_floats = 1 << 17;
// Calls using the pool hold this shared (an uncontended atomic); set_threads holds it exclusively,
// without the GIL, so a resize waits for calls in flight and never races a caller that has read g_pool.
static std::shared_mutex g_pool_rw;

static void set_pool(int n) {
  delete g_pool;
  g_pool = new Pool(n);
  g_pool->prepare(g_scratch_floats);
}

// Runs fn(ctx, i) for i in [0, n) on the pool (inline when another thread holds it, or n == 1).
static void parallel_for(void (*fn)(void*, int64_t), void* ctx, int64_t n) {
  std::shared_lock<std::shared_mutex> use(g_pool_rw);
  std::unique_lock<std::mutex> lk(g_pool->busy(), std::try_to_lock);
  if (!lk.owns_lock() || n < 2 || g_pool->size() == 1) {
    for (int64_t i = 0; i < n; ++i) fn(ctx, i);
    return;
  }
  Task task;
  task.fn = fn;
  task.ctx = ctx;
  task.n_items = n;
  g_pool->run(&task, g_pool->size());
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
    self->int8_ok = self->int8_ok && q8::supports(type, K);
  }
  Py_DECREF(fast);
  if (34 * K > g_scratch_floats) {  // a panel of up to 32 rows [K][32] and one row (qk_simd.h)
    Py_BEGIN_ALLOW_THREADS
    {
      std::unique_lock<std::shared_mutex> change(g_pool_rw);  // the scratch is not in use while it grows
      if (34 * K > g_scratch_floats) {
        g_scratch_floats = 34 * K;
        if (g_pool) g_pool->prepare(g_scratch_floats);
      }
    }
    Py_END_ALLOW_THREADS
  }
  return 0;
}

static void Plan_dealloc(PlanObject* self) {
  delete self->segs;
  Py_TYPE(self)->tp_free((PyObject*)self);
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
    int threads;
    {
      std::shared_lock<std::shared_mutex> use(g_pool_rw);
      threads = g_pool->size();
    }
    q8::run(segs.data(), (int)segs.size(), self->K, x, T, y, self->N, accumulate, g_isa, threads, parallel_for);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
  }
  const int64_t K = self->K, G = K / 32;
  Py_BEGIN_ALLOW_THREADS
  std::vector<float> xsum;
  if (self->needs_xsum && T <= MV_MAX_T) {  // per-group sums of x for the "min" term of Q4_1 / Q5_1 / Q4_K / Q5_K (mv path)
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
  std::vector<Job> jobs;
  std::vector<int64_t> items;
  std::shared_lock<std::shared_mutex> use(g_pool_rw);
  std::unique_lock<std::mutex> lk(g_pool->busy(), std::try_to_lock);
  // Another thread of this process is computing: run this call alone rather than wait.
  const int threads = lk.owns_lock() ? g_pool->size() : 1;
  int64_t col = 0;
  for (const Segment& s : *self->segs) {
    Job jb{s.type, s.w, s.row_bytes, K, x, xsum.empty() ? nullptr : xsum.data(), T, y + col, self->N, nullptr,
           accumulate, xt.empty() ? nullptr : xt.data(), cw};
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
  if (lk.owns_lock()) {
    Task task;
    task.jobs = &jobs;
    task.items = &items;
    task.isa = isa;
    g_pool->run(&task, threads);
  } else {
    std::vector<float> scratch(34 * K);
    for (size_t i = 0; i < items.size(); i += 3) {
      Job jb = jobs[items[i]];
      jb.scratch = scratch.data();
      rows_for(jb.type, isa)(jb, items[i + 1], items[i + 2]);
    }
  }
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
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
  {
    std::unique_lock<std::shared_mutex> change(g_pool_rw);  // no call in flight while the pool changes
    if (n != g_pool->size()) {
      Pool* old = g_pool;
      g_pool = new Pool((int)n);
      g_pool->prepare(g_scratch_floats);
      delete old;
    }
  }
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyObject* py_get_threads(PyObject*, PyObject*) { return PyLong_FromLong(g_pool->size()); }

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
    parallel_for(
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

// attend_decode(q, k, v, row_stride, rows, out, k_pool, v_pool, block_stride, layer_offset, head_stride, bs,
//               tables, max_blocks, lengths, starts, B, nh, nkv, hd, scale):
// B single-token sequences over a paged KV cache. q, k, v: their rows in the batch (q/k/v heads of row
// rows[b], or of row b when rows is 0), `row_stride` floats apart; out [B, nh, hd]. The pools are
// fp32 [n_blocks, ...]: block i of this layer starts at pool + i * block_stride + layer_offset
// (floats), kv head j's bs rows at + j * head_stride. tables: int64 [B, max_blocks] block ids;
// lengths: int64 [B] (the new token is at position lengths[b] - 1; its k/v rows are written
// first); starts: int64 [B] first position attended (0, or the sliding window's start).
static PyObject* py_attend_decode(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 21) {
    PyErr_SetString(PyExc_TypeError, "attend_decode(q, k, v, row_stride, rows, out, k_pool, v_pool, block_stride, "
                                     "layer_offset, head_stride, bs, tables, max_blocks, lengths, starts, B, nh, nkv, hd, scale)");
    return nullptr;
  }
  struct Ctx {
    const float *q, *k, *v;
    int64_t row_stride;
    const int64_t* rows;
    float* out;
    float *k_pool, *v_pool;
    int64_t block_stride, layer_offset, head_stride, bs;
    const int64_t *tables;
    int64_t max_blocks;
    const int64_t *lengths, *starts;
    int64_t B, nh, nkv, hd;
    float scale;
  } c;
  c.q = (const float*)PyLong_AsUnsignedLongLong(args[0]);
  c.k = (const float*)PyLong_AsUnsignedLongLong(args[1]);
  c.v = (const float*)PyLong_AsUnsignedLongLong(args[2]);
  c.row_stride = PyLong_AsLongLong(args[3]);
  c.rows = (const int64_t*)PyLong_AsUnsignedLongLong(args[4]);
  c.out = (float*)PyLong_AsUnsignedLongLong(args[5]);
  c.k_pool = (float*)PyLong_AsUnsignedLongLong(args[6]);
  c.v_pool = (float*)PyLong_AsUnsignedLongLong(args[7]);
  c.block_stride = PyLong_AsLongLong(args[8]);
  c.layer_offset = PyLong_AsLongLong(args[9]);
  c.head_stride = PyLong_AsLongLong(args[10]);
  c.bs = PyLong_AsLongLong(args[11]);
  c.tables = (const int64_t*)PyLong_AsUnsignedLongLong(args[12]);
  c.max_blocks = PyLong_AsLongLong(args[13]);
  c.lengths = (const int64_t*)PyLong_AsUnsignedLongLong(args[14]);
  c.starts = (const int64_t*)PyLong_AsUnsignedLongLong(args[15]);
  c.B = PyLong_AsLongLong(args[16]);
  c.nh = PyLong_AsLongLong(args[17]);
  c.nkv = PyLong_AsLongLong(args[18]);
  c.hd = PyLong_AsLongLong(args[19]);
  c.scale = (float)PyFloat_AsDouble(args[20]);
  if (PyErr_Occurred()) return nullptr;
  if (c.nkv <= 0 || c.nh % c.nkv || c.bs <= 0) {
    PyErr_Format(PyExc_ValueError, "%lld query heads do not group over %lld kv heads (block size %lld)",
                 (long long)c.nh, (long long)c.nkv, (long long)c.bs);
    return nullptr;
  }
  for (int64_t b = 0; b < c.B; ++b) {
    const int64_t L = c.lengths[b], s0 = c.starts[b];
    if (L <= 0 || L > c.max_blocks * c.bs || s0 < 0 || s0 >= L) {
      PyErr_Format(PyExc_ValueError, "sequence %lld: length %lld / start %lld do not fit %lld blocks of %lld",
                   (long long)b, (long long)L, (long long)s0, (long long)c.max_blocks, (long long)c.bs);
      return nullptr;
    }
  }
  Py_BEGIN_ALLOW_THREADS
  // First every row's new k/v goes to position lengths[b] - 1 of its blocks, then the rows attend
  // (in parallel). Written first, rows that share a block table see each other's keys: a prefill
  // chunk of t tokens is t rows over the same table with lengths start+1 .. start+t (causal).
  for (int64_t b = 0; b < c.B; ++b) {
    const int64_t r = c.rows ? c.rows[b] : b, p = c.lengths[b] - 1;
    const int64_t off = c.tables[b * c.max_blocks + p / c.bs] * c.block_stride + c.layer_offset + (p % c.bs) * c.hd;
    for (int64_t j = 0; j < c.nkv; ++j) {
      memcpy(c.k_pool + off + j * c.head_stride, c.k + r * c.row_stride + j * c.hd, c.hd * sizeof(float));
      memcpy(c.v_pool + off + j * c.head_stride, c.v + r * c.row_stride + j * c.hd, c.hd * sizeof(float));
    }
  }
  parallel_for(
      [](void* p, int64_t b) {
        const Ctx& x = *(const Ctx*)p;
        const int64_t r = x.rows ? x.rows[b] : b, L = x.lengths[b], s0 = x.starts[b];
        const int64_t* table = x.tables + b * x.max_blocks;
        const int64_t nblk = (L + x.bs - 1) / x.bs;
        std::vector<const float*> kb(nblk), vb(nblk);
        for (int64_t j = 0; j < nblk; ++j) {
          kb[j] = x.k_pool + table[j] * x.block_stride + x.layer_offset;
          vb[j] = x.v_pool + table[j] * x.block_stride + x.layer_offset;
        }
        std::vector<float> scores(x.nh * (L - s0));
        attend_for(x.hd)(x.q + r * x.row_stride, x.out + b * x.nh * x.hd, kb.data(), vb.data(), x.bs, x.head_stride,
                         s0, L, x.nh, x.nkv, x.hd, x.scale, scores.data());
      },
      &c, c.B);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

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
  parallel_for(
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
  std::shared_lock<std::shared_mutex> use(g_pool_rw);
  const int nt = g_pool->size();
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
    auto body = [](void* p, int64_t i) {
      Ctx& x = *(Ctx*)p;
      x.sink[i % 256] = x.p ? x.rd(x.p + i * x.per, x.per) : x.fm(x.per);
    };
    if (nt == 1) {
      body(&c, 0);
    } else {
      Task task;
      task.fn = body;
      task.ctx = &c;
      task.n_items = nt;
      g_pool->run(&task, nt);
    }
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
    {"dequant_rows", py_dequant_rows, METH_VARARGS, "dequant_rows(ptr, type, row_bytes, K, ids_ptr, n, out_ptr)"},
    {"rms_norm", (PyCFunction)(void (*)(void))py_rms_norm, METH_FASTCALL, "rms_norm(x, w, y, T, C, eps, w_offset)"},
    {"silu_mul", (PyCFunction)(void (*)(void))py_silu_mul, METH_FASTCALL, "silu_mul(gu, y, T, I)"},
    {"attend_decode", (PyCFunction)(void (*)(void))py_attend_decode, METH_FASTCALL,
     "attend_decode(q, k, v, row_stride, rows, out, k_pool, v_pool, block_stride, layer_offset, head_stride, bs, tables, "
     "max_blocks, lengths, starts, B, nh, nkv, hd, scale)"},
    {"rope", (PyCFunction)(void (*)(void))py_rope, METH_FASTCALL, "rope(x, T, row_stride, n_heads, hd, pos, cos, sin)"},
    {"addr", py_addr, METH_O, "addr(buffer) -> the address of a C-contiguous buffer"},
    {"gelu", (PyCFunction)(void (*)(void))py_gelu, METH_FASTCALL,
     "gelu(x, y, T, I, x_stride, up, up_stride, approximate): y = gelu(x) (* up)"},
    {"probe", py_probe, METH_VARARGS, "probe(kind, n) -> (seconds, units): read bandwidth or FMA peak on the pool"},
    {"int8_path", py_int8_path, METH_NOARGS, "the kernels a lossy Plan runs on now (qk_q8.h)"},
    {"set_int8_vnni", py_set_int8_vnni, METH_O, "set_int8_vnni(False): the int8 kernels without VNNI (tests)"},
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
  g_isa = cpu_has(ISA_AVX512) ? ISA_AVX512 : cpu_has(ISA_AVX2) ? ISA_AVX2 : ISA_GENERIC;
  if (!g_pool) set_pool(1);
  return m;
}
