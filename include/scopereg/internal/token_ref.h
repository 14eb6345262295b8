// scopereg/internal/token_ref.h -- not part of the public API.
//
// A type-erased reference to a token of any type, so that code which does not know a
// registry's token type (scope ends, ExplicitScope's table) can still name a token.

#ifndef SCOPEREG_INTERNAL_TOKEN_REF_H_
#define SCOPEREG_INTERNAL_TOKEN_REF_H_

#include <cstddef>

#include "absl/hash/hash.h"

namespace scopereg {
class ScopeToken;
}  // namespace scopereg

namespace scopereg::internal {

// One distinct address per type: tokens of different types never match.
template <typename K>
inline constexpr char kTokenTypeTag = 0;

template <typename K>
const void* token_type_tag() noexcept {
  return &kTokenTypeTag<K>;
}
// ScopeToken's tag is one symbol of the compiled library (registry/scope.cc), not an
// inline variable: every shared library and plugin that uses scopereg then agrees on it,
// and the library never binds to a plugin's copy (which would keep the plugin loaded).
template <>
const void* token_type_tag<ScopeToken>() noexcept;

struct TokenRef {
  const void* type;   // token_type_tag<K>()
  const void* value;  // a K
  std::size_t hash;   // absl::Hash<K>

  template <typename K>
  static TokenRef of(const K& token) {
    return TokenRef{token_type_tag<K>(), &token, absl::Hash<K>{}(token)};
  }
  // The token as a K, or null when it is of another type.
  template <typename K>
  const K* as() const {
    return type == token_type_tag<K>() ? static_cast<const K*>(value) : nullptr;
  }
};

}  // namespace scopereg::internal

#endif  // SCOPEREG_INTERNAL_TOKEN_REF_H_
