// Request scopes: what one request's scope costs from its start to its end, how that grows
// with threads and with the number of registries alive, beside a folly-style request
// context measured in the same binary and run.
//
//   BM_ScopeLife_FollyStyleContext     anchor: a std::make_shared context holding an
//                                      absl::flat_hash_map from registry key to its data,
//                                      made current through a thread_local, one value
//                                      inserted, then released (folly RequestContext's shape)
//   BM_ScopeLife_ExplicitScope         ScopeGuard on a fresh token, one registry value
//                                      created, guard left (scope and value end)
//   BM_ScopeLife_FreshScope            the same with ScopeGuard(scopereg::fresh_scope): a
//                                      scope no token names (carried by wrap, as folly's)
//   BM_ScopeLife_FuncScopeAlive/N      the same with N empty FuncScope registries alive
//   BM_ScopeLife_FuncScopeToken        the same with the value in a FuncScope registry over
//                                      ExplicitScope::func() (a token-keyed store, found
//                                      again at scope end through the binding index)
//   BM_Get_FuncScope_Registries/N      FuncScope hits on N registries used alternately
//   BM_CopyRun_FollyStyleShallowCopy/N anchor: a child context made by copying the parent's
//                                      flat_hash_map of N shared_ptr entries, made current,
//                                      one entry read, then released (folly's
//                                      ShallowCopyRequestContextScopeGuard's shape)
//   BM_CopyRun_CopyContext/N           copy_context() of a scope with N values, run() of a
//                                      callable reading one of them, then released
//
// Every thread uses its own token sequence: nothing in the benchmark itself is shared.
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "benchmark/benchmark.h"
#include "scopereg/explicit_scope.h"
#include "scopereg/scoped_registry.h"

namespace scopereg::bench {
namespace {

using Payload = std::uint64_t;

// A token sequence of the calling benchmark thread's own.
std::uint64_t first_token(const benchmark::State& state) {
  static std::atomic<std::uint64_t> run{1};
  return (run.fetch_add(1) << 40) | (static_cast<std::uint64_t>(state.thread_index()) << 32);
}

// ---- the anchor: folly-style request context ---------------------------------------

struct FollyStyleContext {
  absl::flat_hash_map<const void*, std::unique_ptr<Payload>> data;
};
thread_local FollyStyleContext* t_current_context = nullptr;
constexpr char kRegistryKey = 0;

void BM_ScopeLife_FollyStyleContext(benchmark::State& state) {
  for (auto _ : state) {
    auto context = std::make_shared<FollyStyleContext>();
    FollyStyleContext* const saved = t_current_context;
    t_current_context = context.get();
    auto [it, inserted] =
        t_current_context->data.emplace(&kRegistryKey, std::make_unique<Payload>(1));
    benchmark::DoNotOptimize(*it->second);
    t_current_context = saved;
    context.reset();
  }
}
BENCHMARK(BM_ScopeLife_FollyStyleContext)->ThreadRange(1, 16);

// ---- scopereg ------------------------------------------------------------------------

ScopedRegistry<Payload, ExplicitScope>& registry() {
  static auto* reg = new ScopedRegistry<Payload, ExplicitScope>([] { return Payload{1}; });
  return *reg;
}

void BM_ScopeLife_ExplicitScope(benchmark::State& state) {
  ScopedRegistry<Payload, ExplicitScope>& reg = registry();
  std::uint64_t token = first_token(state);
  for (auto _ : state) {
    ScopeGuard guard(token++);
    benchmark::DoNotOptimize(reg());
  }
}
BENCHMARK(BM_ScopeLife_ExplicitScope)->ThreadRange(1, 16);

void BM_ScopeLife_FreshScope(benchmark::State& state) {
  ScopedRegistry<Payload, ExplicitScope>& reg = registry();
  for (auto _ : state) {
    ScopeGuard guard(fresh_scope);
    benchmark::DoNotOptimize(reg());
  }
}
BENCHMARK(BM_ScopeLife_FreshScope)->ThreadRange(1, 16);

void BM_ScopeLife_FuncScopeAlive(benchmark::State& state) {
  std::vector<std::unique_ptr<ScopedRegistry<Payload, FuncScope>>> alive;
  for (int i = 0; i < state.range(0); ++i) {
    alive.push_back(std::make_unique<ScopedRegistry<Payload, FuncScope>>(
        [] { return Payload{1}; }, ExplicitScope::func()));
  }
  ScopedRegistry<Payload, ExplicitScope>& reg = registry();
  std::uint64_t token = first_token(state);
  for (auto _ : state) {
    ScopeGuard guard(token++);
    benchmark::DoNotOptimize(reg());
  }
}
BENCHMARK(BM_ScopeLife_FuncScopeAlive)->Arg(0)->Arg(100)->Arg(10000);

// A token-keyed registry (FuncScope over ExplicitScope::func()): its values live in the
// registry's own map, found again through the process's binding index at scope end.
// One registry shared by the benchmark's threads, made and destroyed by thread 0 (the
// loop starts and ends with a barrier): a token-keyed registry left alive would make every
// later benchmark's scope ends look in the binding index.
std::unique_ptr<ScopedRegistry<Payload, FuncScope>> g_token_keyed;

void BM_ScopeLife_FuncScopeToken(benchmark::State& state) {
  if (state.thread_index() == 0) {
    g_token_keyed = std::make_unique<ScopedRegistry<Payload, FuncScope>>(
        [] { return Payload{1}; }, ExplicitScope::func());
  }
  std::uint64_t token = first_token(state);
  for (auto _ : state) {
    ScopeGuard guard(token++);
    benchmark::DoNotOptimize((*g_token_keyed)());
  }
  if (state.thread_index() == 0) g_token_keyed.reset();
}
BENCHMARK(BM_ScopeLife_FuncScopeToken)->ThreadRange(1, 16);

void BM_Get_FuncScope_Registries(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  std::vector<std::unique_ptr<ScopedRegistry<Payload, FuncScope>>> regs;
  for (std::size_t i = 0; i < n; ++i) {
    regs.push_back(std::make_unique<ScopedRegistry<Payload, FuncScope>>(
        [] { return Payload{1}; }, ThreadScope::func()));
    (*regs.back())();
  }
  std::size_t i = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize((*regs[i])());
    if (++i == n) i = 0;
  }
}
BENCHMARK(BM_Get_FuncScope_Registries)->Arg(1)->Arg(16)->Arg(64);

// ---- context copies -------------------------------------------------------------------

struct FollyStyleSharedContext {
  absl::flat_hash_map<const void*, std::shared_ptr<Payload>> data;
};
thread_local FollyStyleSharedContext* t_current_shared = nullptr;
char g_keys[16];

void BM_CopyRun_FollyStyleShallowCopy(benchmark::State& state) {
  FollyStyleSharedContext parent;
  for (int i = 0; i < state.range(0); ++i) {
    parent.data.emplace(&g_keys[i], std::make_shared<Payload>(i));
  }
  t_current_shared = &parent;
  for (auto _ : state) {
    auto child = std::make_shared<FollyStyleSharedContext>(*t_current_shared);
    FollyStyleSharedContext* const saved = t_current_shared;
    t_current_shared = child.get();
    auto it = t_current_shared->data.find(&g_keys[0]);
    benchmark::DoNotOptimize(it == t_current_shared->data.end() ? nullptr : it->second.get());
    t_current_shared = saved;
    child.reset();
  }
  t_current_shared = nullptr;
}
BENCHMARK(BM_CopyRun_FollyStyleShallowCopy)->Arg(0)->Arg(4)->Arg(16);

void BM_CopyRun_CopyContext(benchmark::State& state) {
  std::vector<std::unique_ptr<ScopedRegistry<Payload, ExplicitScope>>> regs;
  for (int i = 0; i < 16; ++i) {
    regs.push_back(std::make_unique<ScopedRegistry<Payload, ExplicitScope>>(
        [] { return Payload{1}; }));
  }
  ScopeGuard guard(first_token(state));
  for (int i = 0; i < state.range(0); ++i) (*regs[i])();
  ScopedRegistry<Payload, ExplicitScope>& first = *regs[0];
  for (auto _ : state) {
    CapturedScope copy = copy_context();
    copy.run([&first] { benchmark::DoNotOptimize(first.find()); });
  }
}
BENCHMARK(BM_CopyRun_CopyContext)->Arg(0)->Arg(4)->Arg(16);

}  // namespace
}  // namespace scopereg::bench

BENCHMARK_MAIN();
