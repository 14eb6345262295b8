// ScopedRegistry hits beside the anchors they are compared with, in one binary and run.
//
//   BM_Get_RawThreadLocal           the physical limit: an inlined thread_local read (anchors.cc)
//   BM_Get_NonInlinedThreadLocal    the same read through a call into another .cc (anchors.cc)
//   BM_Get_PthreadGetspecific       pthread_getspecific
//   BM_Get_BoostThreadSpecificPtr   boost::thread_specific_ptr<T>::get()
//   BM_Get_ThreadScope              ScopedRegistry<T> (ThreadScope) hit
//   BM_Find_FlatHashMapPlusCall     lock-free absl::flat_hash_map find + one indirect call
//   BM_Get_FuncScope                ScopedRegistry<T, FuncScope> hit (ScopeFunc form)
//   BM_Find_FlatHashMapUnderMutex   an SQLAlchemy-style registry: the map under a mutex (anchors.cc)
//
// The hit benchmarks also run on 2 threads (per-thread CPU time is the figure to compare).
#include <pthread.h>

#include <functional>

#include "absl/container/flat_hash_map.h"
#include "anchors.h"
#include "benchmark/benchmark.h"
#include "boost/thread/tss.hpp"
#include "scopereg/scoped_registry.h"

namespace scopereg::bench {
namespace {

void BM_Get_PthreadGetspecific(benchmark::State& state) {
  static pthread_key_t key = [] {
    pthread_key_t k;
    pthread_key_create(&k, nullptr);
    return k;
  }();
  int value = 1;
  pthread_setspecific(key, &value);
  for (auto _ : state) benchmark::DoNotOptimize(*static_cast<int*>(pthread_getspecific(key)));
}
BENCHMARK(BM_Get_PthreadGetspecific)->ThreadRange(1, 16);

void BM_Get_BoostThreadSpecificPtr(benchmark::State& state) {
  static boost::thread_specific_ptr<int> ptr;
  if (ptr.get() == nullptr) ptr.reset(new int(1));
  for (auto _ : state) benchmark::DoNotOptimize(*ptr.get());
}
BENCHMARK(BM_Get_BoostThreadSpecificPtr)->ThreadRange(1, 16);

ScopedRegistry<int>& thread_registry() {
  static auto* reg = new ScopedRegistry<int>([] { return 1; });
  return *reg;
}

void BM_Get_ThreadScope(benchmark::State& state) {
  ScopedRegistry<int>& reg = thread_registry();
  reg();
  for (auto _ : state) benchmark::DoNotOptimize(reg());
}
BENCHMARK(BM_Get_ThreadScope)->ThreadRange(1, 16);

void BM_Find_FlatHashMapPlusCall(benchmark::State& state) {
  absl::flat_hash_map<std::uint64_t, int> map;
  for (std::uint64_t i = 0; i < 64; ++i) map[i] = 1;
  map[42] = 1;
  std::function<std::uint64_t()> scope_func = non_inlined_token;
  for (auto _ : state) benchmark::DoNotOptimize(map.find(scope_func())->second);
}
BENCHMARK(BM_Find_FlatHashMapPlusCall)->ThreadRange(1, 16);

ScopedRegistry<int, FuncScope>& func_registry() {
  static auto* reg = new ScopedRegistry<int, FuncScope>([] { return 1; }, ThreadScope::func());
  return *reg;
}

void BM_Get_FuncScope(benchmark::State& state) {
  ScopedRegistry<int, FuncScope>& reg = func_registry();
  reg();
  for (auto _ : state) benchmark::DoNotOptimize(reg());
}
BENCHMARK(BM_Get_FuncScope)->ThreadRange(1, 16);

}  // namespace
}  // namespace scopereg::bench

BENCHMARK_MAIN();
