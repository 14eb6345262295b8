// scopereg/internal/fiber_switch.h -- not part of the public API (target scopereg::fiber).
//
// The stack switch of scopereg's fibers, written once: `switch_in` (the resuming side:
// make the fiber the running context, jump in, restore on return) and `jump_out` (the
// fiber side: jump back to whoever resumed it). Fiber::resume()/yield() (fiber.h) and the
// out-of-line paths in fiber.cc all call these.
//
// They are always inlined: every call level between a switch and the code that resumes
// after it costs a mispredicted return after each switch. Under ThreadSanitizer the two
// leaf functions that actually switch stacks (`jump_into`, `jump_out`) are instead kept
// out of line and uninstrumented, so no instrumented frame is entered on one stack and
// left on another; under AddressSanitizer and ThreadSanitizer every switch is announced
// right before it happens.

#ifndef SCOPEREG_INTERNAL_FIBER_SWITCH_H_
#define SCOPEREG_INTERNAL_FIBER_SWITCH_H_

#include <cstddef>
#include <exception>

#include "boost/context/detail/fcontext.hpp"
#include "scopereg/internal/context_state.h"
#include "scopereg/internal/sanitizers.h"
#include "scopereg/internal/switch_hooks.h"

#ifdef SCOPEREG_TSAN
#include <sanitizer/tsan_interface.h>
#endif
#ifdef SCOPEREG_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

#ifdef SCOPEREG_TSAN
#define SCOPEREG_SWITCH SCOPEREG_NO_TSAN __attribute__((noinline))
#else
#define SCOPEREG_SWITCH [[gnu::always_inline]]
#endif

namespace scopereg::internal {

namespace fctx = boost::context::detail;

// What a switch touches of a fiber, and its FiberScope slots, which FiberScope's inline
// hit reads (fiber.cc's FiberContext has the rest).
struct FiberCore {
  fctx::fcontext_t self = nullptr;     // the fiber, while suspended; null once finished
  fctx::fcontext_t resumer = nullptr;  // whom to switch back to
  ContextState saved;                  // the fiber's context state while suspended
  std::exception_ptr error;            // escaped the body; rethrown by resume()
  bool running = false;
  bool done = false;
  bool cancel = false;  // destroyed unfinished: unwind at the next switch-in
  ScopeState* state = nullptr;  // FiberScope's slots: created on first use, null once ended
  // The fiber's stack, and sanitizer bookkeeping.
  const void* stack_bottom = nullptr;
  std::size_t stack_size = 0;
  void* tsan_fiber = nullptr;
  void* tsan_resumer = nullptr;
  const void* resumer_bottom = nullptr;
  std::size_t resumer_size = 0;
  void* fake_stack = nullptr;
};

// The running scopereg fiber on this thread, or null. Defined in fiber.cc.
extern thread_local constinit FiberCore* t_current_fiber;
FiberCore** current_fiber_address() noexcept;  // &t_current_fiber, never inlined
// t_current_fiber for code in headers: through a call in a shared library's code, where a
// compiler keeps a thread_local's address across calls (SCOPEREG_TLS_VIA_CALL in
// context_state.h): a fiber that yields in a loop and is resumed on another thread must
// find that thread's running fiber, not the old thread's.
inline FiberCore*& running_fiber_core() noexcept {
#if SCOPEREG_TLS_VIA_CALL
  return *current_fiber_address();
#else
  return t_current_fiber;
#endif
}

// Resuming side: switches into `c` until it yields (returns true) or finishes (false).
SCOPEREG_SWITCH inline bool jump_into(FiberCore* c) {
#ifdef SCOPEREG_TSAN
  c->tsan_resumer = __tsan_get_current_fiber();
  __tsan_switch_to_fiber(c->tsan_fiber, 0);
#endif
#ifdef SCOPEREG_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, c->stack_bottom, c->stack_size);
#endif
  const fctx::transfer_t back = fctx::jump_fcontext(c->self, c);
#ifdef SCOPEREG_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  c->self = back.data != nullptr ? back.fctx : nullptr;  // null data: it finished
  return back.data != nullptr;
}

// Fiber side: back to the resumer; returns when resumed again, possibly on another
// thread (nothing thread-local is touched after the jump).
SCOPEREG_SWITCH inline void jump_out(FiberCore* c) {
#ifdef SCOPEREG_TSAN
  __tsan_switch_to_fiber(c->tsan_resumer, 0);
#endif
#ifdef SCOPEREG_ASAN
  __sanitizer_start_switch_fiber(&c->fake_stack, c->resumer_bottom, c->resumer_size);
#endif
  const fctx::transfer_t in = fctx::jump_fcontext(c->resumer, c);
  c->resumer = in.fctx;
#ifdef SCOPEREG_ASAN
  __sanitizer_finish_switch_fiber(c->fake_stack, &c->resumer_bottom, &c->resumer_size);
#endif
}

// Resuming side: makes `c` the running fiber and context, switches in, and restores the
// resumer's state when it comes back (on the resumer's own stack and thread: a resumer
// cannot migrate while it waits here). Returns true if `c` suspended, false if it
// finished. Requires: `c` suspended, not running.
// Scope-switch hooks (scope_switch.h) for a switch from one context to another: the
// explicit scopes each context has current, and the fibers' own scopes. In fiber.cc.
void notify_fiber_switch(FiberCore* from, const ContextState& from_context, FiberCore* to,
                         const ContextState& to_context) noexcept;

[[gnu::always_inline]] inline bool switch_in(FiberCore* c) {
  FiberCore* const prev = running_fiber_core();
  const ContextState resumer = enter_context(c->saved);
  running_fiber_core() = c;
  if (switch_hooks_active()) [[unlikely]] notify_fiber_switch(prev, resumer, c, c->saved);
  c->running = true;
  const bool suspended = jump_into(c);
  c->running = false;
  running_fiber_core() = prev;
  c->saved = leave_context(resumer);
  if (switch_hooks_active()) [[unlikely]] notify_fiber_switch(c, c->saved, prev, resumer);
  return suspended;
}

}  // namespace scopereg::internal

#endif  // SCOPEREG_INTERNAL_FIBER_SWITCH_H_
