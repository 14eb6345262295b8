// SessionCache beside ScopedRegistry (its anchor), in one binary and run.
//
//   BM_Get_ScopedRegistry             ScopedRegistry<T> hit (ThreadScope)
//   BM_Get_SessionCacheByName         SessionCache::get("orders") hit
//   BM_Get_SessionCacheByInternedName SessionCache::get(handle) hit
//   BM_Get_SessionCacheValidated      get(handle) on a name with validate_every = 1 s
//   BM_ClearForCurrentScope/N         get N names, then clear_for_current_scope()
#include <chrono>
#include <string>

#include "benchmark/benchmark.h"
#include "scopereg/scoped_registry.h"
#include "scopereg/session_cache.h"

namespace scopereg::bench {
namespace {

SessionCache<int>& cache() {
  static auto* c = [] {
    auto* c = new SessionCache<int>();
    c->add("orders", {.factory = [] { return 1; }});
    c->add("validated", {.factory = [] { return 1; },
                         .validate = [](int&) { return true; },
                         .validate_every = std::chrono::seconds(1)});
    for (int i = 0; i < 16; ++i) {
      c->add("db" + std::to_string(i), {.factory = [] { return 1; }});
    }
    return c;
  }();
  return *c;
}

void BM_Get_ScopedRegistry(benchmark::State& state) {
  static auto* reg = new ScopedRegistry<int>([] { return 1; });
  (*reg)();
  for (auto _ : state) benchmark::DoNotOptimize((*reg)());
}
BENCHMARK(BM_Get_ScopedRegistry)->ThreadRange(1, 16);

void BM_Get_SessionCacheByName(benchmark::State& state) {
  SessionCache<int>& c = cache();
  const std::string name = "orders";
  c.get(name);
  for (auto _ : state) benchmark::DoNotOptimize(c.get(name));
}
BENCHMARK(BM_Get_SessionCacheByName)->ThreadRange(1, 16);

void BM_Get_SessionCacheByInternedName(benchmark::State& state) {
  SessionCache<int>& c = cache();
  const auto orders = c.intern("orders");
  c.get(orders);
  for (auto _ : state) benchmark::DoNotOptimize(c.get(orders));
}
BENCHMARK(BM_Get_SessionCacheByInternedName)->ThreadRange(1, 16);

void BM_Get_SessionCacheValidated(benchmark::State& state) {
  SessionCache<int>& c = cache();
  const auto validated = c.intern("validated");
  c.get(validated);
  for (auto _ : state) benchmark::DoNotOptimize(c.get(validated));
}
BENCHMARK(BM_Get_SessionCacheValidated);

void BM_ClearForCurrentScope(benchmark::State& state) {
  SessionCache<int>& c = cache();
  std::vector<SessionCache<int>::SessionName> names;
  for (int i = 0; i < state.range(0); ++i) names.push_back(c.intern("db" + std::to_string(i)));
  for (auto _ : state) {
    for (const auto& n : names) c.get(n);
    benchmark::DoNotOptimize(c.clear_for_current_scope());
  }
}
BENCHMARK(BM_ClearForCurrentScope)->Arg(1)->Arg(4)->Arg(16);

}  // namespace
}  // namespace scopereg::bench

BENCHMARK_MAIN();
