// Fibers on Boost.Context and the FiberScope strategy. The only translation unit of
// scopereg that needs Boost.Context (target scopereg::fiber).

#include "scopereg/fiber_scope.h"

#include <cstdio>
#include <cstdlib>
#include <string>

#include "boost/context/detail/exception.hpp"
#include "boost/context/detail/fcontext.hpp"
#include "scopereg/error.h"
#include "scopereg/explicit_scope.h"
#include "scopereg/thread_scope.h"

#if defined(__SANITIZE_THREAD__)
#define SCOPEREG_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SCOPEREG_TSAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define SCOPEREG_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SCOPEREG_ASAN 1
#endif
#endif
#ifdef SCOPEREG_TSAN
#include <sanitizer/tsan_interface.h>
#endif
#ifdef SCOPEREG_ASAN
#include <sanitizer/common_interface_defs.h>
#endif
// The switch functions: not instrumented under ThreadSanitizer (see below); otherwise
// inlined, because every call level between the switch and the code that resumes costs a
// mispredicted return after each switch.
#if defined(SCOPEREG_TSAN) && defined(__clang__)
#define SCOPEREG_NO_TSAN __attribute__((no_sanitize("thread")))
#elif defined(SCOPEREG_TSAN)
#define SCOPEREG_NO_TSAN __attribute__((no_sanitize_thread))
#else
#define SCOPEREG_NO_TSAN
#endif
#ifdef SCOPEREG_TSAN
#define SCOPEREG_SWITCH SCOPEREG_NO_TSAN __attribute__((noinline))
#else
#define SCOPEREG_SWITCH inline __attribute__((always_inline))
#endif

namespace scopereg {
namespace internal {

namespace fctx = boost::context::detail;

thread_local constinit FiberCore* t_current_fiber = nullptr;

struct FiberContext : FiberCore {
  ~FiberContext() {
    if (deallocate) deallocate(stack);
  }

  std::function<void()> body;
  boost::context::stack_context stack{};
  std::function<void(boost::context::stack_context&)> deallocate;
  ScopeToken token{next_scope_serial(), ScopeKind::kFiber};
  ScopeState* state = nullptr;  // created on first FiberScope access
  bool state_ended = false;  // values destroyed; FiberScope has no scope here any more
  bool token_used = false;   // getcurrent() handed the token out (FuncScope registries)
  // Sanitizer bookkeeping.
  void* tsan_fiber = nullptr;
  void* tsan_resumer = nullptr;
  const void* resumer_bottom = nullptr;
  std::size_t resumer_size = 0;
  void* fake_stack = nullptr;
};

namespace {

FiberContext* current_fiber() noexcept { return static_cast<FiberContext*>(t_current_fiber); }

[[maybe_unused]] const void* stack_bottom(const FiberContext* c) {
  return static_cast<const char*>(c->stack.sp) - c->stack.size;
}

// ---- the switches -------------------------------------------------------------------
// Each stack switch happens inside one of these three leaf functions, which are not
// instrumented by ThreadSanitizer: no instrumented frame is entered on one stack and left
// on another, and every switch is announced to the sanitizers right before it happens.

// Resuming side: switches into `c` until it yields (returns true) or finishes (false).
SCOPEREG_SWITCH bool jump_into(FiberContext* c) {
#ifdef SCOPEREG_TSAN
  c->tsan_resumer = __tsan_get_current_fiber();
  __tsan_switch_to_fiber(c->tsan_fiber, 0);
#endif
#ifdef SCOPEREG_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, stack_bottom(c), c->stack.size);
#endif
  const fctx::transfer_t back = fctx::jump_fcontext(c->self, c);
#ifdef SCOPEREG_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  c->self = back.data != nullptr ? back.fctx : nullptr;  // null data: it finished
  return back.data != nullptr;
}

// Fiber side: back to the resumer; returns when resumed again (maybe on another thread).
SCOPEREG_SWITCH void jump_out(FiberContext* c) {
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

void run_fiber(FiberContext* c) noexcept;

// Fiber side: the first frame on a fiber's stack. Never returns: the last jump leaves the
// stack for good and the resumer frees it.
SCOPEREG_NO_TSAN void fiber_main(fctx::transfer_t in) {
  auto* c = static_cast<FiberContext*>(in.data);
  c->resumer = in.fctx;
#ifdef SCOPEREG_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &c->resumer_bottom, &c->resumer_size);
#endif
  run_fiber(c);
#ifdef SCOPEREG_TSAN
  __tsan_switch_to_fiber(c->tsan_resumer, 0);
#endif
#ifdef SCOPEREG_ASAN
  __sanitizer_start_switch_fiber(nullptr, c->resumer_bottom, c->resumer_size);
#endif
  fctx::jump_fcontext(c->resumer, nullptr);
  std::abort();  // unreachable: a finished fiber is never resumed
}

// ---- bookkeeping around the switches ------------------------------------------------

// Runs on the fiber's stack: destroys the fiber's values while it is still current, so
// destructors that use FiberScope registries land in (and are cleaned with) this scope.
void end_fiber_state(FiberContext* c) noexcept {
  if (c->state != nullptr) {
    c->state->end();  // also reaches ScopeToken-keyed registries
    delete c->state;
    c->state = nullptr;
  } else if (c->token_used) {
    end_scope(c->token);  // values in FuncScope registries only
  }
  c->state_ended = true;
}

void run_fiber(FiberContext* c) noexcept {
  if (!c->cancel) {
    try {
      c->body();
    } catch (boost::context::detail::forced_unwind& unwind) {
#ifndef BOOST_ASSERT_IS_VOID
      unwind.caught = true;  // ours: the Fiber is being destroyed unfinished
#endif
      (void)unwind;
    } catch (...) {
      c->error = std::current_exception();
    }
  }
  c->body = nullptr;  // the body's captures die on the fiber, while it is current
  end_fiber_state(c);
  c->done = true;
}

// Resuming side, once `c` has finished: we are off its stack, which can go now.
void release_finished(FiberContext* c) noexcept {
  c->explicit_top = nullptr;
  c->deallocate(c->stack);
  c->deallocate = nullptr;
}

// Resuming side: make `c` current, switch in, restore the caller's state on return.
inline __attribute__((always_inline)) void switch_in(FiberContext* c) {
  FiberCore* const prev = t_current_fiber;
  ExplicitFrame* const prev_top = t_explicit_top;
  t_explicit_top = c->explicit_top;
  t_current_fiber = c;
  t_fiber_context = c;
  c->running = true;
  const bool suspended = jump_into(c);
  c->running = false;
  c->explicit_top = t_explicit_top;
  t_explicit_top = prev_top;
  t_current_fiber = prev;
  t_fiber_context = prev;
  if (!suspended) release_finished(c);
}

void delete_fiber_context(FiberContext* c) {
#ifdef SCOPEREG_TSAN
  if (c->tsan_fiber != nullptr) __tsan_destroy_fiber(c->tsan_fiber);
#endif
  delete c;
}

}  // namespace

std::unique_ptr<FiberContext, void (*)(FiberContext*)> make_fiber_context(
    std::function<void()> body) {
  auto* c = new FiberContext;
  c->body = std::move(body);
  return {c, &delete_fiber_context};
}

void start_fiber(FiberContext* c, boost::context::stack_context stack,
                 std::function<void(boost::context::stack_context&)> deallocate) {
  c->stack = stack;
  c->deallocate = std::move(deallocate);  // from here on ~FiberContext frees the stack
  if (stack.size < kMinFiberStackSize) {
    throw ScopeError("scopereg: Fiber stack of " + std::to_string(stack.size) +
                     " bytes is below the minimum of " + std::to_string(kMinFiberStackSize) +
                     "; pass a larger stack allocator, e.g. "
                     "boost::context::fixedsize_stack(64 * 1024)");
  }
  c->self = fctx::make_fcontext(stack.sp, stack.size, &fiber_main);
#ifdef SCOPEREG_TSAN
  c->tsan_fiber = __tsan_create_fiber(0);
#endif
}

namespace {
void rethrow_forced_unwind() {
  try {
    throw;
  } catch (const boost::context::detail::forced_unwind&) {
    throw;
  } catch (...) {
  }
}
[[maybe_unused]] const bool g_unwinding_check_installed =
    (set_unwinding_check(&rethrow_forced_unwind), true);
}  // namespace

}  // namespace internal

using internal::FiberContext;
using internal::current_fiber;

Fiber& Fiber::operator=(Fiber&& other) noexcept {
  if (this != &other) {
    destroy();
    context_ = std::move(other.context_);
  }
  return *this;
}

Fiber::~Fiber() { destroy(); }

void Fiber::destroy() noexcept {
  FiberContext* c = context_.get();
  if (c == nullptr) return;
  if (c->running) {
    internal::die_of_misuse(
        "a Fiber was destroyed while running (from inside itself or a fiber it "
                  "resumed); let it finish or yield first");
  }
  while (!c->done) {  // unwind: the fiber throws at its switch-in point and finishes
    c->cancel = true;
    internal::switch_in(c);
  }
  c->error = nullptr;  // an exception from an abandoned fiber is dropped with it
  context_.reset();
}

internal::FiberCore* Fiber::core() const noexcept { return context_.get(); }

void Fiber::after_switch(boost::context::detail::fcontext_t self) {
  FiberContext* c = context_.get();
  c->self = self;
  if (self == nullptr) internal::release_finished(c);
  if (c->error) std::rethrow_exception(std::exchange(c->error, nullptr));
}

void Fiber::throw_unwind() { throw boost::context::detail::forced_unwind(); }

void Fiber::resume_slow() {
  FiberContext* c = context_.get();
  if (c == nullptr) throw ScopeError("scopereg: resume() on a moved-from Fiber");
  if (c->done) {
    throw ScopeError("scopereg: Fiber::resume: the fiber has finished; create a new Fiber");
  }
  if (c->running) {
    throw ScopeError(
        "scopereg: Fiber::resume: the fiber is running; a fiber cannot resume itself or a "
        "fiber below it in the resume chain (yield instead)");
  }
  internal::switch_in(c);
  if (c->error) std::rethrow_exception(std::exchange(c->error, nullptr));
}

void Fiber::yield_slow() {
  FiberContext* c = current_fiber();
  if (c == nullptr) {
    throw ScopeError(
        "scopereg: Fiber::yield() called outside a Fiber; only code running inside a "
        "scopereg::Fiber can yield");
  }
  internal::jump_out(c);
  if (c->cancel) throw boost::context::detail::forced_unwind();  // being destroyed
}

bool Fiber::done() const noexcept { return context_ == nullptr || context_->done; }

ScopeToken Fiber::token() const noexcept {
  return context_ != nullptr ? context_->token : ScopeToken();
}

ScopeToken getcurrent() noexcept {
  FiberContext* c = current_fiber();
  if (c == nullptr) return ThreadScope::current();
  c->token_used = true;
  return c->token;
}

ScopeFunc FiberScope::func() {
  return [] { return getcurrent(); };
}

internal::ScopeState* FiberScope::current_state() {
  FiberContext* c = current_fiber();
  if (c == nullptr) return ThreadScope::current_state();
  if (c->state != nullptr) [[likely]] return c->state;
  if (c->state_ended) return nullptr;  // a destructor after the fiber's values were destroyed
  c->state = new internal::ScopeState(c->token);
  return c->state;
}

}  // namespace scopereg
