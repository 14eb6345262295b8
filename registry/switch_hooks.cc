// Scope-switch hooks and watchers (scope_switch.h).

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "scopereg/error.h"
#include "scopereg/internal/creation.h"
#include "scopereg/internal/fork.h"
#include "scopereg/internal/scope_state.h"
#include "scopereg/scope_switch.h"

namespace scopereg {
namespace internal {

constinit std::atomic<int> g_switch_hooks{0};

namespace {

struct Watchers {
  ForkSafeMutex mu;  // a leaf lock: fork() takes it (fork.h)
  std::uint64_t next_id ABSL_GUARDED_BY(mu) = 1;
  // Copied out under mu for each switch; never called under it.
  std::vector<std::pair<std::uint64_t, std::shared_ptr<const ScopeSwitchWatcher>>> list
      ABSL_GUARDED_BY(mu);
};
Watchers& watchers() {
  static Watchers* const w = new Watchers;  // never destroyed, on purpose
  return *w;
}
constinit std::atomic<int> g_watcher_count{0};

void report_hook_failure(const char* what) noexcept {
  try {
    report_to_stderr(absl::InternalError(std::string("scopereg: a scope-switch ") + what +
                                         " threw; the switch went on: " +
                                         describe_current_exception()));
  } catch (...) {  // no memory for the message
    report_without_memory("a scope-switch hook threw", what);
  }
}

}  // namespace

void enter_current(NodeBase* node) noexcept {
  try {
    node->enter();
  } catch (...) {
    report_hook_failure("on_scope_enter()");
  }
}

void leave_current(NodeBase* node) noexcept {
  try {
    node->leave();
  } catch (...) {
    report_hook_failure("on_scope_leave()");
  }
}

void count_hooked_registry(int delta) noexcept {
  g_switch_hooks.fetch_add(delta, std::memory_order_relaxed);
}

void notify_switch(ScopeState* from, ScopeState* to) noexcept {
  if (from == to) return;
  absl::InlinedVector<NodeBase*, 4> leaving;
  absl::InlinedVector<NodeBase*, 4> entering;
  try {
    if (from != nullptr) from->hooked_not_in(to, leaving);
    if (to != nullptr) to->hooked_not_in(from, entering);
  } catch (...) {  // allocation failure: the hooks of this switch are lost, reported
    report_hook_failure("bookkeeping");
  }
  for (NodeBase* node : leaving) leave_current(node);
  for (NodeBase* node : entering) enter_current(node);
  for (NodeBase* node : leaving) release(node);
  for (NodeBase* node : entering) release(node);
  if (g_watcher_count.load(std::memory_order_acquire) == 0) return;
  std::vector<std::shared_ptr<const ScopeSwitchWatcher>> calls;
  try {
    Watchers& w = watchers();
    MutexLock lock(w.mu);
    calls.reserve(w.list.size());
    for (const auto& entry : w.list) calls.push_back(entry.second);
  } catch (...) {
    report_hook_failure("watcher bookkeeping");
    return;
  }
  const ScopeToken from_token = from != nullptr ? from->token() : ScopeToken();
  const ScopeToken to_token = to != nullptr ? to->token() : ScopeToken();
  for (const auto& watcher : calls) {
    try {
      (*watcher)(from_token, to_token);
    } catch (...) {
      report_hook_failure("watcher");
    }
  }
}

}  // namespace internal

void ScopeSwitchWatcherHandle::reset() noexcept {
  if (id_ == 0) return;
  std::shared_ptr<const ScopeSwitchWatcher> removed;  // destroyed outside the lock
  {
    internal::Watchers& w = internal::watchers();
    internal::MutexLock lock(w.mu);
    for (auto it = w.list.begin(); it != w.list.end(); ++it) {
      if (it->first == id_) {
        removed = std::move(it->second);
        w.list.erase(it);
        internal::g_watcher_count.fetch_sub(1, std::memory_order_release);
        internal::g_switch_hooks.fetch_sub(1, std::memory_order_relaxed);
        break;
      }
    }
  }
  id_ = 0;
}

ScopeSwitchWatcherHandle add_scope_switch_watcher(ScopeSwitchWatcher watcher) {
  if (!watcher) {
    throw ScopeError(
        "scopereg: add_scope_switch_watcher needs a callable; got an empty one. Pass a "
        "function taking (ScopeToken from, ScopeToken to)");
  }
  auto shared = std::make_shared<const ScopeSwitchWatcher>(std::move(watcher));
  internal::Watchers& w = internal::watchers();
  internal::MutexLock lock(w.mu);
  const std::uint64_t id = w.next_id++;
  w.list.emplace_back(id, std::move(shared));
  internal::g_watcher_count.fetch_add(1, std::memory_order_release);
  internal::g_switch_hooks.fetch_add(1, std::memory_order_relaxed);
  return ScopeSwitchWatcherHandle(id);
}

}  // namespace scopereg
