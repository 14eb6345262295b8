// FiberScope and scopereg's fibers beside their anchors, in one binary and run (anchors.cc
// adds the raw thread_local read).
//
//   BM_Get_FiberScope                 registry hit inside a scopereg::Fiber
//   BM_Get_BoostFiberSpecificPtr      boost::fibers::fiber_specific_ptr::get() in a fiber
//   BM_Get_BoostFiberScope            registry hit inside a boost::fibers::fiber
//   BM_SwitchRoundTrip_ScoperegFiber  resume() + yield() of a scopereg::Fiber
//   BM_SwitchRoundTrip_BoostContext   raw boost::context::fiber resume round trip
//   BM_SwitchRoundTrip_BoostFiberYield  boost::this_fiber::yield() between two fibers
//   BM_FiberLife_ScoperegFiber        create, run and finish a fiber that makes one value
#include <atomic>

#include "benchmark/benchmark.h"
#include "boost/context/fiber.hpp"
#include "boost/fiber/all.hpp"
#include "scopereg/boost_fiber_scope.h"
#include "scopereg/fiber_scope.h"
#include "scopereg/scoped_registry.h"

namespace scopereg::bench {
namespace {

void BM_Get_FiberScope(benchmark::State& state) {
  static auto* reg = new ScopedRegistry<int, FiberScope>([] { return 1; });
  Fiber fiber([&] {
    (*reg)();
    for (auto _ : state) benchmark::DoNotOptimize((*reg)());
  });
  fiber.resume();
}
BENCHMARK(BM_Get_FiberScope)->ThreadRange(1, 16);

void BM_Get_BoostFiberSpecificPtr(benchmark::State& state) {
  static auto* ptr = new boost::fibers::fiber_specific_ptr<int>();
  boost::fibers::fiber([&] {
    ptr->reset(new int(1));
    for (auto _ : state) benchmark::DoNotOptimize(*ptr->get());
  }).join();
}
BENCHMARK(BM_Get_BoostFiberSpecificPtr);

void BM_Get_BoostFiberScope(benchmark::State& state) {
  static auto* reg = new ScopedRegistry<int, BoostFiberScope>([] { return 1; });
  boost::fibers::fiber([&] {
    (*reg)();
    for (auto _ : state) benchmark::DoNotOptimize((*reg)());
  }).join();
}
BENCHMARK(BM_Get_BoostFiberScope);

void BM_SwitchRoundTrip_ScoperegFiber(benchmark::State& state) {
  bool stop = false;
  Fiber fiber([&] {
    while (!stop) Fiber::yield();
  });
  for (auto _ : state) fiber.resume();
  stop = true;
  fiber.resume();
}
BENCHMARK(BM_SwitchRoundTrip_ScoperegFiber);

void BM_SwitchRoundTrip_BoostContext(benchmark::State& state) {
  namespace ctx = boost::context;
  bool stop = false;
  ctx::fiber f([&](ctx::fiber&& caller) {
    while (!stop) caller = std::move(caller).resume();
    return std::move(caller);
  });
  for (auto _ : state) f = std::move(f).resume();
  stop = true;
  f = std::move(f).resume();
}
BENCHMARK(BM_SwitchRoundTrip_BoostContext);

void BM_SwitchRoundTrip_BoostFiberYield(benchmark::State& state) {
  std::atomic<bool> stop{false};
  boost::fibers::fiber other([&] {
    while (!stop.load(std::memory_order_relaxed)) boost::this_fiber::yield();
  });
  boost::fibers::fiber measured([&] {
    for (auto _ : state) boost::this_fiber::yield();
    stop = true;
  });
  measured.join();
  other.join();
}
BENCHMARK(BM_SwitchRoundTrip_BoostFiberYield);

void BM_FiberLife_ScoperegFiber(benchmark::State& state) {
  static auto* reg = new ScopedRegistry<int, FiberScope>([] { return 1; });
  for (auto _ : state) {
    Fiber fiber([] { benchmark::DoNotOptimize((*reg)()); });
    fiber.resume();
  }
}
BENCHMARK(BM_FiberLife_ScoperegFiber);

}  // namespace
}  // namespace scopereg::bench

BENCHMARK_MAIN();
