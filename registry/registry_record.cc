#include "scopereg/internal/registry_record.h"

#include <algorithm>
#include <cassert>
#include <exception>
#include <new>
#include <unordered_map>
#include <utility>

#include "absl/hash/hash.h"
#include "scopereg/internal/fork.h"

namespace scopereg::internal {

constinit Mutex g_process_mutex;
constinit std::atomic<std::size_t> g_keyed_registries{0};

namespace {

// Token-keyed registries (for fork and for the child's clean-up).
struct Subscribers {
  std::vector<RegistryRecord*> list ABSL_GUARDED_BY(g_process_mutex);
};
Subscribers& subscribers() {
  static Subscribers* const s = new Subscribers;  // never destroyed, on purpose
  return *s;
}

// The binding index: (token type, token hash) -> the registries holding a value for a
// token with that type and hash, each with its count of bindings (binds minus unbinds).
// The index is locked before a store's shards, never after: a registry binds before it
// stores (KeyedCell::reserve_store, so that running out of memory fails before anything
// changed) and unbinds after its shard's lock is released. A count therefore counts
// values stored plus stores still on their way. (Should an unbind ever arrive before its
// bind, the count goes to -1 and back to 0 rather than losing either.) Holdings whose
// count reaches 0 are removed.
struct Holding {
  RegistryRecord* holder;
  int count;
};
using Holdings = absl::InlinedVector<Holding, 2>;
struct alignas(64) BindingShard {
  Mutex mu;
  // Not absl::flat_hash_map: see KeyedStore::Shard (out of memory in its growth leaves
  // it corrupt; a bind must fail cleanly instead).
  std::unordered_map<std::pair<const void*, std::size_t>, Holdings,
                     absl::Hash<std::pair<const void*, std::size_t>>>
      map ABSL_GUARDED_BY(mu);
  std::atomic<std::size_t> size{0};  // map.size(), for a lock-free "nothing bound here"
};
constexpr int kBindingShardBits = 6;
constexpr std::size_t kBindingShards = std::size_t{1} << kBindingShardBits;
BindingShard* binding_shards() {
  static BindingShard* const shards = new BindingShard[kBindingShards];  // never destroyed
  return shards;
}
BindingShard& binding_shard_at(std::size_t place) {
  return binding_shards()[shard_index(place, kBindingShardBits)];
}
BindingShard& binding_shard(const TokenRef& token) { return binding_shard_at(token.place); }

}  // namespace

// ---- Domain -------------------------------------------------------------------------

Domain* all_domains() noexcept {
  static Domain* const domains = new Domain[kDomains];  // never destroyed, on purpose
  return domains;
}

Domain& this_thread_domain() noexcept {
  static Domain* const domains = all_domains();
  return domains[current_thread_serial() % kDomains];
}

// ---- DyingList ----------------------------------------------------------------------

void DyingList::assert_domain([[maybe_unused]] const Domain& held) const {
  assert(&held == &domain_);
}

void DyingList::reserve_one() { items_.reserve(items_.size() + 1); }

void DyingList::add(RegistryRecord* record, NodeBase* node) {
  items_.push_back(Item{record, node, State::kPending});
  owner_ = current_thread_serial();
  if (!registered_) {
    registered_ = true;
    prev_ = nullptr;
    next_ = domain_.dying;
    if (next_ != nullptr) {
      next_->assert_domain(domain_);
      next_->prev_ = this;
    }
    domain_.dying = this;
  }
}

NodeBase* DyingList::start_first() {
  if (items_.empty() || items_[0].state != State::kPending) return nullptr;
  items_[0].state = State::kDestroying;
  return items_[0].node;
}

// items_ read without the mutex: only its owner (this thread, now) changes the vector, and
// others (retire) only read it; the item's state is the one field both write (atomically).
void DyingList::finish_alone(NodeBase* first) noexcept ABSL_NO_THREAD_SAFETY_ANALYSIS {
  release(first);  // items_[0], ours since start_first()
  // Gone, then a look for waiters (both sequentially consistent): a retiring registry
  // counts itself waiting before it looks at the items (retire), so either it sees this
  // item gone or this sees it waiting and wakes it, under the mutex it waits with.
  std::atomic_ref<State>(items_[0].state).store(State::kGone, std::memory_order_seq_cst);
  if (domain_.waiting.load(std::memory_order_seq_cst) > 0) {
    MutexLock lock(domain_.mu);
    domain_.destroyed.notify_all();
  }
}

void DyingList::drop_finished() {
  for (Item& item : items_) {
    if (item.state != State::kGone) return;
  }
  items_.clear();
}

void DyingList::unregister() {
  items_.clear();
  if (!registered_) return;
  if (prev_ != nullptr) {
    prev_->assert_domain(domain_);
    prev_->next_ = next_;
  } else {
    domain_.dying = next_;
  }
  if (next_ != nullptr) {
    next_->assert_domain(domain_);
    next_->prev_ = prev_;
  }
  prev_ = next_ = nullptr;
  registered_ = false;
}

void DyingList::destroy_all(NodeBase* first) noexcept {
  constexpr std::size_t kNone = ~std::size_t{0};
  std::size_t finished = kNone;  // the item destroyed last round
  if (first != nullptr) {
    release(first);  // items_[0], ours since start_first()
    finished = 0;
  }
  for (;;) {
    NodeBase* node = nullptr;
    std::size_t next = 0;
    {
      MutexLock lock(domain_.mu);
      // One lock per value: report the previous destruction and take the next value.
      if (finished != kNone) {
        items_[finished].state = State::kGone;
        if (domain_.waiting.load(std::memory_order_relaxed) > 0) domain_.destroyed.notify_all();
      }
      while (next < items_.size() && items_[next].state != State::kPending) ++next;
      if (next == items_.size()) {
        unregister();
        return;
      }
      items_[next].state = State::kDestroying;
      node = items_[next].node;
    }
    release(node);  // destroys it unless a copied scope still binds it
    finished = next;
  }
}

// ---- RegistryRecord -----------------------------------------------------------------

RegistryRecord::RegistryRecord() : stack_owner_(stack_owner(this)) {}

bool RegistryRecord::on_dead_stack_in_child() const { return on_dead_stack(stack_owner_); }

void RegistryRecord::retire(DeferredReleases& out,
                            absl::FunctionRef<bool(Domain&)> in_domain) {
  Domain* const domains = all_domains();
  for (std::size_t d = 0; d < kDomains; ++d) {
    Domain& domain = domains[d];
    MutexLock lock(domain.mu);
    for (;;) {
      // Again after every wait: a value destroyed meanwhile may have made a new value of
      // this registry in its scope, of this domain (a destructor calling its own slot
      // registry in the scope being ended: tolerated, see ScopedRegistry's contract).
      bool refused = !in_domain(domain);
      // Counted as waiting before looking (see DyingList::finish_alone).
      domain.waiting.fetch_add(1, std::memory_order_seq_cst);
      bool in_progress = false;
      for (DyingList* list = domain.dying; list != nullptr; list = list->next_) {
        list->assert_domain(domain);
        for (DyingList::Item& item : list->items_) {
          if (item.record != this) continue;
          const DyingList::State state = DyingList::load_state(item);
          if (state == DyingList::State::kPending) {
            if (refused || !out.add(item.node)) {
              refused = true;  // left pending, for the next visit
              continue;
            }
            item.state = DyingList::State::kGone;  // pending items change only under mu
          } else if (state == DyingList::State::kDestroying) {
            in_progress = true;
          }
        }
      }
      if (refused) {
        // No memory left to list another value: release those listed (no lock held, as
        // for every value), then visit this domain again.
        domain.waiting.fetch_sub(1, std::memory_order_relaxed);
        domain.mu.unlock();
        out.flush();
        domain.mu.lock();
        continue;
      }
      if (in_progress) domain.destroyed.wait(domain.mu);
      domain.waiting.fetch_sub(1, std::memory_order_relaxed);
      if (!in_progress) break;
    }
  }
}

void RegistryRecord::subscribe_to_scope_ends() {
  install_fork_handlers();
  MutexLock lock(g_process_mutex);
  subscribers().list.push_back(this);
  subscribed_ = true;
  g_keyed_registries.store(subscribers().list.size(), std::memory_order_release);
}

void RegistryRecord::unsubscribe_locked() {
  if (subscribed_) {
    std::erase(subscribers().list, this);
    subscribed_ = false;
    g_keyed_registries.store(subscribers().list.size(), std::memory_order_release);
  }
}

namespace {
// Adds `delta` to `holder`'s count under `key`, removing what reaches 0.
void add_binding(BindingShard& shard, std::pair<const void*, std::size_t> key,
                 RegistryRecord* holder, int delta) ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
  Holdings& holdings = shard.map[key];  // may throw: nothing changed then
  auto pos = std::find_if(holdings.begin(), holdings.end(),
                          [holder](const Holding& h) { return h.holder == holder; });
  if (pos == holdings.end()) {
    try {
      holdings.push_back(Holding{holder, delta});
    } catch (...) {  // no memory: leave no empty entry behind
      if (holdings.empty()) shard.map.erase(key);
      throw;
    }
  } else if ((pos->count += delta) == 0) {
    holdings.erase(pos);
    if (holdings.empty()) shard.map.erase(key);
  }
  shard.size.store(shard.map.size(), std::memory_order_relaxed);
}
}  // namespace

void RegistryRecord::bind(TokenRef token) {
  BindingShard& shard = binding_shard(token);
  MutexLock lock(shard.mu);
  add_binding(shard, {token.type, token.hash}, this, +1);
}

void RegistryRecord::unbind(TokenRef token) {
  BindingShard& shard = binding_shard(token);
  MutexLock lock(shard.mu);
  add_binding(shard, {token.type, token.hash}, this, -1);
}

namespace {
// Removes, in every shard of the index, the holdings of the registries `gone` picks.
template <typename Gone>
void erase_holdings_where(Gone gone) {
  for (std::size_t i = 0; i < kBindingShards; ++i) {
    BindingShard& shard = binding_shards()[i];
    MutexLock lock(shard.mu);
    for (auto it = shard.map.begin(); it != shard.map.end();) {
      Holdings& holdings = it->second;
      holdings.erase(std::remove_if(holdings.begin(), holdings.end(),
                                    [&gone](const Holding& h) { return gone(h.holder); }),
                     holdings.end());
      if (holdings.empty()) shard.map.erase(it++); else ++it;
    }
    shard.size.store(shard.map.size(), std::memory_order_relaxed);
  }
}

// Set in a fork child: a thread of the parent may have been between a registry's change
// and its bind or unbind when the process forked, and never finishes it here.
std::atomic<bool> g_index_may_be_stale{false};
}  // namespace

void RegistryRecord::drop_leftover_bindings() {
  if (g_index_may_be_stale.load(std::memory_order_relaxed)) {
    // Whatever the index still holds for this registry goes with it.
    erase_holdings_where([this](const RegistryRecord* r) { return r == this; });
    return;
  }
#ifndef NDEBUG
  for (std::size_t i = 0; i < kBindingShards; ++i) {
    BindingShard& shard = binding_shards()[i];
    MutexLock lock(shard.mu);
    for (const auto& [key, holdings] : shard.map) {
      for (const Holding& h : holdings) {
        assert(h.holder != this && "a token-keyed registry left bindings in the index");
      }
    }
  }
#endif
}

// ---- scope ends ---------------------------------------------------------------------

void extract_bound(TokenRef token, absl::FunctionRef<void(RegistryRecord*, NodeBase*)> take,
                   absl::FunctionRef<void()> make_room) {
  BindingShard& shard = binding_shard(token);
  if (shard.size.load(std::memory_order_acquire) == 0) return;  // the common case
  MutexLock lock(shard.mu);
  auto it = shard.map.find({token.type, token.hash});
  if (it == shard.map.end()) return;
  Holdings& holdings = it->second;
  // A holder's bindings may be for several tokens that share this hash. Each holder is
  // asked once (whatever its count: one below 1 has a bind still on its way): when it had
  // a value for `token`, that value's binding goes; its others stay, for the colliding
  // tokens. A holder that throws (a user token's hash or ==, or no memory for `take`'s
  // room) keeps its value and binding; the others are still asked, and the first
  // exception is rethrown once the index is consistent.
  std::exception_ptr error;
  for (Holding& h : holdings) {
    try {
      make_room();  // so that take() cannot fail once the value is out of its registry
      if (NodeBase* node = h.holder->extract_for_end(token)) {
        take(h.holder, node);
        --h.count;
      }
    } catch (...) {
      if (error == nullptr) error = std::current_exception();
    }
  }
  holdings.erase(std::remove_if(holdings.begin(), holdings.end(),
                                [](const Holding& h) { return h.count == 0; }),
                 holdings.end());
  if (holdings.empty()) shard.map.erase(it);
  shard.size.store(shard.map.size(), std::memory_order_relaxed);
  if (error != nullptr) std::rethrow_exception(error);
}

bool has_bound_at(std::size_t place) noexcept {
  return binding_shard_at(place).size.load(std::memory_order_acquire) != 0;
}

void copy_bound(TokenRef from, TokenRef to) {
  BindingShard& shard = binding_shard(from);
  if (shard.size.load(std::memory_order_acquire) == 0) return;  // the common case
  absl::InlinedVector<NodeBase*, 4> unused;
  std::exception_ptr error;
  {
    // Under the process mutex, a registry found in the index is not retiring (it leaves
    // the index under that mutex), so it can be called after the shard's lock is released.
    MutexLock process_lock(g_process_mutex);
    absl::InlinedVector<RegistryRecord*, 4> holders;
    {
      MutexLock lock(shard.mu);
      auto it = shard.map.find({from.type, from.hash});
      if (it == shard.map.end()) return;
      for (const Holding& h : it->second) holders.push_back(h.holder);
    }
    unused.reserve(holders.size());
    for (RegistryRecord* holder : holders) {
      // Bound first (it may allocate): if it throws, nothing was copied into `to`. Undone
      // when nothing is copied (the holding exists then: no allocation).
      try {
        holder->bind(to);
      } catch (...) {
        error = std::current_exception();
        break;
      }
      NodeBase* node = nullptr;
      bool copied = false;
      try {
        copied = holder->share_for_copy(from, to, node);
      } catch (...) {  // no memory for `to`'s entry: the binding it took comes back in `node`
        error = std::current_exception();
      }
      if (!copied) holder->unbind(to);
      if (node != nullptr) unused.push_back(node);
      if (error != nullptr) break;
    }
  }
  for (NodeBase* node : unused) release(node);  // no lock held: may run a destructor
  if (error != nullptr) std::rethrow_exception(error);
}

void collect_ended_locked(TokenRef token, DyingList& out) {
  extract_bound(
      token,
      [&out](RegistryRecord* holder, NodeBase* node) ABSL_NO_THREAD_SAFETY_ANALYSIS {
        out.add(holder, node);
      },
      [&out]() ABSL_NO_THREAD_SAFETY_ANALYSIS { out.reserve_one(); });
}

void collect_ended(TokenRef token, DyingList& out) {
  MutexLock lock(out.domain().mu);
  out.assert_domain(out.domain());
  collect_ended_locked(token, out);
}

void end_scope_everywhere(TokenRef token) {
  // In rounds, as a scope's end: a value's destructor may make another value for the same
  // token (its scope is still current there), which the next round ends.
  // A round that finds nothing ends it (has_bound_at only tells about the token's shard).
  // Out of memory to list one more value, a pass ends what it took and the next goes on
  // (not counted as a round): the list holds two values without allocating, so every
  // pass takes some. The end of a fiber, which cannot throw, relies on it.
  constexpr int kRounds = 8;
  constexpr int kMaxShortPasses = 1 << 20;  // then std::bad_alloc goes to the caller
  int short_passes = 0;
  for (int round = 0; round < kRounds; ++round) {
    DyingList dying(this_thread_domain());
    bool cut_short = false;  // no memory to list one more value: took what it could
    const auto collect = [&]() -> bool {
      MutexLock lock(dying.domain().mu);
      dying.assert_domain(dying.domain());
      try {
        collect_ended_locked(token, dying);
      } catch (const std::bad_alloc&) {
        if (dying.empty()) throw;  // took nothing: no pass can get further
        cut_short = true;
      }
      return !dying.empty();
    };
    bool found = false;
    try {
      found = collect();
    } catch (...) {  // a token's hash or == threw, or no memory: what was taken still ends
      dying.destroy_all();
      throw;
    }
    dying.destroy_all();
    if (cut_short) {
      if (++short_passes > kMaxShortPasses) throw std::bad_alloc();
      --round;
      continue;
    }
    if (!found || !has_bound_at(token.place)) return;
  }
}

void abandon_everywhere(TokenRef token) {
  extract_bound(token, [](RegistryRecord*, NodeBase*) {});  // left alive: the parent's
}

// ---- fork ---------------------------------------------------------------------------

void lock_bindings_for_fork() {
  for (std::size_t i = 0; i < kBindingShards; ++i) binding_shards()[i].mu.lock();
}

void unlock_bindings_after_fork() {
  for (std::size_t i = 0; i < kBindingShards; ++i) binding_shards()[i].mu.unlock();
}

void lock_subscribers_for_fork() {
  for (RegistryRecord* sub : subscribers().list) sub->lock_for_fork();
}

void unlock_subscribers_after_fork() {
  for (RegistryRecord* sub : subscribers().list) sub->unlock_after_fork();
}

void forget_dead_records_in_child() noexcept {
  g_index_may_be_stale.store(true, std::memory_order_relaxed);
  {
    MutexLock lock(g_process_mutex);
    // Registries on the stacks of threads that are gone: scope ends must not reach them.
    std::vector<RegistryRecord*> kept;
    std::vector<RegistryRecord*> dead;
    for (RegistryRecord* r : subscribers().list) {
      if (on_dead_stack(r->stack_owner_)) {
        r->subscribed_ = false;
        dead.push_back(r);
      } else {
        kept.push_back(r);
      }
    }
    subscribers().list.swap(kept);
    for (RegistryRecord* r : subscribers().list) r->forget_gone_creators_in_child();
    g_keyed_registries.store(subscribers().list.size(), std::memory_order_release);
    if (!dead.empty()) {
      erase_holdings_where([&dead](const RegistryRecord* r) {
        return std::find(dead.begin(), dead.end(), r) != dead.end();
      });
    }
  }
  // Values other threads were destroying: abandoned with their lists (which may have lived
  // on those threads' stacks, still mapped here); nobody is destroying anything now. A
  // recycled scope's list (finish_alone) is unregistered the same way, so a later end of
  // that scope in the child registers it afresh.
  const std::uint64_t me = current_thread_serial();
  for (std::size_t d = 0; d < kDomains; ++d) {
    Domain& domain = all_domains()[d];
    MutexLock lock(domain.mu);
    domain.waiting.store(0, std::memory_order_relaxed);  // no thread of the child waits yet
    for (DyingList* list = domain.dying; list != nullptr;) {
      list->assert_domain(domain);
      DyingList* next = list->next_;
      if (list->owner_ != me) list->unregister();  // its values abandoned, not destroyed
      list = next;
    }
  }
}

}  // namespace scopereg::internal
