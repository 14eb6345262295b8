// The slot backend's process-wide part: the table of registry indices (under the process
// mutex, read lock-free) and the live scopes, linked into their domains
// (registry_record.h), all in never-destroyed storage.

#include "scopereg/internal/scope_state.h"

#include <algorithm>
#include <cassert>
#include <functional>
#include <new>
#include <optional>
#include <vector>

#include "scopereg/error.h"
#include "scopereg/thread_scope.h"

namespace scopereg::internal {
namespace {

constexpr int kMaxRounds = 8;    // after this, creation in a dying scope throws
constexpr int kHardRounds = 16;  // after this, end() stops (keyed leftovers stay owned)

// Registry index -> registry, chunked like the slots: chunks never move, so a scope's end
// reads an entry with no lock (the registry of a non-null slot outlives that read: it
// empties its slots under the scope's domain mutex, which the reader holds).
struct Slots {
  std::atomic<std::atomic<SlotRegistry*>*> table[kMaxChunks] = {};
  // Per index: whether its registry accepts new bindings of its values, false from the
  // moment its destructor starts (share_from never binds a value of a registry that may
  // have emptied that scope already).
  std::atomic<std::atomic<bool>*> sharing[kMaxChunks] = {};
  std::uint32_t next_index ABSL_GUARDED_BY(g_process_mutex) = 0;
  std::vector<std::uint32_t> free_indices ABSL_GUARDED_BY(g_process_mutex);
};

Slots& slots() {
  static Slots* const s = new Slots;  // never destroyed, on purpose
  return *s;
}

SlotRegistry* registry_at(std::uint32_t index) {
  const SlotId id = slot_id_for(index);
  std::atomic<SlotRegistry*>* chunk = slots().table[id.chunk].load(std::memory_order_acquire);
  return chunk != nullptr ? chunk[id.offset].load(std::memory_order_acquire) : nullptr;
}

std::atomic<bool>* sharing_cell(std::uint32_t index) {
  const SlotId id = slot_id_for(index);
  std::atomic<bool>* chunk = slots().sharing[id.chunk].load(std::memory_order_acquire);
  return chunk != nullptr ? &chunk[id.offset] : nullptr;
}

bool accepts_sharing(std::uint32_t index) {
  std::atomic<bool>* cell = sharing_cell(index);
  return cell != nullptr && cell->load(std::memory_order_acquire);
}

void set_registry_at(std::uint32_t index, SlotRegistry* reg)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(g_process_mutex) {
  const SlotId id = slot_id_for(index);
  Slots& s = slots();
  std::atomic<SlotRegistry*>* chunk = s.table[id.chunk].load(std::memory_order_relaxed);
  if (chunk == nullptr) {
    chunk = new std::atomic<SlotRegistry*>[kFirstChunkSlots << id.chunk]();
    s.table[id.chunk].store(chunk, std::memory_order_release);
    s.sharing[id.chunk].store(new std::atomic<bool>[kFirstChunkSlots << id.chunk](),
                              std::memory_order_release);
  }
  chunk[id.offset].store(reg, std::memory_order_release);
  sharing_cell(index)->store(reg != nullptr, std::memory_order_release);
}

// Calls visit(scope) for every live scope of `domain`.
template <typename F>
void for_each_scope(Domain& domain, F&& visit) ABSL_EXCLUSIVE_LOCKS_REQUIRED(domain.mu) {
  for (ScopeState* scope = domain.scopes; scope != nullptr;) {
    scope->assert_domain(domain);
    ScopeState* const next = scope->next_in_domain();
    visit(scope);
    scope = next;
  }
}

}  // namespace

// ---- SlotRegistry -------------------------------------------------------------------

SlotRegistry::SlotRegistry() {
  install_fork_handlers();
  Slots& s = slots();
  MutexLock lock(g_process_mutex);
  // Room for every index ever handed out, so that the destructor's push_back cannot
  // allocate (it must not throw).
  if (s.free_indices.capacity() <= s.next_index) {
    s.free_indices.reserve(std::max<std::size_t>(2 * s.free_indices.capacity(), 16));
  }
  if (!s.free_indices.empty()) {
    index_ = s.free_indices.back();
    s.free_indices.pop_back();
  } else {
    constexpr std::uint64_t kLimit = kFirstChunkSlots * ((std::uint64_t{1} << kMaxChunks) - 1);
    if (s.next_index >= kLimit) {
      throw ScopeError("scopereg: too many registries alive at once; destroy some first");
    }
    index_ = s.next_index++;
  }
  slot_ = slot_id_for(index_);
  set_registry_at(index_, this);
}

SlotRegistry::~SlotRegistry() {
  sharing_cell(index_)->store(false, std::memory_order_release);  // no new shared bindings
  DeferredReleases nodes;
  // In every domain: empty our slot in each scope, take back our values that dying scopes
  // have not started destroying, and wait for those they have.
  retire(nodes, [this, &nodes](Domain& domain) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    bool listed_all = true;
    for_each_scope(domain, [&](ScopeState* scope) ABSL_NO_THREAD_SAFETY_ANALYSIS {
      if (!listed_all) return;
      MutexLock scope_lock(scope->mu_);
      if (NodeBase* n = scope->load(slot_)) {
        listed_all = nodes.add(n);  // else left in its slot for the next visit
        if (listed_all) scope->store(slot_, nullptr);
      }
    });
    return listed_all;
  });
  {
    MutexLock lock(g_process_mutex);
    set_registry_at(index_, nullptr);
    slots().free_indices.push_back(index_);  // room reserved by the constructor
  }
  nodes.flush();
}

std::int64_t SlotRegistry::size() const {
  std::int64_t n = 0;
  for (std::size_t d = 0; d < kDomains; ++d) {
    Domain& domain = all_domains()[d];
    MutexLock lock(domain.mu);
    for_each_scope(domain, [this, &n](ScopeState* scope) { n += scope->load(slot_) != nullptr; });
  }
  return n;
}

void SlotRegistry::for_each(absl::FunctionRef<void(ScopeToken, NodeBase*)> visit) const {
  for (std::size_t d = 0; d < kDomains; ++d) {
    Domain& domain = all_domains()[d];
    MutexLock lock(domain.mu);
    for_each_scope(domain, [this, &visit](ScopeState* scope) {
      MutexLock scope_lock(scope->mu_);
      if (NodeBase* n = scope->load(slot_)) visit(scope->token_, n);
    });
  }
}

// ---- ScopeState: storage ------------------------------------------------------------

void ScopeState::assert_domain([[maybe_unused]] const Domain& held) const {
  assert(&held == &domain_);
}

void ScopeState::store(SlotId slot, NodeBase* node) {
  NodeBase* const old = load(slot);
  // The one allocation first: if it throws, nothing has changed.
  std::atomic<NodeBase*>* made = nullptr;
  if (node != nullptr && chunks_[slot.chunk].load(std::memory_order_relaxed) == nullptr) {
    const std::uint32_t first = first_index_.load(std::memory_order_relaxed);
    if (first != kNoIndex && first != slot.index) {
      made = new std::atomic<NodeBase*>[kFirstChunkSlots << slot.chunk]();
    }
  }
  const int counted = (node != nullptr) - (old != nullptr);
  if (counted != 0) {
    values_.store(values_.load(std::memory_order_relaxed) + counted, std::memory_order_relaxed);
  }
  const int hooked = (node != nullptr && node->hooked) - (old != nullptr && old->hooked);
  if (hooked != 0) {
    hooked_values_.store(hooked_values_.load(std::memory_order_relaxed) + hooked,
                         std::memory_order_relaxed);
  }
  const std::uint32_t first = first_index_.load(std::memory_order_relaxed);
  std::atomic<NodeBase*>* chunk = chunks_[slot.chunk].load(std::memory_order_relaxed);
  if (first == slot.index) first_node_.store(node, std::memory_order_release);
  if (chunk != nullptr) {
    chunk[slot.offset].store(node, std::memory_order_release);
    return;
  }
  if (first == slot.index || node == nullptr) return;
  if (first == kNoIndex) {
    first_node_.store(node, std::memory_order_release);
    first_index_.store(slot.index, std::memory_order_release);
    return;
  }
  // A second registry: a chunk (made above), mirroring the inline value if it belongs to
  // this chunk.
  chunk = made;
  const SlotId first_slot = slot_id_for(first);
  if (first_slot.chunk == slot.chunk) {
    chunk[first_slot.offset].store(first_node_.load(std::memory_order_relaxed),
                                   std::memory_order_relaxed);
  }
  chunk[slot.offset].store(node, std::memory_order_relaxed);
  chunks_[slot.chunk].store(chunk, std::memory_order_release);
  if (slot.chunk >= chunk_limit_) chunk_limit_ = slot.chunk + 1;
}

template <typename F, typename R>
bool ScopeState::take_values(F&& take, R&& room) {
  if (values_.load(std::memory_order_relaxed) == 0) return true;
  const std::uint32_t first = first_index_.load(std::memory_order_relaxed);
  if (first != kNoIndex) {
    const SlotId first_slot = slot_id_for(first);
    if (NodeBase* node = load(first_slot)) {
      if (!room()) return false;
      store(first_slot, nullptr);  // counts it out (values_, hooked_values_)
      take(first, node);
    }
  }
  for (std::uint32_t c = 0; c < chunk_limit_ && values_.load(std::memory_order_relaxed) != 0;
       ++c) {
    std::atomic<NodeBase*>* chunk = chunks_[c].load(std::memory_order_relaxed);
    if (chunk == nullptr) continue;
    const std::uint32_t n = kFirstChunkSlots << c;
    const std::uint32_t base = kFirstChunkSlots * ((1u << c) - 1);
    for (std::uint32_t o = 0; o < n; ++o) {
      NodeBase* node = chunk[o].load(std::memory_order_relaxed);
      if (node == nullptr) continue;
      if (!room()) return false;
      chunk[o].store(nullptr, std::memory_order_relaxed);
      values_.store(values_.load(std::memory_order_relaxed) - 1, std::memory_order_relaxed);
      if (node->hooked) {
        hooked_values_.store(hooked_values_.load(std::memory_order_relaxed) - 1,
                             std::memory_order_relaxed);
      }
      take(base + o, node);
    }
  }
  return true;
}

template <typename F>
void ScopeState::for_each_value(F&& visit) const {
  if (values_.load(std::memory_order_relaxed) == 0) return;
  const std::uint32_t first = first_index_.load(std::memory_order_relaxed);
  if (first != kNoIndex && chunks_[slot_id_for(first).chunk].load() == nullptr) {
    if (NodeBase* node = first_node_.load(std::memory_order_relaxed)) visit(first, node);
  }
  for (std::uint32_t c = 0; c < chunk_limit_; ++c) {
    std::atomic<NodeBase*>* chunk = chunks_[c].load(std::memory_order_relaxed);
    if (chunk == nullptr) continue;
    const std::uint32_t n = kFirstChunkSlots << c;
    const std::uint32_t base = kFirstChunkSlots * ((1u << c) - 1);
    for (std::uint32_t o = 0; o < n; ++o) {
      if (NodeBase* node = chunk[o].load(std::memory_order_relaxed)) visit(base + o, node);
    }
  }
}

void ScopeState::hooked_not_in(const ScopeState* other,
                               absl::InlinedVector<NodeBase*, 4>& out) {
  if (hooked_values_.load(std::memory_order_relaxed) == 0) return;
  MutexLock lock(mu_);
  for_each_value([&](std::uint32_t index, NodeBase* node) {
    if (!node->hooked) return;
    if (other != nullptr && other->load(slot_id_for(index)) == node) return;  // stays current
    out.push_back(node);  // first: if it throws (no memory), no binding was taken
    share(node);
  });
}

void ScopeState::share_values_from(ScopeState& from) {
  // A scope with no slot value has no slot value to share: no lock. (values_ is read
  // relaxed: a value created in `from` that happens-before this copy is seen; one created
  // concurrently may or may not be, as with the locked path.)
  if (from.values_.load(std::memory_order_relaxed) != 0) {
    // Both scopes locked (in address order: the only place two scope mutexes are held),
    // so a value is bound here only while `from` still binds it: a registry destroyed
    // meanwhile either has not reached `from` yet (and will find its value here too) or
    // has emptied it (and the value is not copied). No binding is taken that could
    // outlive the registry.
    ScopeState* const first = this < &from ? this : &from;
    ScopeState* const second = this < &from ? &from : this;
    MutexLock first_lock(first->mu_);
    MutexLock second_lock(second->mu_);
    from.assert_held();
    assert_held();
    if (closing_) {
      // Takes no values.
    } else if (values_.load(std::memory_order_relaxed) == 0 &&
               first_index_.load(std::memory_order_relaxed) == kNoIndex) {
      // A new copy (the common case: a fresh or recycled scope): chunk by chunk. Not a
      // scope whose inline index still names a registry whose value went: a reader of
      // that registry, on a thread running in this scope, could then see another
      // registry's value through it.
      share_all_from(from);
    } else {
      from.for_each_value([this](std::uint32_t index, NodeBase* node)
                              ABSL_NO_THREAD_SAFETY_ANALYSIS {
        const SlotId slot = slot_id_for(index);
        if (load(slot) != nullptr) return;  // this scope's own value wins
        // A registry that started its destruction may have emptied this scope already.
        if (!accepts_sharing(index)) return;
        // Stored first (it may allocate a chunk and throw), then the binding taken: both
        // scopes' locks are held, so no one can release it in between.
        store(slot, node);
        share(node);
      });
    }
  }
  if (from.may_hold_keyed()) {
    copy_bound(TokenRef::of(from.token_), TokenRef::of(token_));
  }
}

void ScopeState::share_all_from(const ScopeState& from) {
  // What store() would leave after storing each of `from`'s values in turn, written
  // directly: the inline value (if its registry takes shared values) and every chunk,
  // each value bound once even where `from` mirrors its inline value in a chunk.
  std::uint32_t count = 0;
  std::uint32_t hooked = 0;
  assert(first_index_.load(std::memory_order_relaxed) == kNoIndex);
  // Every chunk this copy will write is allocated first: a failure to allocate then
  // leaves no binding taken and not counted.
  for (std::uint32_t c = 0; c < from.chunk_limit_; ++c) {
    std::atomic<NodeBase*>* src = from.chunks_[c].load(std::memory_order_relaxed);
    if (src == nullptr || chunks_[c].load(std::memory_order_relaxed) != nullptr) continue;
    const std::uint32_t n = kFirstChunkSlots << c;
    bool any = false;
    for (std::uint32_t o = 0; o < n && !any; ++o) {
      any = src[o].load(std::memory_order_relaxed) != nullptr;
    }
    if (!any) continue;
    chunks_[c].store(new std::atomic<NodeBase*>[n](), std::memory_order_release);
    if (c >= chunk_limit_) chunk_limit_ = c + 1;
  }
  const std::uint32_t first = from.first_index_.load(std::memory_order_relaxed);
  NodeBase* const first_node =
      first != kNoIndex ? from.first_node_.load(std::memory_order_relaxed) : nullptr;
  const bool take_first = first_node != nullptr && accepts_sharing(first);
  if (take_first) {
    share(first_node);
    ++count;
    hooked += first_node->hooked;
    first_node_.store(first_node, std::memory_order_release);
    first_index_.store(first, std::memory_order_release);
  }
  for (std::uint32_t c = 0; c < from.chunk_limit_; ++c) {
    std::atomic<NodeBase*>* src = from.chunks_[c].load(std::memory_order_relaxed);
    if (src == nullptr) continue;
    const std::uint32_t n = kFirstChunkSlots << c;
    const std::uint32_t base = kFirstChunkSlots * ((1u << c) - 1);
    std::atomic<NodeBase*>* const dst = chunks_[c].load(std::memory_order_relaxed);
    for (std::uint32_t o = 0; o < n; ++o) {
      NodeBase* node = src[o].load(std::memory_order_relaxed);
      if (node == nullptr) continue;
      if (!(take_first && base + o == first)) {  // the inline value's mirror: bound above
        if (!accepts_sharing(base + o)) continue;
        share(node);
        ++count;
        hooked += node->hooked;
      }
      assert(dst != nullptr);  // allocated above: src has a value in this chunk
      dst[o].store(node, std::memory_order_release);  // (a constant order: a run-time one
                                                      // compiles to a full-barrier store)
    }
  }
  if (take_first) {  // mirrored in its chunk whenever that exists (as store() keeps it)
    const SlotId slot = slot_id_for(first);
    if (std::atomic<NodeBase*>* chunk = chunks_[slot.chunk].load(std::memory_order_relaxed)) {
      chunk[slot.offset].store(first_node, std::memory_order_release);
    }
  }
  values_.store(count, std::memory_order_relaxed);
  hooked_values_.store(hooked, std::memory_order_relaxed);
}

// ---- fork ---------------------------------------------------------------------------

namespace {
// The scopes lock_scopes_for_fork() locked, in the order it locked them (their domains'
// mutexes, held throughout, keep the lists unchanged until they are unlocked).
std::vector<ScopeState*>* g_fork_locked_scopes = nullptr;
}  // namespace

void lock_scopes_for_fork() {
  // Every domain first, then every scope in address order: the order share_from() takes
  // two scopes in (locking each domain's scopes in list order could meet a copy holding
  // the lower-addressed of two scopes and waiting for the other, and never return).
  auto* scopes = new std::vector<ScopeState*>;
  for (std::size_t d = 0; d < kDomains; ++d) {
    Domain& domain = all_domains()[d];
    domain.mu.lock();
    for_each_scope(domain, [scopes](ScopeState* scope) ABSL_NO_THREAD_SAFETY_ANALYSIS {
      scopes->push_back(scope);
    });
  }
  std::sort(scopes->begin(), scopes->end(), std::less<ScopeState*>());
  for (ScopeState* scope : *scopes) scope->mu_.lock();
  g_fork_locked_scopes = scopes;
}

void unlock_scopes_after_fork() {
  std::vector<ScopeState*>* const scopes = g_fork_locked_scopes;
  g_fork_locked_scopes = nullptr;
  for (auto it = scopes->rbegin(); it != scopes->rend(); ++it) (*it)->mu_.unlock();
  delete scopes;
  for (std::size_t d = kDomains; d-- > 0;) all_domains()[d].mu.unlock();
}

void abandon_other_threads_in_child() noexcept {
  Slots& s = slots();
  ScopeState* const mine = t_thread_state;
  std::vector<std::uint32_t> dead;
  {
    MutexLock lock(g_process_mutex);
    // Registries that lived on the stacks of threads that are gone: their values are
    // abandoned in every scope and their index is never reused.
    for (std::uint32_t index = 0; index < s.next_index; ++index) {
      SlotRegistry* reg = registry_at(index);
      if (reg != nullptr && on_dead_stack(reg->stack_owner_)) {
        dead.push_back(index);
        set_registry_at(index, nullptr);
      }
    }
  }
  for (std::size_t d = 0; d < kDomains; ++d) {
    Domain& domain = all_domains()[d];
    MutexLock lock(domain.mu);
    for_each_scope(domain, [&](ScopeState* scope) ABSL_NO_THREAD_SAFETY_ANALYSIS {
      {
        MutexLock scope_lock(scope->mu_);
        for (std::uint32_t index : dead) scope->store(slot_id_for(index), nullptr);
        // Creations by threads that are gone never finish: dropped, so that a caller here
        // makes the value instead of waiting for ever. No thread of the child waits yet.
        auto& creating = scope->creating_;
        creating.erase(std::remove_if(creating.begin(), creating.end(),
                                      [](const ScopeState::Creating& c) {
                                        return thread_gone_in_child(c.thread);
                                      }),
                       creating.end());
        scope->waiting_ = 0;
      }
      if (scope->token_.kind() != ScopeKind::kThread || scope == mine) return;
      {
        MutexLock scope_lock(scope->mu_);
        scope->closing_ = true;
        scope->take_values([](std::uint32_t, NodeBase*) {},  // abandoned, not destroyed
                           [] { return true; });
      }
      abandon_everywhere(TokenRef::of(scope->token_));
      scope->unlink();  // the ScopeState itself is left: its thread's exit never comes
    });
  }
}

// ---- ScopeState: life ---------------------------------------------------------------

ScopeState::ScopeState(ScopeKind kind) : ScopeState(new_scope_token(kind)) {}

ScopeState::ScopeState(ScopeToken token) : token_(token), domain_(this_thread_domain()) {
  install_fork_handlers();
  MutexLock lock(domain_.mu);
  next_ = domain_.scopes;
  if (next_ != nullptr) {
    next_->assert_domain(domain_);
    next_->prev_ = this;
  }
  domain_.scopes = this;
}

ScopeState::~ScopeState() {
  for (auto& chunk : chunks_) delete[] chunk.load(std::memory_order_relaxed);
}

void ScopeState::unlink() {
  if (prev_ != nullptr) {
    prev_->assert_domain(domain_);
    prev_->next_ = next_;
  } else {
    domain_.scopes = next_;
  }
  if (next_ != nullptr) {
    next_->assert_domain(domain_);
    next_->prev_ = prev_;
  }
  prev_ = next_ = nullptr;
}

void ScopeState::leave_domain() noexcept {
  MutexLock lock(domain_.mu);
  dying_unregister();  // a list finish_alone() left registered
  unlink();
}

void ScopeState::end_impl(bool for_reuse) noexcept {
  // A scope ended for reuse is one no code can reach any more; any other may still get
  // values from its own values' destructors, hence the rounds.
  const bool reachable = !for_reuse;  // (end_for_reuse() returned early if nothing to end)
  // A pass cut short because no memory was left to list another value (DyingList::add
  // must not fail once a value is out of its slot) destroys what it took and goes on:
  // the list keeps room for two values without allocating, so every pass takes some. Such
  // a pass is not counted as a round, but it does count towards refusing new values (so
  // that destructors that make values cannot keep the end going for ever).
  int passes = 0;
  for (int round = 0;; ++round, ++passes) {
    bool done = false;
    bool dying = false;
    bool cut_short = false;
    NodeBase* first = nullptr;
    bool alone = false;
    {
      MutexLock lock(domain_.mu);
      if (for_reuse) dying_drop_finished();  // the item the last life's end left
      // Token-keyed values first: found through the binding index (nothing to do, and no
      // further lock taken, when no token-keyed registry holds a value for this scope).
      // Out of memory there, a registry keeps its value for the next pass.
      if (round < kHardRounds) {
        try {
          collect_keyed();
        } catch (const std::bad_alloc&) {
          cut_short = true;
        }
      }
      {
        // An unreachable scope's mutex guards nothing the domain's does not: with no guard,
        // capture or current frame left, the only others that can touch its slots are a
        // registry's destructor, size() and for_each, and each holds the domain first. So
        // the domain's lock alone serves (one lock fewer per request scope's end).
        std::optional<MutexLock> scope_lock;
        if (reachable) scope_lock.emplace(mu_);
        assert_held();
        if (!reachable || passes >= kMaxRounds) closing_ = true;
        if (round < kHardRounds && !cut_short) {
          cut_short = !take_values(
              [this](std::uint32_t index, NodeBase* node) ABSL_NO_THREAD_SAFETY_ANALYSIS {
                // A value another scope still binds (a copy's) only loses this binding.
                if (release_if_shared(node)) return;
                SlotRegistry* reg = registry_at(index);
                assert(reg != nullptr);  // a registry empties its slots before it goes
                dying_add(reg, node);  // domain mutex held here; room made by dying_room
              },
              [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return dying_room(); });
        }
        // Unreachable: nothing can add values now; reachable: stop once a round found
        // none (values created from here on are refused).
        dying = !dying_empty();
        done = !cut_short && (!reachable || !dying);
        if (done) closing_ = true;
      }
      if (done && !for_reuse) unlink();
      if (dying) {
        first = dying_start_first();  // saves destroy_all a lock
        // A recycled scope's one value (the common request scope): reported gone without
        // the lock; the list stays registered until the next life's end or leave_domain().
        alone = for_reuse && first != nullptr && dying_size() == 1;
      }
    }
    if (alone) {
      dying_.finish_alone(first);
    } else if (dying) {
      dying_.destroy_all(first);
    }
    if (done) return;
    assert(!cut_short || dying);  // room for two: a pass cut short took something
    if (cut_short) --round;
  }
}

}  // namespace scopereg::internal
