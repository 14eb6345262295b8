// scopereg/internal/token_ref.h -- not part of the public API.
//
// A type-erased reference to a token of any type, so that code which does not know a
// registry's token type (scope ends, ExplicitScope's table) can still name a token.

#ifndef SCOPEREG_INTERNAL_TOKEN_REF_H_
#define SCOPEREG_INTERNAL_TOKEN_REF_H_

namespace scopereg::internal {

// One distinct address per type: tokens of different types never match.
template <typename K>
inline constexpr char kTokenTypeTag = 0;

struct TokenRef {
  const void* type;   // &kTokenTypeTag<K>
  const void* value;  // a K

  template <typename K>
  static TokenRef of(const K& token) {
    return TokenRef{&kTokenTypeTag<K>, &token};
  }
  // The token as a K, or null when it is of another type.
  template <typename K>
  const K* as() const {
    return type == &kTokenTypeTag<K> ? static_cast<const K*>(value) : nullptr;
  }
};

}  // namespace scopereg::internal

#endif  // SCOPEREG_INTERNAL_TOKEN_REF_H_
