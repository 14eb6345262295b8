#include "scopereg/coroutine_scope.h"

#include "scopereg/internal/creation.h"

namespace scopereg {

void TaskScope::misplaced_leave() noexcept {
  internal::die_of_misuse(
      "a coroutine task's scope was left on a thread where it is not the innermost "
      "installed context (TaskScope::leave() without enter(), or TaskScope::Installed "
      "objects destroyed out of order); pair every enter() with one leave() on the same "
      "thread, and pass every awaiter of the task through scoped_await()");
}

ScopeFunc CoroutineScope::func() {
  return [] {  // t_context by name: never through a call (context_state.h)
    internal::TaskHead* task = internal::t_context.task;
    internal::ScopeState* state = task != nullptr ? task->scope : nullptr;
    return state != nullptr ? state->token() : ScopeToken();
  };
}

}  // namespace scopereg
