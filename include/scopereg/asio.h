// scopereg/asio.h  (target scopereg::asio; header-only over Boost.Asio's headers)
//
// Boost.Asio adaptor: plain `boost::asio::awaitable<T>` code, unchanged, runs each spawned
// task in a scope of its own, on any executor (an io_context run by several threads, a
// thread_pool), across thread migrations.
//
//   scopereg::ScopedRegistry<Session, scopereg::CoroutineScope> session(open_session);
//
//   boost::asio::awaitable<void> handle(Request r) {
//     session().begin();                                  // this task's session
//     co_await timer.async_wait(boost::asio::use_awaitable);
//     session().commit();                                 // still this task's session,
//   }                                                     // on whichever thread resumed it
//
//   scopereg::asio::co_spawn(pool.get_executor(), handle(r), boost::asio::detached);
//
// Contract:
// * scopereg::asio::co_spawn(ex, awaitable, [start,] [teardown,] token) is
//   boost::asio::co_spawn on TaskExecutor(ex, task): `task` is a new TaskScope
//   (coroutine_scope.h) started from `start` -- scopereg::fresh_scope (the default: a new,
//   empty scope), scopereg::copy_current (a copy of the caller's current scope, as an
//   asyncio task), scopereg::share_current, or a CapturedScope such as
//   scopereg::CapturedScope::of(request_id) (that token's scope).
// * TaskExecutor<E>(inner, start) is a new task on `inner` (co_spawn makes one); task()
//   is its TaskScope. TaskExecutor installs the task on the thread around every function it executes:
//   every resumption of the coroutine (Asio resumes awaitables through their executor)
//   and every handler that runs on it. Inside, CoroutineScope's current scope is the task's
//   scope, ExplicitScope's the task's innermost ScopeGuard else the task's scope; guards
//   may be held across co_await (they belong to the task, wherever it resumes).
// * require() and prefer() return a TaskExecutor of the inner executor's result, so the
//   task is never lost by Asio's own rewrapping (as boost::asio::strand does); query()
//   forwards. It converts to boost::asio::any_io_executor.
// * `teardown(std::exception_ptr)` (optional) runs in the task's scope after the coroutine
//   finished, before the completion handler: with null on success, with the exception
//   otherwise (e.g. teardown_of(session_cache): commit on success, roll back on an
//   exception, then clear the used sessions -- SessionCache::TeardownGuard). If it throws
//   on success, that exception is the task's; if it throws after the coroutine threw, the
//   task fails with TaskTeardownError carrying both.
// * Overlap: Asio runs the rest of a resuming function (for instance the initiation of
//   the operation the coroutine now awaits) after the coroutine suspended, still inside
//   TaskExecutor's installation; if that operation completes on another thread at once,
//   the task resumes there while the first thread is still finishing. For that moment the
//   task's scope is current on both threads, as a scope entered on two threads. Switch
//   hooks (scope_switch.h) pair exactly on each thread, but a value may see the second
//   thread's on_scope_enter before the first thread's on_scope_leave: keep per-thread
//   state in hooks (what they are for), not one "current" flag per value.
// * The completion handler is called as by boost::asio::co_spawn; unless it has an
//   associated executor of its own, it runs on the TaskExecutor, in the task's scope.
// * The task's scope ends, and its values are destroyed, when the last copy of its
//   TaskExecutor goes: normally when the completion handler has run; when the io_context
//   is stopped and destroyed with the task suspended, when its pending handlers are
//   destroyed. A TaskExecutor copy stored elsewhere keeps the scope alive (not Asio's
//   outstanding work: io_context::run() returns as it would without scopereg).
// * Child tasks: co_await boost::asio::this_coro::executor inside a task is the task's
//   TaskExecutor. scopereg::asio::co_spawn(that executor, child(), scopereg::copy_current,
//   ...) starts the child with a copy of the parent's current scope (recommended), or
//   fresh_scope for a new one. A child started with plain boost::asio::co_spawn on that
//   executor runs IN THE PARENT'S TASK: it sees and changes the parent's values (wrap()
//   semantics).
// * this_scope(): `co_await scopereg::asio::this_scope()` is the task's token (the same
//   as scopereg::CoroutineScope::current(), callable from any function).
// * wrap(): including this header makes a scopereg::Wrapped<F> (what scopereg::wrap and
//   CapturedScope::wrap return) have F's associated executor and allocator (and
//   cancellation slot, on Boost versions that have them): a wrapped strand-bound handler
//   still runs on its strand. Include it wherever wrapped handlers are given to Asio.
//
// Limits (each has a test in tests/asio_test.cc):
// * Coroutines typed to a concrete executor (awaitable<T, io_context::executor_type>)
//   cannot be spawned on a TaskExecutor (it does not convert): co_spawn rejects them at
//   compile time. Use boost::asio::awaitable<T> (any_io_executor), or
//   awaitable<T, scopereg::asio::TaskExecutor<E>>.
// * A handler invoked without its associated executor (an asynchronous operation that
//   calls the completion handler directly from its own thread instead of dispatching it)
//   resumes the coroutine without its task installed: CoroutineScope has no scope there
//   (get-or-create throws ScopeError) and ExplicitScope sees the calling thread's scopes.
//   Complete operations through boost::asio::dispatch/post on the handler's associated
//   executor (as Asio's own operations and async_compose do).
//
// Misuse, undetected:
// * A child started with plain boost::asio::co_spawn on the task's executor shares the
//   parent's task: neither may hold a ScopeGuard across co_await while the other runs
//   (each would see the other's guard). Start children with scopereg::asio::co_spawn.
// * A TaskExecutor must not be used after its io_context is destroyed (as any executor).
//
// Thread safety: TaskExecutor is a value type like the executor it wraps; copies may be
// used concurrently (a moved-from TaskExecutor may only be destroyed or assigned to).
// Cost: a copy of a TaskExecutor is one atomic increment (one decrement at its end): a
// reference to the task, or for a work-tracking copy a count on the task's one tracked
// copy of that executor; each executed function also counts a reference while queued, and
// installs and removes the task (three words each way). Over io_context's and
// thread_pool's executors, tracked or not, a TaskExecutor is one pointer (the task keeps
// the executor), which fits any_io_executor without an allocation; over other executors
// (a strand) it holds the executor by value, and any_io_executor allocates to hold it.
// Asio copies and rewraps executors several times per co_await: a `co_await post` round
// trip costs about twice the plain one (benchmarks/coroutine_scope_benchmark.cc, beside a
// folly-style shared_ptr-carrying executor; benchmarks/results/summary.md).

#ifndef SCOPEREG_ASIO_H_
#define SCOPEREG_ASIO_H_

#include <utility>  // before Asio: Asio 1.18 (Boost 1.74) needs it with g++ 12

#include <atomic>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "boost/asio/any_io_executor.hpp"
#include "boost/asio/associated_allocator.hpp"
#include "boost/asio/associated_executor.hpp"
#include "boost/asio/awaitable.hpp"
#include "boost/asio/co_spawn.hpp"
#include "boost/asio/execution.hpp"
#include "boost/asio/execution_context.hpp"
#include "boost/asio/prefer.hpp"
#include "boost/asio/query.hpp"
#include "boost/asio/require.hpp"
#if __has_include("boost/asio/associated_cancellation_slot.hpp")
#include "boost/asio/associated_cancellation_slot.hpp"
#define SCOPEREG_ASIO_HAS_CANCELLATION_SLOT 1
#endif
#include "scopereg/coroutine_scope.h"
#include "scopereg/explicit_scope.h"

namespace scopereg::asio {

namespace internal {

class AsioTask;

// Inner executors whose type says they track no outstanding work (io_context's and
// thread_pool's executors state it in their type) may be kept for the task's whole life,
// in a list the task owns; a TaskExecutor then holds one pointer, small enough for
// any_io_executor's buffer (no allocation when Asio wraps or rewraps it). Their
// work-tracking variants are kept once per task too, engaged while copies exist
// (TrackedBinding). Any other executor (one whose type does not say) is held by value in
// each TaskExecutor, so that what it tracks lasts exactly as long as that copy.
template <typename E>
consteval bool statically_untracked() {
  namespace execution = boost::asio::execution;
  if constexpr (requires {
                  typename std::integral_constant<
                      bool, E::query(execution::outstanding_work) ==
                                execution::outstanding_work.untracked>;
                }) {
    return E::query(execution::outstanding_work) == execution::outstanding_work.untracked;
  } else {
    return false;
  }
}

// A work-tracking executor whose untracked form (prefer(outstanding_work.untracked)) is
// statically untracked and comparable: the task may then keep ONE tracked copy per
// distinct executor, engaged while TaskExecutors of that type exist and released when
// the last goes (see TrackedBinding), so a tracked TaskExecutor is one pointer too.
template <typename E>
consteval bool statically_tracked() {
  namespace execution = boost::asio::execution;
  if constexpr (requires {
                  typename std::integral_constant<
                      bool, E::query(execution::outstanding_work) ==
                                execution::outstanding_work.tracked>;
                }) {
    return E::query(execution::outstanding_work) == execution::outstanding_work.tracked;
  } else {
    return false;
  }
}

template <typename E>
using untracked_t = std::decay_t<typename boost::asio::prefer_result<
    const E&, boost::asio::execution::outstanding_work_t::untracked_t>::type>;

template <typename E>
consteval bool keepable_tracked() {
  if constexpr (!statically_tracked<E>()) {
    return false;
  } else if constexpr (!boost::asio::can_prefer<
                           const E&,
                           boost::asio::execution::outstanding_work_t::untracked_t>::value) {
    return false;
  } else {
    return statically_untracked<untracked_t<E>>() &&
           std::is_nothrow_copy_constructible_v<E> &&
           requires(const untracked_t<E>& a) {
             { a == a } -> std::convertible_to<bool>;
           };
  }
}

enum class HoldKind { kKeptUntracked, kKeptTracked, kByValue };

template <typename E>
consteval HoldKind hold_kind();

// prefer(outstanding_work.tracked) on a kept untracked executor: its result's untracked
// form is the executor itself (so the task's tracked binding is found with no tracked
// executor made). check_untracked_form verifies it each time a tracked copy is engaged.
template <typename Inner, typename Property, typename Result>
consteval bool tracks_lazily() {
  if constexpr (std::is_same_v<std::decay_t<Property>,
                               boost::asio::execution::outstanding_work_t::tracked_t>) {
    if constexpr (hold_kind<Inner>() == HoldKind::kKeptUntracked &&
                  hold_kind<Result>() == HoldKind::kKeptTracked) {
      return std::is_same_v<untracked_t<Result>, Inner>;
    } else {
      return false;
    }
  } else {
    return false;
  }
}

template <typename Result, typename Inner>
void check_untracked_form(const Result& made, const Inner& inner) noexcept {
  if (!(boost::asio::prefer(made, boost::asio::execution::outstanding_work.untracked) ==
        inner)) {
    scopereg::internal::die_of_misuse(
        "scopereg::asio: an executor's prefer(outstanding_work.tracked) does not give the "
        "executor back under prefer(outstanding_work.untracked); TaskExecutor cannot keep "
        "its tracked form (report this with the executor type)");
  }
}

template <typename E>
consteval HoldKind hold_kind() {
  if constexpr (statically_untracked<E>()) {
    return HoldKind::kKeptUntracked;
  } else if constexpr (keepable_tracked<E>()) {
    return HoldKind::kKeptTracked;
  } else {
    return HoldKind::kByValue;
  }
}

struct BindingBase {
  const void* type;
  BindingBase* next;
  void (*destroy)(BindingBase*) noexcept;
  AsioTask* task;
};

template <typename E>
inline constexpr char kBindingTag = 0;

template <typename E>
struct Binding final : BindingBase {
  Binding(AsioTask* t, const E& e)
      : BindingBase{&kBindingTag<E>, nullptr, &destroy_binding, t}, inner(e) {}
  static void destroy_binding(BindingBase* b) noexcept { delete static_cast<Binding*>(b); }
  E inner;
};

template <typename E>
inline constexpr char kTrackedBindingTag = 0;

// The task's one tracked copy of a work-tracking executor E, shared by every
// TaskExecutor<E> of the task on the same executor (`key`, E without its work). `copies`
// counts them; while it is above zero the copy is engaged (the work is tracked, as one
// copy of E would track it) and the binding holds a reference to the task. The 0 -> 1 and
// 1 -> 0 transitions take `mu`; every other copy and release is one atomic operation (as
// copying and destroying E itself is, for Asio's executors).
template <typename E>
struct TrackedBinding final : BindingBase {
  using Key = untracked_t<E>;
  TrackedBinding(AsioTask* t, Key k)
      : BindingBase{&kTrackedBindingTag<E>, nullptr, &destroy_binding, t}, key(std::move(k)) {}
  static void destroy_binding(BindingBase* b) noexcept {
    delete static_cast<TrackedBinding*>(b);
  }

  // A new holder; `make()` returns the executor, called only if no copy is engaged.
  template <typename Make>
  void acquire(Make&& make) noexcept;
  // A copy of a holder: the count is above zero, the copy engaged.
  void acquire_copy() noexcept { copies.fetch_add(1, std::memory_order_relaxed); }
  // A holder's end (the last one releases the copy and the task; the binding may be
  // deleted with the task by then).
  void release() noexcept;
  const E& inner() const noexcept { return *std::launder(reinterpret_cast<const E*>(&storage)); }

  const Key key;
  std::atomic<long> copies{0};
  std::mutex mu;
  bool engaged = false;  // guarded by mu
  alignas(E) unsigned char storage[sizeof(E)];
};

// A spawned task: its scope, a count of the TaskExecutors and queued functions holding it,
// and its kept (untracked) inner executors. Deleted (its scope released: values destroyed
// unless something else holds the scope) when the last reference goes, on that thread.
class AsioTask {
 public:
  template <typename Start>
  explicit AsioTask(Start&& start) : scope(std::forward<Start>(start)) {}
  AsioTask(const AsioTask&) = delete;
  AsioTask& operator=(const AsioTask&) = delete;
  ~AsioTask() {
    BindingBase* b = bindings_.load(std::memory_order_acquire);
    while (b != nullptr) {
      BindingBase* next = b->next;
      b->destroy(b);
      b = next;
    }
  }

  void add_ref() noexcept { refs_.fetch_add(1, std::memory_order_relaxed); }
  void release() noexcept {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }

  // The kept copy of `inner` (found, or made and kept until the task ends). Lock-free;
  // any thread.
  template <typename E>
  Binding<E>* bind(const E& inner) {
    for (BindingBase* b = bindings_.load(std::memory_order_acquire); b != nullptr;
         b = b->next) {
      if (b->type == &kBindingTag<E> && static_cast<Binding<E>*>(b)->inner == inner) {
        return static_cast<Binding<E>*>(b);
      }
    }
    return push(new Binding<E>(this, inner));
  }

  // The task's tracked binding for the executor `key` (found, or made and kept until the
  // task ends). Lock-free; any thread.
  template <typename E>
  TrackedBinding<E>* bind_tracked(const typename TrackedBinding<E>::Key& key) {
    for (BindingBase* b = bindings_.load(std::memory_order_acquire); b != nullptr;
         b = b->next) {
      if (b->type == &kTrackedBindingTag<E> && static_cast<TrackedBinding<E>*>(b)->key == key) {
        return static_cast<TrackedBinding<E>*>(b);
      }
    }
    return push(new TrackedBinding<E>(this, key));
  }

  TaskScope scope;

 private:
  // Adds `made` to the list (a binding made concurrently for the same executor by another
  // thread is a harmless duplicate, freed with the task).
  template <typename B>
  B* push(B* made) noexcept {
    made->next = bindings_.load(std::memory_order_acquire);
    while (!bindings_.compare_exchange_weak(made->next, made, std::memory_order_acq_rel,
                                            std::memory_order_acquire)) {
    }
    return made;
  }

  std::atomic<int> refs_{0};
  std::atomic<BindingBase*> bindings_{nullptr};
};

template <typename E>
template <typename Make>
void TrackedBinding<E>::acquire(Make&& make) noexcept {
  for (long c = copies.load(std::memory_order_acquire); c > 0;) {
    if (copies.compare_exchange_weak(c, c + 1, std::memory_order_acquire)) return;
  }
  std::lock_guard<std::mutex> lock(mu);
  if (!engaged) {  // `engaged` only changes under `mu`, and only while `copies` is 0
    ::new (static_cast<void*>(&storage)) E(make());
    engaged = true;
    task->add_ref();
  }
  copies.fetch_add(1, std::memory_order_release);
}

template <typename E>
void TrackedBinding<E>::release() noexcept {
  for (long c = copies.load(std::memory_order_relaxed); c > 1;) {
    if (copies.compare_exchange_weak(c, c - 1, std::memory_order_release,
                                     std::memory_order_relaxed)) {
      return;
    }
  }
  // Possibly the last holder: decrement under `mu`, still counted meanwhile, so that the
  // engaged copy (and with it the task and this binding) stays while we wait.
  AsioTask* const owner = task;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (copies.fetch_sub(1, std::memory_order_acq_rel) != 1) return;  // a new holder came
    std::launder(reinterpret_cast<E*>(&storage))->~E();
    engaged = false;
  }
  owner->release();  // may delete the task and this binding
}

// An owning reference to a task.
class TaskRef {
 public:
  explicit TaskRef(AsioTask* task) noexcept : task_(task) { task_->add_ref(); }
  TaskRef(const TaskRef& other) noexcept : TaskRef(other.task_) {}
  TaskRef(TaskRef&& other) noexcept : task_(std::exchange(other.task_, nullptr)) {}
  TaskRef& operator=(TaskRef other) noexcept {
    std::swap(task_, other.task_);
    return *this;
  }
  ~TaskRef() {
    if (task_ != nullptr) task_->release();
  }
  AsioTask* get() const noexcept { return task_; }

 private:
  AsioTask* task_;
};

// What a TaskExecutor<E> holds: a counted reference to the task and the inner executor,
// kept by the task (one pointer) or by value (see statically_untracked).
template <typename E, HoldKind Kind = hold_kind<E>()>
class TaskHold;

template <typename E>
class TaskHold<E, HoldKind::kKeptUntracked> {
 public:
  TaskHold(AsioTask* task, const E& inner) : binding_(task->bind(inner)) { task->add_ref(); }
  TaskHold(const TaskHold& other) noexcept : binding_(other.binding_) {
    binding_->task->add_ref();
  }
  TaskHold(TaskHold&& other) noexcept : binding_(std::exchange(other.binding_, nullptr)) {}
  TaskHold& operator=(TaskHold other) noexcept {
    std::swap(binding_, other.binding_);
    return *this;
  }
  ~TaskHold() {
    if (binding_ != nullptr) binding_->task->release();
  }
  const E& inner() const noexcept { return binding_->inner; }
  AsioTask* task() const noexcept { return binding_->task; }

 private:
  Binding<E>* binding_;
};

template <typename E>
class TaskHold<E, HoldKind::kKeptTracked> {
 public:
  TaskHold(AsioTask* task, const E& inner)
      : binding_(task->bind_tracked<E>(
            boost::asio::prefer(inner, boost::asio::execution::outstanding_work.untracked))) {
    binding_->acquire([&inner]() noexcept { return inner; });
  }
  // The tracked form of `key` (an untracked executor), made by `make()` only if the task
  // has no engaged copy of it: no work is counted and uncounted on the io_context for a
  // TaskExecutor that finds the copy engaged (Asio's post and work guards make one per
  // operation).
  template <typename Make>
  TaskHold(AsioTask* task, const untracked_t<E>& key, Make&& make)
      : binding_(task->bind_tracked<E>(key)) {
    binding_->acquire(std::forward<Make>(make));
  }
  TaskHold(const TaskHold& other) noexcept : binding_(other.binding_) {
    binding_->acquire_copy();
  }
  TaskHold(TaskHold&& other) noexcept : binding_(std::exchange(other.binding_, nullptr)) {}
  TaskHold& operator=(TaskHold other) noexcept {
    std::swap(binding_, other.binding_);
    return *this;
  }
  ~TaskHold() {
    if (binding_ != nullptr) binding_->release();
  }
  const E& inner() const noexcept { return binding_->inner(); }
  AsioTask* task() const noexcept { return binding_->task; }

 private:
  TrackedBinding<E>* binding_;
};

template <typename E>
class TaskHold<E, HoldKind::kByValue> {
 public:
  TaskHold(AsioTask* task, const E& inner) : inner_(inner), task_(task) {}
  const E& inner() const noexcept { return inner_; }
  AsioTask* task() const noexcept { return task_.get(); }

 private:
  E inner_;
  TaskRef task_;
};

template <typename T>
inline constexpr bool is_task_start_v =
    std::is_same_v<T, FreshScopeTag> || std::is_same_v<T, CopyCurrentTag> ||
    std::is_same_v<T, ShareCurrentTag> || std::is_same_v<T, CapturedScope>;

}  // namespace internal

// TaskExecutor
//
// An executor that runs every function in a task's scope (see the contract above): a
// counted reference to the task and the inner executor. io_context's and thread_pool's
// executors, and their work-tracking variants, are kept by the task and the TaskExecutor
// is one pointer (a tracked copy counts as outstanding work while it exists, as Asio's
// own does); any other executor is held by value, as Asio's own strand holds its
// executor, so that what it tracks lasts exactly as long as the copy.
template <typename Executor>
class TaskExecutor {
 public:
  using inner_executor_type = Executor;

  // A new task, its scope started from `start` (fresh_scope, copy_current, share_current
  // or a CapturedScope), on `inner`. scopereg::asio::co_spawn does this for you.
  template <typename Start>
    requires internal::is_task_start_v<std::decay_t<Start>>
  TaskExecutor(const Executor& inner, Start&& start)
      : TaskExecutor(internal::TaskRef(new internal::AsioTask(std::forward<Start>(start))),
                     inner) {}

  // The same task on a converted inner executor (what Asio's conversions need).
  template <typename Other>
    requires(!std::is_same_v<Other, Executor>) &&
            std::is_constructible_v<Executor, const Other&>
  TaskExecutor(const TaskExecutor<Other>& other)
      : hold_(other.hold_.task(), Executor(other.get_inner_executor())) {}

  const Executor& get_inner_executor() const noexcept { return hold_.inner(); }
  // The task's scope.
  TaskScope& task() const noexcept { return hold_.task()->scope; }

  template <typename F>
  void execute(F&& f) const {
    boost::asio::execution::execute(
        hold_.inner(),
        Resume<std::decay_t<F>>{internal::TaskRef(hold_.task()), std::forward<F>(f)});
  }

  template <typename Property>
    requires boost::asio::can_query<const Executor&, Property>::value
  decltype(auto) query(const Property& p) const
      noexcept(boost::asio::is_nothrow_query<const Executor&, Property>::value) {
    return boost::asio::query(hold_.inner(), p);
  }

  template <typename Property>
    requires boost::asio::can_require<const Executor&, Property>::value
  auto require(const Property& p) const -> TaskExecutor<
      std::decay_t<typename boost::asio::require_result<const Executor&, Property>::type>> {
    return {hold_.task(), boost::asio::require(hold_.inner(), p)};
  }

  template <typename Property>
    requires boost::asio::can_prefer<const Executor&, Property>::value
  auto prefer(const Property& p) const -> TaskExecutor<
      std::decay_t<typename boost::asio::prefer_result<const Executor&, Property>::type>> {
    using Result =
        std::decay_t<typename boost::asio::prefer_result<const Executor&, Property>::type>;
    if constexpr (internal::tracks_lazily<Executor, Property, Result>()) {
      const Executor& inner = hold_.inner();
      return TaskExecutor<Result>(hold_.task(), inner, [&inner, &p]() noexcept {
        Result made = boost::asio::prefer(inner, p);
        internal::check_untracked_form(made, inner);
        return made;
      });
    } else {
      return {hold_.task(), boost::asio::prefer(hold_.inner(), p)};
    }
  }

  friend bool operator==(const TaskExecutor& a, const TaskExecutor& b) noexcept {
    return a.hold_.task() == b.hold_.task() && a.hold_.inner() == b.hold_.inner();
  }
  friend bool operator!=(const TaskExecutor& a, const TaskExecutor& b) noexcept {
    return !(a == b);
  }

 private:
  template <typename>
  friend class TaskExecutor;

  TaskExecutor(const internal::TaskRef& task, const Executor& inner)
      : hold_(task.get(), inner) {}
  TaskExecutor(internal::AsioTask* task, const Executor& inner) : hold_(task, inner) {}
  template <typename Key, typename Make>
  TaskExecutor(internal::AsioTask* task, const Key& key, Make&& make)
      : hold_(task, key, std::forward<Make>(make)) {}

  template <typename F>
  struct Resume {
    internal::TaskRef task;
    F f;
    void operator()() {
      TaskScope::Installed installed(task.get()->scope);
      std::move(f)();
    }
  };

  internal::TaskHold<Executor> hold_;
};

// TaskTeardownError
//
// A task whose coroutine threw and whose teardown then threw too fails with this: both
// exceptions, neither lost.
class TaskTeardownError : public std::runtime_error {
 public:
  TaskTeardownError(std::exception_ptr task_error, std::exception_ptr teardown_error)
      : std::runtime_error("scopereg::asio: the task failed (" + describe(task_error) +
                           ") and its teardown failed too (" + describe(teardown_error) + ")"),
        task_error_(std::move(task_error)),
        teardown_error_(std::move(teardown_error)) {}
  const std::exception_ptr& task_error() const noexcept { return task_error_; }
  const std::exception_ptr& teardown_error() const noexcept { return teardown_error_; }

 private:
  static std::string describe(const std::exception_ptr& e) {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& x) {
      return x.what();
    } catch (...) {
      return "a non-std exception";
    }
  }
  std::exception_ptr task_error_;
  std::exception_ptr teardown_error_;
};

// teardown_of
//
// A teardown for co_spawn that ends a unit of work of a SessionCache (session_cache.h):
// every session the task used is told success (commit) or failure (roll back), then the
// task's sessions are cleared -- SessionCache::TeardownGuard's semantics. The cache must
// outlive the task.
template <typename Cache>
auto teardown_of(Cache& cache) {
  return [&cache](std::exception_ptr error) {
    typename Cache::TeardownGuard done(cache);
    if (error) done.fail();
  };
}

namespace internal {

inline void no_teardown(std::exception_ptr) noexcept {}

template <typename Teardown>
void run_teardown(Teardown& teardown, std::exception_ptr& error) {
  try {
    teardown(error);
  } catch (...) {
    error = error ? std::make_exception_ptr(TaskTeardownError(error, std::current_exception()))
                  : std::current_exception();
  }
}

template <typename T, typename AwEx, typename Teardown>
boost::asio::awaitable<T, AwEx> run_task(boost::asio::awaitable<T, AwEx> body,
                                         Teardown teardown) {
  std::exception_ptr error;
  if constexpr (std::is_void_v<T>) {
    try {
      co_await std::move(body);
    } catch (...) {
      error = std::current_exception();
    }
    run_teardown(teardown, error);
    if (error) std::rethrow_exception(error);
  } else {
    std::optional<T> result;
    try {
      result.emplace(co_await std::move(body));
    } catch (...) {
      error = std::current_exception();
    }
    run_teardown(teardown, error);
    if (error) std::rethrow_exception(error);
    co_return std::move(*result);
  }
}

}  // namespace internal

// co_spawn
//
// boost::asio::co_spawn of `body` on a TaskExecutor over `ex`, in a new task scope
// started from `start` (default fresh_scope), with an optional teardown (see the
// contract). Returns what boost::asio::co_spawn returns for `token`.
template <typename Executor, typename T, typename AwEx, typename Start, typename Teardown,
          typename CompletionToken>
  requires internal::is_task_start_v<std::decay_t<Start>> &&
           std::is_invocable_v<Teardown&, std::exception_ptr>
auto co_spawn(const Executor& ex, boost::asio::awaitable<T, AwEx> body, Start&& start,
              Teardown teardown, CompletionToken&& token) {
  static_assert(std::is_constructible_v<AwEx, TaskExecutor<Executor>>,
                "scopereg::asio::co_spawn: the coroutine is typed to an executor a "
                "TaskExecutor does not convert to; write it as boost::asio::awaitable<T> "
                "(any_io_executor) or awaitable<T, scopereg::asio::TaskExecutor<E>>");
  return boost::asio::co_spawn(
      TaskExecutor<Executor>(ex, std::forward<Start>(start)),
      internal::run_task(std::move(body), std::move(teardown)),
      std::forward<CompletionToken>(token));
}

template <typename Executor, typename T, typename AwEx, typename Start,
          typename CompletionToken>
  requires internal::is_task_start_v<std::decay_t<Start>>
auto co_spawn(const Executor& ex, boost::asio::awaitable<T, AwEx> body, Start&& start,
              CompletionToken&& token) {
  return scopereg::asio::co_spawn(ex, std::move(body), std::forward<Start>(start),
                                  &internal::no_teardown,
                                  std::forward<CompletionToken>(token));
}

template <typename Executor, typename T, typename AwEx, typename CompletionToken>
  requires(!internal::is_task_start_v<std::decay_t<CompletionToken>>)
auto co_spawn(const Executor& ex, boost::asio::awaitable<T, AwEx> body,
              CompletionToken&& token) {
  return scopereg::asio::co_spawn(ex, std::move(body), fresh_scope, &internal::no_teardown,
                                  std::forward<CompletionToken>(token));
}

// this_scope
//
// `co_await scopereg::asio::this_scope()`: the running task's scope token (null outside a
// task started by co_spawn above).
inline boost::asio::awaitable<ScopeToken> this_scope() { co_return CoroutineScope::current(); }

}  // namespace scopereg::asio

namespace boost::asio {

// What a scopereg::Wrapped<F> is associated with is what F is associated with.
template <typename F, typename Executor>
struct associated_executor<scopereg::Wrapped<F>, Executor> {
  using type = typename associated_executor<F, Executor>::type;
  static type get(const scopereg::Wrapped<F>& w, const Executor& ex = Executor()) noexcept {
    return associated_executor<F, Executor>::get(w.wrapped(), ex);
  }
};

template <typename F, typename Allocator>
struct associated_allocator<scopereg::Wrapped<F>, Allocator> {
  using type = typename associated_allocator<F, Allocator>::type;
  static type get(const scopereg::Wrapped<F>& w, const Allocator& a = Allocator()) noexcept {
    return associated_allocator<F, Allocator>::get(w.wrapped(), a);
  }
};

#ifdef SCOPEREG_ASIO_HAS_CANCELLATION_SLOT
template <typename F, typename Slot>
struct associated_cancellation_slot<scopereg::Wrapped<F>, Slot> {
  using type = typename associated_cancellation_slot<F, Slot>::type;
  static type get(const scopereg::Wrapped<F>& w, const Slot& s = Slot()) noexcept {
    return associated_cancellation_slot<F, Slot>::get(w.wrapped(), s);
  }
};
#endif

}  // namespace boost::asio

#endif  // SCOPEREG_ASIO_H_
