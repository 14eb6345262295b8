#include "scopereg/thread_scope.h"

#include <pthread.h>

#include <cstdlib>

namespace scopereg {
namespace internal {

thread_local constinit ScopeState* t_thread_state = nullptr;

ScopeState* thread_state_via_call() noexcept { return t_thread_state; }

namespace {

void end_thread_state(ScopeState* state) {
  // t_thread_state still points at the dying state while its values are destroyed, so a
  // destructor that uses another registry on this thread lands in it and is cleaned too.
  state->end();
  t_thread_state = nullptr;
  delete state;
}

// Runs at thread exit (and, for the main thread, at exit()) with the other C++
// thread_local destructors. Touched only on a thread's first access, never on a hit.
struct ThreadExitHook {
  ScopeState* state = nullptr;
  ~ThreadExitHook() {
    ScopeState* s = state;
    state = nullptr;
    exited = true;
    if (s != nullptr) end_thread_state(s);
  }
  static thread_local bool exited;
};
thread_local constinit bool ThreadExitHook::exited = false;
thread_local ThreadExitHook t_exit_hook;

// A thread_local destructor that runs after ours and uses a registry gets a fresh state;
// a pthread key destructor (which glibc runs after all thread_local destructors) ends it.
pthread_key_t late_key() {
  static const pthread_key_t key = [] {
    pthread_key_t k;
    if (pthread_key_create(&k, [](void* p) { end_thread_state(static_cast<ScopeState*>(p)); }) != 0) {
      std::abort();
    }
    return k;
  }();
  return key;
}

}  // namespace

ScopeState* make_thread_state() {
  auto* state = new ScopeState(ScopeKind::kThread);
  t_thread_state = state;
  if (!ThreadExitHook::exited) {
    t_exit_hook.state = state;
  } else {
    pthread_setspecific(late_key(), state);
  }
  return state;
}

}  // namespace internal

ScopeFunc ThreadScope::func() {
  return [] {  // t_thread_state by name: never through a call (context_state.h)
    internal::ScopeState* state = internal::t_thread_state;
    return (state != nullptr ? state : internal::make_thread_state())->token();
  };
}

}  // namespace scopereg
