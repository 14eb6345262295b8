// scopereg/scoped_registry.h
//
// ScopedRegistry<T, Scope>: one lazily created T per scope (SQLAlchemy's ScopedRegistry).
//
//   // One connection per thread, opened on first use, closed at thread exit:
//   scopereg::ScopedRegistry<Connection> conn([] { return Connection("db.sqlite"); });
//   conn().execute("...");
//
//   // Scope chosen at run time (SQLAlchemy's scopefunc):
//   scopereg::ScopedRegistry<Session, scopereg::FuncScope> session(
//       make_session, scopereg::ThreadScope::func());
//
// `Scope` is a strategy (scopereg/scope.h): ThreadScope (default), FiberScope,
// ExplicitScope, FuncScope / FuncScopeOf<K>, or a user type satisfying `ScopeStrategy`
// (docs/adding-a-strategy.md). The built-in strategies keep values in per-scope slot arrays
// (a hit is a few loads, no lock); other strategies key values by their token in a sharded
// hash map. Either way the registry runs one code path: find the calling scope's value
// (the backend's job), else create it through one creation protocol, so a misuse gives the
// same error whichever strategy is used (docs/architecture.md).
//
// Lifetime: a value lives until its scope ends (thread exit, fiber end, last guard gone,
// `end_scope`), until `clear()`/`set()` in its scope replaces it, or until the registry is
// destroyed, whichever comes first; it is destroyed exactly once. A reference returned by
// the registry stays valid until then. Destroying the registry destroys its values in
// every scope, including scopes still running, and waits for any value of it that an
// ending scope is destroying at that moment; no other call on the registry may run
// concurrently with its destruction (a value's destructor that calls its own registry
// from a scope ending on another thread at that moment is such a call; it is tolerated,
// in that ending scope itself, by the strategies with slot storage: every built-in one
// but FuncScope). One exception to "destroyed by then": a value whose
// switch hook (scope_switch.h) is running on another thread at that moment is destroyed
// when the hook returns, on that thread, after the registry's destructor has returned
// (code that unloads a plugin holding the registry must first stop the threads that
// switch scopes holding its hooked values). The destruction allocates nothing it cannot
// do without: out of memory, it still destroys every value, exactly once (some earlier
// than it otherwise would, between its visits of the scopes).
//
// T: any object type; it need not be copyable or movable (values are built in place).
// Concurrent use of one value from several threads (possible only when a scope is shared,
// as an explicit token active on several threads) needs T to be thread-safe itself.

#ifndef SCOPEREG_SCOPED_REGISTRY_H_
#define SCOPEREG_SCOPED_REGISTRY_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "scopereg/error.h"
#include "scopereg/func_scope.h"
#include "scopereg/internal/creation.h"
#include "scopereg/internal/fork.h"
#include "scopereg/internal/keyed_store.h"
#include "scopereg/internal/mutex.h"
#include "scopereg/internal/node.h"
#include "scopereg/internal/scope_state.h"
#include "scopereg/internal/switch_hooks.h"
#include "scopereg/scope.h"
#include "scopereg/thread_scope.h"

namespace scopereg {

namespace internal {
// The backend a strategy selects: slot arrays for slot-based strategies (every built-in
// one), a token-keyed map otherwise. Both have the same small interface: find, has_scope,
// cell (for the creation protocol in creation.h), size, for_each.
template <typename Scope>
using BackendFor =
    std::conditional_t<SlotStrategy<Scope>, SlotBackend<Scope>, KeyedBackend<Scope>>;
}  // namespace internal

template <typename T, ScopeStrategy Scope = ThreadScope>
class ScopedRegistry {
 public:
  using value_type = T;
  using Token = typename Scope::Token;
  using Factory = std::function<T()>;

  // Creates values with T's default constructor.
  ScopedRegistry()
    requires std::is_default_constructible_v<T> && std::is_default_constructible_v<Scope>
      : ScopedRegistry([] { return T(); }) {}

  // Creates values with `factory`, keyed by `scope`.
  // Throws ScopeError if `factory` is empty.
  //
  // `name`, if given, names the registry in error messages (default:
  // "ScopedRegistry<T>").
  explicit ScopedRegistry(Factory factory, Scope scope = Scope(), std::string name = {})
      : scope_(std::move(scope)),
        name_(name.empty() ? "ScopedRegistry<" + internal::type_name<T>() + ">"
                           : std::move(name)) {
    factories_.push_back(checked(std::move(factory)));
    factory_.store(factories_.back().get(), std::memory_order_release);
    if constexpr (kHooked) internal::count_hooked_registry(+1);
  }

  ScopedRegistry(const ScopedRegistry&) = delete;
  ScopedRegistry& operator=(const ScopedRegistry&) = delete;

  // Destroys every value of this registry in every scope (see the file comment).
  ~ScopedRegistry() {
    if constexpr (kHooked) internal::count_hooked_registry(-1);
  }

  // ScopedRegistry::operator()
  //
  // Returns the value of the calling scope, creating it with the factory on first use.
  // Thread safety: safe to call concurrently from any number of scopes; the factory runs at
  // most once per scope and never under a registry-wide lock (callers sharing the scope
  // wait for it; inside a scopereg Fiber they yield while they wait: see fiber.h).
  // Cost: on a hit, the strategy's current-scope look-up plus two loads for built-in
  // strategies; one indirect call plus a thread-local cache probe for FuncScope (see
  // benchmarks/scoped_registry_benchmark.cc).
  // Throws: whatever the factory throws (nothing is stored, the next call retries);
  // ScopeError when there is no active scope or the factory re-enters this registry.
  T& operator()() {
    if (internal::NodeBase* n = backend_.find(scope_)) [[likely]] {
      return internal::value_of<T>(n);
    }
    return create_from_factory();
  }

  // Creates the calling scope's value as T(args...). Only when the scope has no value yet:
  // otherwise throws ScopeError ("already present; no new arguments may be specified"),
  // as SQLAlchemy does, and leaves the existing value alone.
  // Throws: as operator(), plus that error.
  template <typename... Args>
  T& create(Args&&... args) {
    bool created = false;
    internal::NodeBase* n = get_or_create(
        [&]() -> internal::NodeBase* {
          return new internal::Node<T>(std::in_place, std::forward<Args>(args)...);
        },
        &created);
    if (!created) {
      throw ScopeError(
          "scopereg: ScopedRegistry::create: the current scope already has a value; no new "
          "arguments may be specified. Call clear() first to replace it, or operator() to "
          "use the existing value");
    }
    if constexpr (kHooked) internal::enter_current(n);
    return internal::value_of<T>(n);
  }

  // Whether the calling scope has a value. Never creates. False with no active scope.
  bool has() const { return find() != nullptr; }

  // The calling scope's value, or null. Never creates, never throws for a missing scope.
  T* find() const {
    internal::NodeBase* n = backend_.find(scope_);
    return n != nullptr ? &internal::value_of<T>(n) : nullptr;
  }

  // Replaces the calling scope's value with T(args...) and returns it; the previous value
  // (if any) is destroyed after the new one is installed. T(args...) is built before
  // anything changes: if it throws, the old value stays.
  // Throws: ScopeError with no active scope, or when called from inside the factory
  // creating this scope's value; whatever T's constructor throws.
  template <typename... Args>
  T& set(Args&&... args) {
    auto node = std::make_unique<internal::Node<T>>(std::in_place, std::forward<Args>(args)...);
    auto cell = backend_.cell(scope_);
    internal::NodeBase* old = internal::exchange(cell, node.get(), name_.c_str());
    internal::Node<T>* installed = node.release();
    if constexpr (kHooked) {
      if (old != nullptr) internal::leave_current(old);
    }
    internal::release(old);  // destroyed unless a copied scope still binds it
    if constexpr (kHooked) internal::enter_current(installed);
    return installed->value;
  }

  // Destroys the calling scope's value, if any. A no-op on an empty scope or with no
  // active scope. The value is destroyed on the calling thread with no lock held.
  // Throws: ScopeError when called from inside the factory creating this scope's value.
  void clear() {
    if (!backend_.has_scope(scope_)) return;
    auto cell = backend_.cell(scope_);
    internal::NodeBase* old = internal::exchange(cell, nullptr, name_.c_str());
    if constexpr (kHooked) {
      if (old != nullptr) internal::leave_current(old);
    }
    internal::release(old);
  }

  // Replaces the factory. Values that exist keep living; only values created afterwards
  // use the new factory. Thread safety: may run concurrently with any other call; a
  // creation that already started finishes with the factory it started with.
  // Cost: replaced factories are kept until the registry is destroyed (a creation may
  // still be running one), so calling this in a loop grows memory.
  // Throws ScopeError if `factory` is empty.
  void set_factory(Factory factory) {
    std::unique_ptr<const Factory> next = checked(std::move(factory));
    internal::MutexLock lock(factory_mu_);
    factories_.push_back(std::move(next));
    factory_.store(factories_.back().get(), std::memory_order_release);
  }

  // Number of values bound across all scopes (a value shared by a scope and its copies,
  // copy_context() / inherit, counts once per scope). Exact when nothing runs concurrently;
  // otherwise a value that was true at some moment during the call. Cost: 16 loads (one
  // per shard) for token-keyed strategies; for slot-based ones (thread, fiber, explicit) a
  // walk over every live scope under its domain's lock (no shared counter is written on
  // creation, so that scopes on different threads never share a cache line): a
  // diagnostic, not a hot path.
  std::int64_t size() const { return backend_.size(); }

  // Calls visit(token, value) for each live value in every scope. A value created or
  // destroyed concurrently may or may not be visited; each visited value stays alive
  // during its call. `visit` runs under scopereg's locks: it must not call scopereg, and
  // it must not assume the owning scope is not using the value concurrently.
  // For slot-based strategies the token passed is the scope's ScopeToken.
  template <typename F>
  void for_each(F&& visit) {
    backend_.for_each([&](const auto& token, internal::NodeBase* n) {
      visit(token, internal::value_of<T>(n));
    });
  }

  // Ends `token`'s scope in this registry: its value, if any, is destroyed now, on the
  // calling thread. For token-keyed strategies (FuncScope, FuncScopeOf<K>, user
  // strategies); built-in strategies end their scopes themselves. Must not race with code
  // using that value. (scopereg::end_scope(token) does this for every registry at once.)
  void end_scope(const Token& token)
    requires(!internal::SlotStrategy<Scope>)
  {
    auto cell = backend_.cell_of(token);
    internal::release(internal::exchange(cell, nullptr, name_.c_str()));
  }

  // The strategy this registry was built with.
  const Scope& scope() const { return scope_; }

 private:
  static std::unique_ptr<const Factory> checked(Factory factory) {
    if (!factory) {
      throw ScopeError(
          "scopereg: ScopedRegistry needs a factory; got an empty one. Pass a callable "
          "returning T, or use the default constructor when T is default-constructible");
    }
    return std::make_unique<const Factory>(std::move(factory));
  }

  internal::NodeBase* get_or_create(absl::FunctionRef<internal::NodeBase*()> make,
                                    bool* created) {
    auto cell = backend_.cell(scope_);
    return internal::get_or_create(cell, make, created, name_.c_str());
  }

  // The slow path of operator(), kept out of line.
  [[gnu::noinline]] T& create_from_factory() {
    const Factory* factory = factory_.load(std::memory_order_acquire);
    bool created = false;
    internal::NodeBase* n = get_or_create(
        [&]() -> internal::NodeBase* {
          return new internal::Node<T>(internal::kFromFactory, *factory);
        },
        &created);
    if constexpr (kHooked) {
      if (created) internal::enter_current(n);
    }
    return internal::value_of<T>(n);
  }

  // T has on_scope_enter()/on_scope_leave() (scope_switch.h) and the strategy switches.
  static constexpr bool kHooked = internal::HookedValue<T> && internal::SlotStrategy<Scope>;

  [[no_unique_address]] Scope scope_;
  const std::string name_;  // in error messages
  // The factories before the backend: they outlive its destructor, during which a value's
  // destructor may still call this registry in the scope being ended (see retire()).
  std::atomic<const Factory*> factory_{nullptr};  // the newest of factories_
  internal::ForkSafeMutex factory_mu_;            // serialises set_factory
  std::vector<std::unique_ptr<const Factory>> factories_ ABSL_GUARDED_BY(factory_mu_);
  mutable internal::BackendFor<Scope> backend_;
};

}  // namespace scopereg

#endif  // SCOPEREG_SCOPED_REGISTRY_H_
