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
// Thread safety: any thread. Cost: a hit is a Boost.Fiber context look-up and a
// fiber_specific_ptr read (about 10 ns here) plus two loads; the first access in a fiber
// allocates its slots.

#ifndef SCOPEREG_BOOST_FIBER_SCOPE_H_
#define SCOPEREG_BOOST_FIBER_SCOPE_H_

#include "scopereg/internal/scope_state.h"
#include "scopereg/scope.h"

namespace scopereg {

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
  static internal::ScopeState* current_state();
};

}  // namespace scopereg

#endif  // SCOPEREG_BOOST_FIBER_SCOPE_H_
