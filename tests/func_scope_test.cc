#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>
#include <latch>
#include <memory>
#include <thread>
#include <vector>

#include "counted.h"
#include "gtest/gtest.h"
#include "scopereg/func_scope.h"
#include "scopereg/internal/registry_record.h"
#include "scopereg/internal/token_ref.h"
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

// ---- FuncScopeOf<K>: any hashable token --------------------------------------------

thread_local std::string t_session_id;  // what a string-keyed scope function reports

struct TenantSession {
  std::string tenant;
  int session = 0;
  friend bool operator==(const TenantSession&, const TenantSession&) = default;
  template <typename H>
  friend H AbslHashValue(H h, const TenantSession& t) {
    return H::combine(std::move(h), t.tenant, t.session);
  }
};
thread_local TenantSession t_tenant_session;

TEST(FuncScopeOf, AStringKeyedRegistryKeepsOneValuePerStringAndEndsByString) {
  Counts counts;
  int next_id = 0;
  ScopedRegistry<Counted, FuncScopeOf<std::string>> carts(
      [&] { return Counted(counts, ++next_id); },
      FuncScopeOf<std::string>([] { return t_session_id; }));
  t_session_id = "alice";
  EXPECT_EQ(carts().id(), 1);
  t_session_id = "bob";
  EXPECT_EQ(carts().id(), 2);
  t_session_id = "alice";
  EXPECT_EQ(carts().id(), 1);
  EXPECT_EQ(carts.size(), 2);

  std::vector<std::string> seen;
  carts.for_each([&](const std::string& token, Counted&) { seen.push_back(token); });
  std::sort(seen.begin(), seen.end());
  EXPECT_EQ(seen, (std::vector<std::string>{"alice", "bob"}));

  end_scope(std::string("alice"));  // every registry keyed by std::string
  EXPECT_EQ(counts.destroyed.load(), 1);
  EXPECT_FALSE(carts.has());
  EXPECT_EQ(carts().id(), 3);  // a reused string starts empty
  carts.end_scope("bob");      // this registry only
  EXPECT_EQ(counts.destroyed.load(), 2);
  EXPECT_EQ(carts.size(), 1);
  t_session_id.clear();
}

TEST(FuncScopeOf, AStructKeyedRegistryTellsApartEveryField) {
  Counts counts;
  int next_id = 0;
  ScopedRegistry<Counted, FuncScopeOf<TenantSession>> sessions(
      [&] { return Counted(counts, ++next_id); },
      FuncScopeOf<TenantSession>([] { return t_tenant_session; }));
  t_tenant_session = {"acme", 1};
  EXPECT_EQ(sessions().id(), 1);
  t_tenant_session = {"acme", 2};
  EXPECT_EQ(sessions().id(), 2);
  t_tenant_session = {"globex", 1};
  EXPECT_EQ(sessions().id(), 3);
  t_tenant_session = {"acme", 1};
  EXPECT_EQ(sessions().id(), 1);

  end_scope(TenantSession{"acme", 2});
  EXPECT_EQ(counts.destroyed.load(), 1);
  EXPECT_EQ(sessions.size(), 2);
  end_scope(std::string("acme"));  // another token type: reaches nothing here
  EXPECT_EQ(sessions.size(), 2);
  t_tenant_session = {};
}

// A token whose == throws once when armed (after the values exist).
std::atomic<bool> g_throw_on_compare{false};
struct ThrowingToken {
  int id = 0;
  friend bool operator==(const ThrowingToken& a, const ThrowingToken& b) {
    if (g_throw_on_compare.exchange(false)) throw std::runtime_error("token compare failed");
    return a.id == b.id;
  }
  template <typename H>
  friend H AbslHashValue(H h, const ThrowingToken& t) {
    return H::combine(std::move(h), t.id);
  }
};

TEST(FuncScopeOf, AnEndWhoseTokenThrowsInOneRegistryStillEndsTheOthersAndReportsIt) {
  Counts counts;
  const ThrowingToken token{7};
  auto func = FuncScopeOf<ThrowingToken>([token] { return token; });
  ScopedRegistry<Counted, FuncScopeOf<ThrowingToken>> first([&] { return Counted(counts); },
                                                            func);
  ScopedRegistry<Counted, FuncScopeOf<ThrowingToken>> second([&] { return Counted(counts); },
                                                             func);
  first();
  second();
  ASSERT_EQ(counts.alive(), 2);
  g_throw_on_compare = true;  // the first registry asked fails its look-up
  EXPECT_THROW(end_scope(token), std::runtime_error);
  EXPECT_EQ(counts.alive(), 1);  // the other registry's value still ended
  EXPECT_EQ(first.size() + second.size(), 1);
  end_scope(token);  // the one left is still bound, and ends now
  EXPECT_EQ(counts.alive(), 0);
  EXPECT_EQ(first.size() + second.size(), 0);
}

// A factory that throws leaves no creation mark behind, even when the token's == throws
// while the mark is removed (it used to stay: the next call in that scope was told that
// the factory re-entered its registry, and other threads would have waited for ever).
TEST(FuncScopeOf, AFactoryThatThrowsLeavesNoMarkEvenWhenTheTokensCompareThrows) {
  const ThrowingToken token{8};
  int calls = 0;
  ScopedRegistry<int, FuncScopeOf<ThrowingToken>> reg(
      [&] {
        if (++calls == 1) {
          g_throw_on_compare = true;  // the removal of this creation's mark compares
          throw std::runtime_error("factory failed");
        }
        return 42;
      },
      FuncScopeOf<ThrowingToken>([token] { return token; }));
  try {
    reg();
    FAIL() << "expected the factory's error";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "factory failed");  // not the compare's error
  }
  g_throw_on_compare = false;
  EXPECT_EQ(reg(), 42);  // made anew: no mark left
  EXPECT_EQ(calls, 2);
}

TEST(FuncScopeOf, EndingAStringScopeLeavesRegistriesOfOtherTokenTypesAlone) {
  Counts counts;
  ScopedRegistry<Counted, FuncScopeOf<std::string>> by_string(
      [&] { return Counted(counts); }, FuncScopeOf<std::string>([] { return t_session_id; }));
  ScopedRegistry<Counted, FuncScope> by_token([&] { return Counted(counts); }, request_func());
  t_session_id = "7";
  t_request = ScopeToken(7);
  by_string();
  by_token();
  end_scope(std::string("7"));
  EXPECT_FALSE(by_string.has());
  EXPECT_TRUE(by_token.has());
  end_scope(ScopeToken(7));
  EXPECT_FALSE(by_token.has());
  EXPECT_EQ(counts.alive(), 0);
  t_session_id.clear();
  t_request = ScopeToken();
}

TEST(FuncScopeOf, AnEmptyFunctionIsRejectedWithTheFix) {
  try {
    FuncScopeOf<std::string> scope{ScopeFuncOf<std::string>()};
    FAIL() << "expected ScopeError";
  } catch (const ScopeError& e) {
    EXPECT_NE(std::string(e.what()).find("ThreadScope::func()"), std::string::npos);
  }
}

TEST(FuncScopeOf, DestroyingTheRegistryDestroysEveryStringScopesValue) {
  Counts counts;
  {
    ScopedRegistry<Counted, FuncScopeOf<std::string>> reg(
        [&] { return Counted(counts); }, FuncScopeOf<std::string>([] { return t_session_id; }));
    for (const char* id : {"a", "b", "c"}) {
      t_session_id = id;
      reg();
    }
    EXPECT_EQ(counts.alive(), 3);
  }
  EXPECT_EQ(counts.alive(), 0);
  end_scope(std::string("a"));  // the registry is gone: nothing left to reach
  EXPECT_EQ(counts.destroyed.load(), 3);
  t_session_id.clear();
}


// One thread sets the value for a token while another clears it (neither uses the value,
// so neither races with its destruction): each records its binding in the process's index
// after releasing the store's lock, so the clear's unbind can arrive before the set's
// bind. The index must still end with no binding for the
// token (before the fix, a late bind stayed behind with no value, and after the registry
// was destroyed it pointed at freed memory: the scope's end then called into it).
TEST(FuncScope, SetAndClearRacingOnOneTokenLeaveNoBindingBehind) {
  const ScopeToken token(0x5eed'0000'0001);
  const std::size_t place = internal::placement_of(token);
  ASSERT_FALSE(internal::has_bound_at(place));
  constexpr int kRounds = 4;
  for (int round = 0; round < kRounds; ++round) {
    auto reg = std::make_unique<ScopedRegistry<int, FuncScope>>([] { return 7; },
                                                               ScopeFunc([token] { return token; }));
    std::atomic<bool> stop{false};
    std::thread clearer([&] {
      while (!stop.load(std::memory_order_relaxed)) reg->clear();
    });
    for (int i = 0; i < 20'000; ++i) reg->set(i);
    stop.store(true);
    clearer.join();
    reg->clear();
    EXPECT_FALSE(internal::has_bound_at(place)) << "round " << round;
    (*reg)();
    EXPECT_TRUE(internal::has_bound_at(place));
    reg.reset();  // unbinds its one value
    EXPECT_FALSE(internal::has_bound_at(place)) << "round " << round;
    end_scope(token);  // nothing bound: reaches no registry
  }
}

}  // namespace
}  // namespace scopereg
