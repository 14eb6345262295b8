// scopereg/fiber_scope.h  (target scopereg::fiber; links Boost.Context)
//
// FiberScope: one registry value per scopereg Fiber (fiber.h, included here), as
// greenlet.getcurrent keys SQLAlchemy's sessions.
//
//   scopereg::ScopedRegistry<Connection, scopereg::FiberScope> conn(open_connection);
//
//   scopereg::Fiber worker([&] {
//     conn().execute("BEGIN");          // this fiber's connection
//     scopereg::Fiber::yield();         // back to whoever resumed us
//     conn().execute("COMMIT");         // still ours, on whatever thread resumed us
//   });
//   worker.resume();                    // runs until the yield
//   worker.resume();                    // runs to the end; the connection is closed here
//
// Contract. A strategy for ScopedRegistry in both forms (`ScopedRegistry<T, FiberScope>`,
// and `FiberScope::func()` for a FuncScope registry):
// * one value per fiber; code outside any fiber gets its thread's main-fiber value;
// * a fiber's values are destroyed on its stack when it finishes (normally or by an
//   exception) or is unwound by destruction; the main fiber's at thread exit;
// * destroying the registry destroys its values in every fiber, running or suspended;
// * a fiber resumed on another thread sees its own values: the running fiber is read
//   afresh at every access (relative to the thread register in an executable, through a
//   call into the library in a shared library's code, see SCOPEREG_TLS_VIA_CALL in
//   internal/context_state.h), never from a thread_local address kept across a switch.
//
// Inside C++20 coroutines: a coroutine is not a fiber. Coroutines run on a fiber (or a
// thread's main fiber) share its value, so coroutines interleaved there see each other's
// values across co_await. Use CoroutineScope (coroutine_scope.h) for per-task values.
// Thread safety: all members may be called from any thread.
// Cost: inside a Fiber, a hit is a thread-local load and two dependent loads, inlined
// (the thread-local through a call where SCOPEREG_TLS_VIA_CALL is set: clang, shared-
// library code); outside any Fiber, one call more (see
// benchmarks/fiber_scope_benchmark.cc). A Fiber's first FiberScope access allocates its
// slot array.

#ifndef SCOPEREG_FIBER_SCOPE_H_
#define SCOPEREG_FIBER_SCOPE_H_

#include "scopereg/fiber.h"  // IWYU pragma: export
#include "scopereg/internal/scope_state.h"
#include "scopereg/scope.h"

namespace scopereg {

class FiberScope {
 public:
  using Token = ScopeToken;
  static constexpr const char* kName = "FiberScope";

  static ScopeToken current() { return getcurrent(); }
  // A ScopeFunc returning getcurrent(), for ScopedRegistry<T, FuncScope>; values there are
  // destroyed when their fiber (or, for the main fiber, its thread) ends.
  static ScopeFunc func();

 private:
  friend struct internal::StrategyAccess;
  static internal::ScopeState* current_state() { return internal::running_fiber_state(); }
};

}  // namespace scopereg

#endif  // SCOPEREG_FIBER_SCOPE_H_
