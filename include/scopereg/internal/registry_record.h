// scopereg/internal/registry_record.h -- not part of the public API.
//
// What every registry, whichever its backend, shares with scope teardown:
//
// * `g_process_mutex`: the one process-wide lock. It guards the lists of live scopes and
//   of registries (scope_state.cc), the registries that scope ends must reach, and the
//   values being destroyed (this file). It is taken only when registries or scopes are
//   created or destroyed, never on a hit or a creation.
// * `RegistryRecord`: the base of both backends. A scope that ends takes its values out of
//   their registries into a `DyingList` under the process mutex, then destroys them one at
//   a time with no lock held; a registry destroyed meanwhile takes back the values not yet
//   started (`retire`) and waits for the one in progress, so every value dies exactly once
//   and no registry is destroyed under a running destructor.
// * Scope-end subscriptions: token-keyed registries hear every scope end
//   (`extract_for_end`), so `end_scope(token)` and the end of a thread, fiber or explicit
//   scope reach FuncScope registries too.
//
// Process-wide state lives in never-destroyed storage in registry_record.cc: no static
// destructor runs before a thread that exits late, and shared libraries see one copy.

#ifndef SCOPEREG_INTERNAL_REGISTRY_RECORD_H_
#define SCOPEREG_INTERNAL_REGISTRY_RECORD_H_

#include <cstdint>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "scopereg/internal/mutex.h"
#include "scopereg/internal/node.h"
#include "scopereg/internal/token_ref.h"

namespace scopereg::internal {

ABSL_CONST_INIT extern Mutex g_process_mutex;

class RegistryRecord;

// Values taken out of their registries (by a scope's end) and not yet destroyed. While a
// DyingList is non-empty it is registered process-wide, so that a registry destroyed
// meanwhile takes back the values not yet started and waits for the ones in progress.
class DyingList {
 public:
  DyingList() = default;
  DyingList(const DyingList&) = delete;
  DyingList& operator=(const DyingList&) = delete;

  void add(RegistryRecord* record, NodeBase* node) ABSL_EXCLUSIVE_LOCKS_REQUIRED(g_process_mutex);
  bool empty() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(g_process_mutex) { return items_.empty(); }
  // Destroys every value not taken back, one at a time with no lock held, then
  // unregisters.
  void destroy_all() noexcept ABSL_LOCKS_EXCLUDED(g_process_mutex);

 private:
  friend class RegistryRecord;
  friend void forget_dead_records_in_child() noexcept;
  struct Item {
    RegistryRecord* record;
    NodeBase* node;
    bool taken;
  };
  std::vector<Item> items_ ABSL_GUARDED_BY(g_process_mutex);
  std::uint64_t owner_ ABSL_GUARDED_BY(g_process_mutex) = 0;  // the thread destroying them
  DyingList* prev_ ABSL_GUARDED_BY(g_process_mutex) = nullptr;
  DyingList* next_ ABSL_GUARDED_BY(g_process_mutex) = nullptr;
  bool registered_ ABSL_GUARDED_BY(g_process_mutex) = false;
};

class RegistryRecord {
 public:
  RegistryRecord();
  RegistryRecord(const RegistryRecord&) = delete;
  RegistryRecord& operator=(const RegistryRecord&) = delete;

 protected:
  ~RegistryRecord() = default;

  // Called by the derived destructor: stops scope ends from reaching this registry, takes
  // every value of it that dying scopes have not started destroying (appended to `out`),
  // and waits for those they have.
  void retire(std::vector<NodeBase*>& out) ABSL_LOCKS_EXCLUDED(g_process_mutex);
  // From now on, scope ends reach extract_for_end().
  void subscribe_to_scope_ends() ABSL_LOCKS_EXCLUDED(g_process_mutex);

 protected:
  // Whether this record lived on the stack of a thread that did not survive a fork.
  bool on_dead_stack_in_child() const;

 private:
  friend class DyingList;
  friend void collect_ended(TokenRef token, DyingList& out);
  friend void forget_dead_records_in_child() noexcept;
  friend void abandon_other_threads_in_child() noexcept;
  const std::uint64_t stack_owner_;
  // Removes and returns this registry's value for `token` (null when it has none or keys
  // by another token type). Called with the process mutex held: must not wait or call
  // back into scopereg.
  virtual NodeBase* extract_for_end(TokenRef /*token*/) { return nullptr; }
  // fork(): take and release this registry's own locks (see fork.h).
  virtual void lock_for_fork() {}
  virtual void unlock_after_fork() {}
  friend void lock_subscribers_for_fork();
  friend void unlock_subscribers_after_fork();
  friend void abandon_everywhere(TokenRef token);

  int destroying_ ABSL_GUARDED_BY(g_process_mutex) = 0;
  bool subscribed_ ABSL_GUARDED_BY(g_process_mutex) = false;
};

// Moves `token`'s values out of every subscribed registry into `out`.
void collect_ended(TokenRef token, DyingList& out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(g_process_mutex);

// Ends `token`'s scope in every subscribed registry: its values are destroyed now.
void end_scope_everywhere(TokenRef token) ABSL_LOCKS_EXCLUDED(g_process_mutex);

// In a forked child: removes `token`'s values from every subscribed registry without
// destroying them (they belong to a thread of the parent).
void abandon_everywhere(TokenRef token) ABSL_EXCLUSIVE_LOCKS_REQUIRED(g_process_mutex);

}  // namespace scopereg::internal

#endif  // SCOPEREG_INTERNAL_REGISTRY_RECORD_H_
