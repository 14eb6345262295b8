// Stress tests (CTest label "stress"): churn of threads, fibers and explicit scopes, and
// registries and session caches that come and go while others use them. Every test ends
// by checking that live values returned to zero and constructions equal destructions.
//
// Size: SCOPEREG_STRESS_SCALE (default 1, the CI size; 10 or more for a long run) multiplies
// every count. Sanitizer builds divide the base counts so CI stays within budget.

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <latch>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../counted.h"
#include "../thread_pool.h"
#include "gtest/gtest.h"
#include "scopereg/explicit_scope.h"
#include "scopereg/fiber_scope.h"
#include "scopereg/scoped_registry.h"
#include "scopereg/session_cache.h"

namespace scopereg {
namespace {

using ::scopereg::testing::Counted;
using ::scopereg::testing::Counts;
using ::scopereg::testing::ThreadPool;

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr long kSanitizerDivisor = 10;
#else
constexpr long kSanitizerDivisor = 1;
#endif

long scaled(long base) {
  static const long scale = [] {
    const char* env = std::getenv("SCOPEREG_STRESS_SCALE");
    const long s = env != nullptr ? std::atol(env) : 1;
    return s > 0 ? s : 1;
  }();
  return std::max(1L, base * scale / kSanitizerDivisor);
}

// Printed at the end of each test, for the RELIABILITY figures of a long run.
void report(const char* what, long operations, long scopes, const Counts& counts) {
  std::printf("[stress] %s: %ld operations, %ld scopes, %d values made, %d destroyed\n", what,
              operations, scopes, counts.made.load(), counts.destroyed.load());
}

TEST(Stress, ThreadChurnLeavesNoValueBehind) {
  Counts counts;
  constexpr int kRegistries = 4;
  std::vector<std::unique_ptr<ScopedRegistry<Counted>>> regs;
  for (int i = 0; i < kRegistries; ++i) {
    regs.push_back(std::make_unique<ScopedRegistry<Counted>>([&] { return Counted(counts); }));
  }
  ScopedRegistry<Counted, FuncScope> keyed([&] { return Counted(counts); }, ThreadScope::func());
  const long threads = scaled(20'000);
  const long waves = threads / 2;
  for (long w = 0; w < waves; ++w) {
    std::thread a([&] {
      for (auto& r : regs) (*r)();
      keyed();
    });
    std::thread b([&] {
      (*regs[w % kRegistries])();
      keyed();
    });
    a.join();
    b.join();
  }
  for (auto& r : regs) EXPECT_EQ(r->size(), 0);
  EXPECT_EQ(keyed.size(), 0);
  EXPECT_EQ(counts.made, waves * (kRegistries + 3));
  EXPECT_EQ(counts.alive(), 0);
  report("thread churn", counts.made, waves * 2, counts);
}

TEST(Stress, FiberChurnWithResumesOnOtherThreads) {
  Counts counts;
  ScopedRegistry<Counted, FiberScope> reg([&] { return Counted(counts); });
  const long short_fibers = scaled(1'000'000);
  for (long i = 0; i < short_fibers; ++i) {
    Fiber f([&] { reg(); });
    f.resume();
  }
  EXPECT_EQ(counts.alive(), 0);

  // Fibers handed between two threads at every yield; each checks its value survives.
  const long migrating = scaled(2'000);
  constexpr int kHops = 6;
  std::atomic<int> wrong{0};
  std::vector<Fiber> fibers;
  std::vector<const Counted*> first(migrating);
  for (long i = 0; i < migrating; ++i) {
    fibers.emplace_back([&, i] {
      first[i] = &reg();
      for (int hop = 0; hop < kHops; ++hop) {
        Fiber::yield();
        wrong += (&reg() != first[i]);
      }
    });
  }
  for (int hop = 0; hop <= kHops; ++hop) {
    std::thread worker([&, hop] {
      for (long i = hop % 2; i < migrating; i += 2) fibers[i].resume();
    });
    std::thread other([&, hop] {
      for (long i = 1 - hop % 2; i < migrating; i += 2) fibers[i].resume();
    });
    worker.join();
    other.join();
  }
  for (auto& f : fibers) EXPECT_TRUE(f.done());
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(counts.alive(), 0);
  report("fiber churn", counts.made, short_fibers + migrating, counts);
}

TEST(Stress, ExplicitScopesWithCallbacksOutlivingTheirGuards) {
  Counts counts;
  ScopedRegistry<Counted, ExplicitScope> reg([&] { return Counted(counts); });
  std::atomic<int> wrong{0};
  const long requests = scaled(50'000);
  {
    ThreadPool pool(3);
    ScopedExecutor exec([&pool](std::function<void()> t) { pool.post(std::move(t)); });
    for (long id = 0; id < requests; ++id) {
      ScopeGuard guard(id % 97 == 0 ? std::string("shared") : std::to_string(id));
      const Counted* mine = &reg();
      for (int part = 0; part < 3; ++part) {
        exec.post([&, mine] { wrong += (&reg() != mine); });
      }
      if (id % 1000 == 999) pool.wait_idle();
    }
    pool.wait_idle();
  }
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(reg.size(), 0);
  EXPECT_EQ(counts.alive(), 0);
  report("explicit churn", requests * 4, requests, counts);
}

TEST(Stress, RegistriesAndCachesComeAndGoWhileOthersUseThem) {
  Counts counts;
  std::atomic<bool> stop{false};
  std::atomic<long> operations{0};
  // Long-lived registries the churners use while short-lived ones are made and destroyed.
  auto shared = std::make_shared<ScopedRegistry<Counted>>([&] { return Counted(counts); });
  std::vector<std::thread> users;
  for (int t = 0; t < 2; ++t) {
    users.emplace_back([&] {
      std::vector<Fiber> fibers;
      while (!stop) {
        (*shared)();
        Fiber f([&] {
          ScopedRegistry<Counted, FiberScope> local([&] { return Counted(counts); });
          local();
          Fiber::yield();
          local();
        });
        f.resume();
        fibers.push_back(std::move(f));
        if (fibers.size() > 16) fibers.clear();  // destroyed unfinished: unwound
        ++operations;
      }
    });
  }
  const long rounds = scaled(300);
  for (long r = 0; r < rounds; ++r) {
    SessionCache<Counted> cache;
    cache.add("a", {.factory = [&] { return Counted(counts); }});
    cache.add("b", {.factory = [&] { return Counted(counts); }});
    std::vector<std::thread> workers;
    for (int t = 0; t < 2; ++t) {
      workers.emplace_back([&, t] {
        cache.get("a");
        cache.get("b");
        if (t == 0) {
          EXPECT_TRUE(cache.clear_for_current_scope().ok());
        }
      });
    }
    for (auto& w : workers) w.join();
    auto victim = std::make_unique<ScopedRegistry<Counted, FiberScope>>(
        [&] { return Counted(counts); });
    Fiber f([&] {
      (*victim)();
      Fiber::yield();
    });
    f.resume();
    victim.reset();  // destroys the suspended fiber's value
    ++operations;
  }
  stop = true;
  for (auto& u : users) u.join();
  shared.reset();
  EXPECT_EQ(counts.alive(), 0);
  report("registries come and go", operations, rounds, counts);
}

template <char C>
std::string make_string() {
  return std::string(64, C);
}

// Runs in a child process: exits while threads and fibers run and values are alive.
[[noreturn]] void exit_with_everything_alive() {
  static auto* threads = new ScopedRegistry<std::string>(make_string<'t'>);
  static auto* fibers = new ScopedRegistry<std::string, FiberScope>(make_string<'f'>);
  static ScopedRegistry<std::vector<int>> destroyed_at_exit;
  destroyed_at_exit().push_back(1);
  static std::vector<Fiber>* suspended = new std::vector<Fiber>();
  for (int i = 0; i < 8; ++i) {
    suspended->emplace_back([] {
      (*fibers)();
      Fiber::yield();
    });
    suspended->back().resume();
  }
  for (int i = 0; i < 4; ++i) {
    std::thread([] {
      for (;;) {
        (*threads)();
        Fiber f([] { (*fibers)(); });
        f.resume();
      }
    }).detach();
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  std::exit(0);
}

TEST(StressDeathTest, ProcessExitWithLiveThreadsFibersAndValuesIsClean) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(exit_with_everything_alive(), ::testing::ExitedWithCode(0), "");
}

// ---- fault injection ----------------------------------------------------------------

TEST(FaultInjection, FactoriesThatThrowAtRandomLeakNothing) {
  Counts counts;
  std::atomic<long> thrown{0};
  ScopedRegistry<Counted> reg([&] {
    thread_local std::mt19937 rng(std::random_device{}());
    if (rng() % 3 == 0) {
      ++thrown;
      throw std::runtime_error("factory failed");
    }
    if (rng() % 7 == 0) {
      ++thrown;
      throw std::bad_alloc();
    }
    return Counted(counts);
  });
  std::atomic<long> caught{0};
  std::vector<std::thread> threads;
  const long per_thread = scaled(20'000);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (long i = 0; i < per_thread; ++i) {
        try {
          reg();
          reg.clear();
        } catch (const std::exception&) {
          ++caught;
          EXPECT_FALSE(reg.has());  // nothing stored
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(caught, thrown);
  EXPECT_GT(thrown, 0);
  std::printf("[stress] factory faults: %ld calls, %ld faults injected and caught, %d values\n",
              4 * per_thread, thrown.load(), counts.made.load());
  EXPECT_EQ(counts.alive(), 0);
  EXPECT_EQ(reg.size(), 0);
  reg.set_factory([&] { return Counted(counts); });  // still usable, with a sane factory
  reg();
  EXPECT_EQ(reg.size(), 1);
}

TEST(FaultInjection, ThrowingHooksAndFailingValidationLoseNoErrorAndLeakNothing) {
  Counts counts;
  std::mutex mu;
  std::vector<std::string> reports;
  long expected_reports = 0;
  {
    SessionCache<Counted> cache;
    cache.set_error_reporter([&](const absl::Status& s) {
      std::lock_guard<std::mutex> lock(mu);
      reports.emplace_back(s.message());
    });
    std::atomic<long> closes{0}, close_failures{0}, teardown_failures{0};
    for (int n = 0; n < 4; ++n) {
      cache.add("db" + std::to_string(n),
                {.factory = [&] { return Counted(counts); },
                 .close = [&, n](Counted&) {
                   ++closes;
                   if (n == 1) {
                     ++close_failures;
                     throw std::runtime_error("close failed");
                   }
                 },
                 .teardown = [&, n](Counted&, bool) {
                   if (n == 2) {
                     ++teardown_failures;
                     throw std::runtime_error("commit failed");
                   }
                 },
                 .validate = [n](Counted&) { return n != 3; }});  // db3 is always stale
    }
    const long units = scaled(2'000);
    long status_failures = 0;
    for (long u = 0; u < units; ++u) {
      if (u % 2 == 0) {
        SessionCache<Counted>::TeardownGuard done(cache);
        for (int n = 0; n < 4; ++n) cache.get("db" + std::to_string(n));
        cache.get("db3");  // stale: closed and re-created
      } else {
        for (int n = 0; n < 4; ++n) cache.get("db" + std::to_string(n));
        const absl::Status s = cache.clear_for_current_scope();
        status_failures += !s.ok();
        EXPECT_NE(s.message().find("db1: close failed"), std::string::npos);
      }
      EXPECT_TRUE(cache.used().empty());
    }
    EXPECT_EQ(status_failures, units / 2);
    expected_reports = units / 2;  // one combined report per TeardownGuard
    EXPECT_GT(teardown_failures, 0);
    EXPECT_GT(close_failures, 0);
    std::printf("[stress] hook faults: %ld units, %ld close and %ld teardown faults, %ld closes\n",
                units, close_failures.load(), teardown_failures.load(), closes.load());
  }
  EXPECT_EQ(static_cast<long>(reports.size()), expected_reports);
  for (const auto& r : reports) {
    EXPECT_NE(r.find("db2: teardown failed: commit failed"), std::string::npos) << r;
    EXPECT_NE(r.find("db1: close failed"), std::string::npos) << r;
  }
  EXPECT_EQ(counts.alive(), 0);
}

TEST(FaultInjection, AFiberStackTooSmallIsRefusedCleanly) {
  Counts counts;
  bool ran = false;
  for (int i = 0; i < 100; ++i) {
    EXPECT_THROW(Fiber([&] { ran = true; }, boost::context::fixedsize_stack(4096)), ScopeError);
  }
  EXPECT_FALSE(ran);
  ScopedRegistry<Counted, FiberScope> reg([&] { return Counted(counts); });
  Fiber ok([&] { reg(); });  // the library is still usable
  ok.resume();
  EXPECT_EQ(counts.made, 1);
  EXPECT_EQ(counts.alive(), 0);
}

}  // namespace
}  // namespace scopereg
