#include "scopereg/internal/context_state.h"

namespace scopereg::internal {

thread_local constinit ContextState t_context;

ContextState* context_state_address() noexcept { return &t_context; }

namespace {
thread_local constinit char t_thread_identity = 0;
}  // namespace

const void* current_context_id() noexcept {
  return t_context.id != nullptr ? t_context.id : &t_thread_identity;
}

}  // namespace scopereg::internal
