// Model-based fuzzer: reads a byte string as a sequence of operations — create/destroy
// registries of every strategy, enter/leave explicit scopes in any order, get/find/set/
// clear, wrap and run and drop callbacks, run fibers step by step or destroy them, run a
// short thread, check objects out of a Pool and back in (or invalidate them), dispose the
// pool — applies them to scopereg and to a tiny, obviously correct model, and
// aborts on any difference (which value, how many alive). Built with libFuzzer
// (.ci/fuzz) and, for regression, replayed over tests/fuzz/corpus/ by every test build.

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

int g_live = 0;  // values alive in scopereg (single-threaded but for joined threads)

struct Value {
  explicit Value(int serial) : serial(serial) { ++g_live; }
  Value(const Value&) = delete;
  Value& operator=(const Value&) = delete;
  ~Value() { --g_live; }
  int serial;
};

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "model_fuzzer: scopereg differs from the model: %s\n", what.c_str());
  std::abort();
}

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
    leases_.clear();
    lease_models_.clear();
    pool_.reset();
    pool_idle_.clear();
    while (!guards_.empty()) leave(0);
    for (int slot = 0; slot < kSlots; ++slot) destroy_registry(slot);
    check_all("teardown");
    if (g_live != 0) fail("values alive after teardown: " + std::to_string(g_live));
  }

 private:
  static constexpr int kSlots = 3;
  static constexpr int kTokens = 4;

  std::uint8_t byte() { return pos_ < size_ ? data_[pos_++] : 0; }

  void step() {
    const std::uint8_t op = byte() % 14;
    const int a = byte();
    switch (op) {
      case 0: create_registry(a % kSlots, static_cast<Kind>((a / kSlots) % kKinds)); break;
      case 1: destroy_registry(a % kSlots); break;
      case 2: get(a % kSlots, Context{}); break;
      case 3: find(a % kSlots, Context{}); break;
      case 4: set(a % kSlots); break;
      case 5: clear(a % kSlots); break;
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

  void check_all(const std::string& where) {
    std::size_t expected = values_.size() + pool_idle_.size() + leases_.size();
    if (static_cast<std::size_t>(g_live) != expected) {
      fail(where + ": " + std::to_string(g_live) + " values alive, model has " +
           std::to_string(expected));
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
  void set(int slot) {
    if (!regs_[slot]) return;
    const auto key = key_for(slot, Context{});
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
  void clear(int slot) {
    if (!regs_[slot]) return;
    regs_[slot]->clear();
    if (const auto key = key_for(slot, Context{})) values_.erase(std::make_pair(slot, *key));
  }
  void enter(int token) {
    if (guards_.size() >= 8) return;
    guards_.push_back(std::make_unique<ScopeGuard>(token));
    auto it = token_life_.find(token);
    const int life = it != token_life_.end() ? it->second : ++next_life_;
    token_life_[token] = life;
    ++life_refs_[life];
    guard_models_.emplace_back(token, life);
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
