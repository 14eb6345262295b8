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
//   BM_ScopeLife_FuncScopeAlive/N      the same with N empty FuncScope registries alive
//   BM_Get_FuncScope_Registries/N      FuncScope hits on N registries used alternately
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

}  // namespace
}  // namespace scopereg::bench

BENCHMARK_MAIN();
