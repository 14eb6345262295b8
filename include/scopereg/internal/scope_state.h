// scopereg/internal/scope_state.h -- not part of the public API.
//
// The slot backend, behind every built-in strategy (folly ThreadLocalPtr's design,
// generalised from threads to any scope):
//
// * Every registry of a slot-based strategy owns a small integer index (`SlotRegistry`).
// * Every live scope (a thread, a fiber, an explicit token's life) owns a `ScopeState`: an
//   array of slots indexed by registry index, each a pointer to that registry's value.
// * A hit is: find the current ScopeState (a thread-local load), compare the inline index
//   and load the inline value (a scope's first registry), else load one chunk pointer and
//   one slot. No hashing, no lock, no shared write.
// * Creation, replacement and removal take the ScopeState's own mutex (never a
//   registry-wide lock), through the shared creation protocol (creation.h).
// * A scope's creation and end take its domain's mutex (registry_record.h: one of a fixed
//   set, picked by the creating thread), never a process-wide lock. The process mutex is
//   taken when registries are created or destroyed, and by a copy of a scope that binds
//   token-keyed values (share_from -> copy_bound).
//
// Slot arrays are chunked (chunk k holds 16 << k slots) and chunks are never moved or freed
// while the scope lives, so a reader never races with growth. A scope's first value is
// stored inline (see ScopeState).
//
// A strategy is slot-based when it gives `StrategyAccess` a `current_state()` (a private
// member, with `friend struct internal::StrategyAccess;`) and a `kName`.

#ifndef SCOPEREG_INTERNAL_SCOPE_STATE_H_
#define SCOPEREG_INTERNAL_SCOPE_STATE_H_

#include <atomic>
#include <bit>
#include <concepts>
#include <cstdint>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/inlined_vector.h"
#include "absl/functional/function_ref.h"
#include "scopereg/internal/creation.h"
#include "scopereg/internal/fork.h"
#include "scopereg/internal/mutex.h"
#include "scopereg/internal/node.h"
#include "scopereg/internal/registry_record.h"
#include "scopereg/scope.h"

namespace scopereg::internal {

// Where a registry's value sits in every ScopeState.
struct SlotId {
  std::uint32_t chunk = 0;
  std::uint32_t offset = 0;
  std::uint32_t index = 0;
};

inline constexpr std::uint32_t kFirstChunkSlots = 16;
inline constexpr int kMaxChunks = 26;  // ~1e9 registries alive at once

constexpr SlotId slot_id_for(std::uint32_t index) {
  const std::uint32_t k = std::bit_width(index / kFirstChunkSlots + 1) - 1;
  return SlotId{k, index - kFirstChunkSlots * ((1u << k) - 1), index};
}

class ScopeState;

// SlotRegistry
//
// The slot backend's part of one registry. Owns an index for its lifetime; its destructor
// destroys its value in every scope (even scopes still running) exactly once, waiting for
// any a dying scope is destroying at that moment.
class SlotRegistry final : public RegistryRecord {
 public:
  SlotRegistry();
  ~SlotRegistry();

  std::uint32_t index() const { return index_; }
  SlotId slot() const { return slot_; }
  // Counts the values in every live scope (walks the scopes: a diagnostic, not a hit).
  std::int64_t size() const;
  // Visits every value, in every scope, with that scope's domain and mutex held.
  void for_each(absl::FunctionRef<void(ScopeToken, NodeBase*)> visit) const;

 private:
  friend class ScopeState;
  friend class SlotCell;
  friend void abandon_other_threads_in_child() noexcept;
  std::uint32_t index_;
  SlotId slot_;
};

// ScopeState
//
// The slots of one scope. Created lazily on a scope's first registry access; ended once
// by whoever owns the scope (thread exit, fiber end, last explicit guard). Linked into the
// domain (registry_record.h) of the thread that created it.
//
// Storage: a scope's first value sits inline (`first_index_`/`first_node_`): a request
// scope with one value allocates no slot array. Slot chunks are allocated when a second
// registry's value arrives; the inline value is then mirrored in its chunk slot, and
// load() reads the inline value whenever the index matches.
class ScopeState {
 public:
  explicit ScopeState(ScopeKind kind);
  // With a token minted earlier (a fiber's identity exists before its slots do).
  explicit ScopeState(ScopeToken token);
  ScopeState(const ScopeState&) = delete;
  ScopeState& operator=(const ScopeState&) = delete;
  ~ScopeState();  // requires end() to have run

  ScopeToken token() const { return token_; }

  NodeBase* load(SlotId slot) const noexcept {
    // The inline value first (store() keeps first_node_ current even once chunks exist):
    // a scope's first registry -- most scopes have one -- is two loads.
    if (first_index_.load(std::memory_order_acquire) == slot.index) [[likely]] {
      return first_node_.load(std::memory_order_acquire);
    }
    std::atomic<NodeBase*>* chunk = chunks_[slot.chunk].load(std::memory_order_acquire);
    return chunk != nullptr ? chunk[slot.offset].load(std::memory_order_acquire) : nullptr;
  }

  // Destroys every value of this scope, in rounds (a destructor may create values in the
  // scope it is tearing down), also in token-keyed registries, then unlinks the scope.
  // After 8 rounds further creation in this scope throws ScopeError. Called exactly once.
  void end() noexcept ABSL_LOCKS_EXCLUDED(domain_.mu, mu_) { end_impl(/*for_reuse=*/false); }
  // The end of a scope no code can reach any more (an explicit scope whose last guard and
  // capture are gone): one round, creation refused from the start. Leaves the ScopeState
  // linked and empty, to be given a new life with reuse() (ExplicitScope recycles its
  // records per thread) or destroyed after leave_domain().
  void end_for_reuse() noexcept ABSL_LOCKS_EXCLUDED(domain_.mu, mu_) {
    // The common request scope with no value left: nothing to take, no lock (and no call
    // while no token-keyed registry exists).
    // Unreachable, so only a registry's destructor can change values_ now, and only
    // downwards. (closing_ stays as it is: no creator can reach this scope any more.)
    if (holds_nothing()) [[likely]] return;
    end_impl(/*for_reuse=*/true);
  }
  // A new life under a new token, after end_for_reuse(), by the only owner of the state.
  void reuse(ScopeToken token) noexcept ABSL_LOCKS_EXCLUDED(mu_);
  // Unlinks a state ended with end_for_reuse() before it is destroyed.
  void leave_domain() noexcept ABSL_LOCKS_EXCLUDED(domain_.mu);
  // Whether this state lives in `domain` (recycle it only on a thread of that domain).
  bool in_domain(const Domain& domain) const { return &domain_ == &domain; }

  // Binds in this scope every value `from` binds, for each registry where this scope has
  // none (values are shared, not copied: see node.h), slot-based and token-keyed alike.
  // Holds both scopes' mutexes at once, taken in address order.
  // Inline when `from` holds no value (a copy of an empty scope).
  void share_from(ScopeState& from) ABSL_LOCKS_EXCLUDED(mu_, from.mu_) {
    if (&from != this && !from.holds_nothing()) share_values_from(from);
  }
  // Tells the analysis that this scope's mutex is held (by a caller that locked it through
  // another name).
  void assert_held() const ABSL_ASSERT_EXCLUSIVE_LOCK(mu_) {}

  // Appends to `out` (each with a binding taken: release them) this scope's values of
  // hooked types (node.h) that `other` (may be null) does not bind in the same registry.
  // Cheap when the scope holds no hooked value.
  void hooked_not_in(const ScopeState* other, absl::InlinedVector<NodeBase*, 4>& out)
      ABSL_LOCKS_EXCLUDED(mu_);

  // Tells the analysis that `held`, a locked domain, is this scope's.
  void assert_domain(const Domain& held) const ABSL_ASSERT_EXCLUSIVE_LOCK(domain_.mu);
  ScopeState* next_in_domain() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(domain_.mu) { return next_; }

 private:
  friend class SlotRegistry;
  friend class SlotCell;
  friend void lock_scopes_for_fork();
  friend void unlock_scopes_after_fork();
  friend void abandon_other_threads_in_child() noexcept;
  struct Creating {
    std::uint32_t index;
    const void* context;
    std::uint64_t thread;  // current_thread_serial() of the creator (fork: gone or not)
  };
  static constexpr std::uint32_t kNoIndex = ~std::uint32_t{0};
  // Whether this scope binds no value, slot-based or token-keyed. No lock: values_ is read
  // relaxed (a value stored before, in happens-before order, is seen; one stored
  // concurrently may or may not be) and the binding index's shard size once.
  bool holds_nothing() const noexcept {
    return values_.load(std::memory_order_relaxed) == 0 && !may_hold_keyed();
  }
  // Whether a token-keyed registry may hold a value for this scope (false: none does). No
  // lock, no hash: one look at the binding index's shard for the scope's token.
  bool may_hold_keyed() const noexcept {
    return any_keyed_registry() && has_bound_at(placement_of(token_));
  }
  // share_from() past its inline check.
  void share_values_from(ScopeState& from) ABSL_LOCKS_EXCLUDED(mu_, from.mu_);
  void store(SlotId slot, NodeBase* node) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // share_from() into a scope holding no value whose inline place is free (both mutexes
  // held).
  void share_all_from(const ScopeState& from) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, from.mu_);
  // Calls visit(index, value) for every value. In scope_state.cc.
  template <typename F>
  void for_each_value(F&& visit) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Empties the slots, handing `take(registry index, value)` each value, as long as
  // `room()` says one more can be taken (asked before each); returns false when it stopped
  // early, the values not taken left in place. In scope_state.cc.
  template <typename F, typename R>
  bool take_values(F&& take, R&& room) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void unlink() ABSL_EXCLUSIVE_LOCKS_REQUIRED(domain_.mu);
  void end_impl(bool for_reuse) noexcept ABSL_LOCKS_EXCLUDED(domain_.mu, mu_);
  // dying_ was made with domain_, so its guard is domain_.mu; the analysis cannot see that
  // two references name one object, hence these (checked at their callers).
  void dying_add(RegistryRecord* reg, NodeBase* node)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(domain_.mu) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    dying_.add(reg, node);
  }
  bool dying_empty() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(domain_.mu)
      ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return dying_.empty();
  }
  // Whether dying_ can take one more value without allocating, after trying to make room.
  bool dying_room() ABSL_EXCLUSIVE_LOCKS_REQUIRED(domain_.mu) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return dying_.make_room_for_one();
  }
  NodeBase* dying_start_first() ABSL_EXCLUSIVE_LOCKS_REQUIRED(domain_.mu)
      ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return dying_.start_first();
  }
  std::size_t dying_size() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(domain_.mu)
      ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return dying_.size();
  }
  void dying_drop_finished() ABSL_EXCLUSIVE_LOCKS_REQUIRED(domain_.mu)
      ABSL_NO_THREAD_SAFETY_ANALYSIS {
    dying_.drop_finished();
  }
  void dying_unregister() ABSL_EXCLUSIVE_LOCKS_REQUIRED(domain_.mu)
      ABSL_NO_THREAD_SAFETY_ANALYSIS {
    dying_.unregister();
  }
  void collect_keyed() ABSL_EXCLUSIVE_LOCKS_REQUIRED(domain_.mu) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    if (may_hold_keyed()) {
      collect_ended_locked(TokenRef::of(token_), dying_);
    }
  }

  std::atomic<std::atomic<NodeBase*>*> chunks_[kMaxChunks] = {};
  std::atomic<std::uint32_t> first_index_{kNoIndex};
  // Values of hooked types; written under mu_ (or, by an unreachable scope's end, under
  // the domain's mutex alone: see end_impl).
  std::atomic<std::uint32_t> hooked_values_{0};
  std::atomic<NodeBase*> first_node_{nullptr};
  // Written only by reuse(), when no value exists and no one else reaches the state; read
  // by the owner and, under mu_, by visitors of a scope that holds a value.
  ScopeToken token_;
  Domain& domain_;

  Mutex mu_;
  CondVar cv_;
  absl::InlinedVector<Creating, 1> creating_ ABSL_GUARDED_BY(mu_);
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  int waiting_ ABSL_GUARDED_BY(mu_) = 0;  // callers waiting on cv_ for a creation
  // Non-null slots: written under mu_ (by an unreachable scope's end, under the domain's
  // mutex alone), read without a lock by an unreachable scope's end.
  std::atomic<std::uint32_t> values_{0};
  std::uint32_t chunk_limit_ ABSL_GUARDED_BY(mu_) = 0;  // chunks_[k] null for k >= this

  ScopeState* prev_ ABSL_GUARDED_BY(domain_.mu) = nullptr;
  ScopeState* next_ ABSL_GUARDED_BY(domain_.mu) = nullptr;
  DyingList dying_{domain_};
};

// SlotCell: one registry's slot in one scope, as the creation protocol sees it.
class SlotCell {
 public:
  SlotCell(ScopeState& state, SlotRegistry& reg) : state_(state), reg_(reg) {}

  Mutex& mu() const ABSL_LOCK_RETURNED(state_.mu_) { return state_.mu_; }
  void reserve_store() {}  // a slot's store records nothing elsewhere
  NodeBase* load() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(state_.mu_) {
    return state_.load(reg_.slot_);
  }
  const void* creator() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(state_.mu_) {
    for (const ScopeState::Creating& c : state_.creating_) {
      if (c.index == reg_.index_) return c.context;
    }
    return nullptr;
  }
  void check_can_create(bool set) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(state_.mu_) {
    if (state_.closing_) throw_scope_ending(set);
  }
  void begin_create(const void* context) ABSL_EXCLUSIVE_LOCKS_REQUIRED(state_.mu_) {
    state_.creating_.push_back(
        ScopeState::Creating{reg_.index_, context, current_thread_serial()});
  }
  bool creating(const void* context) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(state_.mu_) {
    for (const ScopeState::Creating& c : state_.creating_) {
      if (c.index == reg_.index_ && c.context == context) return true;
    }
    return false;
  }
  void abort_create(const void* context) noexcept ABSL_EXCLUSIVE_LOCKS_REQUIRED(state_.mu_) {
    auto& creating = state_.creating_;
    for (auto it = creating.begin(); it != creating.end(); ++it) {
      if (it->index == reg_.index_ && it->context == context) {
        creating.erase(it);
        return;
      }
    }
  }
  void finish_create(NodeBase* node, const void* context)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(state_.mu_) {
    state_.store(reg_.slot_, node);  // first: if it throws, the mark stays for the caller
    abort_create(context);
  }
  NodeBase* swap(NodeBase* node) ABSL_EXCLUSIVE_LOCKS_REQUIRED(state_.mu_) {
    NodeBase* old = state_.load(reg_.slot_);
    state_.store(reg_.slot_, node);
    return old;
  }
  void wait() ABSL_EXCLUSIVE_LOCKS_REQUIRED(state_.mu_) {
    ++state_.waiting_;
    state_.cv_.wait(state_.mu_);
    --state_.waiting_;
  }
  void notify_all() ABSL_EXCLUSIVE_LOCKS_REQUIRED(state_.mu_) {
    if (state_.waiting_ > 0) state_.cv_.notify_all();
  }

 private:
  ScopeState& state_;
  SlotRegistry& reg_;
};

// How ScopedRegistry reaches a slot-based strategy's private current_state().
struct StrategyAccess {
  template <typename S>
  static ScopeState* current_state(const S& scope) {
    return scope.current_state();
  }
};

// A strategy whose values live in ScopeState slots (every built-in one).
template <typename S>
concept SlotStrategy = requires(const S& s) {
  { StrategyAccess::current_state(s) } -> std::same_as<ScopeState*>;
  { S::kName } -> std::convertible_to<const char*>;
};

// SlotBackend: the registry-side interface of the slot backend (see KeyedBackend for the
// other one; ScopedRegistry uses whichever its strategy selects, through these members).
template <typename Scope>
class SlotBackend {
 public:
  using Token = ScopeToken;

  // The calling scope's value, or null (no scope, or no value yet). Inline, lock-free.
  NodeBase* find(const Scope& scope) const {
    ScopeState* state = StrategyAccess::current_state(scope);
    if (state != nullptr) [[likely]] return state->load(reg_.slot());
    return nullptr;
  }
  bool has_scope(const Scope& scope) const {
    return StrategyAccess::current_state(scope) != nullptr;
  }
  // The calling scope's cell; throws ScopeError when there is no scope.
  SlotCell cell(const Scope& scope) {
    ScopeState* state = StrategyAccess::current_state(scope);
    if (state == nullptr) throw_no_scope(Scope::kName);
    return SlotCell(*state, reg_);
  }
  std::int64_t size() const { return reg_.size(); }
  template <typename F>
  void for_each(F&& visit) const {
    reg_.for_each(visit);
  }

 private:
  SlotRegistry reg_;
};

inline void ScopeState::reuse(ScopeToken token) noexcept ABSL_NO_THREAD_SAFETY_ANALYSIS {
  // No lock: the state is this thread's alone (its end came after every other user of it,
  // ordered by the record's reference count and the token table's shard lock, and no one
  // can reach it until it is handed out again).
  token_ = token;
  closing_ = false;
  first_index_.store(kNoIndex, std::memory_order_relaxed);  // the next first value is inline
}

}  // namespace scopereg::internal

#endif  // SCOPEREG_INTERNAL_SCOPE_STATE_H_
