// Stress check of the kernels' thread pool (src/kernels/qk_pool.h), built by tests/test_kernels.py
// with and without ThreadSanitizer. Calls of 1..40 items on pools of 2, 3, 4 and 8 threads (more
// threads than a small host's cores: workers are descheduled and wake late), alternating two item
// functions whose contexts live on the caller's stack and are poisoned when the call returns. An
// item that runs twice, runs with another call's context or after its call returned, or whose
// write the caller does not see, is an error. Every 512 calls the workers' test delay toggles
// (they sleep 20 us after a call wakes them), so some wake only after the call has ended.
// Usage: pool_race_check CALLS_PER_POOL; prints "errors N calls M" and exits 1 on any error.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <random>

#include "qk_pool.h"

using qk::pool::Pool;

namespace {

constexpr int MAX_ITEMS = 40;
std::atomic<long> g_errors{0};
std::atomic<uint64_t> g_live{0};  // the serial of the call in flight; 0 between calls

struct Ctx {  // one call's context, on the caller's stack
  uint32_t magic;
  uint64_t serial;
  int n;
  std::atomic<int> runs[MAX_ITEMS];
};
constexpr uint32_t MAGIC_A = 0xA5A5A5A5u, MAGIC_B = 0x5A5A5A5Au, POISON = 0xDEADBEEFu;

void error(const char* what, long a, long b) {
  if (g_errors.fetch_add(1) < 10) fprintf(stderr, "error: %s (%ld, %ld)\n", what, a, b);
}

template <uint32_t MAGIC>
void item(void* p, int64_t i, float* scratch) {
  const Ctx& c = *(const Ctx*)p;
  if (c.magic != MAGIC) return error("item ran with another call's function or a dead context", i, c.magic);
  if (c.serial != g_live.load()) return error("item ran after its call returned", i, (long)c.serial);
  if (i < 0 || i >= c.n) return error("item index out of range", i, c.n);
  scratch[0] = (float)i;  // the running thread's own scratch
  ((Ctx&)c).runs[i].fetch_add(1, std::memory_order_relaxed);
}

}  // namespace

int main(int argc, char** argv) {
  const long calls = argc > 1 ? atol(argv[1]) : 100000;
  long done = 0;
  uint64_t serial = 0;
  for (int threads : {2, 3, 4, 8}) {
    Pool pool(threads);
    pool.reserve(16);
    std::mt19937 rng(threads);
    for (long k = 0; k < calls; ++k, ++done) {
      if (k % 512 == 0) qk::pool::g_late_worker_us.store((k / 512) % 2 ? 20 : 0);
      Ctx c;
      const bool a = rng() & 1;
      c.magic = a ? MAGIC_A : MAGIC_B;
      c.serial = ++serial;
      c.n = 1 + (int)(rng() % MAX_ITEMS);
      for (auto& r : c.runs) r.store(0, std::memory_order_relaxed);
      g_live.store(c.serial);
      pool.run(a ? item<MAGIC_A> : item<MAGIC_B>, &c, c.n);
      g_live.store(0);
      for (int i = 0; i < MAX_ITEMS; ++i) {
        const int want = i < c.n ? 1 : 0, got = c.runs[i].load(std::memory_order_relaxed);
        if (got != want) error("item ran a wrong number of times", i, got);
      }
      c.magic = POISON;  // a late item that reads this context now reports it
    }
    qk::pool::g_late_worker_us.store(0);
  }
  printf("errors %ld calls %ld\n", g_errors.load(), done);
  return g_errors.load() ? 1 : 0;
}
