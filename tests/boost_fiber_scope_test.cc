#include "scopereg/boost_fiber_scope.h"

#include <set>
#include <thread>
#include <vector>

#include "boost/fiber/all.hpp"
#include "counted.h"
#include "gtest/gtest.h"
#include "scopereg/scoped_registry.h"

namespace scopereg {
namespace {

using ::scopereg::testing::Counted;
using ::scopereg::testing::Counts;

TEST(BoostFiberScope, EachFiberHasItsOwnValueDestroyedWhenTheFiberEnds) {
  Counts counts;
  std::atomic<int> next_id{0};
  ScopedRegistry<Counted, BoostFiberScope> reg([&] { return Counted(counts, ++next_id); });
  int wrong = 0;
  std::vector<boost::fibers::fiber> fibers;
  for (int i = 0; i < 10; ++i) {
    fibers.emplace_back([&] {
      const int mine = reg().id();
      for (int k = 0; k < 5; ++k) {
        boost::this_fiber::yield();  // the others run and create theirs meanwhile
        wrong += (reg().id() != mine);
      }
    });
  }
  for (auto& f : fibers) f.join();
  fibers.clear();
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(counts.made, 10);
  EXPECT_EQ(counts.alive(), 0);
  EXPECT_EQ(reg.size(), 0);
}

TEST(BoostFiberScope, TheMainContextUsesTheThreadsValueFreedAtThreadExit) {
  Counts counts;
  ScopedRegistry<Counted, BoostFiberScope> reg([&] { return Counted(counts); });
  std::thread([&] {
    EXPECT_EQ(BoostFiberScope::current(), ThreadScope::current());
    reg();
    boost::fibers::fiber([&] { reg(); }).join();
    EXPECT_EQ(counts.alive(), 1);
  }).join();
  EXPECT_EQ(counts.made, 2);
  EXPECT_EQ(counts.alive(), 0);  // boostorg/fiber#211 leaks this one; we do not
}

TEST(BoostFiberScope, TokensAreDistinctPerFiber) {
  std::set<ScopeToken> tokens;
  for (int i = 0; i < 100; ++i) {
    boost::fibers::fiber([&] { tokens.insert(BoostFiberScope::current()); }).join();
  }
  EXPECT_EQ(tokens.size(), 100u);
}

TEST(BoostFiberScope, TheScopeFuncFormEndsValuesWithTheFiber) {
  Counts counts;
  ScopedRegistry<Counted, FuncScope> reg([&] { return Counted(counts); },
                                         BoostFiberScope::func());
  boost::fibers::fiber([&] { reg(); }).join();
  EXPECT_EQ(counts.made, 1);
  EXPECT_EQ(counts.alive(), 0);
}

}  // namespace
}  // namespace scopereg
