// The kernels' thread pool, one per process (included by qk.cpp only). The calling thread and
// n - 1 workers take the items of a call from an atomic counter, so a slow or descheduled thread
// does not hold the others, and a call ends when its items are done. Workers spin briefly after
// each call (calls come every few microseconds inside a forward), then sleep on a condition
// variable, so an idle node costs no CPU. Each thread has a scratch buffer (the matmuls dequantize
// weight panels into it); nothing allocates per call.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <shared_mutex>
#include <thread>
#include <vector>

namespace qk {
namespace pool {

// Benchmarks only (set_pool_wait_all): a call also waits for every worker to have woken and looked
// for items, as calls did before 2026-12-07 (the first call after turning it on may take a late
// worker's check-in from the call before for one of its own).
inline std::atomic<bool> g_wait_all_workers{false};
// Tests only (pool_check): workers sleep this long after a call wakes them, as if descheduled.
inline std::atomic<int> g_late_worker_us{0};

// One item of a call: fn(ctx, i, scratch), scratch being the running thread's own buffer.
typedef void (*ItemFn)(void* ctx, int64_t i, float* scratch);

// A call is done when all its items are, not when every thread has checked in: a worker that the
// OS has descheduled (on a small host the coordinator, tokenizer and API share the node's cores)
// would otherwise hold every call until it ran again, with the caller spinning. Items are claimed
// from one word holding (call number << 32 | items not yet claimed), so a worker that wakes late
// claims nothing of a finished call and never runs an item with another call's function.
class Pool {
 public:
  explicit Pool(int n) : n_(n < 1 ? 1 : n), scratch_(n_) {
    for (int i = 1; i < n_; ++i) workers_.emplace_back([this, i] { loop(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_.store(true);
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return n_; }
  std::mutex& busy() { return busy_; }
  float* scratch(int tid) { return scratch_[tid].data(); }
  void reserve(int64_t floats) {  // every thread's scratch holds at least `floats`
    for (auto& s : scratch_)
      if ((int64_t)s.size() < floats) s.resize(floats);
  }
  // fn(ctx, i, scratch) for i in [0, n) on every thread that is running, the caller's included;
  // returns when every item is done (n < 2^32). One caller at a time (Use holds busy()).
  void run(ItemFn fn, void* ctx, int64_t n) {
    fn_.store(fn, std::memory_order_relaxed);
    ctx_.store(ctx, std::memory_order_relaxed);
    n_items_.store(n, std::memory_order_relaxed);
    finished_.store(0, std::memory_order_relaxed);  // the last call's items have all finished
    const bool wait_all = g_wait_all_workers.load(std::memory_order_relaxed);
    if (wait_all) checked_.store(0, std::memory_order_relaxed);
    const uint64_t g = gen_.load(std::memory_order_relaxed) + 1;
    claim_.store(g << 32 | (uint64_t)n, std::memory_order_release);  // publishes the fields above
    gen_.store(g, std::memory_order_seq_cst);  // wakes the spinning workers
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lk(m_);
      cv_.notify_all();
    }
    const int64_t mine = work(0);
    while (finished_.load(std::memory_order_acquire) < n - mine) cpu_relax();
    while (wait_all && checked_.load(std::memory_order_acquire) < n_ - 1) cpu_relax();
  }

 private:
  static inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
  // Claim and run items of the current call until none is left; returns how many ran here.
  int64_t work(int tid) {
    for (int64_t ran = 0;;) {
      uint64_t c = claim_.load(std::memory_order_acquire);
      const int64_t left = (int64_t)(c & 0xffffffffu);
      // Decided from the word alone: a finished call's word says 0 left whatever fields a next
      // call has written meanwhile.
      if (left == 0) return ran;
      // Read after the word, so these are its call's fields or a later call's; a later call's
      // fields mean c's call has finished, and then the exchange below fails.
      const ItemFn fn = fn_.load(std::memory_order_relaxed);
      void* ctx = ctx_.load(std::memory_order_relaxed);
      const int64_t i = n_items_.load(std::memory_order_relaxed) - left;
      // Succeeds only if the word still equals c: the call still had `left` items unclaimed, so it
      // had not finished and the fields above were its own.
      if (!claim_.compare_exchange_weak(c, c - 1, std::memory_order_acq_rel, std::memory_order_relaxed)) continue;
      fn(ctx, i, scratch_[tid].data());
      ++ran;
    }
  }
  void loop(int tid) {
    uint64_t seen = 0;  // gen_ starts at 0; reading it here could miss a call posted before we ran
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
      seen = gen_.load(std::memory_order_acquire);
      if (stop_.load()) return;
      if (const int us = g_late_worker_us.load(std::memory_order_relaxed))
        std::this_thread::sleep_for(std::chrono::microseconds(us));
      // A worker that ran items of a call adds them before the call can end, so the count never
      // mixes two calls.
      if (const int64_t ran = work(tid)) finished_.fetch_add(ran, std::memory_order_release);
      checked_.fetch_add(1, std::memory_order_release);
    }
  }

  int n_;
  std::vector<std::thread> workers_;
  std::vector<std::vector<float>> scratch_;
  std::mutex m_, busy_;
  std::condition_variable cv_;
  // Each on a cache line of its own: the workers spin on gen_, claim from claim_ (with the call's
  // fields beside it, read-mostly), the caller spins on finished_ and reads sleeping_ every call,
  // and every worker adds to checked_ every call.
  alignas(64) std::atomic<uint64_t> gen_{0};
  alignas(64) std::atomic<uint64_t> claim_{0};
  std::atomic<ItemFn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int64_t> n_items_{0};
  alignas(64) std::atomic<int64_t> finished_{0};
  alignas(64) std::atomic<int> sleeping_{0};
  std::atomic<bool> stop_{false};
  alignas(64) std::atomic<int> checked_{0};
};

inline Pool* g_pool = nullptr;
inline std::atomic<int> g_size{0};
inline int64_t g_scratch_floats = 1 << 17;  // what every thread's scratch holds (grows with the largest K)
// Calls hold this shared (an uncontended atomic); a resize holds it exclusively, without the GIL, so
// it waits for calls in flight and never races a caller that has read g_pool.
inline std::shared_mutex g_rw;

// A kernel call's use of the pool, for its lifetime: the pool cannot be resized meanwhile, and its
// threads are the call's unless another thread of the process is computing; then the call runs
// alone on its own thread (threads() == 1) rather than wait.
class Use {
 public:
  Use() : shared_(g_rw), busy_(g_pool->busy(), std::try_to_lock) {
    threads_ = busy_.owns_lock() ? g_pool->size() : 1;
  }
  int threads() const { return threads_; }
  // fn(ctx, i, scratch) for i in [0, n); alone or for one item, inline on the caller, with a
  // scratch of `alone_floats` floats of its own when the pool's is another thread's.
  void run(ItemFn fn, void* ctx, int64_t n, int64_t alone_floats) {
    if (threads_ > 1 && n > 1) {
      g_pool->run(fn, ctx, n);
      return;
    }
    std::vector<float> own;
    float* scratch = busy_.owns_lock() ? g_pool->scratch(0) : (own.resize(alone_floats), own.data());
    for (int64_t i = 0; i < n; ++i) fn(ctx, i, scratch);
  }

 private:
  std::shared_lock<std::shared_mutex> shared_;
  std::unique_lock<std::mutex> busy_;
  int threads_;
};

// fn(ctx, i) for i in [0, n) on the pool (inline when another thread holds it, or n == 1): the
// elementwise ops and attention, whose items need no scratch.
inline void parallel_for(void (*fn)(void*, int64_t), void* ctx, int64_t n) {
  struct Call {
    void (*fn)(void*, int64_t);
    void* ctx;
  } call{fn, ctx};
  Use use;
  use.run([](void* c, int64_t i, float*) { ((Call*)c)->fn(((Call*)c)->ctx, i); }, &call, n, 0);
}

inline int size() { return g_size.load(std::memory_order_relaxed); }

// A pool of n threads in place of the old one (waits for calls in flight: call without the GIL).
inline void resize(int n) {
  std::unique_lock<std::shared_mutex> change(g_rw);
  if (g_pool && g_pool->size() == n) return;
  Pool* fresh = new Pool(n);
  fresh->reserve(g_scratch_floats);
  delete g_pool;
  g_pool = fresh;
  g_size.store(fresh->size());
}

// Every thread's scratch holds at least `floats` from now on (waits like resize).
inline void reserve_scratch(int64_t floats) {
  std::unique_lock<std::shared_mutex> change(g_rw);  // the scratch is not in use while it grows
  if (floats > g_scratch_floats) {
    g_scratch_floats = floats;
    if (g_pool) g_pool->reserve(floats);
  }
}

inline int64_t scratch_floats() { return g_scratch_floats; }

}  // namespace pool
}  // namespace qk
