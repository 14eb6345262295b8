#include "scopereg/explicit_scope.h"

#include <malloc.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <functional>
#include <latch>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "counted.h"
#include "gtest/gtest.h"
#include "scopereg/scoped_registry.h"
#include "thread_pool.h"

namespace scopereg {
namespace {

using ::scopereg::testing::Counted;
using ::scopereg::testing::Counts;
using ::scopereg::testing::ThreadPool;

// A registry of Counted values, each with a fresh id.
struct Fixture {
  Counts counts;
  std::atomic<int> next_id{0};
  ScopedRegistry<Counted, ExplicitScope> reg{[this] { return Counted(counts, ++next_id); }};
};

TEST(ExplicitScope, WithNoActiveScopeGetFailsAndLookUpsFindNothing) {
  Fixture f;
  EXPECT_FALSE(ExplicitScope::active());
  EXPECT_TRUE(ExplicitScope::current().is_null());
  EXPECT_EQ(f.reg.find(), nullptr);
  EXPECT_FALSE(f.reg.has());
  f.reg.clear();
  try {
    f.reg();
    FAIL() << "expected ScopeError";
  } catch (const ScopeError& e) {
    EXPECT_NE(std::string(e.what()).find("ScopeGuard"), std::string::npos) << e.what();
  }
  EXPECT_EQ(f.counts.made, 0);
}

TEST(ExplicitScope, GuardsNestAndLeavingTheInnerRestoresTheOuterUntouched) {
  Fixture f;
  ScopeGuard outer(1);
  Counted* outer_value = &f.reg();
  {
    ScopeGuard inner(2);
    EXPECT_NE(&f.reg(), outer_value);
    EXPECT_EQ(f.counts.alive(), 2);
  }
  EXPECT_EQ(&f.reg(), outer_value);  // flask-sqlalchemy#944: the outer session survives
  EXPECT_EQ(f.counts.alive(), 1);
  EXPECT_EQ(f.reg().id(), 1);
}

TEST(ExplicitScope, ReenteringTheActiveTokenIsTheSameScope) {
  Fixture f;
  ScopeGuard outer(std::string("req-1"));
  Counted* value = &f.reg();
  {
    ScopeGuard again(std::string("req-1"));
    EXPECT_EQ(&f.reg(), value);
    EXPECT_EQ(again.token(), outer.token());
  }
  EXPECT_EQ(&f.reg(), value);
  EXPECT_EQ(f.counts.alive(), 1);
}

TEST(ExplicitScope, EveryOrderOfLeavingFourNestedScopesKeepsTheInnermostCurrent) {
  std::array<int, 4> order = {0, 1, 2, 3};
  int permutations = 0;
  do {
    Fixture f;
    std::array<std::unique_ptr<ScopeGuard>, 4> guards;
    std::array<Counted*, 4> values{};
    for (int i = 0; i < 4; ++i) {
      guards[i] = std::make_unique<ScopeGuard>(100 + i);
      values[i] = &f.reg();
      ASSERT_EQ(values[i]->id(), i + 1);
    }
    for (int step = 0; step < 4; ++step) {
      const int leaving = order[step];
      guards[leaving].reset();
      ASSERT_EQ(f.counts.destroyed, step + 1);
      int innermost = -1;
      for (int i = 3; i >= 0; --i) {
        if (guards[i]) {
          innermost = i;
          break;
        }
      }
      if (innermost < 0) {
        EXPECT_FALSE(ExplicitScope::active());
        break;
      }
      ASSERT_EQ(ExplicitScope::current(), guards[innermost]->token());
      ASSERT_EQ(f.reg.find(), values[innermost]);  // untouched, not recreated
      for (int i = 0; i < 4; ++i) {
        if (!guards[i]) continue;
        // Every scope still active kept its own value.
        ScopeGuard probe(100 + i);
        ASSERT_EQ(f.reg.find(), values[i]);
      }
    }
    EXPECT_EQ(f.counts.made, 4);
    EXPECT_EQ(f.counts.alive(), 0);
    ++permutations;
  } while (std::next_permutation(order.begin(), order.end()));
  EXPECT_EQ(permutations, 24);
}

TEST(ExplicitScope, ATokenEnteredAgainAfterItsEndStartsEmpty) {
  Fixture f;
  ScopeToken first;
  {
    ScopeGuard guard(7);
    first = guard.token();
    EXPECT_EQ(f.reg().id(), 1);
  }
  EXPECT_EQ(f.counts.destroyed, 1);
  ScopeGuard guard(7);
  EXPECT_NE(guard.token(), first);
  EXPECT_FALSE(f.reg.has());
  EXPECT_EQ(f.reg().id(), 2);
}

TEST(ExplicitScope, AKeptScopeOutlivesItsGuardsUntilEnded) {
  Fixture f;
  {
    ScopeGuard guard(std::string("job"), ScopeLifetime::kUntilEnded);
    f.reg();
  }
  EXPECT_EQ(f.counts.alive(), 1);
  {
    ScopeGuard guard(std::string("job"));
    EXPECT_EQ(f.reg().id(), 1);  // the work continues in the same scope
  }
  EXPECT_EQ(f.counts.alive(), 1);
  ExplicitScope::end(std::string("job"));
  EXPECT_EQ(f.counts.alive(), 0);
  ScopeGuard guard(std::string("job"));
  EXPECT_FALSE(f.reg.has());
  ExplicitScope::end(std::string("never-entered"));  // no-op
}

TEST(ExplicitScope, EndingAScopeInUseDefersDestructionToItsLastGuard) {
  Fixture f;
  ScopeGuard guard(5);
  f.reg();
  ExplicitScope::end(5);
  EXPECT_EQ(f.counts.alive(), 1);  // still in use here
  EXPECT_EQ(f.reg().id(), 1);
  std::thread([&] {
    ScopeGuard fresh(5);  // a new life of token 5
    EXPECT_EQ(f.reg().id(), 2);
  }).join();
  EXPECT_EQ(f.counts.alive(), 1);
}

struct UserToken {
  int tenant;
  std::string user;
  bool operator==(const UserToken&) const = default;
  template <typename H>
  friend H AbslHashValue(H h, const UserToken& t) {
    return H::combine(std::move(h), t.tenant, t.user);
  }
};

TEST(ExplicitScope, TokensOfDifferentTypesAreDifferentScopes) {
  Fixture f;
  std::vector<int> ids;
  {
    ScopeGuard a(7);
    ids.push_back(f.reg().id());
    ScopeGuard b(7L);
    ids.push_back(f.reg().id());
    ScopeGuard c(std::string("7"));
    ids.push_back(f.reg().id());
    ScopeGuard d(UserToken{1, "7"});
    ids.push_back(f.reg().id());
    ScopeGuard e(UserToken{1, "7"});
    ids.push_back(f.reg().id());
  }
  EXPECT_EQ(ids, (std::vector<int>{1, 2, 3, 4, 4}));
  EXPECT_EQ(f.counts.alive(), 0);
}

// A token whose copy throws when asked to: the table copies a token it has not seen.
struct CopyThrows {
  int id;
  bool throws;
  CopyThrows(int i, bool t) : id(i), throws(t) {}
  CopyThrows(const CopyThrows& other) : id(other.id), throws(other.throws) {
    if (throws) throw std::runtime_error("token copy failed");
  }
  bool operator==(const CopyThrows& other) const { return id == other.id; }
  template <typename H>
  friend H AbslHashValue(H h, const CopyThrows& t) {
    return H::combine(std::move(h), t.id);
  }
};

// The failed entries take no scope and keep nothing: the caller's scope stays current, the
// token enters normally once its copy succeeds, and (under AddressSanitizer's leak check)
// no scope record is lost.
TEST(ExplicitScope, AGuardWhoseTokenCopyThrowsEntersNoScopeAndKeepsNothing) {
  Fixture f;
  ScopeGuard outer(1);
  const int outer_id = f.reg().id();
  for (int i = 0; i < 100; ++i) {
    EXPECT_THROW(ScopeGuard g(CopyThrows(i % 3, true)), std::runtime_error);
    EXPECT_EQ(f.reg().id(), outer_id);
  }
  // Memory: 20,000 more failed entries hold on to nothing (a lost scope record would be
  // over 400 bytes each). Not checked under a sanitizer's allocator, which mallinfo2 does
  // not see.
  if (const std::size_t before = mallinfo2().uordblks; before != 0) {
    for (int i = 0; i < 20'000; ++i) {
      try {
        ScopeGuard g(CopyThrows(i, true));
      } catch (const std::runtime_error&) {
      }
    }
    const std::size_t after = mallinfo2().uordblks;
    EXPECT_LT(after, before + (1 << 20)) << "grew by " << after - before << " bytes";
  }
  {
    ScopeGuard g(CopyThrows(1, false));
    EXPECT_NE(f.reg().id(), outer_id);
    EXPECT_EQ(f.counts.alive(), 2);
  }
  EXPECT_EQ(f.counts.alive(), 1);
  EXPECT_EQ(f.reg().id(), outer_id);
}

// Tokens that all hash alike land in one shard of the token table, past its inline
// entries: each still names its own scope, and leaving them in any order keeps the rest.
struct SameHash {
  int id;
  bool operator==(const SameHash&) const = default;
  template <typename H>
  friend H AbslHashValue(H h, const SameHash&) {
    return H::combine(std::move(h), 1);
  }
};

// Holds `n` live scopes named by make(i), each with its own value, and releases them in a
// shuffled order, checking after every release that each remaining token still finds its
// own value (and that a released token starts a new, empty scope).
template <typename MakeToken>
void live_tokens_keep_their_scopes(int n, MakeToken make) {
  Fixture f;
  std::vector<std::unique_ptr<CapturedScope>> live;
  std::vector<int> value_of(n);
  for (int i = 0; i < n; ++i) {
    live.push_back(std::make_unique<CapturedScope>(CapturedScope::of(make(i))));
    value_of[i] = live.back()->run([&] { return f.reg().id(); });
  }
  EXPECT_EQ(f.counts.alive(), n);
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = (i * 7919) % n;  // n is not a multiple of 7919
  for (int k = 0; k < n; ++k) {
    live[order[k]].reset();
    EXPECT_EQ(f.counts.alive(), n - k - 1);
    // The survivors (every one when there are few), and the token just released.
    for (int j = k + 1; j < n; j += n > 100 ? n / 8 : 1) {
      ScopeGuard g(make(order[j]));
      ASSERT_NE(f.reg.find(), nullptr) << "token " << order[j];
      EXPECT_EQ(f.reg.find()->id(), value_of[order[j]]);
    }
    ScopeGuard again(make(order[k]));
    EXPECT_EQ(f.reg.find(), nullptr);
  }
  EXPECT_EQ(f.counts.alive(), 0);
}

TEST(ExplicitScope, ManyLiveTokensEachKeepTheirScope) {
  live_tokens_keep_their_scopes(5000, [](int i) { return i; });
}

TEST(ExplicitScope, LiveTokensWithOneHashEachKeepTheirScope) {
  ASSERT_EQ(absl::Hash<SameHash>{}(SameHash{1}), absl::Hash<SameHash>{}(SameHash{2}));
  live_tokens_keep_their_scopes(50, [](int i) { return SameHash{i}; });
}

TEST(ExplicitScope, ThreadsEnteringTokensOfOneHashShareOnlyEqualTokens) {
  // Four threads enter the same 8 colliding tokens (all in one shard) over and over: each
  // token's value is made once per life and never seen under another token.
  // The value is shared by every thread in the token's scope: it is claimed atomically.
  using Claim = std::shared_ptr<std::atomic<int>>;
  ScopedRegistry<Claim, ExplicitScope> reg([] { return std::make_shared<std::atomic<int>>(-1); });
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 2000; ++round) {
        const int id = (round + t) % 8;
        ScopeGuard g(SameHash{id}, ScopeLifetime::kUntilEnded);
        std::atomic<int>& v = *reg();
        int unclaimed = -1;
        v.compare_exchange_strong(unclaimed, id);
        if (v.load() != id) wrong.fetch_add(1);
      }
    });
  }
  for (std::thread& th : threads) th.join();
  EXPECT_EQ(wrong.load(), 0);
  for (int id = 0; id < 8; ++id) ExplicitScope::end(SameHash{id});
}

TEST(ExplicitScope, AWrappedCallableRunsInTheCapturedScopeAndRestoresTheRunners) {
  Fixture f;
  std::function<int()> task;
  Counted* request_value;
  {
    ScopeGuard request(1);
    request_value = &f.reg();
    task = wrap([&] { return f.reg().id(); });
  }
  EXPECT_EQ(f.counts.alive(), 1);  // kept alive by the wrapped callable
  std::thread([&] {
    ScopeGuard own(2);
    Counted* own_value = &f.reg();
    EXPECT_EQ(task(), request_value->id());
    EXPECT_EQ(ExplicitScope::current(), own.token());
    EXPECT_EQ(&f.reg(), own_value);
  }).join();
  EXPECT_FALSE(ExplicitScope::active());
  EXPECT_EQ(f.counts.alive(), 1);
  task = nullptr;
  EXPECT_EQ(f.counts.alive(), 0);
}

TEST(ExplicitScope, ValuesLiveExactlyAsLongAsGuardsAndWrappedCallablesNeedThem) {
  Fixture f;
  auto guard = std::make_unique<ScopeGuard>(3);
  f.reg();
  auto first = wrap([&] { return f.reg().id(); });
  auto second = first;  // copies share the scope
  guard.reset();
  EXPECT_EQ(f.counts.alive(), 1);
  EXPECT_EQ(first(), 1);
  { auto dropped = std::move(first); }
  EXPECT_EQ(f.counts.alive(), 1);
  EXPECT_EQ(second(), 1);
  { auto dropped = std::move(second); }
  EXPECT_EQ(f.counts.alive(), 0);
  EXPECT_EQ(f.counts.made, 1);
}

TEST(ExplicitScope, WrapCapturesTheWholeStack) {
  Fixture f;
  ScopeGuard outer(1);
  Counted* outer_value = &f.reg();
  std::function<void()> task;
  {
    ScopeGuard inner(2);
    task = wrap([&] {
      EXPECT_EQ(f.reg().id(), 2);
      {
        ScopeGuard outer_again(1);  // the outer scope is in the captured stack too
        EXPECT_EQ(&f.reg(), outer_value);
      }
    });
  }
  task();
  auto current = wrap([&] { return ExplicitScope::current(); });
  EXPECT_EQ(current(), outer.token());
  EXPECT_EQ(&f.reg(), outer_value);
}

TEST(ExplicitScope, AWrappedCallableCapturedWithNoScopeRunsWithNoScope) {
  Fixture f;
  auto task = wrap([&] { return ExplicitScope::active(); });
  ScopeGuard guard(1);
  EXPECT_FALSE(task());
  EXPECT_TRUE(ExplicitScope::active());
}

TEST(ExplicitScope, AnExceptionLeavingAWrappedCallableStillRestoresTheCallersScope) {
  std::function<void()> task;
  {
    ScopeGuard request(1);
    task = wrap([] { throw std::runtime_error("handler failed"); });
  }
  ScopeGuard mine(2);
  EXPECT_THROW(task(), std::runtime_error);
  EXPECT_EQ(ExplicitScope::current(), mine.token());
}

TEST(ExplicitScope, ATokenActiveOnTwoThreadsAtOnceSharesOneValueCreatedOnce) {
  std::atomic<int> calls{0};
  ScopedRegistry<int, ExplicitScope> reg([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    return ++calls;
  });
  constexpr int kThreads = 4;
  std::latch start(kThreads), done(kThreads);
  std::vector<int*> seen(kThreads);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      ScopeGuard guard(std::string("fan-out"));
      start.arrive_and_wait();
      seen[i] = &reg();
      done.arrive_and_wait();  // every guard still active while the others look
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(calls, 1);
  for (int* p : seen) EXPECT_EQ(p, seen[0]);
  EXPECT_EQ(reg.size(), 0);  // the last guard ended the scope
}

TEST(ExplicitScope, AScopedExecutorRunsEveryTaskInItsSubmittersScope) {
  Fixture f;
  ThreadPool pool(2);
  ScopedExecutor exec([&pool](std::function<void()> task) { pool.post(std::move(task)); });
  std::atomic<int> wrong{0};
  for (int request = 0; request < 50; ++request) {
    ScopeGuard guard(request);
    const int id = f.reg().id();
    for (int part = 0; part < 4; ++part) {
      exec.post([&, id] { wrong += (f.reg().id() != id); });
    }
  }
  pool.wait_idle();
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(f.counts.made, 50);
  EXPECT_EQ(f.counts.alive(), 0);  // every request ended with its last task
}

TEST(ExplicitScope, TheScopeFuncFormEndsValuesWithTheScope) {
  Counts counts;
  ScopedRegistry<Counted, FuncScope> reg([&] { return Counted(counts); },
                                         ExplicitScope::func());
  EXPECT_THROW(reg(), ScopeError);
  {
    ScopeGuard guard(1);
    Counted* value = &reg();
    {
      ScopeGuard inner(2);
      EXPECT_NE(&reg(), value);
    }
    EXPECT_EQ(&reg(), value);
    EXPECT_EQ(counts.alive(), 1);
  }
  EXPECT_EQ(counts.alive(), 0);
  EXPECT_EQ(reg.size(), 0);
}

TEST(ExplicitScopeDeathTest, AGuardDestroyedOnAnotherThreadAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        auto* guard = new ScopeGuard(1);
        std::thread([guard] { delete guard; }).join();
      },
      "another thread, fiber or coroutine task");
}

TEST(ExplicitScope, IntAndLongTokensAreDifferentScopesAndTypedTokensAreNot) {
  ScopedRegistry<int, ExplicitScope> reg([] { return 0; });
  {
    ScopeGuard as_int(7);
    reg.set(1);
    ScopeGuard as_long(7L);  // another type: another scope, documented in explicit_scope.h
    EXPECT_EQ(reg(), 0);
  }
  using RequestId = TypedToken<struct RequestIdTag>;
  const int id_as_int = 9;
  const long id_as_long = 9;
  ScopeGuard first(RequestId{static_cast<std::uint64_t>(id_as_int)});
  reg.set(5);
  ScopeGuard second(RequestId{static_cast<std::uint64_t>(id_as_long)});
  EXPECT_EQ(reg(), 5);  // the same request, whatever integer type the call site had
}

// ScopeGuard(fresh_scope): a scope no token names, isolated from every other, carried to
// other threads by wrap(), ended with its guard and the last callable holding it.
TEST(ExplicitScope, FreshScopesAreIsolatedCarriedByWrapAndEndWithTheirLastHolder) {
  Counts counts;
  std::atomic<int> next{0};
  ScopedRegistry<Counted, ExplicitScope> reg([&] { return Counted(counts, ++next); });
  std::function<int()> later;
  int first_id = 0;
  {
    ScopeGuard a(fresh_scope);
    first_id = reg().id();
    {
      ScopeGuard b(fresh_scope);  // nested: a different scope, empty
      EXPECT_NE(reg().id(), first_id);
      EXPECT_NE(ExplicitScope::current(), ScopeToken());
    }
    EXPECT_EQ(counts.destroyed.load(), 1);  // b's value ended with b
    EXPECT_EQ(reg().id(), first_id);        // a's value untouched
    later = wrap([&reg] { return reg().id(); });
  }
  EXPECT_EQ(counts.destroyed.load(), 1);  // a is held by the wrapped callable
  int seen = 0;
  std::thread([&] { seen = later(); }).join();
  EXPECT_EQ(seen, first_id);  // the same scope, on another thread
  later = nullptr;
  EXPECT_EQ(counts.destroyed.load(), 2);
  EXPECT_EQ(counts.made.load(), 2);
  {
    ScopeGuard c(fresh_scope);
    EXPECT_NE(reg().id(), first_id);  // a fresh scope never reuses an ended one's values
  }
  EXPECT_EQ(counts.made.load(), counts.destroyed.load());
}

}  // namespace
}  // namespace scopereg
