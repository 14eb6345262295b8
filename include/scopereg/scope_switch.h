// scopereg/scope_switch.h
//
// Being told when a scope becomes, or stops being, the current one on a thread (folly's
// RequestData::onSet()/onUnset() and its context watchers): for code that must follow the
// current scope in state of its own -- a logger's fields, a tracing span, per-request CPU
// accounting.
//
// Value hooks. A value type of a slot-based registry (ExplicitScope, FiberScope) that
// declares
//
//   void on_scope_enter();   // its scope became current on this thread
//   void on_scope_leave();   // its scope stops being current on this thread
//
// has them called at every switch of the current scope on a thread: a ScopeGuard entered
// or left, CapturedScope::run (and wrapped callables) entered or left, a scopereg Fiber
// switched in or out (for FiberScope values, and for the explicit scopes the fiber
// carries), a fiber finishing (on_scope_leave before its values are destroyed); and when
// a value is created or set() in the current scope (on_scope_enter: folly's onSet on
// setContextData) or removed from it by set() or clear() (on_scope_leave, then it is
// destroyed, then the new value's on_scope_enter). A scope that ends as it stops being
// current (its last guard left) has its values' on_scope_leave called before they are
// destroyed. Calls pair exactly per value and thread when a scope is current on one
// thread at a time, also when the code in between throws (the switch back happens in a
// destructor); a scope current on several threads at once (a token entered on two
// threads) gets on_scope_enter for a new value only on the thread that created it.
// FiberScope values of a thread's main context (outside any Fiber) live in the thread's
// scope, which is always current: they get no calls at fiber switches. Order at one switch: the scope being left first (each of its
// values not bound in the scope being entered gets on_scope_leave), then the scope being
// entered (each value not bound in the scope left gets on_scope_enter), then the
// watchers. A value bound in both (an inheriting guard's or a copy's shared value) gets
// neither: it stays current. Nested guards: entering an inner scope leaves the outer one
// and leaving it enters the outer one again. ThreadScope values are always current on
// their thread and get no calls; token-keyed registries (FuncScope) get none either (use
// a watcher).
//
// Watchers. add_scope_switch_watcher(f) calls f(from, to) at every such switch with the
// tokens of the scope left and of the scope entered (a null ScopeToken for "no scope"):
// explicit tokens (kind kExplicit) for guard, run and the explicit part of fiber
// switches; fiber tokens (kind kFiber) for FiberScope's part of a fiber switch.
//
// Thread safety: hooks and watchers run on the switching thread, with no scopereg lock
// held; they may use registries (a value created there is in the scope being entered).
// While a hook runs, its value is kept alive: a registry destroyed meanwhile on another
// thread leaves that value to be destroyed when the hook returns, on the hook's thread
// (after that registry's destructor has returned: do not unload the code of T before).
// Watchers may be added and removed from any thread; a call already running on another
// thread when its handle is released may still finish (keep what it uses alive until
// then). Hooks and watchers must not switch scopes themselves (enter a guard, run a
// captured scope, resume a fiber).
// Exceptions: a hook or watcher that throws does not stop the switch or the other calls:
// the exception is reported on stderr (with the value type's on_scope_enter/leave or
// "watcher") and dropped, and the pairing stays exact.
// Cost: with no hooked registry alive and no watcher, one relaxed load and a predictable
// branch per switch (benchmarks/explicit_scope_benchmark.cc, BM_EnterLeave_*). With them,
// a walk over the values of the two scopes whose counts of hooked values are non-zero,
// and for watchers one process-wide lock per switch.

#ifndef SCOPEREG_SCOPE_SWITCH_H_
#define SCOPEREG_SCOPE_SWITCH_H_

#include <cstdint>
#include <functional>

#include "scopereg/internal/switch_hooks.h"
#include "scopereg/scope.h"

namespace scopereg {

using ScopeSwitchWatcher = std::function<void(ScopeToken from, ScopeToken to)>;

// Removes its watcher when destroyed (or reset()). Movable.
class ScopeSwitchWatcherHandle {
 public:
  ScopeSwitchWatcherHandle() = default;
  ScopeSwitchWatcherHandle(ScopeSwitchWatcherHandle&& other) noexcept
      : id_(std::exchange(other.id_, 0)) {}
  ScopeSwitchWatcherHandle& operator=(ScopeSwitchWatcherHandle&& other) noexcept {
    if (this != &other) {
      reset();
      id_ = std::exchange(other.id_, 0);
    }
    return *this;
  }
  ~ScopeSwitchWatcherHandle() { reset(); }
  // Removes the watcher now: no switch that starts afterwards calls it.
  void reset() noexcept;
  explicit operator bool() const noexcept { return id_ != 0; }

 private:
  friend ScopeSwitchWatcherHandle add_scope_switch_watcher(ScopeSwitchWatcher watcher);
  explicit ScopeSwitchWatcherHandle(std::uint64_t id) : id_(id) {}
  std::uint64_t id_ = 0;
};

// Throws ScopeError if `watcher` is empty.
[[nodiscard]] ScopeSwitchWatcherHandle add_scope_switch_watcher(ScopeSwitchWatcher watcher);

}  // namespace scopereg

#endif  // SCOPEREG_SCOPE_SWITCH_H_
