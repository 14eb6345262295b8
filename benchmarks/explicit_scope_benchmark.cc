// ExplicitScope beside its anchors, in one binary and run (anchors.cc adds the raw
// thread_local read and the mutex-guarded hash map an SQLAlchemy-style registry is).
//
//   BM_Get_ExplicitScope         registry hit in the current explicit scope
//   BM_EnterLeave_ScopeGuard     entering and leaving a guard of a scope that stays live
//   BM_WrapAndCall               wrap() a callable and call it
//   BM_EnterLeave_ScopeGuard_HookedValue   as BM_EnterLeave_ScopeGuard, with a value of a
//                                type with on_scope_enter/on_scope_leave in the scope
//   BM_EnterLeave_ScopeGuard_Watcher       ... with a scope-switch watcher registered
//
// With several threads every thread uses its own token. A whole scope's life is in
// request_scope_benchmark.cc, beside its anchor.
#include <atomic>
#include <cstdint>

#include "benchmark/benchmark.h"
#include "scopereg/explicit_scope.h"
#include "scopereg/scoped_registry.h"

namespace scopereg::bench {
namespace {

std::atomic<std::uint64_t> g_next_token{1};

ScopedRegistry<int, ExplicitScope>& registry() {
  static auto* reg = new ScopedRegistry<int, ExplicitScope>([] { return 1; });
  return *reg;
}

void BM_Get_ExplicitScope(benchmark::State& state) {
  ScopeGuard guard(g_next_token.fetch_add(1));
  ScopedRegistry<int, ExplicitScope>& reg = registry();
  reg();
  for (auto _ : state) benchmark::DoNotOptimize(reg());
}
BENCHMARK(BM_Get_ExplicitScope)->ThreadRange(1, 16);

void BM_EnterLeave_ScopeGuard(benchmark::State& state) {
  const std::uint64_t token = g_next_token.fetch_add(1);
  ScopeGuard keep_alive(token);
  for (auto _ : state) {
    ScopeGuard guard(token);
    benchmark::DoNotOptimize(&guard);
  }
}
BENCHMARK(BM_EnterLeave_ScopeGuard)->ThreadRange(1, 16);

struct Hooked {
  int enters = 0;
  int leaves = 0;
  void on_scope_enter() { ++enters; }
  void on_scope_leave() { ++leaves; }
};

void BM_EnterLeave_ScopeGuard_HookedValue(benchmark::State& state) {
  static auto* reg = new ScopedRegistry<Hooked, ExplicitScope>([] { return Hooked(); });
  const std::uint64_t token = g_next_token.fetch_add(1);
  ScopeGuard keep_alive(token);
  (*reg)();
  for (auto _ : state) {
    ScopeGuard guard(token);  // the same scope again: no switch of current values
    benchmark::DoNotOptimize(&guard);
  }
}
BENCHMARK(BM_EnterLeave_ScopeGuard_HookedValue);

void BM_EnterLeave_ScopeGuard_Watcher(benchmark::State& state) {
  ScopeSwitchWatcherHandle watcher =
      add_scope_switch_watcher([](ScopeToken from, ScopeToken to) {
        benchmark::DoNotOptimize(from);
        benchmark::DoNotOptimize(to);
      });
  const std::uint64_t token = g_next_token.fetch_add(1);
  ScopeGuard keep_alive(token);
  ScopeGuard outer(g_next_token.fetch_add(1));
  for (auto _ : state) {
    ScopeGuard guard(token);  // a switch: outer -> token -> outer, two watcher calls
    benchmark::DoNotOptimize(&guard);
  }
}
BENCHMARK(BM_EnterLeave_ScopeGuard_Watcher);

void BM_WrapAndCall(benchmark::State& state) {
  ScopeGuard guard(g_next_token.fetch_add(1));
  ScopedRegistry<int, ExplicitScope>& reg = registry();
  reg();
  for (auto _ : state) {
    auto task = wrap([&reg] { return reg(); });
    benchmark::DoNotOptimize(task());
  }
}
BENCHMARK(BM_WrapAndCall)->ThreadRange(1, 16);

}  // namespace
}  // namespace scopereg::bench

BENCHMARK_MAIN();
