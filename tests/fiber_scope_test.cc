#include "scopereg/fiber_scope.h"

#include <atomic>
#include <memory>
#include <set>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include "boost/context/detail/exception.hpp"
#include "counted.h"
#include "gtest/gtest.h"
#include "scopereg/explicit_scope.h"
#include "scopereg/scoped_registry.h"
#include "scopereg/thread_scope.h"

#if defined(__SANITIZE_THREAD__)
constexpr int kManyFibers = 5'000;  // TSan clears a fiber's shadow stack at creation: ms each
#elif defined(__SANITIZE_ADDRESS__)
constexpr int kManyFibers = 20'000;
#else
constexpr int kManyFibers = 1'000'000;
#endif

namespace scopereg {
namespace {

using ::scopereg::testing::Counted;
using ::scopereg::testing::Counts;

struct Fixture {
  Counts counts;
  std::atomic<int> next_id{0};
  ScopedRegistry<Counted, FiberScope> reg{[this] { return Counted(counts, ++next_id); }};
};

TEST(FiberScope, ManyFibersOnOneThreadStayIsolated) {
  ScopedRegistry<int, FiberScope> reg([] { return -1; });
  constexpr int kFibers = 100;
  std::vector<Fiber> fibers;
  int wrong = 0;
  for (int i = 0; i < kFibers; ++i) {
    fibers.emplace_back([&, i] {
      reg() = i;
      for (int round = 0; round < 5; ++round) {
        Fiber::yield();
        wrong += (reg() != i);
      }
    });
  }
  for (int round = 0; round < 6; ++round) {
    for (Fiber& f : fibers) f.resume();
  }
  for (Fiber& f : fibers) EXPECT_TRUE(f.done());
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(reg.size(), 0);
  EXPECT_EQ(reg(), -1);  // the main fiber has its own value
}

TEST(FiberScope, AFibersValueIsDestroyedOnceWhenItFinishesOnTheFiber) {
  ScopeToken destroyed_in;
  struct Probe {
    ScopeToken* destroyed_in;
    ~Probe() { *destroyed_in = getcurrent(); }
  };
  ScopedRegistry<Probe, FiberScope> reg([&] { return Probe{&destroyed_in}; });
  Fixture f;
  Fiber fiber([&] {
    reg();
    f.reg();
    Fiber::yield();
  });
  fiber.resume();
  EXPECT_EQ(f.counts.alive(), 1);
  fiber.resume();
  EXPECT_TRUE(fiber.done());
  EXPECT_EQ(f.counts.destroyed, 1);
  EXPECT_EQ(destroyed_in, fiber.token());
  EXPECT_EQ(reg.size(), 0);
}

TEST(FiberScope, AnUnfinishedFiberDestroyedUnwindsItsStackAndDestroysItsValues) {
  Fixture f;
  Counts stack_objects;
  bool after_yield = false;
  {
    Fiber fiber([&] {
      Counted on_stack(stack_objects);
      f.reg();
      Fiber::yield();
      after_yield = true;
    });
    fiber.resume();
    EXPECT_EQ(stack_objects.alive(), 1);
    EXPECT_EQ(f.counts.alive(), 1);
  }
  EXPECT_FALSE(after_yield);
  EXPECT_EQ(stack_objects.destroyed, 1);
  EXPECT_EQ(f.counts.destroyed, 1);
  EXPECT_EQ(f.reg.size(), 0);
}

TEST(FiberScope, UnwindingPassesThroughCatchAllsThatRethrow) {
  int caught = 0;
  Counts stack_objects;
  {
    Fiber fiber([&] {
      try {
        Counted outer(stack_objects);
        try {
          Counted inner(stack_objects);
          Fiber::yield();
        } catch (...) {  // as code on a Boost.Context stack must: rethrow
          ++caught;
          throw;
        }
      } catch (const boost::context::detail::forced_unwind&) {
        ++caught;
        throw;
      }
    });
    fiber.resume();
    EXPECT_EQ(stack_objects.alive(), 2);
  }
  EXPECT_EQ(caught, 2);
  EXPECT_EQ(stack_objects.alive(), 0);
}

TEST(FiberScope, AFiberNeverStartedRunsNothingWhenDestroyed) {
  bool ran = false;
  { Fiber fiber([&] { ran = true; }); }
  EXPECT_FALSE(ran);
}

TEST(FiberScope, OutsideAnyFiberTheThreadsMainFiberValueLivesUntilThreadExit) {
  Fixture f;
  std::thread([&] {
    EXPECT_EQ(getcurrent(), ThreadScope::current());
    f.reg();
    Fiber fiber([&] { f.reg(); });
    fiber.resume();
    EXPECT_EQ(f.counts.alive(), 1);  // the fiber's is gone, the main fiber's stays
  }).join();
  EXPECT_EQ(f.counts.made, 2);
  EXPECT_EQ(f.counts.alive(), 0);
}

TEST(FiberScope, AnExceptionInAFiberReachesTheResumer) {
  Fixture f;
  Fiber fiber([&] {
    f.reg();
    Fiber::yield();
    throw std::runtime_error("query failed");
  });
  fiber.resume();
  EXPECT_THROW(fiber.resume(), std::runtime_error);
  EXPECT_TRUE(fiber.done());
  EXPECT_EQ(f.counts.alive(), 0);
  EXPECT_THROW(fiber.resume(), ScopeError);  // finished
}

TEST(FiberScope, AFiberResumedOnAnotherThreadSeesItsOwnValues) {
  Fixture f;
  ScopedRegistry<ScopeToken> thread_id([] { return ThreadScope::current(); });
  ScopeToken first_thread, second_thread;
  Counted* before = nullptr;
  Counted* after = nullptr;
  ScopeToken token_before, token_after;
  Fiber fiber([&] {
    before = &f.reg();
    token_before = getcurrent();
    first_thread = thread_id();
    Fiber::yield();
    after = &f.reg();
    token_after = getcurrent();
    second_thread = thread_id();  // ThreadScope follows the OS thread
  });
  std::thread([&] { fiber.resume(); }).join();
  std::thread([&] { fiber.resume(); }).join();
  EXPECT_TRUE(fiber.done());
  EXPECT_EQ(before, after);
  EXPECT_EQ(token_before, token_after);
  EXPECT_NE(first_thread, second_thread);
  EXPECT_EQ(f.counts.made, 1);
  EXPECT_EQ(f.counts.alive(), 0);
}

TEST(FiberScope, AFiberMovingBetweenLiveThreadsSeesItsOwnValuesAfterEveryYield) {
  // Both threads stay alive throughout: a thread started after another was joined often
  // gets the same thread-local storage back, which would hide a read of the old thread's.
  Fixture f;
  ScopedRegistry<ScopeToken> thread_id([] { return ThreadScope::current(); });
  constexpr int kRounds = 200;
  std::vector<Counted*> values;
  std::vector<ScopeToken> threads;
  std::vector<ScopeToken> fibers;
  Fiber fiber([&] {
    for (int i = 0; i < kRounds; ++i) {
      values.push_back(&f.reg());
      threads.push_back(thread_id());
      fibers.push_back(getcurrent());
      Fiber::yield();
    }
  });
  std::atomic<int> turn{0};  // resumption i is thread i % 2's
  auto resume_every_other = [&](int first) {
    for (int i = first; i <= kRounds; i += 2) {
      while (turn.load(std::memory_order_acquire) != i) std::this_thread::yield();
      fiber.resume();
      turn.store(i + 1, std::memory_order_release);
    }
  };
  std::thread a(resume_every_other, 0);
  std::thread b(resume_every_other, 1);
  a.join();
  b.join();
  EXPECT_TRUE(fiber.done());
  ASSERT_EQ(values.size(), static_cast<std::size_t>(kRounds));
  for (int i = 0; i < kRounds; ++i) {
    EXPECT_EQ(values[i], values[0]) << "round " << i;
    EXPECT_EQ(fibers[i], fibers[0]) << "round " << i;
    if (i > 0) {
      EXPECT_NE(threads[i], threads[i - 1]) << "round " << i;
    }
  }
  EXPECT_EQ(f.counts.made, 1);
  EXPECT_EQ(f.counts.alive(), 0);
}

// A value whose destructor gets (so makes, if absent) the value of `reg` in the current
// scope: a FuncScope value keyed by the fiber that uses a registry as the fiber ends.
template <typename Registry>
struct UsesWhenDestroyed {
  explicit UsesWhenDestroyed(Registry* r) : reg(r) {}
  UsesWhenDestroyed(UsesWhenDestroyed&& other) noexcept
      : reg(std::exchange(other.reg, nullptr)) {}
  ~UsesWhenDestroyed() {
    if (reg != nullptr) (*reg)();
  }
  Registry* reg;
};
using UsesFiberScopeWhenDestroyed = UsesWhenDestroyed<ScopedRegistry<Counted, FiberScope>>;

TEST(FiberScope, AValueMadeByAScopeFuncValuesDestructorAtFiberEndIsDestroyedToo) {
  Counts counts;
  ScopedRegistry<Counted, FiberScope> by_fiber([&] { return Counted(counts); });
  ScopedRegistry<UsesFiberScopeWhenDestroyed, FuncScope> by_func(
      [&] { return UsesFiberScopeWhenDestroyed(&by_fiber); }, FiberScope::func());
  Fiber fiber([&] { by_func(); });  // no FiberScope value until the fiber ends
  fiber.resume();
  EXPECT_TRUE(fiber.done());
  EXPECT_EQ(counts.made, 1);
  EXPECT_EQ(counts.alive(), 0);  // ended with the fiber, not left to the registry
  EXPECT_EQ(by_fiber.size(), 0);
}

// A value in a FuncScope registry keyed by the fiber whose destructor makes another.
using MakesAnotherWhenDestroyed = UsesWhenDestroyed<ScopedRegistry<Counted, FuncScope>>;

TEST(FiberScope, AScopeFuncValueMadeByAnotherOnesDestructorAtFiberEndIsDestroyedToo) {
  Counts counts;
  ScopedRegistry<Counted, FuncScope> second([&] { return Counted(counts); },
                                            FiberScope::func());
  ScopedRegistry<MakesAnotherWhenDestroyed, FuncScope> first(
      [&] { return MakesAnotherWhenDestroyed(&second); }, FiberScope::func());
  Fiber fiber([&] { first(); });  // only FuncScope values: no FiberScope slots
  fiber.resume();
  EXPECT_TRUE(fiber.done());
  EXPECT_EQ(counts.made, 1);
  EXPECT_EQ(counts.alive(), 0);  // ended in a second round, not left to the registry
  EXPECT_EQ(second.size(), 0);
}

TEST(FiberScope, DestroyingARegistryDestroysValuesOfSuspendedFibers) {
  Counts counts;
  auto reg = std::make_unique<ScopedRegistry<Counted, FiberScope>>(
      [&] { return Counted(counts); });
  std::vector<Fiber> fibers;
  for (int i = 0; i < 10; ++i) {
    fibers.emplace_back([&] {
      (*reg)();
      Fiber::yield();
    });
    fibers.back().resume();
  }
  EXPECT_EQ(counts.alive(), 10);
  reg.reset();
  EXPECT_EQ(counts.destroyed, 10);
  fibers.clear();  // finishing them destroys nothing twice
  EXPECT_EQ(counts.destroyed, 10);
}

TEST(FiberScope, NestedFibersHaveTheirOwnValuesAndYieldToTheirResumer) {
  ScopedRegistry<int, FiberScope> reg([] { return 0; });
  std::vector<int> trace;
  Fiber outer([&] {
    reg() = 1;
    Fiber inner([&] {
      reg() = 2;
      trace.push_back(reg());
      Fiber::yield();  // back to outer, not to main
      trace.push_back(reg());
    });
    inner.resume();
    trace.push_back(reg());
    inner.resume();
    trace.push_back(reg());
  });
  outer.resume();
  EXPECT_EQ(trace, (std::vector<int>{2, 1, 2, 1}));
  EXPECT_EQ(reg(), 0);
}

TEST(FiberScope, TheExplicitScopeStackIsPerFiber) {
  ScopedRegistry<int, ExplicitScope> reg([] { return 0; });
  ScopeToken in_fiber;
  Fiber fiber([&] {
    ScopeGuard guard(std::string("fiber-request"));
    in_fiber = ExplicitScope::current();
    reg() = 7;
    Fiber::yield();
    EXPECT_EQ(ExplicitScope::current(), in_fiber);
    EXPECT_EQ(reg(), 7);
  });
  ScopeGuard main_guard(std::string("main-request"));
  reg() = 1;
  fiber.resume();
  EXPECT_NE(ExplicitScope::current(), in_fiber);
  EXPECT_EQ(reg(), 1);
  std::thread([&] { fiber.resume(); }).join();  // its stack travels with it
  EXPECT_TRUE(fiber.done());
  EXPECT_EQ(reg(), 1);
}

TEST(FiberScope, MisuseGetsClearErrors) {
  EXPECT_THROW(Fiber::yield(), ScopeError);
  EXPECT_THROW(Fiber([] {}, boost::context::fixedsize_stack(1024)), ScopeError);
  Fiber* self = nullptr;
  bool threw = false;
  Fiber fiber([&] {
    try {
      self->resume();
    } catch (const ScopeError&) {
      threw = true;
    }
  });
  self = &fiber;
  fiber.resume();
  EXPECT_TRUE(threw);
}

TEST(FiberScope, TheScopeFuncFormEndsValuesWithTheFiber) {
  Counts counts;
  ScopedRegistry<Counted, FuncScope> reg([&] { return Counted(counts); }, FiberScope::func());
  Fiber fiber([&] {
    reg();
    Fiber::yield();
    reg();
  });
  fiber.resume();
  EXPECT_EQ(counts.alive(), 1);
  fiber.resume();
  EXPECT_EQ(counts.made, 1);
  EXPECT_EQ(counts.alive(), 0);
  EXPECT_EQ(reg.size(), 0);
}

TEST(FiberScope, FiberTokensAreNeverReused) {
  std::set<ScopeToken> tokens;
  for (int i = 0; i < 1000; ++i) {
    Fiber fiber([&] { tokens.insert(getcurrent()); });
    fiber.resume();
  }
  EXPECT_EQ(tokens.size(), 1000u);
  EXPECT_FALSE(tokens.contains(getcurrent()));
}

TEST(FiberScope, AMillionShortFibersLeaveNoValueBehind) {
  Counts counts;
  ScopedRegistry<Counted, FiberScope> reg([&] { return Counted(counts); });
  std::int64_t max_live = 0;
  for (int i = 0; i < kManyFibers; ++i) {
    Fiber fiber([&] {
      reg();
      max_live = std::max(max_live, reg.size());
    });
    fiber.resume();
  }
  EXPECT_EQ(counts.made, kManyFibers);
  EXPECT_EQ(counts.destroyed, kManyFibers);
  EXPECT_EQ(max_live, 1);
  EXPECT_EQ(reg.size(), 0);
}

// Two fibers of one thread share a ThreadScope value: the first one's factory yields (as
// a Pool checkout does inside a Fiber); the second asks for the value meanwhile. It must
// yield while it waits, not block the thread: a blocked thread never resumes the creator.
TEST(FiberScope, AFiberWaitingForAnotherFibersFactoryOnItsThreadYields) {
  int made = 0;
  bool in_factory = false;
  ScopedRegistry<int, ThreadScope> shared([&] {
    ++made;
    in_factory = true;
    Fiber::yield();  // suspended while creating
    in_factory = false;
    return 42;
  });
  int* seen_by_creator = nullptr;
  int* seen_by_waiter = nullptr;
  bool waiter_saw_creation_in_progress = false;
  Fiber creator([&] { seen_by_creator = &shared(); });
  Fiber waiter([&] {
    waiter_saw_creation_in_progress = in_factory;
    seen_by_waiter = &shared();
  });
  creator.resume();  // into the factory, which yields
  ASSERT_TRUE(in_factory);
  waiter.resume();  // waits for the creator: yields back here (blocked the thread before)
  EXPECT_TRUE(waiter_saw_creation_in_progress);
  EXPECT_FALSE(waiter.done());
  for (int round = 0; round < 10 && !(creator.done() && waiter.done()); ++round) {
    if (!creator.done()) creator.resume();
    if (!waiter.done()) waiter.resume();
  }
  ASSERT_TRUE(creator.done());
  ASSERT_TRUE(waiter.done());
  EXPECT_EQ(made, 1);  // one creation, seen by both
  ASSERT_NE(seen_by_creator, nullptr);
  EXPECT_EQ(seen_by_creator, seen_by_waiter);
  EXPECT_EQ(*seen_by_waiter, 42);
}

}  // namespace
}  // namespace scopereg
