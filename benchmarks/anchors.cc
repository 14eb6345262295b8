// Anchor benchmarks linked into every benchmark binary (an object library, so each
// binary measures the anchors in the same run as scopereg's own operations).
#include <pthread.h>

#include <cstdint>
#include <mutex>
#include <thread>

#include "absl/container/flat_hash_map.h"
#include "anchors.h"
#include "benchmark/benchmark.h"
#include "scopereg/thread_scope.h"

namespace scopereg::bench {
namespace {

thread_local constinit int t_raw = 1;

// Every binary measures in a multi-threaded process, as a server runs. While a process has
// only ever had one thread, glibc takes pthread mutexes without atomic instructions and
// libstdc++ counts shared_ptr references without them: the first benchmark of a binary
// (often an anchor, or a 1-thread row) would be flattered and the rest not. One thread
// started and joined before main() makes the process multi-threaded for good.
const bool g_multi_threaded = [] {
  std::thread([] {}).join();
  return true;
}();

void BM_EmptyLoop(benchmark::State& state) {
  for (auto _ : state) benchmark::ClobberMemory();
}
BENCHMARK(BM_EmptyLoop);

void BM_Get_RawThreadLocal(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(t_raw);
}
BENCHMARK(BM_Get_RawThreadLocal)->ThreadRange(1, 16);

void BM_Get_NonInlinedThreadLocal(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(*non_inlined_thread_local());
}
BENCHMARK(BM_Get_NonInlinedThreadLocal)->ThreadRange(1, 16);

// What a plain SQLAlchemy-style registry is: a hash map keyed by token, under a mutex.
void BM_Find_FlatHashMapUnderMutex(benchmark::State& state) {
  static std::mutex mu;
  static auto* map = new absl::flat_hash_map<std::uint64_t, int>();
  const std::uint64_t token = ThreadScope::current().id();
  {
    std::lock_guard<std::mutex> lock(mu);
    (*map)[token] = 1;
  }
  for (auto _ : state) {
    std::lock_guard<std::mutex> lock(mu);
    benchmark::DoNotOptimize(map->find(token)->second);
  }
}
BENCHMARK(BM_Find_FlatHashMapUnderMutex)->ThreadRange(1, 16);

}  // namespace
}  // namespace scopereg::bench
