// scopereg/fiber_scope.h  (target scopereg::fiber; links Boost.Context)
//
// Greenlet-style fibers on Boost.Context (its fcontext switch, the one under
// boost::context::fiber), `getcurrent()`, and FiberScope: one registry
// value per fiber, destroyed when the fiber finishes or is destroyed unfinished.
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
// FiberScope. A strategy for ScopedRegistry in both forms (`ScopedRegistry<T, FiberScope>`,
// and `FiberScope::func()` for a FuncScope registry):
// * one value per fiber; code outside any fiber gets its thread's main-fiber value;
// * a fiber's values are destroyed on its stack when it finishes (normally or by an
//   exception) or is unwound by destruction; the main fiber's at thread exit;
// * destroying the registry destroys its values in every fiber, running or suspended;
// * a fiber resumed on another thread sees its own values: the current fiber is always
//   read through a call into scopes/fiber_scope.cc (never a thread_local address the
//   compiler could keep across a switch, llvm/llvm-project#98479).
// ExplicitScope's active-scope stack is per fiber: resume() and yield() swap it.
//
// Cost: a FiberScope hit is one non-inlined call plus two loads; a resume+yield round trip
// is two Boost.Context switches plus a few thread-local stores (see
// benchmarks/fiber_scope_benchmark.cc). A Fiber's first FiberScope access allocates its
// slot array; creating a Fiber allocates its stack from the allocator given.

#ifndef SCOPEREG_FIBER_SCOPE_H_
#define SCOPEREG_FIBER_SCOPE_H_

#include <cstddef>
#include <exception>
#include <functional>
#include <memory>
#include <utility>

#include "boost/context/detail/fcontext.hpp"
#include "boost/context/fixedsize_stack.hpp"
#include "boost/context/stack_context.hpp"
#include "scopereg/internal/scope_state.h"
#include "scopereg/scope.h"

namespace scopereg {

// Default stack size of a Fiber: 64 KiB. Smaller than kMinFiberStackSize is refused.
inline constexpr std::size_t kDefaultFiberStackSize = 64 * 1024;
inline constexpr std::size_t kMinFiberStackSize = 8 * 1024;

namespace internal {

struct FiberContext;
struct ExplicitFrame;

// The fields the switch itself touches (FiberContext, in scopes/fiber_scope.cc, has the
// rest). Kept in the header so that resume() and yield() can switch without a call level
// of their own: every call level around a stack switch costs a mispredicted return.
struct FiberCore {
  boost::context::detail::fcontext_t self = nullptr;     // the fiber, while suspended
  boost::context::detail::fcontext_t resumer = nullptr;  // whom to switch back to
  ExplicitFrame* explicit_top = nullptr;  // the fiber's ExplicitScope stack while suspended
  std::exception_ptr error;
  bool running = false;
  bool done = false;
  bool cancel = false;  // destroyed unfinished: unwind at the next switch-in
};

extern thread_local constinit FiberCore* t_current_fiber;
extern thread_local constinit const void* t_fiber_context;
extern thread_local constinit ExplicitFrame* t_explicit_top;

// Sanitizer builds annotate every switch; they take the out-of-line paths.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SCOPEREG_FIBER_INLINE_SWITCH 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define SCOPEREG_FIBER_INLINE_SWITCH 0
#endif
#endif
#ifndef SCOPEREG_FIBER_INLINE_SWITCH
#define SCOPEREG_FIBER_INLINE_SWITCH 1
#endif

std::unique_ptr<FiberContext, void (*)(FiberContext*)> make_fiber_context(
    std::function<void()> body);
// Takes ownership of `stack` (released with `deallocate`, also when this throws).
void start_fiber(FiberContext* context, boost::context::stack_context stack,
                 std::function<void(boost::context::stack_context&)> deallocate);

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
  void resume() {
#if SCOPEREG_FIBER_INLINE_SWITCH
    internal::FiberCore* c = core();
    if (c != nullptr && c->self != nullptr && !c->running) [[likely]] {
      internal::FiberCore* const prev = internal::t_current_fiber;
      internal::ExplicitFrame* const prev_top = internal::t_explicit_top;
      internal::t_explicit_top = c->explicit_top;
      internal::t_current_fiber = c;
      internal::t_fiber_context = c;
      c->running = true;
      const boost::context::detail::transfer_t back =
          boost::context::detail::jump_fcontext(c->self, c);
      // Back on our own stack and thread (a resumer cannot migrate while it waits here).
      c->running = false;
      internal::t_current_fiber = prev;
      internal::t_fiber_context = prev;
      if (back.data != nullptr && !c->error) [[likely]] {
        c->self = back.fctx;
        c->explicit_top = internal::t_explicit_top;
        internal::t_explicit_top = prev_top;
        return;
      }
      internal::t_explicit_top = prev_top;
      return after_switch(back.data != nullptr ? back.fctx : nullptr);
    }
#endif
    resume_slow();
  }

  // From inside a Fiber: switches back to the context that resumed it; returns when the
  // fiber is resumed again (possibly on another thread). Throws ScopeError outside a Fiber.
  static void yield() {
#if SCOPEREG_FIBER_INLINE_SWITCH
    internal::FiberCore* c = internal::t_current_fiber;
    if (c != nullptr) [[likely]] {
      const boost::context::detail::transfer_t in =
          boost::context::detail::jump_fcontext(c->resumer, c);
      // Possibly on another thread now: no thread_local is touched below.
      c->resumer = in.fctx;
      if (!c->cancel) [[likely]] return;
      throw_unwind();
    }
#endif
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
  // After an inline switch that finished the fiber (`self` null) or left an exception.
  void after_switch(boost::context::detail::fcontext_t self);
  static void yield_slow();
  [[noreturn]] static void throw_unwind();
  std::unique_ptr<internal::FiberContext, void (*)(internal::FiberContext*)> context_;
};

// The running fiber's token; outside any Fiber, the calling thread's (its main fiber).
// Never inlined: safe across switches and thread migration.
ScopeToken getcurrent() noexcept;

// FiberScope: the strategy. Thread safety: all members may be called from any thread.
class FiberScope {
 public:
  using Token = ScopeToken;
  static constexpr const char* kName = "FiberScope";

  static ScopeToken current() noexcept { return getcurrent(); }
  // A ScopeFunc returning getcurrent(), for ScopedRegistry<T, FuncScope>; values there are
  // destroyed when their fiber (or, for the main fiber, its thread) ends.
  static ScopeFunc func();
  // Internal fast path (non-inlined; see the file comment).
  static internal::ScopeState* current_state();
};

}  // namespace scopereg

#endif  // SCOPEREG_FIBER_SCOPE_H_
