#include "scopereg/boost_fiber_scope.h"

#include "boost/fiber/context.hpp"
#include "boost/fiber/fss.hpp"
#include "scopereg/thread_scope.h"

namespace scopereg {
namespace {

struct FiberSlots {
  internal::ScopeState state{ScopeKind::kBoostFiber};
};

boost::fibers::fiber_specific_ptr<FiberSlots>& slots_of_fiber() {
  // Never destroyed: fibers may end during process exit.
  static auto* const slots = new boost::fibers::fiber_specific_ptr<FiberSlots>(
      [](FiberSlots* s) {
        s->state.end();
        delete s;
      });
  return *slots;
}

}  // namespace

internal::ScopeState* BoostFiberScope::current_state() {
  boost::fibers::context* active = boost::fibers::context::active();
  if (active == nullptr || active->is_context(boost::fibers::type::main_context)) {
    return internal::thread_state();
  }
  boost::fibers::fiber_specific_ptr<FiberSlots>& slots = slots_of_fiber();
  FiberSlots* s = slots.get();
  if (s == nullptr) [[unlikely]] {
    s = new FiberSlots;
    slots.reset(s);
  }
  return &s->state;
}

ScopeToken BoostFiberScope::current() { return current_state()->token(); }

ScopeFunc BoostFiberScope::func() {
  return [] { return BoostFiberScope::current(); };
}

}  // namespace scopereg
