#include "scopereg/internal/keyed_store.h"

namespace scopereg::internal {

thread_local constinit KeyCacheEntry t_key_cache[kKeyCacheSize];

KeyCacheEntry* key_cache_address() noexcept { return t_key_cache; }

std::uint64_t next_store_id() noexcept {
  static constinit std::atomic<std::uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace scopereg::internal
