// scopereg/internal/keyed_store.h -- not part of the public API.
//
// The keyed backend, behind a registry whose strategy is not slot-based (FuncScope,
// FuncScopeOf<K>, user strategies): values keyed by token in a sharded hash map under
// per-shard mutexes, with a per-thread cache in front for ScopeToken keys so that a hit
// takes no lock and writes no shared cache line. Creation goes through the shared
// protocol (creation.h) with a KeyedCell.
//
// Cache validity: a cache entry records the store's epoch as it saw it under the token's
// shard lock, so an entry whose epoch still matches points at a live value. Every removal
// of a value some thread may have cached bumps the epoch (under the shard lock, before the
// node goes); a value only its remover's thread cached is instead dropped from that
// thread's own cache, so a thread ending its own scopes writes no line every thread reads
// (each value records which thread cached it, or that several did). Store ids are never
// reused.
//
// Every value stored records a binding in the binding index (registry_record.h), dropped
// when it goes: `end_scope(token)` and the end of a built-in scope find the stores holding
// a value for their token there and call extract_for_end(). Stores also register with the
// subscriber list, which only fork() uses (to take their shard locks).

#ifndef SCOPEREG_INTERNAL_KEYED_STORE_H_
#define SCOPEREG_INTERNAL_KEYED_STORE_H_

#include <array>
#include <atomic>
#include <cassert>
#include <cstdint>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/hash/hash.h"
#include "scopereg/internal/creation.h"
#include "scopereg/internal/fork.h"
#include "scopereg/internal/mutex.h"
#include "scopereg/internal/node.h"
#include "scopereg/internal/registry_record.h"
#include "scopereg/internal/token_ref.h"
#include "scopereg/scope.h"

namespace scopereg::internal {

struct KeyCacheEntry {
  std::uint64_t store = 0;  // 0: empty
  std::uint64_t epoch = 0;
  ScopeToken token;
  NodeBase* node = nullptr;
};
// Direct-mapped by store id (ids are consecutive): up to 128 registries used alternately
// on one thread each keep their entry.
inline constexpr std::size_t kKeyCacheSize = 128;
// Trivially destructible and constant-initialised: no TLS init guard on a hit.
extern thread_local constinit KeyCacheEntry t_key_cache[kKeyCacheSize];
KeyCacheEntry* key_cache_address() noexcept;  // t_key_cache, never inlined
// This thread's cache (through a call in a shared library's code: SCOPEREG_TLS_VIA_CALL in
// context_state.h).
inline KeyCacheEntry* key_cache() noexcept {
#if SCOPEREG_TLS_VIA_CALL
  return key_cache_address();
#else
  return t_key_cache;
#endif
}

std::uint64_t next_store_id() noexcept;

template <typename Token>
class KeyedCell;

template <typename Token>
class KeyedStore final : public RegistryRecord {
  static constexpr bool kCached = std::is_same_v<Token, ScopeToken>;

 public:
  KeyedStore() { subscribe_to_scope_ends(); }

  ~KeyedStore() {
    DeferredReleases nodes;
    // Every entry out of the maps, a batch at a time, each batch under the process mutex
    // (so that no copy_bound() shares a value of it meanwhile): each entry moved out of its
    // map whole (no allocation: out of memory, a destruction must still finish), its
    // binding dropped once the shard's lock is free (the index is locked before a store's
    // shards, never after), its value kept in `nodes` (or, when no memory is left to list
    // it, released with no lock held), its token destroyed with no lock held (a user's
    // token may own anything). The store unsubscribes with its last batch, when every map
    // is empty: until then it is a subscribed store whose values are bound, as before.
    // Afterwards no scope end or copy reaches it.
    for (bool done = false; !done;) {
      std::array<typename Map::node_type, kTakeBatch> taken;
      std::array<NodeBase*, kTakeBatch> refused;
      std::size_t refused_count = 0;
      {
        MutexLock lock(g_process_mutex);
        std::size_t n = 0;
        for (Shard& shard : shards_) {
          MutexLock shard_lock(shard.mu);
          while (n < kTakeBatch && !shard.map.empty()) {
            auto it = shard.map.begin();
            // (No cache needs forgetting: store ids are never reused.)
            if (it->second.node != nullptr) count(shard, -1);
            taken[n++] = shard.map.extract(it);  // a creation mark goes too (misuse)
          }
        }
        for (std::size_t i = 0; i < n; ++i) {
          NodeBase* const node = taken[i].mapped().node;
          if (node == nullptr) continue;
          unbind(TokenRef::of(taken[i].key()));
          if (!nodes.add(node)) refused[refused_count++] = node;
        }
        if (n < kTakeBatch) {  // every map is empty
          unsubscribe_locked();
          drop_leftover_bindings();
          done = true;
        }
      }
      for (std::size_t i = 0; i < refused_count; ++i) release(refused[i]);
    }  // (the batch's tokens and map nodes go here)
    // Then take back what dying scopes hold.
    retire(nodes);
    nodes.flush();
  }

  // Lock-free for ScopeToken keys on a cache hit; otherwise one shard lock.
  NodeBase* find(const Token& token) {
    if constexpr (kCached) {
      const KeyCacheEntry& c = key_cache()[id_ % kKeyCacheSize];
      if (c.store == id_ && c.token == token &&
          c.epoch == epoch_.load(std::memory_order_acquire)) {
        return c.node;
      }
    }
    return find_slow(token);
  }

  KeyedCell<Token> cell(Token token) { return KeyedCell<Token>(*this, std::move(token)); }

  std::int64_t size() const {
    std::int64_t n = 0;
    for (const Shard& shard : shards_) n += shard.live.load(std::memory_order_relaxed);
    return n;
  }

  // Visits every value with its shard's lock held.
  void for_each(absl::FunctionRef<void(const Token&, NodeBase*)> visit) {
    for (Shard& shard : shards_) {
      MutexLock lock(shard.mu);
      for (auto& [token, entry] : shard.map) {
        if (entry.node != nullptr) visit(token, entry.node);
      }
    }
  }

 private:
  friend class KeyedCell<Token>;
  struct Entry {
    NodeBase* node;       // null while being created
    const void* creator;  // the context running the factory
    std::uint64_t cached_by = 0;  // the thread whose cache may hold node, kManyThreads, or 0
    std::uint64_t creator_thread = 0;  // its current_thread_serial() (fork: gone or not)
  };
  static constexpr std::uint64_t kManyThreads = ~std::uint64_t{0};
  // std::unordered_map, not absl::flat_hash_map: see Shard::map.
  using Map = std::unordered_map<Token, Entry, absl::Hash<Token>>;
  // Entries the destructor moves out of the maps at a time.
  static constexpr std::size_t kTakeBatch = 32;
  struct alignas(64) Shard {
    Mutex mu;
    CondVar cv;
    // std::unordered_map, not absl::flat_hash_map: Debian's Abseil (20220623) leaves a
    // flat_hash_map corrupt when the allocation for its growth throws (its next growth
    // frees memory it does not own), and an insert here must survive running out of
    // memory (the caller gets std::bad_alloc, the store stays usable).
    Map map ABSL_GUARDED_BY(mu);
    std::atomic<std::int64_t> live{0};  // values in `map`; written under mu
  };
  static constexpr int kShardBits = 4;
  static constexpr std::size_t kShards = std::size_t{1} << kShardBits;

  Shard& shard_for(const Token& token) {
    // For scopereg's own tokens, their run of serials (placement_of in token_ref.h).
    return shards_[shard_index(placement_of(token), kShardBits)];
  }

  // Out of line: keeps find(), and so a registry's hit, small enough to inline.
  [[gnu::noinline]] NodeBase* find_slow(const Token& token) {
    Shard& shard = shard_for(token);
    MutexLock lock(shard.mu);
    auto it = shard.map.find(token);
    if (it == shard.map.end() || it->second.node == nullptr) return nullptr;
    remember(it->second, token);
    return it->second.node;
  }

  // Called with the token's shard lock held: caches `entry` for `token` on this thread.
  void remember(Entry& entry, const Token& token) {
    if constexpr (kCached) {
      key_cache()[id_ % kKeyCacheSize] =
          KeyCacheEntry{id_, epoch_.load(std::memory_order_relaxed), token, entry.node};
      const std::uint64_t me = current_thread_serial();
      if (entry.cached_by == 0) {
        entry.cached_by = me;
      } else if (entry.cached_by != me) {
        entry.cached_by = kManyThreads;
      }
    }
  }

  // Called with the token's shard lock held, before `entry`'s value is removed or replaced:
  // no cache may keep pointing at it.
  void forget(Entry& entry) {
    if constexpr (kCached) {
      if (entry.cached_by == 0) return;
      if (entry.cached_by == current_thread_serial()) {
        KeyCacheEntry& c = key_cache()[id_ % kKeyCacheSize];
        if (c.store == id_ && c.node == entry.node) c.store = 0;
      } else {
        epoch_.fetch_add(1, std::memory_order_release);
      }
      entry.cached_by = 0;
    }
  }

  // Called with a shard's lock held: `live_delta` values more (or fewer) in its map.
  static void count(Shard& shard, int live_delta) {
    if (live_delta != 0) {
      shard.live.store(shard.live.load(std::memory_order_relaxed) + live_delta,
                       std::memory_order_relaxed);
    }
  }

  // Called with the token's binding shard held (registry_record.h): never waits, never
  // unbinds (the caller drops the binding). A value still being created for an ended
  // scope (misuse: code still running in it) is left for the registry's end.
  NodeBase* extract_for_end(TokenRef ref) override {
    const Token* token = ref.as<Token>();
    if (token == nullptr) return nullptr;
    Shard& shard = shard_for(*token);
    MutexLock lock(shard.mu);
    auto it = shard.map.find(*token);
    if (it == shard.map.end() || it->second.node == nullptr) return nullptr;
    NodeBase* node = it->second.node;
    forget(it->second);
    shard.map.erase(it);
    count(shard, -1);
    return node;
  }

  // Called with the process mutex held (registry_record.h). Takes the two tokens' shard
  // locks one after the other, never both.
  bool share_for_copy(TokenRef from_ref, TokenRef to_ref, NodeBase*& unused) override {
    const Token* from = from_ref.as<Token>();
    const Token* to = to_ref.as<Token>();
    if (from == nullptr || to == nullptr) return false;
    {
      Shard& shard = shard_for(*to);
      MutexLock lock(shard.mu);
      if (shard.map.find(*to) != shard.map.end()) return false;  // `to`'s own value wins
    }
    NodeBase* node = nullptr;
    {
      Shard& shard = shard_for(*from);
      MutexLock lock(shard.mu);
      auto it = shard.map.find(*from);
      if (it == shard.map.end() || it->second.node == nullptr) return false;
      node = share(it->second.node);
    }
    {
      Shard& shard = shard_for(*to);
      MutexLock lock(shard.mu);
      if (shard.map.find(*to) == shard.map.end()) {
        try {
          shard.map.emplace(*to, Entry{node, nullptr});
        } catch (...) {
          unused = node;  // the binding taken above: the caller releases it
          throw;
        }
        count(shard, +1);
        node = nullptr;
      }
    }
    if (node == nullptr) return true;
    unused = node;  // `to` had its own value: the caller releases the extra binding
    return false;
  }

  void lock_for_fork() override ABSL_NO_THREAD_SAFETY_ANALYSIS {
    for (Shard& shard : shards_) shard.mu.lock();
  }
  void unlock_after_fork() override ABSL_NO_THREAD_SAFETY_ANALYSIS {
    for (Shard& shard : shards_) shard.mu.unlock();
  }
  void forget_gone_creators_in_child() override {
    for (Shard& shard : shards_) {
      MutexLock lock(shard.mu);
      // They never finish: a caller here makes the value anew.
      erase_marks_if(shard,
                     [](const Entry& e) { return thread_gone_in_child(e.creator_thread); });
    }
  }

  // Erases the creation marks (entries with no value yet) that `pred` picks, without
  // hashing or comparing a token (no user code runs).
  template <typename Pred>
  static void erase_marks_if(Shard& shard, Pred pred) ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu) {
    for (auto it = shard.map.begin(); it != shard.map.end();) {
      if (it->second.node == nullptr && pred(it->second)) {
        shard.map.erase(it++);
      } else {
        ++it;
      }
    }
  }

  const std::uint64_t id_ = next_store_id();
  alignas(64) std::atomic<std::uint64_t> epoch_{1};
  Shard shards_[kShards];
};

// KeyedCell: one token's entry in a KeyedStore, as the creation protocol sees it. A value
// being created is an entry with a null node and its creator's context.
template <typename Token>
class KeyedCell {
  using Store = KeyedStore<Token>;

 public:
  KeyedCell(Store& store, Token token)
      : store_(store), shard_(store.shard_for(token)), token_(std::move(token)) {}
  KeyedCell(const KeyedCell&) = delete;
  KeyedCell& operator=(const KeyedCell&) = delete;
  // Records in the binding index what the protocol removed (or reserved and did not
  // store), now that the shard's mutex is free (the index is locked before a store's
  // shards, never after). Dropping a binding allocates nothing, so this cannot fail.
  ~KeyedCell() {
    int net = bound_ - (reserved_ ? 1 : 0);
    assert(net <= 0 && "a value was stored without reserve_store() (creation.h)");
    for (; net < 0; ++net) store_.unbind(TokenRef::of(token_));
  }

  // Called by the creation protocol before a step that may store a value (creation, a
  // set() of a value): records its binding in the index now, where running out of memory
  // throws before anything changed; after the store, recording it could only fail in the
  // destructor. A scope end meanwhile finds no value to take and leaves the reserved
  // binding alone.
  void reserve_store() {
    store_.bind(TokenRef::of(token_));
    reserved_ = true;
  }

  Mutex& mu() const ABSL_LOCK_RETURNED(shard_.mu) { return shard_.mu; }
  NodeBase* load() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard_.mu) {
    auto it = shard_.map.find(token_);
    if (it == shard_.map.end() || it->second.node == nullptr) return nullptr;
    store_.remember(it->second, token_);
    return it->second.node;
  }
  const void* creator() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard_.mu) {
    auto it = shard_.map.find(token_);
    return it != shard_.map.end() && it->second.node == nullptr ? it->second.creator
                                                                : nullptr;
  }
  void check_can_create(bool /*set*/) const {}  // a keyed scope never closes
  void begin_create(const void* context) ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard_.mu) {
    shard_.map.emplace(token_,
                       typename Store::Entry{nullptr, context, 0, current_thread_serial()});
  }
  bool creating(const void* context) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard_.mu) {
    auto it = shard_.map.find(token_);
    return it != shard_.map.end() && it->second.node == nullptr &&
           it->second.creator == context;
  }
  void abort_create(const void* context) noexcept ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard_.mu) {
    try {
      auto it = shard_.map.find(token_);
      if (it != shard_.map.end() && it->second.node == nullptr &&
          it->second.creator == context) {
        shard_.map.erase(it);
      }
      return;
    } catch (...) {
      // The token's hash or == threw: the mark is found by its creator alone, with no
      // user code (a mark left behind would make every later caller wait for ever).
    }
    Store::erase_marks_if(shard_, [context](const typename Store::Entry& e) {
      return e.creator == context;
    });
  }
  void finish_create(NodeBase* node, const void* /*context*/)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard_.mu) {
    typename Store::Entry& entry = shard_.map[token_];
    entry = typename Store::Entry{node, nullptr};
    Store::count(shard_, +1);
    store_.remember(entry, token_);
    ++bound_;
  }
  NodeBase* swap(NodeBase* node) ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard_.mu) {
    NodeBase* old = nullptr;
    auto it = shard_.map.find(token_);
    if (it != shard_.map.end()) {
      old = it->second.node;
      store_.forget(it->second);
      if (node != nullptr) {
        it->second.node = node;
      } else {
        shard_.map.erase(it);
      }
    } else if (node != nullptr) {
      shard_.map.emplace(token_, typename Store::Entry{node, nullptr});
    }
    const int delta = (node != nullptr) - (old != nullptr);
    Store::count(shard_, delta);
    bound_ += delta;
    return old;
  }
  void wait() ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard_.mu) { shard_.cv.wait(shard_.mu); }
  void notify_all() ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard_.mu) { shard_.cv.notify_all(); }

 private:
  Store& store_;
  typename Store::Shard& shard_;
  const Token token_;
  int bound_ = 0;  // values stored (> 0) or removed (< 0) by the protocol
  bool reserved_ = false;  // reserve_store() recorded one binding ahead
};

// KeyedBackend: the registry-side interface of the keyed backend (the same members as
// SlotBackend, plus end_scope()).
template <typename Scope>
class KeyedBackend {
 public:
  using Token = typename Scope::Token;

  NodeBase* find(const Scope& scope) const {
    const Token token = scope.current();
    return store_.find(token);  // a null token is never stored
  }
  bool has_scope(const Scope& scope) const { return !is_null(scope.current()); }
  // Throws ScopeError when the strategy reports no scope (a null ScopeToken).
  KeyedCell<Token> cell(const Scope& scope) {
    Token token = scope.current();
    if (is_null(token)) throw_no_scope("this registry's scope function");
    return store_.cell(std::move(token));
  }
  // The cell of `token` (for end_scope(token)).
  KeyedCell<Token> cell_of(const Token& token) { return store_.cell(token); }
  std::int64_t size() const { return store_.size(); }
  template <typename F>
  void for_each(F&& visit) const {
    store_.for_each(visit);
  }

 private:
  static bool is_null(const Token& token) {
    if constexpr (std::is_same_v<Token, ScopeToken>) {
      return token.is_null();
    } else {
      return false;
    }
  }
  mutable KeyedStore<Token> store_;
};

}  // namespace scopereg::internal

#endif  // SCOPEREG_INTERNAL_KEYED_STORE_H_
