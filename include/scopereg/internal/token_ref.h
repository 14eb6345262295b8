// scopereg/internal/token_ref.h -- not part of the public API.
//
// A type-erased reference to a token of any type, so that code which does not know a
// registry's token type (scope ends, ExplicitScope's table) can still name a token.

#ifndef SCOPEREG_INTERNAL_TOKEN_REF_H_
#define SCOPEREG_INTERNAL_TOKEN_REF_H_

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "absl/hash/hash.h"

namespace scopereg {
class ScopeToken;
}  // namespace scopereg

namespace scopereg::internal {

// One distinct address per type: tokens of different types never match. Writable on
// purpose: a linker folding identical read-only data (MSVC's /OPT:ICF, lld's --icf=all
// with --ignore-data-address-equality) could give two types' constant tags one address;
// writable data is never folded. Never written.
template <typename K>
inline char kTokenTypeTag = 0;

template <typename K>
const void* token_type_tag() noexcept {
  return &kTokenTypeTag<K>;
}
// ScopeToken's tag is one symbol of the compiled library (registry/scope.cc), not an
// inline variable: every shared library and plugin that uses scopereg then agrees on it,
// and the library never binds to a plugin's copy (which would keep the plugin loaded).
template <>
const void* token_type_tag<ScopeToken>() noexcept;

// Where sharded tables (the binding index, a keyed store's shards) put a token with hash
// `hash`: the hash, except for the tokens scopereg mints itself (every ScopeToken kind but
// kUser). Those come to each thread in blocks of consecutive serials (scope.cc), and a
// scope is mostly used on the thread that made it, so a run of 64 serials shares a place:
// two threads ending their own scopes then write their own shards, not each other's.
template <typename K>
std::size_t placement_of(const K& token, std::size_t hash) {
  if constexpr (std::is_same_v<K, ScopeToken>) {
    using Kind = decltype(token.kind());
    if (token.kind() != Kind::kUser) return static_cast<std::size_t>(token.id() >> 6);
  }
  return hash;
}

// The same, computing the hash only when the placement needs it.
template <typename K>
std::size_t placement_of(const K& token) {
  if constexpr (std::is_same_v<K, ScopeToken>) {
    using Kind = decltype(token.kind());
    if (token.kind() != Kind::kUser) return placement_of(token, 0);
  }
  return absl::Hash<K>{}(token);
}

// Which of 2^bits shards a placement (or hash) picks: the top bits of the key remixed.
// absl::Hash's bits for nearby integers (two threads' request counters) move together, so
// taking them directly sent concurrent requests to the same shards at the same moments.
constexpr std::size_t shard_index(std::uint64_t key, int bits) noexcept {
  return static_cast<std::size_t>((key * 0x9E3779B97F4A7C15u) >> (64 - bits));
}

struct TokenRef {
  const void* type;   // token_type_tag<K>()
  const void* value;  // a K
  std::size_t hash;   // absl::Hash<K>
  std::size_t place;  // placement_of(): the shard key

  template <typename K>
  static TokenRef of(const K& token) {
    const std::size_t hash = absl::Hash<K>{}(token);
    return TokenRef{token_type_tag<K>(), &token, hash, placement_of(token, hash)};
  }
  // The token as a K, or null when it is of another type.
  template <typename K>
  const K* as() const {
    return type == token_type_tag<K>() ? static_cast<const K*>(value) : nullptr;
  }
};

}  // namespace scopereg::internal

#endif  // SCOPEREG_INTERNAL_TOKEN_REF_H_
