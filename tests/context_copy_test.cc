// Context copies (copy_context, ScopeGuard(token, inherit), CapturedScope::wrap) and
// scope-switch hooks (on_scope_enter/on_scope_leave, add_scope_switch_watcher): issue 15.
//
// The first groups port the behaviours of the peers' own suites, rewritten for scopereg
// (each test names the test it comes from): CPython Lib/test/test_context.py, werkzeug
// tests/test_local.py and folly's RequestContextTest. A registry of ExplicitScope plays
// the ContextVar: set() is ContextVar.set, clear() makes it unset (reset() to "missing"),
// find() is get(None), and copy_context()/CapturedScope::run are the Context calls.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <latch>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "scopereg/explicit_scope.h"
#include "scopereg/fiber.h"
#include "scopereg/fiber_scope.h"
#include "scopereg/func_scope.h"
#include "scopereg/scope_switch.h"
#include "scopereg/scoped_registry.h"
#include "counted.h"
#include "thread_pool.h"

namespace scopereg {
namespace {

using testing::Counted;
using testing::Counts;
using testing::ThreadPool;

using RequestId = TypedToken<struct RequestIdTag>;

template <typename T>
using Var = ScopedRegistry<T, ExplicitScope>;

// The value of `var` in the current scope, or nullopt (ContextVar.get(None)).
template <typename T>
std::optional<T> get(const Var<T>& var) {
  const T* v = var.find();
  return v != nullptr ? std::optional<T>(*v) : std::nullopt;
}

// ---------------------------------------------------------------------------------------
// CPython Lib/test/test_context.py
// ---------------------------------------------------------------------------------------

// Origin: test_context_getset_1 (get/set/reset, then copies keep what they saw).
TEST(ContextVarPort, GetSet1) {
  Var<std::string> c;
  ScopeGuard scope(RequestId{1});
  EXPECT_EQ(get(c), std::nullopt);  // c.get() raises LookupError; c.get(None) is None

  c.set("42");  // t0 = c.set(42)
  EXPECT_EQ(get(c), "42");
  c.set("spam");  // t = c.set('spam')
  EXPECT_EQ(get(c), "spam");
  c.set("42");  // c.reset(t): back to the old value
  EXPECT_EQ(get(c), "42");
  c.set("spam2");
  EXPECT_EQ(get(c), "spam2");

  CapturedScope ctx1 = copy_context();  // c in ctx1
  c.clear();                            // c.reset(t0): c unset in the caller
  EXPECT_EQ(get(c), std::nullopt);
  EXPECT_EQ(ctx1.run([&] { return get(c); }), "spam2");  // ctx1[c] == 'spam2'

  CapturedScope ctx2 = copy_context();  // c not in ctx2
  EXPECT_EQ(ctx2.run([&] { return get(c); }), std::nullopt);
  EXPECT_EQ(ctx1.run([&] { return get(c); }), "spam2");
  // Adapted: a set() inside a copy's run() never reaches the caller.
  ctx2.run([&] { c.set("in ctx2"); });
  EXPECT_EQ(get(c), std::nullopt);
  EXPECT_EQ(ctx2.run([&] { return get(c); }), "in ctx2");
  EXPECT_EQ(ctx1.run([&] { return get(c); }), "spam2");
}

// Origin: test_context_getset_2 (two variables are independent; a reset of one never
// touches the other). CPython's cross-variable reset() error has no scopereg equivalent.
TEST(ContextVarPort, GetSet2) {
  Var<int> v1;
  Var<int> v2;
  ScopeGuard scope(RequestId{2});
  v1.set(42);
  EXPECT_EQ(get(v2), std::nullopt);
  v2.clear();
  EXPECT_EQ(get(v1), 42);
  CapturedScope ctx = copy_context();
  ctx.run([&] {
    v2.set(7);
    EXPECT_EQ(get(v1), 42);
    v1.clear();
    EXPECT_EQ(get(v2), 7);
  });
  EXPECT_EQ(get(v1), 42);
  EXPECT_EQ(get(v2), std::nullopt);
}

// Origin: test_context_getset_3 (a variable with a default in a fresh, empty Context:
// unset there, set inside run() shows in the context, reset removes it again).
TEST(ContextVarPort, GetSet3) {
  Var<int> c([] { return 42; });        // ContextVar('c', default=42)
  CapturedScope ctx = copy_context();   // contextvars.Context(): no active scope, empty
  ctx.run([&] {
    EXPECT_FALSE(c.has());              // c not in ctx
    c.set(1);
    EXPECT_EQ(get(c), 1);               // ctx[c] == 1
    c.clear();                          // c.reset(t)
    EXPECT_FALSE(c.has());
    EXPECT_EQ(c(), 42);                 // c.get() == the default
  });
  EXPECT_FALSE(ExplicitScope::active());
}

// Origin: test_context_getset_4 (a set made through ctx.run(c.set, 1) belongs to ctx, not
// to the caller).
TEST(ContextVarPort, GetSet4) {
  Var<int> c([] { return 42; });
  ScopeGuard scope(RequestId{4});
  CapturedScope ctx = copy_context();
  ctx.run([&](int v) { c.set(v); }, 1);
  EXPECT_EQ(get(c), std::nullopt);
  EXPECT_EQ(c(), 42);
  EXPECT_EQ(ctx.run([&] { return get(c); }), 1);
}

// Origin: test_context_getset_5 (a mutable value set inside a copy and mutated there;
// the caller's own value is untouched).
TEST(ContextVarPort, GetSet5) {
  Var<std::vector<int>> c;
  ScopeGuard scope(RequestId{5});
  c.set();  // c.set([])
  copy_context().run([&] {
    c.set();
    c().push_back(42);
    EXPECT_EQ(c(), std::vector<int>{42});
  });
  EXPECT_EQ(c(), std::vector<int>{});
}

// Origin: test_context_copy_1 (a copy is a snapshot; a set inside the copy persists in it).
TEST(ContextVarPort, Copy1) {
  Var<int> c([] { return 42; });
  CapturedScope ctx1 = copy_context();  // contextvars.Context()
  ctx1.run([&] {
    c.set(10);
    CapturedScope ctx2 = copy_context();  // ctx1.copy()
    EXPECT_EQ(ctx2.run([&] { return get(c); }), 10);
    c.set(20);
    EXPECT_EQ(get(c), 20);
    EXPECT_EQ(ctx2.run([&] { return get(c); }), 10);  // set after the copy: not seen
    ctx2.run([&] {
      EXPECT_EQ(c(), 10);
      c.set(30);
      EXPECT_EQ(c(), 30);
    });
    EXPECT_EQ(get(c), 20);
    EXPECT_EQ(ctx2.run([&] { return get(c); }), 30);  // persists for the next run
  });
  EXPECT_EQ(ctx1.run([&] { return get(c); }), 20);
}

// Origin: test_context_run_1 (run takes a callable; here: returns f's result, also void and
// references).
TEST(ContextVarPort, Run1) {
  CapturedScope ctx = copy_context();
  EXPECT_EQ(ctx.run([] { return 5; }), 5);
  ctx.run([] {});
  int x = 1;
  int& ref = ctx.run([&]() -> int& { return x; });
  EXPECT_EQ(&ref, &x);
}

// Origin: test_context_run_2 (arguments are passed through, results returned).
TEST(ContextVarPort, Run2) {
  CapturedScope ctx = copy_context();
  auto func = [](std::vector<std::string> args, const std::string& extra) {
    args.push_back(extra);
    return args;
  };
  EXPECT_EQ(ctx.run(func, std::vector<std::string>{}, "bar"),
            (std::vector<std::string>{"bar"}));
  EXPECT_EQ(ctx.run(func, std::vector<std::string>{"1"}, "bar"),
            (std::vector<std::string>{"1", "bar"}));
  auto move_only = ctx.run([](std::unique_ptr<int> p) { return p; }, std::make_unique<int>(3));
  EXPECT_EQ(*move_only, 3);
  auto wrapped = ctx.wrap(func);  // the same through wrap()
  EXPECT_EQ(wrapped(std::vector<std::string>{"a"}, "b"), (std::vector<std::string>{"a", "b"}));
}

// Origin: test_context_run_3 (exceptions propagate out of run; the caller's scope is
// restored).
TEST(ContextVarPort, Run3) {
  ScopeGuard scope(RequestId{3});
  const ScopeToken caller = ExplicitScope::current();
  CapturedScope ctx = copy_context();
  auto func = [](int, int) -> int { throw std::domain_error("1 / 0"); };
  EXPECT_THROW(ctx.run(func, 1, 2), std::domain_error);
  EXPECT_EQ(ExplicitScope::current(), caller);
  EXPECT_THROW(ctx.wrap(func)(1, 2), std::domain_error);
  EXPECT_EQ(ExplicitScope::current(), caller);
}

// Origin: test_context_run_4 (a run of another copy inside a run; a copy made inside a run
// holds what was set there).
TEST(ContextVarPort, Run4) {
  Var<std::string> var;
  CapturedScope ctx1 = copy_context();
  CapturedScope ctx2 = copy_context();
  CapturedScope returned = ctx1.run([&] {
    EXPECT_EQ(get(var), std::nullopt);
    var.set("spam");
    ctx2.run([&] { EXPECT_EQ(get(var), std::nullopt); });
    EXPECT_EQ(get(var), "spam");
    CapturedScope cur = copy_context();
    EXPECT_EQ(cur.run([&] { return get(var); }), "spam");
    return cur;
  });
  EXPECT_EQ(returned.run([&] { return get(var); }), "spam");
  EXPECT_EQ(ctx1.run([&] { return get(var); }), "spam");
  EXPECT_EQ(ctx2.run([&] { return get(var); }), std::nullopt);
}

// Origin: test_context_run_5 (a set made before an exception stays in the context; the
// caller's value is untouched).
TEST(ContextVarPort, Run5) {
  Var<std::string> var;
  ScopeGuard scope(RequestId{55});
  CapturedScope ctx = copy_context();
  EXPECT_THROW(ctx.run([&] {
    EXPECT_EQ(get(var), std::nullopt);
    var.set("spam");
    throw std::domain_error("1 / 0");
  }),
               std::domain_error);
  EXPECT_EQ(get(var), std::nullopt);
  EXPECT_EQ(ctx.run([&] { return get(var); }), "spam");
}

// Origin: test_context_run_6 (the default is seen but not stored; a set is stored).
TEST(ContextVarPort, Run6) {
  Var<int> c([] { return 0; });
  CapturedScope ctx = copy_context();
  ctx.run([&] {
    EXPECT_EQ(get(c), std::nullopt);  // ctx.get(c) is None
    c.set(42);
    EXPECT_EQ(c(), 42);
  });
  EXPECT_EQ(ctx.run([&] { return get(c); }), 42);
}

// Origin: test_context_run_7 -- DIVERGES on purpose: CPython refuses to enter a Context
// that is already entered (RuntimeError); a CapturedScope may be run again inside its own
// run (it may even run on several threads at once): the same scope, the same values.
TEST(ContextVarPort, NestedRunOfTheSameCopyIsTheSameScope) {
  Var<int> c;
  CapturedScope ctx = copy_context();
  ctx.run([&] {
    c.set(1);
    const ScopeToken outer = ExplicitScope::current();
    ctx.run([&] {
      EXPECT_EQ(ExplicitScope::current(), outer);
      EXPECT_EQ(get(c), 1);
      c.set(2);
    });
    EXPECT_EQ(ExplicitScope::current(), outer);
    EXPECT_EQ(get(c), 2);
  });
  EXPECT_FALSE(ExplicitScope::active());
}

// ---------------------------------------------------------------------------------------
// werkzeug tests/test_local.py
// ---------------------------------------------------------------------------------------

// werkzeug 2.x LocalStack.push: copy-on-write over a ContextVar.
void push(Var<std::vector<int>>& stack, int v) {
  std::vector<int> next = stack.has() ? *stack.find() : std::vector<int>{};
  next.push_back(v);
  stack.set(std::move(next));
}

// Origin: test_local_stack_asyncio (each task starts from a copy of the parent's context:
// it sees the parent's push, its own push stays in it). Tasks here are scopereg Fibers
// resumed round-robin, each running copy_context().wrap(task) -- asyncio.ensure_future.
TEST(WerkzeugPort, LocalStackAsyncioOnFibers) {
  Var<std::vector<int>> ls;
  ScopeGuard parent(RequestId{100});
  push(ls, 1);
  std::vector<Fiber> tasks;
  std::atomic<int> finished{0};
  for (int i = 0; i < 3; ++i) {
    auto task = copy_context().wrap([&, i] {
      push(ls, 10 + i);
      EXPECT_EQ(ls(), (std::vector<int>{1, 10 + i}));
      Fiber::yield();  // the siblings push now
      EXPECT_EQ(ls(), (std::vector<int>{1, 10 + i}));
      push(ls, 20 + i);
      Fiber::yield();
      EXPECT_EQ(ls(), (std::vector<int>{1, 10 + i, 20 + i}));
      ++finished;
    });
    tasks.emplace_back(std::move(task));
  }
  bool running = true;
  while (running) {
    running = false;
    for (Fiber& t : tasks) {
      if (t.done()) continue;
      t.resume();
      EXPECT_EQ(ls(), std::vector<int>{1});  // the parent between task steps
      running = true;
    }
  }
  EXPECT_EQ(finished.load(), 3);
  EXPECT_EQ(ls(), std::vector<int>{1});
}

// Origin: test_local_stack_asyncio, with the tasks on a thread pool, all in their push at
// once (a latch), so siblings really interleave.
TEST(WerkzeugPort, LocalStackAsyncioOnAThreadPool) {
  Var<std::vector<int>> ls;
  ScopeGuard parent(RequestId{101});
  push(ls, 1);
  constexpr int kTasks = 4;
  std::latch all_pushed(kTasks);
  std::atomic<int> wrong{0};
  {
    ThreadPool pool(kTasks);
    for (int i = 0; i < kTasks; ++i) {
      pool.post(copy_context().wrap([&, i] {
        if (ls() != std::vector<int>{1}) ++wrong;
        push(ls, 10 + i);
        all_pushed.arrive_and_wait();
        if (ls() != std::vector<int>{1, 10 + i}) ++wrong;
      }));
    }
    pool.wait_idle();
  }
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(ls(), std::vector<int>{1});
}

// ---------------------------------------------------------------------------------------
// folly RequestContextTest
// ---------------------------------------------------------------------------------------

// folly's TestData: counts onSet()/onUnset().
struct TestData {
  explicit TestData(int data) : data(data) {}
  void on_scope_enter() { ++set; }
  void on_scope_leave() { ++unset; }
  int data;
  int set = 0;
  int unset = 0;
};

// Origin: ShallowCopyBasic (the child starts with the parent's data and overrides one
// entry; after it ends the parent's data is as before and the shared entry got no calls).
TEST(FollyPort, ShallowCopyBasic) {
  Var<TestData> immutable([] { return TestData(0); });
  Var<TestData> data([] { return TestData(0); });
  ScopeGuard g0(RequestId{200});
  immutable.set(123);
  EXPECT_EQ(immutable().data, 123);
  EXPECT_FALSE(data.has());
  TestData* const parents = immutable.find();
  const int set_before = immutable().set;
  const int unset_before = immutable().unset;
  {
    ScopeGuard g1(RequestId{201}, inherit);
    EXPECT_EQ(immutable().data, 123);
    EXPECT_EQ(immutable.find(), parents);  // the same object: shared, not copied
    data.set(789);
    EXPECT_EQ(data().data, 789);
  }
  EXPECT_FALSE(data.has());
  EXPECT_EQ(immutable().data, 123);
  // A value bound in both scopes stays current: no onSet/onUnset on the switches.
  EXPECT_EQ(immutable().set, set_before);
  EXPECT_EQ(immutable().unset, unset_before);
}

// Origin: ShallowCopyOverwrite (the child overrides the entry; the parent's is back after).
TEST(FollyPort, ShallowCopyOverwrite) {
  Counts counts;
  Var<Counted> reg([&] { return Counted(counts, 0); });
  Var<int> other;
  ScopeGuard g0(RequestId{210});
  reg.set(counts, 123);
  other.set(5);
  Counted* parents = reg.find();
  {
    ScopeGuard g1(RequestId{211}, inherit);
    EXPECT_EQ(reg.find(), parents);  // shared, not copied
    reg.set(counts, 789);
    EXPECT_EQ(reg().id(), 789);
    EXPECT_EQ(get(other), 5);
    other.clear();
    EXPECT_EQ(get(other), std::nullopt);
    EXPECT_EQ(counts.alive(), 2);
  }
  EXPECT_EQ(reg.find(), parents);
  EXPECT_EQ(reg().id(), 123);
  EXPECT_EQ(get(other), 5);
  EXPECT_EQ(counts.alive(), 1);  // the child's 789 died with the child
  EXPECT_EQ(counts.destroyed.load(), 1);
}

// ScopeGuard(token, inherit) when the token's scope is already live: its own values win,
// missing ones are inherited.
TEST(FollyPort, InheritIntoALiveScopeKeepsItsOwnValues) {
  Var<int> a;
  Var<int> b;
  ScopeGuard child_first(RequestId{221});
  a.set(1);
  auto parent = std::make_unique<ScopeGuard>(RequestId{220});
  a.set(10);
  b.set(20);
  {
    ScopeGuard child(RequestId{221}, inherit);
    EXPECT_EQ(get(a), 1);
    EXPECT_EQ(get(b), 20);
  }
  EXPECT_EQ(get(a), 10);
  EXPECT_EQ(get(b), 20);
  parent.reset();
  EXPECT_EQ(get(a), 1);
}

// ScopeGuard(token, inherit) with no current scope is a plain guard.
TEST(FollyPort, InheritWithNoCurrentScopeIsAPlainGuard) {
  Var<int> a;
  ScopeGuard g(RequestId{230}, inherit);
  EXPECT_TRUE(ExplicitScope::active());
  EXPECT_FALSE(a.has());
  a.set(1);
  EXPECT_EQ(get(a), 1);
}

// Origin: testSetUnset. folly: setContextData on the current context calls onSet; making
// another context current calls onUnset on the old one's data and onSet on the new one's.
// Contexts here are copies with no scope (RequestContext::create()), made current by
// run() (RequestContext::setContext); nested runs stand for the successive setContext.
TEST(FollyPort, TestSetUnset) {
  Var<TestData> test([] { return TestData(0); });
  CapturedScope ctx1 = copy_context();
  CapturedScope ctx2 = copy_context();
  ctx1.run([&] {
    TestData& d1 = test.set(10);
    EXPECT_EQ(d1.set, 1) << "folly: onSet called in setContextData (set into the current "
                            "scope); scopereg calls no on_scope_enter() for a value "
                            "created in the current scope";
    const int d1_set = d1.set;
    ctx2.run([&] {  // RequestContext::create(): ctx2 current
      TestData& d2 = test.set(20);
      EXPECT_EQ(d2.set, 1) << "as above";
      const int d2_set = d2.set;
      EXPECT_EQ(d1.unset, 1);
      ctx1.run([&] {  // setContext(ctx1)
        EXPECT_EQ(d1.set, d1_set + 1);
        EXPECT_EQ(d1.unset, 1);
        EXPECT_EQ(d2.unset, 1);
        ctx2.run([&] {  // setContext(ctx2)
          EXPECT_EQ(d1.set, d1_set + 1);
          EXPECT_EQ(d1.unset, 2);
          EXPECT_EQ(d2.set, d2_set + 1);
          EXPECT_EQ(d2.unset, 1);
        });
      });
    });
  });
}

// Origin: AddSetContextWatcher (a watcher sees every switch with the tokens switched from
// and to; after its handle is reset it sees none).
TEST(FollyPort, AddSetContextWatcher) {
  std::vector<std::pair<ScopeToken, ScopeToken>> seen;
  ScopeSwitchWatcherHandle handle =
      add_scope_switch_watcher([&](ScopeToken from, ScopeToken to) {
        seen.emplace_back(from, to);
      });
  EXPECT_TRUE(handle);
  ScopeToken t1, t2, t3;
  {
    ScopeGuard g1(RequestId{240});
    t1 = ExplicitScope::current();
    {
      ScopeGuard g2(RequestId{241});
      t2 = ExplicitScope::current();
    }
    CapturedScope copy = copy_context();
    copy.run([&] { t3 = ExplicitScope::current(); });
  }
  const ScopeToken none;
  const std::vector<std::pair<ScopeToken, ScopeToken>> expected = {
      {none, t1}, {t1, t2}, {t2, t1}, {t1, t3}, {t3, t1}, {t1, none}};
  EXPECT_EQ(seen, expected);
  EXPECT_EQ(t1.kind(), ScopeKind::kExplicit);
  handle.reset();
  EXPECT_FALSE(handle);
  seen.clear();
  { ScopeGuard g(RequestId{242}); }
  EXPECT_TRUE(seen.empty());
  EXPECT_THROW((void)add_scope_switch_watcher(nullptr), ScopeError);
}

// ---------------------------------------------------------------------------------------
// Lifetimes and concurrency of copies
// ---------------------------------------------------------------------------------------

// Copies made and run concurrently on several threads, from one scope shared by all of
// them (its value is only read: replacing a value other threads use is the application's
// race), from scopes of their own whose value moves after the copy, and one copy run on
// every thread at once.
TEST(ContextCopy, CopiesMadeAndRunConcurrentlyOnSeveralThreads) {
  Counts counts;
  {
    Var<Counted> reg([&] { return Counted(counts, -1); });
    ScopeGuard parent(RequestId{300});
    reg.set(counts, 1);
    CapturedScope shared = copy_context();  // run by every thread at once
    constexpr int kThreads = 6;
    constexpr int kRounds = 200;
    std::atomic<int> wrong{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        ScopeGuard same(RequestId{300});  // the parent's scope, on this thread too
        for (int i = 0; i < kRounds; ++i) {
          const int mine = (t + 1) * 10000 + i;
          if (i % 20 == 0) {  // a scope of this thread's own: its value moves after the copy
            ScopeGuard own(RequestId{static_cast<std::uint64_t>(400 + t)});
            reg.set(counts, -i);
            CapturedScope snapshot = copy_context();
            reg.set(counts, -i - 1);
            if (snapshot.run([&] { return reg().id(); }) != -i) ++wrong;
            std::thread([&] {
              if (snapshot.run([&] { return reg().id(); }) != -i) ++wrong;
            }).join();
          }
          CapturedScope copy = copy_context();
          const int seen = copy.run([&] { return reg().id(); });
          copy.run([&] { reg.set(counts, mine); });
          if (copy.run([&] { return reg().id(); }) != mine) ++wrong;
          if (reg().id() == mine) ++wrong;  // never leaks to the parent
          if (seen != 1) ++wrong;  // the shared scope's value, never another thread's
          if (copy.run([&] { return reg().id(); }) == seen) ++wrong;
          auto later = copy.wrap([&] { return reg().id(); });
          std::thread([&] {
            if (later() != mine) ++wrong;
          }).join();
          shared.run([&] {
            if (reg().id() != 1) ++wrong;  // the snapshot, never a later parent value
          });
        }
      });
    }
    for (auto& th : threads) th.join();
    EXPECT_EQ(wrong.load(), 0);
    EXPECT_EQ(counts.alive(), 1);  // the parent's value, bound by the shared copy too
  }
  EXPECT_EQ(counts.alive(), 0);
  EXPECT_EQ(counts.made.load(), counts.destroyed.load());
}

// Copies of one scope taken on several threads and run on a pool, each child setting.
TEST(ContextCopy, ChildrenOnAPoolNeverDisturbTheirParents) {
  Counts counts;
  std::atomic<int> wrong{0};
  {
    Var<Counted> reg([&] { return Counted(counts, -1); });
    ThreadPool pool(3);
    std::vector<std::thread> parents;
    for (int p = 0; p < 3; ++p) {
      parents.emplace_back([&, p] {
        ScopeGuard request(RequestId{static_cast<std::uint64_t>(310 + p)});
        reg.set(counts, p);
        for (int i = 0; i < 100; ++i) {
          pool.post(copy_context().wrap([&, p, i] {
            if (reg().id() != p) ++wrong;
            reg.set(counts, 1000 * (p + 1) + i);
            if (reg().id() != 1000 * (p + 1) + i) ++wrong;
          }));
          if (reg().id() != p) ++wrong;
        }
        pool.wait_idle();
        if (reg().id() != p) ++wrong;
      });
    }
    for (auto& th : parents) th.join();
  }
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(counts.alive(), 0);
}

std::atomic<std::thread::id> g_destroyed_on;
std::atomic<int> g_tracked_destroyed{0};

struct Tracked {
  explicit Tracked(int id) : id(id) {}
  Tracked(const Tracked&) = delete;
  Tracked& operator=(const Tracked&) = delete;
  ~Tracked() {
    g_destroyed_on.store(std::this_thread::get_id());
    ++g_tracked_destroyed;
  }
  int id;
};

// A copy outliving the scope it was taken from: the shared value lives while the copy
// binds it, and dies exactly once, when the last binding goes, on the releasing thread.
TEST(ContextCopy, ACopyOutlivesTheScopeItWasTakenFrom) {
  g_tracked_destroyed = 0;
  Var<Tracked> reg([] { return Tracked(0); });
  std::optional<CapturedScope> copy;
  {
    ScopeGuard request(RequestId{320});
    reg.set(7);
    copy = copy_context();
  }  // the request's scope ended; its binding of 7 is gone
  EXPECT_EQ(g_tracked_destroyed.load(), 0);
  EXPECT_EQ(reg.size(), 1);
  EXPECT_EQ(copy->run([&] { return reg().id; }), 7);
  {
    ScopeGuard again(RequestId{320});  // a new life of the token: empty
    EXPECT_FALSE(reg.has());
  }
  std::thread::id releaser;
  std::thread([&] {
    releaser = std::this_thread::get_id();
    CapturedScope last = std::move(*copy);
    copy.reset();
    EXPECT_EQ(g_tracked_destroyed.load(), 0);
  }).join();
  EXPECT_EQ(g_tracked_destroyed.load(), 1);
  EXPECT_EQ(g_destroyed_on.load(), releaser);
  EXPECT_EQ(reg.size(), 0);
}

// The last binding of a shared value is the parent's: dropping the copy first keeps it,
// the parent's end destroys it once.
TEST(ContextCopy, TheLastBindingDestroysASharedValueWhicheverItIs) {
  g_tracked_destroyed = 0;
  Var<Tracked> reg([] { return Tracked(0); });
  {
    ScopeGuard request(RequestId{325});
    reg.set(1);
    { CapturedScope copy = copy_context(); }
    EXPECT_EQ(g_tracked_destroyed.load(), 0);
    {
      ScopeGuard child(RequestId{326}, inherit);
      reg.clear();  // unbinds in the child only
      EXPECT_FALSE(reg.has());
    }
    EXPECT_EQ(g_tracked_destroyed.load(), 0);
    EXPECT_EQ(reg().id, 1);
    reg.set(2);  // replaces the last binding of 1
    EXPECT_EQ(g_tracked_destroyed.load(), 1);
  }
  EXPECT_EQ(g_tracked_destroyed.load(), 2);
}

// A copy of a scope with values in 40 registries (the inline value and two slot chunks,
// the inline value mirrored in its chunk): each value is bound once by the copy (the
// copy's end destroys none, the last binding destroys each once), each registry sees
// exactly its own value in the copy, and changes on either side stay on that side. Run
// three times, so later copies reuse this thread's recycled scopes (whose slot chunks
// exist, empty), and once with the parent's inline value cleared first.
TEST(ContextCopy, ACopyOfManyRegistriesBindsEachValueOnceAndKeepsItsOwnChanges) {
  constexpr int kRegistries = 40;
  Counts counts;
  std::vector<std::unique_ptr<Var<Counted>>> regs;
  for (int i = 0; i < kRegistries; ++i) {
    regs.push_back(std::make_unique<Var<Counted>>([&counts, i] { return Counted(counts, i); }));
  }
  for (int round = 0; round < 4; ++round) {
    const bool clear_inline = round == 3;
    std::optional<CapturedScope> copy;
    {
      ScopeGuard parent(RequestId{static_cast<std::uint64_t>(900 + round)});
      (*regs[7])();  // the parent's inline value
      for (int i = 0; i < kRegistries; ++i) (*regs[i])();
      if (clear_inline) regs[7]->clear();
      const int parent_values = kRegistries - (clear_inline ? 1 : 0);
      ASSERT_EQ(counts.alive(), parent_values);
      copy = copy_context();
      copy->run([&] {
        for (int i = 0; i < kRegistries; ++i) {
          if (clear_inline && i == 7) {
            EXPECT_EQ(regs[i]->find(), nullptr);
          } else {
            ASSERT_NE(regs[i]->find(), nullptr) << "registry " << i;
            EXPECT_EQ(regs[i]->find()->id(), i);
          }
        }
        int visited = 0;
        regs[20]->for_each([&](const auto&, const Counted& v) {
          EXPECT_EQ(v.id(), 20);
          ++visited;
        });
        EXPECT_EQ(visited, 2);  // the parent's binding and the copy's
        regs[3]->clear();       // in the copy only
        regs[30]->clear();
      });
      EXPECT_EQ(counts.alive(), parent_values);  // shared: cleared in the copy, kept here
      ASSERT_NE(regs[3]->find(), nullptr);
      ASSERT_NE(regs[30]->find(), nullptr);
      regs[12]->clear();  // in the parent only
    }  // the parent's end: every value the copy binds stays
    EXPECT_EQ(counts.alive(), kRegistries - (clear_inline ? 1 : 0) - 2);
    copy->run([&] {
      EXPECT_EQ(regs[3]->find(), nullptr);
      ASSERT_NE(regs[12]->find(), nullptr);
      EXPECT_EQ(regs[12]->find()->id(), 12);
    });
    copy.reset();
    EXPECT_EQ(counts.alive(), 0);
    EXPECT_EQ(counts.made.load(), counts.destroyed.load());
  }
  EXPECT_EQ(counts.made.load(), 4 * kRegistries);
}

// A registry destroyed while copies still bind its values: its destructor destroys every
// one exactly once; the copies keep running and see no value of a later registry.
TEST(ContextCopy, ARegistryDestroyedWhileCopiesBindItsValues) {
  Counts counts;
  auto reg = std::make_unique<Var<Counted>>([&] { return Counted(counts, -1); });
  Counts other_counts;
  Var<Counted> survivor([&] { return Counted(other_counts, 9); });
  std::vector<CapturedScope> copies;
  {
    ScopeGuard request(RequestId{330});
    reg->set(counts, 1);
    survivor();
    copies.push_back(copy_context());
    copies.push_back(copy_context());
    copies[1].run([&] { reg->set(counts, 2); });
    CapturedScope grandchild = copies[1].run([] { return copy_context(); });
    copies.push_back(grandchild);
    copies.push_back(copy_context());
    copies.back().run([&] { reg->clear(); });
  }
  EXPECT_EQ(counts.made.load(), 2);
  EXPECT_EQ(counts.alive(), 2);
  std::thread::id main = std::this_thread::get_id();
  reg.reset();
  EXPECT_EQ(counts.destroyed.load(), 2);  // each once, by the destructor, now
  EXPECT_EQ(main, std::this_thread::get_id());
  // A later registry (likely reusing the slot) sees nothing in the copies.
  Var<Counted> later([&] { return Counted(counts, -2); });
  for (const CapturedScope& c : copies) {
    c.run([&] {
      EXPECT_FALSE(later.has());
      EXPECT_EQ(survivor().id(), 9);  // other registries' shared values are intact
    });
  }
  EXPECT_EQ(later.size(), 0);
  copies.clear();
  EXPECT_EQ(counts.destroyed.load(), 2);
  EXPECT_EQ(other_counts.alive(), 0);
}

// The same, with the registry destroyed on another thread while copies of its scope are
// made and run elsewhere: when the destructor returns, the value is gone (the registry
// file comment: "Destroying the registry destroys its values in every scope").
TEST(ContextCopy, ARegistryDestroyedConcurrentlyWithRunsOfCopies) {
  int late = 0;
  int by_runner = 0;
  constexpr int kRounds = 40;
  for (int round = 0; round < kRounds; ++round) {
    g_tracked_destroyed = 0;
    auto reg = std::make_unique<Var<Tracked>>([] { return Tracked(0); });
    std::vector<CapturedScope> copies;
    {
      ScopeGuard request(RequestId{340});
      reg->set(1);
      for (int i = 0; i < 4; ++i) copies.push_back(copy_context());
    }
    std::atomic<bool> stop{false};
    Var<int> unrelated;
    std::vector<std::thread> runners;
    for (int i = 0; i < 3; ++i) {
      runners.emplace_back([&, i] {
        while (!stop.load()) {
          copies[i].run([&] { unrelated.set(i); });
          CapturedScope again = copies[i].run([] { return copy_context(); });
          again.run([&] { (void)unrelated.find(); });
        }
      });
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    std::thread::id destroyer;
    std::thread([&] {
      destroyer = std::this_thread::get_id();
      reg.reset();
    }).join();
    if (g_tracked_destroyed.load() != 1) ++late;
    stop = true;
    for (auto& th : runners) th.join();
    copies.clear();
    EXPECT_EQ(g_tracked_destroyed.load(), 1);  // exactly once in any case
    if (g_destroyed_on.load() != destroyer) ++by_runner;
  }
  EXPECT_EQ(late, 0) << "rounds (of " << kRounds
                     << ") where the value outlived ~ScopedRegistry(); destroyed later by a "
                        "thread running copy_context() in "
                     << by_runner;
}

// Token-keyed registries over ExplicitScope::func() take part in copies and inheritance.
TEST(ContextCopy, TokenKeyedRegistriesOverTheScopeFuncTakePart) {
  Counts counts;
  {
    ScopedRegistry<Counted, FuncScope> reg([&] { return Counted(counts, -1); },
                                           FuncScope(ExplicitScope::func()));
    std::optional<CapturedScope> copy;
    {
      ScopeGuard request(RequestId{350});
      reg.set(counts, 1);
      Counted* parents = reg.find();
      copy = copy_context();
      copy->run([&] {
        EXPECT_EQ(reg.find(), parents);
        reg.set(counts, 2);
      });
      EXPECT_EQ(reg().id(), 1);
      EXPECT_EQ(reg.size(), 2);
      {
        ScopeGuard child(RequestId{351}, inherit);
        EXPECT_EQ(reg.find(), parents);
        reg.clear();
        EXPECT_FALSE(reg.has());
      }
      EXPECT_EQ(reg.find(), parents);
    }
    EXPECT_EQ(counts.alive(), 1);  // the copy's 2; 1 died with the request
    EXPECT_EQ(copy->run([&] { return reg().id(); }), 2);
    copy.reset();
    EXPECT_EQ(counts.alive(), 0);
    EXPECT_EQ(reg.size(), 0);
  }
  EXPECT_EQ(counts.made.load(), counts.destroyed.load());
}

// copy_context() with no active scope: a new, empty scope whose values persist across its
// runs and die with the last holder.
TEST(ContextCopy, ACopyWithNoActiveScopeIsAnEmptyScopeThatKeepsItsValues) {
  Counts counts;
  Var<Counted> reg([&] { return Counted(counts, 5); });
  ASSERT_FALSE(ExplicitScope::active());
  EXPECT_THROW(reg(), ScopeError);
  CapturedScope ctx = copy_context();
  EXPECT_FALSE(ExplicitScope::active());
  Counted* first = ctx.run([&] {
    EXPECT_TRUE(ExplicitScope::active());
    EXPECT_FALSE(reg.has());
    return &reg();
  });
  EXPECT_FALSE(ExplicitScope::active());
  EXPECT_EQ(ctx.run([&] { return &reg(); }), first);
  CapturedScope same = ctx;  // copies of a CapturedScope hold the same scope
  EXPECT_EQ(same.run([&] { return reg.find(); }), first);
  CapturedScope other = copy_context();
  EXPECT_EQ(other.run([&] { return reg.find(); }), nullptr);
  EXPECT_EQ(counts.alive(), 1);
  ctx = CapturedScope();
  EXPECT_EQ(counts.alive(), 1);
  same = CapturedScope();
  EXPECT_EQ(counts.alive(), 0);
}

// wrap() keeps sharing; copy_context().wrap() copies.
TEST(ContextCopy, WrapSharesAndACopysWrapDoesNot) {
  Var<int> v;
  ScopeGuard request(RequestId{360});
  v.set(1);
  auto shared = wrap([&] { v.set(2); });
  auto copied = copy_context().wrap([&] { v.set(3); });
  copied();
  EXPECT_EQ(get(v), 1);
  shared();
  EXPECT_EQ(get(v), 2);
  EXPECT_EQ(CapturedScope::current().run([&] { return get(v); }), 2);
}

// ---------------------------------------------------------------------------------------
// Scope-switch hooks
// ---------------------------------------------------------------------------------------

// Records every call; `current` follows the calls (per value; the tests use one thread).
struct Hooked {
  explicit Hooked(int id) : id(id) {}
  Hooked(const Hooked&) = delete;
  Hooked& operator=(const Hooked&) = delete;
  ~Hooked() { log().push_back("~" + std::to_string(id)); }
  void on_scope_enter() {
    ++enters;
    log().push_back("+" + std::to_string(id));
    if (throw_on_enter) throw std::runtime_error("enter failed");
  }
  void on_scope_leave() {
    ++leaves;
    log().push_back("-" + std::to_string(id));
    if (throw_on_leave) throw std::runtime_error("leave failed");
  }
  static std::vector<std::string>& log() {
    static std::vector<std::string> l;
    return l;
  }
  int id;
  int enters = 0;
  int leaves = 0;
  bool throw_on_enter = false;
  bool throw_on_leave = false;
};

using Log = std::vector<std::string>;
Log take_log() { return std::exchange(Hooked::log(), {}); }
Log sorted(Log l) {
  std::sort(l.begin(), l.end());
  return l;
}

using HookVar = ScopedRegistry<Hooked, ExplicitScope>;

// Values created before the switches measured (the creation's own calls aside).
TEST(SwitchHooks, GuardsPairExactlyAndNestedGuardsLeaveAndReenterTheOuter) {
  HookVar reg([] { return Hooked(0); });
  take_log();
  {
    ScopeGuard outer(RequestId{400});
    reg.set(1);
    take_log();
    {
      ScopeGuard inner(RequestId{401});
      EXPECT_EQ(take_log(), (Log{"-1"}));  // the outer leaves
      reg.set(2);
      take_log();
    }
    // the inner leaves, the outer enters again; then the inner's value dies (it was the
    // scope's last guard): the switch completes before the ended scope's values go
    EXPECT_EQ(take_log(), (Log{"-2", "+1", "~2"}));
    {
      ScopeGuard same(RequestId{400});  // the same scope again: no switch
      EXPECT_EQ(take_log(), Log{});
    }
    EXPECT_EQ(take_log(), Log{});
  }
  EXPECT_EQ(take_log(), (Log{"-1", "~1"}));
}

TEST(SwitchHooks, RunAndWrappedCallablesPairExactly) {
  HookVar reg([] { return Hooked(0); });
  CapturedScope ctx = copy_context();
  ctx.run([&] { reg.set(1); });
  take_log();
  ctx.run([] {});
  EXPECT_EQ(take_log(), (Log{"+1", "-1"}));
  auto wrapped = ctx.wrap([] { return 3; });
  EXPECT_EQ(wrapped(), 3);
  EXPECT_EQ(take_log(), (Log{"+1", "-1"}));
  {
    ScopeGuard other(RequestId{410});
    reg.set(2);
    take_log();
    ctx.run([] {});
    EXPECT_EQ(take_log(), (Log{"-2", "+1", "-1", "+2"}));
    std::thread([&] { wrapped(); }).join();  // another thread: its own pair
    EXPECT_EQ(take_log(), (Log{"+1", "-1"}));
  }
  take_log();
}

TEST(SwitchHooks, AnExceptionBetweenEnterAndLeaveStillLeaves) {
  HookVar reg([] { return Hooked(0); });
  CapturedScope ctx = copy_context();
  ctx.run([&] { reg.set(1); });
  take_log();
  EXPECT_THROW(ctx.run([] { throw std::runtime_error("x"); }), std::runtime_error);
  EXPECT_EQ(take_log(), (Log{"+1", "-1"}));
  ScopeGuard keep(RequestId{420});
  reg.set(2);
  take_log();
  try {
    ScopeGuard inner(RequestId{421});
    throw std::runtime_error("y");
  } catch (const std::runtime_error&) {
  }
  EXPECT_EQ(take_log(), (Log{"-2", "+2"}));
}

TEST(SwitchHooks, AValueSharedByParentAndChildGetsNoCallsOnTheSwitch) {
  HookVar reg([] { return Hooked(0); });
  HookVar own([] { return Hooked(0); });
  ScopeGuard parent(RequestId{430});
  reg.set(1);
  take_log();
  {
    ScopeGuard child(RequestId{431}, inherit);
    EXPECT_EQ(take_log(), Log{});
    own.set(2);
    take_log();
  }
  EXPECT_EQ(take_log(), (Log{"-2", "~2"}));
  CapturedScope copy = copy_context();
  copy.run([] {});
  EXPECT_EQ(take_log(), Log{});
  copy.run([&] { reg.set(3); });  // now the copy binds its own value
  take_log();
  copy.run([] {});
  EXPECT_EQ(take_log(), (Log{"-1", "+3", "-3", "+1"}));
}

struct FiberHooked {
  explicit FiberHooked(int id) : id(id) {}
  FiberHooked(const FiberHooked&) = delete;
  FiberHooked& operator=(const FiberHooked&) = delete;
  ~FiberHooked() { Hooked::log().push_back("~f" + std::to_string(id)); }
  void on_scope_enter() { Hooked::log().push_back("+f" + std::to_string(id)); }
  void on_scope_leave() { Hooked::log().push_back("-f" + std::to_string(id)); }
  int id;
};

TEST(SwitchHooks, FiberSwitchesCallFiberScopeAndCarriedExplicitValues) {
  ScopedRegistry<FiberHooked, FiberScope> per_fiber([] { return FiberHooked(0); });
  HookVar reg([] { return Hooked(0); });
  take_log();
  Fiber fiber([&] {
    per_fiber.set(1);
    ScopeGuard carried(RequestId{440});
    reg.set(2);
    Hooked::log().push_back("yield");
    Fiber::yield();
    Hooked::log().push_back("resumed");
  });
  fiber.resume();
  // Created while current: on_scope_enter at creation (set), paired by the leave at the
  // switch out.
  EXPECT_EQ(sorted(take_log()), sorted({"+f1", "+2", "yield", "-f1", "-2"}));
  std::thread([&] { fiber.resume(); }).join();  // resumed on another thread
  const auto log = take_log();
  // in: +f1, +2, "resumed"; the guard leaves (-2, ~2); the fiber finishes: -f1, ~f1.
  EXPECT_EQ(sorted(log), sorted({"+f1", "+2", "resumed", "-2", "~2", "-f1", "~f1"}));
  auto pos = [&](const std::string& s) { return std::find(log.begin(), log.end(), s) - log.begin(); };
  EXPECT_LT(pos("+f1"), pos("resumed"));
  EXPECT_LT(pos("+2"), pos("resumed"));
  EXPECT_LT(pos("-f1"), pos("~f1"));
  EXPECT_LT(pos("-2"), pos("~2"));
}

TEST(SwitchHooks, AThrowingHookIsReportedAndTheSwitchCompletesWithExactPairing) {
  HookVar reg([] { return Hooked(0); });
  auto outer = std::make_unique<ScopeGuard>(RequestId{450});
  const ScopeToken outer_token = ExplicitScope::current();
  Hooked& v = reg.set(1);
  v.throw_on_enter = true;
  v.throw_on_leave = true;
  const int enters = v.enters;
  const int leaves = v.leaves;
  ::testing::internal::CaptureStderr();
  ScopeToken inner_token;
  {
    ScopeGuard inner(RequestId{451});
    inner_token = ExplicitScope::current();
  }
  const ScopeToken after = ExplicitScope::current();
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(inner_token, outer_token);
  EXPECT_EQ(after, outer_token);
  EXPECT_EQ(v.leaves - leaves, 1);
  EXPECT_EQ(v.enters - enters, 1);
  EXPECT_NE(err.find("on_scope_leave()"), std::string::npos) << err;
  EXPECT_NE(err.find("on_scope_enter()"), std::string::npos) << err;
  EXPECT_NE(err.find("leave failed"), std::string::npos) << err;
  v.throw_on_enter = v.throw_on_leave = false;

  // A throwing watcher: reported as "watcher", the other calls still made.
  int calls = 0;
  auto bad = add_scope_switch_watcher([](ScopeToken, ScopeToken) {
    throw std::runtime_error("watcher failed");
  });
  auto good = add_scope_switch_watcher([&](ScopeToken, ScopeToken) { ++calls; });
  ::testing::internal::CaptureStderr();
  { ScopeGuard inner(RequestId{452}); }
  err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(calls, 2);
  EXPECT_NE(err.find("watcher"), std::string::npos) << err;
  EXPECT_EQ(ExplicitScope::current(), outer_token);
  EXPECT_EQ(v.enters - enters, 2);
  EXPECT_EQ(v.leaves - leaves, 2);
  outer.reset();
  take_log();
}

// The pairing contract per value: a value's calls alternate and it is not "current" when
// it is destroyed. A value created, or cleared, while its scope is current is part of that
// (folly calls onSet() when data is set into the current context, and onUnset() when it is
// cleared from it).
TEST(SwitchHooks, AValueCreatedAndDestroyedWhileCurrentStillPairs) {
  HookVar reg([] { return Hooked(0); });
  take_log();
  {
    ScopeGuard g(RequestId{460});
    reg.set(1);
  }
  EXPECT_EQ(take_log(), (Log{"+1", "-1", "~1"}))
      << "created in the current scope: on_scope_leave() without on_scope_enter()";
  {
    ScopeGuard g(RequestId{461});
    reg.set(2);  // replaced while current: the old value is destroyed in its scope
    reg.set(3);
  }
  EXPECT_EQ(take_log(), (Log{"+2", "-2", "~2", "+3", "-3", "~3"}))
      << "replaced while current: destroyed without on_scope_leave()";
  {
    ScopeGuard g(RequestId{463});
    reg.set(4);
    { ScopeGuard inner(RequestId{464}); }
    take_log();
    reg.clear();  // destroyed while current
  }
  EXPECT_EQ(take_log(), (Log{"-4", "~4"}))
      << "cleared while current: destroyed without on_scope_leave()";
}

// A type with only one of the two hooks is not hooked; with no hooked registry (and no
// watcher) alive the switch points do nothing but one load.
struct HalfHooked {
  void on_scope_enter() { ++calls; }
  static inline int calls = 0;
};

TEST(SwitchHooks, NoHookCallsWithoutAHookedRegistry) {
  ASSERT_EQ(internal::g_switch_hooks.load(), 0);
  ScopedRegistry<HalfHooked, ExplicitScope> half;
  EXPECT_EQ(internal::g_switch_hooks.load(), 0);
  {
    ScopeGuard g(RequestId{470});
    half();
    { ScopeGuard inner(RequestId{471}); }
    copy_context().run([] {});
  }
  EXPECT_EQ(HalfHooked::calls, 0);
  {
    auto hooked = std::make_unique<HookVar>([] { return Hooked(0); });
    EXPECT_EQ(internal::g_switch_hooks.load(), 1);
  }
  EXPECT_EQ(internal::g_switch_hooks.load(), 0);
  take_log();
  { ScopeGuard g(RequestId{472}); }
  EXPECT_EQ(take_log(), Log{});
}

// ---------------------------------------------------------------------------------------
// The two programs of docs/choosing-a-strategy.md ("Share or copy"), with checks.
// ---------------------------------------------------------------------------------------

namespace share_program {
struct Transaction {
  int request;
  std::vector<std::string> statements;
};
int current_request = 0;
std::vector<std::pair<int, std::size_t>> committed;  // (request, statements) at the end
struct Committing : Transaction {
  ~Committing() { committed.emplace_back(request, statements.size()); }
};
ScopedRegistry<Committing, ExplicitScope> transaction([] {
  return Committing{{current_request, {}}};
});
std::vector<std::function<void()>> loop;

void on_request(int id) {
  ScopeGuard request(id);
  current_request = id;
  transaction().statements.push_back("INSERT INTO orders ...");
  loop.push_back(wrap([] { transaction().statements.push_back("INSERT INTO audit ..."); }));
  loop.push_back(wrap([] { transaction().statements.push_back("UPDATE stock ..."); }));
}
}  // namespace share_program

TEST(DocsPrograms, ShareOneTransactionAcrossCallbacks) {
  using namespace share_program;
  on_request(1);
  on_request(2);
  EXPECT_TRUE(committed.empty());  // the callbacks keep both requests alive
  for (auto& f : loop) f();
  loop.clear();
  const std::vector<std::pair<int, std::size_t>> expected = {{1, 3}, {2, 3}};
  EXPECT_EQ(committed, expected);
}

namespace copy_program {
struct Span {
  std::string name;
  int deadline_ms;
};
ScopedRegistry<Span, ExplicitScope> span;
ScopedRegistry<std::string, ExplicitScope> user;
std::vector<std::string> lines;
void log(const std::string& what) {
  lines.push_back("[" + span().name + " " + std::to_string(span().deadline_ms) + "ms] " +
                  what + " for " + user());
}
}  // namespace copy_program

TEST(DocsPrograms, CopyPerTaskSpansAndDeadlines) {
  using namespace copy_program;
  ScopeGuard request(std::string("req-1"));
  user.set("alice");
  span.set(Span{"request", 500});
  std::vector<std::function<void()>> tasks;
  for (std::string name : {"fetch-cart", "fetch-prices"}) {
    tasks.push_back(copy_context().wrap([name] {
      span.set(Span{name, span().deadline_ms - 100});  // replace: never mutate a shared one
      log("start");
    }));
  }
  for (auto& t : tasks) t();
  log("tasks done");
  {
    ScopeGuard retry(std::string("req-1/retry"), inherit);
    span.set(Span{"retry", 200});
    log("retrying");
  }
  log("done");
  EXPECT_EQ(lines, (std::vector<std::string>{"[fetch-cart 400ms] start for alice",
                                            "[fetch-prices 400ms] start for alice",
                                            "[request 500ms] tasks done for alice",
                                            "[retry 200ms] retrying for alice",
                                            "[request 500ms] done for alice"}));
}

}  // namespace
}  // namespace scopereg
