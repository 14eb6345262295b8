// Coroutine task scopes: what carrying a task's scope across co_await costs, beside the
// same coroutine without scopereg and a folly-style context swap, measured in the same
// binary and run.
//
//   BM_CoAwait_Plain                 anchor: one suspend/resume pair of a minimal
//                                    coroutine (co_await of an always-suspending awaiter,
//                                    resumed at once by the benchmark loop), no scopereg
//   BM_CoAwait_FollyStyleSwap        anchor: the same, with a folly-style context swap at
//                                    each resume and suspend (the task's std::shared_ptr
//                                    context copied into a thread_local at resume, the
//                                    resumer's restored at suspend: folly::coro's
//                                    RequestContext carrying)
//   BM_CoAwait_TaskScope             the same coroutine with scopereg::TaskScopePromise
//   BM_Coro_Get_CoroutineScope       a ScopedRegistry<T, CoroutineScope> hit inside a task
//   BM_Coro_Get_ExplicitScopeInGuard anchor: a ScopedRegistry<T, ExplicitScope> hit inside
//                                    a ScopeGuard, outside any coroutine
//   BM_TaskLife_Plain                anchor: create, run to the end and destroy a coroutine
//                                    that does nothing (its frame's allocation and free)
//   BM_TaskLife_TaskScope            the same with a TaskScopePromise task (fresh_scope)
//                                    that creates one CoroutineScope value: the task's whole
//                                    scope life
//   BM_Asio_CoAwaitPost_Plain        anchor: co_await boost::asio::post(use_awaitable) in a
//                                    task started by boost::asio::co_spawn, io_context on one
//                                    thread
//   BM_Asio_CoAwaitPost_FollyStyleExecutor  anchor: the same task on a folly-style
//                                    context-carrying executor: an executor wrapper holding
//                                    the task's std::shared_ptr context (copied with every
//                                    executor copy, as folly's executors keep their
//                                    RequestContext), made current in a thread_local
//                                    around every function it executes
//   BM_Asio_CoAwaitPost_TaskExecutor the same task started by scopereg::asio::co_spawn
//   BM_Asio_TaskLife_Plain           anchor: boost::asio::co_spawn of a coroutine that does
//                                    nothing, run to its end on a one-thread io_context
//   BM_Asio_TaskLife_TaskExecutor    the same by scopereg::asio::co_spawn, the coroutine
//                                    creating one CoroutineScope value: a request task's
//                                    whole scope life on Asio
#include "scopereg/asio.h"  // first: includes <utility> before Asio's headers

#include <coroutine>
#include <cstdint>
#include <exception>
#include <memory>
#include <type_traits>
#include <utility>

#include "benchmark/benchmark.h"
#include "boost/asio/co_spawn.hpp"
#include "boost/asio/detached.hpp"
#include "boost/asio/io_context.hpp"
#include "boost/asio/post.hpp"
#include "boost/asio/use_awaitable.hpp"
#include "scopereg/coroutine_scope.h"
#include "scopereg/explicit_scope.h"
#include "scopereg/scoped_registry.h"

namespace scopereg::bench {
namespace {

using Payload = std::uint64_t;

// A minimal lazily started coroutine type over a promise `P`; the handle is owned.
template <typename P>
struct Coro {
  struct promise_type : P {
    Coro get_return_object() {
      return Coro{std::coroutine_handle<promise_type>::from_promise(*this)};
    }
    void return_void() noexcept {}
    void unhandled_exception() noexcept { std::terminate(); }
  };
  explicit Coro(std::coroutine_handle<promise_type> h) : handle(h) {}
  Coro(Coro&& other) noexcept : handle(std::exchange(other.handle, {})) {}
  ~Coro() {
    if (handle) handle.destroy();
  }
  std::coroutine_handle<promise_type> handle;
};

struct PlainPromise {
  std::suspend_always initial_suspend() noexcept { return {}; }
  std::suspend_always final_suspend() noexcept { return {}; }
};

// folly-style: the task's context is a shared_ptr made current at every resume.
struct Context {
  Payload data = 1;
};
thread_local std::shared_ptr<Context> t_context_ptr;

struct FollyStylePromise {
  std::shared_ptr<Context> context = std::make_shared<Context>();
  std::shared_ptr<Context> saved;
  std::suspend_always initial_suspend() noexcept { return {}; }
  std::suspend_always final_suspend() noexcept { return {}; }
  template <typename A>
  auto await_transform(A a) {
    struct Swap {
      FollyStylePromise& p;
      A inner;
      bool await_ready() { return inner.await_ready(); }
      void await_suspend(std::coroutine_handle<> h) {
        t_context_ptr = std::move(p.saved);  // the resumer's context back
        inner.await_suspend(h);
      }
      void await_resume() {
        p.saved = std::exchange(t_context_ptr, p.context);  // a copy: one reference more
        inner.await_resume();
      }
    };
    return Swap{*this, a};
  }
};

using PlainCoro = Coro<PlainPromise>;
using FollyCoro = Coro<FollyStylePromise>;
using ScopedCoro = Coro<TaskScopePromise>;

PlainCoro plain_loop() {
  for (;;) co_await std::suspend_always{};
}
FollyCoro folly_loop() {
  for (;;) co_await std::suspend_always{};
}
ScopedCoro scoped_loop() {
  for (;;) co_await std::suspend_always{};
}

template <typename C>
void suspend_resume_pairs(benchmark::State& state, C coro) {
  coro.handle.resume();  // to the first co_await
  for (auto _ : state) coro.handle.resume();
}

void BM_CoAwait_Plain(benchmark::State& state) { suspend_resume_pairs(state, plain_loop()); }
BENCHMARK(BM_CoAwait_Plain);
void BM_CoAwait_FollyStyleSwap(benchmark::State& state) {
  suspend_resume_pairs(state, folly_loop());
}
BENCHMARK(BM_CoAwait_FollyStyleSwap);
void BM_CoAwait_TaskScope(benchmark::State& state) { suspend_resume_pairs(state, scoped_loop()); }
BENCHMARK(BM_CoAwait_TaskScope);

// ---- registry hits ---------------------------------------------------------------------

ScopedRegistry<Payload, CoroutineScope>& task_registry() {
  static auto* reg = new ScopedRegistry<Payload, CoroutineScope>([] { return Payload{1}; });
  return *reg;
}
ScopedRegistry<Payload, ExplicitScope>& explicit_registry() {
  static auto* reg = new ScopedRegistry<Payload, ExplicitScope>([] { return Payload{1}; });
  return *reg;
}

ScopedCoro hits_in_task(benchmark::State& state) {
  ScopedRegistry<Payload, CoroutineScope>& reg = task_registry();
  reg();
  for (auto _ : state) benchmark::DoNotOptimize(reg());
  co_return;
}

void BM_Coro_Get_CoroutineScope(benchmark::State& state) {
  ScopedCoro task = hits_in_task(state);
  task.handle.resume();
}
BENCHMARK(BM_Coro_Get_CoroutineScope);

void BM_Coro_Get_ExplicitScopeInGuard(benchmark::State& state) {
  ScopedRegistry<Payload, ExplicitScope>& reg = explicit_registry();
  ScopeGuard guard(fresh_scope);
  reg();
  for (auto _ : state) benchmark::DoNotOptimize(reg());
}
BENCHMARK(BM_Coro_Get_ExplicitScopeInGuard);

// ---- a task's whole life -------------------------------------------------------------------

PlainCoro empty_task() { co_return; }

void BM_TaskLife_Plain(benchmark::State& state) {
  for (auto _ : state) {
    PlainCoro task = empty_task();
    task.handle.resume();
  }
}
BENCHMARK(BM_TaskLife_Plain)->ThreadRange(1, 2);

struct FreshTaskPromise : TaskScopePromise {
  FreshTaskPromise() : TaskScopePromise(fresh_scope) {}
};
Coro<FreshTaskPromise> value_task() {
  benchmark::DoNotOptimize(task_registry()());
  co_return;
}

void BM_TaskLife_TaskScope(benchmark::State& state) {
  task_registry();
  for (auto _ : state) {
    Coro<FreshTaskPromise> task = value_task();
    task.handle.resume();
  }
}
BENCHMARK(BM_TaskLife_TaskScope)->ThreadRange(1, 2);

// ---- Boost.Asio -------------------------------------------------------------------------

boost::asio::awaitable<void> post_loop(benchmark::State& state) {
  auto executor = co_await boost::asio::this_coro::executor;
  for (auto _ : state) co_await boost::asio::post(executor, boost::asio::use_awaitable);
}

void BM_Asio_CoAwaitPost_Plain(benchmark::State& state) {
  boost::asio::io_context io(1);
  boost::asio::co_spawn(io, post_loop(state), boost::asio::detached);
  io.run();
}
BENCHMARK(BM_Asio_CoAwaitPost_Plain);

// The folly-style anchor: what a context carried by shared_ptr through Asio's executor
// rewrapping costs (the same executor requirements TaskExecutor meets).
template <typename Inner>
class FollyStyleExecutor {
 public:
  FollyStyleExecutor(const Inner& inner, std::shared_ptr<Context> context)
      : inner_(inner), context_(std::move(context)) {}
  template <typename Other>
    requires(!std::is_same_v<Other, Inner>) && std::is_constructible_v<Inner, const Other&>
  FollyStyleExecutor(const FollyStyleExecutor<Other>& other)
      : inner_(other.inner_), context_(other.context_) {}

  template <typename F>
  void execute(F&& f) const {
    boost::asio::execution::execute(
        inner_, [context = context_, f = std::forward<F>(f)]() mutable {
          std::shared_ptr<Context> saved = std::exchange(t_context_ptr, context);
          std::move(f)();
          t_context_ptr = std::move(saved);
        });
  }
  template <typename P>
    requires boost::asio::can_query<const Inner&, P>::value
  decltype(auto) query(const P& p) const {
    return boost::asio::query(inner_, p);
  }
  template <typename P>
    requires boost::asio::can_require<const Inner&, P>::value
  auto require(const P& p) const -> FollyStyleExecutor<
      std::decay_t<typename boost::asio::require_result<const Inner&, P>::type>> {
    return {boost::asio::require(inner_, p), context_};
  }
  template <typename P>
    requires boost::asio::can_prefer<const Inner&, P>::value
  auto prefer(const P& p) const -> FollyStyleExecutor<
      std::decay_t<typename boost::asio::prefer_result<const Inner&, P>::type>> {
    return {boost::asio::prefer(inner_, p), context_};
  }
  friend bool operator==(const FollyStyleExecutor& a, const FollyStyleExecutor& b) noexcept {
    return a.inner_ == b.inner_ && a.context_ == b.context_;
  }
  friend bool operator!=(const FollyStyleExecutor& a, const FollyStyleExecutor& b) noexcept {
    return !(a == b);
  }

 private:
  template <typename>
  friend class FollyStyleExecutor;
  Inner inner_;
  std::shared_ptr<Context> context_;
};

void BM_Asio_CoAwaitPost_FollyStyleExecutor(benchmark::State& state) {
  boost::asio::io_context io(1);
  using Ex = boost::asio::io_context::executor_type;
  boost::asio::co_spawn(FollyStyleExecutor<Ex>(io.get_executor(), std::make_shared<Context>()),
                        post_loop(state), boost::asio::detached);
  io.run();
}
BENCHMARK(BM_Asio_CoAwaitPost_FollyStyleExecutor);

void BM_Asio_CoAwaitPost_TaskExecutor(benchmark::State& state) {
  boost::asio::io_context io(1);
  scopereg::asio::co_spawn(io.get_executor(), post_loop(state), boost::asio::detached);
  io.run();
}
BENCHMARK(BM_Asio_CoAwaitPost_TaskExecutor);

boost::asio::awaitable<void> empty_asio_task() { co_return; }

void BM_Asio_TaskLife_Plain(benchmark::State& state) {
  boost::asio::io_context io(1);
  for (auto _ : state) {
    boost::asio::co_spawn(io, empty_asio_task(), boost::asio::detached);
    io.run();
    io.restart();
  }
}
BENCHMARK(BM_Asio_TaskLife_Plain);

boost::asio::awaitable<void> value_in_task() {
  benchmark::DoNotOptimize(task_registry()());
  co_return;
}

void BM_Asio_TaskLife_TaskExecutor(benchmark::State& state) {
  task_registry();
  boost::asio::io_context io(1);
  for (auto _ : state) {
    scopereg::asio::co_spawn(io.get_executor(), value_in_task(), boost::asio::detached);
    io.run();
    io.restart();
  }
}
BENCHMARK(BM_Asio_TaskLife_TaskExecutor);

}  // namespace
}  // namespace scopereg::bench

BENCHMARK_MAIN();
