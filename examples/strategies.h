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

#ifndef SCOPEREG_EXAMPLES_STRATEGIES_H_
#define SCOPEREG_EXAMPLES_STRATEGIES_H_

#include <functional>
#include <memory>
#include <string>

#include "http_types.h"
#include "service.h"

namespace example {

struct StrategyOptions {
  std::string name = "thread";  // thread, fiber or explicit
  int workers = 4;
  int fibers = 8;               // per worker, --strategy=fiber
};

// The connections a strategy can hold at once: the pool size it needs.
std::size_t concurrency(const StrategyOptions& options);
// How a strategy waits while SQLite is busy: a fiber yields, a thread sleeps a little.
std::function<void()> backoff_for(const StrategyOptions& options);

std::unique_ptr<Dispatcher> make_dispatcher(const StrategyOptions& options, Store& store);

}  // namespace example

#endif  // SCOPEREG_EXAMPLES_STRATEGIES_H_
