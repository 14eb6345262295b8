// scopereg/internal/switch_hooks.h -- not part of the public API.
//
// The switch points of scopereg (guards, CapturedScope::run, fiber switches) call
// notify_switch(from, to) when `g_switch_hooks` is non-zero: the number of registries of
// hooked value types alive plus the number of watchers (scope_switch.h). Zero cost beyond
// that one relaxed load when nothing is hooked.

#ifndef SCOPEREG_INTERNAL_SWITCH_HOOKS_H_
#define SCOPEREG_INTERNAL_SWITCH_HOOKS_H_

#include <atomic>

namespace scopereg::internal {

class ScopeState;
struct NodeBase;

extern constinit std::atomic<int> g_switch_hooks;

[[gnu::always_inline]] inline bool switch_hooks_active() noexcept {
  return g_switch_hooks.load(std::memory_order_relaxed) != 0;
}

// Calls the value hooks and watchers for a switch of the current scope from `from` to
// `to` on this thread (either may be null; nothing happens when they are equal).
void notify_switch(ScopeState* from, ScopeState* to) noexcept;

// A hooked value created, or installed by set(), in the calling (current) scope becomes
// current: enter. One removed from it by set() or clear(): leave. Exceptions are reported
// and dropped, as at switches.
void enter_current(NodeBase* node) noexcept;
void leave_current(NodeBase* node) noexcept;

// A registry of a hooked value type is created (+1) or destroyed (-1).
void count_hooked_registry(int delta) noexcept;

}  // namespace scopereg::internal

#endif  // SCOPEREG_INTERNAL_SWITCH_HOOKS_H_
