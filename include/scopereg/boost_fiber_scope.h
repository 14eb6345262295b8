// scopereg/boost_fiber_scope.h  (target scopereg::boost_fiber; links Boost.Fiber)
//
// BoostFiberScope: one registry value per boost::fibers::fiber, for programs that already
// run Boost.Fiber's scheduler (use FiberScope with scopereg's own fibers otherwise).
//
//   scopereg::ScopedRegistry<Session, scopereg::BoostFiberScope> session(make_session);
//   boost::fibers::fiber([] { session().query(...); }).join();
//
// Contract:
// * one value per Boost.Fiber fiber; code on a thread's main context (outside any
//   boost::fibers::fiber) gets its thread's value, destroyed at thread exit. (Unlike
//   boost::fibers::fiber_specific_ptr, the main context's values are not leaked,
//   boostorg/fiber#211.)
// * a fiber's values are destroyed when Boost.Fiber releases the fiber's context (after it
//   terminated and was joined or detached), on that thread;
// * destroying the registry destroys its values in every fiber;
// * tokens (kind kBoostFiber) are never reused, unlike fiber ids or addresses.
// ExplicitScope's active-scope stack is per thread here, not per Boost.Fiber fiber: wrap()
// callables to carry a request scope across fibers.
// Misuse: Boost.Fiber fibers of one thread count as one context for the creation protocol.
// A factory that suspends its fiber (a fiber mutex, a channel, a yield) while another fiber
// of the same thread asks the same registry for the same scope's value (a shared scope:
// the thread's main context, or one ExplicitScope token) makes that second caller get a
// ScopeError as if the factory had re-entered itself. Do not suspend inside a factory of a
// value other fibers share.
//
// Inside C++20 coroutines: coroutines running on one Boost.Fiber fiber share its value
// across co_await, as with FiberScope. Use CoroutineScope (coroutine_scope.h) per task.
// Thread safety: any thread; fibers may migrate between threads (work_stealing,
// shared_work). Cost: a hit is a per-thread cache check (was this frame address seen in
// the fiber seen last, and has no fiber ended since) plus two loads, about 1 ns here; on a miss (the first access after a switch to another fiber, after any fiber
// ended, from a call site not among the last four seen or deeper into the fiber's stack
// than half of Boost's stack_traits::minimum_size() (at most 8 KiB), or with a Boost other
// than 1.74) Boost.Fiber's context::active() and, when the fiber changed, a
// fiber_specific_ptr read.
// Misuse (undetectable): a Boost.Fiber fiber whose stack is smaller than Boost's own
// documented minimum, boost::context::stack_traits::minimum_size(), plus the size of the
// fiber's function object, while it runs another stack (a scopereg Fiber, a generator)
// placed right below its own, can make a later fiber on that memory get its value. Give
// fibers at least the minimum stack (Boost's allocators' defaults do). On a thread's main
// context every access takes the miss path. The first access in a fiber allocates its
// slots.

#ifndef SCOPEREG_BOOST_FIBER_SCOPE_H_
#define SCOPEREG_BOOST_FIBER_SCOPE_H_

#include <atomic>
#include <cstdint>

#include "boost/fiber/context.hpp"
#include "boost/version.hpp"
#include "scopereg/internal/scope_state.h"
#include "scopereg/scope.h"

namespace scopereg {
namespace internal {

// The last fiber's slots seen on this thread, valid while no fiber has ended since
// (`g_boost_fiber_ends` unchanged: a context's address and its stack are reused only after
// its fiber ended, which bumps the counter before its slots go).
//
// With it, up to four frame addresses seen while that fiber ran, each on the fiber's own
// stack: an address belongs to one live stack only, so meeting one of them again means
// that fiber runs, and a hit needs neither Boost.Fiber's context::active() (two
// __tls_get_addr calls in libboost_fiber) nor a fiber_specific_ptr look-up. A frame is
// known to be on the fiber's own stack from Boost.Fiber's layout (make_worker_context puts
// the context object at the top of the fiber's stack): only frames less than
// boost_fiber_own_stack_window() below the context are kept. Frames on a stack the fiber runs itself (a
// generator, a scopereg Fiber) are never kept: that stack could be freed and reused by
// another fiber without any fiber ending. Used only with the Boost.Fiber release whose
// layout was read (1.74); with others every access asks context::active().
struct BoostFiberCache {
  static constexpr int kFrames = 4;
  std::uintptr_t frames[kFrames] = {};
  const boost::fibers::context* context = nullptr;
  ScopeState* state = nullptr;
  std::uint64_t ends = 0;
  unsigned next = 0;  // the frame entry to replace next
};
// How far below its context a frame is known to be on a fiber's own stack: half of
// Boost's stack_traits::minimum_size(), at most 8 KiB (0 with an unverified Boost).
std::uintptr_t boost_fiber_own_stack_window() noexcept;
extern thread_local constinit BoostFiberCache t_boost_fiber_cache;
// &t_boost_fiber_cache, never inlined: code that may keep a thread-local's address (a
// shared library's, clang's: SCOPEREG_TLS_VIA_CALL in context_state.h) reads the cache
// through it, so a fiber that a migrating scheduler
// (work_stealing, shared_work) resumed on another thread reads that thread's cache, never
// the old thread's through an address kept across the switch.
const BoostFiberCache* boost_fiber_cache_address() noexcept;
extern constinit std::atomic<std::uint64_t> g_boost_fiber_ends;
ScopeState* boost_fiber_state_slow(std::uintptr_t frame);

}  // namespace internal

class BoostFiberScope {
 public:
  using Token = ScopeToken;
  static constexpr const char* kName = "BoostFiberScope";

  // The running Boost.Fiber fiber's token, or the thread's on a main context.
  static ScopeToken current();
  // A ScopeFunc returning current(), for ScopedRegistry<T, FuncScope>.
  static ScopeFunc func();

 private:
  friend struct internal::StrategyAccess;
  static internal::ScopeState* current_state() {
    const auto frame = reinterpret_cast<std::uintptr_t>(__builtin_frame_address(0));
#if SCOPEREG_TLS_VIA_CALL
    const internal::BoostFiberCache& cache = *internal::boost_fiber_cache_address();
#else
    const internal::BoostFiberCache& cache = internal::t_boost_fiber_cache;
#endif
    if ((frame == cache.frames[0] || frame == cache.frames[1] || frame == cache.frames[2] ||
         frame == cache.frames[3]) &&
        cache.ends == internal::g_boost_fiber_ends.load(std::memory_order_acquire)) [[likely]] {
      return cache.state;
    }
    return internal::boost_fiber_state_slow(frame);
  }
};

}  // namespace scopereg

#endif  // SCOPEREG_BOOST_FIBER_SCOPE_H_
