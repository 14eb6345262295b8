// scopereg/internal/registry_record.h -- not part of the public API.
//
// What every registry, whichever its backend, shares with scope teardown. Nothing here is
// process-wide on the path of a scope's life: scopes and the values they are destroying
// live in `Domain`s (a fixed set of shards, one picked per creating thread), and the
// token-keyed values a scope's end must reach are found through a sharded binding index.
//
// * `Domain`: a shard of live scopes (scope_state.cc) and of `DyingList`s, under its own
//   mutex. A scope links into the domain of the thread that created it, so threads that
//   start and end scopes touch different domains.
// * `DyingList`: values a scope's end took out of their registries, destroyed one at a time
//   with no lock held. A registry destroyed meanwhile visits every domain: it takes back
//   its values not yet started (`retire`) and waits for the ones in progress, so every
//   value dies exactly once and no registry is destroyed under a running destructor.
// * Bindings: a token-keyed registry (KeyedStore) records "I hold a value for this token"
//   in a sharded index when it stores one, and removes the record when the value goes.
//   A scope's end (and `end_scope(token)`) looks up its own token there and visits only
//   the registries that hold a value for it: its cost follows its values, not the number
//   of registries alive.
// * `g_process_mutex` guards the table of registries (creation and destruction of a
//   registry) and copies of token-keyed values (copy_bound: a copy_context() or inheriting
//   guard whose scope has values in token-keyed registries), never a scope's creation or
//   end.
//
// Process-wide state lives in never-destroyed storage: no static destructor runs before a
// thread that exits late, and shared libraries see one copy.

#ifndef SCOPEREG_INTERNAL_REGISTRY_RECORD_H_
#define SCOPEREG_INTERNAL_REGISTRY_RECORD_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/inlined_vector.h"
#include "absl/functional/function_ref.h"
#include "scopereg/internal/mutex.h"
#include "scopereg/internal/node.h"
#include "scopereg/internal/token_ref.h"

namespace scopereg::internal {

ABSL_CONST_INIT extern Mutex g_process_mutex;

// How many token-keyed registries are subscribed to scope ends (written under
// g_process_mutex). While it is 0 no token has a binding, so a scope's end or copy skips
// hashing its token to look one up.
ABSL_CONST_INIT extern std::atomic<std::size_t> g_keyed_registries;
inline bool any_keyed_registry() noexcept {
  return g_keyed_registries.load(std::memory_order_acquire) != 0;
}

class RegistryRecord;
class DyingList;
class ScopeState;

// A shard of scopes and of the values they are destroying.
struct alignas(64) Domain {
  Mutex mu;
  CondVar destroyed;  // a value of some registry finished its destructor
  // Retiring registries waiting on `destroyed`: changed under `mu`, read without it by a
  // dying list that finished its last value without the lock (DyingList::finish_alone).
  std::atomic<int> waiting{0};
  ScopeState* scopes ABSL_GUARDED_BY(mu) = nullptr;
  DyingList* dying ABSL_GUARDED_BY(mu) = nullptr;
};
inline constexpr std::size_t kDomains = 32;
Domain* all_domains() noexcept;
// The calling thread's domain.
Domain& this_thread_domain() noexcept;

// Values taken out of their registries (by a scope's end) and not yet destroyed. At least
// while a DyingList is non-empty it is registered in its domain, so that a registry
// destroyed meanwhile takes back the values not yet started and waits for the ones in
// progress (a recycled scope's list stays registered between lives: finish_alone()).
class DyingList {
 public:
  friend void collect_ended_locked(TokenRef token, DyingList& out);
  explicit DyingList(Domain& domain) : domain_(domain) {}
  DyingList(const DyingList&) = delete;
  DyingList& operator=(const DyingList&) = delete;

  Domain& domain() const ABSL_LOCK_RETURNED(domain_.mu) { return domain_; }
  // Tells the analysis that `held`, a locked domain, is this list's.
  void assert_domain(const Domain& held) const ABSL_ASSERT_EXCLUSIVE_LOCK(domain_.mu);
  // Makes room for one more add() (which then cannot throw). Throws std::bad_alloc.
  void reserve_one() ABSL_EXCLUSIVE_LOCKS_REQUIRED(domain_.mu);
  // As reserve_one(), telling whether it could instead of throwing. Inline when there is
  // room already (a scope's end asks before each value it takes).
  bool make_room_for_one() noexcept ABSL_EXCLUSIVE_LOCKS_REQUIRED(domain_.mu) {
    if (items_.size() < items_.capacity()) [[likely]] return true;
    try {
      reserve_one();
      return true;
    } catch (const std::bad_alloc&) {
      return false;
    }
  }
  void add(RegistryRecord* record, NodeBase* node) ABSL_EXCLUSIVE_LOCKS_REQUIRED(domain_.mu);

  bool empty() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(domain_.mu) { return items_.empty(); }
  // Marks the first value as being destroyed and returns it (null if there is none), for
  // the caller's next destroy_all(first): it then need not lock to take it.
  NodeBase* start_first() ABSL_EXCLUSIVE_LOCKS_REQUIRED(domain_.mu);
  // Destroys every value not taken back, one at a time with no lock held, then
  // unregisters. `first`: what start_first() returned.
  void destroy_all(NodeBase* first = nullptr) noexcept ABSL_LOCKS_EXCLUDED(domain_.mu);
  // Destroys `first` (what start_first() returned, the list's only value) and reports it
  // gone without taking the domain's lock: the list stays registered, holding one finished
  // item, until the owner's next drop_finished() or unregister(). For a list whose owner
  // outlives it in the domain (a recycled explicit scope's).
  void finish_alone(NodeBase* first) noexcept ABSL_LOCKS_EXCLUDED(domain_.mu);
  // Forgets finished items (left by finish_alone); keeps the list registered.
  void drop_finished() ABSL_EXCLUSIVE_LOCKS_REQUIRED(domain_.mu);
  // Leaves the domain (every item finished): before the list is destroyed.
  void unregister() ABSL_EXCLUSIVE_LOCKS_REQUIRED(domain_.mu);
  std::size_t size() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(domain_.mu) { return items_.size(); }

 private:
  friend class RegistryRecord;
  friend void forget_dead_records_in_child() noexcept;
  enum class State : std::uint8_t { kPending, kDestroying, kGone };
  struct Item {
    RegistryRecord* record;
    NodeBase* node;
    // Changed under the domain's mutex, except kDestroying -> kGone by finish_alone();
    // read by others (retire) through std::atomic_ref.
    State state;
  };
  static State load_state(Item& item) noexcept {
    return std::atomic_ref<State>(item.state).load(std::memory_order_seq_cst);
  }
  Domain& domain_;
  absl::InlinedVector<Item, 2> items_ ABSL_GUARDED_BY(domain_.mu);
  std::uint64_t owner_ ABSL_GUARDED_BY(domain_.mu) = 0;  // the thread destroying them
  DyingList* prev_ ABSL_GUARDED_BY(domain_.mu) = nullptr;
  DyingList* next_ ABSL_GUARDED_BY(domain_.mu) = nullptr;
  bool registered_ ABSL_GUARDED_BY(domain_.mu) = false;
};

// DeferredReleases
//
// Values taken out of a registry being destroyed, released (release(), node.h) together
// once no lock is held. Never throws: when no memory is left to list one more value,
// add() refuses it, and the caller, with its locks dropped, flush()es what it holds and
// goes on. A destruction therefore never stops half-way for want of memory; it only
// destroys some values earlier than it otherwise would.
class DeferredReleases {
 public:
  DeferredReleases() = default;
  DeferredReleases(const DeferredReleases&) = delete;
  DeferredReleases& operator=(const DeferredReleases&) = delete;
  ~DeferredReleases() { flush(); }

  // Lists `node`; false (nothing listed) when no memory is left to.
  [[nodiscard]] bool add(NodeBase* node) noexcept {
    if (nodes_.size() == nodes_.capacity()) {
      try {
        nodes_.reserve(2 * nodes_.size());
      } catch (const std::bad_alloc&) {
        return false;
      }
    }
    nodes_.push_back(node);
    return true;
  }
  // Releases every listed value, here: call with no lock held.
  void flush() noexcept {
    for (NodeBase* node : nodes_) release(node);
    nodes_.clear();
  }

 private:
  absl::InlinedVector<NodeBase*, 32> nodes_;
};

class RegistryRecord {
 public:
  RegistryRecord();
  RegistryRecord(const RegistryRecord&) = delete;
  RegistryRecord& operator=(const RegistryRecord&) = delete;

 protected:
  ~RegistryRecord() = default;

  // Called by the derived destructor once no new scope end can reach this registry: visits
  // every domain; in each, with its mutex held, calls `in_domain(domain)` (the slot
  // backend empties its slots in that domain's scopes there, into `out`; it returns false
  // when `out` refused a value), takes every value of this registry that dying scopes
  // have not started destroying (into `out`), and waits for those they have. Allocates
  // nothing itself: when `out` refuses a value (no memory left), the domain's mutex is
  // dropped, `out` is flushed, and the domain visited again.
  void retire(DeferredReleases& out, absl::FunctionRef<bool(Domain&)> in_domain =
                                         [](Domain&) { return true; });
  // Registers a token-keyed registry: fork() locks it (lock_for_fork), and a forked
  // child drops it if it lived on a thread that is gone.
  void subscribe_to_scope_ends() ABSL_LOCKS_EXCLUDED(g_process_mutex);
  // The first step of a token-keyed registry's destruction, with the process mutex held
  // (so that no copy_bound() is sharing one of its values meanwhile): fork() no longer
  // reaches it. The registry then takes its values out, dropping each one's binding, under
  // the same lock: afterwards no scope end or copy reaches it.
  void unsubscribe_locked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(g_process_mutex);

  // Bindings (token-keyed registries): records that this registry holds a value for
  // `token` / no longer does. Call with none of the registry's own locks held. Bindings
  // are counted: bind twice, unbind twice.
  void bind(TokenRef token);
  void unbind(TokenRef token);
  // Called last by a registry's destruction. Every binding has its value, and every value
  // is unbound before this, so the index no longer names the registry: debug builds check
  // that (a walk of the whole index). In a fork child, where a thread of the parent may
  // have been between a change and its bind or unbind, the walk removes what is left.
  void drop_leftover_bindings();

  // Whether this record lived on the stack of a thread that did not survive a fork.
  bool on_dead_stack_in_child() const;

 private:
  friend class DyingList;
  friend void extract_bound(TokenRef token,
                            absl::FunctionRef<void(RegistryRecord*, NodeBase*)> take,
                            absl::FunctionRef<void()> make_room);
  friend void forget_dead_records_in_child() noexcept;
  friend void abandon_other_threads_in_child() noexcept;
  friend void abandon_everywhere(TokenRef token);
  friend void lock_subscribers_for_fork();
  friend void unlock_subscribers_after_fork();
  const std::uint64_t stack_owner_;
  // Removes and returns this registry's value for `token` (null when it has none). Called
  // with a binding shard's mutex held: must not wait or call back into scopereg.
  virtual NodeBase* extract_for_end(TokenRef /*token*/) { return nullptr; }
  // Binds for `to` the value this registry holds for `from`, unless it holds one for `to`
  // already; returns whether it did (the caller recorded the binding in the index before
  // the call, and drops it again when it did not). A binding of the value it took and did
  // not use is left in `unused`, for the caller to release with no lock held.
  // Called with the process mutex held (the registry cannot be retiring).
  virtual bool share_for_copy(TokenRef /*from*/, TokenRef /*to*/, NodeBase*& /*unused*/) {
    return false;
  }
  friend void copy_bound(TokenRef from, TokenRef to);
  // fork(): take and release this registry's own locks (see fork.h).
  virtual void lock_for_fork() {}
  virtual void unlock_after_fork() {}
  // In a forked child (every lock free, the process mutex held): drops the values being
  // created by threads that are gone (thread_gone_in_child in fork.h).
  virtual void forget_gone_creators_in_child() {}

  bool subscribed_ ABSL_GUARDED_BY(g_process_mutex) = false;
};

// Hands `take(registry, value)` each of `token`'s values in a token-keyed registry,
// removing them and the token's bindings, with the binding shard's mutex held.
// `make_room()` runs before each registry is asked, so that `take` need not throw. A
// registry whose look-up throws keeps its value; the others are still visited, and the
// first exception is rethrown at the end.
void extract_bound(TokenRef token, absl::FunctionRef<void(RegistryRecord*, NodeBase*)> take,
                   absl::FunctionRef<void()> make_room = [] {});

// Moves `token`'s values out of every token-keyed registry that holds one into `out`.
// Visits only those registries. The whole move happens under `out`'s domain mutex, so a
// registry retiring meanwhile finds each value either still in its map or in `out`.
void collect_ended(TokenRef token, DyingList& out);
void collect_ended_locked(TokenRef token, DyingList& out)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(out.domain_.mu);

// Whether some token-keyed registry may hold a value for a token whose placement is
// `place` (placement_of in token_ref.h; false: none does). No lock: a look at the size of
// the binding index's shard for it. For a scope's own ScopeToken no hash is computed.
bool has_bound_at(std::size_t place) noexcept;

// Binds for `to`, in every token-keyed registry holding a value for `from` and none for
// `to`, the same value (copy_context). Takes the process mutex only when some registry
// holds a value for `from`.
void copy_bound(TokenRef from, TokenRef to);

// Ends `token`'s scope in every token-keyed registry: its values are destroyed now.
void end_scope_everywhere(TokenRef token);

// In a forked child: removes `token`'s values from every token-keyed registry without
// destroying them (they belong to a thread of the parent).
void abandon_everywhere(TokenRef token);

// fork(): the binding index's shards.
void lock_bindings_for_fork() ABSL_NO_THREAD_SAFETY_ANALYSIS;
void unlock_bindings_after_fork() ABSL_NO_THREAD_SAFETY_ANALYSIS;

}  // namespace scopereg::internal

#endif  // SCOPEREG_INTERNAL_REGISTRY_RECORD_H_
