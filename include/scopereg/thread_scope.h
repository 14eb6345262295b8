// scopereg/thread_scope.h
//
// ThreadScope: one value per OS thread, the default strategy of ScopedRegistry
// (SQLAlchemy's ThreadLocalRegistry, Python's threading.local).
//
//   scopereg::ScopedRegistry<Connection> conn([] { return Connection::open(); });
//   conn().query(...);    // this thread's connection, opened on first use
//
// Contract:
// * Each thread gets its own value; a thread never sees another's.
// * A thread's values are destroyed at its exit, on that thread, after its own C++
//   thread_local objects that were constructed later (the main thread's at exit()).
//   A value whose destructor uses other registries works: values it creates in the dying
//   thread are destroyed too (in up to 8 rounds; then creation there throws ScopeError).
// * A new thread never sees a dead thread's value, even when the OS reuses its id: the
//   token is a process-wide serial, not std::thread::id.
// * Values whose destructors run during process exit may use scopereg: its own state is
//   never destroyed.
//
// Inside C++20 coroutines: the value belongs to the thread, not to the coroutine. Every
// coroutine the thread runs shares it (on an event loop, all of them: one request's session
// handed to another), and a coroutine resumed on another thread after co_await finds that
// thread's value, not the one it used before. Use CoroutineScope (coroutine_scope.h,
// scopereg/asio.h) for per-task values.
// Thread safety: all static members may be called from any thread.
// Cost: a hit is one constant-initialised thread_local load plus two loads for a thread's
// first registry, four for others (no lock, no hashing); a thread's first access
// allocates its scope state (its first value sits inline; a slot array follows when a
// second registry's value arrives) and registers its exit hook.
// Fibers: a fiber resumed on another thread sees that thread's value here; use FiberScope
// for one value per fiber. The hit reads a thread_local inline only in x86-64 executables
// built by g++ (which re-reads it relative to the thread register at every access), and
// through a call into the library everywhere else (clang, shared-library code, other
// architectures), where a compiler may keep the variable's address across a fiber switch
// (SCOPEREG_TLS_VIA_CALL in internal/context_state.h). Known limit: whole-program LTO
// over scopereg's own objects can still inline such a read into code that yields.

#ifndef SCOPEREG_THREAD_SCOPE_H_
#define SCOPEREG_THREAD_SCOPE_H_

#include "scopereg/internal/scope_state.h"
#include "scopereg/scope.h"

namespace scopereg {
namespace internal {
extern thread_local constinit ScopeState* t_thread_state;
ScopeState* thread_state_via_call() noexcept;  // t_thread_state (SCOPEREG_TLS_VIA_CALL)
ScopeState* make_thread_state();
// The calling thread's slots, created on first use (also used by the fiber strategies
// for code on a thread's main context).
inline ScopeState* thread_state() {
#if SCOPEREG_TLS_VIA_CALL
  ScopeState* state = thread_state_via_call();
#else
  ScopeState* state = t_thread_state;
#endif
  if (state != nullptr) [[likely]] return state;
  return make_thread_state();
}
}  // namespace internal

class ThreadScope {
 public:
  using Token = ScopeToken;
  static constexpr const char* kName = "ThreadScope";

  // The calling thread's token (kind kThread), never reused in the life of the process.
  static ScopeToken current() { return internal::thread_state()->token(); }

  // A ScopeFunc returning current(): use it with ScopedRegistry<T, FuncScope>. Values
  // keyed by a thread's token are destroyed at that thread's exit in those registries too.
  static ScopeFunc func();


 private:
  friend struct internal::StrategyAccess;
  static internal::ScopeState* current_state() { return internal::thread_state(); }
};

}  // namespace scopereg

#endif  // SCOPEREG_THREAD_SCOPE_H_
