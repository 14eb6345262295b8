// A consumer of scopereg's Boost.Asio adaptor (scopereg::asio), built from outside the
// repository (an installed package, found with COMPONENTS asio; or add_subdirectory). Runs
// 40 coroutine tasks on a 2-thread pool, each with its own CoroutineScope value across
// timers, and exits non-zero on any wrong value.
#include "scopereg/asio.h"  // first: it includes <utility> before Asio's headers

#include <atomic>
#include <chrono>
#include <cstdio>

#include "boost/asio/co_spawn.hpp"
#include "boost/asio/detached.hpp"
#include "boost/asio/steady_timer.hpp"
#include "boost/asio/thread_pool.hpp"
#include "boost/asio/use_awaitable.hpp"
#include "scopereg/coroutine_scope.h"
#include "scopereg/scoped_registry.h"

namespace {

std::atomic<int> next_id{0};
std::atomic<int> wrong{0};
std::atomic<int> finished{0};
scopereg::ScopedRegistry<int, scopereg::CoroutineScope> task_value([] { return next_id++; });

boost::asio::awaitable<void> task(int i) {
  auto executor = co_await boost::asio::this_coro::executor;
  const int mine = task_value();
  for (int k = 0; k < 3; ++k) {
    boost::asio::steady_timer timer(executor, std::chrono::microseconds((i * 131 + k) % 500));
    co_await timer.async_wait(boost::asio::use_awaitable);
    if (task_value() != mine) ++wrong;
  }
  ++finished;
}

}  // namespace

int main() {
  boost::asio::thread_pool pool(2);
  for (int i = 0; i < 40; ++i) {
    scopereg::asio::co_spawn(pool.get_executor(), task(i), boost::asio::detached);
  }
  pool.join();
  const bool ok = wrong == 0 && finished == 40 && next_id == 40 && task_value.size() == 0;
  std::printf("asio consumer: %d tasks, %d wrong values, %d values made, %lld alive: %s\n",
              finished.load(), wrong.load(), next_id.load(), static_cast<long long>(task_value.size()),
              ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
