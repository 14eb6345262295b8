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
// `ScopeToken` (SQLAlchemy's `scopefunc`), and `FuncScopeOf<K>` one returning any
// hashable K (func_scope.h). Every built-in strategy (`ThreadScope`, `FiberScope`,
// `ExplicitScope`) works in both forms: as a type, and through its `func()`.
// A new strategy needs no edit to scopereg: docs/adding-a-strategy.md.
//
// Scope end. Values die with their scope. Built-in strategies end their scopes themselves
// (thread exit, fiber end, last guard gone). For tokens the application mints, call
// `scopereg::end_scope(token)` once (every registry keyed by that token type), or a
// registry's own `end_scope(token)`; otherwise their values stay (SQLAlchemy#8340).

#ifndef SCOPEREG_SCOPE_H_
#define SCOPEREG_SCOPE_H_

#include <compare>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <utility>

#include "absl/hash/hash.h"
#include "scopereg/internal/registry_record.h"
#include "scopereg/internal/token_ref.h"

namespace scopereg {

// The family a `ScopeToken` comes from. Tokens of different kinds never compare equal, so
// a user id 7 and thread serial 7 are different scopes.
enum class ScopeKind : std::uint32_t {
  kNone = 0,      // the null token: "no active scope"
  kUser = 1,      // minted by the application
  kThread = 2,    // ThreadScope
  kFiber = 3,     // FiberScope
  kExplicit = 4,  // ExplicitScope
  kBoostFiber = 5,  // BoostFiberScope
  // Values 6-63 are reserved for scopereg; new_scope_kind() hands out 64 and above.
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

// A run-time scope function returning any token type (for FuncScopeOf<K>).
template <typename K>
using ScopeFuncOf = std::function<K()>;

// end_scope
//
// Ends the scope `token` in every registry keyed by `token`'s type (FuncScope,
// FuncScopeOf<K>, user strategies): their values for it are destroyed, on the calling
// thread, now, in rounds as any scope's end (a destructor that makes another value for
// `token` has it destroyed in the next round; up to 8 rounds). Built-in strategies end
// their scopes themselves (and reach these registries too); call this for tokens your
// application mints.
// Thread safety: any thread. Must not race with code still running in that scope (a value
// destroyed here may not be in use). Ending a scope with no values is a no-op; a null
// ScopeToken is ignored. It reaches token-keyed registries only: values of a thread, fiber
// or explicit scope in registries of those strategies (slot-based) end with that scope
// itself, never through end_scope(). A value still being created for `token` when it is
// ended is stored afterwards and lives until the registry's end_scope or destruction.
// Cost: one look-up in a sharded index of which token-keyed registries hold a value for
// `token` (no lock when none does), then one hash probe per registry that does.
// Out of memory: every value is still ended (a pass that cannot list one more value ends
// those it took, and the next goes on); std::bad_alloc is not thrown for it.
void end_scope(ScopeToken token);

template <typename K>
  requires HashableToken<K>
void end_scope(const K& token) {
  internal::end_scope_everywhere(internal::TokenRef::of(token));
}

// new_scope_kind
//
// A ScopeKind no other call returns and no built-in strategy uses: for a user-written
// strategy or runtime that mints its own ScopeTokens (with new_scope_token) and wants them
// apart from every other family. No edit to scopereg's enum is needed.
ScopeKind new_scope_kind() noexcept;

// new_scope_token
//
// A token of `kind` never returned before in this process (a process-wide 64-bit serial,
// shared by every kind: built-in scopes take theirs from it too).
ScopeToken new_scope_token(ScopeKind kind) noexcept;

}  // namespace scopereg

// FuncScope (the run-time strategy) lives in its own header; included here because it was
// declared here first.
#include "scopereg/func_scope.h"  // IWYU pragma: export

#endif  // SCOPEREG_SCOPE_H_
