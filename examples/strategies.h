// strategies.h: where a request's scope comes from. Every strategy runs each HTTP request
// in a scope of its own, with an OrderService of the matching scope type:
//
//   thread    a pool of worker threads (ThreadScope): a request runs start to end on one
//             worker; its TeardownGuard ends the unit of work before the next request.
//   fiber     worker threads each running up to --fibers scopereg Fibers (FiberScope): one
//             fiber per request; a fiber waiting for the pool or for SQLite's write lock
//             yields to the others on its thread.
//   explicit  the event loop enters a ScopeGuard per request (ExplicitScope) and hands the
//             database work to a worker pool through scopereg::wrap (ScopedExecutor): the
//             work runs on a pool thread in the request's scope, which ends when the
//             wrapped callable is gone.
//   coroutine  each request is a boost::asio::awaitable started by scopereg::asio::co_spawn
//             on a thread_pool of --workers threads, in a fresh task scope (TaskScope,
//             CoroutineScope): the scope follows the coroutine across co_await and threads,
//             and ends with the task. The task's teardown, scopereg::asio::teardown_of of
//             the SessionCache, ends the unit of work (rollback on failure, connection back
//             to the pool) after the coroutine finished. The server's connections are
//             coroutines on the event loop (Beast's async ops with use_awaitable) that
//             co_await each request's task. The database calls block the pool thread (as
//             in the thread strategy). Built when scopereg::asio is available.

#ifndef SCOPEREG_EXAMPLES_STRATEGIES_H_
#define SCOPEREG_EXAMPLES_STRATEGIES_H_

#include <functional>
#include <memory>
#include <string>

#include "http_types.h"
#include "service.h"

namespace example {

struct StrategyOptions {
  std::string name = "thread";  // thread, fiber, explicit or coroutine
  int workers = 4;
  int fibers = 8;               // per worker, --strategy=fiber
};

// The connections a strategy can hold at once: the pool size it needs.
std::size_t concurrency(const StrategyOptions& options);
// How a strategy waits while SQLite is busy: a fiber yields, a thread sleeps a little.
std::function<void()> backoff_for(const StrategyOptions& options);

// The strategies this build has, for messages: "thread, fiber, explicit or coroutine".
std::string strategy_names();

// Throws std::invalid_argument for an unknown strategy (or coroutine without scopereg::asio).
std::unique_ptr<Dispatcher> make_dispatcher(const StrategyOptions& options, Store& store);

}  // namespace example

#endif  // SCOPEREG_EXAMPLES_STRATEGIES_H_
