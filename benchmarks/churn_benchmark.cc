// Scope churn and memory, for every strategy, beside their anchors in one binary and run.
//
//   BM_Churn_ThreadSpawnJoin_Empty     anchor: std::thread spawn + join, empty body
//   BM_Churn_ThreadScope               a thread that creates one value and exits
//   BM_Churn_FiberScope                a fiber that creates one value and finishes
//   BM_Churn_ExplicitScope             an explicit scope life with one value
//   BM_Churn_FuncScopeExplicit         the same through a FuncScope registry
//   BM_MissCreateClear_<Strategy>      create the scope's value, then clear it
//   BM_Memory_BytesPerValue_<Strategy> heap bytes per live value beyond sizeof(T)
//                                      (counter bytes_per_value; mallinfo2)
//   BM_Memory_AfterMillionScopes       heap bytes in use after 1,000,000 explicit scopes and
//                                      1,000,000 fibers came and went (counter bytes_delta)
#include <malloc.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "benchmark/benchmark.h"
#include "scopereg/explicit_scope.h"
#include "scopereg/fiber_scope.h"
#include "scopereg/scoped_registry.h"

namespace scopereg::bench {
namespace {

using Payload = std::uint64_t;

std::atomic<std::uint64_t> g_token{1};

std::int64_t heap_in_use() { return static_cast<std::int64_t>(mallinfo2().uordblks); }

void BM_Churn_ThreadSpawnJoin_Empty(benchmark::State& state) {
  for (auto _ : state) std::thread([] {}).join();
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Churn_ThreadSpawnJoin_Empty);

void BM_Churn_ThreadScope(benchmark::State& state) {
  ScopedRegistry<Payload> reg([] { return Payload{1}; });
  for (auto _ : state) std::thread([&] { benchmark::DoNotOptimize(reg()); }).join();
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Churn_ThreadScope);

void BM_Churn_FiberScope(benchmark::State& state) {
  ScopedRegistry<Payload, FiberScope> reg([] { return Payload{1}; });
  for (auto _ : state) {
    Fiber f([&] { benchmark::DoNotOptimize(reg()); });
    f.resume();
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Churn_FiberScope);

void BM_Churn_ExplicitScope(benchmark::State& state) {
  // One registry per thread (the scope life benchmark shares one); tokens of its own.
  ScopedRegistry<Payload, ExplicitScope> reg([] { return Payload{1}; });
  std::uint64_t token = g_token.fetch_add(1) << 32;
  for (auto _ : state) {
    ScopeGuard guard(token++);
    benchmark::DoNotOptimize(reg());
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Churn_ExplicitScope)->ThreadRange(1, 16);

void BM_Churn_FuncScopeExplicit(benchmark::State& state) {
  ScopedRegistry<Payload, FuncScope> reg([] { return Payload{1}; }, ExplicitScope::func());
  for (auto _ : state) {
    ScopeGuard guard(g_token.fetch_add(1, std::memory_order_relaxed));
    benchmark::DoNotOptimize(reg());
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Churn_FuncScopeExplicit);

template <typename Scope>
void miss_create_clear(benchmark::State& state, Scope scope) {
  ScopedRegistry<Payload, Scope> reg([] { return Payload{1}; }, scope);
  for (auto _ : state) {
    benchmark::DoNotOptimize(reg());
    reg.clear();
  }
}
void BM_MissCreateClear_ThreadScope(benchmark::State& state) {
  miss_create_clear(state, ThreadScope());
}
BENCHMARK(BM_MissCreateClear_ThreadScope);
void BM_MissCreateClear_ExplicitScope(benchmark::State& state) {
  ScopeGuard guard(g_token.fetch_add(1));
  miss_create_clear(state, ExplicitScope());
}
BENCHMARK(BM_MissCreateClear_ExplicitScope);
void BM_MissCreateClear_FiberScope(benchmark::State& state) {
  Fiber f([&] { miss_create_clear(state, FiberScope()); });
  f.resume();
}
BENCHMARK(BM_MissCreateClear_FiberScope);
void BM_MissCreateClear_FuncScope(benchmark::State& state) {
  miss_create_clear(state, FuncScope(ThreadScope::func()));
}
BENCHMARK(BM_MissCreateClear_FuncScope);

// Heap per live value: N scopes entered first (their own cost excluded), then one value
// each; the difference per value, minus sizeof(Payload).
constexpr int kValues = 100'000;

void BM_Memory_BytesPerValue_ExplicitScope(benchmark::State& state) {
  for (auto _ : state) {
    ScopedRegistry<Payload, ExplicitScope> reg([] { return Payload{1}; });
    std::vector<CapturedScope> scopes;
    scopes.reserve(kValues);
    for (int i = 0; i < kValues; ++i) {
      ScopeGuard guard(g_token.fetch_add(1));
      scopes.push_back(CapturedScope::current());
    }
    const std::int64_t before = heap_in_use();
    for (auto& s : scopes) s.run([&] { reg(); });
    const std::int64_t after = heap_in_use();
    state.counters["bytes_per_value"] =
        static_cast<double>(after - before) / kValues - static_cast<double>(sizeof(Payload));
  }
}
BENCHMARK(BM_Memory_BytesPerValue_ExplicitScope)->Iterations(1);

void BM_Memory_BytesPerValue_ThreadScope(benchmark::State& state) {
  // One thread, many registries (a thread's first value also allocates its slot chunks).
  for (auto _ : state) {
    std::vector<std::unique_ptr<ScopedRegistry<Payload>>> regs;
    for (int i = 0; i < 1000; ++i) {
      regs.push_back(std::make_unique<ScopedRegistry<Payload>>([] { return Payload{1}; }));
    }
    const std::int64_t before = heap_in_use();
    for (auto& r : regs) (*r)();
    const std::int64_t after = heap_in_use();
    state.counters["bytes_per_value"] =
        static_cast<double>(after - before) / 1000 - static_cast<double>(sizeof(Payload));
  }
}
BENCHMARK(BM_Memory_BytesPerValue_ThreadScope)->Iterations(1);

void BM_Memory_AfterMillionScopes(benchmark::State& state) {
  for (auto _ : state) {
    ScopedRegistry<Payload, ExplicitScope> by_request([] { return Payload{1}; });
    ScopedRegistry<Payload, FiberScope> by_fiber([] { return Payload{1}; });
    // Warm up allocator pools, then measure a million of each.
    auto churn = [&](int n) {
      for (int i = 0; i < n; ++i) {
        ScopeGuard guard(g_token.fetch_add(1));
        by_request();
      }
      for (int i = 0; i < n; ++i) {
        Fiber f([&] { by_fiber(); });
        f.resume();
      }
    };
    churn(10'000);
    malloc_trim(0);
    const std::int64_t before = heap_in_use();
    churn(1'000'000);
    malloc_trim(0);
    const std::int64_t after = heap_in_use();
    state.counters["bytes_delta"] = static_cast<double>(after - before);
    state.counters["live_values"] = static_cast<double>(by_request.size() + by_fiber.size());
  }
}
BENCHMARK(BM_Memory_AfterMillionScopes)->Iterations(1)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace scopereg::bench

BENCHMARK_MAIN();
