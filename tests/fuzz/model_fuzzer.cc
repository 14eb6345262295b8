// Model-based fuzzer: reads a byte string as a sequence of operations — create/destroy
// registries of every strategy, enter/leave explicit scopes in any order, get/find/set/
// clear, wrap and run and drop callbacks, run fibers step by step or destroy them, run a
// short thread, check objects out of a Pool and back in (or invalidate them), dispose the
// pool, copy the current scope into a held CapturedScope (copy_context(), also from inside
// another copy), run get/find/set/clear inside a held copy, drop a copy, enter an
// inheriting guard (ScopeGuard(token, inherit)) — applies them to scopereg and to a tiny,
// obviously correct model, and aborts on any difference (which value, which values alive,
// a value destroyed twice). Values bound by several scopes (copies, inheriting guards)
// are shared: the model keeps one binding per (registry, scope) naming the value's serial,
// so a value's reference count is the number of bindings naming it, and it must be alive
// exactly while that count is non-zero. Built with libFuzzer (.ci/fuzz) and, for
// regression, replayed over tests/fuzz/corpus/ by every test build.

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "scopereg/explicit_scope.h"
#include "scopereg/fiber_scope.h"
#include "scopereg/pool.h"
#include "scopereg/scoped_registry.h"

namespace {

using namespace scopereg;

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "model_fuzzer: scopereg differs from the model: %s\n", what.c_str());
  std::abort();
}

// Serials of the values alive in scopereg (single-threaded but for joined threads).
std::set<int>& alive() {
  static std::set<int> serials;
  return serials;
}

struct Value {
  explicit Value(int serial) : serial(serial) {
    if (!alive().insert(serial).second) fail("serial " + std::to_string(serial) + " made twice");
  }
  Value(const Value&) = delete;
  Value& operator=(const Value&) = delete;
  ~Value() {
    if (alive().erase(serial) != 1) {
      fail("value " + std::to_string(serial) + " destroyed twice (or never made)");
    }
  }
  int serial;
};

enum Kind { kThread, kExplicit, kFiber, kFuncExplicit, kKinds };

// A registry of any strategy behind one interface.
class AnyRegistry {
 public:
  virtual ~AnyRegistry() = default;
  virtual Value& get() = 0;
  virtual Value* find() = 0;
  virtual void set(int serial) = 0;
  virtual void clear() = 0;
  virtual std::int64_t size() const = 0;
};

template <typename Scope>
class Registry final : public AnyRegistry {
 public:
  Registry(std::function<Value()> factory, Scope scope) : reg_(std::move(factory), scope) {}
  Value& get() override { return reg_(); }
  Value* find() override { return reg_.find(); }
  void set(int serial) override { reg_.set(serial); }
  void clear() override { reg_.clear(); }
  std::int64_t size() const override { return reg_.size(); }

 private:
  ScopedRegistry<Value, Scope> reg_;
};

// Where an operation runs, for the model's notion of "the current scope".
struct Context {
  int fiber = -1;                            // -1: the main thread's main fiber
  std::optional<std::vector<int>> captured;  // explicit stack inside a wrapped run
  bool other_thread = false;
};

class Fuzz {
 public:
  explicit Fuzz(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}

  void run() {
    while (pos_ < size_) step();
    // Tear everything down; every value must be gone.
    fibers_.clear();
    for (auto& f : fiber_models_) end_fiber_model(f.first);
    fiber_models_.clear();
    wraps_.clear();
    for (auto& w : wrap_models_) release_lives(w);
    wrap_models_.clear();
    copies_.clear();
    for (int life : copy_models_) release_lives({life});
    copy_models_.clear();
    leases_.clear();
    lease_models_.clear();
    pool_.reset();
    pool_idle_.clear();
    while (!guards_.empty()) leave(0);
    for (int slot = 0; slot < kSlots; ++slot) destroy_registry(slot);
    check_all("teardown");
    if (!alive().empty()) fail("values alive after teardown: " + std::to_string(alive().size()));
  }

 private:
  static constexpr int kSlots = 3;
  static constexpr int kTokens = 4;
  static constexpr std::size_t kCopies = 4;

  std::uint8_t byte() { return pos_ < size_ ? data_[pos_++] : 0; }

  void step() {
    // Op bytes below 224 (= 16 * 14) keep their meaning from before the copy operations,
    // so the checked-in corpus still drives the same operations.
    const std::uint8_t raw = byte();
    const int a = byte();
    if (raw >= 224) {
      const int op = (raw - 224) % 5;
      switch (op) {
        case 0: copy_current(a); break;
        case 1: copy_inside_copy(a); break;
        case 2: run_in_copy(a, byte(), byte() % kSlots); break;
        case 3: drop_copy(a); break;
        case 4: enter_inheriting(a % kTokens); break;
      }
      check_all("copy op " + std::to_string(op));
      return;
    }
    const std::uint8_t op = raw % 14;
    switch (op) {
      case 0: create_registry(a % kSlots, static_cast<Kind>((a / kSlots) % kKinds)); break;
      case 1: destroy_registry(a % kSlots); break;
      case 2: get(a % kSlots, Context{}); break;
      case 3: find(a % kSlots, Context{}); break;
      case 4: set(a % kSlots, Context{}); break;
      case 5: clear(a % kSlots, Context{}); break;
      case 6: enter(a % kTokens); break;
      case 7: if (!guards_.empty()) leave(a % guards_.size()); break;
      case 8: wrap(); break;
      case 9: run_wrapped(a, byte() % kSlots); break;
      case 10: drop_wrapped(a); break;
      case 11: fiber_op(a, byte() % kSlots); break;
      case 12: other_thread(a % kSlots); break;
      case 13: pool_op(a); break;
    }
    check_all("op " + std::to_string(op));
  }

  // ---- the model ----
  std::optional<std::string> key_for(int slot, const Context& ctx) const {
    switch (kind_[slot]) {
      case kThread:
        return ctx.other_thread ? "T-other" : "T-main";
      case kFiber:
        if (ctx.other_thread) return "F-other";
        return ctx.fiber < 0 ? std::string("F-main") : "F" + std::to_string(ctx.fiber);
      case kExplicit:
      case kFuncExplicit: {
        if (ctx.other_thread || ctx.fiber >= 0) return std::nullopt;  // fresh stacks there
        const std::vector<int> stack = ctx.captured ? *ctx.captured : live_stack();
        if (stack.empty()) return std::nullopt;
        return "E" + std::to_string(stack.back());
      }
      default:
        return std::nullopt;
    }
  }
  std::vector<int> live_stack() const {
    std::vector<int> lives;
    for (const auto& g : guard_models_) lives.push_back(g.second);
    return lives;
  }
  void erase_key(const std::string& key) {
    for (auto it = values_.begin(); it != values_.end();) {
      it = it->first.second == key ? values_.erase(it) : std::next(it);
    }
  }
  void release_lives(const std::vector<int>& lives) {
    for (int life : lives) {
      if (--life_refs_[life] == 0) {
        life_refs_.erase(life);
        for (auto it = token_life_.begin(); it != token_life_.end();) {
          it = it->second == life ? token_life_.erase(it) : std::next(it);
        }
        erase_key("E" + std::to_string(life));
      }
    }
  }
  void end_fiber_model(int id) { erase_key("F" + std::to_string(id)); }

  // Binds in scope `to` every explicit-keyed value of scope `from` that `to` has no value
  // of yet (copy_context, ScopeGuard(token, inherit)): the same serial, one more binding.
  void share_bindings(int from, int to) {
    for (int slot = 0; slot < kSlots; ++slot) {
      if (kind_[slot] != kExplicit && kind_[slot] != kFuncExplicit) continue;
      auto it = values_.find(std::make_pair(slot, "E" + std::to_string(from)));
      if (it == values_.end()) continue;
      values_.emplace(std::make_pair(slot, "E" + std::to_string(to)), it->second);
    }
  }

  void check_all(const std::string& where) {
    // Alive: exactly the values some binding names (a shared value counts once), plus the
    // pool's.
    std::set<int> expected(pool_idle_.begin(), pool_idle_.end());
    expected.insert(lease_models_.begin(), lease_models_.end());
    for (const auto& v : values_) expected.insert(v.second);
    if (alive() != expected) {
      std::string diff;
      for (int s : alive()) {
        if (!expected.count(s)) diff += " +" + std::to_string(s);
      }
      for (int s : expected) {
        if (!alive().count(s)) diff += " -" + std::to_string(s);
      }
      fail(where + ": " + std::to_string(alive().size()) + " values alive, model has " +
           std::to_string(expected.size()) + " (alive but not in the model: +, dead but in "
           "the model: -):" + diff);
    }
    for (int slot = 0; slot < kSlots; ++slot) {
      std::int64_t n = 0;
      for (const auto& v : values_) n += v.first.first == slot;
      if (regs_[slot] && regs_[slot]->size() != n) {
        fail(where + ": registry " + std::to_string(slot) + " size " +
             std::to_string(regs_[slot]->size()) + ", model " + std::to_string(n));
      }
    }
  }

  // ---- operations ----
  void create_registry(int slot, Kind kind) {
    destroy_registry(slot);
    auto factory = [this] { return Value(++serial_); };
    switch (kind) {
      case kThread: regs_[slot] = std::make_unique<Registry<ThreadScope>>(factory, ThreadScope()); break;
      case kExplicit: regs_[slot] = std::make_unique<Registry<ExplicitScope>>(factory, ExplicitScope()); break;
      case kFiber: regs_[slot] = std::make_unique<Registry<FiberScope>>(factory, FiberScope()); break;
      default:
        regs_[slot] = std::make_unique<Registry<FuncScope>>(factory, FuncScope(ExplicitScope::func()));
    }
    kind_[slot] = kind;
  }
  void destroy_registry(int slot) {
    regs_[slot].reset();
    kind_[slot] = kKinds;
    for (auto it = values_.begin(); it != values_.end();) {
      it = it->first.first == slot ? values_.erase(it) : std::next(it);
    }
  }
  void get(int slot, const Context& ctx) {
    if (!regs_[slot]) return;
    const auto key = key_for(slot, ctx);
    if (!key) {
      try {
        regs_[slot]->get();
      } catch (const ScopeError&) {
        return;
      }
      fail("get with no scope did not throw ScopeError");
    }
    const int got = regs_[slot]->get().serial;
    auto [it, inserted] = values_.emplace(std::make_pair(slot, *key), serial_);
    if (!inserted && it->second != got) {
      fail("get returned serial " + std::to_string(got) + ", model " + std::to_string(it->second));
    }
    if (inserted && got != serial_) fail("get did not create a fresh value");
    if (ctx.other_thread) values_.erase(it);  // the thread ends right after
  }
  void find(int slot, const Context& ctx) {
    if (!regs_[slot]) return;
    const auto key = key_for(slot, ctx);
    Value* v = regs_[slot]->find();
    auto it = key ? values_.find(std::make_pair(slot, *key)) : values_.end();
    if ((v == nullptr) != (it == values_.end()) || (v && v->serial != it->second)) {
      fail("find differs");
    }
  }
  void set(int slot, const Context& ctx) {
    if (!regs_[slot]) return;
    const auto key = key_for(slot, ctx);
    if (!key) {
      try {
        regs_[slot]->set(-1);
      } catch (const ScopeError&) {
        return;
      }
      fail("set with no scope did not throw");
    }
    regs_[slot]->set(++serial_);
    values_[std::make_pair(slot, *key)] = serial_;
  }
  void clear(int slot, const Context& ctx) {
    if (!regs_[slot]) return;
    regs_[slot]->clear();
    if (const auto key = key_for(slot, ctx)) values_.erase(std::make_pair(slot, *key));
  }
  void enter(int token, bool inherit = false) {
    if (guards_.size() >= 8) return;
    const std::vector<int> outer = live_stack();
    guards_.push_back(inherit ? std::make_unique<ScopeGuard>(token, scopereg::inherit)
                              : std::make_unique<ScopeGuard>(token));
    auto it = token_life_.find(token);
    const int life = it != token_life_.end() ? it->second : ++next_life_;
    token_life_[token] = life;
    ++life_refs_[life];
    guard_models_.emplace_back(token, life);
    // The token's scope keeps its own values; it gains the current scope's others.
    if (inherit && !outer.empty() && outer.back() != life) share_bindings(outer.back(), life);
  }
  void enter_inheriting(int token) { enter(token, /*inherit=*/true); }

  // ---- copies: each held CapturedScope from copy_context() is one scope (a life) ----
  void hold_copy(CapturedScope copy, int life, int a) {
    if (copies_.size() < kCopies) {
      copies_.push_back(std::move(copy));
      copy_models_.push_back(life);
      return;
    }
    const std::size_t i = static_cast<std::size_t>(a / 8) % copies_.size();  // replace one
    copies_[i] = std::move(copy);
    const int old = copy_models_[i];
    copy_models_[i] = life;
    release_lives({old});
  }
  // A new scope holding the current scope's values (a new, empty one with no scope).
  int new_copy_life(const std::vector<int>& stack) {
    const int life = ++next_life_;
    life_refs_[life] = 1;
    if (!stack.empty()) share_bindings(stack.back(), life);
    return life;
  }
  void copy_current(int a) {
    CapturedScope copy = copy_context();
    hold_copy(std::move(copy), new_copy_life(live_stack()), a);
  }
  void copy_inside_copy(int a) {
    if (copies_.empty()) return;
    const std::size_t i = static_cast<std::size_t>(a) % copies_.size();
    CapturedScope copy = copies_[i].run([] { return copy_context(); });
    hold_copy(std::move(copy), new_copy_life({copy_models_[i]}), a);
  }
  void run_in_copy(int a, int what, int slot) {
    if (copies_.empty()) return;
    const std::size_t i = static_cast<std::size_t>(a) % copies_.size();
    const ScopeToken before = ExplicitScope::current();
    Context ctx;
    ctx.captured = std::vector<int>{copy_models_[i]};
    copies_[i].run([&] {
      switch (what % 4) {
        case 0: get(slot, ctx); break;
        case 1: find(slot, ctx); break;
        case 2: set(slot, ctx); break;
        case 3: clear(slot, ctx); break;
      }
    });
    if (ExplicitScope::current() != before) fail("run() of a copy did not restore the scope");
  }
  void drop_copy(int a) {
    if (copies_.empty()) return;
    const std::size_t i = static_cast<std::size_t>(a) % copies_.size();
    copies_.erase(copies_.begin() + static_cast<std::ptrdiff_t>(i));
    const int life = copy_models_[i];
    copy_models_.erase(copy_models_.begin() + static_cast<std::ptrdiff_t>(i));
    release_lives({life});
  }
  void leave(std::size_t i) {
    guards_.erase(guards_.begin() + static_cast<std::ptrdiff_t>(i));
    const int life = guard_models_[i].second;
    guard_models_.erase(guard_models_.begin() + static_cast<std::ptrdiff_t>(i));
    release_lives({life});
    const auto expect = live_stack();
    const ScopeToken now = ExplicitScope::current();
    if (expect.empty() != now.is_null()) fail("current scope after leave differs");
  }
  void wrap() {
    if (wraps_.size() >= 4) return;
    wraps_.push_back(CapturedScope::current());
    std::vector<int> lives = live_stack();
    for (int life : lives) ++life_refs_[life];
    wrap_models_.push_back(std::move(lives));
  }
  void run_wrapped(int i, int slot) {
    if (wraps_.empty()) return;
    i %= static_cast<int>(wraps_.size());
    const ScopeToken before = ExplicitScope::current();
    Context ctx;
    ctx.captured = wrap_models_[i];
    wraps_[i].run([&] { get(slot, ctx); });
    if (ExplicitScope::current() != before) fail("run() did not restore the caller's scope");
  }
  void drop_wrapped(int i) {
    if (wraps_.empty()) return;
    i %= static_cast<int>(wraps_.size());
    wraps_.erase(wraps_.begin() + i);
    release_lives(wrap_models_[i]);
    wrap_models_.erase(wrap_models_.begin() + i);
  }
  // a: bit 0-1 which fiber, bits 2-3 create / resume / destroy.
  void fiber_op(int a, int slot) {
    const int f = a % 2;
    const int what = (a / 2) % 3;
    auto it = fibers_.find(f);
    if (what == 0 && it == fibers_.end()) {
      const int id = ++next_fiber_;
      fiber_models_[f] = id;
      fibers_.emplace(f, Fiber([this, id, slot] {
                        Context ctx;
                        ctx.fiber = id;
                        get(slot, ctx);
                        Fiber::yield();
                        get(slot, ctx);
                      }));
    } else if (what == 1 && it != fibers_.end()) {
      it->second.resume();
      if (it->second.done()) {
        end_fiber_model(fiber_models_[f]);
        fibers_.erase(it);
        fiber_models_.erase(f);
      }
    } else if (what == 2 && it != fibers_.end()) {
      fibers_.erase(it);  // unwound: its values go
      end_fiber_model(fiber_models_[f]);
      fiber_models_.erase(f);
    }
  }
  // Pool<Value>: pool_size 2, max_overflow 1, LIFO. The model: the idle serials (most
  // recent last) and the serial of every lease out.
  void pool_op(int a) {
    if (!pool_) {
      pool_ = std::make_unique<Pool<Value>>(PoolOptions<Value>{
          .connect = [this] { return Value(++serial_); },
          .pool_size = 2,
          .max_overflow = 1,
          .timeout = std::chrono::milliseconds(0)});
    }
    const int what = a % 4;
    if (what == 0) {  // checkout
      if (leases_.size() == 3) {
        try {
          (void)pool_->checkout();
          fail("checkout beyond pool_size + max_overflow succeeded");
        } catch (const PoolTimeout&) {
        }
        return;
      }
      const int expected = pool_idle_.empty() ? serial_ + 1 : pool_idle_.back();
      if (!pool_idle_.empty()) pool_idle_.pop_back();
      leases_.push_back(pool_->checkout());
      lease_models_.push_back(expected);
      if (leases_.back()->serial != expected) {
        fail("checkout gave " + std::to_string(leases_.back()->serial) + ", model " +
             std::to_string(expected));
      }
    } else if ((what == 1 || what == 2) && !leases_.empty()) {  // checkin, or invalidate
      const std::size_t i = static_cast<std::size_t>(a / 4) % leases_.size();
      if (what == 2) leases_[i].invalidate();
      leases_[i].release();
      if (what == 1 && pool_idle_.size() < 2) pool_idle_.push_back(lease_models_[i]);
      leases_.erase(leases_.begin() + static_cast<std::ptrdiff_t>(i));
      lease_models_.erase(lease_models_.begin() + static_cast<std::ptrdiff_t>(i));
    } else if (what == 3) {  // dispose: idle ones close now, leases out close on return
      pool_->dispose();
      pool_idle_.clear();
      disposed_.insert(lease_models_.begin(), lease_models_.end());
    }
    // A lease out at a dispose() is closed on return, never kept.
    std::erase_if(pool_idle_, [this](int serial) { return disposed_.count(serial) != 0; });
    const PoolStats st = pool_->stats();
    if (st.idle != pool_idle_.size() || st.checked_out != leases_.size()) {
      fail("pool: idle " + std::to_string(st.idle) + " out " + std::to_string(st.checked_out) +
           ", model " + std::to_string(pool_idle_.size()) + " / " +
           std::to_string(leases_.size()));
    }
  }

  void other_thread(int slot) {
    Context ctx;
    ctx.other_thread = true;
    std::thread([&] { get(slot, ctx); }).join();
  }

  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
  int serial_ = 0;
  std::unique_ptr<AnyRegistry> regs_[kSlots];
  Kind kind_[kSlots] = {kKinds, kKinds, kKinds};
  std::map<std::pair<int, std::string>, int> values_;  // (slot, scope key) -> serial
  std::vector<std::unique_ptr<ScopeGuard>> guards_;
  std::vector<std::pair<int, int>> guard_models_;  // (token, life), innermost last
  std::map<int, int> token_life_;                  // token -> its live life
  std::map<int, int> life_refs_;                   // life -> guards + wraps holding it
  int next_life_ = 0;
  std::vector<CapturedScope> wraps_;
  std::vector<std::vector<int>> wrap_models_;
  std::vector<CapturedScope> copies_;  // from copy_context()
  std::vector<int> copy_models_;        // the life (scope) each copy holds
  std::map<int, Fiber> fibers_;
  std::map<int, int> fiber_models_;  // fiber slot -> model id
  int next_fiber_ = 0;
  std::unique_ptr<Pool<Value>> pool_;
  std::vector<Pool<Value>::Lease> leases_;
  std::vector<int> lease_models_;  // serial of each lease out
  std::vector<int> pool_idle_;     // serials idle in the pool, most recent last
  std::set<int> disposed_;         // serials out at a dispose(): closed on return
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Fuzz(data, size).run();
  return 0;
}
