#include "scopereg/session_cache.h"

#include <atomic>
#include <chrono>
#include <latch>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "scopereg/explicit_scope.h"
#include "scopereg/fiber_scope.h"

namespace scopereg {
namespace {

using namespace std::chrono_literals;

// A connection-like value that records what happened to it.
struct Conn {
  explicit Conn(std::string name, int serial) : name(std::move(name)), serial(serial) {}
  Conn(const Conn&) = delete;
  Conn& operator=(const Conn&) = delete;
  std::string name;
  int serial;
  bool alive = true;  // set false "behind the library's back" to make it stale
};

// Records hook calls in order, across threads.
struct Journal {
  std::mutex mu;
  std::vector<std::string> events;
  void add(std::string e) {
    std::lock_guard<std::mutex> lock(mu);
    events.push_back(std::move(e));
  }
  std::vector<std::string> take() {
    std::lock_guard<std::mutex> lock(mu);
    return std::exchange(events, {});
  }
};

// How each strategy runs a piece of work in a fresh scope.
struct ThreadStrategy {
  using Scope = ThreadScope;
  static Scope make() { return {}; }
  template <typename F>
  static void in_new_scope(F f) {
    std::thread(f).join();
  }
};
std::atomic<int> g_next_request{0};
struct ExplicitStrategy {
  using Scope = ExplicitScope;
  static Scope make() { return {}; }
  template <typename F>
  static void in_new_scope(F f) {
    ScopeGuard guard(std::string("request-") + std::to_string(g_next_request++));
    f();
  }
};
struct FiberStrategy {
  using Scope = FiberScope;
  static Scope make() { return {}; }
  template <typename F>
  static void in_new_scope(F f) {
    Fiber fiber(f);
    fiber.resume();
  }
};
struct FuncStrategy {
  using Scope = FuncScope;
  static Scope make() { return FuncScope(ThreadScope::func()); }
  template <typename F>
  static void in_new_scope(F f) {
    std::thread(f).join();
  }
};

template <typename Strategy>
class SessionCacheTest : public ::testing::Test {
 protected:
  using Cache = SessionCache<Conn, typename Strategy::Scope>;

  typename Cache::Options options(const std::string& name, bool close_throws = false) {
    typename Cache::Options o;
    o.factory = [this, name] {
      journal.add("open " + name);
      return Conn(name, ++serial);
    };
    o.close = [this, close_throws](Conn& c) {
      journal.add("close " + c.name);
      if (close_throws) throw std::runtime_error("connection reset");
    };
    o.teardown = [this](Conn& c, bool ok) { journal.add((ok ? "commit " : "rollback ") + c.name); };
    return o;
  }

  Journal journal;
  std::atomic<int> serial{0};
  Cache cache{Strategy::make()};
};

using Strategies = ::testing::Types<ThreadStrategy, ExplicitStrategy, FiberStrategy, FuncStrategy>;
TYPED_TEST_SUITE(SessionCacheTest, Strategies);

TYPED_TEST(SessionCacheTest, GetCreatesOneValuePerNameAndScope) {
  this->cache.add("orders", this->options("orders"));
  this->cache.add("audit", this->options("audit"));
  TypeParam::in_new_scope([&] {
    Conn& orders = this->cache.get("orders");
    EXPECT_EQ(&this->cache.get("orders"), &orders);
    EXPECT_NE(&this->cache.get("audit"), &orders);
    EXPECT_EQ(this->cache.get("audit").name, "audit");
    auto handle = this->cache.intern("orders");
    EXPECT_EQ(&this->cache.get(handle), &orders);
    EXPECT_EQ(&handle(), &orders);
  });
  TypeParam::in_new_scope([&] { EXPECT_EQ(this->cache.get("orders").serial, 3); });
}

TYPED_TEST(SessionCacheTest, UsedListsTheScopesNamesInFirstUseOrder) {
  for (const char* n : {"a", "b", "c"}) this->cache.add(n, this->options(n));
  TypeParam::in_new_scope([&] {
    EXPECT_TRUE(this->cache.used().empty());
    this->cache.get("c");
    this->cache.get("a");
    this->cache.get("c");
    EXPECT_EQ(this->cache.used(), (std::vector<std::string>{"c", "a"}));
    TypeParam::in_new_scope([&] {
      this->cache.get("b");
      EXPECT_EQ(this->cache.used(), (std::vector<std::string>{"b"}));
    });
    EXPECT_EQ(this->cache.used(), (std::vector<std::string>{"c", "a"}));
  });
}

TYPED_TEST(SessionCacheTest, ClearClosesInReverseFirstUseOrderAndLeavesOtherScopes) {
  for (const char* n : {"a", "b", "c"}) this->cache.add(n, this->options(n));
  TypeParam::in_new_scope([&] {
    this->cache.get("b");
    this->cache.get("c");
    this->cache.get("a");
    this->journal.take();
    EXPECT_TRUE(this->cache.clear_for_current_scope().ok());
    EXPECT_EQ(this->journal.take(), (std::vector<std::string>{"close a", "close c", "close b"}));
    EXPECT_TRUE(this->cache.used().empty());
    const int before = this->serial;
    this->cache.get("b");  // afresh
    EXPECT_EQ(this->serial, before + 1);
    EXPECT_TRUE(this->cache.clear_for_current_scope().ok());
  });
}

TYPED_TEST(SessionCacheTest, AThrowingCloseHookAmongFiveOthersStopsNothingAndIsNamed) {
  const std::vector<std::string> names = {"n1", "n2", "n3", "bad", "n4", "n5"};
  for (const auto& n : names) this->cache.add(n, this->options(n, n == "bad"));
  TypeParam::in_new_scope([&] {
    for (const auto& n : names) this->cache.get(n);
    this->journal.take();
    const absl::Status status = this->cache.clear_for_current_scope();
    EXPECT_FALSE(status.ok());
    EXPECT_NE(status.message().find("bad: close failed: connection reset"),
              std::string::npos) << status;
    EXPECT_NE(status.message().find("1 failure"), std::string::npos) << status;
    EXPECT_EQ(this->journal.take().size(), 6u);  // every hook ran
    EXPECT_TRUE(this->cache.used().empty());
    const int before = this->serial;
    for (const auto& n : names) this->cache.get(n);  // all were removed: all re-created
    EXPECT_EQ(this->serial, before + 6);
    EXPECT_FALSE(this->cache.clear_for_current_scope().ok());  // "bad" fails again
  });
}

TYPED_TEST(SessionCacheTest, TeardownCommitsOnSuccessAndRollsBackOnException) {
  this->cache.add("orders", this->options("orders"));
  this->cache.add("audit", this->options("audit"));
  TypeParam::in_new_scope([&] {
    {
      typename TestFixture::Cache::TeardownGuard done(this->cache);
      this->cache.get("orders");
      this->cache.get("audit");
      this->journal.take();
    }
    EXPECT_EQ(this->journal.take(), (std::vector<std::string>{"commit audit", "commit orders",
                                                              "close audit", "close orders"}));
    EXPECT_TRUE(this->cache.used().empty());
    try {
      typename TestFixture::Cache::TeardownGuard done(this->cache);
      this->cache.get("orders");
      this->journal.take();
      throw std::runtime_error("handler failed");
    } catch (const std::runtime_error&) {
    }
    EXPECT_EQ(this->journal.take(),
              (std::vector<std::string>{"rollback orders", "close orders"}));
    {
      typename TestFixture::Cache::TeardownGuard done(this->cache);
      this->cache.get("audit");
      this->journal.take();
      done.fail();
    }
    EXPECT_EQ(this->journal.take(), (std::vector<std::string>{"rollback audit", "close audit"}));
  });
}

TYPED_TEST(SessionCacheTest, TeardownFailuresGoToTheReporterNotLost) {
  auto o = this->options("orders", /*close_throws=*/true);
  o.teardown = [](Conn&, bool) { throw std::runtime_error("commit refused"); };
  this->cache.add("orders", o);
  std::vector<std::string> reports;
  this->cache.set_error_reporter([&](const absl::Status& s) { reports.emplace_back(s.message()); });
  TypeParam::in_new_scope([&] {
    typename TestFixture::Cache::TeardownGuard done(this->cache);
    this->cache.get("orders");
  });
  ASSERT_EQ(reports.size(), 1u);
  EXPECT_NE(reports[0].find("orders: teardown failed: commit refused"), std::string::npos);
  EXPECT_NE(reports[0].find("orders: close failed: connection reset"), std::string::npos);
}

TYPED_TEST(SessionCacheTest, AStaleValueIsClosedOnceAndRecreated) {
  auto o = this->options("db");
  o.validate = [](Conn& c) { return c.alive; };
  this->cache.add("db", o);
  TypeParam::in_new_scope([&] {
    Conn& first = this->cache.get("db");
    const int first_serial = first.serial;
    first.alive = false;  // "MySQL server has gone away"
    this->journal.take();
    Conn& second = this->cache.get("db");
    EXPECT_NE(second.serial, first_serial);
    EXPECT_EQ(this->journal.take(), (std::vector<std::string>{"close db", "open db"}));
    EXPECT_EQ(this->cache.get("db").serial, second.serial);
    EXPECT_TRUE(this->journal.take().empty());
    EXPECT_TRUE(this->cache.clear_for_current_scope().ok());
  });
}

TYPED_TEST(SessionCacheTest, ValuesThatDieWithTheirScopeAreClosedToo) {
  this->cache.add("orders", this->options("orders"));
  TypeParam::in_new_scope([&] {
    this->cache.get("orders");
  });  // the scope ends here (thread exit, fiber end, last guard gone)
  const auto events = this->journal.take();
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[1], "close orders");
}

TYPED_TEST(SessionCacheTest, ProxiesForwardToTheCallingScopesValue) {
  this->cache.add("orders", this->options("orders"));
  auto handle = this->cache.intern("orders");
  ScopedProxy proxy(handle);
  TypeParam::in_new_scope([&] {
    EXPECT_EQ(proxy->name, "orders");
    EXPECT_EQ(&*proxy, &this->cache.get("orders"));
  });
}

TEST(SessionCache, UnknownNamesListTheKnownOnes) {
  SessionCache<int> cache;
  cache.add("orders", {.factory = [] { return 1; }});
  cache.add("audit", {.factory = [] { return 2; }});
  try {
    cache.get("ordres");
    FAIL() << "expected ScopeError";
  } catch (const ScopeError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("'ordres'"), std::string::npos);
    EXPECT_NE(what.find("orders"), std::string::npos);
    EXPECT_NE(what.find("audit"), std::string::npos);
  }
  EXPECT_THROW(cache.add("orders", {.factory = [] { return 3; }}), ScopeError);
  EXPECT_THROW(cache.add("empty", {}), ScopeError);
}

TEST(SessionCache, AResolverConfiguresANameOnceOnFirstUse) {
  SessionCache<std::string> cache;
  std::atomic<int> resolved{0};
  cache.set_resolver([&](std::string_view name) -> std::optional<SessionOptions<std::string>> {
    ++resolved;
    if (name.substr(0, 3) != "db_") return std::nullopt;
    return SessionOptions<std::string>{.factory = [n = std::string(name)] { return n; }};
  });
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&] { EXPECT_EQ(cache.get("db_orders"), "db_orders"); });
  }
  for (auto& t : threads) t.join();
  EXPECT_LE(resolved.load(), 4);
  const int after = resolved;
  cache.get("db_orders");
  EXPECT_EQ(resolved.load(), after);  // no more resolving once known
  EXPECT_THROW(cache.get("other"), ScopeError);
}

TEST(SessionCache, ProxyOverARegistryCreatesOrReportsClearly) {
  ScopedRegistry<std::string, ExplicitScope> registry([] { return std::string("session"); });
  ScopedProxy session(registry);
  EXPECT_THROW(session->size(), ScopeError);  // no active scope: creation impossible
  ScopeGuard guard(1);
  EXPECT_EQ(session->size(), 7u);
  EXPECT_EQ(&*session, &registry());
}

TEST(SessionCache, MaxAgeRecyclesOldValues) {
  SessionCache<int> cache;
  std::atomic<int> made{0}, closed{0};
  cache.add("db", {.factory = [&] { return ++made; },
                   .close = [&](int&) { ++closed; },
                   .max_age = 20ms});
  EXPECT_EQ(cache.get("db"), 1);
  EXPECT_EQ(cache.get("db"), 1);
  std::this_thread::sleep_for(30ms);
  EXPECT_EQ(cache.get("db"), 2);
  EXPECT_EQ(closed, 1);
  EXPECT_TRUE(cache.clear_for_current_scope().ok());
}

TEST(SessionCache, ValidationRunsAtMostEveryValidateEvery) {
  SessionCache<int> cache;
  std::atomic<int> checks{0};
  cache.add("db", {.factory = [] { return 1; },
                   .validate = [&](int&) { ++checks; return true; },
                   .validate_every = 1h});
  for (int i = 0; i < 100; ++i) cache.get("db");
  EXPECT_EQ(checks, 0);  // a fresh value is not checked again within the hour
  EXPECT_TRUE(cache.clear_for_current_scope().ok());
}

TEST(SessionCache, TheCapBoundsLiveValuesWakesWaitersAndTimesOut) {
  SessionCache<int> cache;
  std::atomic<int> live{0}, max_seen{0};
  cache.add("pool", {.factory = [&] {
                       const int now = ++live;
                       int seen = max_seen;
                       while (now > seen && !max_seen.compare_exchange_weak(seen, now)) {
                       }
                       return now;
                     },
                     .close = [&](int&) { --live; },
                     .max_live = 2,
                     .acquire_timeout = 5s});
  constexpr int kThreads = 6;
  std::vector<std::thread> threads;
  std::atomic<int> done{0};
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&] {
      for (int k = 0; k < 20; ++k) {
        cache.get("pool");
        std::this_thread::sleep_for(100us);
        EXPECT_TRUE(cache.clear_for_current_scope().ok());  // releases: wakes a waiter
      }
      ++done;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(done, kThreads);
  EXPECT_LE(max_seen, 2);
  EXPECT_EQ(live, 0);

  cache.add("tiny", {.factory = [] { return 0; }, .max_live = 1, .acquire_timeout = 20ms});
  cache.get("tiny");
  std::thread([&] {
    try {
      cache.get("tiny");
      ADD_FAILURE() << "expected the cap's deadline error";
    } catch (const ScopeError& e) {
      EXPECT_NE(std::string(e.what()).find("'tiny' is at its cap of 1"), std::string::npos);
    }
  }).join();
  EXPECT_TRUE(cache.clear_for_current_scope().ok());
}

TEST(SessionCache, AFactoryThatReentersItsSessionGetsAnErrorNamingTheSession) {
  SessionCache<int> sessions;
  sessions.add("orders", {.factory = [&] { return sessions.get("orders") + 1; }});
  try {
    sessions.get("orders");
    FAIL() << "expected ScopeError";
  } catch (const ScopeError& e) {
    EXPECT_NE(std::string(e.what()).find("session 'orders'"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(sessions.used().empty() || sessions.used() == std::vector<std::string>{"orders"});
}

TEST(SessionCache, AReplacementWhoseFactoryThrowsLeavesNoValueAndTheNextGetRetries) {
  SessionCache<int> cache;
  bool valid = true, refuse = false;
  int made = 0, closed = 0;
  cache.add("db", {.factory = [&] {
                     if (refuse) throw std::runtime_error("connection refused");
                     return ++made;
                   },
                   .close = [&](int&) { ++closed; },
                   .validate = [&](int&) { return valid; }});
  EXPECT_EQ(cache.get("db"), 1);
  valid = false;
  refuse = true;
  EXPECT_THROW(cache.get("db"), std::runtime_error);  // the stale value was closed first
  EXPECT_EQ(closed, 1);
  EXPECT_THROW(cache.get("db"), std::runtime_error);  // nothing left behind: made again
  EXPECT_EQ(closed, 1);
  EXPECT_TRUE(cache.clear_for_current_scope().ok());  // an empty slot closes nothing
  EXPECT_EQ(closed, 1);
  valid = true;
  refuse = false;
  EXPECT_EQ(cache.get("db"), 2);
  EXPECT_TRUE(cache.clear_for_current_scope().ok());
  EXPECT_EQ(closed, 2);
}

TEST(SessionCache, AFactoryThatReentersWhileReplacingAStaleValueGetsAnErrorNotAHang) {
  SessionCache<int> sessions;
  bool valid = true, reenter = false;
  sessions.add("orders", {.factory = [&] { return reenter ? sessions.get("orders") + 1 : 1; },
                          .validate = [&](int&) { return valid; }});
  sessions.get("orders");
  valid = false;
  reenter = true;
  try {
    sessions.get("orders");
    FAIL() << "expected ScopeError";
  } catch (const ScopeError& e) {
    EXPECT_NE(std::string(e.what()).find("session 'orders'"), std::string::npos) << e.what();
  }
  valid = true;
  reenter = false;
  EXPECT_EQ(sessions.get("orders"), 1);
  EXPECT_TRUE(sessions.clear_for_current_scope().ok());
}

// A scope shared by threads: one ExplicitScope token active on several threads at once
// (ScopeGuard on each, or work carried there with wrap()), as the file comment allows.

TEST(SessionCacheSharedScope, NamesFirstUsedAtOnceByTheScopesThreadsAreAllClosedOnceByClear) {
  constexpr int kNames = 24;
  constexpr int kThreads = 4;
  constexpr int kRounds = 30;
  SessionCache<int, ExplicitScope> cache;
  std::vector<std::string> names;
  std::vector<std::atomic<int>> made(kNames), closed(kNames);
  for (int i = 0; i < kNames; ++i) {
    names.push_back("db" + std::to_string(i));
    cache.add(names.back(), {.factory = [&made, i] { return ++made[i]; },
                             .close = [&closed, i](int&) { ++closed[i]; }});
  }
  for (int round = 0; round < kRounds; ++round) {
    const std::string token = "shared-names-" + std::to_string(round);
    ScopeGuard request(token);
    std::latch start(kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        ScopeGuard same(token);  // the request's scope, active here too
        start.arrive_and_wait();
        // Each thread starts elsewhere in the list: first uses of different names overlap.
        for (int k = 0; k < kNames; ++k) cache.get(names[(k + t * kNames / kThreads) % kNames]);
      });
    }
    for (auto& thread : threads) thread.join();
    ASSERT_EQ(cache.used().size(), static_cast<std::size_t>(kNames)) << "round " << round;
    EXPECT_TRUE(cache.clear_for_current_scope().ok());
    for (int i = 0; i < kNames; ++i) {
      ASSERT_EQ(made[i], round + 1) << names[i] << ", round " << round;
      ASSERT_EQ(closed[i], round + 1) << names[i] << " not closed by the clear, round " << round;
    }
  }
}

TEST(SessionCacheSharedScope, AValueFoundStaleByManyThreadsAtOnceIsClosedOnceAndAllGetOneNew) {
  constexpr int kThreads = 4;
  constexpr int kRounds = 200;
  SessionCache<Conn, ExplicitScope> cache;
  std::atomic<int> serial{0};
  std::atomic<int> stale_up_to{0};  // values with a serial up to this fail validation
  std::mutex mu;
  std::map<int, int> closes;  // serial -> close hook calls
  cache.add("db", {.factory = [&] { return Conn("db", ++serial); },
                   .close = [&](Conn& c) {
                     std::lock_guard<std::mutex> lock(mu);
                     ++closes[c.serial];
                   },
                   .validate = [&](Conn& c) { return c.serial > stale_up_to; }});
  ScopeGuard request(std::string("shared-stale"));
  cache.get("db");
  for (int round = 0; round < kRounds; ++round) {
    stale_up_to = serial.load();  // the value dies "behind the cache's back"
    std::latch start(kThreads);
    std::vector<int> seen(kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back(wrap([&, t] {  // runs in the request's scope
        start.arrive_and_wait();
        seen[t] = cache.get("db").serial;
      }));
    }
    for (auto& thread : threads) thread.join();
    ASSERT_EQ(serial, round + 2) << "one replacement per round";
    for (int t = 0; t < kThreads; ++t) ASSERT_EQ(seen[t], round + 2) << "round " << round;
  }
  EXPECT_TRUE(cache.clear_for_current_scope().ok());
  std::lock_guard<std::mutex> lock(mu);
  ASSERT_EQ(closes.size(), static_cast<std::size_t>(kRounds + 1));
  for (const auto& [made, calls] : closes) EXPECT_EQ(calls, 1) << "value #" << made;
}

}  // namespace
}  // namespace scopereg
