// A consumer of the core alone (no fiber headers): must build and link without Boost.
#include <cstdio>
#include <thread>

#include "scopereg/explicit_scope.h"
#include "scopereg/scoped_registry.h"
#include "scopereg/session_cache.h"

int main() {
  scopereg::ScopedRegistry<int> per_thread([] { return 1; });
  per_thread() = 2;
  int other = 0;
  std::thread([&] { other = per_thread(); }).join();
  scopereg::ScopedRegistry<int, scopereg::ExplicitScope> per_request([] { return 5; });
  scopereg::ScopeGuard request(1);
  scopereg::SessionCache<int> sessions;
  sessions.add("db", {.factory = [] { return 3; }});
  const bool ok = per_thread() == 2 && other == 1 && per_request() == 5 && sessions.get("db") == 3 &&
                  sessions.clear_for_current_scope().ok();
  std::printf("thread_only consumer: %s\n", ok ? "all checks passed" : "FAILED");
  return ok ? 0 : 1;
}
