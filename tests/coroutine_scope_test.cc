// Coroutine task scopes (scopereg/coroutine_scope.h) with coroutine types written here, as
// a user of the core library would (no Boost):
//
// * Task: a lazy coroutine whose promise derives from scopereg::TaskScopePromise (the
//   documented small step). It adds only final_suspend, through scoped_final, to hand the
//   thread to an awaiting parent (symmetric transfer) or to tell a Join it finished. A Task
//   co_awaits another Task (a child) or schedule_on(pool[, worker]).
// * Eager: a detached coroutine whose promise chooses its own awaiters, the documented step
//   for a custom promise: initial_suspend = scoped_initial(suspend_never) (it starts at
//   once, on the creating thread), final_suspend = scoped_final(suspend_never) (its frame
//   is destroyed where it ends) and await_transform = scoped_await(my_transform(a)).
// * Pool: two hand-written worker threads, each with its own queue, so that a hop to the
//   other worker is a migration for certain (exact counts, nothing timed).
//
// Registries: ScopedRegistry<T, CoroutineScope> (one value per task) next to
// ScopedRegistry<T, ExplicitScope> (the task's innermost guard, else its own scope).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "scopereg/coroutine_scope.h"
#include "scopereg/error.h"
#include "scopereg/explicit_scope.h"
#include "scopereg/scope_switch.h"
#include "scopereg/scoped_registry.h"
#include "counted.h"

namespace scopereg {
namespace {

using testing::Counted;
using testing::Counts;
using ThreadId = std::thread::id;
using RequestId = TypedToken<struct CoroutineRequestIdTag>;

ThreadId this_thread() { return std::this_thread::get_id(); }

// ---------------------------------------------------------------------------------------
// A two-thread pool with one queue per worker.
// ---------------------------------------------------------------------------------------

class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 0; i < threads; ++i) workers_.push_back(std::make_unique<Worker>());
    for (auto& w : workers_) {
      Worker* worker = w.get();
      worker->thread = std::thread([worker] { work(*worker); });
      ids_.push_back(worker->thread.get_id());
    }
  }
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;
  ~Pool() {
    for (auto& w : workers_) {
      {
        std::lock_guard<std::mutex> lock(w->mu);
        w->stop = true;
      }
      w->cv.notify_all();
    }
    for (auto& w : workers_) w->thread.join();
  }

  int size() const { return static_cast<int>(workers_.size()); }
  ThreadId id(int worker) const { return ids_[worker]; }
  // The calling thread's worker index, or -1.
  int index_of(ThreadId t) const {
    for (int i = 0; i < size(); ++i) {
      if (ids_[i] == t) return i;
    }
    return -1;
  }

  void post(int worker, std::function<void()> f) {
    Worker& w = *workers_[worker];
    {
      std::lock_guard<std::mutex> lock(w.mu);
      w.queue.push_back(std::move(f));
    }
    w.cv.notify_one();
  }
  // Any worker (round robin).
  void post(std::function<void()> f) {
    post(static_cast<int>(next_.fetch_add(1) % workers_.size()), std::move(f));
  }

  // Runs f on `worker` (outside any coroutine) and returns its result.
  template <typename F>
  auto run_on(int worker, F f) {
    using R = decltype(f());
    auto task = std::make_shared<std::packaged_task<R()>>(std::move(f));
    std::future<R> result = task->get_future();
    post(worker, [task] { (*task)(); });
    return result.get();
  }

 private:
  struct Worker {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<std::function<void()>> queue;
    bool stop = false;
    std::thread thread;
  };
  static void work(Worker& w) {
    for (;;) {
      std::function<void()> f;
      {
        std::unique_lock<std::mutex> lock(w.mu);
        w.cv.wait(lock, [&] { return w.stop || !w.queue.empty(); });
        if (w.queue.empty()) return;
        f = std::move(w.queue.front());
        w.queue.pop_front();
      }
      f();
    }
  }

  std::vector<std::unique_ptr<Worker>> workers_;
  std::vector<ThreadId> ids_;
  std::atomic<unsigned> next_{0};
};

// ---------------------------------------------------------------------------------------
// schedule_on(pool[, worker]): resumes the awaiting coroutine on a pool thread. The awaiter
// keeps a registry of live instances, so that an awaiter used after its destruction (held
// by a dangling reference) is counted instead of read: await_ready() then returns true
// (the coroutine goes on where it is, without touching the dead object's members).
// ---------------------------------------------------------------------------------------

struct AwaiterLives {
  std::mutex mu;
  std::set<const void*> live;
  std::atomic<int> dead_uses{0};
};
AwaiterLives& awaiter_lives() {
  static AwaiterLives* lives = new AwaiterLives;
  return *lives;
}

class ScheduleOn {
 public:
  ScheduleOn(Pool& pool, int worker) : pool_(&pool), worker_(worker) { born(); }
  ScheduleOn(const ScheduleOn& other) : pool_(other.pool_), worker_(other.worker_) { born(); }
  ScheduleOn& operator=(const ScheduleOn&) = delete;
  ~ScheduleOn() {
    AwaiterLives& lives = awaiter_lives();
    std::lock_guard<std::mutex> lock(lives.mu);
    lives.live.erase(this);
  }

  bool await_ready() const {
    if (!alive()) {
      ++awaiter_lives().dead_uses;
      return true;
    }
    return false;
  }
  void await_suspend(std::coroutine_handle<> h) const {
    std::function<void()> resume = [h] { h.resume(); };
    if (worker_ < 0) {
      pool_->post(std::move(resume));
    } else {
      pool_->post(worker_, std::move(resume));
    }
  }
  void await_resume() const noexcept {}

 private:
  void born() {
    AwaiterLives& lives = awaiter_lives();
    std::lock_guard<std::mutex> lock(lives.mu);
    lives.live.insert(this);
  }
  bool alive() const {
    AwaiterLives& lives = awaiter_lives();
    std::lock_guard<std::mutex> lock(lives.mu);
    return lives.live.count(this) != 0;
  }
  Pool* pool_;
  int worker_;
};

ScheduleOn schedule_on(Pool& pool) { return ScheduleOn(pool, -1); }
ScheduleOn schedule_on(Pool& pool, int worker) { return ScheduleOn(pool, worker); }

// The worker other than the one running the caller (worker 0 from a non-pool thread).
int other_worker(const Pool& pool) {
  const int here = pool.index_of(this_thread());
  return here < 0 ? 0 : (here + 1) % pool.size();
}

// ---------------------------------------------------------------------------------------
// Join: a counter and a condition variable; tasks report when they end.
// ---------------------------------------------------------------------------------------

class Join {
 public:
  void add() {
    std::lock_guard<std::mutex> lock(mu_);
    ++pending_;
  }
  void done() {
    std::lock_guard<std::mutex> lock(mu_);
    if (--pending_ == 0) cv_.notify_all();  // under the lock: the joiner may go at once
  }
  void fail(std::exception_ptr e) {
    std::lock_guard<std::mutex> lock(mu_);
    errors_.push_back(std::move(e));
  }
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return pending_ == 0; });
  }
  std::size_t errors() {
    std::lock_guard<std::mutex> lock(mu_);
    return errors_.size();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int pending_ = 0;
  std::vector<std::exception_ptr> errors_;
};

// ---------------------------------------------------------------------------------------
// Task: a promise deriving from TaskScopePromise.
// ---------------------------------------------------------------------------------------

class Task {
 public:
  struct promise_type;
  using Handle = std::coroutine_handle<promise_type>;

  // The final awaiter (wrapped by scoped_final): to the awaiting parent by symmetric
  // transfer, else tell the Join.
  struct FinalStep {
    bool await_ready() const noexcept { return false; }
    std::coroutine_handle<> await_suspend(Handle h) const noexcept {
      promise_type& p = h.promise();
      if (p.continuation) return p.continuation;
      if (Join* join = p.join) join->done();  // from here on the joiner may destroy the frame
      return std::noop_coroutine();
    }
    void await_resume() const noexcept {}
  };

  struct promise_type : TaskScopePromise {
    // The default start: a copy of the creator's current scope.
    promise_type() = default;
    // A coroutine whose first parameter is a start takes its scope from it.
    template <typename... Rest>
    explicit promise_type(CopyCurrentTag start, Rest&...) : TaskScopePromise(start) {}
    template <typename... Rest>
    explicit promise_type(ShareCurrentTag start, Rest&...) : TaskScopePromise(start) {}
    template <typename... Rest>
    explicit promise_type(FreshScopeTag start, Rest&...) : TaskScopePromise(start) {}
    template <typename... Rest>
    explicit promise_type(CapturedScope& start, Rest&...) : TaskScopePromise(start) {}

    Task get_return_object() { return Task(Handle::from_promise(*this)); }
    // initial_suspend (suspend_always) and await_transform come from the mixin.
    auto final_suspend() noexcept { return scoped_final(FinalStep{}); }
    void return_void() noexcept {}
    void unhandled_exception() noexcept { error = std::current_exception(); }

    std::coroutine_handle<> continuation;
    Join* join = nullptr;
    std::exception_ptr error;
  };

  Task(Task&& other) noexcept : h_(std::exchange(other.h_, {})) {}
  Task& operator=(Task&&) = delete;
  ~Task() { destroy(); }

  Handle handle() const { return h_; }
  bool done() const { return h_.done(); }
  void resume() const { h_.resume(); }
  void destroy() {
    if (h_) std::exchange(h_, {}).destroy();
  }
  std::exception_ptr error() const { return h_.promise().error; }
  TaskScope& scope() const { return h_.promise().task_scope(); }

  // Starts the task on `worker`; `join` is told when it ends (its frame stays until the
  // Task is destroyed).
  void start_on(Pool& pool, int worker, Join& join) {
    h_.promise().join = &join;
    join.add();
    pool.post(worker, [h = h_] { h.resume(); });
  }

  // co_await child: runs the child at once (symmetric transfer); the awaiting coroutine
  // resumes where the child ends, and gets its exception.
  auto operator co_await() && noexcept {
    struct Awaiter {
      Handle child;
      bool await_ready() const noexcept { return false; }
      std::coroutine_handle<> await_suspend(std::coroutine_handle<> parent) const noexcept {
        child.promise().continuation = parent;
        return child;
      }
      void await_resume() const {
        if (child.promise().error) std::rethrow_exception(child.promise().error);
      }
    };
    return Awaiter{h_};
  }

 private:
  explicit Task(Handle h) : h_(h) {}
  Handle h_;
};

// Runs every task on the pool (alternating start workers) and waits for all to end.
void run_all(Pool& pool, std::vector<Task>& tasks) {
  Join join;
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    tasks[i].start_on(pool, static_cast<int>(i % pool.size()), join);
  }
  join.wait();
}

// Resumes hand-driven tasks round robin until all are done; `between` runs after each
// resumption, on the calling thread, outside any task.
template <typename F>
void resume_round_robin(std::vector<Task>& tasks, F between) {
  for (bool any = true; any;) {
    any = false;
    for (Task& t : tasks) {
      if (t.done()) continue;
      t.resume();
      between();
      any = true;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Ticket: an awaitable that is not an awaiter. Its operator co_await() && returns an
// awaiter that refers to the Ticket (as cppcoro's when_all_ready does), so the Ticket must
// live as long as its awaiter. The awaiter reads the Ticket's fields in await_ready,
// await_suspend and await_resume; live Tickets are registered (as ScheduleOn's awaiters
// are), so that a use of a destroyed Ticket is counted instead of read (await_ready then
// returns true and await_resume kDestroyed). A destroyed Ticket's value is overwritten
// with kDestroyed, so a read through a reused address is seen as a wrong value too.
// ---------------------------------------------------------------------------------------

AwaiterLives& ticket_lives() {
  static AwaiterLives* lives = new AwaiterLives;
  return *lives;
}

class Ticket {
 public:
  static constexpr int kDestroyed = -1;

  // `park`: where await_suspend leaves the coroutine's handle; null: ready at once.
  Ticket(int value, std::coroutine_handle<>* park) : value_(value), park_(park) { born(); }
  Ticket(Ticket&& other) noexcept : value_(other.value_), park_(other.park_) { born(); }
  Ticket& operator=(Ticket&&) = delete;
  ~Ticket() {
    value_ = kDestroyed;
    AwaiterLives& lives = ticket_lives();
    std::lock_guard<std::mutex> lock(lives.mu);
    lives.live.erase(this);
  }

  class Awaiter {
   public:
    explicit Awaiter(Ticket& ticket) : ticket_(&ticket) {}
    bool await_ready() const {
      const Ticket* t = live();
      return t == nullptr || t->park_ == nullptr;
    }
    bool await_suspend(std::coroutine_handle<> h) const {
      const Ticket* t = live();
      if (t == nullptr) return false;  // goes on at once
      *t->park_ = h;
      return true;
    }
    int await_resume() const {
      const Ticket* t = live();
      return t != nullptr ? t->value_ : kDestroyed;
    }

   private:
    const Ticket* live() const {
      AwaiterLives& lives = ticket_lives();
      std::lock_guard<std::mutex> lock(lives.mu);
      if (lives.live.count(ticket_) == 0) {
        ++lives.dead_uses;
        return nullptr;
      }
      return ticket_;
    }
    Ticket* ticket_;
  };
  Awaiter operator co_await() && { return Awaiter(*this); }

 private:
  void born() {
    AwaiterLives& lives = ticket_lives();
    std::lock_guard<std::mutex> lock(lives.mu);
    lives.live.insert(this);
  }
  int value_;
  std::coroutine_handle<>* park_;
};

std::size_t live_tickets() {
  AwaiterLives& lives = ticket_lives();
  std::lock_guard<std::mutex> lock(lives.mu);
  return lives.live.size();
}

// Not an awaitable by itself: Eager's await_transform makes it a Ticket, by value.
struct TicketFor {
  int value;
  std::coroutine_handle<>* park;
};

// ---------------------------------------------------------------------------------------
// Eager: the documented step for a promise with its own awaiters.
// ---------------------------------------------------------------------------------------

// Not an awaitable by itself: Eager's await_transform makes it schedule_on(pool, worker).
struct Hop {
  int worker;
};

std::atomic<int> g_eager_transforms{0};

class Eager {
 public:
  // Tells the Join after the whole promise (and with it the task's scope and values) is
  // gone: a base declared before TaskScopePromise is destroyed after it.
  struct Signal {
    explicit Signal(Join& join) : join_(&join) { join.add(); }
    Signal(const Signal&) = delete;
    Signal& operator=(const Signal&) = delete;
    ~Signal() { join_->done(); }
    Join* join_;
  };

  struct promise_type : Signal, TaskScopePromise {
    template <typename... Rest>
    promise_type(Pool& pool, Join& join, Rest&...) : Signal(join), pool_(&pool) {}

    Eager get_return_object() noexcept { return Eager(); }
    auto initial_suspend() noexcept { return scoped_initial(std::suspend_never{}); }
    auto final_suspend() noexcept { return scoped_final(std::suspend_never{}); }
    template <typename A>
    auto await_transform(A&& a) {
      ++g_eager_transforms;
      return scoped_await(my_transform(std::forward<A>(a)));
    }
    void return_void() noexcept {}
    void unhandled_exception() noexcept { join_->fail(std::current_exception()); }

   private:
    ScheduleOn my_transform(Hop hop) { return schedule_on(*pool_, hop.worker); }
    Ticket my_transform(TicketFor t) { return Ticket(t.value, t.park); }
    template <typename A>
    A&& my_transform(A&& a) {
      return std::forward<A>(a);
    }
    Pool* pool_;
  };
};

// ---------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------

// One registry of each strategy, values Counted (built in place by create/set, or by the
// factory with a fresh serial id).
struct Regs {
  Counts counts;
  std::atomic<int> serial{1000000};
  ScopedRegistry<Counted, CoroutineScope> coro{[this] { return Counted(counts, ++serial); }};
  ScopedRegistry<Counted, ExplicitScope> expl{[this] { return Counted(counts, ++serial); }};
};

// Records, per id, how many times and on which thread values were destroyed.
class DeathLog {
 public:
  void record(int id) {
    std::lock_guard<std::mutex> lock(mu_);
    ++times_[id];
    where_[id] = this_thread();
  }
  int times(int id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = times_.find(id);
    return it == times_.end() ? 0 : it->second;
  }
  ThreadId where(int id) {
    std::lock_guard<std::mutex> lock(mu_);
    return where_[id];
  }
  int total() {
    std::lock_guard<std::mutex> lock(mu_);
    int n = 0;
    for (const auto& [id, t] : times_) n += t;
    return n;
  }

 private:
  std::mutex mu_;
  std::map<int, int> times_;
  std::map<int, ThreadId> where_;
};

class Tracked {
 public:
  Tracked(DeathLog& log, int id) : log_(log), id_(id) {}
  Tracked(const Tracked&) = delete;
  Tracked& operator=(const Tracked&) = delete;
  ~Tracked() { log_.record(id_); }
  int id() const { return id_; }

 private:
  DeathLog& log_;
  int id_;
};

struct TrackedRegs {
  DeathLog log;
  ScopedRegistry<Tracked, CoroutineScope> coro{[this] { return Tracked(log, -1); }};
  ScopedRegistry<Tracked, ExplicitScope> expl{[this] { return Tracked(log, -2); }};
};

// ---------------------------------------------------------------------------------------
// 1. Many tasks hopping between the two workers.
// ---------------------------------------------------------------------------------------

struct HopStats {
  std::atomic<int> checks{0};
  std::atomic<int> wrong{0};
  std::atomic<int> migrations{0};
};

Task hopper(Pool& pool, Regs& r, int id, int hops, HopStats& s, ScopeToken& token) {
  const ThreadId started = this_thread();
  token = CoroutineScope::current();
  if (token.is_null() || ExplicitScope::current() != token) ++s.wrong;
  Counted* mine = &r.coro.create(r.counts, id);
  Counted* mine_explicit = &r.expl.create(r.counts, -id);
  auto check = [&] {
    ++s.checks;
    if (&r.coro() != mine || r.coro().id() != id) ++s.wrong;
    if (&r.expl() != mine_explicit || r.expl().id() != -id) ++s.wrong;
    if (CoroutineScope::current() != token || ExplicitScope::current() != token) ++s.wrong;
  };
  ThreadId before = started;
  for (int k = 0; k < hops; ++k) {
    check();
    co_await schedule_on(pool, other_worker(pool));  // always the other thread
    check();
    if (this_thread() != before) ++s.migrations;
    before = this_thread();
  }
  co_await schedule_on(pool);  // any worker
  check();
}

TEST(CoroutineScope, ManyTasksHoppingThreadsKeepTheirOwnValues) {
  constexpr int kTasks = 300;
  constexpr int kHops = 5;
  const int dead_before = awaiter_lives().dead_uses.load();
  Regs r;
  HopStats s;
  std::vector<ScopeToken> tokens(kTasks);
  {
    Pool pool(2);
    std::vector<Task> tasks;
    for (int i = 1; i <= kTasks; ++i) {
      tasks.push_back(hopper(pool, r, i, kHops, s, tokens[i - 1]));
    }
    EXPECT_EQ(r.counts.made.load(), 0);  // lazy: nothing ran yet
    run_all(pool, tasks);
    for (Task& t : tasks) {
      EXPECT_TRUE(t.done());
      EXPECT_FALSE(t.error());
    }
    EXPECT_EQ(s.wrong.load(), 0);
    EXPECT_EQ(s.checks.load(), kTasks * (2 * kHops + 1));
    EXPECT_EQ(s.migrations.load(), kTasks * kHops);  // every hop went to the other thread
    EXPECT_GT(s.migrations.load(), 0);
    EXPECT_EQ(r.counts.made.load(), 2 * kTasks);
    // A finished task's frame still holds its scope: the values are alive until then.
    EXPECT_EQ(r.counts.alive(), 2 * kTasks);
    EXPECT_EQ(std::set<ScopeToken>(tokens.begin(), tokens.end()).size(),
              static_cast<std::size_t>(kTasks));
    // The pool threads run no task now.
    for (int w = 0; w < pool.size(); ++w) {
      EXPECT_FALSE(pool.run_on(w, [] { return CoroutineScope::active(); }));
      EXPECT_FALSE(pool.run_on(w, [] { return ExplicitScope::active(); }));
    }
  }
  EXPECT_EQ(r.counts.alive(), 0);
  EXPECT_EQ(r.counts.destroyed.load(), 2 * kTasks);
  EXPECT_EQ(awaiter_lives().dead_uses.load() - dead_before, 0);
}

// ---------------------------------------------------------------------------------------
// 2. Plain functions called by the coroutine see the task's values.
// ---------------------------------------------------------------------------------------

// Plain (non-coroutine) code: the registries' current values, created on first use.
const Counted* coroutine_value(Regs& r) { return &r.coro(); }
const Counted* explicit_value(Regs& r) { return &r.expl(); }
std::pair<const Counted*, const Counted*> both_values_two_calls_deep(Regs& r) {
  return {coroutine_value(r), explicit_value(r)};
}

Task calls_plain_functions(Pool& pool, Regs& r, std::atomic<int>& wrong,
                           std::vector<const Counted*>& seen) {
  // Created by plain code, through the factories.
  const Counted* c = coroutine_value(r);
  const Counted* e = explicit_value(r);
  if (c == e) ++wrong;  // two registries, two values
  seen.push_back(c);
  for (int k = 0; k < 4; ++k) {
    co_await schedule_on(pool, other_worker(pool));
    const auto [c2, e2] = both_values_two_calls_deep(r);
    if (c2 != c || e2 != e) ++wrong;
    if (&r.coro() != c || &r.expl() != e) ++wrong;  // and the coroutine itself agrees
    if (r.coro.find() != c || !r.expl.has()) ++wrong;
  }
}

TEST(CoroutineScope, PlainFunctionsCalledByTheTaskSeeItsValues) {
  constexpr int kTasks = 40;
  Regs r;
  std::atomic<int> wrong{0};
  std::vector<std::vector<const Counted*>> seen(kTasks);
  {
    Pool pool(2);
    std::vector<Task> tasks;
    for (int i = 0; i < kTasks; ++i) tasks.push_back(calls_plain_functions(pool, r, wrong, seen[i]));
    run_all(pool, tasks);
    EXPECT_EQ(wrong.load(), 0);
    std::set<const Counted*> distinct;
    for (const auto& s : seen) {
      ASSERT_EQ(s.size(), 1u);
      distinct.insert(s[0]);
    }
    EXPECT_EQ(distinct.size(), static_cast<std::size_t>(kTasks));  // one value per task
    EXPECT_EQ(r.counts.made.load(), 2 * kTasks);
  }
  EXPECT_EQ(r.counts.alive(), 0);
}

// ---------------------------------------------------------------------------------------
// 3. Tasks interleaved by hand on one thread, each with a guard held across suspensions.
// ---------------------------------------------------------------------------------------

Task interleaved(Regs& r, int id, int rounds, std::atomic<int>& wrong, ScopeToken& own) {
  own = CoroutineScope::current();
  r.coro.create(r.counts, id);
  r.expl.create(r.counts, 1000 + id);  // in the task's own scope
  {
    ScopeGuard guard(RequestId{static_cast<std::uint64_t>(3000 + id)});
    const ScopeToken guard_token = guard.token();
    r.expl.create(r.counts, 2000 + id);  // in the guard's scope
    for (int k = 0; k < rounds; ++k) {
      co_await std::suspend_always{};
      if (r.coro().id() != id) ++wrong;
      if (r.expl().id() != 2000 + id) ++wrong;
      if (ExplicitScope::current() != guard_token) ++wrong;
      if (CoroutineScope::current() != own) ++wrong;  // guards do not change it
    }
  }
  co_await std::suspend_always{};
  if (r.expl().id() != 1000 + id || ExplicitScope::current() != own) ++wrong;
  if (r.coro().id() != id) ++wrong;
}

TEST(CoroutineScope, TasksInterleavedOnOneThreadEachSeeTheirOwnValuesAndGuards) {
  constexpr int kTasks = 6;
  constexpr int kRounds = 5;
  Regs r;
  std::atomic<int> wrong{0};
  std::vector<ScopeToken> own(kTasks);
  std::vector<Task> tasks;
  for (int i = 0; i < kTasks; ++i) tasks.push_back(interleaved(r, i + 1, kRounds, wrong, own[i]));
  int outside_checks = 0;
  resume_round_robin(tasks, [&] {
    ++outside_checks;
    // Between resumptions this thread runs no task and has no scope.
    EXPECT_FALSE(CoroutineScope::active());
    EXPECT_TRUE(CoroutineScope::current().is_null());
    EXPECT_FALSE(ExplicitScope::active());
    EXPECT_EQ(r.coro.find(), nullptr);
    EXPECT_EQ(r.expl.find(), nullptr);
  });
  EXPECT_EQ(outside_checks, kTasks * (kRounds + 2));
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(std::set<ScopeToken>(own.begin(), own.end()).size(),
            static_cast<std::size_t>(kTasks));
  // Each guard's scope ended with its guard; the task's own values are alive until the
  // frames go.
  EXPECT_EQ(r.counts.made.load(), 3 * kTasks);
  EXPECT_EQ(r.counts.alive(), 2 * kTasks);
  tasks.clear();
  EXPECT_EQ(r.counts.alive(), 0);

  // Outside any task, CoroutineScope's get-or-create says what to do.
  try {
    r.coro();
    ADD_FAILURE() << "expected ScopeError";
  } catch (const ScopeError& e) {
    EXPECT_NE(std::string(e.what()).find("CoroutineScope"), std::string::npos) << e.what();
  }
  // Even inside a guard: CoroutineScope follows tasks, not guards.
  ScopeGuard outer(RequestId{3999});
  EXPECT_FALSE(CoroutineScope::active());
  EXPECT_THROW(r.coro(), ScopeError);
  EXPECT_THROW(r.coro.set(r.counts, 1), ScopeError);
  EXPECT_FALSE(r.coro.has());
  r.coro.clear();  // a no-op with no scope
}

// ---------------------------------------------------------------------------------------
// 4. A guard entered before a co_await that migrates, left after it.
// ---------------------------------------------------------------------------------------

struct GuardSeen {
  ScopeToken own;
  ScopeToken guard;
  ThreadId entered_on, left_on;
  int wrong = 0;
};

Task guard_across_migration(Pool& pool, Regs& r, int id, GuardSeen& s) {
  s.own = ExplicitScope::current();
  if (s.own != CoroutineScope::current()) ++s.wrong;
  r.expl.create(r.counts, id);  // the task's own explicit value
  {
    ScopeGuard guard(RequestId{static_cast<std::uint64_t>(4000 + id)});
    s.guard = guard.token();
    s.entered_on = this_thread();
    r.expl.create(r.counts, 10000 + id);  // the guard scope's value
    {
      ScopeGuard inner(RequestId{static_cast<std::uint64_t>(5000 + id)});
      co_await schedule_on(pool, other_worker(pool));
      if (ExplicitScope::current() != inner.token()) ++s.wrong;
      if (r.expl.find() != nullptr) ++s.wrong;  // the inner scope is empty
    }  // left on another thread than where it was entered
    if (ExplicitScope::current() != s.guard) ++s.wrong;
    if (CoroutineScope::current() != s.own) ++s.wrong;
    if (r.expl().id() != 10000 + id) ++s.wrong;
    co_await schedule_on(pool, other_worker(pool));
    if (ExplicitScope::current() != s.guard) ++s.wrong;
    if (r.expl().id() != 10000 + id) ++s.wrong;
    co_await schedule_on(pool, other_worker(pool));
    s.left_on = this_thread();
  }
  if (ExplicitScope::current() != s.own) ++s.wrong;
  if (CoroutineScope::current() != s.own) ++s.wrong;
  if (r.expl().id() != id) ++s.wrong;
}

TEST(CoroutineScope, AGuardHeldAcrossAMigratingCoAwaitIsLeftCorrectly) {
  constexpr int kTasks = 50;
  Regs r;
  std::vector<GuardSeen> seen(kTasks);
  {
    Pool pool(2);
    std::vector<Task> tasks;
    for (int i = 0; i < kTasks; ++i) tasks.push_back(guard_across_migration(pool, r, i, seen[i]));
    run_all(pool, tasks);
    for (int i = 0; i < kTasks; ++i) {
      EXPECT_EQ(seen[i].wrong, 0) << i;
      EXPECT_NE(seen[i].entered_on, seen[i].left_on) << i;  // three hops: the other thread
      EXPECT_FALSE(seen[i].guard.is_null());
      EXPECT_NE(seen[i].guard, seen[i].own);
    }
    // The guards' values ended with them; the tasks' own values live with the frames.
    EXPECT_EQ(r.counts.made.load(), 2 * kTasks);
    EXPECT_EQ(r.counts.alive(), kTasks);
    for (int w = 0; w < pool.size(); ++w) {
      EXPECT_FALSE(pool.run_on(w, [] { return ExplicitScope::active(); }));
    }
  }
  EXPECT_EQ(r.counts.alive(), 0);
}

// ---------------------------------------------------------------------------------------
// 5. Values die with the task's frame, once, on the thread that destroys it.
// ---------------------------------------------------------------------------------------

Task sets_values_and_hops(Pool& pool, TrackedRegs& r, int id) {
  r.coro.set(r.log, id);
  r.expl.set(r.log, -id);
  co_await schedule_on(pool, other_worker(pool));
  co_await schedule_on(pool, other_worker(pool));
}

TEST(CoroutineScope, ValuesAreDestroyedOnceWhereTheFrameIsDestroyed) {
  constexpr int kTasks = 20;
  TrackedRegs r;
  Pool pool(2);
  std::vector<Task> tasks;
  for (int i = 1; i <= kTasks; ++i) tasks.push_back(sets_values_and_hops(pool, r, i));
  run_all(pool, tasks);
  EXPECT_EQ(r.log.total(), 0);  // finished, frames alive: values alive
  // Half the frames destroyed here, half on another thread.
  std::vector<Task> elsewhere;
  for (int i = 0; i < kTasks / 2; ++i) elsewhere.push_back(std::move(tasks[i]));
  ThreadId other;
  std::thread([&] {
    other = this_thread();
    elsewhere.clear();
    EXPECT_FALSE(ExplicitScope::active());
    EXPECT_FALSE(CoroutineScope::active());
  }).join();
  EXPECT_EQ(r.log.total(), kTasks);
  tasks.clear();
  EXPECT_EQ(r.log.total(), 2 * kTasks);
  for (int i = 1; i <= kTasks; ++i) {
    const ThreadId destroyer = i <= kTasks / 2 ? other : this_thread();
    EXPECT_EQ(r.log.times(i), 1) << i;
    EXPECT_EQ(r.log.times(-i), 1) << i;
    EXPECT_EQ(r.log.where(i), destroyer) << i;
    EXPECT_EQ(r.log.where(-i), destroyer) << i;
  }
  EXPECT_FALSE(ExplicitScope::active());
}

Task holds_guard_while_suspended(TrackedRegs& r, int id, bool& resumed_after) {
  r.coro.set(r.log, id);
  r.expl.set(r.log, id + 1);
  ScopeGuard guard(RequestId{static_cast<std::uint64_t>(id)});
  r.expl.set(r.log, id + 2);
  co_await std::suspend_always{};
  resumed_after = true;  // never: the frame is destroyed while suspended
}

TEST(CoroutineScope, ATaskDestroyedWhileSuspendedDestroysItsValuesOnce) {
  TrackedRegs r;
  bool resumed_after = false;
  // Suspended with a guard held; destroyed on another thread.
  {
    Task t = holds_guard_while_suspended(r, 100, resumed_after);
    t.resume();
    EXPECT_FALSE(t.done());
    EXPECT_FALSE(ExplicitScope::active());
    EXPECT_EQ(r.log.total(), 0);
    ThreadId destroyer;
    std::thread([&] {
      {
        ScopeGuard unrelated(RequestId{777});  // the destroying thread's own scope
        t.destroy();
        EXPECT_EQ(ExplicitScope::current(), unrelated.token());
      }
      EXPECT_FALSE(ExplicitScope::active());
      destroyer = this_thread();
    }).join();
    EXPECT_EQ(r.log.total(), 3);
    for (int id : {100, 101, 102}) {
      EXPECT_EQ(r.log.times(id), 1) << id;
      EXPECT_EQ(r.log.where(id), destroyer) << id;
    }
    // The guard's token scope ended with it: entered again, it is empty.
    ScopeGuard again(RequestId{100});
    EXPECT_EQ(r.expl.find(), nullptr);
  }
  // Suspended with a guard held; destroyed on the thread that ran it, inside a guard.
  {
    ScopeGuard outer(RequestId{999});
    Task t = holds_guard_while_suspended(r, 200, resumed_after);
    t.resume();
    EXPECT_EQ(ExplicitScope::current(), outer.token());
    t.destroy();
    EXPECT_EQ(ExplicitScope::current(), outer.token());
    for (int id : {200, 201, 202}) {
      EXPECT_EQ(r.log.times(id), 1) << id;
      EXPECT_EQ(r.log.where(id), this_thread()) << id;
    }
  }
  // Never started: destroyed at its initial suspension; the copy it holds of the creator's
  // scope kept the creator's value alive past the creator's guard.
  {
    std::optional<Task> t;
    {
      ScopeGuard creator(RequestId{300});
      r.expl.set(r.log, 300);
      t.emplace(holds_guard_while_suspended(r, 400, resumed_after));
    }
    EXPECT_EQ(r.log.times(300), 0);  // bound in the task's copy
    t.reset();
    EXPECT_EQ(r.log.times(300), 1);
    EXPECT_EQ(r.log.times(400), 0);  // never created
  }
  EXPECT_FALSE(resumed_after);
  EXPECT_EQ(r.log.total(), 7);
}

// An eager, detached task: its frame is destroyed by its final suspend_never, on the thread
// that runs its end.
Eager eager_values(Pool& pool, [[maybe_unused]] Join& join, TrackedRegs& r, int id, ThreadId& ended_on) {
  r.coro.set(r.log, id);
  r.expl.set(r.log, -id);
  // Operands that are awaiters already (await_transform passes them through); Hop is
  // exercised in AnEagerTaskWithItsOwnAwaitersStartsInACopyOfTheCreatorsScope.
  co_await schedule_on(pool, 1);
  co_await schedule_on(pool, 0);
  co_await schedule_on(pool, 1);
  ended_on = this_thread();
}

TEST(CoroutineScope, AnEagerTaskDestroysItsValuesWhereItEnds) {
  constexpr int kTasks = 10;
  const int dead_before = awaiter_lives().dead_uses.load();
  TrackedRegs r;
  std::vector<ThreadId> ended_on(kTasks + 1);
  Pool pool(2);
  Join join;
  for (int i = 1; i <= kTasks; ++i) eager_values(pool, join, r, i, ended_on[i]);
  join.wait();
  EXPECT_EQ(join.errors(), 0u);
  EXPECT_EQ(r.log.total(), 2 * kTasks);
  for (int i = 1; i <= kTasks; ++i) {
    EXPECT_EQ(r.log.times(i), 1) << i;
    EXPECT_EQ(r.log.times(-i), 1) << i;
    EXPECT_EQ(r.log.where(i), ended_on[i]) << i;
    EXPECT_EQ(r.log.where(-i), ended_on[i]) << i;
    EXPECT_EQ(ended_on[i], pool.id(1)) << i;  // the last hop was to worker 1
  }
  EXPECT_EQ(awaiter_lives().dead_uses.load() - dead_before, 0)
      << "an awaiter made by Eager's await_transform (scoped_await(my_transform(a)), the "
         "documented step) was used after it was destroyed";
}

// ---------------------------------------------------------------------------------------
// 6. Where a task's scope comes from: copy (default), share_current, fresh_scope, a
//    CapturedScope.
// ---------------------------------------------------------------------------------------

struct CopySeen {
  const Counted* first = nullptr;
  int first_id = 0;
  int after_id = 0;
};

Task copy_sibling(Regs& r, int mine, CopySeen& s) {
  s.first = r.expl.find();
  s.first_id = s.first != nullptr ? s.first->id() : 0;
  r.expl.set(r.counts, mine);
  co_await std::suspend_always{};
  s.after_id = r.expl().id();
}

TEST(CoroutineScope, ADefaultTaskGetsACopyOfItsCreatorsScope) {
  Regs r;
  ScopeGuard request(RequestId{60});
  const Counted* mine = &r.expl.create(r.counts, 7);
  CopySeen a, b;
  Task ta = copy_sibling(r, 100, a);
  Task tb = copy_sibling(r, 200, b);
  ta.resume();  // a sets 100
  EXPECT_EQ(&r.expl(), mine);  // not seen by the creator
  tb.resume();  // b sets 200, after a's set
  EXPECT_EQ(a.first, mine);  // the creator's value itself (shared binding)
  EXPECT_EQ(b.first, mine);  // a sibling's set() is not seen
  EXPECT_EQ(a.first_id, 7);
  EXPECT_EQ(b.first_id, 7);
  ta.resume();
  tb.resume();
  EXPECT_TRUE(ta.done() && tb.done());
  EXPECT_EQ(a.after_id, 100);
  EXPECT_EQ(b.after_id, 200);
  EXPECT_EQ(&r.expl(), mine);
  EXPECT_EQ(r.expl().id(), 7);
  EXPECT_EQ(ExplicitScope::current(), request.token());
  EXPECT_EQ(r.counts.made.load(), 3);
  ta.destroy();
  tb.destroy();
  EXPECT_EQ(r.counts.alive(), 1);
  // A later set() by the creator is not seen by a task created before it.
  CopySeen c;
  Task tc = copy_sibling(r, 300, c);
  r.expl.set(r.counts, 8);
  tc.resume();
  EXPECT_EQ(c.first_id, 7);
  EXPECT_EQ(r.expl().id(), 8);
}

struct StartSeen {
  ScopeToken explicit_token;
  ScopeToken coroutine_token;
  const Counted* first = nullptr;
  bool active = false;
};

Task shares(ShareCurrentTag, Regs& r, int mine, StartSeen& s) {
  s.explicit_token = ExplicitScope::current();
  s.coroutine_token = CoroutineScope::current();
  s.first = r.expl.find();
  r.expl.set(r.counts, mine);
  co_return;
}

Task starts_fresh(FreshScopeTag, Regs& r, int mine, StartSeen& s) {
  s.active = ExplicitScope::active() && CoroutineScope::active();
  s.explicit_token = ExplicitScope::current();
  s.coroutine_token = CoroutineScope::current();
  s.first = r.expl.find();
  r.expl.set(r.counts, mine);
  co_return;
}

Task copies_explicitly(CopyCurrentTag, Regs& r, int mine, StartSeen& s) {
  s.explicit_token = ExplicitScope::current();
  s.first = r.expl.find();
  r.expl.set(r.counts, mine);
  co_return;
}

Task runs_in(CapturedScope, Regs& r, int mine, StartSeen& s) {
  s.explicit_token = ExplicitScope::current();
  s.coroutine_token = CoroutineScope::current();
  s.first = r.expl.find();
  r.expl.set(r.counts, mine);
  co_await std::suspend_always{};
}

TEST(CoroutineScope, AStartChoosesTheTasksScope) {
  Regs r;
  ScopeGuard request(RequestId{61});
  const Counted* mine = &r.expl.create(r.counts, 7);

  // share_current: the creator's scope itself.
  StartSeen shared;
  Task ts = shares(share_current, r, 300, shared);
  ts.resume();
  EXPECT_EQ(shared.first, mine);
  EXPECT_EQ(shared.explicit_token, request.token());
  EXPECT_EQ(shared.coroutine_token, request.token());
  EXPECT_EQ(r.expl().id(), 300);  // the task's set() is the creator's
  ts.destroy();
  EXPECT_EQ(r.counts.alive(), 1);  // 7 replaced by 300
  EXPECT_EQ(r.expl().id(), 300);

  // copy_current, passed explicitly: as the default.
  StartSeen copied;
  Task tc = copies_explicitly(copy_current, r, 301, copied);
  tc.resume();
  EXPECT_EQ(copied.first, &r.expl());
  EXPECT_NE(copied.explicit_token, request.token());
  EXPECT_EQ(r.expl().id(), 300);

  // fresh_scope: a new, empty scope.
  StartSeen fresh;
  Task tf = starts_fresh(fresh_scope, r, 302, fresh);
  tf.resume();
  EXPECT_TRUE(fresh.active);
  EXPECT_EQ(fresh.first, nullptr);
  EXPECT_FALSE(fresh.coroutine_token.is_null());
  EXPECT_EQ(fresh.explicit_token, fresh.coroutine_token);
  EXPECT_NE(fresh.explicit_token, request.token());
  EXPECT_EQ(r.expl().id(), 300);

  // CapturedScope::of(token): the token's scope, held by the task.
  StartSeen captured;
  Task tk = runs_in(CapturedScope::of(RequestId{62}), r, 303, captured);
  tk.resume();
  EXPECT_EQ(captured.first, nullptr);
  EXPECT_EQ(captured.explicit_token, captured.coroutine_token);
  {
    ScopeGuard same(RequestId{62});  // the same scope, alive while the task holds it
    EXPECT_EQ(same.token(), captured.explicit_token);
    EXPECT_EQ(r.expl().id(), 303);
  }
  tk.resume();
  EXPECT_TRUE(tk.done());
  const int before = r.counts.destroyed.load();
  tk.destroy();  // the last holder of RequestId{62}'s scope
  EXPECT_EQ(r.counts.destroyed.load(), before + 1);
  {
    ScopeGuard again(RequestId{62});
    EXPECT_EQ(r.expl.find(), nullptr);  // a new life of the token
  }
  EXPECT_EQ(ExplicitScope::current(), request.token());
  EXPECT_EQ(r.expl().id(), 300);
}

// ---------------------------------------------------------------------------------------
// 7. Nested tasks: a Task co_awaiting a child Task.
// ---------------------------------------------------------------------------------------

struct ChildSeen {
  ScopeToken token;
  const Counted* parent_coro = nullptr;
  int parent_coro_id = 0;  // read while the parent's value surely lives
  const Counted* parent_expl = nullptr;
  int wrong = 0;
};

Task child(Pool& pool, Regs& r, int id, ChildSeen& s) {
  s.token = CoroutineScope::current();
  if (ExplicitScope::current() != s.token) ++s.wrong;
  s.parent_coro = r.coro.find();
  s.parent_coro_id = s.parent_coro != nullptr ? s.parent_coro->id() : 0;
  s.parent_expl = r.expl.find();
  r.coro.set(r.counts, id);  // only in the child
  co_await schedule_on(pool, other_worker(pool));
  if (r.coro().id() != id) ++s.wrong;
  if (CoroutineScope::current() != s.token) ++s.wrong;
  if (r.expl.find() != s.parent_expl) ++s.wrong;
}

Task grandparent_child(Pool& pool, Regs& r, int id, ChildSeen& s, ChildSeen& grandchild) {
  s.token = CoroutineScope::current();
  s.parent_coro = r.coro.find();
  r.coro.set(r.counts, id);
  co_await child(pool, r, id + 1, grandchild);
  if (r.coro().id() != id) ++s.wrong;
  if (CoroutineScope::current() != s.token) ++s.wrong;
}

struct ParentSeen {
  ScopeToken token;
  ChildSeen first, second, in_guard, middle, grandchild;
  const Counted* guard_value = nullptr;
  ThreadId child_ended_on, parent_went_on;
  int wrong = 0;
};

Task parent(Pool& pool, Regs& r, int id, ParentSeen& s) {
  s.token = CoroutineScope::current();
  const Counted* coro_value = &r.coro.create(r.counts, id);
  const Counted* expl_value = &r.expl.create(r.counts, -id);
  auto intact = [&] {
    if (&r.coro() != coro_value || r.coro().id() != id) ++s.wrong;
    if (&r.expl() != expl_value || r.expl().id() != -id) ++s.wrong;
    if (CoroutineScope::current() != s.token || ExplicitScope::current() != s.token) ++s.wrong;
  };
  co_await schedule_on(pool, other_worker(pool));
  co_await child(pool, r, 100 * id + 1, s.first);
  intact();
  co_await child(pool, r, 100 * id + 2, s.second);  // does not see the first child's set()
  intact();
  co_await grandparent_child(pool, r, 100 * id + 3, s.middle, s.grandchild);
  intact();
  {
    ScopeGuard guard(RequestId{static_cast<std::uint64_t>(7000 + id)});
    s.guard_value = &r.expl.create(r.counts, 7000 + id);
    co_await child(pool, r, 100 * id + 5, s.in_guard);  // a copy of the guard's scope
    if (&r.expl() != s.guard_value) ++s.wrong;
  }
  intact();
}

TEST(CoroutineScope, AChildTaskRunsInACopyOfItsParentsScope) {
  constexpr int kParents = 20;
  Regs r;
  std::vector<ParentSeen> seen(kParents);
  {
    Pool pool(2);
    std::vector<Task> tasks;
    for (int i = 0; i < kParents; ++i) tasks.push_back(parent(pool, r, i + 1, seen[i]));
    run_all(pool, tasks);
    for (Task& t : tasks) EXPECT_FALSE(t.error());
    for (int i = 0; i < kParents; ++i) {
      const ParentSeen& s = seen[i];
      EXPECT_EQ(s.wrong, 0) << i;
      for (const ChildSeen* c : {&s.first, &s.second, &s.in_guard, &s.middle, &s.grandchild}) {
        EXPECT_EQ(c->wrong, 0) << i;
        EXPECT_FALSE(c->token.is_null()) << i;
        EXPECT_NE(c->token, s.token) << i;  // a scope of its own
      }
      // The children saw the parent's values (the same objects), not each other's.
      ASSERT_NE(s.first.parent_coro, nullptr);
      EXPECT_EQ(s.first.parent_coro->id(), i + 1);
      EXPECT_EQ(s.second.parent_coro, s.first.parent_coro);
      EXPECT_EQ(s.middle.parent_coro, s.first.parent_coro);
      ASSERT_NE(s.first.parent_expl, nullptr);
      EXPECT_EQ(s.first.parent_expl->id(), -(i + 1));
      // The grandchild saw the middle task's value (destroyed since, with the middle task).
      ASSERT_NE(s.grandchild.parent_coro, nullptr);
      EXPECT_EQ(s.grandchild.parent_coro_id, 100 * (i + 1) + 3);
      // A child created inside the parent's guard copies the guard's scope: the guard's
      // explicit value, and no CoroutineScope value (the guard's scope has none).
      EXPECT_EQ(s.in_guard.parent_expl, s.guard_value);
      EXPECT_EQ(s.in_guard.parent_coro, nullptr);
    }
    // Children's frames are gone (destroyed by their parents); parents' values alive.
    EXPECT_EQ(r.counts.alive(), 2 * kParents);
  }
  EXPECT_EQ(r.counts.alive(), 0);
  EXPECT_EQ(r.counts.made.load(), 8 * kParents);
}

// ---------------------------------------------------------------------------------------
// 8. A task that throws.
// ---------------------------------------------------------------------------------------

Task throws_after_hop(Pool& pool, TrackedRegs& r, int id) {
  r.coro.set(r.log, id);
  ScopeGuard guard(RequestId{static_cast<std::uint64_t>(8000 + id)});
  r.expl.set(r.log, id + 1);
  co_await schedule_on(pool, 1);
  throw std::runtime_error("boom " + std::to_string(id));
}

Task throws_at_once(TrackedRegs& r, int id) {
  r.coro.set(r.log, id);
  ScopeGuard guard(RequestId{static_cast<std::uint64_t>(8000 + id)});
  r.expl.set(r.log, id + 1);
  throw std::runtime_error("at once");
  co_return;
}

Task catches_childs_exception(Pool& pool, TrackedRegs& r, int id, int& wrong) {
  const ScopeToken own = CoroutineScope::current();
  r.coro.set(r.log, id + 2);
  try {
    co_await throws_after_hop(pool, r, id);
    ++wrong;
  } catch (const std::runtime_error& e) {
    if (std::string(e.what()) != "boom " + std::to_string(id)) ++wrong;
  }
  if (CoroutineScope::current() != own || ExplicitScope::current() != own) ++wrong;
  if (r.coro().id() != id + 2) ++wrong;
}

TEST(CoroutineScope, ATaskThatThrowsLeavesItsScopeAndKeepsTheException) {
  TrackedRegs r;
  {
    Pool pool(2);
    std::vector<Task> tasks;
    tasks.push_back(throws_after_hop(pool, r, 10));
    run_all(pool, tasks);
    ASSERT_TRUE(tasks[0].error());
    EXPECT_THROW(std::rethrow_exception(tasks[0].error()), std::runtime_error);
    // The guard's scope ended during the unwinding, on worker 1; the task's own value
    // lives with the frame.
    EXPECT_EQ(r.log.times(11), 1);
    EXPECT_EQ(r.log.where(11), pool.id(1));
    EXPECT_EQ(r.log.times(10), 0);
    for (int w = 0; w < pool.size(); ++w) {
      EXPECT_FALSE(pool.run_on(w, [] { return ExplicitScope::active(); }));
      EXPECT_FALSE(pool.run_on(w, [] { return CoroutineScope::active(); }));
    }
    tasks.clear();
    EXPECT_EQ(r.log.times(10), 1);
    EXPECT_EQ(r.log.where(10), this_thread());

    // A child's exception reaches its parent, whose scope is intact.
    int wrong = 0;
    tasks.push_back(catches_childs_exception(pool, r, 20, wrong));
    run_all(pool, tasks);
    EXPECT_FALSE(tasks[0].error());
    EXPECT_EQ(wrong, 0);
    EXPECT_EQ(r.log.times(20), 1);  // the child's frame went with its co_await
    EXPECT_EQ(r.log.times(21), 1);
    tasks.clear();
    EXPECT_EQ(r.log.times(22), 1);
  }
  // Resumed by hand inside the resumer's own guard: the resumer's scope is back after.
  ScopeGuard outer(RequestId{8999});
  r.expl.set(r.log, 8999);
  Task t = throws_at_once(r, 30);
  t.resume();
  EXPECT_TRUE(t.done());
  ASSERT_TRUE(t.error());
  EXPECT_EQ(ExplicitScope::current(), outer.token());
  EXPECT_FALSE(CoroutineScope::active());
  EXPECT_EQ(r.expl().id(), 8999);
  EXPECT_EQ(r.log.times(31), 1);  // the guard's scope
  t.destroy();
  EXPECT_EQ(r.log.times(30), 1);
  EXPECT_EQ(r.log.times(8999), 0);
  EXPECT_EQ(r.log.total(), 7);
}

// ---------------------------------------------------------------------------------------
// 9. Hooks and watchers across suspensions.
// ---------------------------------------------------------------------------------------

struct HookStats {
  std::atomic<int> enters{0};
  std::atomic<int> leaves{0};
  std::atomic<int> unpaired{0};
  std::atomic<int> destroyed{0};
};

class Hooked {
 public:
  explicit Hooked(HookStats& s) : s_(s) {}
  Hooked(const Hooked&) = delete;
  Hooked& operator=(const Hooked&) = delete;
  ~Hooked() {
    if (entered_) ++s_.unpaired;
    ++s_.destroyed;
  }
  void on_scope_enter() {
    if (entered_) ++s_.unpaired;
    entered_ = true;
    on_ = this_thread();
    ++s_.enters;
  }
  void on_scope_leave() {
    if (!entered_ || on_ != this_thread()) ++s_.unpaired;
    entered_ = false;
    ++s_.leaves;
  }

 private:
  HookStats& s_;
  bool entered_ = false;
  ThreadId on_;
};

Task hooked_hopper(Pool& pool, ScopedRegistry<Hooked, CoroutineScope>& reg, HookStats& s,
                   int hops, ScopeToken& token, std::atomic<int>& wrong) {
  token = CoroutineScope::current();
  Hooked* mine = &reg.create(s);
  for (int k = 0; k < hops; ++k) {
    co_await schedule_on(pool, other_worker(pool));
    if (&reg() != mine) ++wrong;
  }
}

TEST(CoroutineScope, HooksAndWatchersPairAcrossSuspensions) {
  constexpr int kTasks = 60;
  constexpr int kHops = 4;
  HookStats s;
  std::atomic<int> wrong{0};
  std::vector<ScopeToken> tokens(kTasks);
  std::mutex events_mu;
  std::vector<std::pair<ScopeToken, ScopeToken>> events;
  {
    ScopedRegistry<Hooked, CoroutineScope> reg([&]() -> Hooked { throw std::logic_error("unused"); });
    ScopeSwitchWatcherHandle watcher =
        add_scope_switch_watcher([&](ScopeToken from, ScopeToken to) {
          std::lock_guard<std::mutex> lock(events_mu);
          events.emplace_back(from, to);
        });
    Pool pool(2);
    std::vector<Task> tasks;
    for (int i = 0; i < kTasks; ++i) {
      tasks.push_back(hooked_hopper(pool, reg, s, kHops, tokens[i], wrong));
    }
    run_all(pool, tasks);
    watcher.reset();
    EXPECT_EQ(wrong.load(), 0);
    // Per value: on_scope_enter at creation and at each resumption after a hop;
    // on_scope_leave at each hop and at the end.
    EXPECT_EQ(s.enters.load(), kTasks * (kHops + 1));
    EXPECT_EQ(s.leaves.load(), kTasks * (kHops + 1));
    EXPECT_EQ(s.unpaired.load(), 0);
    EXPECT_EQ(s.destroyed.load(), 0);
    tasks.clear();
    EXPECT_EQ(s.destroyed.load(), kTasks);
    EXPECT_EQ(s.enters.load(), s.leaves.load());  // destruction of a left value: no call
    EXPECT_EQ(s.unpaired.load(), 0);
  }
  // Watchers: for each task, a switch to its scope at each resumption (the first one and
  // one per hop) and away from it at each suspension (one per hop and the end),
  // alternating.
  std::lock_guard<std::mutex> lock(events_mu);
  for (int i = 0; i < kTasks; ++i) {
    const ScopeToken t = tokens[i];
    ASSERT_FALSE(t.is_null());
    int to = 0, from = 0;
    bool in = false;
    bool alternates = true;
    for (const auto& [f, tt] : events) {
      if (tt == t) {
        ++to;
        if (in || !f.is_null()) alternates = false;  // resumed from a thread with no scope
        in = true;
      } else if (f == t) {
        ++from;
        if (!in || !tt.is_null()) alternates = false;
        in = false;
      }
    }
    EXPECT_EQ(to, kHops + 1) << i;
    EXPECT_EQ(from, kHops + 1) << i;
    EXPECT_TRUE(alternates) << i;
    EXPECT_FALSE(in) << i;
  }
}

// ---------------------------------------------------------------------------------------
// 10. Misuse: leaving a task's scope where it is not installed.
// ---------------------------------------------------------------------------------------

TEST(CoroutineScope, TaskScopeEnterAndLeaveAndInstalledPairCorrectly) {
  TaskScope a(fresh_scope);
  TaskScope b(fresh_scope);
  EXPECT_FALSE(a.token().is_null());
  EXPECT_NE(a.token(), b.token());
  a.enter();
  EXPECT_EQ(CoroutineScope::current(), a.token());
  EXPECT_EQ(ExplicitScope::current(), a.token());
  {
    TaskScope::Installed inner(b);
    EXPECT_EQ(CoroutineScope::current(), b.token());
  }
  EXPECT_EQ(CoroutineScope::current(), a.token());
  a.leave();
  EXPECT_FALSE(CoroutineScope::active());
  EXPECT_FALSE(ExplicitScope::active());
}

TEST(CoroutineScopeDeathTest, LeaveWithoutEnterAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        TaskScope task(fresh_scope);
        task.leave();
      },
      "coroutine task's scope was left");
}

TEST(CoroutineScopeDeathTest, InstalledDestroyedOutOfOrderAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        TaskScope a(fresh_scope);
        TaskScope b(fresh_scope);
        auto* outer = new TaskScope::Installed(a);
        auto* inner = new TaskScope::Installed(b);
        delete outer;  // b is the innermost
        delete inner;
      },
      "coroutine task's scope was left");
}

// ---------------------------------------------------------------------------------------
// 11. The resumer's own context is restored.
// ---------------------------------------------------------------------------------------

Task reports_scope(ScopeToken& seen, int rounds, std::atomic<int>& wrong) {
  seen = ExplicitScope::current();
  if (seen != CoroutineScope::current()) ++wrong;
  for (int k = 0; k < rounds; ++k) {
    co_await std::suspend_always{};
    if (ExplicitScope::current() != seen || CoroutineScope::current() != seen) ++wrong;
  }
}

Task resumes_another(Task& other, ScopeToken& seen, std::atomic<int>& wrong) {
  seen = CoroutineScope::current();
  other.resume();  // the other task's scope over ours, removed when it suspends
  if (ExplicitScope::current() != seen || CoroutineScope::current() != seen) ++wrong;
  co_await std::suspend_always{};
  other.resume();
  if (ExplicitScope::current() != seen || CoroutineScope::current() != seen) ++wrong;
}

TEST(CoroutineScope, TheResumersOwnScopeIsRestoredWhenTheTaskSuspends) {
  std::atomic<int> wrong{0};
  ScopeToken task_token;
  Task t = reports_scope(task_token, 4, wrong);
  ScopeGuard outer(RequestId{11});
  t.resume();
  EXPECT_FALSE(task_token.is_null());
  EXPECT_NE(task_token, outer.token());
  EXPECT_EQ(ExplicitScope::current(), outer.token());
  EXPECT_FALSE(CoroutineScope::active());
  // Another thread with its own guard resumes it next; then this one again.
  std::thread([&] {
    ScopeGuard theirs(RequestId{12});
    t.resume();
    EXPECT_EQ(ExplicitScope::current(), theirs.token());
    EXPECT_FALSE(CoroutineScope::active());
  }).join();
  {
    ScopeGuard inner(RequestId{13});
    t.resume();
    EXPECT_EQ(ExplicitScope::current(), inner.token());
  }
  EXPECT_EQ(ExplicitScope::current(), outer.token());
  t.resume();
  t.resume();
  EXPECT_TRUE(t.done());
  EXPECT_EQ(ExplicitScope::current(), outer.token());
  EXPECT_FALSE(CoroutineScope::active());
  EXPECT_EQ(wrong.load(), 0);

  // A task resuming another one by hand from inside its body.
  ScopeToken inner_token, outer_token;
  Task inner_task = reports_scope(inner_token, 1, wrong);
  Task outer_task = resumes_another(inner_task, outer_token, wrong);
  outer_task.resume();
  EXPECT_EQ(ExplicitScope::current(), outer.token());
  outer_task.resume();
  EXPECT_TRUE(outer_task.done());
  EXPECT_TRUE(inner_task.done());
  EXPECT_NE(inner_token, outer_token);
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(ExplicitScope::current(), outer.token());
}

// ---------------------------------------------------------------------------------------
// The custom-promise step: an eager task started inside the creator's guard.
// ---------------------------------------------------------------------------------------

struct EagerSeen {
  ThreadId started_on, hopped_to;
  ScopeToken own;
  const Counted* creators = nullptr;
  int wrong = 0;
};

Eager eager_body(Pool& pool, [[maybe_unused]] Join& join, Regs& r, int id, EagerSeen& s) {
  s.started_on = this_thread();  // the creating thread: it starts at once
  s.own = CoroutineScope::current();
  if (ExplicitScope::current() != s.own) ++s.wrong;
  s.creators = r.expl.find();  // a copy of the creator's scope
  r.expl.set(r.counts, id);
  r.coro.create(r.counts, -id);
  co_await Hop{1};  // turned into schedule_on(pool, 1) by await_transform
  s.hopped_to = this_thread();
  if (r.expl().id() != id || r.coro().id() != -id) ++s.wrong;
  if (CoroutineScope::current() != s.own || ExplicitScope::current() != s.own) ++s.wrong;
  co_await schedule_on(pool, 0);  // passed through unchanged
  if (r.expl().id() != id || r.coro().id() != -id) ++s.wrong;
  if (CoroutineScope::current() != s.own) ++s.wrong;
}

TEST(CoroutineScope, AnEagerTaskWithItsOwnAwaitersStartsInACopyOfTheCreatorsScope) {
  constexpr int kTasks = 10;
  Regs r;
  std::vector<EagerSeen> seen(kTasks);
  const int transforms_before = g_eager_transforms.load();
  const int dead_before = awaiter_lives().dead_uses.load();
  {
    Pool pool(2);
    Join join;
    ScopeGuard creator(RequestId{1200});
    const Counted* mine = &r.expl.create(r.counts, 1200);
    for (int i = 0; i < kTasks; ++i) {
      eager_body(pool, join, r, i + 1, seen[i]);
      // Back here at its first suspension: the creator's scope and value.
      EXPECT_EQ(ExplicitScope::current(), creator.token());
      EXPECT_FALSE(CoroutineScope::active());
      EXPECT_EQ(&r.expl(), mine);
    }
    join.wait();
    EXPECT_EQ(join.errors(), 0u);
    for (int i = 0; i < kTasks; ++i) {
      EXPECT_EQ(seen[i].started_on, this_thread()) << i;
      EXPECT_EQ(seen[i].creators, mine) << i;
      EXPECT_NE(seen[i].own, creator.token()) << i;
      EXPECT_EQ(seen[i].wrong, 0) << i;
      EXPECT_EQ(seen[i].hopped_to, pool.id(1)) << i;
    }
    // Every Eager frame is gone (suspend_never at the end): only the creator's value.
    EXPECT_EQ(r.counts.alive(), 1);
  }
  EXPECT_EQ(g_eager_transforms.load() - transforms_before, 2 * kTasks);
  EXPECT_EQ(awaiter_lives().dead_uses.load() - dead_before, 0)
      << "the awaiter my_transform returned by value, wrapped as the documentation shows "
         "(scoped_await(my_transform(std::forward<A>(a)))), was used after its destruction";
}

// ---------------------------------------------------------------------------------------
// scoped_await of an rvalue awaitable: the awaitable lives as long as its awaiter.
// ---------------------------------------------------------------------------------------

struct TicketSeen {
  std::vector<int> got;
  int wrong = 0;
};

// Every Ticket here is a temporary: my_transform's result (dead when Eager's await_transform
// returns, unless scoped_await keeps it) or the co_await operand itself.
Eager eager_tickets(Pool& pool, [[maybe_unused]] Join& join, std::coroutine_handle<>* park,
                    TicketSeen& s) {
  (void)pool;
  const ScopeToken own = CoroutineScope::current();
  s.got.push_back(co_await TicketFor{100, nullptr});  // ready at once
  s.got.push_back(co_await TicketFor{101, park});     // suspends, read after resumption
  if (CoroutineScope::current() != own) ++s.wrong;
  s.got.push_back(co_await TicketFor{102, park});  // suspends, resumed on another thread
  if (CoroutineScope::current() != own) ++s.wrong;
  s.got.push_back(co_await Ticket(103, park));  // the operand itself, passed through
  if (CoroutineScope::current() != own || ExplicitScope::current() != own) ++s.wrong;
}

// The mixin's own await_transform: the operand lives until the end of the co_await.
Task task_tickets(std::coroutine_handle<>* park, TicketSeen& s) {
  const ScopeToken own = CoroutineScope::current();
  s.got.push_back(co_await Ticket(200, nullptr));
  s.got.push_back(co_await Ticket(201, park));
  if (CoroutineScope::current() != own) ++s.wrong;
}

TEST(CoroutineScope, ScopedAwaitKeepsAnRvalueAwaitableAliveAsLongAsItsAwaiter) {
  const int dead_before = ticket_lives().dead_uses.load();
  const std::size_t live_before = live_tickets();
  TicketSeen eager, task;
  int resumptions = 0;
  {
    Pool pool(2);  // Eager's promise takes one; nothing is posted to it here
    Join join;
    ScopeGuard creator(RequestId{1300});
    std::coroutine_handle<> park;
    eager_tickets(pool, join, &park, eager);
    // Back here at each suspension; resumed here, then on another thread, then here.
    for (; park; ++resumptions) {
      std::coroutine_handle<> h = std::exchange(park, {});
      EXPECT_EQ(ExplicitScope::current(), creator.token());
      EXPECT_FALSE(CoroutineScope::active());
      if (resumptions % 2 == 1) {
        std::thread([h] { h.resume(); }).join();
      } else {
        h.resume();
      }
    }
    join.wait();
    EXPECT_EQ(join.errors(), 0u);
    EXPECT_EQ(ExplicitScope::current(), creator.token());
  }
  EXPECT_EQ(resumptions, 3);
  EXPECT_EQ(eager.got, (std::vector<int>{100, 101, 102, 103}));
  EXPECT_EQ(eager.wrong, 0);

  {
    std::coroutine_handle<> park;
    Task t = task_tickets(&park, task);
    t.resume();
    ASSERT_TRUE(park);
    std::exchange(park, {}).resume();
    EXPECT_TRUE(t.done());
  }
  EXPECT_EQ(task.got, (std::vector<int>{200, 201}));
  EXPECT_EQ(task.wrong, 0);

  EXPECT_EQ(ticket_lives().dead_uses.load() - dead_before, 0)
      << "an awaiter made from an awaitable that my_transform returned by value, wrapped as "
         "the documentation shows (scoped_await(my_transform(std::forward<A>(a)))), used "
         "the awaitable after its destruction";
  EXPECT_EQ(live_tickets(), live_before);  // every Ticket stored by scoped_await is gone
}

}  // namespace
}  // namespace scopereg
