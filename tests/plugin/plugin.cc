// A plugin that uses scopereg: registries of every strategy, a SessionCache and fibers,
// all owned by the plugin's globals. tests/stress/plugin_test.cc loads it with dlopen, uses
// it from several threads, and unloads it while those threads still hold values. Built
// twice: with scopereg linked in statically, and against scopereg as a shared library.

#include <atomic>
#include <memory>
#include <mutex>
#include <vector>

#include "scopereg/explicit_scope.h"
#include "scopereg/fiber_scope.h"
#include "scopereg/scoped_registry.h"
#include "scopereg/session_cache.h"

namespace {

std::atomic<int>* g_made = nullptr;
std::atomic<int>* g_destroyed = nullptr;

// A value whose constructor and destructor are the plugin's code.
struct Tracked {
  Tracked() { g_made->fetch_add(1); }
  Tracked(const Tracked&) = delete;
  Tracked& operator=(const Tracked&) = delete;
  ~Tracked() { g_destroyed->fetch_add(1); }
};

// Destroyed at dlclose in reverse order: the fibers first (unwound: their values go), then
// the cache and the registries (their values in every thread and scope go).
scopereg::ScopedRegistry<Tracked> by_thread;
scopereg::ScopedRegistry<Tracked, scopereg::ExplicitScope> by_request;
scopereg::ScopedRegistry<Tracked, scopereg::FiberScope> by_fiber;
scopereg::SessionCache<Tracked> sessions;
std::mutex fibers_mu;
std::vector<std::unique_ptr<scopereg::Fiber>> fibers;

}  // namespace

extern "C" __attribute__((visibility("default"))) void plugin_init(std::atomic<int>* made,
                                                                   std::atomic<int>* destroyed) {
  g_made = made;
  g_destroyed = destroyed;
  sessions.add("db", {.factory = [] { return Tracked(); }});
}

// Leaves the calling thread holding values: its thread value, its session, an explicit
// scope kept until ended (which never happens), and a suspended fiber with its own value.
extern "C" __attribute__((visibility("default"))) void plugin_use(int id) {
  by_thread();
  sessions.get("db");
  {
    scopereg::ScopeGuard request(id, scopereg::ScopeLifetime::kUntilEnded);
    by_request();
  }
  auto fiber = std::make_unique<scopereg::Fiber>([] {
    by_fiber();
    scopereg::Fiber::yield();
    by_fiber();
  });
  fiber->resume();
  std::lock_guard<std::mutex> lock(fibers_mu);
  fibers.push_back(std::move(fiber));
}
