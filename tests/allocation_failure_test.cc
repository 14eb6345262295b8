// allocation_failure_test.cc: what scopereg does when memory runs out where it allocates
// after a factory ran, or while a scope ends. This binary replaces the global operator new
// so that a test can make the next array allocation fail (scopereg's slot chunks are
// arrays), or the next N scalar ones; nothing else in it allocates while a failure is
// armed.

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <functional>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "counted.h"
#include "gtest/gtest.h"
#include "scopereg/explicit_scope.h"
#include "scopereg/pool.h"
#include "scopereg/scoped_registry.h"
#include "scopereg/session_cache.h"

// The replacements below pair malloc with free; once inlined, g++ sees a pointer from
// operator new reach free() and warns (-Wmismatched-new-delete), wrongly here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

namespace {
std::atomic<bool> g_fail_next_array{false};
}  // namespace

void* operator new[](std::size_t n) {
  if (g_fail_next_array.exchange(false)) throw std::bad_alloc();
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

namespace {
std::atomic<int> g_fail_scalar{0};  // how many of the next scalar allocations fail
std::atomic<int> g_skip_scalar{0};  // how many succeed first, once g_fail_scalar is set
}  // namespace

void* operator new(std::size_t n) {
  if (g_fail_scalar.load() > 0) {
    for (int skip = g_skip_scalar.load(); skip > 0;) {
      if (g_skip_scalar.compare_exchange_weak(skip, skip - 1)) {
        if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
        throw std::bad_alloc();
      }
    }
  }
  for (int left = g_fail_scalar.load(); left > 0;) {
    if (g_fail_scalar.compare_exchange_weak(left, left - 1)) throw std::bad_alloc();
  }
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace scopereg {
namespace {

using ::scopereg::testing::Counted;
using ::scopereg::testing::Counts;

// Armed with this many failures, every scalar allocation fails.
constexpr int kAllFail = 1 << 30;

// Runs `f` with every allocation failing; returns whether anything in it tried to allocate
// (a test that claims to survive running out of memory must have met it).
template <typename F>
bool tried_to_allocate_with_no_memory(F&& f) {
  g_fail_scalar = kAllFail;
  std::forward<F>(f)();
  return g_fail_scalar.exchange(0) < kAllFail;
}

// What the tests' hooks throw: it allocates nothing (std::runtime_error's message would,
// and fail first, when every allocation is made to fail).
struct HookFailed : std::exception {
  const char* what() const noexcept override { return "hook failed"; }
};

// A scope's second registry needs a slot chunk, allocated when the value made by the
// factory is stored. When that allocation fails: the caller gets std::bad_alloc, the value
// made is destroyed (not leaked), and a caller of another thread waiting for that creation
// wakes and creates its own.
TEST(AllocationFailure, StoringAFreshValueThatFailsDestroysItAndWakesWaiters) {
  Counts counts;
  std::atomic<bool> in_factory{false};
  std::atomic<bool> waiter_started{false};
  ScopedRegistry<int, ExplicitScope> first([] { return 1; });
  ScopedRegistry<int, ExplicitScope> third([] { return 3; });
  ScopedRegistry<Counted, ExplicitScope> second([&] {
    // The first creation: let the waiter arrive, then fail the store.
    if (counts.made.load() == 0) {
      in_factory = true;
      while (!waiter_started) std::this_thread::yield();
      std::this_thread::sleep_for(std::chrono::milliseconds(50));  // it is waiting by now
      g_fail_next_array = true;
    }
    return Counted(counts);
  });
  std::atomic<bool> waiter_done{false};
  std::thread waiter;
  {
    ScopeGuard guard(fresh_scope);
    first();  // the scope's first value: stored inline, no chunk yet
    auto in_scope = wrap([&] {
      second();
      waiter_done = true;
    });
    waiter = std::thread([&] {
      while (!in_factory) std::this_thread::yield();
      waiter_started = true;
      in_scope();  // the same scope and registry: waits for the creation in progress
    });
    EXPECT_THROW(second(), std::bad_alloc);
    EXPECT_FALSE(g_fail_next_array.load());  // the armed failure was the one that threw
    // The waiter wakes and makes the value itself (bounded wait: it used to sleep until
    // some unrelated creation in the scope happened to notify).
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!waiter_done && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    EXPECT_TRUE(waiter_done.load()) << "the waiter was never woken";
    if (!waiter_done) third();  // a creation notifies: unblocks it, so the test ends
    waiter.join();
    EXPECT_EQ(counts.made.load(), 2);
    EXPECT_EQ(counts.alive(), 1);  // the failed one destroyed; the waiter's stored
    EXPECT_NE(second.find(), nullptr);
  }
  EXPECT_EQ(counts.alive(), 0);
}

// A scope's end lists the values it takes before it destroys them (a registry destroyed
// meanwhile must find them there), and the list grows past two values. When it cannot
// grow, the end destroys what it listed and goes on: every value is destroyed once, none
// is left behind. (It used to call std::terminate: the end is noexcept.)
TEST(AllocationFailure, AScopeEndingWithNoMemoryLeftStillDestroysEveryValue) {
  for (const int failures : {1, 2, 3}) {
    Counts counts;
    std::vector<std::unique_ptr<ScopedRegistry<Counted, ExplicitScope>>> by_slot;
    std::vector<std::unique_ptr<ScopedRegistry<Counted, FuncScope>>> by_token;
    for (int i = 0; i < 5; ++i) {
      by_slot.push_back(std::make_unique<ScopedRegistry<Counted, ExplicitScope>>(
          [&] { return Counted(counts); }));
      by_token.push_back(std::make_unique<ScopedRegistry<Counted, FuncScope>>(
          [&] { return Counted(counts); }, ExplicitScope::func()));
    }
    for (const bool token_keyed_too : {false, true}) {
      {
        ScopeGuard guard(fresh_scope);
        for (auto& reg : by_slot) (*reg)();
        if (token_keyed_too) {
          for (auto& reg : by_token) (*reg)();
        }
        ASSERT_EQ(counts.alive(), token_keyed_too ? 10 : 5);
        g_fail_scalar = failures;  // the list's growth, during the end below
      }
      EXPECT_LT(g_fail_scalar.exchange(0), failures) << "the end did not try to allocate";
      EXPECT_EQ(counts.alive(), 0) << failures << " failed allocations";
      for (auto& reg : by_slot) EXPECT_EQ(reg->size(), 0);
      for (auto& reg : by_token) EXPECT_EQ(reg->size(), 0);
    }
    EXPECT_EQ(counts.made.load(), 15);
  }
}

// A token-keyed value records a binding in the process's binding index (so that the
// scope's end finds it); that record allocates. Running out of memory at any allocation
// of a creation -- the binding's, the store's entry, the value's -- throws std::bad_alloc
// to the caller and leaves nothing half-made: no value without its binding (found by no
// scope end), no binding without its value. (Out of memory in the binding, made after the
// value was stored, used to call std::terminate.)
TEST(AllocationFailure, ATokenKeyedCreationOutOfMemoryAnywhereLeavesNothingHalfMade) {
  Counts counts;
  ScopedRegistry<Counted, FuncScope> reg([&] { return Counted(counts); },
                                         ExplicitScope::func());
  int failed = 0;
  int succeeded = 0;
  // Fresh tokens spread over the index's shards: some find no room for one more binding.
  for (int round = 0; round < 16; ++round) {
    for (int skip = 0; skip < 4; ++skip) {
      {
        ScopeGuard guard(fresh_scope);
        g_skip_scalar = skip;
        g_fail_scalar = 1;  // the allocation after `skip` successful ones fails
        try {
          reg();
          ++succeeded;
        } catch (const std::bad_alloc&) {
          ++failed;
        }
        g_fail_scalar = 0;
        g_skip_scalar = 0;
        // Whatever failed, the scope works: one value, made now or before.
        reg();
        EXPECT_EQ(counts.alive(), 1);
        EXPECT_EQ(reg.size(), 1);
      }
      // Its end found the value through its binding.
      EXPECT_EQ(counts.alive(), 0) << "round " << round << ", skip " << skip;
      EXPECT_EQ(reg.size(), 0);
    }
  }
  EXPECT_GT(failed, 0);
  EXPECT_GT(succeeded, 0);
}

// A registry's destruction takes its values out of every scope and lists them, to destroy
// them once no lock is held; the list grows past 32 values. With no memory left at all, the
// destruction still destroys every value exactly once, slot-based and token-keyed alike,
// and the scopes that held them go on working. (It used to call std::terminate: a
// destructor cannot throw std::bad_alloc.)
template <typename Strategy>
void DestroyRegistryWithNoMemoryLeft(
    std::function<std::unique_ptr<ScopedRegistry<Counted, Strategy>>(Counts&)> make) {
  constexpr int kScopes = 100;
  Counts counts;
  std::vector<CapturedScope> scopes;
  for (int i = 0; i < kScopes; ++i) scopes.push_back(CapturedScope::fresh());
  auto reg = make(counts);
  for (const CapturedScope& scope : scopes) scope.run([&] { (*reg)(); });
  ASSERT_EQ(counts.alive(), kScopes);
  EXPECT_TRUE(tried_to_allocate_with_no_memory([&] { reg.reset(); }))
      << "the destruction did not try to allocate";
  EXPECT_EQ(counts.destroyed.load(), kScopes);
  EXPECT_EQ(counts.alive(), 0);
  // A new registry starts empty in those scopes, and their ends find nothing left over.
  auto again = make(counts);
  for (const CapturedScope& scope : scopes) {
    scope.run([&] {
      EXPECT_FALSE(again->has());
      (*again)();
    });
  }
  EXPECT_EQ(counts.alive(), kScopes);
  scopes.clear();
  EXPECT_EQ(counts.alive(), 0);
  EXPECT_EQ(counts.made.load(), 2 * kScopes);
}

TEST(AllocationFailure, ASlotRegistryDestroyedWithNoMemoryLeftDestroysEveryValueOnce) {
  DestroyRegistryWithNoMemoryLeft<ExplicitScope>([](Counts& counts) {
    return std::make_unique<ScopedRegistry<Counted, ExplicitScope>>(
        [&counts] { return Counted(counts); });
  });
}

TEST(AllocationFailure, ATokenKeyedRegistryDestroyedWithNoMemoryLeftDestroysEveryValueOnce) {
  DestroyRegistryWithNoMemoryLeft<FuncScope>([](Counts& counts) {
    return std::make_unique<ScopedRegistry<Counted, FuncScope>>(
        [&counts] { return Counted(counts); }, ExplicitScope::func());
  });
}

// A SessionCache publishes each new name in a fresh copy of its name index. Running out
// of memory anywhere in add() throws std::bad_alloc and leaves the cache as it was: the
// name can be added again, the names before it still work. (The index's copy used to
// corrupt itself or leak when its allocation failed.)
TEST(AllocationFailure, ASessionCacheNameAddedWithNoMemoryLeftFailsCleanly) {
  SessionCache<int> cache;
  int failed = 0;
  constexpr int kNames = 24;
  for (int skip = 0; skip < kNames; ++skip) {
    const std::string name = "name" + std::to_string(skip);
    bool added = false;
    g_skip_scalar = skip;
    g_fail_scalar = 1;
    try {
      cache.add(name, {.factory = [skip] { return skip; }});
      added = true;
    } catch (const std::bad_alloc&) {
      ++failed;
    }
    g_fail_scalar = 0;
    g_skip_scalar = 0;
    if (!added) cache.add(name, {.factory = [skip] { return skip; }});  // not half-added
  }
  EXPECT_GT(failed, 0);
  for (int i = 0; i < kNames; ++i) EXPECT_EQ(cache.get("name" + std::to_string(i)), i);
}

// A TeardownGuard ends a unit of work: every used name's teardown hook, then its close. A
// hook that throws is reported, never thrown (the guard is in a destructor). With no
// memory left even to describe the failure, the guard still closes every value, and the
// failure still reaches stderr in a line built without allocating. (Describing it used to
// throw std::bad_alloc out of the destructor: std::terminate.)
TEST(AllocationFailure, ATeardownWithNoMemoryLeftClosesEveryValueAndStillReports) {
  SessionCache<int, ExplicitScope> cache;
  int closed = 0;
  int torn_down = 0;
  for (const char* name : {"first", "second"}) {
    cache.add(name, {.factory = [] { return 7; },
                     .close = [&closed](int&) {
                       ++closed;
                       throw HookFailed();
                     },
                     .teardown = [&torn_down](int&, bool) {
                       ++torn_down;
                       throw HookFailed();
                     }});
  }
  ScopeGuard scope(fresh_scope);
  ::testing::internal::CaptureStderr();
  {
    SessionCache<int, ExplicitScope>::TeardownGuard teardown(cache);
    cache.get("first");
    cache.get("second");
    g_fail_scalar = kAllFail;  // every allocation from here on fails
  }
  const int left = g_fail_scalar.exchange(0);
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_LT(left, kAllFail) << "the teardown did not try to allocate";
  EXPECT_EQ(torn_down, 2);
  EXPECT_EQ(closed, 2);
  EXPECT_TRUE(cache.used().empty());
  EXPECT_NE(err.find("out of memory"), std::string::npos) << err;
}

// Destroying a SessionCache closes every value in every scope through the close hook; a
// hook that throws is reported. With no memory left, every value is still closed and
// destroyed, and the failure still reaches stderr. (Describing it used to throw
// std::bad_alloc out of the value's destructor: std::terminate.)
TEST(AllocationFailure, ASessionCacheDestroyedWithNoMemoryLeftClosesEveryValue) {
  constexpr int kScopes = 10;
  Counts counts;
  int closed = 0;
  auto cache = std::make_unique<SessionCache<Counted, ExplicitScope>>();
  cache->add("db", {.factory = [&counts] { return Counted(counts); },
                    .close = [&closed](Counted&) {
                      ++closed;
                      throw HookFailed();
                    }});
  std::vector<CapturedScope> scopes;
  for (int i = 0; i < kScopes; ++i) scopes.push_back(CapturedScope::fresh());
  for (const CapturedScope& scope : scopes) scope.run([&] { cache->get("db"); });
  ASSERT_EQ(counts.alive(), kScopes);
  ::testing::internal::CaptureStderr();
  const bool tried = tried_to_allocate_with_no_memory([&] { cache.reset(); });
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_TRUE(tried) << "the cache's end did not try to allocate";
  EXPECT_EQ(closed, kScopes);
  EXPECT_EQ(counts.alive(), 0);
  EXPECT_NE(err.find("out of memory"), std::string::npos) << err;
}

// ~Pool closes the idle objects through the close hook; a hook that throws is reported.
// With no memory left, every object is still closed and the failures still reach stderr.
// (~Pool made a std::deque, which allocates in libstdc++ even when empty: std::terminate.)
TEST(AllocationFailure, APoolDestroyedWithNoMemoryLeftClosesEveryObjectAndStillReports) {
  int closed = 0;
  auto pool = std::make_unique<Pool<int>>(PoolOptions<int>{
      .connect = [] { return 1; },
      .close = [&closed](int&) {
        ++closed;
        throw HookFailed();
      },
      .pool_size = 40});
  {
    std::vector<Pool<int>::Lease> out;
    for (int i = 0; i < 40; ++i) out.push_back(pool->checkout());
  }  // all 40 back: some parked, the rest idle (more than dispose() closes in one batch)
  ::testing::internal::CaptureStderr();
  const bool tried = tried_to_allocate_with_no_memory([&] { pool.reset(); });
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_TRUE(tried) << "the pool's end did not try to allocate";
  EXPECT_EQ(closed, 40);
  EXPECT_NE(err.find("close failed"), std::string::npos) << err;
  EXPECT_NE(err.find("out of memory"), std::string::npos) << err;
}

// A returned object is kept idle in the pool's list, which grows by a block now and then.
// With no memory for that block, the return (which cannot throw) closes the object
// instead, and the pool goes on working. (std::bad_alloc from the return terminated.)
TEST(AllocationFailure, AReturnWithNoMemoryToKeepTheObjectIdleClosesIt) {
  constexpr int kObjects = 70;  // past the idle list's first block (64 in libstdc++)
  int closed = 0;
  Pool<int> pool(PoolOptions<int>{.connect = [] { return 1; },
                                  .close = [&closed](int&) { ++closed; },
                                  .pool_size = 100});
  {
    std::vector<Pool<int>::Lease> out;
    for (int i = 0; i < kObjects; ++i) out.push_back(pool.checkout());
    g_fail_scalar = kAllFail;
  }  // every object returned with no memory left
  const int left = g_fail_scalar.exchange(0);
  EXPECT_LT(left, kAllFail) << "no return tried to allocate";
  EXPECT_GT(closed, 0);
  const PoolStats stats = pool.stats();
  EXPECT_EQ(stats.checked_out, 0u);
  EXPECT_EQ(stats.idle + static_cast<std::size_t>(closed), static_cast<std::size_t>(kObjects));
  EXPECT_EQ(stats.closes, static_cast<std::uint64_t>(closed));
  EXPECT_EQ(*pool.checkout(), 1);  // still usable
}

// end_scope(token) ends the token's values in every token-keyed registry, listing them
// before it destroys them; the list holds two without allocating. With no memory left and
// values in more registries than that, it still ends every one and does not throw. (It
// ended two and threw std::bad_alloc, the rest left alive; a fiber's end, which calls it
// for a fiber's values in FuncScope registries and cannot throw, terminated.)
TEST(AllocationFailure, EndScopeWithNoMemoryLeftEndsEveryValue) {
  Counts counts;
  std::vector<std::unique_ptr<ScopedRegistry<Counted, FuncScope>>> regs;
  for (int i = 0; i < 5; ++i) {
    regs.push_back(std::make_unique<ScopedRegistry<Counted, FuncScope>>(
        [&] { return Counted(counts); }, ExplicitScope::func()));
  }
  CapturedScope scope = CapturedScope::fresh();
  ScopeToken token;
  scope.run([&] {
    for (auto& reg : regs) (*reg)();
    token = ExplicitScope::current();
  });
  ASSERT_EQ(counts.alive(), 5);
  bool threw = false;
  EXPECT_TRUE(tried_to_allocate_with_no_memory([&] {
    try {
      end_scope(token);
    } catch (const std::bad_alloc&) {
      threw = true;
    }
  })) << "the end did not try to allocate";
  EXPECT_FALSE(threw);
  EXPECT_EQ(counts.alive(), 0);
  for (auto& reg : regs) EXPECT_EQ(reg->size(), 0);
}

// A TeardownGuard on a thread that never used the cache: ThreadScope makes a thread's scope
// on its first look-up, and with no memory for it the guard (which cannot throw) has
// nothing to tear down. (std::bad_alloc from the destructor terminated.)
TEST(AllocationFailure, ATeardownGuardOnAFreshThreadWithNoMemoryLeftDoesNothing) {
  SessionCache<int> cache;  // ThreadScope
  cache.add("db", {.factory = [] { return 1; }});
  int left = 0;
  std::thread fresh([&] {
    {
      SessionCache<int>::TeardownGuard teardown(cache);
      g_fail_scalar = kAllFail;
    }
    left = g_fail_scalar.exchange(0);
  });
  fresh.join();
  EXPECT_LT(left, kAllFail) << "the guard did not try to make the thread's scope";
  EXPECT_EQ(cache.get("db"), 1);  // the cache still works
}

}  // namespace
}  // namespace scopereg
