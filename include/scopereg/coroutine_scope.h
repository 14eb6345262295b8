// scopereg/coroutine_scope.h
//
// Coroutine task scopes: a scope that follows a C++20 coroutine across co_await and
// threads. A task's scope -- its own scope, the ScopeGuards entered inside it, its
// copy/inherit bindings and the switch hooks of scope_switch.h -- is installed on whatever
// thread resumes the coroutine and removed when it suspends, so code in the coroutine,
// and every plain function it calls, sees the task's own values.
//
// ExplicitScope (and copy_context/wrap) keep their per-thread stack of active scopes; on a
// thread that interleaves coroutines, that stack is shared by all of them, so a guard held
// across co_await would be seen by whichever coroutine runs next (and left on the wrong
// thread after a migration: abort). A TaskScope gives each task a stack of its own.
//
// Two ways to use it:
//
// * Boost.Asio: scopereg/asio.h (target scopereg::asio) starts plain
//   boost::asio::awaitable<T> code in a task scope: scopereg::asio::co_spawn(...).
// * Your own coroutine type: derive its promise from scopereg::TaskScopePromise:
//
//     struct Task {
//       struct promise_type : scopereg::TaskScopePromise {
//         Task get_return_object() { ... }
//         void return_void() {}
//         void unhandled_exception() { error = std::current_exception(); }
//         // initial_suspend, final_suspend and await_transform come from the mixin. To
//         // choose your own awaiters, wrap them (the whole step):
//         //   auto initial_suspend() noexcept { return scoped_initial(std::suspend_never{}); }
//         //   auto final_suspend() noexcept { return scoped_final(MyFinalAwaiter{}); }
//         //   template <class A> auto await_transform(A&& a) {
//         //     return scoped_await(my_transform(std::forward<A>(a))); }
//       };
//       ...
//     };
//
//     scopereg::ScopedRegistry<Session, scopereg::CoroutineScope> session(open_session);
//
//     Task handle(Request r) {
//       session().begin();                 // this task's session
//       co_await pool.schedule();          // resumes on another thread
//       session().commit();                // still this task's session
//     }
//
// Contract:
// * A task's scope is fixed when the coroutine is created (the promise is constructed, on
//   the creating thread): by default a COPY of the creator's current explicit scope
//   (copy_context(): the task sees the creator's values, what it sets or creates stays in
//   the task -- asyncio tasks); or, by passing a start to TaskScopePromise's constructor,
//   scopereg::share_current (the creator's scopes themselves, as wrap()), fresh_scope (a
//   new, empty scope) or a CapturedScope (e.g. CapturedScope::of(request_id)).
// * While the coroutine runs, ExplicitScope's current scope is the task's innermost guard,
//   else the task's scope; CoroutineScope's current scope is the task's own scope
//   (guards inside the task do not change it). Outside any task, CoroutineScope has no
//   scope (get-or-create throws ScopeError naming the fix; find() returns null).
// * A ScopeGuard entered inside a task belongs to the task: it may be left after the
//   coroutine resumed on another thread; it leaves the right scope.
// * The task's scope ends when the coroutine frame is destroyed (it finished, or was
//   destroyed while suspended) and nothing else (a wrap(), a CapturedScope, a guard for
//   the same token) still holds it: its values are destroyed then, on the thread that
//   destroys the frame.
// * Child tasks created inside a task take a copy of the task's current scope (default),
//   so siblings never see each other's set()s and the parent's values stay as they were.
// * Hooks (scope_switch.h): resuming a task is a switch from the resumer's current
//   explicit scope to the task's; suspending it, the switch back. Hooks follow the
//   current explicit scope, as everywhere: a ScopeGuard entered inside the task makes the
//   task's own values (CoroutineScope's too) leave until the guard is left, as for nested
//   guards on a thread.
//
// Misuse, undetected, documented here:
// * An awaiter the mixin does not see (one your own await_transform does not pass
//   through scoped_await) suspends the coroutine with its scope still installed on the
//   thread: the thread keeps running the task's scope after the suspension. Pass every
//   awaiter through scoped_await.
// * co_yield suspends through yield_value(), not await_transform: the coroutine suspends
//   with its scope still installed, as above. A coroutine type with co_yield returns
//   scoped_await(its awaiter) from yield_value (for example
//   `return scoped_await(std::suspend_always{});`).
// * unhandled_exception() that rethrows leaves the coroutine without reaching
//   final_suspend: call task_scope().leave() before rethrowing.
// * Resuming a coroutine directly from inside another task is fine (the inner task's
//   scope is installed over the outer's and removed when it suspends).
//
// Detected misuse: leaving a task's scope on a thread where it is not the innermost
// installed context (a TaskScope::Installed destroyed out of order, or leave() without
// enter()) aborts with a message.
//
// Thread safety: a task runs on one thread at a time (as every coroutine does); its
// TaskScope may be installed on any thread, one resumption after the other.
// Cost: a resumption and a suspension copy three words each way and test one flag for
// hooks (benchmarks/coroutine_scope_benchmark.cc); a registry hit inside a task is an
// ExplicitScope hit (CoroutineScope: the same number of loads). A task's scope costs what a
// copy_context() or fresh scope costs: a record from the thread's cache.

#ifndef SCOPEREG_COROUTINE_SCOPE_H_
#define SCOPEREG_COROUTINE_SCOPE_H_

#include <coroutine>
#include <exception>
#include <type_traits>
#include <utility>

#include "scopereg/explicit_scope.h"
#include "scopereg/internal/context_state.h"
#include "scopereg/internal/scope_state.h"
#include "scopereg/internal/switch_hooks.h"
#include "scopereg/scope.h"

namespace scopereg {

// Starts for a task's scope (see TaskScope): a copy of the current scope (the default),
// or the current scopes themselves.
struct CopyCurrentTag {
  explicit CopyCurrentTag() = default;
};
inline constexpr CopyCurrentTag copy_current{};
struct ShareCurrentTag {
  explicit ShareCurrentTag() = default;
};
inline constexpr ShareCurrentTag share_current{};

// TaskScope
//
// The scope of one coroutine task, and what a runtime calls around the task's
// resumptions. Neither copyable nor movable (the running context points into it).
//
//   TaskScope(copy_current)   a new scope whose values start as the current scope's
//                             (copy_context()); the default
//   TaskScope(share_current)  the current scopes themselves (CapturedScope::current())
//   TaskScope(fresh_scope)    a new, empty scope no token names
//   TaskScope(captured)       the scopes a CapturedScope holds, e.g.
//                             CapturedScope::of(request_id) for a request id's scope
//
// For runtimes: enter() installs the task on the calling thread (saving what it replaces
// in the TaskScope) and leave() restores that; Installed does the same as an RAII object
// with the saved state on the stack, for adaptors that install around a handler (asio.h).
// Thread safety: one installation at a time per TaskScope for enter()/leave(); Installed
// objects of one TaskScope may overlap on different threads (an adaptor finishing a
// handler on one thread while the task resumes on another).
class TaskScope {
 public:
  explicit TaskScope(CopyCurrentTag = copy_current) : TaskScope(copy_context()) {}
  explicit TaskScope(ShareCurrentTag) : TaskScope(CapturedScope::current()) {}
  explicit TaskScope(FreshScopeTag) : TaskScope(CapturedScope::fresh()) {}
  explicit TaskScope(CapturedScope scope) noexcept : scope_(std::move(scope)) {
    head_.top.store(scope_.frames_.empty() ? nullptr : &scope_.frames_.back(),
                    std::memory_order_relaxed);
    head_.scope = scope_.frames_.empty() ? nullptr : scope_.frames_.back().state;
  }
  TaskScope(const TaskScope&) = delete;
  TaskScope& operator=(const TaskScope&) = delete;
  ~TaskScope() = default;  // releases the scope: its values end if nothing else holds it

  // The task's own scope's token (null when it was started from share_current with no
  // active scope).
  ScopeToken token() const {
    return head_.scope != nullptr ? head_.scope->token() : ScopeToken();
  }
  // The scopes the task started with (for wrap()ping work that must run in them).
  const CapturedScope& captured() const noexcept { return scope_; }
  // What the calling thread's internal context holds while this task is installed there
  // (for adaptors that must recognise the task without touching it).
  const void* installation() const noexcept { return &head_; }

  // Installs the task on the calling thread until leave(). The saved state lives in the
  // TaskScope, so enter() and leave() may be called from different functions (an
  // awaiter's await_resume and the next await_suspend).
  [[gnu::always_inline]] void enter() noexcept { resumer_ = install(this); }
  [[gnu::always_inline]] void leave() noexcept { uninstall(resumer_); }

  // Installs the task for the object's lifetime (stack-saved state).
  class Installed {
   public:
    explicit Installed(TaskScope& task) noexcept : task_(task), saved_(task.install(this)) {}
    Installed(const Installed&) = delete;
    Installed& operator=(const Installed&) = delete;
    ~Installed() { task_.uninstall(saved_); }

   private:
    TaskScope& task_;
    internal::ContextState saved_;
  };

 private:
  // `id` identifies this resumption to the creation protocol (distinct for overlapping
  // installations on different threads).
  [[gnu::always_inline]] internal::ContextState install(const void* id) noexcept {
    const internal::ContextState next{head_.top.load(std::memory_order_relaxed), id, &head_};
    const internal::ContextState prev = internal::enter_context(next);
    if (internal::switch_hooks_active()) [[unlikely]] {
      internal::notify_switch(internal::frame_state(prev.explicit_top),
                              internal::frame_state(next.explicit_top));
    }
    return prev;
  }
  [[gnu::always_inline]] void uninstall(const internal::ContextState& prev) noexcept {
    if (internal::this_context().task != &head_) [[unlikely]] misplaced_leave();
    if (internal::switch_hooks_active()) [[unlikely]] {
      internal::notify_switch(internal::frame_state(internal::this_context().explicit_top),
                              internal::frame_state(prev.explicit_top));
    }
    internal::this_context() = prev;
  }
  [[noreturn]] static void misplaced_leave() noexcept;

  CapturedScope scope_;
  internal::TaskHead head_;
  internal::ContextState resumer_;
};

// CoroutineScope
//
// The strategy: the current scope is the running coroutine task's own scope (see the
// contract above). ScopedRegistry<T, CoroutineScope> gives one T per task; values die
// with the task's scope. Thread safety: all members may be called from any thread.
class CoroutineScope {
 public:
  using Token = ScopeToken;
  static constexpr const char* kName = "CoroutineScope";

  // The running task's scope token, or a null token outside any task.
  static ScopeToken current() {
    internal::ScopeState* state = current_state();
    return state != nullptr ? state->token() : ScopeToken();
  }
  // Whether the calling code runs in a task with a scope.
  static bool active() { return current_state() != nullptr; }
  // A ScopeFunc returning current(), for ScopedRegistry<T, FuncScope>.
  static ScopeFunc func();

 private:
  friend struct internal::StrategyAccess;
  static internal::ScopeState* current_state() {
    internal::TaskHead* task = internal::this_context().task;
    return task != nullptr ? task->scope : nullptr;
  }
};

namespace internal {

// Whether `co_await` on an `A` calls an operator co_await (member or free) to get its
// awaiter; else the operand is its own awaiter.
template <typename A>
concept member_co_await = requires(A&& a) { std::forward<A>(a).operator co_await(); };
template <typename A>
concept free_co_await = requires(A&& a) { operator co_await(std::forward<A>(a)); };
template <typename A>
concept has_co_await = member_co_await<A> || free_co_await<A>;

// The awaiter `co_await` uses for an operand (operator co_await member or free, else the
// operand itself).
template <typename A>
decltype(auto) get_awaiter(A&& a) {
  if constexpr (member_co_await<A>) {
    return std::forward<A>(a).operator co_await();
  } else if constexpr (free_co_await<A>) {
    return operator co_await(std::forward<A>(a));
  } else {
    return std::forward<A>(a);
  }
}

// What a ResumeAwaiter stores, and for how long. Everything it stores lives exactly as long
// as the ResumeAwaiter: until the end of the co_await expression, across its suspension.
// * The mixin's await_transform(x) (x is the co_await operand itself, which lives until
//   the end of the co_await expression): nothing of x is stored. The awaiter
//   (get_awaiter(x)) is kept as a reference when it is one (x itself, or a reference from
//   operator co_await), also to an rvalue; a prvalue from operator co_await is held by
//   value, constructed in place.
// * scoped_await(x) in a user's await_transform (x is typically a temporary of that
//   await_transform, dead when it returns):
//   - x an lvalue: x is not stored (it must outlive the co_await: the caller's affair);
//     the awaiter, get_awaiter(x), is kept as a reference if it is an lvalue reference,
//     else held by value (a prvalue constructed in place, an rvalue reference moved in).
//   - x an rvalue awaiter (no operator co_await): x is moved into the ResumeAwaiter and
//     awaited there.
//   - x an rvalue awaitable (it has an operator co_await): x is moved into the
//     ResumeAwaiter (a std::remove_cvref_t<X> member, StoredOperand) and its awaiter is
//     made from that member, as `co_await` would make it from an rvalue:
//     get_awaiter(std::move(member)), held as for the mixin's operand (a prvalue in place,
//     a reference kept). The awaiter may refer to the stored awaitable (cppcoro's
//     when_all_ready does), so such a ResumeAwaiter is neither copyable nor movable: return
//     it from await_transform as a prvalue (`return scoped_await(...);`).
// Nothing is allocated: what is stored is a member of the ResumeAwaiter, which lives in
// the coroutine frame.
template <typename A>
using operand_awaiter_t =
    std::conditional_t<std::is_reference_v<A>, std::remove_reference_t<A>&, A>;
template <typename A>
using argument_awaiter_t =
    std::conditional_t<std::is_lvalue_reference_v<A>, A, std::remove_cvref_t<A>>;

// No operand stored (see above).
struct NoOperand {};
// The rvalue awaitable given to scoped_await, stored in its ResumeAwaiter. Neither copyable
// nor movable: the awaiter made from it may refer to it.
template <typename T>
struct StoredOperand {
  template <typename A>
  StoredOperand(std::in_place_t, A&& a) : value(std::forward<A>(a)) {}
  StoredOperand(StoredOperand&&) = delete;
  StoredOperand& operator=(StoredOperand&&) = delete;
  T value;
};

// The awaiter of every co_await in a task: the task leaves the thread before the inner
// awaiter's await_suspend (which may resume the coroutine elsewhere at once) and is
// installed again in await_resume, on whatever thread resumed it. `Held` is the inner
// awaiter's type as held: a reference or a value; `Operand` NoOperand or the StoredOperand
// the inner awaiter is made from (see above).
template <typename Held, typename Operand = NoOperand>
class ResumeAwaiter {
 public:
  // The inner awaiter from `make()`.
  template <typename Make>
  ResumeAwaiter(TaskScope& task, Make&& make) : task_(task), inner_(hold(make)) {}
  // Stores `operand`, then makes the inner awaiter from the stored one.
  template <typename A>
  ResumeAwaiter(TaskScope& task, std::in_place_t, A&& operand)
      : task_(task),
        operand_(std::in_place, std::forward<A>(operand)),
        inner_(hold([this]() -> decltype(auto) {
          return get_awaiter(std::move(operand_.value));
        })) {}

  bool await_ready() { return inner_.await_ready(); }

  template <typename P>
  decltype(auto) await_suspend(std::coroutine_handle<P> h) {
    left_ = true;
    task_.leave();
    if constexpr (noexcept(inner_.await_suspend(h))) {
      return inner_.await_suspend(h);
    } else {
      try {
        return inner_.await_suspend(h);
      } catch (...) {  // the coroutine resumes by the exception, without await_resume
        left_ = false;
        task_.enter();
        throw;
      }
    }
  }

  decltype(auto) await_resume() {
    if (left_) {
      left_ = false;
      task_.enter();
    }
    return inner_.await_resume();
  }

 private:
  // A prvalue awaiter is constructed in place (no move), an rvalue held by value is moved
  // in, a reference is kept as one.
  template <typename Make>
  static Held hold(Make&& make) {
    if constexpr (std::is_reference_v<Held>) {
      return as_lvalue(make());
    } else {
      static_assert(std::is_same_v<decltype(make()), Held> || std::is_move_constructible_v<Held>,
                    "scoped_await(x): an rvalue awaiter is moved into the task's awaiter, "
                    "so it must be movable; pass an lvalue that outlives the co_await instead");
      return make();
    }
  }
  template <typename T>
  static T& as_lvalue(T&& x) noexcept {
    return x;
  }

  TaskScope& task_;
  [[no_unique_address]] Operand operand_;  // before inner_: made first, destroyed last
  Held inner_;
  bool left_ = false;
};

// initial_suspend's awaiter: the task is first installed when the body starts.
template <typename A>
class InitialAwaiter {
 public:
  InitialAwaiter(TaskScope& task, A inner) : task_(task), inner_(std::move(inner)) {}
  bool await_ready() noexcept(noexcept(std::declval<A&>().await_ready())) {
    return inner_.await_ready();
  }
  template <typename P>
  decltype(auto) await_suspend(std::coroutine_handle<P> h) {
    return inner_.await_suspend(h);
  }
  decltype(auto) await_resume() {
    task_.enter();
    return inner_.await_resume();
  }

 private:
  TaskScope& task_;
  A inner_;
};

// final_suspend's awaiter: the task leaves before anything of the final awaiter runs
// (it may hand the thread to a continuation, or the frame may be destroyed).
template <typename A>
class FinalAwaiter {
 public:
  FinalAwaiter(TaskScope& task, A inner) noexcept : task_(task), inner_(std::move(inner)) {}
  bool await_ready() noexcept {
    task_.leave();
    return inner_.await_ready();
  }
  template <typename P>
  decltype(auto) await_suspend(std::coroutine_handle<P> h) noexcept {
    return inner_.await_suspend(h);
  }
  decltype(auto) await_resume() noexcept { return inner_.await_resume(); }

 private:
  TaskScope& task_;
  A inner_;
};

}  // namespace internal

// TaskScopePromise
//
// A base for a coroutine type's promise: gives every coroutine of that type a TaskScope
// and installs it around every resumption (see the contract at the top of this file).
// Default members: initial_suspend() (suspend_always: the task starts when first resumed),
// final_suspend() (suspend_always) and await_transform(a) (every co_await operand). A
// promise that defines any of these itself hides the mixin's: wrap its awaiters with
// scoped_initial / scoped_final / scoped_await instead (see the example at the top).
class TaskScopePromise {
 public:
  // The task's scope: a copy of the creator's current scope.
  TaskScopePromise() = default;
  // The task's scope from `start`: copy_current, share_current, fresh_scope or a
  // CapturedScope.
  template <typename Start>
  explicit TaskScopePromise(Start&& start) : task_(std::forward<Start>(start)) {}

  internal::InitialAwaiter<std::suspend_always> initial_suspend() noexcept {
    return scoped_initial(std::suspend_always{});
  }
  internal::FinalAwaiter<std::suspend_always> final_suspend() noexcept {
    return scoped_final(std::suspend_always{});
  }
  // Every co_await operand: kept where it is (it lives until the end of the co_await).
  template <typename A>
  auto await_transform(A&& a) {
    return resume_awaiter<internal::operand_awaiter_t>(std::forward<A>(a));
  }

  TaskScope& task_scope() noexcept { return task_; }

 protected:
  template <typename A>
  internal::InitialAwaiter<A> scoped_initial(A a) {
    return internal::InitialAwaiter<A>(task_, std::move(a));
  }
  template <typename A>
  internal::FinalAwaiter<A> scoped_final(A a) noexcept {
    return internal::FinalAwaiter<A>(task_, std::move(a));
  }
  // Wraps what a user's await_transform produced: an lvalue is kept by reference (it must
  // outlive the co_await); an rvalue is moved in (it must be movable) and lives until the
  // end of the co_await expression, with the awaiter made from it (see ResumeAwaiter).
  // Return the result as a prvalue: `return scoped_await(my_transform(...));`.
  template <typename A>
  auto scoped_await(A&& a) {
    using Operand = std::remove_cvref_t<A>;
    if constexpr (!std::is_lvalue_reference_v<A> && internal::has_co_await<Operand>) {
      static_assert(std::is_constructible_v<Operand, A&&>,
                    "scoped_await(x): an rvalue awaitable is moved into the task's awaiter "
                    "(its awaiter may refer to it), so it must be movable; pass an lvalue "
                    "that outlives the co_await instead");
      using Awaiter = decltype(internal::get_awaiter(std::declval<Operand>()));
      return internal::ResumeAwaiter<internal::operand_awaiter_t<Awaiter>,
                                     internal::StoredOperand<Operand>>(task_, std::in_place,
                                                                       std::forward<A>(a));
    } else {
      return resume_awaiter<internal::argument_awaiter_t>(std::forward<A>(a));
    }
  }

 private:
  // The ResumeAwaiter of `a`'s awaiter, held as `Hold` says (see operand_awaiter_t).
  template <template <typename> class Hold, typename A>
  auto resume_awaiter(A&& a) {
    using Awaiter = decltype(internal::get_awaiter(std::forward<A>(a)));
    return internal::ResumeAwaiter<Hold<Awaiter>>(
        task_, [&]() -> decltype(auto) { return internal::get_awaiter(std::forward<A>(a)); });
  }

  TaskScope task_;
};

}  // namespace scopereg

#endif  // SCOPEREG_COROUTINE_SCOPE_H_
