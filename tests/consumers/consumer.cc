// A consumer of scopereg, built from outside the repository by each way in (CMake
// add_subdirectory, FetchContent, an installed package, a Bazel external repository).
// It uses the thread, fiber and explicit strategies and a session cache, checks what it
// gets, and exits non-zero on any difference. It includes every public header, as the
// consumer's own code, so the warning matrix covers them all.
#include <cstdio>
#include <string>
#include <thread>

#include "scopereg/boost_fiber_scope.h"
#include "scopereg/error.h"
#include "scopereg/explicit_scope.h"
#include "scopereg/fiber.h"
#include "scopereg/fiber_scope.h"
#include "scopereg/func_scope.h"
#include "scopereg/scope.h"
#include "scopereg/scoped_proxy.h"
#include "scopereg/scoped_registry.h"
#include "scopereg/session_cache.h"
#include "scopereg/thread_scope.h"
#include "scopereg/version.h"

static_assert(SCOPEREG_VERSION >= 100, "scopereg 0.1.0 or later");

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "consumer: FAILED: %s\n", what);
    ++failures;
  }
}

}  // namespace

int main() {
  // Thread strategy: one value per thread, gone at thread exit.
  scopereg::ScopedRegistry<std::string> per_thread([] { return std::string("main"); });
  per_thread() = "changed";
  std::thread([&] { check(per_thread() == "main", "a new thread gets its own value"); }).join();
  check(per_thread() == "changed", "the main thread keeps its value");
  check(per_thread.size() == 1, "the other thread's value died with it");

  // Fiber strategy: one value per fiber, across a yield.
  scopereg::ScopedRegistry<int, scopereg::FiberScope> per_fiber([] { return 0; });
  scopereg::Fiber fiber([&] {
    per_fiber() = 7;
    scopereg::Fiber::yield();
    check(per_fiber() == 7, "a fiber keeps its value across a yield");
  });
  fiber.resume();
  check(per_fiber() == 0, "the main fiber has its own value");
  fiber.resume();
  check(fiber.done(), "the fiber finished");

  // Explicit strategy: a request scope carried into a callback.
  scopereg::ScopedRegistry<int, scopereg::ExplicitScope> per_request([] { return 1; });
  std::function<int()> callback;
  {
    scopereg::ScopeGuard request(std::string("request-42"));
    per_request() = 42;
    callback = scopereg::wrap([&] { return per_request(); });
  }
  int seen = 0;
  std::thread([&] { seen = callback(); }).join();
  check(seen == 42, "a wrapped callback runs in its request's scope");

  // Session cache: named sessions, cleared at the end of the unit of work.
  scopereg::SessionCache<std::string> sessions;
  sessions.add("orders", {.factory = [] { return std::string("orders-session"); }});
  check(sessions.get("orders") == "orders-session", "a named session");
  check(sessions.used().size() == 1, "used() lists it");
  check(sessions.clear_for_current_scope().ok(), "clear_for_current_scope succeeds");
  check(sessions.used().empty(), "nothing used after the clear");

  if (failures == 0) std::printf("consumer: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
