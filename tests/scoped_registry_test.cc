#include "scopereg/scoped_registry.h"

#include <atomic>
#include <chrono>
#include <latch>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "counted.h"
#include "gtest/gtest.h"

namespace scopereg {
namespace {

using ::scopereg::testing::Counted;
using ::scopereg::testing::Counts;

// A user strategy with a string token, set per thread by the test.
thread_local std::string t_user_token = "default";
struct StringScope {
  using Token = std::string;
  std::string current() const { return t_user_token; }
};

struct NotAStrategy {};
struct NoHashToken {
  struct Token {
    int x;
    bool operator==(const Token&) const = default;
  };
  Token current() const { return {}; }
};
static_assert(ScopeStrategy<ThreadScope>);
static_assert(ScopeStrategy<FuncScope>);
static_assert(ScopeStrategy<StringScope>);
static_assert(!ScopeStrategy<NotAStrategy>);
static_assert(!ScopeStrategy<NoHashToken>);

TEST(ScopedRegistry, FactoryRunsOncePerScope) {
  int calls = 0;
  ScopedRegistry<int> reg([&] { return ++calls; });
  EXPECT_EQ(reg(), 1);
  EXPECT_EQ(reg(), 1);
  EXPECT_EQ(&reg(), &reg());
  EXPECT_EQ(calls, 1);
  std::thread([&] { EXPECT_EQ(reg(), 2); }).join();
  EXPECT_EQ(calls, 2);
}

TEST(ScopedRegistry, ValuesOfThreadsStayIsolated) {
  constexpr int kThreads = 8;
  ScopedRegistry<std::vector<int>> reg;
  std::latch all_written(kThreads);
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      for (int k = 0; k < 1000; ++k) reg().push_back(i);
      all_written.arrive_and_wait();
      for (int v : reg()) failures += (v != i);
      failures += (reg().size() != 1000);
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures, 0);
  EXPECT_FALSE(reg.has());
}

TEST(ScopedRegistry, NonMovableValuesAreBuiltInPlace) {
  Counts counts;
  {
    ScopedRegistry<Counted> reg([&] { return Counted(counts, 7); });
    EXPECT_EQ(reg().id(), 7);
    EXPECT_EQ(reg.set(counts, 8).id(), 8);
    EXPECT_EQ(reg().id(), 8);
    EXPECT_EQ(counts.made, 2);
    EXPECT_EQ(counts.destroyed, 1);
  }
  EXPECT_EQ(counts.alive(), 0);
}

TEST(ScopedRegistry, FindAndHasNeverCreate) {
  int calls = 0;
  ScopedRegistry<int> reg([&] { return ++calls; });
  EXPECT_FALSE(reg.has());
  EXPECT_EQ(reg.find(), nullptr);
  EXPECT_EQ(calls, 0);
  reg();
  EXPECT_TRUE(reg.has());
  ASSERT_NE(reg.find(), nullptr);
  EXPECT_EQ(*reg.find(), 1);
}

TEST(ScopedRegistry, ClearDestroysTheValueAndNextGetCreatesAfresh) {
  Counts counts;
  int next_id = 0;
  ScopedRegistry<Counted> reg([&] { return Counted(counts, ++next_id); });
  reg.clear();  // empty scope: no-op
  EXPECT_EQ(counts.made, 0);
  EXPECT_EQ(reg().id(), 1);
  reg.clear();
  EXPECT_EQ(counts.destroyed, 1);
  EXPECT_FALSE(reg.has());
  EXPECT_EQ(reg().id(), 2);
  reg.clear();
  reg.clear();
  EXPECT_EQ(counts.alive(), 0);
}

TEST(ScopedRegistry, CreateWithArgumentsWhenAValueExistsIsAnError) {
  ScopedRegistry<std::string> reg([] { return std::string("factory"); });
  EXPECT_EQ(reg.create(3, 'x'), "xxx");
  try {
    reg.create("again");
    FAIL() << "create() over an existing value must throw";
  } catch (const ScopeError& e) {
    EXPECT_NE(std::string(e.what()).find("no new arguments may be specified"),
              std::string::npos);
    EXPECT_NE(std::string(e.what()).find("clear()"), std::string::npos);
  }
  EXPECT_EQ(reg(), "xxx");  // untouched
}

TEST(ScopedRegistry, SetThatThrowsLeavesTheOldValue) {
  struct Picky {
    explicit Picky(int v) : v(v) {
      if (v < 0) throw std::invalid_argument("negative");
    }
    int v;
  };
  ScopedRegistry<Picky> reg([] { return Picky(1); });
  reg();
  EXPECT_THROW(reg.set(-1), std::invalid_argument);
  EXPECT_EQ(reg().v, 1);
}

TEST(ScopedRegistry, FactoryExceptionStoresNothingAndNextCallRetries) {
  int calls = 0;
  ScopedRegistry<int> reg([&]() -> int {
    if (++calls == 1) throw std::runtime_error("database down");
    return 42;
  });
  EXPECT_THROW(reg(), std::runtime_error);
  EXPECT_FALSE(reg.has());
  EXPECT_EQ(reg.size(), 0);
  EXPECT_EQ(reg(), 42);
  EXPECT_EQ(calls, 2);
}

TEST(ScopedRegistry, FactoryThatReentersItsRegistryGetsScopeError) {
  ScopedRegistry<int>* self = nullptr;
  ScopedRegistry<int> reg([&] { return (*self)() + 1; });
  self = &reg;
  EXPECT_THROW(reg(), ScopeError);
  EXPECT_FALSE(reg.has());
}

// The creation protocol is one piece of code for both backends: each misuse reads the
// same whichever strategy the registry uses.
template <typename Scope>
std::string misuse_message(int kind, Scope scope) {
  ScopedRegistry<int, Scope>* self = nullptr;
  ScopedRegistry<int, Scope> reg(
      [&] {
        if (kind == 0) return (*self)() + 1;
        if (kind == 1) self->set(5);
        if (kind == 2) self->clear();
        return 1;
      },
      scope);
  self = &reg;
  try {
    reg();
  } catch (const ScopeError& e) {
    EXPECT_FALSE(reg.has());
    return e.what();
  }
  ADD_FAILURE() << "expected ScopeError";
  return "";
}

TEST(ScopedRegistry, MisuseInsideAFactoryGivesTheSameErrorOnBothBackends) {
  for (int kind : {0, 1, 2}) {
    const std::string slots = misuse_message(kind, ThreadScope());
    const std::string keyed = misuse_message(kind, FuncScope(ThreadScope::func()));
    const std::string user = misuse_message(kind, StringScope());
    EXPECT_EQ(slots, keyed) << "kind " << kind;
    EXPECT_EQ(slots, user) << "kind " << kind;
    EXPECT_NE(slots.find(kind == 0 ? "re-entered" : "from inside the factory"),
              std::string::npos)
        << slots;
  }
}

TEST(ScopedRegistry, EmptyFactoryIsRejectedWithAClearError) {
  EXPECT_THROW(ScopedRegistry<int>(std::function<int()>()), ScopeError);
  ScopedRegistry<int> reg;
  EXPECT_THROW(reg.set_factory(nullptr), ScopeError);
  EXPECT_EQ(reg(), 0);
}

TEST(ScopedRegistry, SetFactoryAffectsOnlyValuesCreatedAfterwards) {
  ScopedRegistry<int> reg([] { return 1; });
  EXPECT_EQ(reg(), 1);
  reg.set_factory([] { return 2; });
  EXPECT_EQ(reg(), 1);
  std::thread([&] { EXPECT_EQ(reg(), 2); }).join();
  reg.clear();
  EXPECT_EQ(reg(), 2);
}

TEST(ScopedRegistry, SizeAndForEachSeeEveryScope) {
  ScopedRegistry<int> reg([] { return 5; });
  std::latch created(3), done(1);
  std::vector<std::thread> threads;
  for (int i = 0; i < 3; ++i) {
    threads.emplace_back([&] {
      reg();
      created.count_down();
      done.wait();
    });
  }
  created.wait();
  reg() = 6;
  EXPECT_EQ(reg.size(), 4);
  int sum = 0;
  std::set<ScopeToken> tokens;
  reg.for_each([&](const ScopeToken& token, int& v) {
    sum += v;
    tokens.insert(token);
  });
  EXPECT_EQ(sum, 5 * 3 + 6);
  EXPECT_EQ(tokens.size(), 4u);
  EXPECT_TRUE(tokens.contains(ThreadScope::current()));
  done.count_down();
  for (auto& t : threads) t.join();
  EXPECT_EQ(reg.size(), 1);
}

TEST(ScopedRegistry, DestroyingARegistryDestroysValuesOfRunningThreadsExactlyOnce) {
  Counts counts;
  constexpr int kThreads = 6;
  auto reg = std::make_unique<ScopedRegistry<Counted>>([&] { return Counted(counts); });
  ScopedRegistry<int> other([] { return 1; });
  std::latch created(kThreads);
  std::atomic<bool> registry_gone{false};
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&] {
      (*reg)();
      created.count_down();
      // Keep using another registry while this one is destroyed.
      while (!registry_gone.load()) other() += 1;
    });
  }
  created.wait();
  EXPECT_EQ(counts.alive(), kThreads);
  reg.reset();
  EXPECT_EQ(counts.destroyed, kThreads);
  registry_gone = true;
  for (auto& t : threads) t.join();
  EXPECT_EQ(counts.made, kThreads);
  EXPECT_EQ(counts.destroyed, kThreads);
}

TEST(ScopedRegistry, ManyRegistriesComeAndGoWhileThreadsRun) {
  Counts counts;
  std::atomic<bool> stop{false};
  std::atomic<int> user_iterations{0};
  std::vector<std::thread> users;
  ScopedRegistry<int> stable([] { return 0; });
  for (int t = 0; t < 2; ++t) {
    users.emplace_back([&] {
      while (!stop.load()) {
        ScopedRegistry<Counted> local([&] { return Counted(counts); });
        local();
        ++stable();
        ++user_iterations;
      }
    });
  }
  int rounds = 0;
  for (; rounds < 200 || user_iterations.load() < 200; ++rounds) {
    std::vector<std::unique_ptr<ScopedRegistry<Counted>>> regs;
    for (int i = 0; i < 40; ++i) {
      regs.push_back(std::make_unique<ScopedRegistry<Counted>>([&] { return Counted(counts); }));
      (*regs.back())();
    }
    EXPECT_EQ(regs.back()->size(), 1);
  }
  stop = true;
  for (auto& t : users) t.join();
  EXPECT_EQ(counts.alive(), 0);
  EXPECT_EQ(counts.made, rounds * 40 + user_iterations.load());
}

TEST(ScopedRegistry, AThousandLiveRegistriesInOneThread) {
  std::vector<std::unique_ptr<ScopedRegistry<int>>> regs;
  for (int i = 0; i < 1000; ++i) {
    regs.push_back(std::make_unique<ScopedRegistry<int>>([i] { return i; }));
  }
  for (int i = 0; i < 1000; ++i) EXPECT_EQ((*regs[i])(), i);
  std::thread([&] {
    for (int i = 999; i >= 0; --i) EXPECT_EQ((*regs[i])(), i);
  }).join();
}

TEST(ScopedRegistry, UserStrategyKeysValuesByItsToken) {
  Counts counts;
  int next_id = 0;
  ScopedRegistry<Counted, StringScope> reg([&] { return Counted(counts, ++next_id); });
  t_user_token = "a";
  EXPECT_EQ(reg().id(), 1);
  t_user_token = "b";
  EXPECT_EQ(reg().id(), 2);
  std::thread([&] {
    t_user_token = "a";  // the same token on another thread: the same value
    EXPECT_EQ(reg().id(), 1);
  }).join();
  EXPECT_EQ(reg.size(), 2);
  reg.end_scope("a");
  EXPECT_EQ(counts.destroyed, 1);
  t_user_token = "a";
  EXPECT_FALSE(reg.has());
  EXPECT_EQ(reg().id(), 3);
  t_user_token = "default";
}

TEST(ScopedRegistry, SharedTokenCreatesOneValueUnderConcurrentFirstUse) {
  std::atomic<int> calls{0};
  ScopedRegistry<int, StringScope> reg([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    return ++calls;
  });
  constexpr int kThreads = 8;
  std::latch start(kThreads);
  std::vector<std::thread> threads;
  std::atomic<int> seen_other{0};
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&] {
      t_user_token = "shared";
      start.arrive_and_wait();
      seen_other += (reg() != 1);
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(seen_other, 0);
}

TEST(ScopedRegistry, ConcurrentFirstUseAfterAThrowingFactoryRetriesOnce) {
  std::atomic<int> calls{0};
  ScopedRegistry<int, StringScope> reg([&]() -> int {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    if (++calls == 1) throw std::runtime_error("first attempt fails");
    return 9;
  });
  constexpr int kThreads = 4;
  std::latch start(kThreads);
  std::atomic<int> errors{0}, nines{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&] {
      t_user_token = "retry";
      start.arrive_and_wait();
      try {
        nines += (reg() == 9);
      } catch (const std::runtime_error&) {
        ++errors;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(errors, 1);
  EXPECT_EQ(nines, kThreads - 1);
  EXPECT_EQ(calls, 2);
}

struct Connection {
  int fd = 0;
};

TEST(ScopedRegistry, TheReentryErrorNamesTheValueTypeOrTheGivenName) {
  ScopedRegistry<Connection>* self = nullptr;
  ScopedRegistry<Connection> reg([&] { return Connection{(*self)().fd + 1}; });
  self = &reg;
  try {
    reg();
    FAIL() << "expected ScopeError";
  } catch (const ScopeError& e) {
    EXPECT_NE(std::string(e.what()).find("ScopedRegistry<scopereg::{anonymous}::Connection>"),
              std::string::npos)
        << e.what();
  }
  ScopedRegistry<int>* named_self = nullptr;
  ScopedRegistry<int> named([&] { return (*named_self)(); }, ThreadScope(), "the orders cache");
  named_self = &named;
  try {
    named();
    FAIL() << "expected ScopeError";
  } catch (const ScopeError& e) {
    EXPECT_NE(std::string(e.what()).find("the orders cache"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace scopereg
