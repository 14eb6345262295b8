// scopereg/asio.h: plain boost::asio::awaitable code run by scopereg::asio::co_spawn in a
// task scope of its own (TaskExecutor), on one thread and across thread migrations; guards
// held across co_await; child tasks (copy, fresh, captured, and plain co_spawn sharing the
// parent's task; children run on the parent's inner executor, outside the parent's task);
// teardown (also without a start); tasks destroyed while suspended; Wrapped<F> associators;
// the documented limits; switch hooks; this_scope().
//
// Every check made inside a coroutine goes to a Tally (counted, not asserted there: a
// coroutine cannot ASSERT, and pool threads report through the counts); the test then
// expects zero wrong values. No assertion depends on timing.

#include "scopereg/asio.h"  // first: it includes <utility> before any Boost.Asio header

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "boost/asio/async_result.hpp"
#include "boost/asio/bind_executor.hpp"
#include "boost/asio/co_spawn.hpp"
#include "boost/asio/detached.hpp"
#include "boost/asio/executor_work_guard.hpp"
#include "boost/asio/io_context.hpp"
#include "boost/asio/post.hpp"
#include "boost/asio/steady_timer.hpp"
#include "boost/asio/strand.hpp"
#include "boost/asio/this_coro.hpp"
#include "boost/asio/thread_pool.hpp"
#include "boost/asio/use_awaitable.hpp"
#include "gtest/gtest.h"
#include "scopereg/coroutine_scope.h"
#include "scopereg/explicit_scope.h"
#include "scopereg/scoped_registry.h"
#include "scopereg/session_cache.h"
#include "counted.h"

namespace scopereg {
namespace {

namespace net = boost::asio;
using net::awaitable;
using net::use_awaitable;
using testing::Counted;
using testing::Counts;

template <typename T>
using TaskVar = ScopedRegistry<T, CoroutineScope>;
template <typename T>
using ExplicitVar = ScopedRegistry<T, ExplicitScope>;

// Registries of Counted are only ever read with find() here: a value made by this factory
// (id -1) would itself be a wrong value.
auto counted_factory(Counts& counts) {
  return [&counts] { return Counted(counts, -1); };
}

std::string describe(const std::exception_ptr& e) {
  if (!e) return "(none)";
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "a non-std exception";
  }
}

// Checks made inside coroutines, on any thread.
struct Tally {
  std::atomic<int> checks{0};
  std::atomic<int> wrong{0};
  void expect(bool ok) {
    checks.fetch_add(1, std::memory_order_relaxed);
    if (!ok) wrong.fetch_add(1, std::memory_order_relaxed);
  }
};

// A co_spawn completion handler's record.
struct Completions {
  std::atomic<int> ok{0};
  std::atomic<int> failed{0};
  std::mutex mu;
  std::string errors;
  auto handler() {
    return [this](std::exception_ptr e) {
      if (!e) {
        ok.fetch_add(1);
        return;
      }
      failed.fetch_add(1);
      std::lock_guard lock(mu);
      errors += describe(e) + "; ";
    };
  }
};

// Resumptions that came back on the thread that suspended, or on another one.
struct Migrations {
  std::atomic<int> same{0};
  std::atomic<int> moved{0};
};

int value_of(const Counted* c) { return c != nullptr ? c->id() : -2; }
template <typename T>
T value_of(const T* v) {
  return v != nullptr ? *v : T(-2);
}

awaitable<void> sleep_ms(int ms) {
  net::steady_timer timer(co_await net::this_coro::executor, std::chrono::milliseconds(ms));
  co_await timer.async_wait(use_awaitable);
}

// sleep_ms, noting whether the coroutine resumed on another thread.
awaitable<void> sleep_ms(int ms, Migrations& m) {
  const std::thread::id before = std::this_thread::get_id();
  co_await sleep_ms(ms);
  (std::this_thread::get_id() == before ? m.same : m.moved).fetch_add(1);
}

// ---------------------------------------------------------------------------------------
// 1. One thread, many interleaved tasks
// ---------------------------------------------------------------------------------------

constexpr int kInterleavedTasks = 50;

// Each task: its own CoroutineScope value, and a ScopeGuard on its own request id (an int)
// held across the co_await with an ExplicitScope value in it.
awaitable<void> interleaved_task(int i, TaskVar<Counted>& coro, ExplicitVar<Counted>& expl,
                                 Counts& counts, Tally& t) {
  coro.set(counts, i);
  const ScopeToken task = CoroutineScope::current();
  t.expect(!task.is_null());
  ScopeGuard request(1000 + i);
  expl.set(counts, i);
  auto read = [&] {
    t.expect(value_of(coro.find()) == i);
    t.expect(value_of(expl.find()) == i);
    t.expect(CoroutineScope::current() == task);
    t.expect(ExplicitScope::current() == request.token());
  };
  read();
  co_await sleep_ms(i % 3);
  read();
  co_await sleep_ms((i + 1) % 3);
  read();
}

TEST(AsioTask, InterleavedTasksOnOneThreadSeeTheirOwnValues) {
  Counts counts;
  TaskVar<Counted> coro(counted_factory(counts));
  ExplicitVar<Counted> expl(counted_factory(counts));
  Tally t;
  Completions done;
  {
    net::io_context io;
    for (int i = 0; i < kInterleavedTasks; ++i) {
      scopereg::asio::co_spawn(io.get_executor(), interleaved_task(i, coro, expl, counts, t),
                               done.handler());
    }
    io.run();
  }
  EXPECT_EQ(done.ok.load(), kInterleavedTasks) << done.errors;
  EXPECT_EQ(done.failed.load(), 0) << done.errors;
  EXPECT_EQ(t.checks.load(), kInterleavedTasks * (1 + 3 * 4));
  EXPECT_EQ(t.wrong.load(), 0);
  EXPECT_EQ(counts.made.load(), 2 * kInterleavedTasks);
  EXPECT_EQ(counts.destroyed.load(), counts.made.load());
  EXPECT_FALSE(ExplicitScope::active());
  EXPECT_FALSE(CoroutineScope::active());
}

// The failure the issue reported, for contrast: the same guard held across co_await in
// coroutines started with plain boost::asio::co_spawn (no task) shares the thread's stack
// of active scopes, so a task resumed after others entered their guards sees the last
// guard entered, not its own (the test above shows it gone under scopereg::asio::co_spawn).
awaitable<void> guard_without_task(int i, ExplicitVar<Counted>& expl, Counts& counts,
                                   Tally& t) {
  ScopeGuard request(1500 + i);
  expl.set(counts, i);
  t.expect(value_of(expl.find()) == i);
  co_await sleep_ms(i % 3);
  t.expect(value_of(expl.find()) == i);
  t.expect(ExplicitScope::current() == request.token());
}

TEST(AsioTask, IssueFailureWithoutTaskScopes) {
  Counts counts;
  ExplicitVar<Counted> expl(counted_factory(counts));
  Tally t;
  {
    net::io_context io;
    for (int i = 0; i < kInterleavedTasks; ++i) {
      net::co_spawn(io, guard_without_task(i, expl, counts, t), net::detached);
    }
    io.run();
  }
  EXPECT_EQ(t.checks.load(), 3 * kInterleavedTasks);
  EXPECT_GT(t.wrong.load(), 0) << "plain co_spawn was expected to show the issue's failure";
  EXPECT_EQ(counts.destroyed.load(), counts.made.load());
  EXPECT_FALSE(ExplicitScope::active());
}

// ---------------------------------------------------------------------------------------
// 2. thread_pool(2): resumptions on the other thread
// ---------------------------------------------------------------------------------------

constexpr int kPoolTasks = 400;
constexpr int kPoolAwaits = 4;

awaitable<void> migrating_task(int i, TaskVar<Counted>& coro, ExplicitVar<Counted>& expl,
                               Counts& counts, Tally& t, Migrations& m) {
  coro.set(counts, i);
  const ScopeToken task = CoroutineScope::current();
  t.expect(!task.is_null());
  ScopeGuard request(2000 + i);
  expl.set(counts, i);
  auto read = [&] {
    t.expect(value_of(coro.find()) == i);
    t.expect(value_of(expl.find()) == i);
    t.expect(CoroutineScope::current() == task);
    t.expect(ExplicitScope::current() == request.token());
  };
  for (int k = 0; k < kPoolAwaits; ++k) {
    read();
    co_await sleep_ms((i + k) % 3, m);
    read();
  }
}

TEST(AsioTask, ThreadPoolTasksKeepTheirValuesAcrossMigrations) {
  Counts counts;
  TaskVar<Counted> coro(counted_factory(counts));
  ExplicitVar<Counted> expl(counted_factory(counts));
  Tally t;
  Migrations m;
  Completions done;
  {
    net::thread_pool pool(2);
    for (int i = 0; i < kPoolTasks; ++i) {
      scopereg::asio::co_spawn(pool.get_executor(), migrating_task(i, coro, expl, counts, t, m),
                               done.handler());
    }
    pool.join();
  }
  EXPECT_EQ(done.ok.load(), kPoolTasks) << done.errors;
  EXPECT_EQ(done.failed.load(), 0) << done.errors;
  EXPECT_EQ(t.checks.load(), kPoolTasks * (1 + kPoolAwaits * 2 * 4));
  EXPECT_EQ(t.wrong.load(), 0);
  EXPECT_EQ(counts.made.load(), 2 * kPoolTasks);
  EXPECT_EQ(counts.destroyed.load(), counts.made.load());
  EXPECT_EQ(m.same.load() + m.moved.load(), kPoolTasks * kPoolAwaits);
  RecordProperty("resumed_on_another_thread", m.moved.load());
  if (m.moved.load() == 0) {
    GTEST_SKIP() << "no resumption happened on another thread; nothing was migrated";
  }
  EXPECT_GT(m.moved.load(), 0);
}

// ---------------------------------------------------------------------------------------
// 3. Nested awaitables share the task's scope
// ---------------------------------------------------------------------------------------

awaitable<int> depth3(int i, TaskVar<int>& var, ScopeToken task, Tally& t) {
  t.expect(CoroutineScope::current() == task);
  t.expect(value_of(var.find()) == 10 * i + 1);
  co_await sleep_ms(i % 3);
  t.expect(CoroutineScope::current() == task);
  t.expect(value_of(var.find()) == 10 * i + 1);
  var.set(10 * i + 3);
  co_await sleep_ms(1);
  t.expect(value_of(var.find()) == 10 * i + 3);
  co_return 3;
}

awaitable<int> depth2(int i, TaskVar<int>& var, ScopeToken task, Tally& t) {
  t.expect(CoroutineScope::current() == task);
  t.expect(value_of(var.find()) == 10 * i + 1);
  co_await sleep_ms(1);
  const int r = co_await depth3(i, var, task, t);
  t.expect(CoroutineScope::current() == task);
  t.expect(value_of(var.find()) == 10 * i + 3);
  co_return r;
}

awaitable<void> depth1(int i, TaskVar<int>& var, Tally& t) {
  var.set(10 * i + 1);
  const ScopeToken task = CoroutineScope::current();
  t.expect(!task.is_null());
  const int r = co_await depth2(i, var, task, t);
  t.expect(r == 3);
  t.expect(CoroutineScope::current() == task);
  t.expect(value_of(var.find()) == 10 * i + 3);  // set at depth 3, same task scope
  co_await sleep_ms(0);
  t.expect(value_of(var.find()) == 10 * i + 3);
}

TEST(AsioTask, NestedAwaitablesShareTheTaskScope) {
  TaskVar<int> var([] { return -1; });
  Tally t;
  Completions done;
  constexpr int kTasks = 20;
  {
    net::thread_pool pool(2);
    for (int i = 0; i < kTasks; ++i) {
      scopereg::asio::co_spawn(pool.get_executor(), depth1(i, var, t), done.handler());
    }
    pool.join();
  }
  EXPECT_EQ(done.ok.load(), kTasks) << done.errors;
  EXPECT_EQ(t.checks.load(), kTasks * 14);
  EXPECT_EQ(t.wrong.load(), 0);
  EXPECT_EQ(var.size(), 0);  // every task's value ended with its task
}

// ---------------------------------------------------------------------------------------
// 4. Teardown
// ---------------------------------------------------------------------------------------

using Sessions = SessionCache<Counted, CoroutineScope>;

struct TeardownLog {
  std::mutex mu;
  std::vector<std::pair<int, bool>> calls;  // (db id, success)
};

awaitable<void> unit_of_work(Sessions& cache, TaskVar<Counted>& coro, Counts& counts, int i,
                             bool fail, std::atomic<int>& db_id, Tally& t) {
  coro.set(counts, i);
  Counted& db = cache.get("orders");
  db_id = db.id();
  co_await sleep_ms(1);
  t.expect(&cache.get("orders") == &db);
  t.expect(value_of(coro.find()) == i);
  if (fail) throw std::runtime_error("unit of work failed");
}

TEST(AsioTeardown, CommitOnSuccessRollbackOnExceptionValuesDestroyedOnce) {
  Counts counts;
  Counts dbs;
  TaskVar<Counted> coro(counted_factory(counts));
  TeardownLog log;
  std::atomic<int> next_db{100};
  Sessions cache;
  cache.add("orders", {.factory = [&] { return Counted(dbs, next_db++); },
                       .teardown = [&](Counted& db, bool success) {
                         std::lock_guard lock(log.mu);
                         log.calls.emplace_back(db.id(), success);
                       }});
  Tally t;
  std::atomic<int> failing_db{0};
  std::atomic<int> ok_db{0};
  std::exception_ptr failing_result;
  std::exception_ptr ok_result;
  int completions = 0;
  {
    net::io_context io;
    scopereg::asio::co_spawn(
        io.get_executor(), unit_of_work(cache, coro, counts, 1, true, failing_db, t),
        fresh_scope, scopereg::asio::teardown_of(cache), [&](std::exception_ptr e) {
          failing_result = e;
          ++completions;
        });
    scopereg::asio::co_spawn(
        io.get_executor(), unit_of_work(cache, coro, counts, 2, false, ok_db, t), fresh_scope,
        scopereg::asio::teardown_of(cache), [&](std::exception_ptr e) {
          ok_result = e;
          ++completions;
        });
    io.run();
  }
  EXPECT_EQ(completions, 2);
  EXPECT_EQ(t.wrong.load(), 0);
  ASSERT_TRUE(failing_result);
  EXPECT_EQ(describe(failing_result), "unit of work failed");
  EXPECT_THROW(std::rethrow_exception(failing_result), std::runtime_error);
  EXPECT_FALSE(ok_result) << describe(ok_result);
  {
    std::lock_guard lock(log.mu);
    EXPECT_EQ(log.calls.size(), 2u);
    int rollbacks = 0;
    int commits = 0;
    for (const auto& [id, success] : log.calls) {
      if (id == failing_db.load()) {
        EXPECT_FALSE(success) << "the failing task's session was committed";
        ++rollbacks;
      } else if (id == ok_db.load()) {
        EXPECT_TRUE(success) << "the successful task's session was rolled back";
        ++commits;
      } else {
        ADD_FAILURE() << "teardown of an unknown session " << id;
      }
    }
    EXPECT_EQ(rollbacks, 1);
    EXPECT_EQ(commits, 1);
  }
  EXPECT_NE(failing_db.load(), ok_db.load());
  EXPECT_EQ(dbs.made.load(), 2);
  EXPECT_EQ(dbs.destroyed.load(), 2);
  EXPECT_EQ(counts.made.load(), 2);
  EXPECT_EQ(counts.destroyed.load(), 2);
}

awaitable<void> work_then(bool fail, TaskVar<Counted>& coro, Counts& counts) {
  coro.set(counts, 7);
  co_await sleep_ms(0);
  if (fail) throw std::runtime_error("task failed");
}

TEST(AsioTeardown, TeardownThrowingAfterTheTaskThrewReportsBoth) {
  Counts counts;
  TaskVar<Counted> coro(counted_factory(counts));
  std::exception_ptr seen_by_teardown;
  std::exception_ptr result;
  int teardowns = 0;
  int completions = 0;
  {
    net::io_context io;
    scopereg::asio::co_spawn(
        io.get_executor(), work_then(true, coro, counts), fresh_scope,
        [&](std::exception_ptr e) {
          ++teardowns;
          seen_by_teardown = e;
          throw std::logic_error("teardown failed");
        },
        [&](std::exception_ptr e) {
          result = e;
          ++completions;
        });
    io.run();
  }
  EXPECT_EQ(teardowns, 1);
  EXPECT_EQ(completions, 1);
  EXPECT_EQ(describe(seen_by_teardown), "task failed");
  ASSERT_TRUE(result);
  try {
    std::rethrow_exception(result);
  } catch (const scopereg::asio::TaskTeardownError& e) {
    ASSERT_TRUE(e.task_error());
    ASSERT_TRUE(e.teardown_error());
    EXPECT_THROW(std::rethrow_exception(e.task_error()), std::runtime_error);
    EXPECT_EQ(describe(e.task_error()), "task failed");
    EXPECT_THROW(std::rethrow_exception(e.teardown_error()), std::logic_error);
    EXPECT_EQ(describe(e.teardown_error()), "teardown failed");
  } catch (...) {
    ADD_FAILURE() << "expected TaskTeardownError, got: " << describe(result);
  }
  EXPECT_EQ(counts.made.load(), 1);
  EXPECT_EQ(counts.destroyed.load(), 1);
}

TEST(AsioTeardown, TeardownThrowingOnSuccessIsTheTasksError) {
  Counts counts;
  TaskVar<Counted> coro(counted_factory(counts));
  std::exception_ptr seen_by_teardown = std::make_exception_ptr(0);  // overwritten
  std::exception_ptr result;
  int completions = 0;
  {
    net::io_context io;
    scopereg::asio::co_spawn(
        io.get_executor(), work_then(false, coro, counts), fresh_scope,
        [&](std::exception_ptr e) {
          seen_by_teardown = e;
          throw std::logic_error("commit failed");
        },
        [&](std::exception_ptr e) {
          result = e;
          ++completions;
        });
    io.run();
  }
  EXPECT_EQ(completions, 1);
  EXPECT_FALSE(seen_by_teardown) << "teardown on success must get a null exception_ptr";
  ASSERT_TRUE(result);
  try {
    std::rethrow_exception(result);
  } catch (const scopereg::asio::TaskTeardownError&) {
    ADD_FAILURE() << "a teardown failing on success is the task's error itself";
  } catch (const std::logic_error& e) {
    EXPECT_STREQ(e.what(), "commit failed");
  } catch (...) {
    ADD_FAILURE() << "unexpected: " << describe(result);
  }
  EXPECT_EQ(counts.made.load(), 1);
  EXPECT_EQ(counts.destroyed.load(), 1);
}

// ---------------------------------------------------------------------------------------
// 5. Tasks never resumed: destroyed with the io_context
// ---------------------------------------------------------------------------------------

awaitable<void> waits_forever(int i, bool hold_guard, TaskVar<Counted>& coro,
                              ExplicitVar<Counted>& expl, Counts& counts,
                              std::atomic<int>& suspended, std::atomic<int>& resumed) {
  coro.set(counts, i);
  expl.set(counts, 1000 + i);  // in the task's own scope
  std::optional<ScopeGuard> request;
  if (hold_guard) {
    request.emplace(5000 + i);
    expl.set(counts, 2000 + i);  // in the request's scope, held across the co_await
  }
  net::steady_timer timer(co_await net::this_coro::executor, std::chrono::hours(1));
  suspended.fetch_add(1);
  co_await timer.async_wait(use_awaitable);
  resumed.fetch_add(1);
}

TEST(AsioTask, TasksDestroyedWhileSuspendedReleaseTheirValuesOnce) {
  Counts counts;
  TaskVar<Counted> coro(counted_factory(counts));
  ExplicitVar<Counted> expl(counted_factory(counts));
  std::atomic<int> suspended{0};
  std::atomic<int> resumed{0};
  int completions = 0;
  constexpr int kTasks = 8;
  {
    net::io_context io;
    for (int i = 0; i < kTasks; ++i) {
      scopereg::asio::co_spawn(
          io.get_executor(),
          waits_forever(i, i % 2 == 1, coro, expl, counts, suspended, resumed),
          [&](std::exception_ptr) { ++completions; });
    }
    for (int rounds = 0; suspended.load() < kTasks && rounds < 1000; ++rounds) io.poll();
    ASSERT_EQ(suspended.load(), kTasks);
    EXPECT_EQ(counts.made.load(), kTasks * 2 + kTasks / 2);
    EXPECT_EQ(counts.destroyed.load(), 0);
    io.stop();
  }  // the io_context is destroyed with every task suspended on its timer
  EXPECT_EQ(resumed.load(), 0);
  EXPECT_EQ(completions, 0);
  EXPECT_EQ(counts.made.load(), kTasks * 2 + kTasks / 2);
  EXPECT_EQ(counts.destroyed.load(), counts.made.load()) << "values leaked";
  EXPECT_FALSE(ExplicitScope::active());
  EXPECT_FALSE(CoroutineScope::active());
  // The request scopes the guards held ended with them: a new guard starts empty.
  for (int i = 1; i < kTasks; i += 2) {
    ScopeGuard request(5000 + i);
    EXPECT_EQ(expl.find(), nullptr) << "request " << 5000 + i << " outlived its task";
  }
  EXPECT_EQ(coro.size(), 0);
  EXPECT_EQ(expl.size(), 0);
}

TEST(AsioTeardown, ATaskDestroyedWhileSuspendedStillGetsItsTeardownInItsScope) {
  Counts counts;
  TaskVar<Counted> coro(counted_factory(counts));
  ExplicitVar<Counted> expl(counted_factory(counts));
  std::atomic<int> suspended{0};
  std::atomic<int> resumed{0};
  int teardowns = 0;
  std::exception_ptr seen;
  int task_value = 0;
  int explicit_value = 0;
  {
    net::io_context io;
    scopereg::asio::co_spawn(
        io.get_executor(), waits_forever(3, true, coro, expl, counts, suspended, resumed),
        fresh_scope,
        [&](std::exception_ptr e) {
          ++teardowns;
          seen = e;
          if (Counted* c = coro.find()) task_value = c->id();
          if (Counted* c = expl.find()) explicit_value = c->id();
        },
        [&](std::exception_ptr) { ADD_FAILURE() << "no completion for a destroyed task"; });
    for (int rounds = 0; suspended.load() < 1 && rounds < 1000; ++rounds) io.poll();
    ASSERT_EQ(suspended.load(), 1);
    EXPECT_EQ(teardowns, 0);
    io.stop();
  }  // destroyed with the task suspended, holding a ScopeGuard across the co_await
  EXPECT_EQ(resumed.load(), 0);
  EXPECT_EQ(teardowns, 1);
  ASSERT_TRUE(seen);
  EXPECT_THROW(std::rethrow_exception(seen), scopereg::asio::TaskAbandoned);
  EXPECT_EQ(task_value, 3);        // in the task's scope, its values still alive
  EXPECT_EQ(explicit_value, 1003);  // the task's own scope, not the guard's (gone first)
  EXPECT_EQ(counts.destroyed.load(), counts.made.load()) << "values leaked";
  EXPECT_FALSE(CoroutineScope::active());
}

awaitable<void> marks_ran(bool& ran) {
  ran = true;
  co_return;
}

TEST(AsioTeardown, ATaskDestroyedBeforeItFirstRanStillGetsItsTeardown) {
  int teardowns = 0;
  std::exception_ptr seen;
  bool body_ran = false;
  {
    net::io_context io;  // never run
    scopereg::asio::co_spawn(
        io.get_executor(), marks_ran(body_ran), fresh_scope,
        [&](std::exception_ptr e) {
          ++teardowns;
          seen = e;
          EXPECT_TRUE(CoroutineScope::active()) << "the teardown runs in the task's scope";
        },
        [&](std::exception_ptr) { ADD_FAILURE() << "no completion for a destroyed task"; });
    EXPECT_EQ(teardowns, 0);
  }
  EXPECT_FALSE(body_ran);
  EXPECT_EQ(teardowns, 1);
  ASSERT_TRUE(seen);
  EXPECT_THROW(std::rethrow_exception(seen), scopereg::asio::TaskAbandoned);
  EXPECT_FALSE(CoroutineScope::active());
}

// ---------------------------------------------------------------------------------------
// 6. Guards across co_await, on a thread_pool
// ---------------------------------------------------------------------------------------

struct GuardMoves {
  std::atomic<int> left_elsewhere{0};
  std::atomic<int> left_here{0};
};

awaitable<void> guards_across_awaits(int i, ExplicitVar<int>& expl, Tally& t, Migrations& m,
                                     GuardMoves& g) {
  const ScopeToken task = CoroutineScope::current();
  t.expect(!task.is_null());
  t.expect(ExplicitScope::current() == task);
  expl.set(i);
  {
    const std::thread::id entered_on = std::this_thread::get_id();
    ScopeGuard outer(6000 + i);
    expl.set(10000 + i);
    co_await sleep_ms(i % 3, m);
    t.expect(ExplicitScope::current() == outer.token());
    t.expect(value_of(expl.find()) == 10000 + i);
    {
      ScopeGuard inner(std::string("inner-") + std::to_string(i));
      expl.set(20000 + i);
      co_await sleep_ms((i + 1) % 3, m);
      t.expect(ExplicitScope::current() == inner.token());
      t.expect(value_of(expl.find()) == 20000 + i);
      t.expect(CoroutineScope::current() == task);
    }
    t.expect(ExplicitScope::current() == outer.token());
    t.expect(value_of(expl.find()) == 10000 + i);
    co_await sleep_ms((i + 2) % 3, m);
    t.expect(ExplicitScope::current() == outer.token());
    (std::this_thread::get_id() == entered_on ? g.left_here : g.left_elsewhere).fetch_add(1);
  }  // left here, possibly on another thread than the one it was entered on
  t.expect(ExplicitScope::current() == task);
  t.expect(ExplicitScope::current() == CoroutineScope::current());
  t.expect(value_of(expl.find()) == i);
  co_await sleep_ms(1, m);
  t.expect(ExplicitScope::current() == task);
  t.expect(value_of(expl.find()) == i);
}

TEST(AsioTask, GuardsHeldAcrossAwaitOnAThreadPool) {
  ExplicitVar<int> expl([] { return -1; });
  Tally t;
  Migrations m;
  GuardMoves g;
  Completions done;
  constexpr int kTasks = 200;
  {
    net::thread_pool pool(2);
    for (int i = 0; i < kTasks; ++i) {
      scopereg::asio::co_spawn(pool.get_executor(), guards_across_awaits(i, expl, t, m, g),
                               done.handler());
    }
    pool.join();
  }
  EXPECT_EQ(done.ok.load(), kTasks) << done.errors;
  EXPECT_EQ(t.checks.load(), kTasks * 15);
  EXPECT_EQ(t.wrong.load(), 0);
  EXPECT_EQ(g.left_here.load() + g.left_elsewhere.load(), kTasks);
  RecordProperty("guards_left_on_another_thread", g.left_elsewhere.load());
  EXPECT_EQ(expl.size(), 0);
  EXPECT_FALSE(ExplicitScope::active());
  if (g.left_elsewhere.load() == 0) {
    GTEST_SKIP() << "no guard was left on another thread than the one that entered it";
  }
  EXPECT_GT(g.left_elsewhere.load(), 0);
}

// ---------------------------------------------------------------------------------------
// 7. Child tasks: copy_current, fresh_scope, CapturedScope::of
// ---------------------------------------------------------------------------------------

struct Family {
  TaskVar<int> coro{[] { return -1; }};
  ExplicitVar<int> expl{[] { return -1; }};
  Tally t;
  std::atomic<int> children_ok{0};
  std::atomic<int> children_failed{0};
};

constexpr int kChildren = 6;

awaitable<void> copied_child(int i, Family& f, ScopeToken parent) {
  const ScopeToken me = CoroutineScope::current();
  f.t.expect(!me.is_null());
  f.t.expect(me != parent);
  f.t.expect(value_of(f.coro.find()) == 7);  // the parent's values, copied
  f.t.expect(value_of(f.expl.find()) == 8);
  f.coro.set(100 + i);
  f.expl.set(200 + i);
  co_await sleep_ms(i % 3);
  f.t.expect(value_of(f.coro.find()) == 100 + i);  // its own, whatever the siblings set
  f.t.expect(value_of(f.expl.find()) == 200 + i);
  co_await sleep_ms(1);
  f.t.expect(value_of(f.coro.find()) == 100 + i);
  f.t.expect(value_of(f.expl.find()) == 200 + i);
  f.t.expect(CoroutineScope::current() == me);
}

awaitable<void> fresh_child(Family& f, ScopeToken parent) {
  f.t.expect(CoroutineScope::current() != parent);
  f.t.expect(!CoroutineScope::current().is_null());
  f.t.expect(f.coro.find() == nullptr);
  f.t.expect(f.expl.find() == nullptr);
  f.coro.set(55);
  co_await sleep_ms(0);
  f.t.expect(value_of(f.coro.find()) == 55);
}

awaitable<void> parent_of_copies(Family& f) {
  f.coro.set(7);
  f.expl.set(8);
  const ScopeToken me = CoroutineScope::current();
  auto ex = co_await net::this_coro::executor;
  net::steady_timer all_done(ex, net::steady_timer::time_point::max());
  int remaining = kChildren;
  for (int i = 0; i < kChildren; ++i) {
    scopereg::asio::co_spawn(ex, copied_child(i, f, me), scopereg::copy_current,
                             [&](std::exception_ptr e) {
                               (e ? f.children_failed : f.children_ok).fetch_add(1);
                               if (--remaining == 0) all_done.cancel();
                             });
  }
  try {
    co_await all_done.async_wait(use_awaitable);
  } catch (const boost::system::system_error&) {
    // operation_aborted: the last child finished
  }
  f.t.expect(remaining == 0);
  f.t.expect(CoroutineScope::current() == me);
  f.t.expect(value_of(f.coro.find()) == 7);  // unchanged by the children's set()s
  f.t.expect(value_of(f.expl.find()) == 8);
  co_await scopereg::asio::co_spawn(ex, fresh_child(f, me), fresh_scope, use_awaitable);
  f.t.expect(value_of(f.coro.find()) == 7);
  f.t.expect(value_of(f.expl.find()) == 8);
}

TEST(AsioChildren, CopiedChildrenSeeTheParentsValuesAndKeepTheirOwn) {
  Family f;
  Completions done;
  {
    net::io_context io;
    scopereg::asio::co_spawn(io.get_executor(), parent_of_copies(f), done.handler());
    io.run();
  }
  EXPECT_EQ(done.ok.load(), 1) << done.errors;
  EXPECT_EQ(f.children_ok.load(), kChildren);
  EXPECT_EQ(f.children_failed.load(), 0);
  EXPECT_EQ(f.t.checks.load(), 9 * kChildren + 5 + 6);
  EXPECT_EQ(f.t.wrong.load(), 0);
  EXPECT_EQ(f.coro.size(), 0);
  EXPECT_EQ(f.expl.size(), 0);
}

// The same on a thread_pool, children spawned from a task that migrates.
TEST(AsioChildren, CopiedChildrenOnAThreadPool) {
  Family f;
  Completions done;
  constexpr int kParents = 20;
  {
    net::thread_pool pool(2);
    // parent_of_copies' bookkeeping (remaining, all_done) is touched by the children's
    // completion handlers, which run on the children's executors (over the parent's inner
    // executor: its strand): on a thread_pool they must be serialized with the parent, so
    // each parent runs on a strand, and its children with it.
    for (int p = 0; p < kParents; ++p) {
      scopereg::asio::co_spawn(net::make_strand(pool.get_executor()), parent_of_copies(f),
                               done.handler());
    }
    pool.join();
  }
  EXPECT_EQ(done.ok.load(), kParents) << done.errors;
  EXPECT_EQ(f.children_ok.load(), kParents * kChildren);
  EXPECT_EQ(f.t.checks.load(), kParents * (9 * kChildren + 5 + 6));
  EXPECT_EQ(f.t.wrong.load(), 0);
  EXPECT_EQ(f.coro.size(), 0);
  EXPECT_EQ(f.expl.size(), 0);
}

awaitable<void> in_request_scope(ExplicitVar<int>& expl, TaskVar<int>& coro, ScopeToken request,
                                 Tally& t) {
  t.expect(ExplicitScope::current() == request);
  t.expect(CoroutineScope::current() == request);  // the task's scope is the token's scope
  t.expect(value_of(expl.find()) == 5);
  co_await sleep_ms(1);
  t.expect(ExplicitScope::current() == request);
  expl.set(6);
  coro.set(60);
  t.expect(value_of(coro.find()) == 60);
}

TEST(AsioChildren, CapturedScopeOfARequestIdStartsTheTaskInThatScope) {
  ExplicitVar<int> expl([] { return -1; });
  TaskVar<int> coro([] { return -1; });
  Tally t;
  Completions done;
  constexpr int kRequest = 7000;
  ScopeGuard outside(kRequest);
  expl.set(5);
  {
    net::io_context io;
    scopereg::asio::co_spawn(io.get_executor(),
                             in_request_scope(expl, coro, outside.token(), t),
                             CapturedScope::of(kRequest), done.handler());
    io.run();
  }
  EXPECT_EQ(done.ok.load(), 1) << done.errors;
  EXPECT_EQ(t.checks.load(), 5);
  EXPECT_EQ(t.wrong.load(), 0);
  EXPECT_EQ(ExplicitScope::current(), outside.token());
  EXPECT_EQ(value_of(expl.find()), 6);  // what the task set, in the request's scope
}

// ---------------------------------------------------------------------------------------
// 8. Plain boost::asio::co_spawn on the task's executor shares the parent's task
// ---------------------------------------------------------------------------------------

awaitable<void> sharing_child(TaskVar<int>& coro, ExplicitVar<int>& expl, ScopeToken parent,
                              Tally& t) {
  t.expect(CoroutineScope::current() == parent);
  t.expect(value_of(coro.find()) == 1);
  t.expect(value_of(expl.find()) == 2);
  co_await sleep_ms(1);
  t.expect(CoroutineScope::current() == parent);
  coro.set(11);
  expl.set(12);
}

awaitable<void> parent_sharing(TaskVar<int>& coro, ExplicitVar<int>& expl, Tally& t) {
  coro.set(1);
  expl.set(2);
  const ScopeToken me = CoroutineScope::current();
  auto ex = co_await net::this_coro::executor;
  co_await net::co_spawn(ex, sharing_child(coro, expl, me, t), use_awaitable);
  t.expect(CoroutineScope::current() == me);
  t.expect(value_of(coro.find()) == 11);  // the child changed the parent's own values
  t.expect(value_of(expl.find()) == 12);
}

TEST(AsioChildren, PlainCoSpawnOnTheTaskExecutorSharesTheParentsTask) {
  TaskVar<int> coro([] { return -1; });
  ExplicitVar<int> expl([] { return -1; });
  Tally t;
  Completions done;
  {
    net::thread_pool pool(2);
    scopereg::asio::co_spawn(pool.get_executor(), parent_sharing(coro, expl, t), done.handler());
    pool.join();
  }
  EXPECT_EQ(done.ok.load(), 1) << done.errors;
  EXPECT_EQ(t.checks.load(), 7);
  EXPECT_EQ(t.wrong.load(), 0);
}

// ---------------------------------------------------------------------------------------
// 9. Wrapped<F> keeps F's associated executor and allocator
// ---------------------------------------------------------------------------------------

TEST(AsioWrap, StrandBoundHandlerStillRunsOnItsStrand) {
  ExplicitVar<int> expl([] { return -1; });
  constexpr int kHandlers = 200;
  std::atomic<int> ran{0};
  std::atomic<int> in_strand{0};
  std::atomic<int> in_scope{0};
  std::atomic<int> inside{0};
  std::atomic<int> overlapped{0};
  net::thread_pool pool(2);
  auto strand = net::make_strand(pool.get_executor());
  using Strand = decltype(strand);
  {
    ScopeGuard request(9000);
    expl.set(90);
    const ScopeToken token = request.token();
    auto handler = [&, token] {
      if (inside.fetch_add(1) != 0) overlapped.fetch_add(1);
      if (strand.running_in_this_thread()) in_strand.fetch_add(1);
      if (ExplicitScope::current() == token && value_of(expl.find()) == 90) {
        in_scope.fetch_add(1);
      }
      inside.fetch_sub(1);
      ran.fetch_add(1);
    };
    auto wrapped = scopereg::wrap(net::bind_executor(strand, handler));
    static_assert(std::is_same_v<net::associated_executor_t<decltype(wrapped)>, Strand>);
    static_assert(std::is_same_v<
                  net::associated_executor_t<decltype(wrapped), net::any_io_executor>, Strand>);
    EXPECT_TRUE(net::get_associated_executor(wrapped) == strand);
    EXPECT_TRUE(net::get_associated_executor(wrapped, pool.get_executor()) == strand);
    for (int i = 0; i < kHandlers; ++i) net::post(wrapped);
  }
  pool.join();
  EXPECT_EQ(ran.load(), kHandlers);
  EXPECT_EQ(in_strand.load(), kHandlers);
  EXPECT_EQ(overlapped.load(), 0);
  EXPECT_EQ(in_scope.load(), kHandlers);
  EXPECT_EQ(expl.size(), 0);  // the request's scope ended with the last wrapped copy
}

template <typename T>
struct TagAllocator {
  using value_type = T;
  int tag;
  explicit TagAllocator(int t) noexcept : tag(t) {}
  template <typename U>
  TagAllocator(const TagAllocator<U>& other) noexcept : tag(other.tag) {}
  T* allocate(std::size_t n) { return std::allocator<T>().allocate(n); }
  void deallocate(T* p, std::size_t n) { std::allocator<T>().deallocate(p, n); }
  template <typename U>
  friend bool operator==(const TagAllocator& a, const TagAllocator<U>& b) noexcept {
    return a.tag == b.tag;
  }
};

struct HandlerWithAllocator {
  using allocator_type = TagAllocator<void>;
  allocator_type get_allocator() const noexcept { return allocator_type(17); }
  void operator()() const {}
};

TEST(AsioWrap, AssociatedAllocatorIsTheWrappedHandlers) {
  auto wrapped = scopereg::wrap(HandlerWithAllocator{});
  static_assert(
      std::is_same_v<net::associated_allocator_t<decltype(wrapped)>, TagAllocator<void>>);
  EXPECT_EQ(net::get_associated_allocator(wrapped).tag, 17);
  // And a handler without one keeps Asio's defaults.
  auto plain = scopereg::wrap([] {});
  static_assert(
      std::is_same_v<net::associated_allocator_t<decltype(plain)>, std::allocator<void>>);
  net::io_context io;
  static_assert(std::is_same_v<
                net::associated_executor_t<decltype(plain), net::io_context::executor_type>,
                net::io_context::executor_type>);
  EXPECT_TRUE(net::get_associated_executor(plain, io.get_executor()) == io.get_executor());
}

// ---------------------------------------------------------------------------------------
// 10. The documented limits
// ---------------------------------------------------------------------------------------

using IoExecutor = net::io_context::executor_type;
using IoTaskExecutor = scopereg::asio::TaskExecutor<IoExecutor>;

// (a) A coroutine typed to a concrete executor cannot run on a TaskExecutor (it does not
// convert); this is what co_spawn's static_assert checks.
static_assert(!std::is_constructible_v<IoExecutor, IoTaskExecutor>);
static_assert(std::is_constructible_v<net::any_io_executor, IoTaskExecutor>);
static_assert(std::is_constructible_v<IoTaskExecutor, IoTaskExecutor>);

// ...while a coroutine typed to the TaskExecutor itself works.
awaitable<void, IoTaskExecutor> typed_to_task_executor(Tally& t) {
  IoTaskExecutor ex = co_await net::this_coro::executor;
  t.expect(CoroutineScope::active());
  const ScopeToken task = CoroutineScope::current();
  t.expect(!task.is_null());
  t.expect(ex.task().token() == task);
  co_await net::post(ex, net::use_awaitable_t<IoTaskExecutor>{});
  t.expect(CoroutineScope::current() == task);
  net::basic_waitable_timer<std::chrono::steady_clock,
                            net::wait_traits<std::chrono::steady_clock>, IoTaskExecutor>
      timer(ex, std::chrono::milliseconds(1));
  co_await timer.async_wait(net::use_awaitable_t<IoTaskExecutor>{});
  t.expect(CoroutineScope::current() == task);
}

TEST(AsioLimits, CoroutineTypedToTheTaskExecutorRuns) {
  Tally t;
  Completions done;
  {
    net::io_context io;
    scopereg::asio::co_spawn(io.get_executor(), typed_to_task_executor(t), done.handler());
    io.run();
  }
  EXPECT_EQ(done.ok.load(), 1) << done.errors;
  EXPECT_EQ(t.checks.load(), 5);
  EXPECT_EQ(t.wrong.load(), 0);
}

// (b) An asynchronous operation that calls the completion handler directly, from a thread
// of its own, without dispatching it through the handler's associated executor.
template <typename Token>
auto async_complete_directly(std::vector<std::thread>& threads, Token&& token) {
  return net::async_initiate<Token, void()>(
      [&threads](auto handler) {
        threads.emplace_back([h = std::move(handler)]() mutable { std::move(h)(); });
      },
      token);
}

// The same operation done right: the completion goes through the handler's associated
// executor (as Asio's own operations and async_compose do).
template <typename Token>
auto async_complete_via_executor(std::vector<std::thread>& threads, Token&& token) {
  return net::async_initiate<Token, void()>(
      [&threads](auto handler) {
        threads.emplace_back([h = std::move(handler)]() mutable {
          auto ex = net::get_associated_executor(h);
          net::post(ex, std::move(h));
        });
      },
      token);
}

struct ForeignResume {
  ScopeToken task;
  bool direct_active = true;
  bool direct_explicit_active = true;
  bool direct_on_foreign_thread = false;
  bool back_active = false;
  ScopeToken back_token;
  bool via_active = false;
  ScopeToken via_token;
  std::thread::id io_thread;
};

awaitable<void> resumed_by_a_foreign_thread(std::vector<std::thread>& threads,
                                            ForeignResume& r) {
  r.task = CoroutineScope::current();
  r.io_thread = std::this_thread::get_id();
  co_await async_complete_directly(threads, use_awaitable);
  // THE DOCUMENTED LIMIT (asio.h, "Limits"): resumed by a handler invoked without its
  // associated executor, the coroutine runs with no task installed: CoroutineScope has no
  // scope here and ExplicitScope sees the calling thread's (empty) stack.
  r.direct_active = CoroutineScope::active();
  r.direct_explicit_active = ExplicitScope::active();
  r.direct_on_foreign_thread = std::this_thread::get_id() != r.io_thread;
  // Back onto the task's executor: the task is installed again.
  co_await net::post(co_await net::this_coro::executor, use_awaitable);
  r.back_active = CoroutineScope::active();
  r.back_token = CoroutineScope::current();
  co_await async_complete_via_executor(threads, use_awaitable);
  r.via_active = CoroutineScope::active();
  r.via_token = CoroutineScope::current();
}

TEST(AsioLimits, HandlerInvokedWithoutItsExecutorResumesOutsideTheTask) {
  ForeignResume r;
  std::vector<std::thread> threads;
  Completions done;
  {
    net::io_context io;
    auto work = net::make_work_guard(io);  // the io_context waits for the foreign threads
    scopereg::asio::co_spawn(io.get_executor(), resumed_by_a_foreign_thread(threads, r),
                             [&, h = done.handler()](std::exception_ptr e) {
                               h(e);
                               work.reset();
                             });
    io.run();
    // Before the io_context goes: a foreign thread may still be finishing its post()
    // (signalling the io_context) after the task it resumed has completed.
    for (std::thread& th : threads) th.join();
  }
  EXPECT_EQ(done.ok.load(), 1) << done.errors;
  EXPECT_EQ(threads.size(), 2u);
  EXPECT_FALSE(r.task.is_null());
  EXPECT_TRUE(r.direct_on_foreign_thread);
  EXPECT_FALSE(r.direct_active) << "the limit is gone: update asio.h's Limits";
  EXPECT_FALSE(r.direct_explicit_active);
  EXPECT_TRUE(r.back_active);
  EXPECT_EQ(r.back_token, r.task);
  EXPECT_TRUE(r.via_active);
  EXPECT_EQ(r.via_token, r.task);
}

// ---------------------------------------------------------------------------------------
// 11. Switch hooks pair exactly across resumptions
// ---------------------------------------------------------------------------------------

struct HookProbe {
  std::atomic<int> enters{0};
  std::atomic<int> leaves{0};
  std::atomic<int> double_enters{0};
  std::atomic<int> double_enters_across_threads{0};  // the previous enter on another thread
  std::atomic<int> double_leaves{0};
  std::atomic<int> destroyed{0};
  std::atomic<int> unbalanced_at_destruction{0};
  // The same, counted per thread: an enter on a thread where the value is already entered,
  // a leave on one where it is not.
  std::atomic<int> per_thread_double_enters{0};
  std::atomic<int> per_thread_double_leaves{0};
};

// The hooked values entered on this thread.
thread_local std::vector<const void*> t_entered;

class Hooked {
 public:
  Hooked(HookProbe& probe, int id) : probe_(probe), id_(id) {}
  Hooked(const Hooked&) = delete;
  Hooked& operator=(const Hooked&) = delete;
  ~Hooked() {
    if (in_.load() || enters_.load() != leaves_.load()) probe_.unbalanced_at_destruction++;
    probe_.destroyed++;
  }
  void on_scope_enter() {
    probe_.enters++;
    enters_++;
    const std::thread::id me = std::this_thread::get_id();
    const std::thread::id previous = last_enter_.exchange(me);
    if (in_.exchange(true)) {
      probe_.double_enters++;
      if (previous != me) probe_.double_enters_across_threads++;
    }
    if (std::find(t_entered.begin(), t_entered.end(), this) != t_entered.end()) {
      probe_.per_thread_double_enters++;
    } else {
      t_entered.push_back(this);
    }
  }
  void on_scope_leave() {
    probe_.leaves++;
    leaves_++;
    if (!in_.exchange(false)) probe_.double_leaves++;
    auto it = std::find(t_entered.begin(), t_entered.end(), this);
    if (it == t_entered.end()) {
      probe_.per_thread_double_leaves++;
    } else {
      t_entered.erase(it);
    }
  }
  int id() const { return id_; }

 private:
  HookProbe& probe_;
  const int id_;
  std::atomic<bool> in_{false};
  std::atomic<std::thread::id> last_enter_{};
  std::atomic<int> enters_{0};
  std::atomic<int> leaves_{0};
};

constexpr int kHookedAwaits = 5;

awaitable<void> hooked_task(int i, TaskVar<Hooked>& var, HookProbe& probe, Tally& t,
                            Migrations& m) {
  var.set(probe, i);
  for (int k = 0; k < kHookedAwaits; ++k) {
    co_await sleep_ms((i + k) % 3, m);
    const Hooked* h = var.find();
    t.expect(h != nullptr && h->id() == i);
  }
}

// Hooks pair exactly on each thread. Across threads a resumption on one thread can enter
// the task before the function that suspended it on the other has left it (asio.h: a
// task may be current on two threads for a moment), so a value's enters and leaves are
// counted per thread here, not as one global flag (see the next test).
TEST(AsioHooks, EnterAndLeavePairAcrossResumptionsOnAThreadPool) {
  HookProbe probe;
  TaskVar<Hooked> var([&] { return Hooked(probe, -1); });
  Tally t;
  Migrations m;
  Completions done;
  constexpr int kTasks = 100;
  {
    net::thread_pool pool(2);
    for (int i = 0; i < kTasks; ++i) {
      scopereg::asio::co_spawn(pool.get_executor(), hooked_task(i, var, probe, t, m),
                               done.handler());
    }
    pool.join();
  }
  EXPECT_EQ(done.ok.load(), kTasks) << done.errors;
  EXPECT_EQ(t.wrong.load(), 0);
  EXPECT_EQ(probe.destroyed.load(), kTasks);
  RecordProperty("enters", probe.enters.load());
  RecordProperty("resumed_on_another_thread", m.moved.load());
  // Created (enter), then at least one resumption per await (enter).
  EXPECT_GE(probe.enters.load(), kTasks * (1 + kHookedAwaits));
  EXPECT_EQ(probe.enters.load(), probe.leaves.load());
  RecordProperty("enters_while_current_on_another_thread",
                 probe.double_enters_across_threads.load());
  EXPECT_EQ(probe.per_thread_double_enters.load(), 0);
  EXPECT_EQ(probe.per_thread_double_leaves.load(), 0);
  EXPECT_EQ(probe.unbalanced_at_destruction.load(), 0);
}

// The same, made deterministic: an operation that completes correctly (posted to the
// handler's associated executor) but whose initiation -- which Asio runs on the suspending
// thread, inside the TaskExecutor function that resumed the task -- returns only once the
// task has resumed on the pool's other thread (or after 2 s). The TaskExecutor function on
// the first thread therefore leaves the task after the second thread entered it: both
// installations overlap, which TaskScope::Installed allows and asio.h documents: the
// task is current on both threads for that moment. Per thread the hooks pair exactly; the
// value sees the second thread's enter before the first thread's leave.
template <typename Token>
auto async_post_then_linger(std::atomic<bool>& resumed, Token&& token) {
  return net::async_initiate<Token, void()>(
      [flag = &resumed](auto handler) {
        // Once the handler is posted, the operation's state (this initiation object
        // included) may be destroyed by the resumed task: keep only locals from here on.
        std::atomic<bool>* const resumed_flag = flag;
        auto ex = net::get_associated_executor(handler);
        net::post(ex, std::move(handler));
        const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(2);
        while (!resumed_flag->load() && std::chrono::steady_clock::now() < give_up) {
          std::this_thread::sleep_for(std::chrono::microseconds(100));
        }
      },
      token);
}

awaitable<void> overlapping_resumption(TaskVar<Hooked>& var, HookProbe& probe,
                                       std::atomic<bool>& resumed, Tally& t) {
  var.set(probe, 1);
  const std::thread::id before = std::this_thread::get_id();
  co_await async_post_then_linger(resumed, use_awaitable);
  t.expect(std::this_thread::get_id() != before);  // the other pool thread resumed it
  resumed.store(true);
  co_await sleep_ms(2);
  const Hooked* h = var.find();
  t.expect(h != nullptr && h->id() == 1);
}

TEST(AsioHooks, ResumptionOverlappingThePreviousFunctionsTail) {
  HookProbe probe;
  TaskVar<Hooked> var([&] { return Hooked(probe, -1); });
  std::atomic<bool> resumed{false};
  Tally t;
  Completions done;
  {
    net::thread_pool pool(2);
    scopereg::asio::co_spawn(pool.get_executor(),
                             overlapping_resumption(var, probe, resumed, t), done.handler());
    pool.join();
  }
  EXPECT_EQ(done.ok.load(), 1) << done.errors;
  EXPECT_EQ(t.checks.load(), 2);
  EXPECT_EQ(t.wrong.load(), 0);
  EXPECT_EQ(probe.destroyed.load(), 1);
  EXPECT_EQ(probe.enters.load(), probe.leaves.load());
  // The documented overlap happened (the second thread entered while the first had not
  // yet left), and no thread saw two enters or two leaves in a row.
  EXPECT_GE(probe.double_enters_across_threads.load(), 1);
  EXPECT_EQ(probe.per_thread_double_enters.load(), 0);
  EXPECT_EQ(probe.per_thread_double_leaves.load(), 0);
  EXPECT_EQ(probe.unbalanced_at_destruction.load(), 0);
}

// ---------------------------------------------------------------------------------------
// 12. this_scope()
// ---------------------------------------------------------------------------------------

struct ScopeSeen {
  ScopeToken awaited;
  ScopeToken current;
};

awaitable<void> report_scope(ScopeSeen& seen) {
  seen.awaited = co_await scopereg::asio::this_scope();
  seen.current = CoroutineScope::current();
  co_await sleep_ms(0);
  // (Not `if (co_await ...)`: g++ 12 with Asio 1.18 crashes on a co_await in an if
  // condition, with or without scopereg.)
  const ScopeToken again = co_await scopereg::asio::this_scope();
  if (again != seen.awaited) seen.awaited = ScopeToken();  // must not change after an await
}

TEST(AsioTask, ThisScopeIsTheTasksToken) {
  ScopeSeen a;
  ScopeSeen b;
  ScopeSeen outside;
  {
    net::io_context io;
    scopereg::asio::co_spawn(io.get_executor(), report_scope(a), net::detached);
    scopereg::asio::co_spawn(io.get_executor(), report_scope(b), net::detached);
    net::co_spawn(io, report_scope(outside), net::detached);  // no task: null
    io.run();
  }
  EXPECT_FALSE(a.awaited.is_null());
  EXPECT_EQ(a.awaited, a.current);
  EXPECT_FALSE(b.awaited.is_null());
  EXPECT_EQ(b.awaited, b.current);
  EXPECT_NE(a.awaited, b.awaited);
  EXPECT_TRUE(outside.awaited.is_null());
  EXPECT_TRUE(outside.current.is_null());
}

// The completion handler runs on the TaskExecutor, in the task's scope (its values still
// there); one bound to an executor of its own runs there instead, outside the task.
awaitable<int> sets_and_returns(TaskVar<int>& var, ScopeToken& task) {
  task = CoroutineScope::current();
  var.set(42);
  co_await sleep_ms(0);
  co_return 5;
}

TEST(AsioTask, CompletionHandlerRunsInTheTaskScope) {
  TaskVar<int> var([] { return -1; });
  ScopeToken task;
  ScopeToken task2;
  int result = 0;
  bool handler_active = false;
  ScopeToken handler_token;
  int handler_value = 0;
  std::exception_ptr error = std::make_exception_ptr(0);
  bool bound_ran = false;
  bool bound_active = true;
  {
    net::io_context io;
    net::io_context other;
    scopereg::asio::co_spawn(io.get_executor(), sets_and_returns(var, task),
                             [&](std::exception_ptr e, int r) {
                               error = e;
                               result = r;
                               handler_active = CoroutineScope::active();
                               handler_token = CoroutineScope::current();
                               handler_value = value_of(var.find());
                             });
    scopereg::asio::co_spawn(io.get_executor(), sets_and_returns(var, task2),
                             net::bind_executor(other.get_executor(),
                                                [&](std::exception_ptr, int) {
                                                  bound_ran = true;
                                                  bound_active = CoroutineScope::active();
                                                }));
    io.run();
    other.run();
  }
  EXPECT_FALSE(error) << describe(error);
  EXPECT_EQ(result, 5);
  EXPECT_TRUE(handler_active);
  EXPECT_FALSE(task.is_null());
  EXPECT_EQ(handler_token, task);
  EXPECT_EQ(handler_value, 42);
  EXPECT_TRUE(bound_ran);
  EXPECT_FALSE(bound_active);
  EXPECT_EQ(var.size(), 0);
}

// A callable wrapped inside a task and called there keeps the task current for
// CoroutineScope (only ExplicitScope's stack is the captured one), and the task's own
// stack is intact afterwards.
awaitable<void> wraps_inside(TaskVar<int>& var, ScopeToken& task, ScopeToken& seen_in_wrap,
                             int& value_in_wrap, ScopeToken& after) {
  task = CoroutineScope::current();
  var.set(11);
  auto wrapped = scopereg::wrap([&] {
    ScopeGuard inner(std::string("inside the wrapped call"));
    seen_in_wrap = CoroutineScope::current();
    const int* v = var.find();
    value_in_wrap = v != nullptr ? *v : -1;
  });
  wrapped();
  co_await sleep_ms(0);
  after = ExplicitScope::current();
}

TEST(AsioTask, AWrappedCallableCalledInTheTaskStillSeesTheTask) {
  TaskVar<int> var([] { return -1; });
  ScopeToken task, seen_in_wrap, after;
  int value_in_wrap = 0;
  {
    net::io_context io;
    scopereg::asio::co_spawn(io.get_executor(),
                             wraps_inside(var, task, seen_in_wrap, value_in_wrap, after),
                             net::detached);
    io.run();
  }
  EXPECT_FALSE(task.is_null());
  EXPECT_EQ(seen_in_wrap, task);
  EXPECT_EQ(value_in_wrap, 11);
  EXPECT_EQ(after, task);  // the task's own scope again, after a resumption
  EXPECT_EQ(var.size(), 0);
}

// A copy of the task's executor kept after the task finished (a timer made from it) keeps
// neither the io_context's outstanding work (run() returns, as without scopereg) nor the
// task's scope (its values die when the task ends); a function executed on it afterwards
// runs as on the inner executor, outside the task.
std::optional<net::steady_timer> g_kept_timer;
awaitable<void> keeps_a_timer(TaskVar<int>& var) {
  var.set(3);
  g_kept_timer.emplace(co_await net::this_coro::executor);
  co_return;
}

TEST(AsioTask, AnExecutorCopyKeptAfterTheTaskKeepsNeitherRunGoingNorTheScope) {
  TaskVar<int> var([] { return -1; });
  net::io_context io;
  scopereg::asio::co_spawn(io.get_executor(), keeps_a_timer(var), net::detached);
  std::atomic<bool> returned{false};
  std::atomic<bool> had_to_stop{false};
  std::thread watchdog([&] {
    for (int i = 0; i < 500 && !returned; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (!returned) {  // a hang becomes a failure below, not a stuck test
      had_to_stop = true;
      io.stop();
    }
  });
  const std::size_t ran = io.run();
  returned = true;
  watchdog.join();
  EXPECT_GE(ran, 1u);
  EXPECT_FALSE(had_to_stop) << "io_context::run() did not return: outstanding work held";
  EXPECT_EQ(var.size(), 0);  // the task ended: its scope with it
  ASSERT_TRUE(g_kept_timer);
  const auto kept = g_kept_timer->get_executor();
  const auto* task_ex = kept.target<scopereg::asio::TaskExecutor<net::io_context::executor_type>>();
  ASSERT_NE(task_ex, nullptr);
  EXPECT_FALSE(task_ex->task_running());
  bool ran_late = false;
  bool active_late = true;
  net::post(kept, [&] {
    ran_late = true;
    active_late = CoroutineScope::active();
  });
  io.restart();
  io.run();
  EXPECT_TRUE(ran_late);     // no work is lost...
  EXPECT_FALSE(active_late);  // ...and it runs outside the ended task
  g_kept_timer.reset();
}

// A task record is reused by later tasks; a copy of an earlier task's executor never runs
// a function in a later task, and a function queued by a task that runs after the task
// ended runs outside it.
awaitable<void> first_task(TaskVar<int>& var, std::optional<net::any_io_executor>& kept) {
  var.set(1);
  kept = co_await net::this_coro::executor;
}

awaitable<void> second_task(TaskVar<int>& var, const net::any_io_executor& stale, Tally& t,
                            std::atomic<int>& late) {
  var.set(2);
  const ScopeToken me = CoroutineScope::current();
  net::post(stale, [&] {  // queued now, runs between handlers
    t.expect(!CoroutineScope::active());
    late.fetch_add(1);
  });
  const net::any_io_executor mine = co_await net::this_coro::executor;
  net::post(mine, [&] {  // queued by this task; it may run before or after the task ends
    t.expect(!CoroutineScope::active() || CoroutineScope::current() == me);
    t.expect(!CoroutineScope::active() || value_of(var.find()) == 2);
    late.fetch_add(1);
  });
  co_await net::post(mine, use_awaitable);
  t.expect(CoroutineScope::current() == me);
  t.expect(value_of(var.find()) == 2);
}

TEST(AsioTask, AnEndedTasksExecutorNeverRunsInALaterTask) {
  TaskVar<int> var([] { return -1; });
  Tally t;
  std::atomic<int> late{0};
  std::optional<net::any_io_executor> kept;
  {
    net::io_context io;
    scopereg::asio::co_spawn(io.get_executor(), first_task(var, kept), net::detached);
    io.run();
    ASSERT_TRUE(kept);
    EXPECT_EQ(var.size(), 0);
    for (int round = 0; round < 20; ++round) {  // later tasks, records reused
      io.restart();
      scopereg::asio::co_spawn(io.get_executor(), second_task(var, *kept, t, late),
                               net::detached);
      io.run();
    }
    kept.reset();
  }
  EXPECT_EQ(late.load(), 40);
  EXPECT_EQ(t.checks.load(), 20 * 5);
  EXPECT_EQ(t.wrong.load(), 0);
  EXPECT_EQ(var.size(), 0);
}

// ---------------------------------------------------------------------------------------
// Work-tracking copies of a TaskExecutor (prefer(outstanding_work.tracked), as Asio's
// work guards and co_spawn make them): outstanding work while any exists, none after the
// last goes, again when a new one is made; concurrent copies of one task's tracked executor.
// ---------------------------------------------------------------------------------------

awaitable<void> keeps_tracked_copies(TaskVar<int>& var, std::optional<net::any_io_executor>& plain,
                                     std::optional<net::any_io_executor>& tracked1,
                                     std::optional<net::any_io_executor>& tracked2) {
  var.set(7);
  const net::any_io_executor ex = co_await net::this_coro::executor;
  plain = ex;
  tracked1 = net::prefer(ex, net::execution::outstanding_work.tracked);
  tracked2 = *tracked1;
}

TEST(AsioExecutor, TrackedCopiesAreOutstandingWorkUntilTheLastGoes) {
  TaskVar<int> var([] { return -1; });
  std::optional<net::any_io_executor> plain, tracked1, tracked2;
  {
    net::io_context io;
    scopereg::asio::co_spawn(io.get_executor(),
                             keeps_tracked_copies(var, plain, tracked1, tracked2),
                             net::detached);
    io.poll();  // the task runs to its end; nothing is left to run
    ASSERT_TRUE(tracked1 && tracked2 && plain);
    EXPECT_FALSE(io.stopped()) << "two tracked copies are outstanding work";
    // They say what they are, and their inner executors are io_context's tracked ones.
    using Tracked = scopereg::asio::TaskExecutor<decltype(net::prefer(
        io.get_executor(), net::execution::outstanding_work.tracked))>;
    using Untracked = scopereg::asio::TaskExecutor<net::io_context::executor_type>;
    ASSERT_NE(tracked1->target<Tracked>(), nullptr);
    ASSERT_NE(plain->target<Untracked>(), nullptr);
    EXPECT_EQ(net::query(*tracked1->target<Tracked>(), net::execution::outstanding_work),
              net::execution::outstanding_work.tracked);
    EXPECT_EQ(net::query(*plain->target<Untracked>(), net::execution::outstanding_work),
              net::execution::outstanding_work.untracked);
    EXPECT_EQ(net::query(tracked1->target<Tracked>()->get_inner_executor(),
                         net::execution::outstanding_work),
              net::execution::outstanding_work.tracked);
    EXPECT_EQ(&net::query(tracked1->target<Tracked>()->get_inner_executor(),
                          net::execution::context),
              &io);
    tracked1.reset();
    io.poll();
    EXPECT_FALSE(io.stopped()) << "one tracked copy is still outstanding work";
    tracked2.reset();
    EXPECT_TRUE(io.stopped()) << "the last tracked copy went: no outstanding work";

    // A new tracked copy of the same task counts as work again.
    io.restart();
    std::optional<net::any_io_executor> again =
        net::prefer(*plain, net::execution::outstanding_work.tracked);
    io.poll();
    EXPECT_FALSE(io.stopped());
    std::optional<net::any_io_executor> copy = again;
    again.reset();
    io.poll();
    EXPECT_FALSE(io.stopped());
    // The task has ended: the copy runs functions outside it, as its inner executor.
    bool active = true;
    net::post(*copy, [&] { active = CoroutineScope::active(); });
    io.poll();
    EXPECT_FALSE(active);
    copy.reset();
    EXPECT_TRUE(io.stopped());
    EXPECT_EQ(var.size(), 0);  // the task's scope ended with the task
    plain.reset();
  }
}

constexpr int kTrackedCopyRounds = 2000;

// Makes and drops tracked copies of the (shared) task executor, hopping threads.
awaitable<void> tracked_copy_churn(Tally& t, TaskVar<int>& var) {
  const net::any_io_executor ex = co_await net::this_coro::executor;
  for (int i = 0; i < kTrackedCopyRounds; ++i) {
    {
      net::any_io_executor tracked = net::prefer(ex, net::execution::outstanding_work.tracked);
      net::any_io_executor copy = tracked;
      net::any_io_executor untracked =
          net::prefer(copy, net::execution::outstanding_work.untracked);
      t.expect(untracked == ex);
    }
    co_await net::post(ex, use_awaitable);
    t.expect(value_of(var.find()) == 11);
  }
}

awaitable<void> spawns_tracked_churners(Tally& t, TaskVar<int>& var) {
  var.set(11);
  const net::any_io_executor ex = co_await net::this_coro::executor;
  // Plain co_spawn children share this task (while it runs: it waits for them): their
  // tracked copies use one binding, from both pool threads at once.
  std::atomic<int> running{4};
  for (int i = 0; i < 4; ++i) {
    net::co_spawn(ex, tracked_copy_churn(t, var), [&running](std::exception_ptr) {
      running.fetch_sub(1);
    });
  }
  while (running.load() > 0) co_await net::post(ex, use_awaitable);
}

TEST(AsioExecutor, TrackedCopiesOfOneTaskFromTwoThreads) {
  TaskVar<int> var([] { return -1; });
  Tally t;
  {
    net::thread_pool pool(2);
    scopereg::asio::co_spawn(pool.get_executor(), spawns_tracked_churners(t, var),
                             net::detached);
    pool.join();  // returns: every tracked copy went
  }
  EXPECT_EQ(t.checks.load(), 4 * kTrackedCopyRounds * 2);
  EXPECT_EQ(t.wrong.load(), 0);
  EXPECT_EQ(var.size(), 0);
}


// An allocator with state (an arena) makes an executor the task record must not keep: the
// TaskExecutor holds it by value, and nothing keeps the arena once the task and its
// executors are gone.
template <typename T>
struct ArenaAllocator {
  using value_type = T;
  std::shared_ptr<int> arena;
  explicit ArenaAllocator(std::shared_ptr<int> a) : arena(std::move(a)) {}
  template <typename U>
  ArenaAllocator(const ArenaAllocator<U>& other) : arena(other.arena) {}
  T* allocate(std::size_t n) { return std::allocator<T>().allocate(n); }
  void deallocate(T* p, std::size_t n) { std::allocator<T>().deallocate(p, n); }
  template <typename U>
  bool operator==(const ArenaAllocator<U>& other) const {
    return arena == other.arena;
  }
};

awaitable<void, IoTaskExecutor> uses_an_arena(std::shared_ptr<int> arena, Tally& t) {
  IoTaskExecutor ex = co_await net::this_coro::executor;
  const ScopeToken task = CoroutineScope::current();
  auto with_arena = net::require(ex, net::execution::allocator(ArenaAllocator<void>(arena)));
  bool ran = false;
  net::execution::execute(with_arena, [&] {
    ran = true;
    t.expect(CoroutineScope::current() == task);
  });
  co_await net::post(ex, net::use_awaitable_t<IoTaskExecutor>{});
  t.expect(ran);
}

TEST(AsioExecutor, AnExecutorWithAStatefulAllocatorIsNotKeptPastItsTask) {
  auto arena = std::make_shared<int>(0);
  Tally t;
  Completions done;
  {
    net::io_context io;
    scopereg::asio::co_spawn(io.get_executor(), uses_an_arena(arena, t), done.handler());
    io.run();
  }
  EXPECT_EQ(done.ok.load(), 1) << done.errors;
  EXPECT_EQ(t.checks.load(), 2);
  EXPECT_EQ(t.wrong.load(), 0);
  EXPECT_EQ(arena.use_count(), 1) << "a task record kept an executor with the arena";
}

// ---------------------------------------------------------------------------------------
// 13. A child task runs on its parent's inner executor, not inside the parent's task
// ---------------------------------------------------------------------------------------

// Asio 1.18's any_executor::target<T>() does not check the type: these do.
template <typename T>
const T* checked_target(const net::any_io_executor& ex) {
  return ex && ex.target_type() == typeid(T) ? ex.target<T>() : nullptr;
}

using AnyTaskExecutor = scopereg::asio::TaskExecutor<net::any_io_executor>;
using PoolTaskExecutor = scopereg::asio::TaskExecutor<net::thread_pool::executor_type>;

// Waits, blocking this thread, until done() or 5 s (a hang becomes a failure, not a stuck
// test); returns whether done() held.
template <typename Done>
bool block_until(Done done) {
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (!done()) {
    if (std::chrono::steady_clock::now() > give_up) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  return true;
}

// The same without blocking: the task goes round its executor until done() or 5 s.
template <typename Done>
awaitable<bool> await_until(Done done) {
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  const net::any_io_executor ex = co_await net::this_coro::executor;
  while (!done()) {
    if (std::chrono::steady_clock::now() > give_up) co_return false;
    co_await net::post(ex, use_awaitable);
  }
  co_return true;
}

struct ParentAndChild;

// A value of the parent's scope alone that counts the times that scope is entered on
// another thread than the one where the parent's function is blocked (the "window").
class ParentMark {
 public:
  explicit ParentMark(ParentAndChild& r) : r_(r) {}
  void on_scope_enter();
  void on_scope_leave() {}

 private:
  ParentAndChild& r_;
};

struct ParentAndChild {
  Counts counts;
  TaskVar<int> coro{[] { return -1; }};
  ExplicitVar<int> expl{[] { return -1; }};
  TaskVar<Counted> parent_only{counted_factory(counts)};  // set by the parent alone
  TaskVar<ParentMark> mark{[this] { return ParentMark(*this); }};  // likewise
  Tally t;
  Completions child_done;
  ScopeToken parent_token;
  std::optional<net::any_io_executor> parent_ex;  // a copy of the parent's executor
  std::atomic<bool> parent_ready{false};  // the parent set its own values
  std::thread::id window_thread;          // written before window_open
  std::atomic<bool> window_open{false};   // one function of the parent blocks its thread
  std::atomic<int> foreign_enters{0};     // the parent's scope entered elsewhere meanwhile
  std::atomic<bool> child_checked{false};
  std::atomic<bool> parent_torn{false};  // the parent's teardown ran
  // Seen by one function of the child that began while the parent still ran.
  bool parent_ex_is_the_pools = false;
  bool parent_ended_meanwhile = false;
  bool parent_running_afterwards = true;
};

void ParentMark::on_scope_enter() {
  if (r_.window_open.load() && std::this_thread::get_id() != r_.window_thread) {
    r_.foreign_enters.fetch_add(1);
  }
}

bool parent_task_running(const ParentAndChild& r) {
  const PoolTaskExecutor* te = checked_target<PoolTaskExecutor>(*r.parent_ex);
  return te != nullptr && te->task_running();
}

awaitable<void> lasting_child(ParentAndChild& r) {
  const ScopeToken me = CoroutineScope::current();
  const net::any_io_executor ex = co_await net::this_coro::executor;
  r.t.expect(!me.is_null());
  r.t.expect(me != r.parent_token);
  r.t.expect(value_of(r.coro.find()) == 7);  // copy_current: the parent's values
  r.t.expect(value_of(r.expl.find()) == 8);
  r.t.expect(co_await await_until([&r] { return r.window_open.load(); }));
  co_await net::post(ex, use_awaitable);  // a function that begins in the window
  // The parent runs (blocked in its window on the pool's other thread), its own values
  // set; this function of the child installed nothing of it (ParentMark counts).
  r.t.expect(parent_task_running(r));
  r.t.expect(CoroutineScope::current() == me);
  r.t.expect(ExplicitScope::current() == me);
  r.t.expect(r.parent_only.find() == nullptr);
  r.t.expect(r.mark.find() == nullptr);
  r.child_checked = true;
  // Within this same function of the child: the parent's coroutine and teardown finish on
  // the other thread, and the parent's task ends there (its own value destroyed), this
  // function notwithstanding.
  r.parent_ex_is_the_pools = checked_target<PoolTaskExecutor>(*r.parent_ex) != nullptr;
  r.parent_ended_meanwhile = block_until(
      [&r] { return r.parent_torn.load() && r.counts.destroyed.load() == 1; });
  r.parent_running_afterwards = parent_task_running(r);
  r.t.expect(CoroutineScope::current() == me);
  r.t.expect(value_of(r.coro.find()) == 7);  // the shared value lives on in the child
  r.coro.set(70);
  co_await net::post(ex, use_awaitable);
  r.t.expect(CoroutineScope::current() == me);
  r.t.expect(value_of(r.coro.find()) == 70);
  r.t.expect(value_of(r.expl.find()) == 8);
}

awaitable<void> parent_of_a_lasting_child(ParentAndChild& r) {
  r.coro.set(7);
  r.expl.set(8);
  r.parent_token = CoroutineScope::current();
  const net::any_io_executor ex = co_await net::this_coro::executor;
  r.parent_ex = ex;
  scopereg::asio::co_spawn(ex, lasting_child(r), scopereg::copy_current,
                           r.child_done.handler());
  // After the child's copy was made: the parent's own.
  r.parent_only.set(r.counts, 1);
  r.mark.set(r);
  r.parent_ready = true;
  // One function of the parent that blocks its thread until the child has run a function
  // that began meanwhile (on the pool's other thread): with the parent's task surely
  // running, nothing may enter its scope there.
  r.window_thread = std::this_thread::get_id();
  r.window_open = true;
  r.t.expect(block_until([&r] { return r.child_checked.load(); }));
  r.window_open = false;
  r.t.expect(CoroutineScope::current() == r.parent_token);
  r.t.expect(value_of(r.coro.find()) == 7);
}

// The reviewer's case: a child started from co_await this_coro::executor used to run each
// function as the parent's TaskExecutor function around its own: it kept the parent's task
// (and values) alive after the parent's coroutine and teardown finished, and installed the
// parent's scope under its own (its values' switch hooks fired on the child's thread).
TEST(AsioChildren, AChildStartedFromThisCoroExecutorIsNotInsideItsParentsTask) {
  ParentAndChild r;
  Completions parent_done;
  {
    net::thread_pool pool(2);
    scopereg::asio::co_spawn(pool.get_executor(), parent_of_a_lasting_child(r),
                             [&r](std::exception_ptr e) {
                               r.t.expect(!e);
                               r.parent_torn = true;
                             },
                             parent_done.handler());
    pool.join();
    r.parent_ex.reset();
  }
  EXPECT_EQ(parent_done.ok.load(), 1) << parent_done.errors;
  EXPECT_EQ(r.child_done.ok.load(), 1) << r.child_done.errors;
  EXPECT_TRUE(r.parent_ex_is_the_pools);
  EXPECT_EQ(r.foreign_enters.load(), 0)
      << "a function of the child installed the parent's scope on its thread";
  EXPECT_TRUE(r.parent_ended_meanwhile)
      << "the parent's task did not end while a function of its child ran: the child runs "
         "inside the parent's TaskExecutor";
  EXPECT_FALSE(r.parent_running_afterwards);
  EXPECT_EQ(r.t.checks.load(), 19);
  EXPECT_EQ(r.t.wrong.load(), 0);
  EXPECT_EQ(r.counts.made.load(), 1);
  EXPECT_EQ(r.counts.destroyed.load(), 1);
  EXPECT_EQ(r.coro.size(), 0);
  EXPECT_EQ(r.expl.size(), 0);
  EXPECT_EQ(r.mark.size(), 0);
}

// What a task's executor is over, as the task sees it.
struct ExecutorSeen {
  bool ran = false;
  ScopeToken token;
  const std::type_info* type = nullptr;        // the target of this_coro::executor
  const std::type_info* inner_type = nullptr;  // ...and of its inner any_io_executor
  std::optional<net::any_io_executor> inner_untracked;  // (no work kept by the test)
};

awaitable<void> reports_its_executor(ExecutorSeen& seen, ExecutorSeen* grandchild) {
  seen.ran = true;
  seen.token = CoroutineScope::current();
  const net::any_io_executor ex = co_await net::this_coro::executor;
  seen.type = &ex.target_type();
  if (const AnyTaskExecutor* te = checked_target<AnyTaskExecutor>(ex)) {
    const net::any_io_executor inner = te->get_inner_executor();
    seen.inner_type = &inner.target_type();
    seen.inner_untracked = net::prefer(inner, net::execution::outstanding_work.untracked);
  }
  if (grandchild != nullptr) {
    co_await scopereg::asio::co_spawn(ex, reports_its_executor(*grandchild, nullptr),
                                      scopereg::copy_current, use_awaitable);
  }
}

// How a parent changes its executor before spawning a child on it.
enum class Variant { kAsIs, kTracked, kBlockingNever };

awaitable<void> spawns_a_reporter(ExecutorSeen& parent, ExecutorSeen& child,
                                  ExecutorSeen& grandchild, Variant variant) {
  parent.token = CoroutineScope::current();
  net::any_io_executor ex = co_await net::this_coro::executor;
  parent.type = &ex.target_type();
  if (variant == Variant::kTracked) {
    ex = net::prefer(ex, net::execution::outstanding_work.tracked);
  } else if (variant == Variant::kBlockingNever) {
    ex = net::require(ex, net::execution::blocking.never);
  }
  co_await scopereg::asio::co_spawn(ex, reports_its_executor(child, &grandchild),
                                    scopereg::copy_current, use_awaitable);
}

struct ReportingFamily {
  ExecutorSeen parent, child, grandchild;
  Completions done;
};

// Checks what a spawns_a_reporter parent's child and grandchild ran on: each a
// TaskExecutor<any_io_executor> over an executor of type Inner, whose untracked form is
// `expected_untracked` (so that the test keeps no work counted while the context runs).
template <typename Inner, typename Untracked>
void expect_children_on(ReportingFamily& f, const Untracked& expected_untracked,
                        const std::type_info& parent_type) {
  EXPECT_EQ(f.done.ok.load(), 1) << f.done.errors;
  ASSERT_NE(f.parent.type, nullptr);
  EXPECT_TRUE(*f.parent.type == parent_type) << f.parent.type->name();
  for (ExecutorSeen* seen : {&f.child, &f.grandchild}) {
    ASSERT_TRUE(seen->ran);
    EXPECT_FALSE(seen->token.is_null());
    EXPECT_NE(seen->token, f.parent.token);
    ASSERT_NE(seen->type, nullptr);
    EXPECT_TRUE(*seen->type == typeid(AnyTaskExecutor)) << seen->type->name();
    ASSERT_NE(seen->inner_type, nullptr);
    EXPECT_TRUE(*seen->inner_type == typeid(Inner))
        << seen->inner_type->name() << " (expected " << typeid(Inner).name() << ")";
    ASSERT_TRUE(seen->inner_untracked);
    const Untracked* target = checked_target<Untracked>(*seen->inner_untracked);
    ASSERT_NE(target, nullptr) << seen->inner_untracked->target_type().name();
    EXPECT_TRUE(*target == expected_untracked);
    seen->inner_untracked.reset();
  }
  EXPECT_NE(f.child.token, f.grandchild.token);
}

// The parent's inner executor, for each kind of parent executor co_spawn recognises in an
// any_io_executor: io_context's executor, its work-tracking and blocking.never variants
// (what prefer() and require() make of the task's executor), a strand of it, an
// any_io_executor over either; and the grandchild's, spawned on the child's executor (a
// TaskExecutor<any_io_executor>).
TEST(AsioChildren, AChildRunsOnItsParentsInnerExecutor) {
  using Io = net::io_context::executor_type;
  using TrackedIo = std::decay_t<decltype(net::prefer(
      std::declval<const Io&>(), net::execution::outstanding_work.tracked))>;
  using NeverBlockingIo = std::decay_t<decltype(net::require(
      std::declval<const Io&>(), net::execution::blocking.never))>;
  static_assert(!std::is_same_v<TrackedIo, Io>);  // (blocking.never: a run-time bit in Asio 1.18)
  net::io_context io;
  const auto strand = net::make_strand(io.get_executor());
  using IoStrand = std::decay_t<decltype(strand)>;
  auto run = [&](const auto& spawn_on, Variant variant, ReportingFamily& f) {
    scopereg::asio::co_spawn(spawn_on,
                             spawns_a_reporter(f.parent, f.child, f.grandchild, variant),
                             f.done.handler());
    io.restart();
    io.run();
  };
  {
    SCOPED_TRACE("io_context's executor");
    ReportingFamily f;
    run(io.get_executor(), Variant::kAsIs, f);
    expect_children_on<Io>(f, io.get_executor(), typeid(scopereg::asio::TaskExecutor<Io>));
  }
  {
    SCOPED_TRACE("its work-tracking variant");
    ReportingFamily f;
    run(io.get_executor(), Variant::kTracked, f);
    expect_children_on<TrackedIo>(f, io.get_executor(),
                                  typeid(scopereg::asio::TaskExecutor<Io>));
  }
  {
    SCOPED_TRACE("its blocking.never variant");
    ReportingFamily f;
    run(io.get_executor(), Variant::kBlockingNever, f);
    expect_children_on<NeverBlockingIo>(
        f, net::require(io.get_executor(), net::execution::blocking.never),
        typeid(scopereg::asio::TaskExecutor<Io>));
  }
  {
    SCOPED_TRACE("a strand");
    ReportingFamily f;
    run(strand, Variant::kAsIs, f);
    expect_children_on<IoStrand>(f, strand, typeid(scopereg::asio::TaskExecutor<IoStrand>));
  }
  {
    SCOPED_TRACE("an any_io_executor");
    ReportingFamily f;
    run(net::any_io_executor(io.get_executor()), Variant::kAsIs, f);
    expect_children_on<Io>(f, io.get_executor(), typeid(AnyTaskExecutor));
  }
  {
    SCOPED_TRACE("an any_io_executor over a strand");
    ReportingFamily f;
    run(net::any_io_executor(strand), Variant::kAsIs, f);
    expect_children_on<IoStrand>(f, strand, typeid(AnyTaskExecutor));
  }
}

// The same on a thread_pool, with its work-tracking variant and a strand.
TEST(AsioChildren, AChildRunsOnItsParentsInnerExecutorOnAThreadPool) {
  using Pool = net::thread_pool::executor_type;
  using TrackedPool = std::decay_t<decltype(net::prefer(
      std::declval<const Pool&>(), net::execution::outstanding_work.tracked))>;
  using PoolStrand = net::strand<Pool>;
  for (int kind = 0; kind < 3; ++kind) {
    SCOPED_TRACE(::testing::Message() << "kind " << kind);
    ReportingFamily f;
    net::thread_pool pool(2);
    const PoolStrand strand = net::make_strand(pool.get_executor());
    if (kind == 2) {
      scopereg::asio::co_spawn(
          strand, spawns_a_reporter(f.parent, f.child, f.grandchild, Variant::kAsIs),
          f.done.handler());
    } else {
      scopereg::asio::co_spawn(
          pool.get_executor(),
          spawns_a_reporter(f.parent, f.child, f.grandchild,
                            kind == 1 ? Variant::kTracked : Variant::kAsIs),
          f.done.handler());
    }
    pool.join();
    if (kind == 0) {
      expect_children_on<Pool>(f, pool.get_executor(), typeid(PoolTaskExecutor));
    } else if (kind == 1) {
      expect_children_on<TrackedPool>(f, pool.get_executor(), typeid(PoolTaskExecutor));
    } else {
      expect_children_on<PoolStrand>(f, strand,
                                     typeid(scopereg::asio::TaskExecutor<PoolStrand>));
    }
  }
}

// A task whose coroutine is typed to its TaskExecutor spawns a child typed likewise: the
// child's executor is a TaskExecutor over the io_context's executor (the parent's inner
// one), not over the parent's TaskExecutor (which the child's type could not hold).
awaitable<void, IoTaskExecutor> typed_child(Tally& t, ScopeToken parent, IoExecutor io_ex) {
  IoTaskExecutor ex = co_await net::this_coro::executor;
  t.expect(ex.get_inner_executor() == io_ex);
  t.expect(!CoroutineScope::current().is_null());
  t.expect(ex.task().token() == CoroutineScope::current());
  t.expect(CoroutineScope::current() != parent);
  co_return;
}

awaitable<void, IoTaskExecutor> typed_parent(Tally& t, IoExecutor io_ex) {
  IoTaskExecutor ex = co_await net::this_coro::executor;
  const ScopeToken me = CoroutineScope::current();
  co_await scopereg::asio::co_spawn(ex, typed_child(t, me, io_ex), scopereg::copy_current,
                                    net::use_awaitable_t<IoTaskExecutor>{});
  t.expect(CoroutineScope::current() == me);
}

TEST(AsioChildren, AChildOfATaskTypedToItsTaskExecutor) {
  Tally t;
  Completions done;
  {
    net::io_context io;
    scopereg::asio::co_spawn(io.get_executor(), typed_parent(t, io.get_executor()),
                             done.handler());
    io.run();
  }
  EXPECT_EQ(done.ok.load(), 1) << done.errors;
  EXPECT_EQ(t.checks.load(), 5);
  EXPECT_EQ(t.wrong.load(), 0);
}

// (asio.h, Limits) A TaskExecutor whose inner executor co_spawn does not know -- here
// io_context's executor with an allocator of the test's own -- is not taken off an
// any_io_executor: the child's executor keeps it inside. The documented workaround,
// the parent's inner executor given to co_spawn, starts the child on it.
using TagIoExecutor = net::io_context::basic_executor_type<TagAllocator<void>, 0>;

awaitable<void> spawns_with_and_without_the_workaround(ExecutorSeen& plain,
                                                       ExecutorSeen& workaround) {
  const net::any_io_executor ex = co_await net::this_coro::executor;
  co_await scopereg::asio::co_spawn(ex, reports_its_executor(plain, nullptr),
                                    scopereg::copy_current, use_awaitable);
  using TagTaskExecutor = scopereg::asio::TaskExecutor<TagIoExecutor>;
  if (const TagTaskExecutor* te = checked_target<TagTaskExecutor>(ex)) {
    co_await scopereg::asio::co_spawn(te->get_inner_executor(),
                                      reports_its_executor(workaround, nullptr),
                                      scopereg::copy_current, use_awaitable);
  }
}

TEST(AsioLimits, ATaskExecutorOverAnUnrecognisedExecutorIsNotUnwrapped) {
  ExecutorSeen plain, workaround;
  Completions done;
  {
    net::io_context io;
    const TagIoExecutor tagged =
        net::require(io.get_executor(), net::execution::allocator(TagAllocator<void>(5)));
    scopereg::asio::co_spawn(tagged, spawns_with_and_without_the_workaround(plain, workaround),
                             done.handler());
    io.run();
    plain.inner_untracked.reset();
  }
  EXPECT_EQ(done.ok.load(), 1) << done.errors;
  ASSERT_TRUE(plain.ran);
  ASSERT_NE(plain.inner_type, nullptr);
  EXPECT_TRUE(*plain.inner_type == typeid(scopereg::asio::TaskExecutor<TagIoExecutor>))
      << "the limit is gone: update asio.h's Limits (" << plain.inner_type->name() << ")";
  ASSERT_TRUE(workaround.ran);
  ASSERT_NE(workaround.type, nullptr);
  EXPECT_TRUE(*workaround.type == typeid(scopereg::asio::TaskExecutor<TagIoExecutor>))
      << workaround.type->name();
  EXPECT_NE(workaround.token, plain.token);
}

// ---------------------------------------------------------------------------------------
// 14. co_spawn(ex, body, teardown, token): a teardown without a start (fresh_scope)
// ---------------------------------------------------------------------------------------

struct TeardownSeen {
  bool ran = false;
  bool null_error = false;
  std::string error;
  ScopeToken token;
  int value = 0;
  bool outside_value_visible = true;
};

awaitable<int> sets_then_maybe_throws(TaskVar<int>& var, ScopeToken& task, bool fail) {
  task = CoroutineScope::current();
  var.set(21);
  co_await sleep_ms(0);
  if (fail) throw std::runtime_error("the task failed");
  co_return 3;
}

TEST(AsioTeardown, TeardownWithoutAStartRunsInAFreshScope) {
  TaskVar<int> var([] { return -1; });
  ExplicitVar<int> expl([] { return -1; });
  ScopeToken task_ok, task_failed;
  TeardownSeen ok, failed;
  auto teardown = [&](TeardownSeen& seen) {
    return [&, s = &seen](std::exception_ptr e) {
      s->ran = true;
      s->null_error = !e;
      s->error = describe(e);
      s->token = CoroutineScope::current();
      s->value = value_of(var.find());
      s->outside_value_visible = expl.find() != nullptr;
    };
  };
  std::exception_ptr ok_error = std::make_exception_ptr(0);
  int result = 0;
  std::string failed_error;
  {
    ScopeGuard outside(std::string("outside"));  // copy_current would see its value
    expl.set(4);
    net::io_context io;
    scopereg::asio::co_spawn(io.get_executor(), sets_then_maybe_throws(var, task_ok, false),
                             teardown(ok), [&](std::exception_ptr e, int r) {
                               ok_error = e;
                               result = r;
                             });
    scopereg::asio::co_spawn(io.get_executor(), sets_then_maybe_throws(var, task_failed, true),
                             teardown(failed),
                             [&](std::exception_ptr e, int) { failed_error = describe(e); });
    io.run();
  }
  EXPECT_FALSE(ok_error) << describe(ok_error);
  EXPECT_EQ(result, 3);
  EXPECT_TRUE(ok.ran);
  EXPECT_TRUE(ok.null_error) << ok.error;  // null on success
  EXPECT_FALSE(task_ok.is_null());
  EXPECT_EQ(ok.token, task_ok);  // in the task's scope, its value still there
  EXPECT_EQ(ok.value, 21);
  EXPECT_FALSE(ok.outside_value_visible);  // a fresh scope, not a copy of the caller's
  EXPECT_TRUE(failed.ran);
  EXPECT_FALSE(failed.null_error);
  EXPECT_EQ(failed.error, "the task failed");
  EXPECT_EQ(failed.token, task_failed);
  EXPECT_EQ(failed.value, 21);
  EXPECT_FALSE(failed.outside_value_visible);
  EXPECT_EQ(failed_error, "the task failed");
  EXPECT_EQ(var.size(), 0);
}

// ---------------------------------------------------------------------------------------
// Death tests
// ---------------------------------------------------------------------------------------

awaitable<void> keeps_its_executor(std::optional<net::any_io_executor>& kept) {
  kept = co_await net::this_coro::executor;
}

TEST(AsioExecutorDeathTest, TaskOfAnEndedTasksExecutorAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  std::optional<net::any_io_executor> kept;
  net::io_context io;
  scopereg::asio::co_spawn(io.get_executor(), keeps_its_executor(kept), net::detached);
  io.run();
  ASSERT_TRUE(kept);
  const auto* ex = kept->target<scopereg::asio::TaskExecutor<net::io_context::executor_type>>();
  ASSERT_NE(ex, nullptr);
  EXPECT_DEATH((void)ex->task(), "task\\(\\) was called after its task ended");
}

}  // namespace
}  // namespace scopereg
