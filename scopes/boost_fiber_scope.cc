#include "scopereg/boost_fiber_scope.h"

#include <algorithm>

#include "boost/context/stack_traits.hpp"
#include "boost/fiber/context.hpp"
#include "boost/fiber/fss.hpp"
#include "scopereg/thread_scope.h"

namespace scopereg {
namespace internal {
thread_local constinit BoostFiberCache t_boost_fiber_cache;

const BoostFiberCache* boost_fiber_cache_address() noexcept { return &t_boost_fiber_cache; }
constinit std::atomic<std::uint64_t> g_boost_fiber_ends{1};
}  // namespace internal

namespace {

struct FiberSlots {
  internal::ScopeState state{ScopeKind::kBoostFiber};
};

boost::fibers::fiber_specific_ptr<FiberSlots>& slots_of_fiber() {
  // Never destroyed: fibers may end during process exit.
  static auto* const slots = new boost::fibers::fiber_specific_ptr<FiberSlots>(
      [](FiberSlots* s) {
        s->state.end();
        // Before the slots go: every thread's cached pointer to them is now stale.
        internal::g_boost_fiber_ends.fetch_add(1, std::memory_order_acq_rel);
        delete s;
      });
  return *slots;
}

}  // namespace

std::uintptr_t internal::boost_fiber_own_stack_window() noexcept {
#if BOOST_VERSION == 107400
  // A fiber's usable stack is its size less the context at its top; Boost documents
  // minimum_size() as the smallest stack: half of it is below the context on any fiber
  // whose stack respects that minimum.
  static const std::uintptr_t window = std::min<std::uintptr_t>(
      8 * 1024, boost::context::stack_traits::minimum_size() / 2);
  return window;
#else
  return 0;  // Boost.Fiber's layout not verified for this release: no frames kept
#endif
}

internal::ScopeState* internal::boost_fiber_state_slow(std::uintptr_t frame) {
  boost::fibers::context* const active = boost::fibers::context::active();
  if (active == nullptr || active->is_context(boost::fibers::type::main_context)) {
    return internal::thread_state();  // not cached: a thread's state is one load away
  }
  const std::uint64_t ends = g_boost_fiber_ends.load(std::memory_order_acquire);
  BoostFiberCache& cache = t_boost_fiber_cache;
  if (cache.context != active || cache.ends != ends) {
    boost::fibers::fiber_specific_ptr<FiberSlots>& slots = slots_of_fiber();
    FiberSlots* s = slots.get();
    if (s == nullptr) [[unlikely]] {
      s = new FiberSlots;
      slots.reset(s);
    }
    cache = BoostFiberCache{};  // another fiber: forget the old one's frames
    cache.context = active;
    cache.state = &s->state;
    cache.ends = ends;
  }
  const auto top = reinterpret_cast<std::uintptr_t>(active);
  if (frame < top && top - frame < boost_fiber_own_stack_window()) {  // its own stack
    cache.frames[cache.next] = frame;
    cache.next = (cache.next + 1) % BoostFiberCache::kFrames;
  }
  return cache.state;
}

ScopeToken BoostFiberScope::current() { return current_state()->token(); }

ScopeFunc BoostFiberScope::func() {
  return [] { return BoostFiberScope::current(); };
}

}  // namespace scopereg
