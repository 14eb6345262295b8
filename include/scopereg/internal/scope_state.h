// scopereg/internal/scope_state.h -- not part of the public API.
//
// The machinery behind every built-in strategy (folly ThreadLocalPtr's design, generalised
// from threads to any scope):
//
// * Every registry of a slot-based strategy owns a small integer index (`SlotRegistry`).
// * Every live scope (a thread, a fiber, an explicit token's life) owns a `ScopeState`: an
//   array of slots indexed by registry index, each a pointer to that registry's value.
// * A hit is: find the current ScopeState (a thread-local load), load one chunk pointer,
//   load one slot. No hashing, no lock, no shared write.
// * Creation, replacement and removal take the ScopeState's own mutex (never a
//   registry-wide lock), so a factory never blocks other scopes.
// * A process-wide mutex (in registry/scope_state.cc, never destroyed) is taken only when
//   registries or scopes are created or destroyed.
//
// Slot arrays are chunked (chunk k holds 16 << k slots) and chunks are never moved or freed
// while the scope lives, so a reader never races with growth.

#ifndef SCOPEREG_INTERNAL_SCOPE_STATE_H_
#define SCOPEREG_INTERNAL_SCOPE_STATE_H_

#include <atomic>
#include <bit>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/functional/function_ref.h"
#include "scopereg/scope.h"

namespace scopereg::internal {

// One value owned by a registry. Deleting a NodeBase destroys the value.
struct NodeBase {
  virtual ~NodeBase() = default;
};

struct FromFactory {};
inline constexpr FromFactory kFromFactory{};

template <typename T>
struct Node final : NodeBase {
  template <typename... Args>
  explicit Node(std::in_place_t, Args&&... args) : value(std::forward<Args>(args)...) {}
  template <typename F>
  Node(FromFactory, F& factory) : value(factory()) {}
  T value;
};

template <typename T>
T& value_of(NodeBase* node) {
  return static_cast<Node<T>*>(node)->value;
}

// A process-wide serial for scope tokens: never reused in the life of the process.
std::uint64_t next_scope_serial() noexcept;

// Identifies the running execution context (a thread, or one of our fibers), so that a
// factory that re-enters itself is told so instead of deadlocking.
const void* current_context_id() noexcept;

// Where a registry's value sits in every ScopeState.
struct SlotId {
  std::uint32_t chunk = 0;
  std::uint32_t offset = 0;
};

inline constexpr std::uint32_t kFirstChunkSlots = 16;
inline constexpr int kMaxChunks = 26;  // ~1e9 registries alive at once

constexpr SlotId slot_id_for(std::uint32_t index) {
  const std::uint32_t k = std::bit_width(index / kFirstChunkSlots + 1) - 1;
  return SlotId{k, index - kFirstChunkSlots * ((1u << k) - 1)};
}

class ScopeState;
class RegistryRecord;

// Values taken out of their registries (by a scope's end) and not yet destroyed. While a
// DyingList is non-empty it is registered process-wide, so that a registry destroyed
// meanwhile takes back the values not yet started and waits for the ones in progress.
// Used under the process-wide mutex only.
class DyingList {
 public:
  DyingList() = default;
  DyingList(const DyingList&) = delete;
  DyingList& operator=(const DyingList&) = delete;

  // Requires the process-wide mutex.
  void add(RegistryRecord* record, NodeBase* node);
  bool empty() const { return items_.empty(); }
  // Destroys every value not taken back, one at a time with no lock held, then
  // unregisters. Requires the process-wide mutex NOT held.
  void destroy_all() noexcept;

 private:
  friend class RegistryRecord;
  struct Item {
    RegistryRecord* record;
    NodeBase* node;
    bool taken;
  };
  std::vector<Item> items_;
  DyingList* prev_ = nullptr;
  DyingList* next_ = nullptr;
  bool registered_ = false;
};

// RegistryRecord
//
// The part of every registry that scope teardown must know about: how many of its values a
// dying scope is destroying right now (the registry's destructor waits for them), and, for
// ScopeToken-keyed registries, a way to hand over the value of a scope that ended.
class RegistryRecord {
 public:
  RegistryRecord() = default;
  RegistryRecord(const RegistryRecord&) = delete;
  RegistryRecord& operator=(const RegistryRecord&) = delete;

 protected:
  ~RegistryRecord() = default;

  // Called by the derived destructor: takes every value of this registry that dying scopes
  // have not started destroying (appended to `out`), and waits for those they have.
  void retire(std::vector<NodeBase*>& out);
  // For ScopeToken-keyed registries: from now on, scope ends reach extract_for_end().
  void subscribe_to_scope_ends();

 private:
  friend class ScopeState;
  friend class SlotRegistry;
  friend class DyingList;
  friend void scopereg::end_scope(ScopeToken);
  // Removes and returns this registry's value for `token`, or null. Called with the
  // process-wide mutex held; must not call back into scopereg.
  virtual NodeBase* extract_for_end(ScopeToken /*token*/) { return nullptr; }

  int destroying_ = 0;      // guarded by the process-wide mutex
  bool subscribed_ = false;  // guarded by the process-wide mutex
};

// SlotRegistry
//
// The backend of a registry whose strategy is slot-based. Owns an index for its lifetime;
// its destructor destroys its value in every scope (even scopes still running) exactly
// once, waiting for any a dying scope is destroying at that moment.
class SlotRegistry final : public RegistryRecord {
 public:
  SlotRegistry();
  ~SlotRegistry();

  std::uint32_t index() const { return index_; }
  SlotId slot() const { return slot_; }
  std::int64_t size() const { return live_.load(std::memory_order_relaxed); }
  // Visits every value, in every scope, with the process-wide mutex and that scope's
  // mutex held.
  void for_each(absl::FunctionRef<void(ScopeToken, NodeBase*)> visit) const;

 private:
  friend class ScopeState;
  std::uint32_t index_;
  SlotId slot_;
  std::atomic<std::int64_t> live_{0};
};

// ScopeState
//
// The slots of one scope. Created lazily on a scope's first registry access; ended once
// by whoever owns the scope (thread exit, fiber end, last explicit guard).
class ScopeState {
 public:
  explicit ScopeState(ScopeKind kind);
  // With a token minted earlier by next_scope_serial() (a fiber's identity exists before
  // its slots do).
  explicit ScopeState(ScopeToken token);
  ScopeState(const ScopeState&) = delete;
  ScopeState& operator=(const ScopeState&) = delete;
  ~ScopeState();  // requires end() to have run

  ScopeToken token() const { return token_; }

  NodeBase* load(SlotId slot) const noexcept {
    std::atomic<NodeBase*>* chunk = chunks_[slot.chunk].load(std::memory_order_acquire);
    return chunk != nullptr ? chunk[slot.offset].load(std::memory_order_acquire) : nullptr;
  }

  // Returns the registry's value in this scope, creating it with `make` if absent. `make`
  // runs with no lock held; a concurrent caller for the same registry and scope waits for
  // it (the factory runs once). `*created` tells whether this call created the value.
  // Throws ScopeError if `make` re-enters itself, or if the scope is ending.
  NodeBase* get_or_create(SlotRegistry& reg, absl::FunctionRef<NodeBase*()> make,
                          bool* created);
  // Installs `node` (null removes) and returns the previous value for the caller to delete.
  NodeBase* exchange(SlotRegistry& reg, NodeBase* node);

  // Destroys every value of this scope, in rounds (a destructor may create values in the
  // scope it is tearing down), also in ScopeToken-keyed registries, then unlinks the scope.
  // After 8 rounds further creation in this scope throws ScopeError. Called exactly once.
  void end() noexcept;

 private:
  friend class SlotRegistry;
  friend class RegistryRecord;
  struct Creating {
    std::uint32_t index;
    const void* context;
  };
  void store(SlotId slot, NodeBase* node);  // requires mu_
  // Waits until no other context is creating `index` here; throws on re-entry.
  void wait_not_creating(std::unique_lock<std::mutex>& lock, std::uint32_t index,
                         const void* context);
  void collect_round(bool last);  // moves every value to dying_; requires process mutex

  std::atomic<std::atomic<NodeBase*>*> chunks_[kMaxChunks] = {};
  const ScopeToken token_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Creating> creating_;  // guarded by mu_
  bool closing_ = false;            // guarded by mu_

  // Guarded by the process-wide mutex.
  ScopeState* prev_ = nullptr;
  ScopeState* next_ = nullptr;
  DyingList dying_;
  bool ended_ = false;
};

[[noreturn]] void throw_no_scope(const char* strategy);
[[noreturn]] void throw_factory_reentered();
// Misuse that cannot throw (it is found in a destructor): prints what and why, aborts.
[[noreturn]] void die_of_misuse(const char* what) noexcept;

// Creation outside the lock, shared by both backends: runs `make` with `lock` released and
// returns its node with `lock` held again. If `make` throws (also Boost.Context's
// forced_unwind), re-locks, runs `undo` (drop the "being created" mark, wake waiters) and
// rethrows.
template <typename Make, typename Undo>
NodeBase* make_unlocked(std::unique_lock<std::mutex>& lock, Make& make, Undo undo) {
  lock.unlock();
  NodeBase* node = nullptr;
  try {
    node = make();
  } catch (...) {
    lock.lock();
    undo();
    throw;
  }
  lock.lock();
  return node;
}

// Called first in every catch (...) of scopereg that does not rethrow: rethrows the
// exception in flight if it is the unwinding of a fiber being destroyed
// (boost::context::detail::forced_unwind), which must never be swallowed. A no-op unless
// scopereg::fiber is linked in (it installs the check).
void rethrow_if_unwinding();
void set_unwinding_check(void (*check)()) noexcept;

// A strategy whose values live in ScopeState slots (every built-in one).
template <typename S>
concept SlotStrategy = requires(const S& s) {
  { s.current_state() } -> std::same_as<ScopeState*>;
  { S::kName } -> std::convertible_to<const char*>;
};

}  // namespace scopereg::internal

#endif  // SCOPEREG_INTERNAL_SCOPE_STATE_H_
