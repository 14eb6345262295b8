// Anchor benchmarks linked into every benchmark binary (an object library, so each
// binary measures the anchors in the same run as scopereg's own operations).
#include <pthread.h>

#include <cstdint>
#include <mutex>

#include "absl/container/flat_hash_map.h"
#include "anchors.h"
#include "benchmark/benchmark.h"
#include "scopereg/thread_scope.h"

namespace scopereg::bench {
namespace {

thread_local constinit int t_raw = 1;

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
