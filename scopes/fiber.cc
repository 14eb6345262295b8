// scopereg's fibers on Boost.Context: stacks, the first and last frames of a fiber,
// destruction by unwinding, getcurrent(), and each fiber's scope for FiberScope. The
// switch itself is internal/fiber_switch.h.

#include "scopereg/fiber.h"

#include <cstdlib>
#include <string>

#include "boost/context/detail/exception.hpp"
#include "scopereg/error.h"
#include "scopereg/explicit_scope.h"
#include "scopereg/internal/creation.h"
#include "scopereg/thread_scope.h"

namespace scopereg {
namespace internal {

thread_local constinit FiberCore* t_current_fiber = nullptr;

FiberCore** current_fiber_address() noexcept { return &t_current_fiber; }

struct FiberContext : FiberCore {
  FiberContext() { saved.id = static_cast<FiberCore*>(this); }
  ~FiberContext() {
    if (deallocate) deallocate(stack);
  }

  std::function<void()> body;
  boost::context::stack_context stack{};
  std::function<void(boost::context::stack_context&)> deallocate;
  ScopeToken token = new_scope_token(ScopeKind::kFiber);
  bool state_ended = false;  // values destroyed; FiberScope has no scope here any more
  bool token_used = false;   // getcurrent() handed the token out (FuncScope registries)
};

namespace {

FiberContext* current_fiber() noexcept { return static_cast<FiberContext*>(t_current_fiber); }

ScopeState* live_state(FiberCore* core) noexcept {
  auto* c = static_cast<FiberContext*>(core);
  return c != nullptr && !c->state_ended ? c->state : nullptr;
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

// Runs on the fiber's stack: destroys the fiber's values while it is still current, so
// destructors that use FiberScope registries land in (and are cleaned with) this scope.
void end_fiber_state(FiberContext* c) noexcept {
  if (c->state == nullptr && c->token_used) {
    // Values in FuncScope registries only. One of their destructors may still make a
    // FiberScope value here (its slots are created then): ended just below.
    end_scope(c->token);
  }
  if (c->state != nullptr) {
    // Its values stop being current before they die (scope_switch.h).
    if (switch_hooks_active()) [[unlikely]] notify_switch(c->state, nullptr);
    c->state->end();  // also reaches token-keyed registries
    delete c->state;
    c->state = nullptr;
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

}  // namespace

void notify_fiber_switch(FiberCore* from, const ContextState& from_context, FiberCore* to,
                         const ContextState& to_context) noexcept {
  notify_switch(frame_state(from_context.explicit_top), frame_state(to_context.explicit_top));
  notify_switch(live_state(from), live_state(to));
}

namespace {

// Resuming side, once `c` has finished: we are off its stack, which can go now.
void release_finished(FiberContext* c) noexcept {
  c->saved.explicit_top = nullptr;
  c->deallocate(c->stack);
  c->deallocate = nullptr;
}

void delete_fiber_context(FiberContext* c) {
#ifdef SCOPEREG_TSAN
  if (c->tsan_fiber != nullptr) __tsan_destroy_fiber(c->tsan_fiber);
#endif
  delete c;
}

void rethrow_forced_unwind() {
  try {
    throw;
  } catch (const boost::context::detail::forced_unwind&) {
    throw;
  } catch (...) {
  }
}
bool in_fiber() noexcept { return t_current_fiber != nullptr; }
void yield_fiber() { Fiber::yield(); }

[[maybe_unused]] const bool g_hooks_installed =
    (set_unwinding_check(&rethrow_forced_unwind), set_yield_hooks(&in_fiber, &yield_fiber), true);

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
  c->stack_bottom = static_cast<const char*>(stack.sp) - stack.size;
  c->stack_size = stack.size;
  c->self = fctx::make_fcontext(stack.sp, stack.size, &fiber_main);
#ifdef SCOPEREG_TSAN
  c->tsan_fiber = __tsan_create_fiber(0);
#endif
}

ScopeState* running_fiber_state_slow(FiberCore* core) {
  if (core == nullptr) return thread_state();
  auto* c = static_cast<FiberContext*>(core);
  if (c->state_ended) return nullptr;  // a destructor after the fiber's values were destroyed
  if (c->state == nullptr) c->state = new ScopeState(c->token);
  return c->state;
}

}  // namespace internal

using internal::FiberContext;

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
    if (!internal::switch_in(c)) internal::release_finished(c);
  }
  c->error = nullptr;  // an exception from an abandoned fiber is dropped with it
  context_.reset();
}

internal::FiberCore* Fiber::core() const noexcept { return context_.get(); }

void Fiber::after_switch() {
  FiberContext* c = context_.get();
  if (c->self == nullptr) internal::release_finished(c);
  if (c->error) std::rethrow_exception(std::exchange(c->error, nullptr));
}

void Fiber::throw_unwind() { throw boost::context::detail::forced_unwind(); }

void Fiber::resume_slow() {
  FiberContext* c = context_.get();
  if (c == nullptr) throw ScopeError("scopereg: resume() on a moved-from Fiber");
  if (c->done) {
    throw ScopeError("scopereg: Fiber::resume: the fiber has finished; create a new Fiber");
  }
  throw ScopeError(
      "scopereg: Fiber::resume: the fiber is running; a fiber cannot resume itself or a "
      "fiber below it in the resume chain (yield instead)");
}

void Fiber::yield_slow() {
  throw ScopeError(
      "scopereg: Fiber::yield() called outside a Fiber; only code running inside a "
      "scopereg::Fiber can yield");
}

bool Fiber::done() const noexcept { return context_ == nullptr || context_->done; }

ScopeToken Fiber::token() const noexcept {
  return context_ != nullptr ? context_->token : ScopeToken();
}

ScopeToken getcurrent() {
  FiberContext* c = internal::current_fiber();
  if (c == nullptr) return ThreadScope::current();
  c->token_used = true;
  return c->token;
}

}  // namespace scopereg
