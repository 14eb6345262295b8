// scopereg/scope.h
//
// The scope-strategy contract.
//
// A *scope* is whatever unit of work must own its own value: a thread, a fiber, a request.
// A *strategy* tells a `ScopedRegistry` which scope the caller is in by returning a token:
//
//   struct MyScope {
//     using Token = std::string;             // copyable, ==, hashable with absl::Hash
//     Token current() const;                 // the calling context's token
//   };
//
// `ScopeStrategy` checks that shape, so a wrong strategy fails with one readable error.
// Strategies are small copyable types the registry is parameterised on (compile-time
// choice). For run-time choice, `FuncScope` wraps a `ScopeFunc`, a callable returning a
// `ScopeToken` (SQLAlchemy's `scopefunc`). Every built-in strategy (`ThreadScope`,
// `FiberScope`, `ExplicitScope`) works in both forms: as a type, and through its `func()`.
//
// Scope end. Values die with their scope. Built-in strategies end their scopes themselves
// (thread exit, fiber end, last guard gone). A registry keyed by a user token type has
// `end_scope(token)`; a strategy whose token is `ScopeToken` may instead call
// `scopereg::end_scope(token)` once, which reaches every `ScopeToken`-keyed registry.

#ifndef SCOPEREG_SCOPE_H_
#define SCOPEREG_SCOPE_H_

#include <compare>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <utility>

#include "absl/hash/hash.h"

namespace scopereg {

// The family a `ScopeToken` comes from. Tokens of different kinds never compare equal, so
// a user id 7 and thread serial 7 are different scopes.
enum class ScopeKind : std::uint32_t {
  kNone = 0,      // the null token: "no active scope"
  kUser = 1,      // minted by the application
  kThread = 2,    // ThreadScope
  kFiber = 3,     // FiberScope
  kExplicit = 4,  // ExplicitScope
  kBoostFiber = 5,
};

// ScopeToken
//
// A small, trivially copyable, hashable identity of a scope, returned by a `ScopeFunc`.
// Built-in strategies mint tokens from a process-wide 64-bit serial, so a token is never
// reused in the life of the process (unlike thread ids or addresses). Application tokens
// (`ScopeToken(id)`) are whatever the application makes them; reuse one only after
// `end_scope()` of its previous life.
// The default-constructed token is null: a `ScopeFunc` returns it to say "no scope now";
// a get-or-create then throws `ScopeError`, a look-up returns null.
class ScopeToken {
 public:
  constexpr ScopeToken() = default;
  constexpr explicit ScopeToken(std::uint64_t id, ScopeKind kind = ScopeKind::kUser)
      : id_(id), kind_(kind) {}

  constexpr std::uint64_t id() const { return id_; }
  constexpr ScopeKind kind() const { return kind_; }
  constexpr bool is_null() const { return kind_ == ScopeKind::kNone; }

  friend constexpr bool operator==(const ScopeToken&, const ScopeToken&) = default;
  friend constexpr auto operator<=>(const ScopeToken&, const ScopeToken&) = default;

  template <typename H>
  friend H AbslHashValue(H h, const ScopeToken& t) {
    return H::combine(std::move(h), t.id_, static_cast<std::uint32_t>(t.kind_));
  }

 private:
  std::uint64_t id_ = 0;
  ScopeKind kind_ = ScopeKind::kNone;
};

// A token type a registry can key by: copyable, equality-comparable, hashable with
// absl::Hash (give user types an `AbslHashValue` friend).
template <typename Token>
concept HashableToken =
    std::copy_constructible<Token> && std::equality_comparable<Token> &&
    requires(const Token& t) {
      { absl::Hash<Token>{}(t) } -> std::convertible_to<std::size_t>;
    };

// ScopeStrategy
//
// What `ScopedRegistry<T, Scope>` requires of `Scope`: a nested `Token` type that is a
// `HashableToken`, and a const `current()` returning the calling context's token.
// `current()` is called on every registry access, so it must be cheap and must not
// throw except to report that there is no scope (prefer a null/sentinel token then).
template <typename S>
concept ScopeStrategy = std::copy_constructible<S> && requires(const S& s) {
  typename S::Token;
  { s.current() } -> std::convertible_to<typename S::Token>;
} && HashableToken<typename S::Token>;

// ScopeFunc
//
// A run-time scope function: returns the calling context's token, or a null token when
// there is none. Called on every registry access: keep it cheap and non-throwing.
using ScopeFunc = std::function<ScopeToken()>;

// FuncScope
//
// The type-erased strategy: a `ScopedRegistry<T, FuncScope>` keys its values by whatever
// the `ScopeFunc` given at construction returns. Built-in strategies supply one each
// (`ThreadScope::func()`, ...) and end their scopes in these registries too; for
// application tokens call `scopereg::end_scope(token)` (all registries) or the registry's
// `end_scope(token)` when a scope is over, or its values stay (SQLAlchemy#8340).
// Cost: one indirect call plus a per-thread cache probe on a hit.
// Misuse: an empty ScopeFunc is rejected at construction with ScopeError.
class FuncScope {
 public:
  using Token = ScopeToken;

  FuncScope(ScopeFunc func);  // NOLINT: implicit by design, a ScopeFunc is a strategy
  ScopeToken current() const { return func_(); }

 private:
  ScopeFunc func_;
};

// end_scope
//
// Ends the scope `token` in every `ScopeToken`-keyed registry (FuncScope, or user strategies
// whose Token is ScopeToken): their values for it are destroyed, on the calling thread, now.
// Thread safety: any thread. Must not race with code still running in that scope (a value
// destroyed here may not be in use). Ending a scope with no values is a no-op.
// Cost: one hash probe per ScopeToken-keyed registry alive.
void end_scope(ScopeToken token);

}  // namespace scopereg

#endif  // SCOPEREG_SCOPE_H_
