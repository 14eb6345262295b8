// Request scopes without a process-wide lock (d807617): scope teardown through
// domains, the token binding index (collisions included), the inline first
// value, size()/for_each over live scopes, explicit scopes ended unreachable,
// the 128-entry FuncScope cache and BoostFiberScope's per-thread frame cache.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <latch>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "boost/context/fixedsize_stack.hpp"
#include "boost/context/stack_traits.hpp"
#include "boost/fiber/all.hpp"
#include "counted.h"
#include "gtest/gtest.h"
#include "scopereg/boost_fiber_scope.h"
#include "scopereg/explicit_scope.h"
#include "scopereg/fiber_scope.h"
#include "scopereg/func_scope.h"
#include "scopereg/internal/sanitizers.h"
#include "scopereg/scope.h"
#include "scopereg/scoped_registry.h"
#include "scopereg/thread_scope.h"

namespace scopereg {
namespace {

using ::scopereg::testing::Counted;
using ::scopereg::testing::Counts;
using namespace std::chrono_literals;

// Per-value bookkeeping: how many times each id was destroyed, and on which
// thread.
class Ledger {
 public:
  int made() const { return made_.load(); }
  int destroyed() const {
    std::lock_guard<std::mutex> lock(mu_);
    int n = 0;
    for (const auto& [id, times] : destroyed_) n += times;
    return n;
  }
  int times_destroyed(int id) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = destroyed_.find(id);
    return it == destroyed_.end() ? 0 : it->second;
  }
  std::thread::id destroyed_on(int id) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = where_.find(id);
    return it == where_.end() ? std::thread::id() : it->second;
  }
  // Ids destroyed more than once.
  int doubles() const {
    std::lock_guard<std::mutex> lock(mu_);
    int n = 0;
    for (const auto& [id, times] : destroyed_) n += times > 1;
    return n;
  }
  void note_made() { ++made_; }
  void note_destroyed(int id) {
    std::lock_guard<std::mutex> lock(mu_);
    ++destroyed_[id];
    where_[id] = std::this_thread::get_id();
  }

 private:
  std::atomic<int> made_{0};
  mutable std::mutex mu_;
  std::map<int, int> destroyed_;
  std::map<int, std::thread::id> where_;
};

// A value that reports its destruction to a Ledger, and runs a hook first if it
// has one.
class Tracked {
 public:
  Tracked(Ledger& ledger, int id, std::function<void()> on_destroy = {})
      : ledger_(ledger), id_(id), on_destroy_(std::move(on_destroy)) {
    ledger_.note_made();
  }
  Tracked(const Tracked&) = delete;
  Tracked& operator=(const Tracked&) = delete;
  ~Tracked() {
    if (on_destroy_) on_destroy_();
    ledger_.note_destroyed(id_);
  }
  int id() const { return id_; }

 private:
  Ledger& ledger_;
  int id_;
  std::function<void()> on_destroy_;
};

// Unrelated FuncScope registries, each holding a value for a token of its own,
// so that the binding index and the subscriber list are populated.
struct Unrelated {
  explicit Unrelated(int n) {
    for (int i = 0; i < n; ++i) {
      const ScopeToken token(900'000 + static_cast<std::uint64_t>(i));
      regs.push_back(std::make_unique<ScopedRegistry<Counted, FuncScope>>(
          [this] { return Counted(counts); }, ScopeFunc([token] { return token; })));
      (*regs.back())();
    }
  }
  Counts counts;
  std::vector<std::unique_ptr<ScopedRegistry<Counted, FuncScope>>> regs;
};

// ---- FuncScope values die with their scope
// ------------------------------------------

class FuncScopeEnds : public ::testing::TestWithParam<int> {};

TEST_P(FuncScopeEnds, OverExplicitScopeTheValueDiesWithTheLastGuard) {
  Unrelated unrelated(GetParam());
  Counts counts;
  int next = 0;
  ScopedRegistry<Counted, FuncScope> reg([&] { return Counted(counts, ++next); },
                                         ExplicitScope::func());
  ScopedRegistry<Counted, FuncScope> other([&] { return Counted(counts, ++next); },
                                           ExplicitScope::func());
  {
    ScopeGuard outer(std::string("outer"));
    Counted& o = reg();
    {
      ScopeGuard inner(std::string("inner"));
      EXPECT_NE(&reg(), &o);
      other();
      EXPECT_EQ(counts.alive(), 3);
    }
    EXPECT_EQ(counts.alive(), 1);  // inner's two values, not outer's
    EXPECT_EQ(&reg(), &o);
    EXPECT_EQ(other.find(), nullptr);
    EXPECT_EQ(reg.size(), 1);
  }
  EXPECT_EQ(counts.alive(), 0);
  EXPECT_EQ(reg.size(), 0);
  EXPECT_EQ(other.size(), 0);
  // The same token again: a new, empty scope.
  ScopeGuard again(std::string("inner"));
  EXPECT_EQ(reg.find(), nullptr);
  EXPECT_EQ(reg().id(), 4);
  EXPECT_EQ(unrelated.counts.alive(), GetParam());  // untouched by all of this
}

TEST_P(FuncScopeEnds, OverThreadScopeTheValueDiesAtThreadExit) {
  Unrelated unrelated(GetParam());
  Counts counts;
  ScopedRegistry<Counted, FuncScope> reg([&] { return Counted(counts); }, ThreadScope::func());
  ScopedRegistry<Counted> slot([&] { return Counted(counts); });
  for (int round = 0; round < 3; ++round) {
    std::thread([&] {
      EXPECT_EQ(reg.find(), nullptr);  // never a dead thread's value
      const Counted* mine = &reg();
      slot();
      EXPECT_EQ(&reg(), mine);
      EXPECT_EQ(counts.alive(), 2);
    }).join();
    EXPECT_EQ(counts.alive(), 0) << "round " << round;
    EXPECT_EQ(reg.size(), 0);
  }
  EXPECT_EQ(counts.made, 6);
  EXPECT_EQ(unrelated.counts.alive(), GetParam());
}

TEST_P(FuncScopeEnds, OverAFiberTheValueDiesWhenTheFiberEnds) {
  Unrelated unrelated(GetParam());
  Counts counts;
  ScopedRegistry<Counted, FuncScope> reg([&] { return Counted(counts); }, FiberScope::func());
  {
    Fiber f([&] {
      const Counted* mine = &reg();
      Fiber::yield();
      EXPECT_EQ(&reg(), mine);
    });
    f.resume();
    EXPECT_EQ(counts.alive(), 1);
    std::thread([&] { f.resume(); }).join();  // finishes on another thread
    EXPECT_TRUE(f.done());
    EXPECT_EQ(counts.alive(), 0);
  }
  {
    Fiber unfinished([&] {
      reg();
      Fiber::yield();
    });
    unfinished.resume();
    EXPECT_EQ(counts.alive(), 1);
  }  // unwound: its value dies too
  EXPECT_EQ(counts.alive(), 0);
  EXPECT_EQ(reg.size(), 0);
  EXPECT_EQ(unrelated.counts.alive(), GetParam());
}

TEST_P(FuncScopeEnds, OverABoostFiberTheValueDiesWhenTheFiberEnds) {
  Unrelated unrelated(GetParam());
  Counts counts;
  ScopedRegistry<Counted, FuncScope> reg([&] { return Counted(counts); }, BoostFiberScope::func());
  {
    boost::fibers::fiber f([&] {
      const Counted* mine = &reg();
      boost::this_fiber::yield();
      EXPECT_EQ(&reg(), mine);
    });
    f.join();
  }
  EXPECT_EQ(counts.made, 1);
  EXPECT_EQ(counts.alive(), 0);
  EXPECT_EQ(unrelated.counts.alive(), GetParam());
}

INSTANTIATE_TEST_SUITE_P(UnrelatedRegistries, FuncScopeEnds, ::testing::Values(0, 1, 200));

thread_local std::string t_key;

TEST(FuncScopeOfString, EndScopeOfOneKeyLeavesTheOthers) {
  Counts counts;
  int next = 0;
  ScopedRegistry<Counted, FuncScopeOf<std::string>> reg(
      [&] { return Counted(counts, ++next); }, FuncScopeOf<std::string>([] { return t_key; }));
  ScopedRegistry<Counted, FuncScopeOf<int>> ints([&] { return Counted(counts, 100); },
                                                 FuncScopeOf<int>([] { return 7; }));
  ints();
  t_key = "k";
  const Counted* k = &reg();
  t_key = "j";
  const Counted* j = &reg();
  EXPECT_NE(k, j);
  end_scope(std::string("k"));
  EXPECT_EQ(counts.destroyed, 1);
  EXPECT_EQ(&reg(), j);  // "j" untouched
  EXPECT_EQ(reg.size(), 1);
  t_key = "k";
  EXPECT_EQ(reg.find(), nullptr);  // a reused key starts empty
  end_scope(7L);                   // a long 7 is not the int 7
  EXPECT_EQ(ints.size(), 1);
  end_scope(7);
  EXPECT_EQ(ints.size(), 0);
  end_scope(std::string("j"));
  EXPECT_EQ(counts.alive(), 0);
  t_key.clear();
}

// ---- hash collisions in the binding index
// ----------------------------------------------

// Every token hashes alike: the binding index cannot tell them apart by hash.
struct Colliding {
  int id;
  friend bool operator==(const Colliding&, const Colliding&) = default;
  template <typename H>
  friend H AbslHashValue(H h, const Colliding&) {
    return H::combine(std::move(h), 42);
  }
};

thread_local Colliding t_colliding{0};

using CollidingRegistry = ScopedRegistry<Tracked, FuncScopeOf<Colliding>>;

// Values get id `base + token id`: give each registry its own base.
std::unique_ptr<CollidingRegistry> colliding_registry(Ledger& ledger, int base = 0) {
  return std::make_unique<CollidingRegistry>(
      [&ledger, base] { return Tracked(ledger, base + t_colliding.id); },
      FuncScopeOf<Colliding>([] { return t_colliding; }));
}

// The value of `reg` for token `id`, or null (never creates).
const Tracked* value_for(CollidingRegistry& reg, int id) {
  const Colliding saved = t_colliding;
  t_colliding = Colliding{id};
  const Tracked* v = reg.find();
  t_colliding = saved;
  return v;
}

const Tracked* make_for(CollidingRegistry& reg, int id) {
  const Colliding saved = t_colliding;
  t_colliding = Colliding{id};
  const Tracked* v = &reg();
  t_colliding = saved;
  return v;
}

TEST(BindingCollisions, TwoTokensInOneRegistryEndIndependently) {
  ASSERT_EQ(absl::Hash<Colliding>{}(Colliding{1}), absl::Hash<Colliding>{}(Colliding{2}));
  Ledger ledger;
  auto reg = colliding_registry(ledger);
  const Tracked* a = make_for(*reg, 1);
  const Tracked* b = make_for(*reg, 2);
  end_scope(Colliding{1});
  EXPECT_EQ(ledger.times_destroyed(1), 1);
  EXPECT_EQ(ledger.times_destroyed(2), 0);
  EXPECT_EQ(value_for(*reg, 1), nullptr);
  EXPECT_EQ(value_for(*reg, 2), b);  // alive and reachable
  (void)a;
  end_scope(Colliding{2});
  EXPECT_EQ(ledger.times_destroyed(2), 1);
  EXPECT_EQ(reg->size(), 0);
  reg.reset();
  EXPECT_EQ(ledger.destroyed(), 2);
  EXPECT_EQ(ledger.doubles(), 0);
}

TEST(BindingCollisions, TwoTokensInTwoRegistriesEndIndependently) {
  Ledger ledger;
  auto r1 = colliding_registry(ledger, 0);
  auto r2 = colliding_registry(ledger, 100);
  make_for(*r1, 1);
  const Tracked* b = make_for(*r2, 2);
  end_scope(Colliding{1});
  EXPECT_EQ(ledger.times_destroyed(1), 1);
  EXPECT_EQ(value_for(*r2, 2), b);
  end_scope(Colliding{2});
  EXPECT_EQ(ledger.times_destroyed(102), 1);
  // Both in both: ending one token takes exactly its two values.
  make_for(*r1, 3);
  make_for(*r2, 3);
  make_for(*r1, 4);
  make_for(*r2, 4);
  end_scope(Colliding{4});
  EXPECT_EQ(ledger.times_destroyed(4), 1);
  EXPECT_EQ(ledger.times_destroyed(104), 1);
  EXPECT_EQ(ledger.times_destroyed(3) + ledger.times_destroyed(103), 0);
  end_scope(Colliding{3});
  EXPECT_EQ(ledger.times_destroyed(3), 1);
  EXPECT_EQ(ledger.times_destroyed(103), 1);
  EXPECT_EQ(ledger.doubles(), 0);
  EXPECT_EQ(r1->size() + r2->size(), 0);
}

TEST(BindingCollisions, ThreeTokensInOneRegistryEachDieAtTheirOwnEnd) {
  Ledger ledger;
  auto reg = colliding_registry(ledger);
  make_for(*reg, 1);
  make_for(*reg, 2);
  const Tracked* c = make_for(*reg, 3);
  end_scope(Colliding{1});
  EXPECT_EQ(ledger.times_destroyed(1), 1);
  end_scope(Colliding{2});
  EXPECT_EQ(ledger.times_destroyed(2), 1);
  EXPECT_EQ(value_for(*reg, 3), c);
  end_scope(Colliding{3});
  EXPECT_EQ(ledger.times_destroyed(3), 1) << "token 3's value survived its scope's end";
  EXPECT_EQ(reg->size(), 0);
  reg.reset();
  EXPECT_EQ(ledger.destroyed(), 3);
  EXPECT_EQ(ledger.doubles(), 0);
}

TEST(BindingCollisions, EndingATokenWithNoValueKeepsTheCollidingOnesBound) {
  Ledger ledger;
  auto reg = colliding_registry(ledger);
  make_for(*reg, 2);
  make_for(*reg, 3);
  end_scope(Colliding{1});  // no value anywhere; only shares the hash
  EXPECT_EQ(ledger.destroyed(), 0);
  end_scope(Colliding{2});
  EXPECT_EQ(ledger.times_destroyed(2), 1);
  end_scope(Colliding{3});
  EXPECT_EQ(ledger.times_destroyed(3), 1) << "token 3's value survived its scope's end";
  EXPECT_EQ(reg->size(), 0);
}

TEST(BindingCollisions, AClearedCollidingValueLeavesTheOtherBound) {
  Ledger ledger;
  auto reg = colliding_registry(ledger);
  make_for(*reg, 1);
  make_for(*reg, 2);
  make_for(*reg, 3);
  t_colliding = Colliding{1};
  reg->clear();
  t_colliding = Colliding{0};
  EXPECT_EQ(ledger.times_destroyed(1), 1);
  end_scope(Colliding{2});
  EXPECT_EQ(ledger.times_destroyed(2), 1);
  end_scope(Colliding{3});
  EXPECT_EQ(ledger.times_destroyed(3), 1) << "token 3's value survived its scope's end";
  end_scope(Colliding{1});  // nothing left for it
  EXPECT_EQ(ledger.destroyed(), 3);
  EXPECT_EQ(ledger.doubles(), 0);
}

TEST(BindingCollisions, ARegistryDestroyedWithCollidingValuesLeavesNoBindingBehind) {
  Ledger ledger;
  auto doomed = colliding_registry(ledger, 0);
  auto kept = colliding_registry(ledger, 100);
  make_for(*doomed, 1);
  make_for(*doomed, 2);
  make_for(*kept, 2);
  doomed.reset();
  EXPECT_EQ(ledger.destroyed(), 2);
  // A dangling holder in the index would be dereferenced here (ASan:
  // use-after-free).
  end_scope(Colliding{1});
  end_scope(Colliding{2});
  EXPECT_EQ(ledger.destroyed(), 3);
  EXPECT_EQ(ledger.times_destroyed(102), 1);
  EXPECT_EQ(ledger.doubles(), 0);
  EXPECT_EQ(kept->size(), 0);
}

// ---- clear before the end
// ----------------------------------------------------------

TEST(ClearBeforeEnd, ThreadScopeEndDoesNotDestroyAClearedValueAgain) {
  Ledger ledger;
  std::atomic<int> next{0};
  ScopedRegistry<Tracked> slot([&] { return Tracked(ledger, ++next); });
  ScopedRegistry<Tracked, FuncScope> keyed([&] { return Tracked(ledger, ++next); },
                                           ThreadScope::func());
  std::thread([&] {
    slot();
    keyed();
    slot.clear();
    keyed.clear();
    EXPECT_EQ(ledger.destroyed(), 2);
    slot();  // re-created after the clear: dies at thread exit
    keyed();
    slot.set(ledger, 50);  // replaces the re-created one
    keyed.set(ledger, 51);
    EXPECT_EQ(ledger.destroyed(), 4);
  }).join();
  EXPECT_EQ(ledger.made(), 6);
  EXPECT_EQ(ledger.destroyed(), 6);
  EXPECT_EQ(ledger.doubles(), 0);
  EXPECT_EQ(ledger.times_destroyed(50), 1);
  EXPECT_EQ(ledger.times_destroyed(51), 1);
  EXPECT_EQ(keyed.size(), 0);
}

TEST(ClearBeforeEnd, ExplicitScopeEndDoesNotDestroyAClearedValueAgain) {
  Ledger ledger;
  int next = 0;
  ScopedRegistry<Tracked, ExplicitScope> slot([&] { return Tracked(ledger, ++next); });
  ScopedRegistry<Tracked, FuncScope> keyed([&] { return Tracked(ledger, ++next); },
                                           ExplicitScope::func());
  {
    ScopeGuard g(std::string("clear-me"));
    slot();
    keyed();
    slot.clear();
    keyed.clear();
    slot.set(ledger, 60);
    keyed.set(ledger, 61);
    slot.clear();
    keyed.clear();
    EXPECT_EQ(ledger.destroyed(), 4);
    slot();
    keyed();
  }
  EXPECT_EQ(ledger.made(), 6);
  EXPECT_EQ(ledger.destroyed(), 6);
  EXPECT_EQ(ledger.doubles(), 0);
}

TEST(ClearBeforeEnd, AClearedKeyedValueIsNotFoundAgainByEndScope) {
  Ledger ledger;
  int next = 0;
  ScopedRegistry<Tracked, FuncScope> keyed([&] { return Tracked(ledger, ++next); },
                                           ScopeFunc([] { return ScopeToken(4242); }));
  keyed();
  keyed.clear();
  keyed();  // bound again
  keyed.clear();
  EXPECT_EQ(ledger.destroyed(), 2);
  end_scope(ScopeToken(4242));  // nothing left: must not touch anything
  EXPECT_EQ(ledger.destroyed(), 2);
  keyed();
  end_scope(ScopeToken(4242));
  EXPECT_EQ(ledger.destroyed(), 3);
  EXPECT_EQ(ledger.doubles(), 0);
}

// ---- registries destroyed while their scopes live
// -----------------------------------

TEST(RegistryDestroyed, BeforeItsExplicitScopeEnds) {
  Ledger ledger;
  int next = 0;
  auto keyed = std::make_unique<ScopedRegistry<Tracked, FuncScope>>(
      [&] { return Tracked(ledger, ++next); }, ExplicitScope::func());
  auto slot = std::make_unique<ScopedRegistry<Tracked, ExplicitScope>>(
      [&] { return Tracked(ledger, ++next); });
  ScopedRegistry<Tracked, FuncScope> keyed_kept([&] { return Tracked(ledger, ++next); },
                                                ExplicitScope::func());
  ScopedRegistry<Tracked, ExplicitScope> slot_kept([&] { return Tracked(ledger, ++next); });
  {
    ScopeGuard g(std::string("outlives-its-registries"));
    const int k = (*keyed)().id();
    const int s = (*slot)().id();
    const Tracked* kk = &keyed_kept();
    const Tracked* sk = &slot_kept();
    keyed.reset();
    slot.reset();
    EXPECT_EQ(ledger.times_destroyed(k), 1);
    EXPECT_EQ(ledger.times_destroyed(s), 1);
    EXPECT_EQ(&keyed_kept(), kk);
    EXPECT_EQ(&slot_kept(), sk);
  }
  EXPECT_EQ(ledger.made(), 4);
  EXPECT_EQ(ledger.destroyed(), 4);
  EXPECT_EQ(ledger.doubles(), 0);
}

TEST(RegistryDestroyed, BeforeItsThreadAndFiberScopesEnd) {
  Ledger ledger;
  std::atomic<int> next{0};
  auto keyed = std::make_unique<ScopedRegistry<Tracked, FuncScope>>(
      [&] { return Tracked(ledger, ++next); }, ThreadScope::func());
  auto fiber_keyed = std::make_unique<ScopedRegistry<Tracked, FuncScope>>(
      [&] { return Tracked(ledger, ++next); }, FiberScope::func());
  auto fiber_slot = std::make_unique<ScopedRegistry<Tracked, FiberScope>>(
      [&] { return Tracked(ledger, ++next); });
  ScopedRegistry<Tracked, FuncScope> kept([&] { return Tracked(ledger, ++next); },
                                          ThreadScope::func());
  std::latch used(1), destroyed(1);
  std::thread t([&] {
    (*keyed)();
    kept();
    Fiber f([&] {
      (*fiber_keyed)();
      (*fiber_slot)();
      Fiber::yield();
    });
    f.resume();
    used.count_down();
    destroyed.wait();
    f.resume();  // the fiber ends after its registries were destroyed
    EXPECT_EQ(ledger.made(), 4);
  });
  used.wait();
  keyed.reset();
  fiber_keyed.reset();
  fiber_slot.reset();
  EXPECT_EQ(ledger.destroyed(), 3);
  destroyed.count_down();
  t.join();
  EXPECT_EQ(ledger.destroyed(), 4);
  EXPECT_EQ(ledger.doubles(), 0);
}

// A value whose destructor takes 50 ms; `started` and `finished` tell where it
// is.
struct SlowEnd {
  std::atomic<int> started{0};
  std::atomic<int> finished{0};
  std::function<void()> hook() {
    return [this] {
      ++started;
      std::this_thread::sleep_for(50ms);
      ++finished;
    };
  }
};

template <typename Registry>
void destroy_while_the_scope_end_destroys(std::unique_ptr<Registry> reg,
                                          std::function<void(Registry&)> run_scope, Ledger& ledger,
                                          SlowEnd& slow) {
  std::thread t([&] { run_scope(*reg); });
  while (slow.started == 0) std::this_thread::yield();
  reg.reset();  // must wait for the destructor in progress, then not run it
                // again
  EXPECT_EQ(slow.finished, 1);
  t.join();
  EXPECT_EQ(slow.started, 1);
  EXPECT_EQ(ledger.made(), 1);
  EXPECT_EQ(ledger.destroyed(), 1);
  EXPECT_EQ(ledger.doubles(), 0);
}

TEST(RegistryDestroyed, WhileAThreadExitDestroysItsKeyedValue) {
  Ledger ledger;
  SlowEnd slow;
  using Reg = ScopedRegistry<Tracked, FuncScope>;
  destroy_while_the_scope_end_destroys<Reg>(
      std::make_unique<Reg>([&] { return Tracked(ledger, 1, slow.hook()); }, ThreadScope::func()),
      [](Reg& r) { r(); }, ledger, slow);
}

TEST(RegistryDestroyed, WhileAThreadExitDestroysItsSlotValue) {
  Ledger ledger;
  SlowEnd slow;
  using Reg = ScopedRegistry<Tracked>;
  destroy_while_the_scope_end_destroys<Reg>(
      std::make_unique<Reg>([&] { return Tracked(ledger, 1, slow.hook()); }), [](Reg& r) { r(); },
      ledger, slow);
}

TEST(RegistryDestroyed, WhileAnExplicitScopeEndDestroysItsKeyedValue) {
  Ledger ledger;
  SlowEnd slow;
  using Reg = ScopedRegistry<Tracked, FuncScope>;
  destroy_while_the_scope_end_destroys<Reg>(
      std::make_unique<Reg>([&] { return Tracked(ledger, 1, slow.hook()); }, ExplicitScope::func()),
      [](Reg& r) {
        ScopeGuard g(std::string("slow-keyed"));
        r();
      },
      ledger, slow);
}

TEST(RegistryDestroyed, WhileAnExplicitScopeEndDestroysItsSlotValue) {
  Ledger ledger;
  SlowEnd slow;
  using Reg = ScopedRegistry<Tracked, ExplicitScope>;
  destroy_while_the_scope_end_destroys<Reg>(
      std::make_unique<Reg>([&] { return Tracked(ledger, 1, slow.hook()); }),
      [](Reg& r) {
        ScopeGuard g(std::string("slow-slot"));
        r();
      },
      ledger, slow);
}

TEST(RegistryDestroyed, WhileAnEndScopeCallDestroysItsValue) {
  Ledger ledger;
  SlowEnd slow;
  using Reg = ScopedRegistry<Tracked, FuncScope>;
  destroy_while_the_scope_end_destroys<Reg>(
      std::make_unique<Reg>([&] { return Tracked(ledger, 1, slow.hook()); },
                            ScopeFunc([] { return ScopeToken(777'001); })),
      [](Reg& r) {
        r();
        end_scope(ScopeToken(777'001));
      },
      ledger, slow);
}

// While a scope's end is in the (slow) destructor of one registry's value,
// another registry of that scope is destroyed: it takes its value back (not yet
// started) and destroys it itself, once; the scope's end then skips it.
template <typename Slow, typename Other>
void take_back_pending_value(std::function<void()> run_scope_body, Slow& slow_reg,
                             std::unique_ptr<Other>& other, Ledger& ledger, SlowEnd& slow) {
  (void)slow_reg;
  std::thread t(run_scope_body);
  while (slow.started == 0) std::this_thread::yield();
  other.reset();
  EXPECT_EQ(ledger.times_destroyed(2), 1);
  EXPECT_EQ(ledger.destroyed_on(2), std::this_thread::get_id())
      << "the destroyed registry's pending value was not taken back";
  t.join();
  EXPECT_EQ(slow.finished, 1);
  EXPECT_EQ(ledger.made(), 2);
  EXPECT_EQ(ledger.destroyed(), 2);
  EXPECT_EQ(ledger.doubles(), 0);
}

TEST(RegistryDestroyed, TakesBackItsPendingSlotValueFromAnEndingThread) {
  Ledger ledger;
  SlowEnd slow;
  ScopedRegistry<Tracked> first([&] { return Tracked(ledger, 1, slow.hook()); });
  auto second = std::make_unique<ScopedRegistry<Tracked>>([&] { return Tracked(ledger, 2); });
  take_back_pending_value(
      [&] {
        first();  // the scope's first value: destroyed first
        (*second)();
      },
      first, second, ledger, slow);
}

TEST(RegistryDestroyed, TakesBackItsPendingKeyedValueFromAnEndingThread) {
  Ledger ledger;
  SlowEnd slow;
  ScopedRegistry<Tracked, FuncScope> first([&] { return Tracked(ledger, 1, slow.hook()); },
                                           ThreadScope::func());
  auto second = std::make_unique<ScopedRegistry<Tracked, FuncScope>>(
      [&] { return Tracked(ledger, 2); }, ThreadScope::func());
  take_back_pending_value(
      [&] {
        first();
        (*second)();
      },
      first, second, ledger, slow);
}

// ---- the inline first value and the slot chunks
// -----------------------------------

template <typename Scope = ThreadScope>
using TrackedRegs = std::vector<std::unique_ptr<ScopedRegistry<Tracked, Scope>>>;

template <typename Scope = ThreadScope>
TrackedRegs<Scope> make_tracked_regs(Ledger& ledger, int n, int id_base) {
  TrackedRegs<Scope> regs;
  for (int i = 0; i < n; ++i) {
    regs.push_back(std::make_unique<ScopedRegistry<Tracked, Scope>>(
        [&ledger, id = id_base + i] { return Tracked(ledger, id); }));
  }
  return regs;
}

TEST(InlineFirstValue, SecondAndFortiethRegistriesInOneScope) {
  Ledger ledger;
  TrackedRegs<> regs = make_tracked_regs(ledger, 48, 0);
  std::thread([&] {
    const Tracked* first = &(*regs[0])();
    EXPECT_EQ(regs[1]->find(), nullptr);
    EXPECT_EQ(regs[39]->find(), nullptr);
    const Tracked* second = &(*regs[1])();
    EXPECT_EQ(&(*regs[0])(), first);  // mirrored into the chunk
    EXPECT_EQ(regs[0]->find(), first);
    const Tracked* fortieth = &(*regs[39])();
    EXPECT_EQ(regs[0]->find(), first);
    EXPECT_EQ(regs[1]->find(), second);
    EXPECT_EQ(regs[39]->find(), fortieth);
    for (int i = 2; i < 48; ++i) {
      if (i != 39) {
        EXPECT_EQ(regs[i]->find(), nullptr) << i;
      }
    }
    for (auto& r : regs) (*r)();
    for (int i = 0; i < 48; ++i) EXPECT_EQ((*regs[i])().id(), i);
    EXPECT_EQ(ledger.destroyed(), 0);
  }).join();
  EXPECT_EQ(ledger.made(), 48);
  EXPECT_EQ(ledger.destroyed(), 48);
  EXPECT_EQ(ledger.doubles(), 0);
}

TEST(InlineFirstValue, ASecondValueInAnotherChunkThanTheFirst) {
  Ledger ledger;
  TrackedRegs<> regs = make_tracked_regs(ledger, 40, 0);
  std::thread([&] {
    // The first value in a later chunk, the second in the first chunk, then a
    // third in the first value's chunk (which must then mirror it).
    const Tracked* a = &(*regs[39])();
    const Tracked* b = &(*regs[0])();
    EXPECT_EQ(regs[39]->find(), a);
    const Tracked* c = &(*regs[38])();
    EXPECT_EQ(regs[39]->find(), a);
    EXPECT_EQ(regs[0]->find(), b);
    EXPECT_EQ(regs[38]->find(), c);
    regs[39]->clear();
    EXPECT_EQ(regs[39]->find(), nullptr);
    EXPECT_EQ(ledger.times_destroyed(39), 1);
    EXPECT_EQ(regs[38]->find(), c);
  }).join();
  EXPECT_EQ(ledger.made(), 3);
  EXPECT_EQ(ledger.destroyed(), 3);
  EXPECT_EQ(ledger.doubles(), 0);
}

// Destroys regs[victim] while a thread's scope holds values in regs[0], [1] and
// [39]; the others stay intact; a registry made next (likely reusing the freed
// index) starts empty in that scope, then gets a value that dies with the
// scope.
void destroy_one_while_the_scope_lives(int victim) {
  Ledger ledger;
  TrackedRegs<> regs = make_tracked_regs(ledger, 40, 0);
  std::latch filled(1), destroyed(1), refilled(1), checked(1);
  std::unique_ptr<ScopedRegistry<Tracked>> fresh;
  std::thread t([&] {
    const Tracked* v0 = &(*regs[0])();
    const Tracked* v1 = &(*regs[1])();
    const Tracked* v39 = &(*regs[39])();
    filled.count_down();
    destroyed.wait();
    if (victim != 0) {
      EXPECT_EQ(regs[0]->find(), v0);
    }
    if (victim != 1) {
      EXPECT_EQ(regs[1]->find(), v1);
    }
    if (victim != 39) {
      EXPECT_EQ(regs[39]->find(), v39);
    }
    EXPECT_EQ(fresh->find(), nullptr) << "a new registry sees a dead registry's value";
    EXPECT_EQ((*fresh)().id(), 1000);
    refilled.count_down();
    checked.wait();
  });
  filled.wait();
  regs[victim].reset();
  EXPECT_EQ(ledger.times_destroyed(victim), 1);
  EXPECT_EQ(ledger.destroyed(), 1);
  fresh = std::make_unique<ScopedRegistry<Tracked>>([&] { return Tracked(ledger, 1000); });
  EXPECT_EQ(fresh->size(), 0);
  destroyed.count_down();
  refilled.wait();
  EXPECT_EQ(fresh->size(), 1);
  checked.count_down();
  t.join();
  EXPECT_EQ(ledger.made(), 4);
  EXPECT_EQ(ledger.destroyed(), 4);
  EXPECT_EQ(ledger.doubles(), 0);
  for (int id : {0, 1, 39, 1000}) EXPECT_EQ(ledger.times_destroyed(id), 1) << id;
}

TEST(InlineFirstValue, TheInlineValuesRegistryDestroyedWhileTheScopeLives) {
  destroy_one_while_the_scope_lives(0);
}
TEST(InlineFirstValue, AChunkValuesRegistryDestroyedWhileTheScopeLives) {
  destroy_one_while_the_scope_lives(1);
  destroy_one_while_the_scope_lives(39);
}

TEST(InlineFirstValue, AFreedIndexReusedInAnOldScopeWithOnlyAnInlineValue) {
  Ledger ledger;
  auto a =
      std::make_unique<ScopedRegistry<Tracked, ExplicitScope>>([&] { return Tracked(ledger, 1); });
  ScopeGuard g(std::string("inline-only"));
  (*a)();  // this scope's only value
  a.reset();
  EXPECT_EQ(ledger.destroyed(), 1);
  // Most likely the index `a` freed: its inline slot must read empty.
  ScopedRegistry<Tracked, ExplicitScope> b([&] { return Tracked(ledger, 2); });
  EXPECT_EQ(b.find(), nullptr);
  EXPECT_EQ(b().id(), 2);
  ScopedRegistry<Tracked, ExplicitScope> c([&] { return Tracked(ledger, 3); });
  EXPECT_EQ(c.find(), nullptr);
  EXPECT_EQ(c().id(), 3);
  EXPECT_EQ(b.find()->id(), 2);
}

TEST(InlineFirstValue, ExplicitScopesReusedManyTimesStartEmpty) {
  // Explicit scopes are recycled per thread: each life must start empty
  // whatever chunks and inline value the previous life had.
  Ledger ledger;
  TrackedRegs<ExplicitScope> regs = make_tracked_regs<ExplicitScope>(ledger, 40, 0);
  for (int life = 0; life < 40; ++life) {
    ScopeGuard g(life);
    for (auto& r : regs) EXPECT_EQ(r->find(), nullptr) << "life " << life;
    // A different first registry and a different set of others each life.
    (*regs[(life * 7) % 40])();
    for (int i = 0; i < 40; i += 1 + life % 5) (*regs[i])();
    for (int i = 0; i < 40; i += 1 + life % 5) EXPECT_EQ(regs[i]->find()->id(), i);
  }
  EXPECT_EQ(ledger.made(), ledger.destroyed());  // (ids repeat across lives)
  for (auto& r : regs) EXPECT_EQ(r->size(), 0);
}

TEST(InlineFirstValue, AReaderOfTheInlineValueWhileAnotherThreadFillsTheChunks) {
  Ledger ledger;
  std::vector<std::unique_ptr<ScopedRegistry<Tracked, ExplicitScope>>> ex;
  for (int i = 0; i < 40; ++i) {
    ex.push_back(std::make_unique<ScopedRegistry<Tracked, ExplicitScope>>(
        [&ledger, i] { return Tracked(ledger, i); }));
  }
  for (int round = 0; round < 20; ++round) {
    ScopeGuard g(std::string("shared-") + std::to_string(round));
    const Tracked* first = &(*ex[round % 40])();
    CapturedScope scope = CapturedScope::current();
    std::atomic<bool> done{false};
    std::atomic<int> wrong{0};
    std::thread reader([&] {
      scope.run([&] {
        while (!done) wrong += (ex[round % 40]->find() != first);
      });
    });
    std::thread writer([&] {
      scope.run([&] {
        for (int i = 0; i < 40; ++i) (*ex[(round + i) % 40])();
      });
      done = true;
    });
    writer.join();
    reader.join();
    EXPECT_EQ(wrong, 0) << "round " << round;
    for (int i = 0; i < 40; ++i) EXPECT_EQ(ex[i]->find()->id(), i);
  }
  EXPECT_EQ(ledger.made(), 20 * 40);
  EXPECT_EQ(ledger.destroyed(), 20 * 40);
}

// ---- size() and for_each over live scopes on many threads
// -------------------------

TEST(SizeAndForEach, CountAndVisitScopesOnManyThreadsAndDomains) {
  constexpr int kThreads = 40;  // more threads than domains
  Ledger ledger;
  std::atomic<int> next{0};
  ScopedRegistry<Tracked> by_thread([&] { return Tracked(ledger, ++next); });
  ScopedRegistry<Tracked, ExplicitScope> by_token([&] { return Tracked(ledger, ++next); });
  ScopedRegistry<Tracked, FuncScope> keyed([&] { return Tracked(ledger, ++next); },
                                           ThreadScope::func());
  std::mutex mu;
  std::map<ScopeToken, int> thread_values;    // thread token -> value id
  std::map<ScopeToken, int> explicit_values;  // explicit token -> value id
  std::latch ready(kThreads), checked(1);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      ScopeGuard g(std::string("size-") + std::to_string(t));
      const int a = by_thread().id();
      const int b = by_token().id();
      keyed();
      {
        std::lock_guard<std::mutex> lock(mu);
        thread_values[ThreadScope::current()] = a;
        explicit_values[g.token()] = b;
      }
      ready.count_down();
      checked.wait();
    });
  }
  ready.wait();
  EXPECT_EQ(by_thread.size(), kThreads);
  EXPECT_EQ(by_token.size(), kThreads);
  EXPECT_EQ(keyed.size(), kThreads);
  std::map<ScopeToken, int> seen_threads, seen_tokens;
  by_thread.for_each([&](ScopeToken tok, Tracked& v) { seen_threads[tok] = v.id(); });
  by_token.for_each([&](ScopeToken tok, Tracked& v) { seen_tokens[tok] = v.id(); });
  int keyed_seen = 0;
  keyed.for_each(
      [&](const ScopeToken& tok, Tracked&) { keyed_seen += thread_values.count(tok) == 1; });
  EXPECT_EQ(seen_threads, thread_values);
  EXPECT_EQ(seen_tokens, explicit_values);
  EXPECT_EQ(keyed_seen, kThreads);
  checked.count_down();
  for (auto& t : threads) t.join();
  EXPECT_EQ(by_thread.size(), 0);
  EXPECT_EQ(by_token.size(), 0);
  EXPECT_EQ(keyed.size(), 0);
  int visited = 0;
  by_thread.for_each([&](ScopeToken, Tracked&) { ++visited; });
  by_token.for_each([&](ScopeToken, Tracked&) { ++visited; });
  EXPECT_EQ(visited, 0);
  EXPECT_EQ(ledger.made(), 3 * kThreads);
  EXPECT_EQ(ledger.destroyed(), 3 * kThreads);
}

TEST(SizeAndForEach, AClearedValueIsNeitherCountedNorVisited) {
  Ledger ledger;
  ScopedRegistry<Tracked, ExplicitScope> reg([&] { return Tracked(ledger, 1); });
  ScopeGuard a(std::string("sz-a"));
  reg();
  EXPECT_EQ(reg.size(), 1);
  reg.clear();
  EXPECT_EQ(reg.size(), 0);
  int visited = 0;
  reg.for_each([&](ScopeToken, Tracked&) { ++visited; });
  EXPECT_EQ(visited, 0);
}

// ---- values created by destructors during a scope's end
// ---------------------------

TEST(DestructorCreates, InTheDyingThreadScopeAcrossRegistriesAndBackends) {
  Ledger ledger;
  std::unique_ptr<ScopedRegistry<Tracked>> c;
  std::unique_ptr<ScopedRegistry<Tracked, FuncScope>> k;
  std::unique_ptr<ScopedRegistry<Tracked>> b;
  ScopedRegistry<Tracked> a([&] { return Tracked(ledger, 1, [&] { (*k)(); }); });
  k = std::make_unique<ScopedRegistry<Tracked, FuncScope>>(
      [&] { return Tracked(ledger, 2, [&] { (*b)(); }); }, ThreadScope::func());
  b = std::make_unique<ScopedRegistry<Tracked>>(
      [&] { return Tracked(ledger, 3, [&] { (*c)(); }); });
  c = std::make_unique<ScopedRegistry<Tracked>>([&] { return Tracked(ledger, 4); });
  std::thread([&] { a(); }).join();
  // a's value made k's in the dying thread, k's made b's, b's made c's: all
  // died there.
  EXPECT_EQ(ledger.made(), 4);
  EXPECT_EQ(ledger.destroyed(), 4);
  EXPECT_EQ(ledger.doubles(), 0);
  EXPECT_EQ(a.size() + k->size() + b->size() + c->size(), 0);
}

TEST(DestructorCreates, ForeverInTheDyingThreadScopeIsRefusedAfterTheRounds) {
  Ledger ledger;
  std::atomic<int> refused{0};
  std::atomic<int> next{0};
  std::unique_ptr<ScopedRegistry<Tracked>> a, b;
  auto recreate = [&](std::unique_ptr<ScopedRegistry<Tracked>>& other) {
    return [&] {
      try {
        (*other)();
      } catch (const ScopeError&) {
        ++refused;
      }
    };
  };
  a = std::make_unique<ScopedRegistry<Tracked>>(
      [&] { return Tracked(ledger, ++next, recreate(b)); });
  b = std::make_unique<ScopedRegistry<Tracked>>(
      [&] { return Tracked(ledger, ++next, recreate(a)); });
  std::thread([&] { (*a)(); }).join();
  EXPECT_GE(refused, 1);
  EXPECT_LE(ledger.made(), 10);  // 8 rounds, then refused
  EXPECT_EQ(ledger.made(), ledger.destroyed());
  EXPECT_EQ(a->size() + b->size(), 0);
}

TEST(DestructorCreates, InAnEndingNestedExplicitScopeLandsInTheOuterScope) {
  Ledger ledger;
  std::unique_ptr<ScopedRegistry<Tracked, ExplicitScope>> reg;
  ScopedRegistry<Tracked, FuncScope> keyed([&] { return Tracked(ledger, 20); },
                                           ExplicitScope::func());
  std::atomic<int> next{0};
  ScopeToken created_in;
  reg = std::make_unique<ScopedRegistry<Tracked, ExplicitScope>>([&] {
    const int id = ++next;
    return Tracked(ledger, id, [&, id] {
      if (id != 1) return;
      (*reg)();  // while the inner scope ends: the current scope is the outer
                 // one
      keyed();
      created_in = ExplicitScope::current();
    });
  });
  {
    ScopeGuard outer(std::string("outer-x"));
    {
      ScopeGuard inner(std::string("inner-x"));
      EXPECT_EQ((*reg)().id(), 1);
    }
    EXPECT_EQ(created_in, outer.token());
    ASSERT_NE(reg->find(), nullptr);
    EXPECT_EQ(reg->find()->id(), 2);
    EXPECT_EQ(keyed.find()->id(), 20);
    EXPECT_EQ(ledger.destroyed(), 1);
  }
  EXPECT_EQ(ledger.made(), 3);
  EXPECT_EQ(ledger.destroyed(), 3);
  EXPECT_EQ(reg->size() + keyed.size(), 0);
}

TEST(DestructorCreates, InAnEndingExplicitScopeWithNoOuterScopeIsRefused) {
  Ledger ledger;
  std::atomic<int> refused{0};
  std::unique_ptr<ScopedRegistry<Tracked, ExplicitScope>> reg;
  ScopedRegistry<Tracked, FuncScope> keyed([&] { return Tracked(ledger, 20); },
                                           ExplicitScope::func());
  reg = std::make_unique<ScopedRegistry<Tracked, ExplicitScope>>([&] {
    return Tracked(ledger, 1, [&] {
      try {
        (*reg)();
      } catch (const ScopeError&) {
        ++refused;
      }
      try {
        keyed();
      } catch (const ScopeError&) {
        ++refused;
      }
      EXPECT_FALSE(ExplicitScope::active());
    });
  });
  {
    ScopeGuard only(std::string("only-x"));
    (*reg)();
  }
  EXPECT_EQ(refused, 2);
  // Also when ended by ExplicitScope::end() from a context with no scope.
  {
    ScopeGuard kept(std::string("kept-x"), ScopeLifetime::kUntilEnded);
    reg->set(ledger, 1, [&] {
      try {
        (*reg)();
      } catch (const ScopeError&) {
        ++refused;
      }
    });
  }
  EXPECT_EQ(ledger.destroyed(), 1);  // kept after its guard
  std::thread([] { ExplicitScope::end(std::string("kept-x")); }).join();
  EXPECT_EQ(refused, 3);
  EXPECT_EQ(ledger.made(), 2);
  EXPECT_EQ(ledger.destroyed(), 2);
  EXPECT_EQ(reg->size() + keyed.size(), 0);
}

// ---- one explicit scope shared by two threads
// ------------------------------------------

TEST(SharedExplicitScope, TwoThreadsInOneTokenGetOneValue) {
  for (int round = 0; round < 20; ++round) {
    Counts counts;
    ScopedRegistry<Counted, ExplicitScope> slot([&] {
      std::this_thread::sleep_for(2ms);  // both threads ask while it is being made
      return Counted(counts);
    });
    ScopedRegistry<Counted, FuncScope> keyed(
        [&] {
          std::this_thread::sleep_for(2ms);
          return Counted(counts);
        },
        ExplicitScope::func());
    const std::string token = "shared-" + std::to_string(round);
    std::latch entered(2), used(2);
    const Counted* seen[2][2] = {};
    auto run = [&](int i) {
      ScopeGuard g(token);
      entered.arrive_and_wait();
      seen[i][0] = &slot();
      seen[i][1] = &keyed();
      used.arrive_and_wait();
    };
    std::thread t0(run, 0), t1(run, 1);
    t0.join();
    t1.join();
    EXPECT_EQ(seen[0][0], seen[1][0]);
    EXPECT_EQ(seen[0][1], seen[1][1]);
    EXPECT_EQ(counts.made, 2);
    EXPECT_EQ(counts.alive(), 0);
  }
}

// ---- tokens minted in per-thread blocks
// --------------------------------------------

TEST(TokenMinting, TokensFromManyThreadsAndFibersAreAllDistinct) {
  constexpr int kThreads = 8;
  constexpr int kPerThread = 3000;  // several blocks per thread
  std::mutex mu;
  std::set<std::uint64_t> ids;
  std::vector<std::thread> threads;
  std::atomic<int> duplicates{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::vector<std::uint64_t> mine;
      mine.push_back(ThreadScope::current().id());
      for (int i = 0; i < kPerThread; ++i) {
        mine.push_back(new_scope_token(ScopeKind::kUser).id());
        if (i % 100 == 0) {
          Fiber f([&] { mine.push_back(getcurrent().id()); });
          f.resume();
          ScopeGuard g(std::string("mint-") + std::to_string(t) + "-" + std::to_string(i));
          mine.push_back(g.token().id());
        }
      }
      std::lock_guard<std::mutex> lock(mu);
      for (std::uint64_t id : mine) duplicates += !ids.insert(id).second;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(duplicates, 0);
  EXPECT_EQ(ids.size(), static_cast<std::size_t>(kThreads * (1 + kPerThread + 2 * 30)));
}

// ---- the FuncScope cache
// -------------------------------------------------------------

TEST(FuncScopeCache, MoreRegistriesThanEntriesUsedAlternately) {
  constexpr int kRegs = 300;  // ids differing by 128 share an entry
  Ledger ledger;
  std::vector<std::unique_ptr<ScopedRegistry<Tracked, FuncScope>>> regs;
  for (int i = 0; i < kRegs; ++i) {
    regs.push_back(std::make_unique<ScopedRegistry<Tracked, FuncScope>>(
        [&ledger, i, made = 0]() mutable { return Tracked(ledger, i + 1000 * made++); },
        ThreadScope::func()));
  }
  std::thread([&] {
    std::vector<const Tracked*> first(kRegs);
    for (int i = 0; i < kRegs; ++i) first[i] = &(*regs[i])();
    int wrong = 0;
    for (int pass = 0; pass < 3; ++pass) {
      for (int i = 0; i < kRegs; ++i) {
        const int j = (i + 128) % kRegs;
        wrong += (&(*regs[i])() != first[i]);
        wrong += (&(*regs[j])() != first[j]);
        wrong += (regs[i]->find() != first[i]);
      }
    }
    EXPECT_EQ(wrong, 0);
    regs[5]->clear();  // another store's cached entry stays valid
    EXPECT_EQ(regs[133]->find(), first[133]);
    EXPECT_EQ(regs[5]->find(), nullptr);
    EXPECT_EQ((*regs[5])().id(), 1005);
    EXPECT_EQ(ledger.made(), kRegs + 1);
  }).join();
  EXPECT_EQ(ledger.destroyed(), kRegs + 1);
  EXPECT_EQ(ledger.doubles(), 0);
}

TEST(FuncScopeCache, AnExplicitScopeRecycledOnTheSameThreadIsANewScope) {
  Counts counts;
  ScopedRegistry<Counted, FuncScope> reg([&] { return Counted(counts); }, ExplicitScope::func());
  for (int i = 0; i < 50; ++i) {
    ScopeGuard g(i % 2);  // the same two tokens again and again, recycled records
    EXPECT_EQ(reg.find(), nullptr) << i;
    const Counted* v = &reg();
    EXPECT_EQ(&reg(), v);
  }
  EXPECT_EQ(counts.made, 50);
  EXPECT_EQ(counts.alive(), 0);
}

// ---- BoostFiberScope's frame cache
// ---------------------------------------------------

using BoostReg = ScopedRegistry<Tracked, BoostFiberScope>;
using internal::BoostFiberCache;

[[gnu::noinline]] const Tracked* boost_at_depth(BoostReg& reg, int depth) {
  if (depth == 0) return &reg();
  volatile char pad[80];
  pad[depth % 64] = static_cast<char>(depth);
  const Tracked* v = boost_at_depth(reg, depth - 1);
  return pad[depth % 64] == static_cast<char>(depth) ? v : nullptr;
}

[[gnu::noinline]] const Tracked* boost_other_site(BoostReg& reg) { return reg.find(); }

[[gnu::noinline]] const Tracked* boost_third_site(BoostReg& reg) {
  volatile char pad[200];
  pad[0] = 1;
  return pad[0] == 1 ? &reg() : nullptr;
}

// Every way of reaching the registry from this fiber: all must give `expected`.
int boost_mismatches(BoostReg& reg, const Tracked* expected) {
  int wrong = 0;
  for (int depth = 0; depth < 8; ++depth) wrong += boost_at_depth(reg, depth) != expected;
  wrong += boost_other_site(reg) != expected;
  wrong += boost_third_site(reg) != expected;
  wrong += &reg() != expected;
  return wrong;
}

TEST(BoostFiberCache, ManyFibersAlternatingSeeTheirOwnValueAtEveryDepthAndSite) {
  Ledger ledger;
  std::atomic<int> next{0};
  BoostReg reg([&] { return Tracked(ledger, ++next); });
  const Tracked* main_value = &reg();
  std::atomic<int> wrong{0};
  std::vector<boost::fibers::fiber> fibers;
  for (int i = 0; i < 40; ++i) {
    fibers.emplace_back([&] {
      const Tracked* mine = &reg();
      for (int k = 0; k < 6; ++k) {
        wrong += boost_mismatches(reg, mine);
        boost::this_fiber::yield();
      }
    });
  }
  for (auto& f : fibers) f.join();
  fibers.clear();
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(ledger.made(), 41);
  EXPECT_EQ(ledger.destroyed(), 40);
  EXPECT_EQ(&reg(), main_value);  // the main context keeps the thread's value
  EXPECT_EQ(BoostFiberScope::current(), ThreadScope::current());
}

TEST(BoostFiberCache, NewFibersNeverSeeAnEndedFibersValue) {
  Ledger ledger;
  std::atomic<int> next{0};
  BoostReg reg([&] { return Tracked(ledger, ++next); });
  std::atomic<int> wrong{0};
  std::set<int> ids;
  bool stop = false;
  // A fiber that stays alive (and keeps the cache busy) while others end and
  // start.
  boost::fibers::fiber keeper([&] {
    const Tracked* mine = &reg();
    while (!stop) {
      wrong += boost_mismatches(reg, mine);
      boost::this_fiber::yield();
    }
  });
  for (int i = 0; i < 200; ++i) {
    {
      boost::fibers::fiber f([&] {
        const Tracked* mine = &reg();
        wrong += !ids.insert(mine->id()).second;  // a fresh value, never a dead fiber's
        wrong += boost_mismatches(reg, mine);
        if (i % 2 == 0) boost::this_fiber::yield();
        wrong += boost_mismatches(reg, mine);
      });
      f.join();  // ends: the next fiber likely gets the same stack and context
                 // address
    }
    EXPECT_EQ(ledger.destroyed(), i + 1);
  }
  stop = true;
  keeper.join();
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(ledger.made(), 201);
  EXPECT_EQ(ledger.destroyed(), 201);
}

TEST(BoostFiberCache, AScopeRegFiberInsideABoostFiberThenItsStackReused) {
  Ledger ledger;
  std::atomic<int> next{0};
  BoostReg reg([&] { return Tracked(ledger, ++next); });
  std::atomic<int> wrong{0};
  bool release = false;
  const std::size_t boost_stack = boost::context::stack_traits::default_size();
  boost::fibers::fiber outer([&] {
    const Tracked* mine = &reg();
    for (int round = 0; round < 4; ++round) {
      {
        // Same stack size as Boost.Fiber's default: its memory is likely reused
        // by the boost fibers started below once this Fiber is gone.
        Fiber nested(
            [&] {
              wrong += boost_mismatches(reg, mine);  // still the boost fiber's value
              Fiber::yield();
              wrong += boost_mismatches(reg, mine);
            },
            boost::context::fixedsize_stack(boost_stack));
        nested.resume();
        wrong += boost_mismatches(reg, mine);
        nested.resume();
        EXPECT_TRUE(nested.done());
      }  // the nested stack is freed, and no Boost.Fiber fiber ended
      wrong += boost_mismatches(reg, mine);
      boost::this_fiber::yield();  // let the main context start new fibers
                                   // meanwhile
      wrong += boost_mismatches(reg, mine);
    }
    while (!release) boost::this_fiber::yield();
    wrong += boost_mismatches(reg, mine);
  });
  std::vector<boost::fibers::fiber> later;
  for (int i = 0; i < 8; ++i) {
    boost::this_fiber::yield();  // outer runs a round
    later.emplace_back([&] {
      const Tracked* mine = &reg();
      wrong += boost_mismatches(reg, mine);
      boost::this_fiber::yield();
      wrong += boost_mismatches(reg, mine);
    });
  }
  release = true;
  for (auto& f : later) f.join();
  outer.join();
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(ledger.made(), 9);  // outer's and one per later fiber: never shared
  EXPECT_EQ(ledger.destroyed(), 9);
}

TEST(BoostFiberCache, FibersOnSeveralThreadsKeepTheirValues) {
  Ledger ledger;
  std::atomic<int> next{0};
  BoostReg reg([&] { return Tracked(ledger, ++next); });
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t) {
    threads.emplace_back([&] {
      const Tracked* thread_value = &reg();
      std::vector<boost::fibers::fiber> fibers;
      for (int i = 0; i < 20; ++i) {
        fibers.emplace_back([&] {
          const Tracked* mine = &reg();
          wrong += mine == thread_value;
          for (int k = 0; k < 4; ++k) {
            wrong += boost_mismatches(reg, mine);
            boost::this_fiber::yield();
          }
        });
      }
      for (auto& f : fibers) f.join();
      wrong += &reg() != thread_value;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(ledger.made(), 3 + 60);
  EXPECT_EQ(ledger.destroyed(), 3 + 60);
}

// Fibers under Boost.Fiber's shared_work scheduler, on two threads, migrate between them
// at their yields: after every yield each fiber still sees its own value, at every depth
// and call site (the per-thread cache is looked up afresh on each access, never through
// the thread it ran on before).
TEST(BoostFiberCache, FibersMigratingBetweenThreadsKeepTheirValues) {
#ifdef SCOPEREG_TSAN
  GTEST_SKIP() << "Boost.Fiber's libraries are not built for ThreadSanitizer: its "
                  "switches and its mutex's spinlock are invisible to it, so fibers moving "
                  "between threads are reported as races (and crash it); run without TSan";
#endif
#ifdef SCOPEREG_ASAN
  GTEST_SKIP() << "Boost.Fiber's libraries are not built for AddressSanitizer: its stack "
                  "switches are not announced to it, and once in CI a fiber moving between "
                  "threads crashed inside Boost.Fiber's own terminate() under ASan; the plain "
                  "build runs this test";
#endif
  constexpr int kFibers = 16;
  constexpr int kYields = 200;
  Ledger ledger;
  std::atomic<int> next{0};
  BoostReg reg([&] { return Tracked(ledger, ++next); });
  std::atomic<int> wrong{0};
  std::atomic<int> migrations{0};
  boost::fibers::mutex mu;
  boost::fibers::condition_variable_any cv;
  int finished = 0;  // guarded by mu
  auto run_fibers = [&](bool launch) {
    boost::fibers::use_scheduling_algorithm<boost::fibers::algo::shared_work>();
    if (launch) {
      for (int i = 0; i < kFibers; ++i) {
        boost::fibers::fiber([&] {
          const Tracked* mine = &reg();
          std::thread::id on = std::this_thread::get_id();
          for (int k = 0; k < kYields; ++k) {
            boost::this_fiber::yield();
            if (std::this_thread::get_id() != on) {
              ++migrations;
              on = std::this_thread::get_id();
            }
            wrong += boost_mismatches(reg, mine);
          }
          std::unique_lock<boost::fibers::mutex> lock(mu);
          ++finished;
          cv.notify_all();
        }).detach();
      }
    }
    std::unique_lock<boost::fibers::mutex> lock(mu);
    cv.wait(lock, [&] { return finished == kFibers; });
  };
  std::thread a(run_fibers, true);
  std::thread b(run_fibers, false);
  a.join();
  b.join();
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(ledger.made(), kFibers);
  EXPECT_EQ(ledger.destroyed(), kFibers);
  if (migrations == 0) GTEST_SKIP() << "no fiber moved to the other thread in this run";
}

// A stack allocator handing out one fixed memory region (for both kinds of
// fibers). `freed`, if given, is set once the stack is handed back (Boost.Fiber
// releases a terminated fiber's context, which lives on its stack, some time
// after join()).
struct RegionStack {
  char* bottom;
  std::size_t size;
  bool* freed = nullptr;
  boost::context::stack_context allocate() {
    boost::context::stack_context sc;
    sc.size = size;
    sc.sp = bottom + size;
    return sc;
  }
  void deallocate(boost::context::stack_context&) noexcept {
    if (freed != nullptr) *freed = true;
  }
};

[[gnu::noinline]] const Tracked* boost_access_here(BoostReg& reg) { return &reg(); }

// Reaches the registry `bytes` further down the stack than a plain call would
// (through a call made below the alloca: the accessing frame moves with it,
// optimised or not).
[[gnu::noinline]] const Tracked* boost_access_below(BoostReg& reg, std::size_t bytes) {
  char* volatile pad = static_cast<char*>(__builtin_alloca(bytes + 16));
  pad[0] = 1;
  const Tracked* v = boost_access_here(reg);
  return pad[0] == 1 ? v : nullptr;
}

// A Boost.Fiber fiber with the smallest stack the contract allows (Boost's
// stack_traits::minimum_size(): MINSIGSTKSZ, 2-4 KiB on most x86-64 machines,
// 13.5 KiB on this AMX-capable one; see boost_fiber_scope.h) runs a scopereg
// Fiber whose stack lies just below its own, so that frames of the nested stack
// are as close as they can be to the boost fiber's context. The nested stack is
// then freed (no Boost.Fiber fiber ends) and a new boost fiber gets that memory
// as its stack: whatever call depth it uses, it must get its own value, never
// the suspended fiber's.
TEST(BoostFiberCache, ANestedStackBelowASmallBoostFiberStackIsNotTrusted) {
  constexpr std::size_t kNested = 64 * 1024;
  // The minimum, rounded up to whole pages (and at least 8 KiB: ASan's frames
  // need about 7.5 KiB here).
  const std::size_t kSmall =
      (std::max<std::size_t>(boost::context::stack_traits::minimum_size(), 8 * 1024) + 4095) &
      ~std::size_t{4095};
  auto memory = std::make_unique<char[]>(kNested + kSmall + 4096);
  char* const base = reinterpret_cast<char*>(
      (reinterpret_cast<std::uintptr_t>(memory.get()) + 4095) & ~std::uintptr_t{4095});
  char* const nested_region = base;           // the nested Fiber's, then each probe's stack
  char* const small_region = base + kNested;  // the long-lived boost fiber's stack
  std::memset(small_region, 0xCD, kSmall);
  Ledger ledger;
  std::atomic<int> next{0};
  BoostReg reg([&] { return Tracked(ledger, ++next); });
  const Tracked* outer_value = nullptr;
  bool done = false;
  bool go = false;  // outer's turn to run a nested Fiber on the shared region
  int nested_wrong = 0;
  std::uintptr_t window_low = 0;  // the cache's window below outer's context object
  boost::fibers::fiber outer(std::allocator_arg, RegionStack{small_region, kSmall}, [&] {
    window_low = reinterpret_cast<std::uintptr_t>(boost::fibers::context::active()) -
                 internal::boost_fiber_own_stack_window();
    outer_value = &reg();
    while (!done) {
      if (go) {
        {
          Fiber nested(
              [&] {
                nested_wrong += boost_mismatches(reg, outer_value);
                // The last four accesses (the frames the cache keeps)
                // placed as deep as the cache's window below outer's context
                // allows, where a new fiber's frames on this memory can
                // reach: calibrated with one access first.
                nested_wrong += boost_access_below(reg, 0) != outer_value;
                const auto& cache = internal::t_boost_fiber_cache;
                const std::uintptr_t natural =
                    cache.frames[(cache.next + BoostFiberCache::kFrames - 1) %
                                 BoostFiberCache::kFrames];
                for (std::uintptr_t j = 1; j <= 4; ++j) {
                  const std::uintptr_t target = window_low + 0x40 * j;
                  const std::size_t extra = natural > target ? natural - target : 0;
                  nested_wrong += boost_access_below(reg, extra) != outer_value;
                }
              },
              RegionStack{nested_region, kNested});
          nested.resume();
        }  // the nested stack is free again; no Boost.Fiber fiber ended
        go = false;
      }
      boost::this_fiber::yield();  // (never touches the registry)
    }
  });
  int wrong = 0;
  std::set<int> ids;
  constexpr std::size_t kProbes = 256;  // 4 KiB of frame addresses, 16 bytes apart
  for (std::size_t k = 0; k < kProbes; ++k) {
    go = true;
    while (go) boost::this_fiber::yield();  // outer runs its nested Fiber once more
    const Tracked* got = nullptr;
    int got_id = 0;
    bool freed = false;
    {
      boost::fibers::fiber probe(std::allocator_arg, RegionStack{nested_region, kNested, &freed},
                                 [&] {
                                   // sweeps the nested Fiber's frame addresses
                                   got = boost_access_below(reg, 16 * k);
                                   got_id = got != nullptr ? got->id() : 0;
                                 });
      probe.join();
    }
    while (!freed) boost::this_fiber::yield();  // the region is free for the next nested
    if (got == outer_value) ++wrong;
    ids.insert(got_id);
  }
  done = true;
  outer.join();
  std::size_t untouched = 0;
  while (untouched < kSmall && static_cast<unsigned char>(small_region[untouched]) == 0xCD) {
    ++untouched;
  }
  ASSERT_GT(untouched, 256u) << "the small boost fiber stack overflowed; the test is void";
  EXPECT_EQ(nested_wrong, 0);
  EXPECT_EQ(wrong, 0) << "a new boost fiber got a suspended fiber's value (a frame of a "
                         "nested stack, freed since, was trusted as the suspended fiber's)";
  EXPECT_EQ(ids.size(), kProbes);
  EXPECT_EQ(ledger.made(), static_cast<int>(kProbes) + 1);
  EXPECT_EQ(ledger.destroyed(), static_cast<int>(kProbes) + 1);
}

}  // namespace
}  // namespace scopereg
