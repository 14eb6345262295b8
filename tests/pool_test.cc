#include "scopereg/pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "scopereg/fiber.h"
#include "scopereg/session_cache.h"

#if defined(__SANITIZE_ADDRESS__)
#define SCOPEREG_POOL_TEST_LSAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SCOPEREG_POOL_TEST_LSAN 1
#endif
#endif
#ifdef SCOPEREG_POOL_TEST_LSAN
#include <sanitizer/lsan_interface.h>
#endif

namespace scopereg {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

void raise_max(std::atomic<int>& max, int value) {
  int seen = max.load();
  while (value > seen && !max.compare_exchange_weak(seen, value)) {
  }
}

// Construction/destruction counters of Conn: `live` is made - destroyed, kept in one
// atomic so that its peak (`max_live`) is exact even under contention.
struct Census {
  std::atomic<int> serial{0};
  std::atomic<int> made{0};
  std::atomic<int> destroyed{0};
  std::atomic<int> live{0};
  std::atomic<int> max_live{0};
  std::atomic<int> closed{0};  // close hook calls
};

// A connection-like object. Neither copyable nor movable: the pool must build it in place.
struct Conn {
  Conn(Census& census, int id) : census(census), id(id) {
    ++census.made;
    raise_max(census.max_live, ++census.live);
  }
  Conn(const Conn&) = delete;
  Conn& operator=(const Conn&) = delete;
  ~Conn() {
    --census.live;
    ++census.destroyed;
  }
  Census& census;
  const int id;
  std::atomic<bool> alive{true};  // false: "server has gone away" (ping fails)
};

PoolOptions<Conn> options(Census& census, std::string name = "test-pool") {
  PoolOptions<Conn> o;
  o.connect = [&census] { return Conn(census, ++census.serial); };
  o.close = [&census](Conn&) { ++census.closed; };
  o.name = std::move(name);
  o.timeout = 5s;
  return o;
}

// A pool of exactly one object whose checkouts give up after 50 ms: a place lost by a
// failed checkout shows as a PoolTimeout at the next one.
PoolOptions<Conn> one_object(Census& census) {
  auto o = options(census);
  o.pool_size = 1;
  o.max_overflow = 0;
  o.timeout = 50ms;
  return o;
}

// Collects what an error reporter receives, from any thread.
struct Reports {
  std::mutex mu;
  std::vector<std::string> lines;
  std::function<void(const absl::Status&)> reporter() {
    return [this](const absl::Status& s) {
      std::lock_guard<std::mutex> lock(mu);
      lines.emplace_back(s.message());
    };
  }
  std::vector<std::string> take() {
    std::lock_guard<std::mutex> lock(mu);
    return std::exchange(lines, {});
  }
};

// A clock the test moves by hand (read from any thread).
struct FakeClock {
  std::atomic<Clock::rep> ticks{0};
  Clock::time_point now() const { return Clock::time_point(Clock::duration(ticks.load())); }
  void advance(Clock::duration d) { ticks += d.count(); }
  std::function<Clock::time_point()> fn() {
    return [this] { return now(); };
  }
};

// While one lives, the calling thread's allocations are not reported as leaks: objects that
// dispose(false) forgets are leaked on purpose.
struct LeaksExpected {
#ifdef SCOPEREG_POOL_TEST_LSAN
  LeaksExpected() { __lsan_disable(); }
  ~LeaksExpected() { __lsan_enable(); }
#else
  LeaksExpected() {}  // user-provided: no unused-variable warning
#endif
  LeaksExpected(const LeaksExpected&) = delete;
  LeaksExpected& operator=(const LeaksExpected&) = delete;
};

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// ---------------------------------------------------------------------------------------
// Construction, limits, waiting

TEST(Pool, RefusesAMissingConnectAndLimitsThatAllowNoObject) {
  EXPECT_THROW(Pool<int>(PoolOptions<int>{}), ScopeError);
  EXPECT_THROW(Pool<int>(PoolOptions<int>{.connect = [] { return 1; }, .pool_size = 0,
                                          .max_overflow = 0}),
               ScopeError);
  EXPECT_NO_THROW(Pool<int>(PoolOptions<int>{.connect = [] { return 1; }, .pool_size = 0,
                                             .max_overflow = 1}));
}

// Overflow objects are closed on return here, so this also catches (now and then) a place
// freed before its object's close finished; the two *CountsAgainstTheLimit* tests below
// catch that deterministically.
TEST(Pool, EightThreadsNeverHaveMoreThanPoolSizePlusOverflowAliveAndEveryCheckoutSucceeds) {
  Census census;
  auto o = options(census);
  o.pool_size = 2;
  o.max_overflow = 2;
  o.timeout = 10s;
  Pool<Conn> pool(o);
  constexpr int kThreads = 8, kRounds = 150;
  std::atomic<int> holding{0}, max_holding{0}, served{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kRounds; ++i) {
        Pool<Conn>::Lease lease = pool.checkout();
        ASSERT_TRUE(lease);
        raise_max(max_holding, ++holding);
        if ((i + t) % 3 == 0) {
          std::this_thread::sleep_for(50us);
        } else {
          std::this_thread::yield();
        }
        --holding;
        ++served;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(served.load(), kThreads * kRounds);
  EXPECT_LE(max_holding.load(), 4);
  EXPECT_LE(census.max_live.load(), 4) << "more objects alive than pool_size + max_overflow";
  const PoolStats s = pool.stats();
  EXPECT_EQ(s.checked_out, 0u);
  EXPECT_LE(s.idle, 2u);
  EXPECT_EQ(s.checkouts, static_cast<std::uint64_t>(kThreads * kRounds));
  EXPECT_EQ(s.checkins, static_cast<std::uint64_t>(kThreads * kRounds));
  EXPECT_EQ(s.timeouts, 0u);
  EXPECT_EQ(census.live.load(), static_cast<int>(s.idle));
  EXPECT_EQ(s.connects - s.closes, s.idle);
}

TEST(Pool, KeepsAtMostPoolSizeIdleAndClosesOverflowObjectsOnReturn) {
  Census census;
  auto o = options(census);
  o.pool_size = 2;
  o.max_overflow = 3;
  Pool<Conn> pool(o);
  std::vector<Pool<Conn>::Lease> leases;
  for (int i = 0; i < 5; ++i) leases.push_back(pool.checkout());
  EXPECT_EQ(census.live.load(), 5);
  EXPECT_EQ(pool.stats().checked_out, 5u);
  leases.clear();  // returns all five: two kept, three closed
  EXPECT_EQ(census.live.load(), 2);
  EXPECT_EQ(census.closed.load(), 3);
  const PoolStats s = pool.stats();
  EXPECT_EQ(s.idle, 2u);
  EXPECT_EQ(s.checked_out, 0u);
  EXPECT_EQ(s.closes, 3u);
  EXPECT_EQ(s.invalidated, 0u);
}

TEST(Pool, ACheckoutWithEveryObjectOutThrowsPoolTimeoutNamingThePoolAndItsLimits) {
  Census census;
  auto o = options(census, "orders-db");
  o.pool_size = 1;
  o.max_overflow = 1;
  o.timeout = 20ms;
  Pool<Conn> pool(o);
  auto a = pool.checkout();
  auto b = pool.checkout();
  const auto start = Clock::now();
  try {
    pool.checkout();
    FAIL() << "expected PoolTimeout";
  } catch (const PoolTimeout& e) {
    EXPECT_GE(Clock::now() - start, 20ms);
    const std::string what = e.what();
    EXPECT_TRUE(contains(what, "'orders-db'")) << what;
    EXPECT_TRUE(contains(what, "20 ms")) << what;
    EXPECT_TRUE(contains(what, "pool_size 1")) << what;
    EXPECT_TRUE(contains(what, "max_overflow 1")) << what;
  }
  static_assert(std::is_base_of_v<ScopeError, PoolTimeout>);
  EXPECT_EQ(census.live.load(), 2);  // the failed checkout made nothing
  const PoolStats s = pool.stats();
  EXPECT_EQ(s.timeouts, 1u);
  EXPECT_EQ(s.waits, 1u);
  EXPECT_EQ(s.checked_out, 2u);
}

TEST(Pool, AWaitingCheckoutGetsTheObjectAnotherThreadReturns) {
  Census census;
  auto o = options(census);
  o.pool_size = 1;
  o.max_overflow = 0;
  Pool<Conn> pool(o);
  auto held = pool.checkout();
  const int id = held->id;
  std::atomic<int> got{0};
  std::thread waiter([&] { got = pool.checkout()->id; });
  while (pool.stats().waits == 0) std::this_thread::sleep_for(1ms);
  std::this_thread::sleep_for(30ms);
  EXPECT_EQ(got.load(), 0);  // still waiting
  const auto returned = Clock::now();
  held.release();  // wakes the waiter
  waiter.join();
  EXPECT_LT(Clock::now() - returned, 1s);  // woken by the return, not by its timeout
  EXPECT_EQ(got.load(), id);  // the same object, not a new one
  EXPECT_EQ(census.made.load(), 1);
  EXPECT_GE(pool.stats().max_wait, 30ms);
}

// A checkout whose object fails its checks takes another one, and may have to wait again
// for it. It is still one waiting checkout: one wait in the stats, one on_wait call, and
// no waiter count left behind when it ends (every later return would go to the shared
// queue instead of parking: the parking fast path off for good).
TEST(Pool, ACheckoutThatRetriesAfterWaitingCountsOneWaitAndLaterReturnsStillPark) {
  Census census;
  std::atomic<bool> dead{true};
  std::atomic<int> on_wait_calls{0};
  static thread_local int on_wait_calls_here = 0;
  auto o = options(census);
  o.pool_size = 2;
  o.max_overflow = 0;
  o.timeout = 10s;
  o.ping = [&](Conn&) { return !dead.load(); };  // every idle object fails: a retry
  o.on_wait = [&](Clock::duration) {
    ++on_wait_calls;
    ++on_wait_calls_here;
  };
  Pool<Conn> pool(o);
  constexpr int kThreads = 8, kRounds = 400;
  std::atomic<int> reported_twice{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kRounds; ++i) {
        on_wait_calls_here = 0;
        {
          Pool<Conn>::Lease lease = pool.checkout();
          std::this_thread::yield();
        }
        if (on_wait_calls_here > 1) ++reported_twice;
      }
    });
  }
  for (auto& t : threads) t.join();
  PoolStats s = pool.stats();
  ASSERT_GT(s.ping_failures, 0u);
  EXPECT_EQ(s.timeouts, 0u);
  EXPECT_EQ(reported_twice.load(), 0) << "a checkout called on_wait more than once";
  EXPECT_EQ(s.waits, static_cast<std::uint64_t>(on_wait_calls.load()))
      << "a checkout counted more than one wait";

  dead = false;
  pool.dispose();  // empties the threads' parking slots
  int first = 0, next = 0;
  std::thread([&] {
    auto a = pool.checkout();
    auto b = pool.checkout();
    first = a->id;
    a.release();  // parked in this thread's slot
    b.release();  // parked in its place: `a` goes to the shared queue
  }).join();
  // Thread serials are handed out in order: this thread, started after the one above
  // ended, parks in another slot. It finds the queue holding only `a` -- unless the
  // returns above did not park (a waiter still counted): then `b` came last to the queue.
  std::thread([&] { next = pool.checkout()->id; }).join();
  EXPECT_EQ(next, first) << "returns no longer park: a finished checkout still counts as waiting";
}

// ---------------------------------------------------------------------------------------
// Recycle, pre-ping, order

TEST(Pool, RecycleClosesObjectsOlderThanTheLimitAtCheckoutAndAtReturn) {
  Census census;
  FakeClock clock;
  auto o = options(census);
  o.recycle = 1h;
  o.clock = clock.fn();
  Pool<Conn> pool(o);
  int first;
  {
    auto lease = pool.checkout();
    first = lease->id;
  }
  clock.advance(59min);
  {
    auto lease = pool.checkout();
    EXPECT_EQ(lease->id, first);  // young enough: reused
  }
  clock.advance(2min);  // now 61 min old, idle
  int second;
  {
    auto lease = pool.checkout();
    second = lease->id;
    EXPECT_NE(second, first);
    EXPECT_EQ(census.live.load(), 1);  // the old one was closed at checkout
    EXPECT_EQ(pool.stats().recycled, 1u);
    clock.advance(2h);  // gets too old while out
  }
  EXPECT_EQ(census.live.load(), 0);  // closed at return, not kept
  const PoolStats s = pool.stats();
  EXPECT_EQ(s.recycled, 2u);
  EXPECT_EQ(s.idle, 0u);
  EXPECT_EQ(s.closes, 2u);
  EXPECT_EQ(census.closed.load(), 2);
  EXPECT_NE(pool.checkout()->id, second);
}

TEST(Pool, PrePingReplacesDeadIdleObjectsAndAThrowingPingCountsAsDead) {
  Census census;
  FakeClock clock;
  std::atomic<int> pings{0};
  auto o = options(census);
  o.clock = clock.fn();
  o.ping = [&](Conn& c) {
    ++pings;
    if (c.id == 2) throw std::runtime_error("connection reset by peer");
    return c.alive.load();
  };
  Pool<Conn> pool(o);
  {
    auto lease = pool.checkout();
    EXPECT_EQ(pings.load(), 0);  // a new object is not pinged
    EXPECT_EQ(lease->id, 1);
  }
  {
    auto lease = pool.checkout();
    EXPECT_EQ(pings.load(), 1);
    EXPECT_EQ(lease->id, 1);  // alive: reused
    lease->alive = false;     // dies while idle
  }
  clock.advance(1h);
  {
    auto lease = pool.checkout();  // ping false: closed, replaced, no error
    EXPECT_EQ(lease->id, 2);
    EXPECT_EQ(census.live.load(), 1);
  }
  Pool<Conn>::Lease lease;
  EXPECT_NO_THROW(lease = pool.checkout());  // object 2's ping throws: dead, replaced
  EXPECT_EQ(lease->id, 3);
  EXPECT_EQ(census.live.load(), 1);
  const PoolStats s = pool.stats();
  EXPECT_EQ(s.ping_failures, 2u);
  EXPECT_EQ(s.closes, 2u);
  EXPECT_EQ(census.closed.load(), 2);
}

TEST(Pool, LifoHandsOutTheMostRecentlyReturnedObjectAndFifoTheLongestIdle) {
  for (PoolOrder order : {PoolOrder::kLifo, PoolOrder::kFifo}) {
    Census census;
    auto o = options(census);
    o.pool_size = 3;
    o.order = order;
    Pool<Conn> pool(o);
    auto a = pool.checkout();
    auto b = pool.checkout();
    auto c = pool.checkout();
    const int ida = a->id, idc = c->id;
    a.release();
    b.release();
    c.release();  // returned in the order a, b, c
    const int next = pool.checkout()->id;
    EXPECT_EQ(next, order == PoolOrder::kLifo ? idc : ida)
        << (order == PoolOrder::kLifo ? "LIFO" : "FIFO");
  }
}

// ---------------------------------------------------------------------------------------
// Invalidate, dispose, lifetime

TEST(Pool, AnInvalidatedLeaseIsClosedOnReturnAndNeverReused) {
  Census census;
  std::atomic<int> resets{0};
  auto o = options(census);
  o.reset_on_return = [&](Conn&) { ++resets; };
  Pool<Conn> pool(o);
  int first;
  {
    auto lease = pool.checkout();
    first = lease->id;
    lease.invalidate();
  }
  EXPECT_EQ(census.live.load(), 0);
  EXPECT_EQ(census.closed.load(), 1);
  EXPECT_EQ(pool.stats().invalidated, 1u);
  EXPECT_EQ(pool.stats().idle, 0u);
  EXPECT_NE(pool.checkout()->id, first);
}

TEST(Pool, ALeaseMovesItsObjectAndReturnsItExactlyOnce) {
  Census census;
  Pool<Conn> pool(options(census));
  auto a = pool.checkout();
  Conn* object = &*a;
  Pool<Conn>::Lease b = std::move(a);
  EXPECT_FALSE(a);  // NOLINT(bugprone-use-after-move): a moved-from lease is empty
  EXPECT_EQ(&b.get(), object);
  a.release();  // no-op
  EXPECT_EQ(pool.stats().checkins, 0u);
  Pool<Conn>::Lease c = pool.checkout();
  c = std::move(b);  // c's own object goes back now
  EXPECT_EQ(pool.stats().checkins, 1u);
  c.release();
  c.release();
  EXPECT_EQ(pool.stats().checkins, 2u);
  EXPECT_EQ(pool.stats().checked_out, 0u);
}

TEST(Pool, DisposeClosesIdleObjectsNowOutObjectsOnReturnAndThePoolStaysUsable) {
  Census census;
  auto o = options(census);
  o.pool_size = 3;
  Pool<Conn> pool(o);
  auto a = pool.checkout();
  auto b = pool.checkout();
  auto c = pool.checkout();
  const int ida = a->id;
  a.release();
  b.release();  // two idle, c out
  pool.dispose();
  EXPECT_EQ(census.live.load(), 1);
  EXPECT_EQ(census.closed.load(), 2);
  EXPECT_EQ(pool.stats().idle, 0u);
  EXPECT_EQ(pool.stats().checked_out, 1u);
  c.release();  // checked out before dispose(): closed, not kept
  EXPECT_EQ(census.live.load(), 0);
  EXPECT_EQ(census.closed.load(), 3);
  EXPECT_EQ(pool.stats().idle, 0u);
  {
    auto d = pool.checkout();  // still usable
    EXPECT_NE(d->id, ida);
  }
  EXPECT_EQ(pool.stats().idle, 1u);  // and a post-dispose object is kept
  EXPECT_EQ(census.live.load(), 1);
}

TEST(Pool, DisposeFalseForgetsIdleAndOutObjectsWithoutClosingOrDestroyingThem) {
  Census census;
  auto o = options(census);
  o.pool_size = 1;
  o.max_overflow = 1;
  o.timeout = 50ms;
  Pool<Conn> pool(o);
  {
    LeaksExpected leaks;  // the two forgotten objects
    Pool<Conn>::Lease out = pool.checkout();
    pool.checkout().release();  // one idle, one out
    pool.dispose(false);        // as in a forked child
    EXPECT_EQ(census.closed.load(), 0);
    EXPECT_EQ(census.destroyed.load(), 0);
    EXPECT_EQ(pool.stats().idle, 0u);
    out.release();  // forgotten too: not closed, not destroyed, not kept
    EXPECT_EQ(census.closed.load(), 0);
    EXPECT_EQ(census.destroyed.load(), 0);
    EXPECT_EQ(pool.stats().idle, 0u);
    EXPECT_EQ(pool.stats().checked_out, 0u);
  }
  // Both places are free again: two new objects, no PoolTimeout.
  auto a = pool.checkout();
  auto b = pool.checkout();
  EXPECT_EQ(a->id + b->id, 3 + 4);
  a.release();
  b.release();
  EXPECT_EQ(census.closed.load(), 1);  // the overflow one: new objects close as usual
  EXPECT_EQ(pool.stats().idle, 1u);
}

// dispose(false) exists because the objects belong to the parent process: a return-time
// hook run on one (reset_on_return rolling back, on_checkin) would act on the parent's
// connection just as its close would.
TEST(Pool, DisposeFalseRunsNoReturnHookOnAForgottenObject) {
  Census census;
  std::atomic<int> resets{0}, checkins{0};
  auto o = options(census);
  o.reset_on_return = [&](Conn&) { ++resets; };
  o.on_checkin = [&](Conn&) { ++checkins; };
  Pool<Conn> pool(o);
  LeaksExpected leaks;
  Pool<Conn>::Lease out = pool.checkout();
  pool.dispose(false);
  out.release();
  EXPECT_EQ(resets.load(), 0) << "reset_on_return ran on a forgotten (parent's) object";
  EXPECT_EQ(checkins.load(), 0) << "on_checkin ran on a forgotten (parent's) object";
  EXPECT_EQ(census.closed.load(), 0);
  EXPECT_EQ(census.destroyed.load(), 0);
}

TEST(Pool, APoolDestroyedWhileLeasesAreOutClosesTheirObjectsWhenReturned) {
  Census census;
  auto pool = std::make_unique<Pool<Conn>>(options(census));
  auto kept = pool->checkout();
  pool->checkout().release();  // one idle
  EXPECT_EQ(census.live.load(), 2);
  pool.reset();
  EXPECT_EQ(census.live.load(), 1);  // the idle one closed with the pool
  EXPECT_EQ(census.closed.load(), 1);
  EXPECT_EQ(kept->id, 1);  // still usable
  kept.release();
  EXPECT_EQ(census.live.load(), 0);
  EXPECT_EQ(census.closed.load(), 2);
  EXPECT_EQ(census.made.load(), census.destroyed.load());
}

// Busy-waits about `n` short steps (the racing test below varies the two threads' offset).
void spin(int n) {
  for (int i = 0; i < n; ++i) std::atomic_signal_fence(std::memory_order_seq_cst);
}

// A return parks its object in its thread's slot without the pool's lock. When dispose()
// or ~Pool runs at that moment, the object must still be closed, once: not left parked
// (after ~Pool: never closed, and the pool's state never freed).
TEST(Pool, AReturnRacingDisposeOrThePoolsDestructionClosesItsObjectExactlyOnce) {
  Census census;
  constexpr int kRounds = 20000, kStop = -1;
  const auto give_up = Clock::now() + 1500ms;  // fewer rounds on a busy machine
  std::atomic<int> go{0}, returned{0};
  Pool<Conn>::Lease lease;  // handed to the returning thread for each round
  std::thread returner([&] {
    for (int r = 1;; ++r) {
      int seen;
      // Spins to start right with the other thread, but yields if it is not running.
      for (int spins = 0; (seen = go.load()) != r && seen != kStop; ++spins) {
        if (spins > 10000) std::this_thread::yield();
      }
      if (seen == kStop) return;
      spin(r % 23);
      lease.release();
      returned = r;
    }
  });
  std::string failure;
  int rounds = 0;
  while (rounds < kRounds && failure.empty() && Clock::now() < give_up) {
    const int r = ++rounds;
    auto pool = std::make_unique<Pool<Conn>>(options(census));
    lease = pool->checkout();
    const bool destroy = r % 2 == 0;
    go = r;
    spin(r % 17);
    if (destroy) {
      pool.reset();
    } else {
      pool->dispose();
    }
    while (returned.load() != r) std::this_thread::yield();
    const std::string round =
        "round " + std::to_string(r) + (destroy ? " (~Pool): " : " (dispose): ");
    if (census.live.load() != 0) failure = round + "the returned object was not closed";
    if (!destroy) {
      const PoolStats s = pool->stats();
      if (s.idle != 0 || s.checked_out != 0 || s.closes != 1) {
        failure = round + "idle " + std::to_string(s.idle) + ", checked out " +
                  std::to_string(s.checked_out) + ", closes " + std::to_string(s.closes);
      }
    }
  }
  go = kStop;
  returner.join();
  ASSERT_EQ(failure, "");
  EXPECT_EQ(census.made.load(), rounds);
  EXPECT_EQ(census.closed.load(), rounds);
  EXPECT_EQ(census.destroyed.load(), rounds);
}

// A close that has not finished leaves its object alive: it must still count against
// pool_size + max_overflow, or a new connection opens while the old one is still open.
// `close_while` starts the close (in another thread); the test's checkout then must not
// make a second object while the first is alive.
void ExpectNoSecondObjectWhileTheFirstCloses(void (*close_while)(Pool<Conn>&,
                                                                 Pool<Conn>::Lease&)) {
  Census census;
  std::atomic<bool> closing{false}, finish_close{false};
  auto o = options(census);
  o.pool_size = 1;
  o.max_overflow = 0;
  o.close = [&](Conn&) {
    closing = true;
    while (!finish_close) std::this_thread::sleep_for(1ms);
  };
  Pool<Conn> pool(o);
  Pool<Conn>::Lease lease = pool.checkout();
  std::thread closer([&] { close_while(pool, lease); });
  while (!closing) std::this_thread::sleep_for(1ms);
  std::thread finisher([&] {
    std::this_thread::sleep_for(50ms);
    finish_close = true;
  });
  { auto next = pool.checkout(); }  // waits for the close to finish
  EXPECT_EQ(census.max_live.load(), 1)
      << "a new object was made while the closing one was still alive";
  closer.join();
  finisher.join();
}

TEST(Pool, AnObjectClosedOnReturnCountsAgainstTheLimitUntilItsCloseFinishes) {
  ExpectNoSecondObjectWhileTheFirstCloses([](Pool<Conn>&, Pool<Conn>::Lease& lease) {
    lease.invalidate();
    lease.release();
  });
}

TEST(Pool, AnIdleObjectClosedByDisposeCountsAgainstTheLimitUntilItsCloseFinishes) {
  ExpectNoSecondObjectWhileTheFirstCloses([](Pool<Conn>& pool, Pool<Conn>::Lease& lease) {
    lease.release();
    pool.dispose();
  });
}

// ---------------------------------------------------------------------------------------
// Throwing hooks

TEST(Pool, AThrowingConnectReachesTheCallerLeaksNothingAndFreesItsPlace) {
  Census census;
  std::atomic<int> calls{0};
  auto o = one_object(census);
  o.connect = [&] {
    if (++calls == 1) throw std::runtime_error("connection refused");
    return Conn(census, ++census.serial);
  };
  Pool<Conn> pool(o);
  try {
    pool.checkout();
    FAIL() << "expected the connect error";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "connection refused");
  }
  EXPECT_EQ(pool.stats().checked_out, 0u);
  EXPECT_EQ(pool.stats().connects, 0u);
  auto lease = pool.checkout();  // the place was freed: no PoolTimeout
  EXPECT_TRUE(lease);
  EXPECT_EQ(census.live.load(), 1);
  EXPECT_EQ(pool.stats().connects, 1u);
}

TEST(Pool, AThrowingOnCheckoutReachesTheCallerClosesTheObjectAndFreesItsPlace) {
  Census census;
  std::atomic<bool> fail{true};
  auto o = one_object(census);
  o.on_checkout = [&](Conn&) {
    if (fail) throw std::runtime_error("SET search_path failed");
  };
  Pool<Conn> pool(o);
  EXPECT_THROW(pool.checkout(), std::runtime_error);  // a new object
  EXPECT_EQ(census.live.load(), 0);
  EXPECT_EQ(census.closed.load(), 1);
  fail = false;
  pool.checkout().release();  // place freed; the object goes idle
  EXPECT_EQ(census.live.load(), 1);
  fail = true;
  EXPECT_THROW(pool.checkout(), std::runtime_error);  // an idle object
  EXPECT_EQ(census.live.load(), 0);
  EXPECT_EQ(census.closed.load(), 2);
  fail = false;
  EXPECT_TRUE(pool.checkout());
  const PoolStats s = pool.stats();
  EXPECT_EQ(s.invalidated, 2u);
  EXPECT_EQ(s.checked_out, 0u);
  EXPECT_EQ(s.checkouts, 2u);
  EXPECT_EQ(census.max_live.load(), 1);
}

// A return cannot throw: a clock that throws while it decides whether the returned object
// is too old (`recycle`) is reported, and the object closed as if it were (it used to
// call std::terminate).
TEST(Pool, AClockThatThrowsOnReturnIsReportedAndTheObjectClosed) {
  Census census;
  Reports reports;
  std::atomic<bool> broken{false};
  auto o = options(census);
  o.recycle = std::chrono::hours(1);
  o.error_reporter = reports.reporter();
  o.clock = [&] {
    if (broken) throw std::runtime_error("clock unavailable");
    return Clock::now();
  };
  Pool<Conn> pool(o);
  {
    auto lease = pool.checkout();
    broken = true;
  }  // returned here
  broken = false;
  const std::vector<std::string> lines = reports.take();
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_NE(lines[0].find("clock unavailable"), std::string::npos) << lines[0];
  EXPECT_EQ(census.closed.load(), 1);
  EXPECT_EQ(census.live.load(), 0);
  EXPECT_EQ(pool.stats().checked_out, 0u);
  EXPECT_EQ(pool.stats().idle, 0u);
  EXPECT_EQ(pool.checkout()->id, 2);  // a new one: its place was freed
}

// Which return-time hook throws.
enum class Failing { kResetOnReturn, kOnCheckin };

void ExpectAThrowingReturnHookIsReportedAndItsObjectClosed(Failing which) {
  Census census;
  Reports reports;
  std::atomic<bool> fail{true};
  std::atomic<int> checkins{0};
  auto o = options(census, "orders");
  o.error_reporter = reports.reporter();
  auto hook = [&](Conn&) {
    if (fail) throw std::runtime_error("rollback failed");
  };
  if (which == Failing::kResetOnReturn) {
    o.reset_on_return = hook;
    o.on_checkin = [&](Conn&) { ++checkins; };
  } else {
    o.on_checkin = hook;
  }
  Pool<Conn> pool(o);
  int first;
  {
    auto lease = pool.checkout();
    first = lease->id;
  }  // the hook throws here: nothing escapes the destructor
  const auto lines = reports.take();
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_TRUE(contains(lines[0], "Pool 'orders'")) << lines[0];
  EXPECT_TRUE(contains(lines[0], which == Failing::kResetOnReturn ? "reset_on_return failed"
                                                                  : "on_checkin failed"))
      << lines[0];
  EXPECT_TRUE(contains(lines[0], "rollback failed")) << lines[0];
  EXPECT_EQ(census.live.load(), 0);  // closed, not kept
  EXPECT_EQ(census.closed.load(), 1);
  EXPECT_EQ(pool.stats().idle, 0u);
  EXPECT_EQ(pool.stats().invalidated, 1u);
  fail = false;
  EXPECT_NE(pool.checkout()->id, first);  // never reused
}

TEST(Pool, AThrowingResetOnReturnIsReportedAndTheObjectIsClosedNotReused) {
  ExpectAThrowingReturnHookIsReportedAndItsObjectClosed(Failing::kResetOnReturn);
}

TEST(Pool, AThrowingOnCheckinIsReportedAndTheObjectIsClosedNotReused) {
  ExpectAThrowingReturnHookIsReportedAndItsObjectClosed(Failing::kOnCheckin);
}

TEST(Pool, AThrowingCloseIsReportedAndTheObjectIsStillDestroyedWhereverItCloses) {
  Census census;
  Reports reports;
  auto o = options(census, "orders");
  o.pool_size = 1;
  o.max_overflow = 2;
  o.error_reporter = reports.reporter();
  o.close = [](Conn&) { throw std::runtime_error("socket already closed"); };
  Pool<Conn> pool(o);
  {
    auto a = pool.checkout();
    auto b = pool.checkout();
    auto c = pool.checkout();
    c.invalidate();
  }  // c: invalidated; b or a: overflow, closed; one kept
  EXPECT_EQ(census.live.load(), 1);
  pool.dispose();  // the idle one
  EXPECT_EQ(census.live.load(), 0);
  const auto lines = reports.take();
  ASSERT_EQ(lines.size(), 3u);
  for (const auto& line : lines) {
    EXPECT_TRUE(contains(line, "Pool 'orders'")) << line;
    EXPECT_TRUE(contains(line, "close failed")) << line;
    EXPECT_TRUE(contains(line, "socket already closed")) << line;
  }
  EXPECT_EQ(pool.stats().closes, 3u);
  EXPECT_EQ(census.made.load(), census.destroyed.load());
}

TEST(Pool, AThrowingErrorReporterDoesNotEscapeAReturn) {
  Census census;
  auto o = options(census);
  o.reset_on_return = [](Conn&) { throw std::runtime_error("rollback failed"); };
  o.error_reporter = [](const absl::Status&) { throw std::runtime_error("reporter broken"); };
  Pool<Conn> pool(o);
  auto lease = pool.checkout();
  ::testing::internal::CaptureStderr();
  lease.release();  // noexcept: a throw would terminate
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_TRUE(contains(err, "rollback failed")) << err;  // not lost: stderr instead
  EXPECT_EQ(census.live.load(), 0);
}

// on_wait runs when the waiting checkout holds its object already: an error there must
// not lose the object or its place (after pool_size + max_overflow of them, every checkout
// would time out).
TEST(Pool, AThrowingOnWaitIsReportedAndTheWaitingCheckoutStillGetsItsObject) {
  Census census;
  Reports reports;
  auto o = options(census, "orders");
  o.pool_size = 1;
  o.max_overflow = 0;
  o.timeout = 2s;
  o.error_reporter = reports.reporter();
  o.on_wait = [](Clock::duration) { throw std::runtime_error("metrics backend down"); };
  Pool<Conn> pool(o);
  auto held = pool.checkout();
  std::atomic<int> got{0};
  std::atomic<bool> threw{false};
  std::thread waiter([&] {
    try {
      got = pool.checkout()->id;
    } catch (...) {
      threw = true;
    }
  });
  while (pool.stats().waits == 0) std::this_thread::sleep_for(1ms);
  held.release();
  waiter.join();
  EXPECT_FALSE(threw.load());
  EXPECT_EQ(got.load(), 1);
  const auto lines = reports.take();
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_TRUE(contains(lines[0], "Pool 'orders'")) << lines[0];
  EXPECT_TRUE(contains(lines[0], "on_wait failed")) << lines[0];
  EXPECT_TRUE(contains(lines[0], "metrics backend down")) << lines[0];
  const PoolStats s = pool.stats();
  ASSERT_EQ(s.checked_out, 0u) << "the waiting checkout's object was lost with its place";
  EXPECT_EQ(s.idle, 1u);
  EXPECT_EQ(s.checkouts, 2u);
  EXPECT_EQ(s.checkins, 2u);
  EXPECT_EQ(census.live.load(), 1);
  EXPECT_EQ(census.closed.load(), 0);
  EXPECT_EQ(pool.checkout()->id, 1);  // no PoolTimeout
}

// The clock is read after a checkout took an idle object (its age, with `recycle`) or
// reserved a place for a new one (its birth): a throw there fails the checkout and gives
// back what it held.
TEST(Pool, AThrowingClockFailsTheCheckoutAndFreesThePlaceItHeld) {
  Census census;
  std::atomic<bool> broken{false};
  auto o = one_object(census);
  o.recycle = 1h;
  o.clock = [&] {
    if (broken) throw std::runtime_error("clock unavailable");
    return Clock::now();
  };
  Pool<Conn> pool(o);
  broken = true;
  EXPECT_THROW(pool.checkout(), std::runtime_error);  // a new object: its birth
  EXPECT_EQ(census.made.load(), 0);
  ASSERT_EQ(pool.stats().checked_out, 0u) << "the reserved place was not given back";
  broken = false;
  pool.checkout().release();  // one idle object
  broken = true;
  EXPECT_THROW(pool.checkout(), std::runtime_error);  // the idle one: its age
  EXPECT_EQ(census.live.load(), 0);
  EXPECT_EQ(census.closed.load(), 1);  // closed, not dropped unclosed
  PoolStats s = pool.stats();
  ASSERT_EQ(s.checked_out, 0u) << "the idle object's place was not given back";
  EXPECT_EQ(s.invalidated, 1u);
  broken = false;
  EXPECT_TRUE(pool.checkout());  // no PoolTimeout
  s = pool.stats();
  EXPECT_EQ(s.connects, 2u);
  EXPECT_EQ(s.checkouts, 2u);
}

// ---------------------------------------------------------------------------------------
// Stats

TEST(Pool, StatsCountEveryCheckoutReturnCloseWaitAndTimeout) {
  Census census;
  auto o = options(census);
  o.pool_size = 1;
  o.max_overflow = 1;
  o.timeout = 5ms;
  Pool<Conn> pool(o);
  auto a = pool.checkout();
  auto b = pool.checkout();
  EXPECT_THROW(pool.checkout(), PoolTimeout);
  PoolStats s = pool.stats();
  EXPECT_EQ(s.idle, 0u);
  EXPECT_EQ(s.checked_out, 2u);
  EXPECT_EQ(s.connects, 2u);
  EXPECT_EQ(s.checkouts, 2u);
  EXPECT_EQ(s.waits, 1u);
  EXPECT_EQ(s.timeouts, 1u);
  b.invalidate();
  b.release();
  a.release();
  auto c = pool.checkout();  // a again
  s = pool.stats();
  EXPECT_EQ(s.idle, 0u);
  EXPECT_EQ(s.checked_out, 1u);
  EXPECT_EQ(s.connects, 2u);
  EXPECT_EQ(s.closes, 1u);
  EXPECT_EQ(s.invalidated, 1u);
  EXPECT_EQ(s.checkouts, 3u);
  EXPECT_EQ(s.checkins, 2u);
  c.release();
  pool.dispose();
  s = pool.stats();
  EXPECT_EQ(s.idle, 0u);
  EXPECT_EQ(s.checked_out, 0u);
  EXPECT_EQ(s.closes, 2u);
  EXPECT_EQ(s.checkins, 3u);
  EXPECT_EQ(s.recycled, 0u);
  EXPECT_EQ(s.ping_failures, 0u);
  EXPECT_EQ(static_cast<std::uint64_t>(census.made.load()), s.connects);
  EXPECT_EQ(static_cast<std::uint64_t>(census.destroyed.load()), s.closes);
}

// ---------------------------------------------------------------------------------------
// Fibers

TEST(Pool, FibersOfOneThreadContendingForAPoolOfOneYieldWhileWaitingInsteadOfBlocking) {
  Census census;
  auto o = options(census);
  o.pool_size = 1;
  o.max_overflow = 0;
  o.timeout = 2s;  // a blocking wait would end in PoolTimeout, thrown by resume()
  Pool<Conn> pool(o);
  constexpr int kFibers = 4, kRounds = 3;
  int holders = 0, max_holders = 0, rounds = 0;
  std::vector<std::unique_ptr<Fiber>> fibers;
  for (int i = 0; i < kFibers; ++i) {
    fibers.push_back(std::make_unique<Fiber>([&] {
      for (int r = 0; r < kRounds; ++r) {
        auto lease = pool.checkout();
        max_holders = std::max(max_holders, ++holders);
        Fiber::yield();  // hold it across a switch: the others must wait
        Fiber::yield();
        --holders;
        ++rounds;
      }
    }));
  }
  bool all_done = false;
  for (int sweep = 0; sweep < 10000 && !all_done; ++sweep) {  // round-robin scheduler
    all_done = true;
    for (auto& f : fibers) {
      if (f->done()) continue;
      f->resume();
      all_done = all_done && f->done();
    }
  }
  EXPECT_TRUE(all_done);
  EXPECT_EQ(rounds, kFibers * kRounds);
  EXPECT_EQ(max_holders, 1);
  EXPECT_EQ(census.made.load(), 1);
  const PoolStats s = pool.stats();
  EXPECT_GE(s.waits, static_cast<std::uint64_t>(kFibers - 1));
  EXPECT_EQ(s.timeouts, 0u);
  EXPECT_EQ(s.checkouts, static_cast<std::uint64_t>(kFibers * kRounds));
}

TEST(Pool, AFiberWaitingInCheckoutTimesOutWithPoolTimeout) {
  Census census;
  auto o = options(census);
  o.pool_size = 1;
  o.max_overflow = 0;
  o.timeout = 10ms;
  Pool<Conn> pool(o);
  auto held = pool.checkout();
  Fiber fiber([&] { EXPECT_THROW(pool.checkout(), PoolTimeout); });
  const auto give_up = Clock::now() + 2s;
  while (!fiber.done() && Clock::now() < give_up) fiber.resume();
  EXPECT_TRUE(fiber.done());
  EXPECT_EQ(pool.stats().timeouts, 1u);
}

// A fiber destroyed while it waits in checkout() is unwound (forced_unwind thrown from
// its yield). The pool's lock must come out of that consistent: here thread T holds it
// (inside the clock hook, called under the lock) while the fiber unwinds, and nobody may
// enter the lock until T leaves it.
TEST(Pool, AFiberDestroyedWhileWaitingInCheckoutDoesNotReleaseALockItDoesNotHold) {
  Census census;
  FakeClock clock;
  std::atomic<std::thread::id> blocker{};
  std::atomic<int> blocker_calls{0};
  std::atomic<bool> inside{false}, let_go{false};
  auto o = options(census);
  o.pool_size = 1;
  o.max_overflow = 0;
  o.timeout = 1h;  // fake time does not pass: nobody times out
  o.clock = [&] {
    if (std::this_thread::get_id() == blocker.load() && ++blocker_calls == 2) {
      inside = true;  // the second call is under the pool's lock
      while (!let_go) std::this_thread::sleep_for(1ms);
    }
    return clock.now();
  };
  Pool<Conn> pool(o);
  auto held = pool.checkout();
  auto fiber = std::make_unique<Fiber>([&] {
    auto lease = pool.checkout();
    ADD_FAILURE() << "the fiber was to be destroyed while waiting";
  });
  fiber->resume();  // waits: yields back
  ASSERT_FALSE(fiber->done());
  std::atomic<int> t_got{0};
  std::thread t([&] {
    blocker = std::this_thread::get_id();
    t_got = pool.checkout()->id;
  });
  while (!inside) std::this_thread::sleep_for(1ms);
  std::thread destroyer([&] { fiber.reset(); });  // unwinds the waiting checkout
  std::atomic<bool> entered{false};
  std::thread prober([&] {
    pool.stats();  // takes the pool's lock
    entered = true;
  });
  std::this_thread::sleep_for(150ms);
  EXPECT_FALSE(entered.load())
      << "stats() took the pool's lock while thread T still held it: the unwinding fiber "
         "unlocked the pool's mutex a second time";
  let_go = true;
  held.release();
  t.join();
  destroyer.join();
  prober.join();
  EXPECT_EQ(t_got.load(), 1);
}

// ---------------------------------------------------------------------------------------
// SessionCache with a pooled name

struct PooledCache {
  explicit PooledCache(Census& census) {
    auto o = options(census, "db-pool");
    o.pool_size = 2;
    o.reset_on_return = [this](Conn& c) {
      std::lock_guard<std::mutex> lock(mu);
      resets.push_back(c.id);
    };
    pool = std::make_shared<Pool<Conn>>(o);
  }
  std::vector<int> take_resets() {
    std::lock_guard<std::mutex> lock(mu);
    return std::exchange(resets, {});
  }
  std::mutex mu;
  std::vector<int> resets;
  std::shared_ptr<Pool<Conn>> pool;
  SessionCache<Conn> cache;  // destroyed first: its values go back to the pool
};

TEST(Pool, SessionCacheChecksOutOnFirstGetAndClearChecksInForTheNextScopeToReuse) {
  Census census;
  PooledCache p(census);
  p.cache.add("db", {.pool = p.pool});
  EXPECT_EQ(p.pool->stats().checkouts, 0u);  // add() checks nothing out
  const Conn* first = nullptr;
  std::thread([&] {
    Conn& c = p.cache.get("db");
    first = &c;
    EXPECT_EQ(p.pool->stats().checked_out, 1u);
    EXPECT_EQ(&p.cache.get("db"), &c);
    EXPECT_EQ(p.pool->stats().checkouts, 1u);  // once per scope
    EXPECT_TRUE(p.take_resets().empty());
    EXPECT_TRUE(p.cache.clear_for_current_scope().ok());
    const PoolStats s = p.pool->stats();
    EXPECT_EQ(s.checked_out, 0u);
    EXPECT_EQ(s.idle, 1u);
    EXPECT_EQ(s.closes, 0u);  // checked in, not closed
    EXPECT_EQ(census.closed.load(), 0);
  }).join();
  std::thread([&] {
    Conn& c = p.cache.get("db");
    EXPECT_EQ(&c, first);  // the same object, reused by the next scope
    EXPECT_EQ(c.id, 1);
    EXPECT_TRUE(p.cache.clear_for_current_scope().ok());
  }).join();
  EXPECT_EQ(census.made.load(), 1);
  EXPECT_EQ(p.pool->stats().checkouts, 2u);
}

TEST(Pool, SessionCacheChecksInWhenTheScopeEndsAndRunsResetOnReturnThen) {
  Census census;
  PooledCache p(census);
  p.cache.add("db", {.pool = p.pool});
  int id = 0;
  std::thread([&] {
    id = p.cache.get("db").id;
    EXPECT_TRUE(p.take_resets().empty());  // not before check-in
  }).join();  // no clear: the thread's end checks it in
  EXPECT_EQ(p.take_resets(), std::vector<int>{id});
  PoolStats s = p.pool->stats();
  EXPECT_EQ(s.checked_out, 0u);
  EXPECT_EQ(s.idle, 1u);
  EXPECT_EQ(census.live.load(), 1);
  std::thread([&] {
    EXPECT_EQ(p.cache.get("db").id, id);
    EXPECT_TRUE(p.cache.clear_for_current_scope().ok());
    EXPECT_EQ(p.take_resets(), std::vector<int>{id});  // at check-in, by clear
  }).join();
  EXPECT_EQ(census.made.load(), 1);
}

TEST(Pool, SessionCacheTeardownFailureDiscardsThePooledObjectAndSuccessKeepsIt) {
  Census census;
  PooledCache p(census);
  std::atomic<bool> fail{false};
  p.cache.add("db", {.teardown = [&](Conn&, bool) {
                       if (fail) throw std::runtime_error("commit refused");
                     },
                     .pool = p.pool});
  Reports reports;
  p.cache.set_error_reporter(reports.reporter());
  auto unit_of_work = [&] {
    int id = 0;
    std::thread([&] {
      SessionCache<Conn>::TeardownGuard done(p.cache);
      id = p.cache.get("db").id;
    }).join();
    return id;
  };
  const int first = unit_of_work();
  EXPECT_EQ(unit_of_work(), first);  // teardown succeeded: checked in and reused
  EXPECT_EQ(census.closed.load(), 0);
  fail = true;
  EXPECT_EQ(unit_of_work(), first);
  EXPECT_EQ(census.live.load(), 0);  // discarded: closed, not checked in
  EXPECT_EQ(census.closed.load(), 1);
  EXPECT_EQ(p.pool->stats().invalidated, 1u);
  EXPECT_EQ(p.pool->stats().idle, 0u);
  const auto lines = reports.take();
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_TRUE(contains(lines[0], "db: teardown failed: commit refused")) << lines[0];
  fail = false;
  EXPECT_NE(unit_of_work(), first);  // a fresh object
}

TEST(Pool, SessionCacheInvalidateDiscardsThePooledObjectAndTheNextGetChecksOutAFreshOne) {
  Census census;
  PooledCache p(census);
  p.cache.add("db", {.pool = p.pool});
  p.pool->checkout().release();  // an idle object the scope will get
  EXPECT_EQ(p.take_resets(), std::vector<int>{1});
  std::thread([&] {
    const int first = p.cache.get("db").id;
    EXPECT_TRUE(p.cache.invalidate("db").ok());
    EXPECT_EQ(census.live.load(), 0);  // closed by the pool, not kept idle
    EXPECT_EQ(p.pool->stats().invalidated, 1u);
    EXPECT_EQ(p.pool->stats().idle, 0u);
    EXPECT_TRUE(p.take_resets().empty());  // a broken object is not reset
    EXPECT_EQ(p.cache.used(), std::vector<std::string>{"db"});
    const int second = p.cache.get("db").id;
    EXPECT_NE(second, first);
    EXPECT_EQ(p.pool->stats().checked_out, 1u);
    EXPECT_TRUE(p.cache.invalidate("db").ok());
    EXPECT_TRUE(p.cache.invalidate("db").ok());  // no value now: a no-op
    EXPECT_TRUE(p.cache.clear_for_current_scope().ok());
  }).join();
  EXPECT_EQ(census.live.load(), 0);
  EXPECT_EQ(p.pool->stats().checked_out, 0u);
  EXPECT_THROW((void)p.cache.invalidate("nope"), ScopeError);
}

TEST(Pool, SessionCacheAddRejectsAFactoryCloseOrMaxLiveTogetherWithAPool) {
  Census census;
  PooledCache p(census);
  EXPECT_THROW(p.cache.add("a", {.factory = [&] { return Conn(census, 0); }, .pool = p.pool}),
               ScopeError);
  EXPECT_THROW(p.cache.add("b", {.close = [](Conn&) {}, .pool = p.pool}), ScopeError);
  try {
    p.cache.add("c", {.max_live = 2, .pool = p.pool});
    FAIL() << "expected ScopeError";
  } catch (const ScopeError& e) {
    EXPECT_TRUE(contains(e.what(), "'c'")) << e.what();
    EXPECT_TRUE(contains(e.what(), "max_live")) << e.what();
  }
  EXPECT_THROW(p.cache.get("a"), ScopeError);  // not registered
  EXPECT_NO_THROW(p.cache.add("d", {.pool = p.pool}));
  EXPECT_EQ(census.made.load(), 0);
}

}  // namespace
}  // namespace scopereg
