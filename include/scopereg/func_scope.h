// scopereg/func_scope.h
//
// FuncScope and FuncScopeOf<K>: the run-time strategies (SQLAlchemy's `scopefunc`). A
// `ScopedRegistry<T, FuncScope>` keys its values by whatever the `ScopeFunc` given at
// construction returns; `FuncScopeOf<K>` does the same with a function returning any
// hashable K: a string request id, a (tenant, session) struct with an AbslHashValue.
//
//   scopereg::ScopedRegistry<Session, scopereg::FuncScope> by_thread(
//       make_session, scopereg::ThreadScope::func());
//
//   scopereg::ScopedRegistry<Cart, scopereg::FuncScopeOf<std::string>> carts(
//       make_cart, scopereg::FuncScopeOf<std::string>([] { return current_session_id(); }));
//   ...
//   scopereg::end_scope(std::string("session-42"));   // that session's values die now
//
// Contract:
// * Every call on the registry calls the function to learn the current token (once on a
//   hit, twice on a miss or a clear()): it must return the same token each time within
//   one scope.
// * A `ScopeToken` function says "no scope now" by returning a null token: get-or-create
//   then throws ScopeError, look-ups return null. Every value of another token type is a
//   scope.
// * Scope end: built-in strategies' `func()` tokens end with their scope (thread exit,
//   fiber end, last guard), in these registries too. Tokens the application makes end
//   with `scopereg::end_scope(token)` (every registry keyed by that type) or the
//   registry's `end_scope(token)`; until then their values stay (SQLAlchemy#8340).
//   A token reused after its end starts empty.
//
// Thread safety: the function is called concurrently from every thread using the
// registry; it must be safe for that. Cost: one indirect call, then for ScopeToken a
// per-thread cache probe (no lock) on a hit (128 entries, one per registry: up to 128
// registries used alternately on a thread keep their hits); for other token types a hash
// and one shard lock. A value's first creation for a token also records it in a sharded
// binding index, so that the token's end visits only the registries that hold a value for
// it. See benchmarks/scoped_registry_benchmark.cc and request_scope_benchmark.cc.
// Misuse: an empty function is rejected at construction with ScopeError. A function that
// throws makes every registry call throw it.

#ifndef SCOPEREG_FUNC_SCOPE_H_
#define SCOPEREG_FUNC_SCOPE_H_

#include <functional>
#include <utility>

#include "scopereg/scope.h"

namespace scopereg {

namespace internal {
[[noreturn]] void throw_empty_scope_func();
}  // namespace internal

template <typename K>
  requires HashableToken<K>
class FuncScopeOf {
 public:
  using Token = K;

  FuncScopeOf(ScopeFuncOf<K> func)  // NOLINT: implicit by design, a function is a strategy
      : func_(std::move(func)) {
    if (!func_) internal::throw_empty_scope_func();
  }

  K current() const { return func_(); }

 private:
  ScopeFuncOf<K> func_;
};

// The ScopeToken form, the default and the fast path.
using FuncScope = FuncScopeOf<ScopeToken>;

extern template class FuncScopeOf<ScopeToken>;

}  // namespace scopereg

#endif  // SCOPEREG_FUNC_SCOPE_H_
