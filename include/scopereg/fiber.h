// scopereg/fiber.h  (target scopereg::fiber; links Boost.Context)
//
// Greenlet-style fibers on Boost.Context (its fcontext switch, the one under
// boost::context::fiber) and `getcurrent()`. The FiberScope strategy, one registry value
// per fiber, is in fiber_scope.h.
//
//   scopereg::Fiber worker([&] {
//     step_one();
//     scopereg::Fiber::yield();         // back to whoever resumed us
//     step_two();                       // maybe on another thread
//   });
//   worker.resume();                    // runs until the yield
//   worker.resume();                    // runs to the end
//
// Fibers. A `Fiber` runs a callable on its own stack. `resume()` switches into it from the
// calling context (a thread's implicit main fiber, or another Fiber) and returns when the
// fiber yields or finishes. `Fiber::yield()` switches back to the context that resumed the
// fiber. An exception escaping the callable is rethrown from the `resume()` that finished
// it. A Fiber destroyed while suspended is unwound: its stack objects are destroyed (by
// Boost.Context's forced_unwind exception: any `catch (...)` inside a fiber must rethrow
// `boost::context::detail::forced_unwind`). A suspended fiber may be resumed on any thread.
// Thread safety: one Fiber must not be resumed or destroyed from two threads at once; a
// Fiber must not be resumed while it is running (its own or an ancestor's resume).
//
// Identities. `getcurrent()` returns the running fiber's ScopeToken (kind kFiber), or,
// outside any Fiber, its thread's token (the thread's main fiber, kind kThread). Tokens come
// from a process-wide serial: never reused, unlike addresses.
//
// Per-fiber state. Each fiber is an execution context (internal/context_state.h): what
// scopereg keeps per context -- ExplicitScope's active-scope stack among it -- is saved and
// restored by every switch, so a fiber's ScopeGuards never show in its resumer. Each fiber
// also owns a scope for FiberScope registries, ended on its stack when it finishes.
//
// Shared values: a fiber that asks for a value another context is creating (a scope
// shared by several fibers: their thread's, or one ExplicitScope token) yields while it
// waits, instead of blocking its thread, and looks again when resumed; so a factory that
// yields (a Pool checkout does) lets the other fibers of its thread run, and the waiter
// gets the value that factory made. The cost: a waiter with nothing else to run on its
// thread keeps being resumed (it polls) until a creator on another thread finishes.
//
// Cost: a resume+yield round trip is two Boost.Context switches plus a few thread-local
// stores (see benchmarks/fiber_scope_benchmark.cc); creating a Fiber allocates its stack
// from the allocator given.

#ifndef SCOPEREG_FIBER_H_
#define SCOPEREG_FIBER_H_

#include <cstddef>
#include <functional>
#include <memory>
#include <utility>

#include "boost/context/fixedsize_stack.hpp"
#include "boost/context/stack_context.hpp"
#include "scopereg/internal/fiber_switch.h"
#include "scopereg/internal/scope_state.h"
#include "scopereg/scope.h"

namespace scopereg {

// Default stack size of a Fiber: 64 KiB. Smaller than kMinFiberStackSize is refused.
inline constexpr std::size_t kDefaultFiberStackSize = 64 * 1024;
inline constexpr std::size_t kMinFiberStackSize = 8 * 1024;

namespace internal {

struct FiberContext;

std::unique_ptr<FiberContext, void (*)(FiberContext*)> make_fiber_context(
    std::function<void()> body);
// Takes ownership of `stack` (released with `deallocate`, also when this throws).
void start_fiber(FiberContext* context, boost::context::stack_context stack,
                 std::function<void(boost::context::stack_context&)> deallocate);

// running_fiber_state() when the running fiber has no slots yet (creates them), has ended
// them (null), or there is no running fiber (the thread's). Defined in fiber.cc.
[[gnu::noinline]] ScopeState* running_fiber_state_slow(FiberCore* core);

// The running fiber's scope slots (created on its first use), or, outside any Fiber, the
// calling thread's; null after the fiber's values were destroyed. The running fiber is
// read through running_fiber_core(): afresh from the thread register at every call in an
// executable, through a call into the library in a shared library's code (see
// SCOPEREG_TLS_VIA_CALL), so a fiber resumed on another thread finds that thread's.
inline ScopeState* running_fiber_state() {
  FiberCore* c = running_fiber_core();
  if (c != nullptr) [[likely]] {
    if (ScopeState* state = c->state; state != nullptr) [[likely]] return state;
  }
  return running_fiber_state_slow(c);
}

}  // namespace internal

class Fiber {
 public:
  // Creates a suspended fiber that will run `body` when first resumed. The stack comes
  // from `stack_allocator`, any Boost.Context stack allocator (fixedsize_stack,
  // protected_fixedsize_stack for a guard page, pooled_fixedsize_stack for speed).
  // Throws ScopeError if the stack is smaller than kMinFiberStackSize; whatever the
  // allocator throws (std::bad_alloc) when it cannot allocate.
  template <typename Body, typename StackAllocator = boost::context::fixedsize_stack>
  explicit Fiber(Body&& body,
                 StackAllocator stack_allocator = StackAllocator(kDefaultFiberStackSize))
      : context_(internal::make_fiber_context(std::function<void()>(std::forward<Body>(body)))) {
    boost::context::stack_context stack = stack_allocator.allocate();
    internal::start_fiber(context_.get(), stack,
                          [allocator = std::move(stack_allocator)](
                              boost::context::stack_context& s) mutable {
                            allocator.deallocate(s);
                          });
  }

  Fiber(Fiber&&) noexcept = default;
  Fiber& operator=(Fiber&& other) noexcept;
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;

  // Unwinds the fiber if it is suspended unfinished (its values and stack objects are
  // destroyed); aborts if called from inside the fiber itself.
  ~Fiber();

  // Switches into the fiber until it yields or finishes. Rethrows an exception that
  // escaped the fiber's body. Throws ScopeError if the fiber has finished or is running.
  [[gnu::always_inline]] void resume() {
    internal::FiberCore* c = core();
    if (c != nullptr && c->self != nullptr && !c->running) [[likely]] {
      if (internal::switch_in(c) && !c->error) [[likely]] return;
      return after_switch();
    }
    resume_slow();
  }

  // From inside a Fiber: switches back to the context that resumed it; returns when the
  // fiber is resumed again (possibly on another thread). Throws ScopeError outside a Fiber.
  static void yield() {
    internal::FiberCore* c = internal::running_fiber_core();
    if (c != nullptr) [[likely]] {
      internal::jump_out(c);
      // Possibly on another thread now: no thread_local is touched below.
      if (!c->cancel) [[likely]] return;
      throw_unwind();
    }
    yield_slow();
  }

  // Whether the body has returned (or thrown).
  bool done() const noexcept;

  // This fiber's identity; equal to getcurrent() while it runs.
  ScopeToken token() const noexcept;

 private:
  internal::FiberCore* core() const noexcept;
  void destroy() noexcept;
  void resume_slow();
  // After a switch that finished the fiber or left an exception.
  void after_switch();
  [[noreturn]] static void yield_slow();
  [[noreturn]] static void throw_unwind();
  std::unique_ptr<internal::FiberContext, void (*)(internal::FiberContext*)> context_;
};

// The running fiber's token; outside any Fiber, the calling thread's (its main fiber).
// Never inlined: safe across switches and thread migration.
// Throws: std::bad_alloc when a thread's first call cannot allocate its scope.
ScopeToken getcurrent();

}  // namespace scopereg

#endif  // SCOPEREG_FIBER_H_
