// Stress tests (CTest label "stress"): churn of threads, fibers and explicit scopes, and
// registries and session caches that come and go while others use them. Every test ends
// by checking that live values returned to zero and constructions equal destructions.
//
// Size: SCOPEREG_STRESS_SCALE (default 1, the CI size; 10 or more for a long run) multiplies
// every count. Sanitizer builds divide the base counts so CI stays within budget.

#include <atomic>
#include <chrono>
#include <coroutine>
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
#include "scopereg/coroutine_scope.h"
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
#if defined(__SANITIZE_THREAD__)
constexpr long kTsanFiberDivisor = 10;
#else
constexpr long kTsanFiberDivisor = 1;
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
  // Under TSan each fiber costs milliseconds (its shadow stack is cleared at creation):
  // fewer short fibers there, the migrating part below unchanged.
  const long short_fibers = scaled(1'000'000) / kTsanFiberDivisor;
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

// ---- request scopes while registries come and go (domains, binding index) -----------

#include <array>
#include <cstdint>
#include <deque>

namespace scopereg {
namespace {

std::atomic<long> g_request_bad_destroy{0};  // a value destroyed twice (or never built)

// A value that knows whether it is alive and whose registry (Counts) it belongs to.
class Probe {
 public:
  static constexpr std::uint64_t kAlive = 0xA11CE5A11CE5A11Cull;
  static constexpr std::uint64_t kDead = 0xDEADDEADDEADDEADull;
  explicit Probe(Counts& counts) : counts_(&counts) { ++counts.made; }
  Probe(const Probe&) = delete;
  Probe& operator=(const Probe&) = delete;
  ~Probe() {
    if (magic_ != kAlive) ++g_request_bad_destroy;
    magic_ = kDead;
    ++counts_->destroyed;
  }
  bool alive() const { return magic_ == kAlive; }
  const Counts* counts() const { return counts_; }

 private:
  Counts* counts_;
  volatile std::uint64_t magic_ = kAlive;
};

// The counts of the scope a worker is running: long-lived registries' values report there,
// so that each scope can check that all of its values died with it.
thread_local Counts* t_scope_counts = nullptr;

// Short-lived registries of every backend a request scope can reach; each registry's
// values report to a Counts of its own that outlives it.
constexpr int kChurnKinds = 6;
constexpr const char* kChurnKindNames[kChurnKinds] = {"ThreadScope",
                                                      "ExplicitScope",
                                                      "FiberScope",
                                                      "FuncScope(ThreadScope::func)",
                                                      "FuncScope(ExplicitScope::func)",
                                                      "FuncScope(FiberScope::func)"};
using ChurnCounts = std::array<Counts, kChurnKinds>;
struct ChurnRegistries {
  explicit ChurnRegistries(ChurnCounts& c)
      : by_thread([&c] { return Probe(c[0]); }),
        by_explicit([&c] { return Probe(c[1]); }),
        by_fiber([&c] { return Probe(c[2]); }),
        keyed_thread([&c] { return Probe(c[3]); }, ThreadScope::func()),
        keyed_explicit([&c] { return Probe(c[4]); }, ExplicitScope::func()),
        keyed_fiber([&c] { return Probe(c[5]); }, FiberScope::func()) {}
  ScopedRegistry<Probe> by_thread;
  ScopedRegistry<Probe, ExplicitScope> by_explicit;
  ScopedRegistry<Probe, FiberScope> by_fiber;
  ScopedRegistry<Probe, FuncScope> keyed_thread;
  ScopedRegistry<Probe, FuncScope> keyed_explicit;
  ScopedRegistry<Probe, FuncScope> keyed_fiber;
};

// Values alive right after their registry's destruction returned, by registry kind.
std::atomic<long> g_request_survivors[kChurnKinds];

// Owns one set of short-lived registries; whoever drops the last reference destroys them
// (never while anyone uses them), then checks that none of their values is left.
struct ChurnHolder {
  explicit ChurnHolder(ChurnCounts& c) : counts(&c), regs(std::make_unique<ChurnRegistries>(c)) {}
  ~ChurnHolder() {
    regs.reset();
    for (int k = 0; k < kChurnKinds; ++k) {
      if ((*counts)[k].alive() != 0) ++g_request_survivors[k];
    }
  }
  ChurnCounts* counts;
  std::unique_ptr<ChurnRegistries> regs;
};

TEST(Stress, RequestScopesEndWhileRegistriesComeAndGo) {
  g_request_bad_destroy = 0;
  for (auto& s : g_request_survivors) s = 0;
  // Long-lived registries: values report to the running scope's counts.
  auto make = [] { return Probe(*t_scope_counts); };
  ScopedRegistry<Probe> long_thread(make);
  ScopedRegistry<Probe, ExplicitScope> long_explicit(make);
  ScopedRegistry<Probe, FiberScope> long_fiber(make);
  ScopedRegistry<Probe, FuncScope> long_keyed_thread(make, ThreadScope::func());
  ScopedRegistry<Probe, FuncScope> long_keyed_explicit(make, ExplicitScope::func());
  ScopedRegistry<Probe, FuncScope> long_keyed_fiber(make, FiberScope::func());

  // Every registry set's counts, kept to the end (a deque never moves its elements).
  std::mutex arena_mu;
  std::deque<ChurnCounts> arena;
  constexpr int kSlots = 4;
  std::mutex slots_mu;
  std::shared_ptr<ChurnHolder> slots[kSlots];
  auto pick = [&](unsigned i) {
    std::lock_guard<std::mutex> lock(slots_mu);
    return slots[i % kSlots];
  };
  auto publish = [&](unsigned i) {
    ChurnCounts* counts;
    {
      std::lock_guard<std::mutex> lock(arena_mu);
      counts = &arena.emplace_back();
    }
    auto fresh = std::make_shared<ChurnHolder>(*counts);
    std::shared_ptr<ChurnHolder> old;
    {
      std::lock_guard<std::mutex> lock(slots_mu);
      old = std::exchange(slots[i % kSlots], std::move(fresh));
    }
    old.reset();  // destroyed here unless a scope still uses it (then by that scope)
  };
  for (unsigned i = 0; i < kSlots; ++i) publish(i);

  std::atomic<bool> stop{false};
  std::atomic<long> scope_leaks{0}, seen_bad{0}, scopes{0}, visits{0};

  // Churners: registries made and destroyed while scopes hold values in them.
  std::vector<std::thread> churners;
  for (unsigned c = 0; c < 2; ++c) {
    churners.emplace_back([&, c] {
      for (unsigned i = c; !stop; i += 2) {
        publish(i);
        std::this_thread::sleep_for(std::chrono::microseconds(100 * kSanitizerDivisor));
      }
    });
  }

  // Checker: size() and for_each on live registries must never meet a destroyed value
  // or one of another registry.
  std::thread checker([&] {
    for (unsigned i = 0; !stop; ++i) {
      std::shared_ptr<ChurnHolder> h = pick(i);
      ChurnRegistries& r = *h->regs;
      const Counts* mine = nullptr;
      auto visit = [&](const auto&, Probe& p) {
        ++visits;
        if (!p.alive() || p.counts() != mine) ++seen_bad;
      };
      mine = &(*h->counts)[0];
      r.by_thread.for_each(visit);
      mine = &(*h->counts)[1];
      r.by_explicit.for_each(visit);
      mine = &(*h->counts)[2];
      r.by_fiber.for_each(visit);
      mine = &(*h->counts)[3];
      r.keyed_thread.for_each(visit);
      mine = &(*h->counts)[4];
      r.keyed_explicit.for_each(visit);
      mine = &(*h->counts)[5];
      r.keyed_fiber.for_each(visit);
      for (std::int64_t n :
           {r.by_thread.size(), r.by_explicit.size(), r.by_fiber.size(), r.keyed_thread.size(),
            r.keyed_explicit.size(), r.keyed_fiber.size(), long_thread.size(), long_explicit.size(),
            long_fiber.size(), long_keyed_thread.size()}) {
        if (n < 0) ++seen_bad;
      }
      auto visit_long = [&](const auto&, Probe& p) {
        ++visits;
        if (!p.alive()) ++seen_bad;
      };
      long_explicit.for_each(visit_long);
      long_keyed_explicit.for_each(visit_long);
      h.reset();
      std::this_thread::sleep_for(std::chrono::microseconds(50 * kSanitizerDivisor));
    }
  });

  // Workers: explicit, thread and fiber scopes, each with values in long-lived and
  // short-lived registries of every backend; a scope drops its registries before it ends.
  // (Sanitizers make thread and fiber creation slow: a quarter of the usual share there.)
  const long per_worker = std::max(1L, scaled(20'000) / (kSanitizerDivisor > 1 ? 4 : 1));
  std::vector<std::thread> workers;
  for (unsigned w = 0; w < 3; ++w) {
    workers.emplace_back([&, w] {
      for (long it = 0; it < per_worker; ++it) {
        Counts local;
        t_scope_counts = &local;
        const unsigned pick_at = static_cast<unsigned>(it * 3 + w);
        switch ((it + w) % 3) {
          case 0: {  // explicit scope, sometimes shared with a pool thread via wrap()
            {
              ScopeGuard guard(TypedToken<struct StressRequest>{w * 1'000'000'000ull + it});
              std::shared_ptr<ChurnHolder> h = pick(pick_at);
              long_explicit();
              long_keyed_explicit();
              h->regs->by_explicit();
              h->regs->keyed_explicit();
              h->regs->by_thread();  // the worker thread's: lives until the registry goes
              if (it % 4 == 0) {
                auto task = wrap([&, h] {
                  t_scope_counts = &local;
                  long_explicit();
                  h->regs->keyed_explicit();
                });
                std::thread(std::move(task)).join();
              }
              h.reset();  // the registries may be destroyed now, while the scope lives
            }
            break;
          }
          case 1: {  // thread scope: its end may run while its registries are destroyed
            std::shared_ptr<ChurnHolder> h = pick(pick_at);
            std::thread t([&local, h = std::move(h), &long_thread, &long_keyed_thread]() mutable {
              t_scope_counts = &local;
              long_thread();
              long_keyed_thread();
              h->regs->by_thread();
              h->regs->keyed_thread();
              h.reset();
            });
            t.join();
            break;
          }
          default: {  // fiber scope, finished or unwound
            std::shared_ptr<ChurnHolder> h = pick(pick_at);
            Fiber f([&] {
              long_fiber();
              long_keyed_fiber();
              h->regs->by_fiber();
              h->regs->keyed_fiber();
              Fiber::yield();
              long_fiber();
              h->regs->keyed_fiber();
            });
            f.resume();
            if (it % 2 == 0) f.resume();
            h.reset();
            f = Fiber([] {});  // destroys the old fiber (unwound if unfinished)
            break;
          }
        }
        ++scopes;
        if (local.alive() != 0 || local.made.load() == 0) ++scope_leaks;
        t_scope_counts = nullptr;
      }
    });
  }
  for (auto& w : workers) w.join();
  stop = true;
  for (auto& c : churners) c.join();
  checker.join();
  for (auto& s : slots) s.reset();

  EXPECT_EQ(scope_leaks, 0) << "a scope's end left one of its values alive";
  for (int k = 0; k < kChurnKinds; ++k) {
    EXPECT_EQ(g_request_survivors[k], 0)
        << "a value of a " << kChurnKindNames[k]
        << " registry was still alive when the registry's destructor returned";
  }
  EXPECT_EQ(g_request_bad_destroy, 0) << "a value was destroyed twice";
  EXPECT_EQ(seen_bad, 0) << "size()/for_each met a destroyed or foreign value";
  const long used = static_cast<long>(arena.size());
  Counts total;
  for (long i = 0; i < used; ++i) {
    for (int k = 0; k < kChurnKinds; ++k) {
      const Counts& c = arena[static_cast<std::size_t>(i)][k];
      EXPECT_EQ(c.made.load(), c.destroyed.load())
          << "registry set " << i << ", " << kChurnKindNames[k];
      total.made += c.made.load();
      total.destroyed += c.destroyed.load();
    }
  }
  EXPECT_EQ(long_thread.size() + long_explicit.size() + long_fiber.size() +
                long_keyed_thread.size() + long_keyed_explicit.size() + long_keyed_fiber.size(),
            0);
  std::printf(
      "[stress] request scopes: %ld scopes, %ld registry sets, %ld visits, %d values "
      "in short-lived registries\n",
      scopes.load(), used, visits.load(), total.made.load());
}


// Coroutine tasks (TaskScopePromise) hopping between two pool threads, holding guards
// across co_await, while registries keyed by their scopes are made and destroyed; a share
// of the tasks is destroyed while suspended. Every value is destroyed exactly once and no
// task ever sees another's value.
struct StressTask {
  struct promise_type : TaskScopePromise {
    StressTask get_return_object() {
      return StressTask{std::coroutine_handle<promise_type>::from_promise(*this)};
    }
    internal::FinalAwaiter<std::suspend_never> final_suspend() noexcept {
      return scoped_final(std::suspend_never{});  // the frame destroys itself at the end
    }
    void return_void() noexcept {}
    void unhandled_exception() noexcept { std::abort(); }
  };
  std::coroutine_handle<promise_type> handle;
};

struct StressHop {
  ThreadPool* pool;
  std::mutex* parked_mu;
  std::vector<std::coroutine_handle<>>* parked;  // null: resume on the pool
  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> h) const {
    if (parked != nullptr) {
      std::lock_guard<std::mutex> lock(*parked_mu);
      parked->push_back(h);
    } else {
      pool->post([h] { h.resume(); });
    }
  }
  void await_resume() const noexcept {}
};

TEST(Stress, CoroutineTasksMigrateWhileRegistriesComeAndGo) {
  Counts counts;
  ScopedRegistry<Counted, CoroutineScope> long_task([&] { return Counted(counts); });
  ScopedRegistry<Counted, ExplicitScope> long_explicit([&] { return Counted(counts); });
  using Short = ScopedRegistry<Counted, CoroutineScope>;
  constexpr int kSlots = 4;
  std::mutex slots_mu;
  std::shared_ptr<Short> slots[kSlots];
  auto pick = [&](unsigned i) {
    std::lock_guard<std::mutex> lock(slots_mu);
    return slots[i % kSlots];
  };
  auto publish = [&](unsigned i) {
    auto fresh = std::make_shared<Short>([&] { return Counted(counts); });
    std::shared_ptr<Short> old;
    {
      std::lock_guard<std::mutex> lock(slots_mu);
      old = std::exchange(slots[i % kSlots], std::move(fresh));
    }
    old.reset();  // destroyed here unless a task still holds it
  };
  for (unsigned i = 0; i < kSlots; ++i) publish(i);

  std::atomic<bool> stop{false};
  std::thread churner([&] {
    for (unsigned i = 0; !stop; ++i) {
      publish(i);
      std::this_thread::sleep_for(std::chrono::microseconds(200 * kSanitizerDivisor));
    }
  });

  const long tasks = scaled(20'000);
  constexpr int kHops = 4;
  constexpr long kInFlight = 256;
  std::atomic<long> wrong{0}, finished{0}, in_flight{0};
  std::mutex parked_mu;
  std::vector<std::coroutine_handle<>> parked;
  {
    ThreadPool pool(2);
    auto body = [&](long id) -> StressTask {
      const Counted* mine = &long_task();
      for (int hop = 0; hop < kHops; ++hop) {
        ScopeGuard guard(TypedToken<struct StressCoroutine>{static_cast<std::uint64_t>(id)});
        const Counted* in_guard = &long_explicit();
        std::shared_ptr<Short> held = pick(static_cast<unsigned>(id + hop));
        const Counted* short_value = &(*held)();
        const bool park = hop == kHops - 1 && id % 10 == 0;  // destroyed while suspended
        if (park) --in_flight;
        co_await StressHop{&pool, &parked_mu, park ? &parked : nullptr};
        wrong += (&long_task() != mine) + (&long_explicit() != in_guard) +
                 (&(*held)() != short_value) + (ExplicitScope::current() != guard.token());
      }
      wrong += (&long_task() != mine);
      ++finished;
      --in_flight;
    };
    for (long id = 0; id < tasks; ++id) {
      // At most kInFlight tasks at once, as a server would have (each registry's end
      // visits the live scopes).
      while (in_flight >= kInFlight) std::this_thread::sleep_for(std::chrono::microseconds(50));
      ++in_flight;
      StressTask task = body(id);
      pool.post([h = task.handle] { h.resume(); });
    }
    while (finished + static_cast<long>([&] {
             std::lock_guard<std::mutex> lock(parked_mu);
             return parked.size();
           }()) < tasks) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }  // the pool joins
  stop = true;
  churner.join();
  for (std::coroutine_handle<> h : parked) h.destroy();  // guards and values go with them
  for (auto& slot : slots) slot.reset();
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(finished + static_cast<long>(parked.size()), tasks);
  EXPECT_EQ(long_task.size(), 0);
  EXPECT_EQ(long_explicit.size(), 0);
  EXPECT_EQ(counts.alive(), 0);
  std::printf("coroutine stress: %ld tasks, %zu destroyed while suspended, %d values\n", tasks,
              parked.size(), counts.made.load());
}

}  // namespace
}  // namespace scopereg
