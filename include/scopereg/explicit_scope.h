// scopereg/explicit_scope.h
//
// ExplicitScope: scopes the application names with a token of its choice — a request id,
// a string, any hashable value — for event loops and request-driven servers, where no
// thread or fiber matches the unit of work (Flask's app context, asyncio's task).
//
//   scopereg::ScopedRegistry<Session, scopereg::ExplicitScope> session(make_session);
//
//   void on_request(const Request& r) {
//     scopereg::ScopeGuard scope(r.id());          // enter the request's scope
//     session().begin();
//     db_pool.post(scopereg::wrap([] {             // runs later, on another thread,
//       session().query(...);                      // in the same request scope
//     }));
//   }                                              // values die with the last guard/wrap
//
// Contract:
// * Entering: a `ScopeGuard` (neither copyable nor movable) enters the scope of its token
//   on the calling thread (or fiber, when scopereg's fibers are in use) and leaves it in
//   its destructor. Guards nest; the innermost active guard is the current scope.
//   Leaving an inner scope restores the outer one and never touches the outer scope's
//   values (the collapse of pallets-eco/flask-sqlalchemy#944 cannot happen: scopes are
//   distinct objects, not a stack of names).
// * Leaving out of order (guards on the heap) is handled: the departed guard's frame is
//   unlinked wherever it is; the current scope is always the innermost guard still active.
// * No active scope: a registry's get-or-create throws ScopeError naming the fix; find()
//   returns null; has() is false; clear() does nothing.
// * Lifetime: a token's scope lives while a guard for it is active (on any thread) or a
//   wrapped callable that captured it exists. When the last one goes, the scope ends: its
//   values in every registry are destroyed on that thread. A token entered again after
//   its scope ended starts empty (a reused request id never sees a finished request's
//   values). With `ScopeLifetime::kUntilEnded` the scope is kept after the last guard
//   until `ExplicitScope::end(token)`.
// * Sharing: the same token active on several threads at once is one scope: registries
//   create one value for it (once; concurrent first callers wait) and every thread gets
//   that value, so T must be safe for the concurrent use the application makes of it.
//
// Misuse: destroying a ScopeGuard on another thread or fiber than the one that created
// it aborts with a message (it would corrupt that thread's scope stack); use wrap() to
// carry a scope elsewhere.
//
// Coroutines: the active-scope stack belongs to the thread (or fiber), not to a C++20
// coroutine. Coroutines interleaved on one thread share it, so a ScopeGuard held across
// co_await is seen by whichever coroutine the thread runs next (wrong values, silently),
// and leaving it after the coroutine resumed on another thread aborts (see above). Run
// coroutines in task scopes instead (coroutine_scope.h; scopereg/asio.h for Boost.Asio):
// each task then has a stack of its own, installed wherever it resumes.
//
// Cost: entering/leaving a guard is a hash and one look-up under the lock of one shard of a
// process-wide token table; a shard is one cache line (2048 of them, 128 KiB made on first
// use), so threads entering unrelated tokens rarely touch the same line (see
// benchmarks/explicit_scope_benchmark.cc); a registry hit is three loads (five past the
// scope's first registry) after one constant-initialised thread_local load, no lock. A whole request scope's life (a fresh
// token, one value, the guard left) takes no process-wide lock: the scope's record comes
// from a per-thread cache of ended records (its token key stored inline when it fits in
// 64 bytes), its first value sits inline in the record (no slot array), and its end takes
// only its own thread's domain lock (benchmarks/request_scope_benchmark.cc).

#ifndef SCOPEREG_EXPLICIT_SCOPE_H_
#define SCOPEREG_EXPLICIT_SCOPE_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/hash/hash.h"
#include "scopereg/internal/context_state.h"
#include "scopereg/internal/scope_state.h"
#include "scopereg/internal/switch_hooks.h"
#include "scopereg/internal/token_ref.h"
#include "scopereg/scope.h"
#include "scopereg/scope_switch.h"

namespace scopereg {

enum class ScopeLifetime {
  kEndWithLastGuard,  // default: values die when the last guard / wrapped callable goes
  kUntilEnded,        // kept after the last guard until ExplicitScope::end(token)
};

namespace internal {

// A type-erased application token, owned by its scope record.
class TokenKey {
 public:
  TokenKey(const void* type, std::size_t hash) : type_(type), hash_(hash) {}
  virtual ~TokenKey() = default;
  const void* type() const { return type_; }
  std::size_t hash() const { return hash_; }
  // `value` points at an object of this key's type.
  virtual bool equals(const void* value) const = 0;

 private:
  const void* type_;
  std::size_t hash_;
};

template <typename K>
class TypedTokenKey final : public TokenKey {
 public:
  TypedTokenKey(const K& value, std::size_t hash)
      : TokenKey(&kTokenTypeTag<K>, hash), value_(value) {}
  bool equals(const void* value) const override {
    return *static_cast<const K*>(value) == value_;
  }

 private:
  K value_;
};

// How to find (and, on a miss, make) the key of a token without allocating on a hit.
// make() builds the key in `buffer` when it fits (the record's inline storage), else on
// the heap; the record tells which by the address.
struct TokenProbe {
  const void* type;
  std::size_t hash;
  const void* value;
  TokenKey* (*make)(void* buffer, std::size_t size, const void* value, std::size_t hash);
};

template <typename K>
TokenProbe probe_for(const K& token) {
  return TokenProbe{
      &kTokenTypeTag<K>, absl::Hash<K>{}(token), &token,
      [](void* buffer, std::size_t size, const void* v, std::size_t h) -> TokenKey* {
        using Key = TypedTokenKey<K>;
        const K& value = *static_cast<const K*>(v);
        if constexpr (alignof(Key) <= 16) {
          if (sizeof(Key) <= size) return new (buffer) Key(value, h);
        }
        return new Key(value, h);
      }};
}

class ScopeRecord;

// One entry of a context's active-scope stack.
struct ExplicitFrame {
  ScopeState* state;
  ScopeRecord* record;
  ExplicitFrame* prev;
};

// The scope of `frame`, or null for no frame (no active scope).
inline ScopeState* frame_state(const ExplicitFrame* frame) noexcept {
  return frame != nullptr ? frame->state : nullptr;
}

// The calling context's innermost frame is t_context.explicit_top (context_state.h):
// per thread, and per fiber since runtimes save and restore it on every switch.

ScopeRecord* acquire_record(const TokenProbe& probe, ScopeLifetime lifetime);
// A record for a scope no token names (copy_context), with one reference.
ScopeRecord* new_private_record();
void add_ref(ScopeRecord* record) noexcept;
void release_record(ScopeRecord* record) noexcept;
ScopeState* state_of(ScopeRecord* record) noexcept;
void end_token(const TokenProbe& probe);
void push_frame(ExplicitFrame* frame) noexcept;
// `owner`: the context that entered the guard; `task`: the coroutine task it was entered
// in (coroutine_scope.h), which owns it instead, whichever thread runs the task.
void pop_frame(ExplicitFrame* frame, const void* owner, TaskHead* task) noexcept;

}  // namespace internal

// ExplicitScope
//
// The strategy: the current scope is the innermost active ScopeGuard (or wrapped
// callable) of the calling thread or fiber. Thread safety: all members may be called
// from any thread.
class ExplicitScope {
 public:
  using Token = ScopeToken;
  static constexpr const char* kName = "ExplicitScope";

  // The current scope's token (kind kExplicit; each scope life gets a fresh one, so a
  // token entered again after its end is a different ScopeToken), or a null token.
  static ScopeToken current() {
    internal::ScopeState* state = current_state();
    return state != nullptr ? state->token() : ScopeToken();
  }

  // Whether the calling context has an active scope.
  static bool active() { return internal::this_context().explicit_top != nullptr; }

  // A ScopeFunc returning current(): for ScopedRegistry<T, FuncScope>. Values there end
  // with the scope too.
  static ScopeFunc func();

  // Ends `token`'s scope: it is removed at once (a new guard for the same token starts a
  // new, empty scope) and its values are destroyed when the guards and wrapped callables
  // still holding it are gone (now, if none). A no-op for a token with no scope.
  // Thread safety: any thread.
  template <typename K>
  static void end(const K& token) {
    internal::end_token(internal::probe_for(token));
  }

 private:
  friend struct internal::StrategyAccess;
  static internal::ScopeState* current_state() {
    return internal::frame_state(internal::this_context().explicit_top);
  }
};

// TypedToken
//
// A token whose type says what it identifies, so that scopes cannot be confused by the
// integer type a call site happens to use. Tokens of different types never match:
// ScopeGuard(7) (an int) and ScopeGuard(7L) (a long) enter two different scopes. With
//
//   using RequestId = scopereg::TypedToken<struct RequestIdTag>;
//   scopereg::ScopeGuard request(RequestId{id});   // id of any integer type
//
// every call site names the same scope for the same id.
template <typename Tag, typename Rep = std::uint64_t>
struct TypedToken {
  Rep value;
  friend bool operator==(const TypedToken&, const TypedToken&) = default;
  template <typename H>
  friend H AbslHashValue(H h, const TypedToken& t) {
    return H::combine(std::move(h), t.value);
  }
};

// inherit
//
// Tag for ScopeGuard(token, scopereg::inherit): the guard's scope starts with the current
// scope's values (see ScopeGuard).
struct InheritTag {
  explicit InheritTag() = default;
};
inline constexpr InheritTag inherit{};

// fresh_scope
//
// Tag for ScopeGuard(scopereg::fresh_scope): a new scope that no token names (folly's
// RequestContextScopeGuard with a new context). Other threads reach it only through
// wrap() / CapturedScope, never by a token. Use it for request scopes that are carried to
// callbacks rather than looked up by id: it needs no entry in the process-wide token
// table, so starting and ending one writes only memory of the calling thread's own
// (benchmarks/request_scope_benchmark.cc, BM_ScopeLife_FreshScope).
struct FreshScopeTag {
  explicit FreshScopeTag() = default;
};
inline constexpr FreshScopeTag fresh_scope{};

// ScopeGuard
//
// Enters the scope of `token` for the guard's lifetime. `K` is any copyable,
// equality-comparable type hashable with absl::Hash (an integer, a std::string, a user
// type with AbslHashValue). Tokens of different types never match (int 7 != long 7): use
// one type per kind of token, ideally a TypedToken.
// Thread safety: a guard must be destroyed on the thread (or fiber) that created it; one
// entered in a coroutine task (coroutine_scope.h) belongs to the task instead, and may be
// destroyed wherever the task runs, or with the task's frame while it is suspended.
// Cost: one hash, one look-up under a shard's lock; no allocation when the token's scope is
// already live, or when this thread has an ended record to reuse (the common case for a
// thread that starts and ends request scopes).
class ScopeGuard {
 public:
  template <typename K>
    requires(!std::is_same_v<std::remove_cvref_t<K>, ScopeGuard>) && HashableToken<K>
  explicit ScopeGuard(const K& token,
                      ScopeLifetime lifetime = ScopeLifetime::kEndWithLastGuard)
      : ScopeGuard(internal::acquire_record(internal::probe_for(token), lifetime)) {}

  // An inheriting child scope (folly's ShallowCopyRequestContextScopeGuard): enters
  // `token`'s scope after binding in it every value of the current scope (the innermost
  // active guard or captured scope) for each registry where `token`'s scope has none yet.
  // Values are shared, not copied: set()/clear()/first creation in the child bind only in
  // the child; the outer scope's values stay exactly as they were, and the outer scope is
  // current again, untouched, when the guard is left. Registries keyed by the explicit
  // scope take part: ScopedRegistry<T, ExplicitScope> and token-keyed registries over
  // ExplicitScope::func(). With no current scope it is a plain ScopeGuard. When `token`'s
  // scope is already live (another guard holds it), its own values win.
  // Cost: as a plain guard plus one binding per inherited value (no value is copied).
  template <typename K>
    requires HashableToken<K>
  ScopeGuard(const K& token, InheritTag,
             ScopeLifetime lifetime = ScopeLifetime::kEndWithLastGuard)
      : ScopeGuard(internal::acquire_record(internal::probe_for(token), lifetime),
                   /*inherit=*/true) {}

  // A new scope no token names (see fresh_scope). Its values end with the guard and the
  // last wrapped callable or CapturedScope holding it.
  // Cost: no hash, no shared lock: a record from the calling thread's cache.
  explicit ScopeGuard(FreshScopeTag) : ScopeGuard(internal::new_private_record()) {}

  ScopeGuard(const ScopeGuard&) = delete;
  ScopeGuard& operator=(const ScopeGuard&) = delete;
  ~ScopeGuard();

  // This scope's ScopeToken (the one registries see while it is current).
  ScopeToken token() const { return frame_.state->token(); }

 private:
  explicit ScopeGuard(internal::ScopeRecord* record, bool inherit = false);
  internal::ExplicitFrame frame_;
  const void* owner_;
  internal::TaskHead* task_;
};

template <typename F>
class Wrapped;

// CapturedScope
//
// Scopes held to be made current later, on any thread or fiber. Two ways to get one:
//
// * CapturedScope::current() -- SHARE: the calling context's whole active-scope stack,
//   the same scopes (tornado's stack_context.wrap, folly's RequestContextScopeGuard on a
//   saved shared_ptr). Code run in it sees, and changes, the caller's own values: a set()
//   or clear() there is seen by the caller and by every other callable of that scope.
//   This is what a request's database session needs (every callback, one transaction).
//   scopereg::wrap(f) captures this way.
// * scopereg::copy_context() -- COPY: a new scope whose values start as the caller's
//   current scope's values (Python's contextvars.copy_context(); an asyncio task's
//   context; folly's ShallowCopyRequestContextScopeGuard). Values are shared, not copied
//   (T need not be copyable): the same objects, until one side replaces its binding. A
//   set(), clear() or first creation inside the copy binds only in the copy, and persists
//   there for the copy's next run(); later set()/clear() in the caller are not seen by
//   the copy (contextvars' test_context_copy_1, test_context_run_*). A value lives while
//   any scope binds it and is destroyed exactly once, when the last binding goes.
//
// `run(f)` runs f with the held scopes as the current ones and restores the caller's own
// stack afterwards, also when f throws (contextvars.Context.run). Inside a coroutine task
// (coroutine_scope.h) the task stays current for CoroutineScope; only ExplicitScope's
// stack is replaced. `wrap(f)` returns a
// callable that does that on every call and keeps the scopes alive (copy_context().wrap(f)
// is the asyncio-task form). Copyable: copies of a CapturedScope hold the same scopes
// (copy a context twice with copy_context() to get two independent ones). Capturing with
// no active scope is allowed: run(f) then runs f with no scope.
// Thread safety: a CapturedScope may be run concurrently from several threads (they then
// share its scopes, as with any scope entered on several threads).
class CapturedScope {
 public:
  CapturedScope() = default;  // no scope
  CapturedScope(const CapturedScope& other);
  CapturedScope& operator=(const CapturedScope& other);
  CapturedScope(CapturedScope&& other) noexcept;
  CapturedScope& operator=(CapturedScope&& other) noexcept;
  ~CapturedScope();

  static CapturedScope current();

  // The scope of `token` alone (entered as by ScopeGuard(token, lifetime), held by this
  // CapturedScope rather than a guard): run(f) runs f in it, wherever.
  template <typename K>
    requires HashableToken<K>
  static CapturedScope of(const K& token,
                          ScopeLifetime lifetime = ScopeLifetime::kEndWithLastGuard) {
    return adopt(internal::acquire_record(internal::probe_for(token), lifetime));
  }

  // A new scope no token names (as ScopeGuard(fresh_scope)), held by this CapturedScope.
  static CapturedScope fresh() { return adopt(internal::new_private_record()); }

  template <typename F, typename... Args>
  decltype(auto) run(F&& f, Args&&... args) const {
    Installed installed(*this);
    return std::invoke(std::forward<F>(f), std::forward<Args>(args)...);
  }

  // A callable that runs `f` in these scopes (as run()) on every call, forwarding its
  // arguments and result, and keeps them alive while it (or a copy) exists. It is a
  // Wrapped<F> (below): Boost.Asio sees f's associated executor and allocator through it
  // when scopereg/asio.h is included.
  template <typename F>
  Wrapped<F> wrap(F f) const;

 private:
  friend CapturedScope copy_context();
  friend class TaskScope;
  // Holds `record`, taking over the one reference the caller has on it.
  static CapturedScope adopt(internal::ScopeRecord* record) noexcept;
  // Makes the captured frames the calling context's stack; restores the caller's on exit.
  class Installed {
   public:
    // In a coroutine task (coroutine_scope.h) the task stays current (CoroutineScope sees
    // it); only its explicit stack is replaced for the call, and put back afterwards.
    explicit Installed(const CapturedScope& scope) noexcept
        : saved_(internal::this_context().explicit_top) {
      internal::this_context().explicit_top =
          scope.frames_.empty() ? nullptr
                                : const_cast<internal::ExplicitFrame*>(&scope.frames_.back());
      if (internal::switch_hooks_active()) [[unlikely]] {
        internal::notify_switch(internal::frame_state(saved_),
                                internal::frame_state(internal::this_context().explicit_top));
      }
    }
    Installed(const Installed&) = delete;
    Installed& operator=(const Installed&) = delete;
    ~Installed() {
      if (internal::switch_hooks_active()) [[unlikely]] {
        internal::notify_switch(internal::frame_state(internal::this_context().explicit_top),
                                internal::frame_state(saved_));
      }
      internal::this_context().explicit_top = saved_;
      internal::publish_task_top();  // guards entered inside wrote the task's top
    }

   private:
    internal::ExplicitFrame* saved_;
  };
  void link() noexcept;
  void release() noexcept;
  // Bottom to top, each holding one reference to its scope. Never modified after capture
  // (a guard left inside run() only ever unlinks its own frame), so concurrent runs share
  // them read-only.
  // Inline for up to two scopes (no allocation for a typical capture); a move relinks.
  absl::InlinedVector<internal::ExplicitFrame, 2> frames_;
};

// Wrapped
//
// What wrap() returns: `f` plus the scopes it runs in. Calling it runs f in them (as
// CapturedScope::run), forwarding arguments and result. Copyable when F is; a copy holds
// the same scopes. `wrapped()` gives f itself, so that adaptors can see through: with
// scopereg/asio.h included, Boost.Asio's associated executor, allocator (and cancellation
// slot, where Boost has one) of a Wrapped<F> are those of F, so a wrapped strand-bound
// handler still runs on its strand.
template <typename F>
class Wrapped {
 public:
  Wrapped(CapturedScope scope, F f) : scope_(std::move(scope)), f_(std::move(f)) {}

  template <typename... Args>
  decltype(auto) operator()(Args&&... args) {
    return scope_.run(f_, std::forward<Args>(args)...);
  }
  template <typename... Args>
  decltype(auto) operator()(Args&&... args) const {
    return scope_.run(f_, std::forward<Args>(args)...);
  }

  const F& wrapped() const noexcept { return f_; }
  const CapturedScope& scope() const noexcept { return scope_; }

 private:
  CapturedScope scope_;
  F f_;
};

template <typename F>
Wrapped<F> CapturedScope::wrap(F f) const {
  return Wrapped<F>(*this, std::move(f));
}

// wrap
//
// Returns a callable that runs `f` in the scope current now (CapturedScope::current()),
// wherever and whenever it is called, forwarding its arguments and result. The scopes
// stay alive while the returned callable (or a copy) exists.
template <typename F>
auto wrap(F f) {
  return CapturedScope::current().wrap(std::move(f));
}

// copy_context
//
// A CapturedScope holding a new scope whose values start as the current scope's (the
// innermost active guard or captured scope of the calling context): see CapturedScope's
// COPY. The new scope has no application token (ExplicitScope::current() inside it is a
// fresh ScopeToken); it ends when the last CapturedScope or wrapped callable holding it
// goes. With no active scope it holds a new, empty scope (as Python's base context is
// empty): values created inside its run() live in it.
// Cost: one scope record (recycled per thread) plus one binding per value of the current
// scope; token-keyed registries over ExplicitScope::func() add a look-up in the binding
// index, and one process-wide lock only when one of them holds a value for this scope.
CapturedScope copy_context();

// ScopedExecutor
//
// Adapts any executor to run every task in the scope that was current when the task was
// submitted: `post(task)` forwards `wrap(task)` to the underlying posting function.
//
//   scopereg::ScopedExecutor exec([&pool](std::function<void()> t) { pool.post(std::move(t)); });
//   exec.post([] { session().query(...); });   // in the submitter's scope
//
// Thread safety: as the underlying posting function.
template <typename Post>
class ScopedExecutor {
 public:
  explicit ScopedExecutor(Post post) : post_(std::move(post)) {}

  template <typename F>
  void post(F&& task) {
    post_(wrap(std::forward<F>(task)));
  }

 private:
  Post post_;
};

}  // namespace scopereg

#endif  // SCOPEREG_EXPLICIT_SCOPE_H_
