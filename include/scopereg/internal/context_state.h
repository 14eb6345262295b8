// scopereg/internal/context_state.h -- not part of the public API.
//
// What a context switch saves and restores for the rest of scopereg: the one interface
// between runtimes (scopereg's fibers today, any later adaptor) and the parts of scopereg
// whose state belongs to the running execution context rather than to the OS thread.
//
// An execution context is a thread's own flow of control, or a scopereg Fiber running on
// it. The running context's state is `t_context`; a suspended context keeps its own copy.
// A runtime that switches contexts on a thread does, around the switch:
//
//   ContextState saved = enter_context(fiber.state);   // before switching in
//   ... the fiber runs, then switches back ...
//   fiber.state = leave_context(saved);                // once back on the resumer
//
// Adding a field here is the whole job of giving some part of scopereg per-context state:
// every runtime saves and restores the struct as a whole.
//
// Fields:
// * explicit_top: the innermost ExplicitScope frame (explicit_scope.h): per context, so a
//   fiber's ScopeGuards never show in the fiber that resumed it.
// * id: identifies the running context for the creation protocol (a factory re-entering
//   its own registry is told so instead of waiting for itself). Null means "the thread
//   itself"; current_context_id() turns that into a per-thread address.
//
// * task: the coroutine task (coroutine_scope.h) whose scope is installed in this context,
//   or null. A task keeps its own active-scope stack in `task->top` while it is suspended;
//   guards entered while it runs update it too, so a task resumed on another thread finds
//   its guards there without anything being copied back at suspension (which would race
//   with a resumption already under way elsewhere).
//
// Cost: a constant-initialised, trivially destructible thread_local: no init guard, and a
// switch copies three words in and three words out.

#ifndef SCOPEREG_INTERNAL_CONTEXT_STATE_H_
#define SCOPEREG_INTERNAL_CONTEXT_STATE_H_

#include <atomic>

namespace scopereg::internal {

struct ExplicitFrame;
class ScopeState;

// A coroutine task's own state (scopereg::TaskScope). `top` is written only by code running
// in the task (one resumption at a time) and read when the task is installed; relaxed
// atomics, because an adaptor may still run the task's last resumption's tail (after the
// coroutine suspended) on one thread while the next resumption starts on another.
struct TaskHead {
  std::atomic<ExplicitFrame*> top{nullptr};
  ScopeState* scope = nullptr;  // the task's own scope (CoroutineScope), or null
};

struct ContextState {
  ExplicitFrame* explicit_top = nullptr;
  const void* id = nullptr;
  TaskHead* task = nullptr;
};

// The thread_locals that headers read inline (so in the user's own functions, which may
// yield a fiber that is then resumed on another thread, and read again) are read inline
// only where that was checked: x86-64 code compiled by g++ into an executable (PIE or
// not). There g++ 12 folds each of these reads into a load relative to the thread
// register (%fs:offset, or %fs:(reg) with the offset kept in a register, which is the same
// on every thread). Everywhere else they are read through small non-inlined functions of
// the library (about 1 ns per hit), because a compiler may keep a thread-local's
// *address* across a call, and so across a fiber switch inside it:
// * in a shared library's code (__PIC__ without __PIE__) g++ and clang call
//   __tls_get_addr once per function and keep the address (checked with g++ 12 -fPIC
//   -O2; llvm/llvm-project#98479);
// * g++ and clang both keep an address they had to materialise (%fs:0 plus the offset)
//   across calls (checked with g++ 12 and clang 14 -O2 -fPIE); clang does so more
//   readily, and under LTO was seen doing it to plain reads across a Boost.Context
//   switch (userver-framework/userver#235, #242);
// * other architectures were not checked.
// Define SCOPEREG_TLS_VIA_CALL to 0 or 1 before including scopereg to choose yourself.
// Whole-program LTO can also inline scopereg's own .cc functions, which read these
// variables by name, into a function that yields between two of them: with fibers that
// move between threads, do not build scopereg's objects with LTO (jemalloc/jemalloc#2944
// shows the same hazard for malloc). (The initial-exec TLS model would fix the
// shared-library case, but it puts the library's whole TLS block in static TLS, and a
// shared scopereg then fails to dlopen: "cannot allocate memory in static TLS block".)
// scopereg's own hot paths (its ScopeFuncs, a guard's frame push and pop) read the
// variables by name in its .cc files: none of those functions reads one, runs code that
// may switch fibers, and reads it again. Known limit: an inline helper compiled both ways
// (an executable's and a shared library's code) is formally two definitions of one inline
// function; each is correct where it is not inlined.
#if !defined(SCOPEREG_TLS_VIA_CALL)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !(defined(__PIC__) && !defined(__PIE__))
#define SCOPEREG_TLS_VIA_CALL 0
#else
#define SCOPEREG_TLS_VIA_CALL 1
#endif
#endif

// The running context's state. Defined in registry/context_state.cc.
extern thread_local constinit ContextState t_context;
// &t_context, never inlined (see SCOPEREG_TLS_VIA_CALL).
ContextState* context_state_address() noexcept;
// The running context's state, for code in headers.
inline ContextState& this_context() noexcept {
#if SCOPEREG_TLS_VIA_CALL
  return *context_state_address();
#else
  return t_context;
#endif
}

// Makes `next` the running context's state and returns the state it replaces.
[[gnu::always_inline]] inline ContextState enter_context(const ContextState& next) noexcept {
  const ContextState prev = this_context();
  this_context() = next;
  return prev;
}

// Restores `prev` (what enter_context returned) and returns the leaving context's state,
// for it to keep while suspended.
[[gnu::always_inline]] inline ContextState leave_context(const ContextState& prev) noexcept {
  const ContextState mine = this_context();
  this_context() = prev;
  return mine;
}

// Called after the running context's explicit stack changed: a coroutine task installed
// here keeps its own copy of the top (see TaskHead), written through at once.
[[gnu::always_inline]] inline void publish_task_top() noexcept {
  if (TaskHead* task = this_context().task) [[unlikely]] {
    task->top.store(this_context().explicit_top, std::memory_order_relaxed);
  }
}

// The running context's identity: its `id`, or the calling thread's own address.
const void* current_context_id() noexcept;

}  // namespace scopereg::internal

#endif  // SCOPEREG_INTERNAL_CONTEXT_STATE_H_
