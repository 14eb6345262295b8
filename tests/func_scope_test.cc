#include <atomic>
#include <latch>
#include <thread>
#include <vector>

#include "counted.h"
#include "gtest/gtest.h"
#include "scopereg/scope.h"
#include "scopereg/scoped_registry.h"

namespace scopereg {
namespace {

using ::scopereg::testing::Counted;
using ::scopereg::testing::Counts;

thread_local ScopeToken t_request;  // what the application's ScopeFunc reports

ScopeFunc request_func() {
  return [] { return t_request; };
}

TEST(FuncScope, ValuesAreKeyedByTheTokenTheScopeFuncReturns) {
  Counts counts;
  int next_id = 0;
  ScopedRegistry<Counted, FuncScope> reg([&] { return Counted(counts, ++next_id); },
                                         request_func());
  t_request = ScopeToken(1);
  EXPECT_EQ(reg().id(), 1);
  t_request = ScopeToken(2);
  EXPECT_EQ(reg().id(), 2);
  t_request = ScopeToken(1);
  EXPECT_EQ(reg().id(), 1);
  EXPECT_EQ(reg.size(), 2);
  t_request = ScopeToken();
}

TEST(FuncScope, ANullTokenMeansNoScope) {
  ScopedRegistry<int, FuncScope> reg([] { return 1; }, request_func());
  t_request = ScopeToken();
  EXPECT_EQ(reg.find(), nullptr);
  EXPECT_FALSE(reg.has());
  reg.clear();  // no scope: no-op
  try {
    reg();
    FAIL() << "expected ScopeError";
  } catch (const ScopeError& e) {
    EXPECT_NE(std::string(e.what()).find("no active scope"), std::string::npos);
  }
  EXPECT_THROW(reg.set(3), ScopeError);
}

TEST(FuncScope, EndScopeDestroysTheValueAndAReusedTokenStartsEmpty) {
  Counts counts;
  int next_id = 0;
  ScopedRegistry<Counted, FuncScope> a([&] { return Counted(counts, ++next_id); },
                                       request_func());
  ScopedRegistry<Counted, FuncScope> b([&] { return Counted(counts, ++next_id); },
                                       request_func());
  t_request = ScopeToken(77);
  const int first = a().id();
  b();
  EXPECT_EQ(&a(), &a());  // cached
  scopereg::end_scope(ScopeToken(77));  // reaches both registries
  EXPECT_EQ(counts.destroyed, 2);
  EXPECT_FALSE(a.has());
  EXPECT_NE(a().id(), first);
  a.end_scope(ScopeToken(77));  // this registry only
  EXPECT_EQ(counts.destroyed, 3);
  EXPECT_EQ(a.size(), 0);
  EXPECT_EQ(b.size(), 0);
  t_request = ScopeToken();
}

TEST(FuncScope, AnotherThreadEndingTheScopeInvalidatesThisThreadsCache) {
  Counts counts;
  int next_id = 0;
  ScopedRegistry<Counted, FuncScope> reg([&] { return Counted(counts, ++next_id); },
                                         request_func());
  t_request = ScopeToken(5);
  EXPECT_EQ(reg().id(), 1);
  std::thread([] { scopereg::end_scope(ScopeToken(5)); }).join();
  EXPECT_EQ(reg().id(), 2);
  t_request = ScopeToken();
}

TEST(FuncScope, ThreadScopeFuncValuesDieWithTheirThread) {
  Counts counts;
  ScopedRegistry<Counted, FuncScope> reg([&] { return Counted(counts); },
                                         ThreadScope::func());
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) threads.emplace_back([&] { reg(); });
  for (auto& t : threads) t.join();
  EXPECT_EQ(counts.made, 4);
  EXPECT_EQ(counts.alive(), 0);
  EXPECT_EQ(reg.size(), 0);
}

TEST(FuncScope, AnEmptyScopeFuncIsRejected) {
  EXPECT_THROW(FuncScope{ScopeFunc{}}, ScopeError);
}

TEST(FuncScope, RegistryDestroyedWhileAThreadEndsItsScopeDestroysEachValueOnce) {
  for (int round = 0; round < 50; ++round) {
    Counts counts;
    auto reg = std::make_unique<ScopedRegistry<Counted, FuncScope>>(
        [&] { return Counted(counts); }, ThreadScope::func());
    std::latch created(2);
    std::vector<std::thread> threads;
    for (int i = 0; i < 2; ++i) {
      threads.emplace_back([&] {
        (*reg)();
        created.count_down();
      });  // exits at once: races with the reset below
    }
    created.wait();
    reg.reset();
    for (auto& t : threads) t.join();
    EXPECT_EQ(counts.made, 2);
    EXPECT_EQ(counts.destroyed, 2);
  }
}

}  // namespace
}  // namespace scopereg
