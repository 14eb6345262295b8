// scopereg/internal/keyed_store.h -- not part of the public API.
//
// The backend of a registry keyed by a token (a ScopeFunc, or a user strategy): a sharded
// hash map under per-shard mutexes, with a per-thread cache in front for ScopeToken keys
// so that a hit takes no lock and writes no shared cache line.
//
// Cache validity: every removal bumps the store's epoch (under the shard lock, after the
// erase); a cache entry records the epoch it saw under the same lock, so an entry whose
// epoch still matches points at a live value. Store ids are never reused.

#ifndef SCOPEREG_INTERNAL_KEYED_STORE_H_
#define SCOPEREG_INTERNAL_KEYED_STORE_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/function_ref.h"
#include "absl/hash/hash.h"
#include "scopereg/error.h"
#include "scopereg/internal/scope_state.h"
#include "scopereg/scope.h"

namespace scopereg::internal {

struct KeyCacheEntry {
  std::uint64_t store = 0;  // 0: empty
  std::uint64_t epoch = 0;
  ScopeToken token;
  NodeBase* node = nullptr;
};
inline constexpr std::size_t kKeyCacheSize = 16;
// Trivially destructible and constant-initialised: no TLS init guard on a hit.
extern thread_local constinit KeyCacheEntry t_key_cache[kKeyCacheSize];

std::uint64_t next_store_id() noexcept;

template <typename Token>
class KeyedStore final : public RegistryRecord {
  static constexpr bool kCached = std::is_same_v<Token, ScopeToken>;

 public:
  KeyedStore() {
    if constexpr (kCached) subscribe_to_scope_ends();
  }

  ~KeyedStore() {
    std::vector<NodeBase*> nodes;
    retire(nodes);  // after this no scope end reaches us
    for (Shard& shard : shards_) {
      std::lock_guard<std::mutex> lock(shard.mu);
      for (auto& [token, entry] : shard.map) {
        if (entry.node != nullptr) nodes.push_back(entry.node);
      }
      shard.map.clear();
    }
    for (NodeBase* n : nodes) delete n;
  }

  // Lock-free for ScopeToken keys on a cache hit; otherwise one shard lock.
  NodeBase* find(const Token& token) {
    if constexpr (kCached) {
      const KeyCacheEntry& c = t_key_cache[id_ % kKeyCacheSize];
      if (c.store == id_ && c.token == token &&
          c.epoch == epoch_.load(std::memory_order_acquire)) {
        return c.node;
      }
    }
    return find_slow(token);
  }

  NodeBase* get_or_create(const Token& token, absl::FunctionRef<NodeBase*()> make,
                          bool* created) {
    Shard& shard = shard_for(token);
    const void* context = current_context_id();
    std::unique_lock<std::mutex> lock(shard.mu);
    for (;;) {
      auto it = shard.map.find(token);
      if (it == shard.map.end()) break;
      if (it->second.node != nullptr) {
        *created = false;
        remember(token, it->second.node);
        return it->second.node;
      }
      if (it->second.creator == context) throw_factory_reentered();
      shard.cv.wait(lock);
    }
    shard.map.emplace(token, Entry{nullptr, context});
    NodeBase* node = make_unlocked(lock, make, [&] {
      shard.map.erase(token);
      shard.cv.notify_all();
    });
    shard.map[token].node = node;
    live_.fetch_add(1, std::memory_order_relaxed);
    shard.cv.notify_all();
    remember(token, node);
    *created = true;
    return node;
  }

  // Installs `node` (null removes) and returns the previous value for the caller to delete.
  NodeBase* exchange(const Token& token, NodeBase* node) {
    Shard& shard = shard_for(token);
    const void* context = current_context_id();
    std::unique_lock<std::mutex> lock(shard.mu);
    for (;;) {
      auto it = shard.map.find(token);
      if (it == shard.map.end() || it->second.node != nullptr) break;
      if (it->second.creator == context) {
        throw ScopeError("scopereg: set()/clear() called from inside the factory creating "
                         "the same value");
      }
      shard.cv.wait(lock);
    }
    NodeBase* old = nullptr;
    auto it = shard.map.find(token);
    if (it != shard.map.end()) {
      old = it->second.node;
      if (node != nullptr) {
        it->second.node = node;
      } else {
        shard.map.erase(it);
      }
    } else if (node != nullptr) {
      shard.map.emplace(token, Entry{node, nullptr});
    }
    if (old != nullptr) epoch_.fetch_add(1, std::memory_order_release);
    live_.fetch_add((node != nullptr) - (old != nullptr), std::memory_order_relaxed);
    return old;
  }

  std::int64_t size() const { return live_.load(std::memory_order_relaxed); }

  // Visits every value with its shard's lock held.
  void for_each(absl::FunctionRef<void(const Token&, NodeBase*)> visit) {
    for (Shard& shard : shards_) {
      std::lock_guard<std::mutex> lock(shard.mu);
      for (auto& [token, entry] : shard.map) {
        if (entry.node != nullptr) visit(token, entry.node);
      }
    }
  }

 private:
  struct Entry {
    NodeBase* node;       // null while being created
    const void* creator;  // the context running the factory
  };
  struct alignas(64) Shard {
    std::mutex mu;
    std::condition_variable cv;
    absl::flat_hash_map<Token, Entry, absl::Hash<Token>> map;
  };
  static constexpr std::size_t kShards = 16;

  Shard& shard_for(const Token& token) {
    return shards_[(absl::Hash<Token>{}(token) >> 7) % kShards];
  }

  NodeBase* find_slow(const Token& token) {
    Shard& shard = shard_for(token);
    std::lock_guard<std::mutex> lock(shard.mu);
    auto it = shard.map.find(token);
    if (it == shard.map.end() || it->second.node == nullptr) return nullptr;
    remember(token, it->second.node);
    return it->second.node;
  }

  // Requires the token's shard lock.
  void remember(const Token& token, NodeBase* node) {
    if constexpr (kCached) {
      t_key_cache[id_ % kKeyCacheSize] =
          KeyCacheEntry{id_, epoch_.load(std::memory_order_relaxed), token, node};
    }
  }

  // Called with the process-wide mutex held: never waits. A value still being created for
  // an ended scope (misuse: code still running in it) is left for the registry's end.
  NodeBase* extract_for_end(ScopeToken token) override {
    if constexpr (kCached) {
      Shard& shard = shard_for(token);
      std::lock_guard<std::mutex> lock(shard.mu);
      auto it = shard.map.find(token);
      if (it == shard.map.end() || it->second.node == nullptr) return nullptr;
      NodeBase* node = it->second.node;
      shard.map.erase(it);
      epoch_.fetch_add(1, std::memory_order_release);
      live_.fetch_sub(1, std::memory_order_relaxed);
      return node;
    } else {
      return nullptr;
    }
  }

  const std::uint64_t id_ = next_store_id();
  alignas(64) std::atomic<std::uint64_t> epoch_{1};
  std::atomic<std::int64_t> live_{0};
  Shard shards_[kShards];
};

}  // namespace scopereg::internal

#endif  // SCOPEREG_INTERNAL_KEYED_STORE_H_
