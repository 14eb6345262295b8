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
//   boost::asio::co_spawn on a TaskExecutor over `ex` (over `ex`'s inner executor when
//   `ex` is a task's executor: see Child tasks) for a new task: a new TaskScope
//   (coroutine_scope.h) started from `start` -- scopereg::fresh_scope (the default: a new,
//   empty scope), scopereg::copy_current (a copy of the caller's current scope, as an
//   asyncio task), scopereg::share_current, or a CapturedScope such as
//   scopereg::CapturedScope::of(request_id) (that token's scope).
// * TaskExecutor<E> (tasks are made by co_spawn; co_await boost::asio::this_coro::executor
//   is the task's) installs the task on the thread around every function it executes:
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
//   task fails with TaskTeardownError carrying both. A task whose coroutine frame is
//   destroyed before it finished (its io_context or thread_pool destroyed with the task
//   suspended, or before it first ran) still gets its teardown, in its scope, with a
//   TaskAbandoned error, when the frame is destroyed (after the coroutine's own frames
//   and guards are gone); what it throws then is reported on stderr, since no completion
//   handler runs.
// * Overlap: Asio runs the rest of a resuming function (for instance the initiation of
//   the operation the coroutine now awaits) after the coroutine suspended, still inside
//   TaskExecutor's installation; if that operation completes on another thread at once,
//   the task resumes there while the first thread is still finishing. For that moment the
//   task's scope is current on both threads, as a scope entered on two threads. Switch
//   hooks (scope_switch.h) pair exactly on each thread, but a value may see the second
//   thread's on_scope_enter before the first thread's on_scope_leave: keep per-thread
//   state in hooks (what they are for), not one "current" flag per value.
// * The completion handler is called as by boost::asio::co_spawn; unless it has an
//   associated executor of its own, it runs on the TaskExecutor: Asio dispatches it from
//   the task's last resumption, so on io_context's and thread_pool's executors it runs
//   there, in the task's scope, before the scope ends (if that resumption ran elsewhere
//   -- see the limit on handlers invoked without their executor -- it is queued and runs
//   after the task ended).
// * The task runs while its coroutine does (until it finished, after the teardown, or its
//   frame was destroyed: the io_context stopped and destroyed with the task suspended)
//   and while a function of the task is running. Then it ends, on that thread: its scope
//   ends and its values are destroyed (unless a wrap() or CapturedScope still holds the
//   scope). Copies of its TaskExecutor do not keep it running: a copy kept afterwards (in
//   a timer or socket made in the task) runs functions as its inner executor would --
//   queued, outside any task; dispatched inline, in whatever the caller runs in -- and
//   task_running() is false. Nor do they keep the io_context's
//   outstanding work beyond Asio's own rules (a work-tracking copy counts as work while it
//   exists): io_context::run() returns as it would without scopereg.
// * Child tasks: co_await boost::asio::this_coro::executor inside a task is the task's
//   TaskExecutor (in an any_io_executor). scopereg::asio::co_spawn(that executor, child(),
//   scopereg::copy_current, ...) starts the child with a copy of the parent's current scope
//   (recommended), or fresh_scope for a new one. The child runs on the PARENT'S INNER
//   EXECUTOR, not on the parent's TaskExecutor: co_spawn takes every TaskExecutor layer off
//   the executor it is given -- a TaskExecutor<E> by its type, a TaskExecutor held in an
//   any_io_executor (or another execution::any_executor) by its target's type, as often as
//   they are nested -- and converts the inner executor back to the type it was given (a
//   TaskExecutor<E> gives E). So a function of the child is the child's only: it does not
//   keep the parent running (the parent ends when its own coroutine and functions have,
//   its values dying on its own thread, while the child may run on), installs nothing of
//   the parent's (no switch hooks for the parent's values), and costs what any task's
//   function does. A parent on a strand has its children on the same strand (one at a
//   time with it). Which TaskExecutors an any_io_executor is recognised to hold, and what
//   happens to a child of any other: see Limits. The child's copy of the parent's values
//   (copy_current) shares the value objects, so those live as long as either task binds
//   them. A child started with plain boost::asio::co_spawn on that executor runs IN THE
//   PARENT'S TASK while the parent runs: it sees and changes the parent's values (wrap()
//   semantics); once the parent has ended, the child's resumptions run outside any task.
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
// * co_spawn recognises a TaskExecutor inside an any_io_executor (or another
//   execution::any_executor) only when its inner executor is one of: io_context's or
//   thread_pool's executor with std::allocator<void>, in any property variant
//   any_io_executor's require and prefer make (blocking.never, relationship.continuation,
//   outstanding_work.tracked; not thread_pool's blocking.always); a boost::asio::strand
//   of one of those; any_io_executor; a strand of any_io_executor -- that is, tasks
//   spawned on io_context's or thread_pool's executors, strands of them, or an
//   any_io_executor. Not recognised: a task spawned on any other executor (an allocator of
//   your own, bind_allocator, an executor type of your own), a wrapper made over a task's
//   executor (boost::asio::make_strand(co_await this_coro::executor) is a strand whose
//   inner executor is the TaskExecutor: a strand is never looked into), or any
//   type-erased executor when Asio is built with BOOST_ASIO_NO_TYPEID. A child spawned on
//   one of those keeps the parent's TaskExecutor inside its own: each of its functions
//   runs as a function of the parent around the child's -- while the parent runs it pins
//   the parent (the parent's scope and values outlive its coroutine and teardown until no
//   such function is running, and may then end on the child's thread), installs the
//   parent's scope under the child's (switch hooks fire for the parent's values) and
//   costs a second installation; once the parent has ended it only finds that out (a
//   load). Workaround: give co_spawn the inner executor yourself -- the executor the
//   parent was spawned on, or, in the parent (`ex` = co_await this_coro::executor, E the
//   type of the executor the parent was spawned on):
//     using ParentExecutor = scopereg::asio::TaskExecutor<E>;
//     if (ex.target_type() == typeid(ParentExecutor))  // Asio 1.18's target() does not check
//       scopereg::asio::co_spawn(ex.target<ParentExecutor>()->get_inner_executor(), ...);
//   -- and make strands over that inner executor, not over the task's.
//
// Misuse, undetected:
// * A child started with plain boost::asio::co_spawn on the task's executor shares the
//   parent's task: neither may hold a ScopeGuard across co_await while the other runs
//   (each would see the other's guard). Start children with scopereg::asio::co_spawn.
// * On a multi-threaded io_context or thread_pool, a handler given the task's executor
//   (a timer or socket made with co_await this_coro::executor) can run on one thread
//   while the coroutine runs on another. Both are then in the task's scope at once: they
//   share its values (as two threads in one scope; T must allow that), and neither may
//   enter or leave a ScopeGuard, or run a wrap()ped or CapturedScope callable, while the
//   other runs (each installs and writes back the task's ScopeGuard stack: the other's
//   guards would be lost or left dangling). Make the task's executor a strand
//   (co_spawn(boost::asio::make_strand(pool), ...)) to run its functions one at a time,
//   as Asio's own rules for shared state already advise.
// * A TaskExecutor must not be used after its io_context is destroyed (as any executor).
// * A task's generation has 40 bits per task record: a TaskExecutor copy kept while 2^40
//   later tasks ran on the same record would take the task running 2^40 generations
//   later for its own.
//
// Misuse, detected: TaskExecutor::task() after the task ended aborts with a message.
//
// Thread safety: TaskExecutor is a value type like the executor it wraps; copies may be
// used concurrently (a moved-from TaskExecutor may only be destroyed or assigned to).
// Cost: a TaskExecutor over io_context's or thread_pool's executors is two words (the
// task record, which keeps the inner executor, and the task's generation) and fits
// any_io_executor without an allocation; copying it counts nothing, except that a
// work-tracking copy counts its work on the io_context or thread_pool, one atomic
// operation, as copying Asio's own tracked executor does. Over other
// executors (a strand) it holds the executor by value, and any_io_executor allocates to
// hold it. Each executed function pins the task while it runs (one compare-and-swap and
// one decrement; none when run inline by a function of the task) and installs and removes
// the task (three words each way). A `co_await post` round trip on an io_context costs
// about 35-45 ns more than plain Asio's, less than a folly-style executor carrying a
// shared_ptr context (benchmarks/coroutine_scope_benchmark.cc,
// benchmarks/results/summary.md). Starting and ending a task takes a record from and
// returns it to a per-thread cache (a shared, locked list beyond 8). co_spawn given a
// type-erased executor (an any_io_executor) looks at its target's type to take a parent's
// TaskExecutor off (see Child tasks): one comparison of the type's name when the target
// is no TaskExecutor, a few type_info comparisons and a copy of the inner executor for
// each one taken off, a type_info comparison per recognised type (34) for one it does not
// recognise -- about 15, 30 and 120 ns, against about 850 ns for co_spawn and a trivial
// task on an io_context. A child on a type-erased executor is a TaskExecutor over that
// type-erased executor, held by value (the parent's io_context's executor inside an
// any_io_executor): to have the child's TaskExecutor kept by its task record, pass the
// concrete executor (the executor the parent was spawned on). Memory: task records
// are pooled for reuse and never freed: as many as tasks ever ran at once, each keeping a
// few words per distinct io_context or thread_pool executor (and property variant) it
// ran on -- only executors with a stateless allocator are kept; others are held by value
// in each copy.

#ifndef SCOPEREG_ASIO_H_
#define SCOPEREG_ASIO_H_

#include <utility>  // before Asio: Asio 1.18 (Boost 1.74) needs it with g++ 12

#include <atomic>
#include <cassert>
#include <concepts>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <typeinfo>

#include "boost/asio/any_io_executor.hpp"
#include "boost/asio/associated_allocator.hpp"
#include "boost/asio/associated_executor.hpp"
#include "boost/asio/awaitable.hpp"
#include "boost/asio/co_spawn.hpp"
#include "boost/asio/execution.hpp"
#include "boost/asio/execution_context.hpp"
#include "boost/asio/io_context.hpp"
#include "boost/asio/prefer.hpp"
#include "boost/asio/query.hpp"
#include "boost/asio/require.hpp"
#include "boost/asio/strand.hpp"
#include "boost/asio/thread_pool.hpp"
#if __has_include("boost/asio/associated_cancellation_slot.hpp")
#include "boost/asio/associated_cancellation_slot.hpp"
#define SCOPEREG_ASIO_HAS_CANCELLATION_SLOT 1
#endif
#include "absl/status/status.h"
#include "scopereg/coroutine_scope.h"
#include "scopereg/explicit_scope.h"
#include "scopereg/internal/creation.h"

namespace scopereg::asio {

namespace internal {

class AsioTask;
struct TaskExecutorAccess;

// Inner executors whose type says they track no outstanding work (io_context's and
// thread_pool's executors state it in their type) may be kept for the task's whole life,
// in a list the task owns; a TaskExecutor then holds one pointer, small enough for
// any_io_executor's buffer (no allocation when Asio wraps or rewraps it). Their
// work-tracking variants are kept once per task too, by their untracked form; each copy
// counts its own work on the context, as Asio's own copies do (TrackedBinding). Any other
// executor (one whose type does not say) is held by value in
// each TaskExecutor, so that what it tracks lasts exactly as long as that copy.
enum class StaticWork { kUnknown, kUntracked, kTracked };

// What E's type says of the outstanding work it tracks (a constant query), if anything.
template <typename E>
consteval StaticWork static_work() {
  namespace execution = boost::asio::execution;
  if constexpr (requires {
                  typename std::integral_constant<
                      bool, E::query(execution::outstanding_work) ==
                                execution::outstanding_work.untracked>;
                }) {
    return E::query(execution::outstanding_work) == execution::outstanding_work.untracked
               ? StaticWork::kUntracked
               : StaticWork::kTracked;
  } else {
    return StaticWork::kUnknown;
  }
}

template <typename E>
using untracked_t = std::decay_t<typename boost::asio::prefer_result<
    const E&, boost::asio::execution::outstanding_work_t::untracked_t>::type>;

enum class HoldKind { kKeptUntracked, kKeptTracked, kByValue };

template <typename E>
consteval HoldKind hold_kind();

// Asio's own io_context and thread_pool executors: their properties are independent bits,
// so applying a property and dropping the work commute.
template <typename E>
inline constexpr bool is_asio_bits_executor_v = false;
template <typename A, unsigned int Bits>
inline constexpr bool
    is_asio_bits_executor_v<boost::asio::io_context::basic_executor_type<A, Bits>> = true;
template <typename A, unsigned int Bits>
inline constexpr bool
    is_asio_bits_executor_v<boost::asio::thread_pool::basic_executor_type<A, Bits>> = true;

struct RequireOp {
  template <typename E, typename P>
  static auto apply(const E& e, const P& p) -> decltype(boost::asio::require(e, p)) {
    return boost::asio::require(e, p);
  }
};
struct PreferOp {
  template <typename E, typename P>
  static auto apply(const E& e, const P& p) -> decltype(boost::asio::prefer(e, p)) {
    return boost::asio::prefer(e, p);
  }
};

// Whether a require/prefer (`Op`) giving a tracked Result can find the record's tracked
// binding from the untracked form alone -- the inner executor itself when it is untracked
// and the property is outstanding_work.tracked, else Op applied to the inner executor's
// untracked form -- and so never make the tracked executor itself: the new TaskExecutor
// counts its one unit of work on the key's context (no extra work counted and uncounted
// per rewrap: Asio rewraps several times per operation).
template <typename Op, typename Inner, typename Property, typename Result>
consteval bool keys_lazily() {
  if constexpr (hold_kind<Result>() != HoldKind::kKeptTracked) {
    return false;  // (kept: an Asio bits executor, so properties and work commute)
  } else if constexpr (hold_kind<Inner>() == HoldKind::kKeptUntracked) {
    return std::is_same_v<std::decay_t<Property>,
                          boost::asio::execution::outstanding_work_t::tracked_t> &&
           std::is_same_v<untracked_t<Result>, Inner>;
  } else if constexpr (hold_kind<Inner>() == HoldKind::kKeptTracked) {
    if constexpr (requires(const untracked_t<Inner>& k, const Property& p) {
                    Op::apply(k, p);
                  }) {
      return std::is_same_v<std::decay_t<decltype(Op::apply(
                                std::declval<const untracked_t<Inner>&>(),
                                std::declval<const Property&>()))>,
                            untracked_t<Result>>;
    } else {
      return false;
    }
  } else {
    return false;
  }
}

// Executors a task record may keep for good: Asio's own io_context and thread_pool
// executors with a stateless allocator (a kept copy then holds nothing but the context
// pointer and bits; an allocator with state -- an arena, a memory resource -- must not be
// kept past its task, nor compared after it is gone).
template <typename E>
consteval bool keepable() {
  if constexpr (is_asio_bits_executor_v<E>) {
    using A = typename std::allocator_traits<decltype(std::declval<const E&>().query(
        boost::asio::execution::allocator))>::template rebind_alloc<char>;
    return std::is_empty_v<A> && std::allocator_traits<A>::is_always_equal::value;
  } else {
    return false;
  }
}

template <typename E>
consteval HoldKind hold_kind() {
  if constexpr (!keepable<E>()) {
    return HoldKind::kByValue;
  } else if constexpr (static_work<E>() == StaticWork::kUntracked) {
    return HoldKind::kKeptUntracked;
  } else if constexpr (static_work<E>() == StaticWork::kTracked &&
                       requires(const untracked_t<E>& key) {
                         key.on_work_started();
                         key.on_work_finished();
                       }) {
    // Its untracked form (prefer(outstanding_work.untracked)), the same executor without
    // the work bit, is the tracked binding's key; the work is counted on the key's
    // context directly (see TrackedBinding; without BOOST_ASIO_NO_TS_EXECUTORS).
    return HoldKind::kKeptTracked;
  } else {
    return HoldKind::kByValue;
  }
}

struct BindingBase {
  const void* type;
  BindingBase* next;
  AsioTask* task;
};

// A kept untracked executor. Bindings belong to their task record and last as long as it
// (the whole process: records are reused, never freed), so a TaskExecutor copy that
// outlives its task still reaches its inner executor.
template <typename E>
struct Binding final : BindingBase {
  using Key = E;  // found by the executor itself
  static inline char kTag = 0;  // writable: never folded with other data (token_ref.h)
  Binding(AsioTask* t, const E& e) : BindingBase{&kTag, nullptr, t}, inner(e) {}
  const E& key() const noexcept { return inner; }
  const E inner;
};

// The record's binding of a work-tracking executor E: kept as `key` (E without its work).
// Each TaskExecutor<E> counts one unit of outstanding work on the key's context for as long
// as it exists (on_work_started / on_work_finished), exactly as a copy of E itself does,
// with the same one atomic operation per copy and per release.
template <typename E>
struct TrackedBinding final : BindingBase {
  using Key = untracked_t<E>;
  static_assert(is_asio_bits_executor_v<Key> && static_work<Key>() == StaticWork::kUntracked);
  static inline char kTag = 0;  // writable: never folded with other data (token_ref.h)
  TrackedBinding(AsioTask* t, Key k) : BindingBase{&kTag, nullptr, t}, key_(std::move(k)) {}
  const Key& key() const noexcept { return key_; }

  void acquire() const noexcept { key_.on_work_started(); }
  void release() const noexcept { key_.on_work_finished(); }
  // A copy of E (it counts its own work while it exists).
  E inner() const noexcept {
    return boost::asio::prefer(key_, boost::asio::execution::outstanding_work.tracked);
  }

  const Key key_;
};

// A task record: one spawned task at a time, reused (never freed) after the task ends, so
// that a TaskExecutor copy -- a pointer and the task's generation, counting nothing --
// can always tell whether its task still runs. `word_` is the generation (high bits) and
// the count of pins (low bits): the running coroutine's frame holds one (TaskPin, in
// run_task), and each function a TaskExecutor runs holds one while it runs. When the count
// reaches zero the task ends on that thread: its scope is released (values destroyed
// unless something else holds the scope), the generation moves on, and the record goes
// back to the pool. A pin is taken only from a count above zero with the right generation,
// so an ended task is never revived.
class AsioTask {
 public:
  static constexpr int kPinBits = 24;
  static constexpr std::uint64_t kPinMask = (std::uint64_t{1} << kPinBits) - 1;

  AsioTask() = default;
  AsioTask(const AsioTask&) = delete;
  AsioTask& operator=(const AsioTask&) = delete;

  // A record from the pool, running a new task whose scope starts from `start`, with one
  // pin owned by the caller; returns the task's generation through `gen`.
  template <typename Start>
  static AsioTask* start(Start&& start, std::uint64_t& gen);

  std::uint64_t generation() const noexcept {
    return word_.load(std::memory_order_acquire) >> kPinBits;
  }
  bool running(std::uint64_t gen) const noexcept {
    const std::uint64_t w = word_.load(std::memory_order_acquire);
    return (w >> kPinBits) == gen && (w & kPinMask) != 0;
  }
  // Pins generation `gen` if it still runs (any thread).
  bool try_pin(std::uint64_t gen) noexcept {
    std::uint64_t w = word_.load(std::memory_order_acquire);
    for (;;) {
      if ((w >> kPinBits) != gen || (w & kPinMask) == 0) return false;
      assert((w & kPinMask) != kPinMask && "more than 2^24 - 1 functions of one task running");
      if (word_.compare_exchange_weak(w, w + 1, std::memory_order_acquire,
                                      std::memory_order_acquire)) {
        return true;
      }
    }
  }
  // Releases a pin; the last one ends the task.
  void unpin() noexcept {
    if ((word_.fetch_sub(1, std::memory_order_acq_rel) & kPinMask) == 1) finish();
  }
  // Whether generation `gen` is installed on the calling thread (an enclosing function of
  // this thread pins it).
  bool installed_here(std::uint64_t gen) const noexcept {
    return scopereg::internal::this_context().task ==
               installation_.load(std::memory_order_relaxed) &&
           (word_.load(std::memory_order_relaxed) >> kPinBits) == gen;
  }
  // The running task's scope: only while pinned.
  TaskScope& scope() noexcept { return *scope_ptr(); }

  // The record's binding of type B (Binding<E> or TrackedBinding<E>) for `key`: found, or
  // made and kept with the record. Lock-free; any thread.
  template <typename B>
  B* bind(const typename B::Key& key) {
    for (BindingBase* b = bindings_.load(std::memory_order_acquire); b != nullptr;
         b = b->next) {
      if (b->type == &B::kTag && static_cast<B*>(b)->key() == key) return static_cast<B*>(b);
    }
    return push(new B(this, key));
  }

 private:
  // Ended records, for the next tasks: a few per thread, the rest in one list.
  struct Pool {
    std::mutex mu;
    AsioTask* free = nullptr;  // linked through next_free_
  };
  static Pool& pool() {
    static Pool* const p = new Pool;  // never destroyed: records outlive every thread
    return *p;
  }
  // Trivially destructible, so usable until the thread's very end (a task may end in a
  // thread_local's destructor); ThreadCacheDrain hands the records on at thread exit.
  struct ThreadCache {
    static constexpr int kMax = 8;
    AsioTask* records[kMax];
    int size;
    bool drain_registered;
    bool exited;
  };
  static inline thread_local constinit ThreadCache t_cache{};
  struct ThreadCacheDrain {
    ~ThreadCacheDrain() {
      t_cache.exited = true;
      while (t_cache.size > 0) to_pool(t_cache.records[--t_cache.size]);
    }
    void touch() noexcept {}
  };
  static inline thread_local ThreadCacheDrain t_cache_drain;
  static void to_pool(AsioTask* task) noexcept {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mu);
    task->next_free_ = p.free;
    p.free = task;
  }
  static void recycle(AsioTask* task) noexcept {
    ThreadCache& cache = t_cache;
    if (cache.exited || cache.size == ThreadCache::kMax) {
      to_pool(task);
      return;
    }
    if (!cache.drain_registered) {
      t_cache_drain.touch();  // constructs it: its destructor runs at thread exit
      cache.drain_registered = true;
    }
    cache.records[cache.size++] = task;
  }
  static AsioTask* take() {
    ThreadCache& cache = t_cache;
    if (cache.size > 0) return cache.records[--cache.size];
    {
      Pool& p = pool();
      std::lock_guard<std::mutex> lock(p.mu);
      if (AsioTask* task = p.free; task != nullptr) {
        p.free = task->next_free_;
        return task;
      }
    }
    return new AsioTask;  // kept for the process's life (pooled)
  }

  TaskScope* scope_ptr() const noexcept {
    return std::launder(reinterpret_cast<TaskScope*>(const_cast<unsigned char*>(scope_)));
  }

  void finish() noexcept {
    // Nothing pins the record now (the count is 0 and a pin needs it above 0). Move the
    // generation on first, so that copies are stale from here on, also for code that the
    // values' destructors run; then end the scope, on this thread; then give the record
    // back.
    const std::uint64_t gen = word_.load(std::memory_order_relaxed) >> kPinBits;
    word_.store((gen + 1) << kPinBits, std::memory_order_release);
    scope_ptr()->~TaskScope();
    recycle(this);
  }

  // Adds `made` to the list (a binding made concurrently for the same executor by another
  // thread is a harmless duplicate).
  template <typename B>
  B* push(B* made) noexcept {
    made->next = bindings_.load(std::memory_order_acquire);
    while (!bindings_.compare_exchange_weak(made->next, made, std::memory_order_acq_rel,
                                            std::memory_order_acquire)) {
    }
    return made;
  }

  std::atomic<std::uint64_t> word_{std::uint64_t{1} << kPinBits};  // generation 1, no pin
  std::atomic<BindingBase*> bindings_{nullptr};
  AsioTask* next_free_ = nullptr;  // guarded by pool().mu while in the pool
  // What the thread's context holds while the task is installed (the scope's address,
  // the same for every generation): compared without touching the scope object. Atomic
  // (relaxed) only because start() writes it again, with the same value, while a stale
  // function of an earlier generation may be reading it.
  std::atomic<const void*> installation_{nullptr};
  alignas(TaskScope) unsigned char scope_[sizeof(TaskScope)];
};

template <typename Start>
AsioTask* AsioTask::start(Start&& start, std::uint64_t& gen) {
  AsioTask* const task = take();
  try {
    task->installation_.store(
        (::new (static_cast<void*>(task->scope_)) TaskScope(std::forward<Start>(start)))
            ->installation(),
        std::memory_order_relaxed);
  } catch (...) {
    recycle(task);
    throw;
  }
  gen = task->generation();
  task->word_.fetch_add(1, std::memory_order_release);  // the caller's pin
  return task;
}

// The pin of a running task's coroutine frame (a parameter of run_task): the task ends
// when it goes and no function of the task is running.
class TaskPin {
 public:
  TaskPin(AsioTask* task, std::uint64_t gen) noexcept : task_(task), gen_(gen) {}
  TaskPin(TaskPin&& other) noexcept : task_(std::exchange(other.task_, nullptr)), gen_(other.gen_) {}
  TaskPin& operator=(TaskPin&&) = delete;
  ~TaskPin() {
    if (task_ != nullptr) task_->unpin();
  }
  AsioTask* task() const noexcept { return task_; }
  std::uint64_t generation() const noexcept { return gen_; }

 private:
  AsioTask* task_;
  std::uint64_t gen_;
};

// What a TaskExecutor<E> holds: the task record, its generation, and the inner executor,
// kept by the record (one pointer) or by value (see hold_kind). Copies count nothing but
// a tracked copy's work.
template <typename E, HoldKind Kind = hold_kind<E>()>
class TaskHold;
struct FromKey {};

// A binding pointer and a generation, written together by one 16-byte store. Asio's
// any_executor moves the executor it holds with one 16-byte load; had the two words just
// been written by two 8-byte stores, the load could not be forwarded from them and would
// wait for both to reach the cache (measured: about 10 ns per co_await of a task).
template <typename B>
class BindingAndGeneration {
 public:
  BindingAndGeneration(B* binding, std::uint64_t gen) noexcept { set(binding, gen); }
  B* binding() const noexcept {
    return reinterpret_cast<B*>(static_cast<std::uintptr_t>(words_[0]));
  }
  std::uint64_t generation() const noexcept { return words_[1]; }
  void set(B* binding, std::uint64_t gen) noexcept {
    words_ = Words{static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(binding)), gen};
  }

 private:
#if defined(__GNUC__)
  // Aligned as the two words (any_executor's buffer is aligned for pointers only).
  typedef std::uint64_t Words __attribute__((vector_size(16), aligned(alignof(void*))));
#else  // two plain words (the compiler may store them one by one)
  struct Words {
    std::uint64_t word[2];
    std::uint64_t operator[](int i) const { return word[i]; }
  };
#endif
  Words words_;
};

static_assert(sizeof(BindingAndGeneration<void>) == 16 &&
                  alignof(BindingAndGeneration<void>) == alignof(void*),
              "two words, aligned as a pointer: any_executor stores it inline");

template <typename E>
class TaskHold<E, HoldKind::kKeptUntracked> {
 public:
  TaskHold(AsioTask* task, std::uint64_t gen, const E& inner)
      : words_(task->bind<Binding<E>>(inner), gen) {}
  const E& inner() const noexcept { return words_.binding()->inner; }
  // What functions are executed on and queries asked of.
  const E& runner() const noexcept { return words_.binding()->inner; }
  AsioTask* task() const noexcept { return words_.binding()->task; }
  std::uint64_t generation() const noexcept { return words_.generation(); }

 private:
  BindingAndGeneration<Binding<E>> words_;
};

template <typename E>
class TaskHold<E, HoldKind::kKeptTracked> {
 public:
  TaskHold(AsioTask* task, std::uint64_t gen, const E& inner)
      : TaskHold(task, gen, FromKey{},
                 boost::asio::prefer(inner, boost::asio::execution::outstanding_work.untracked)) {}
  // From `key`, E without its work (no E is made: Asio's post and work guards rewrap an
  // executor to its tracked form once per operation).
  TaskHold(AsioTask* task, std::uint64_t gen, FromKey, const untracked_t<E>& key)
      : words_(task->bind<TrackedBinding<E>>(key), gen) {
    words_.binding()->acquire();
  }
  TaskHold(const TaskHold& other) noexcept : words_(other.words_) {
    words_.binding()->acquire();
  }
  TaskHold(TaskHold&& other) noexcept : words_(other.words_) {
    other.words_.set(nullptr, other.words_.generation());
  }
  TaskHold& operator=(TaskHold other) noexcept {
    std::swap(words_, other.words_);
    return *this;
  }
  ~TaskHold() {
    if (TrackedBinding<E>* binding = words_.binding()) binding->release();
  }
  // A new copy of E (it counts its own work while it lives).
  E inner() const noexcept { return words_.binding()->inner(); }
  // E without its work: executes as E does (the work bit changes only what a copy counts).
  const untracked_t<E>& key() const noexcept { return words_.binding()->key(); }
  const untracked_t<E>& runner() const noexcept { return words_.binding()->key(); }
  AsioTask* task() const noexcept { return words_.binding()->task; }
  std::uint64_t generation() const noexcept { return words_.generation(); }

 private:
  BindingAndGeneration<TrackedBinding<E>> words_;
};

template <typename E>
class TaskHold<E, HoldKind::kByValue> {
 public:
  TaskHold(AsioTask* task, std::uint64_t gen, const E& inner)
      : inner_(inner), task_(task), gen_(gen) {}
  const E& inner() const noexcept { return inner_; }
  const E& runner() const noexcept { return inner_; }
  AsioTask* task() const noexcept { return task_; }
  std::uint64_t generation() const noexcept { return gen_; }

 private:
  E inner_;
  AsioTask* task_;
  std::uint64_t gen_;
};

// Whether P is boost::asio::execution::prefer_only<Q> (any_executor's wrapper of a
// property it may only prefer).
template <typename P>
inline constexpr bool is_prefer_only_v = false;
template <typename Q>
inline constexpr bool is_prefer_only_v<boost::asio::execution::prefer_only<Q>> = true;

template <typename T>
inline constexpr bool is_task_start_v =
    std::is_same_v<T, FreshScopeTag> || std::is_same_v<T, CopyCurrentTag> ||
    std::is_same_v<T, ShareCurrentTag> || std::is_same_v<T, CapturedScope>;

}  // namespace internal

// TaskExecutor
//
// An executor that runs every function in a task's scope (see the contract above): the
// task's record and generation, and the inner executor. Copies count nothing (a tracked
// copy counts its work). io_context's and thread_pool's executors, and their work-tracking
// variants, are kept by the task record and the TaskExecutor is two words (a tracked copy
// counts as outstanding work while it exists, as Asio's own does); any other executor is
// held by value, as Asio's own strand holds its executor, so that what it tracks lasts
// exactly as long as the copy. Tasks are made by scopereg::asio::co_spawn.
template <typename Executor>
class TaskExecutor {
  template <typename Property>
  using RequireResult =
      std::decay_t<typename boost::asio::require_result<const Executor&, Property>::type>;
  template <typename Property>
  using PreferResult =
      std::decay_t<typename boost::asio::prefer_result<const Executor&, Property>::type>;

 public:
  using inner_executor_type = Executor;

  // The same task on a converted inner executor (what Asio's conversions need).
  template <typename Other>
    requires(!std::is_same_v<Other, Executor>) &&
            std::is_constructible_v<Executor, const Other&>
  TaskExecutor(const TaskExecutor<Other>& other)
      : hold_(other.hold_.task(), other.hold_.generation(),
              Executor(other.get_inner_executor())) {}

  // The inner executor: a reference, or for a work-tracking io_context or thread_pool
  // executor a new copy (as strand's get_inner_executor() returns one).
  decltype(auto) get_inner_executor() const noexcept { return hold_.inner(); }
  // Whether the task still runs (its coroutine has not finished, or a function of it is
  // running). A copy of an ended task's executor runs functions as its inner executor
  // would, outside the task.
  bool task_running() const noexcept { return hold_.task()->running(hold_.generation()); }
  // The task's scope. Only inside the task (in a function it runs, which keeps it
  // running); aborts with a message when the task has ended.
  TaskScope& task() const noexcept {
    if (!hold_.task()->running(hold_.generation())) [[unlikely]] {
      scopereg::internal::die_of_misuse(
          "scopereg::asio::TaskExecutor::task() was called after its task ended; call it "
          "inside the task (co_await boost::asio::this_coro::executor), or use "
          "task_running() first");
    }
    return hold_.task()->scope();
  }

  template <typename F>
  void execute(F&& f) const {
    boost::asio::execution::execute(
        hold_.runner(),
        Resume<std::decay_t<F>>{hold_.task(), hold_.generation(), std::forward<F>(f)});
  }

  template <typename Property>
    requires boost::asio::can_query<const Executor&, Property>::value
  decltype(auto) query(const Property& p) const
      noexcept(boost::asio::is_nothrow_query<const Executor&, Property>::value) {
    if constexpr (std::is_same_v<Property, boost::asio::execution::outstanding_work_t> &&
                  internal::hold_kind<Executor>() == internal::HoldKind::kKeptTracked) {
      return Executor::query(p);  // static: no tracked copy made (and released) to ask
    } else if constexpr (std::is_same_v<Property, boost::asio::execution::outstanding_work_t>) {
      return boost::asio::query(hold_.inner(), p);
    } else {
      return boost::asio::query(hold_.runner(), p);  // the same answer, no copy made
    }
  }

  template <typename Property>
    requires boost::asio::can_require<const Executor&, Property>::value
  auto require(const Property& p) const -> TaskExecutor<RequireResult<Property>> {
    return rewrap<internal::RequireOp, RequireResult<Property>>(p);
  }

  template <typename Property>
    requires boost::asio::can_prefer<const Executor&, Property>::value
  auto prefer(const Property& p) const -> TaskExecutor<PreferResult<Property>> {
    if constexpr (internal::is_prefer_only_v<Property>) {
      // any_executor's prefer_only<P> (what any_io_executor passes): the same as P, so
      // that P's cheap forms apply (a tracked rewrap without making a tracked copy).
      return prefer(p.property);
    } else {
      return rewrap<internal::PreferOp, PreferResult<Property>>(p);
    }
  }

  friend bool operator==(const TaskExecutor& a, const TaskExecutor& b) noexcept {
    return a.hold_.task() == b.hold_.task() && a.hold_.generation() == b.hold_.generation() &&
           a.hold_.runner() == b.hold_.runner();
  }
  friend bool operator!=(const TaskExecutor& a, const TaskExecutor& b) noexcept {
    return !(a == b);
  }

 private:
  template <typename>
  friend class TaskExecutor;
  friend struct internal::TaskExecutorAccess;

  TaskExecutor(internal::AsioTask* task, std::uint64_t gen, const Executor& inner)
      : hold_(task, gen, inner) {}
  template <typename Key>
  TaskExecutor(internal::AsioTask* task, std::uint64_t gen, internal::FromKey, const Key& key)
      : hold_(task, gen, internal::FromKey{}, key) {}

  // The same task on Op(inner, p).
  template <typename Op, typename Result, typename Property>
  TaskExecutor<Result> rewrap(const Property& p) const {
    if constexpr (internal::keys_lazily<Op, Executor, Property, Result>()) {
      if constexpr (internal::hold_kind<Executor>() == internal::HoldKind::kKeptUntracked) {
        return TaskExecutor<Result>(hold_.task(), hold_.generation(), internal::FromKey{},
                                    hold_.inner());
      } else {
        return TaskExecutor<Result>(hold_.task(), hold_.generation(), internal::FromKey{},
                                    Op::apply(hold_.key(), p));
      }
    } else {
      return TaskExecutor<Result>(hold_.task(), hold_.generation(), Op::apply(hold_.inner(), p));
    }
  }

  // A function queued on the inner executor. It pins the task only while it runs: if the
  // task ended meanwhile, `f` runs as on the inner executor.
  template <typename F>
  struct Resume {
    internal::AsioTask* task;
    std::uint64_t gen;
    F f;
    void operator()() {
      // Run inline by a function of the task (which pins it), or the task has ended.
      if (task->installed_here(gen) || !task->try_pin(gen)) {
        std::move(f)();
        return;
      }
      const Unpin unpin{task};  // after `installed`: the task may end there
      TaskScope::Installed installed(task->scope());
      F run(std::move(f));  // destroyed in the task too, not after the task may have ended
      std::move(run)();
    }
  };
  struct Unpin {
    internal::AsioTask* task;
    ~Unpin() { task->unpin(); }
  };

  internal::TaskHold<Executor> hold_;
};

namespace internal {

struct TaskExecutorAccess {
  template <typename Executor>
  static TaskExecutor<Executor> make(AsioTask* task, std::uint64_t gen, const Executor& inner) {
    return TaskExecutor<Executor>(task, gen, inner);
  }
};

// What co_spawn starts a task on: the executor it is given without its TaskExecutor
// layers (see "Child tasks" in the contract), so that a child's functions are its own
// only, never the parent's functions wrapped around the child's.

template <typename E>
inline constexpr bool is_task_executor_v = false;
template <typename E>
inline constexpr bool is_task_executor_v<TaskExecutor<E>> = true;

// E without its TaskExecutor layers, by type.
template <typename E>
struct WithoutTasks {
  using type = E;
};
template <typename E>
struct WithoutTasks<TaskExecutor<E>> : WithoutTasks<E> {};
template <typename E>
using without_tasks_t = typename WithoutTasks<E>::type;

// A type-erased executor that tells its target's type (any_io_executor, any other
// execution::any_executor; not with BOOST_ASIO_NO_TYPEID, where target_type() is an
// opaque pointer).
template <typename E>
concept TypeErasedExecutor = requires(const E& e) {
  { e.target_type() } -> std::same_as<const std::type_info&>;
};

// The inner executors whose TaskExecutor is recognised inside a type-erased executor
// (the contract's Limits list them), the usual ones first: the target's type is compared
// with each (type_info equality; Asio 1.18's any_executor::target<T>() does not check),
// once its name has been found to start as all of theirs do (so that a target that is no
// TaskExecutor -- the common case outside tasks -- costs one comparison that fails at
// once, not one per candidate).
template <typename... Inner>
struct RecognisedInners {
  // Replaces `ex` by its target's inner executor, converted to Poly, when its target is
  // a TaskExecutor over one of Inner; returns whether it did.
  template <typename Poly>
  static bool unwrap(Poly& ex) {
    if (!ex) return false;  // a null any_executor has no target
    const std::type_info& target = ex.target_type();
    const std::string_view prefix = common_name_prefix();
    if (std::string_view(target.name()).substr(0, prefix.size()) != prefix) return false;
    return (unwrap_if<Inner>(ex, target) || ...);
  }

 private:
  // The longest prefix the candidates' type names share (equal types have equal names).
  static std::string_view common_name_prefix() {
    static const std::string_view prefix = [] {
      const char* const names[] = {typeid(TaskExecutor<Inner>).name()...};
      std::string_view common = names[0];
      for (const std::string_view name : names) {
        std::size_t n = 0;
        while (n < common.size() && n < name.size() && common[n] == name[n]) ++n;
        common = common.substr(0, n);
      }
      return common;
    }();
    return prefix;
  }

  template <typename I, typename Poly>
  static bool unwrap_if(Poly& ex, const std::type_info& target) {
    if constexpr (std::is_constructible_v<Poly, const I&>) {
      if (target == typeid(TaskExecutor<I>)) {
        const TaskExecutor<I>* const task_ex = ex.template target<TaskExecutor<I>>();
        ex = Poly(task_ex->get_inner_executor());  // made before `ex`, its owner, changes
        return true;
      }
    }
    return false;
  }
};

template <unsigned int Bits>
using IoBits = boost::asio::io_context::basic_executor_type<std::allocator<void>, Bits>;
template <unsigned int Bits>
using PoolBits = boost::asio::thread_pool::basic_executor_type<std::allocator<void>, Bits>;
template <typename E>
using StrandOf = boost::asio::strand<E>;

// io_context's bits: blocking_never 1, relationship_continuation 2, outstanding_work_tracked
// 4; thread_pool's: blocking_never 1, relationship_continuation 4, outstanding_work_tracked
// 8 (blocking_always 2 is not made by any_io_executor's require or prefer). Which of them
// are in the type, rather than in a run-time member, depends on the Asio version (Asio
// 1.18 types only io_context's work bit): every combination is listed.
using Recognised = RecognisedInners<
    IoBits<0>, PoolBits<0>, StrandOf<IoBits<0>>, StrandOf<PoolBits<0>>,
    boost::asio::any_io_executor, StrandOf<boost::asio::any_io_executor>,
    IoBits<4>, PoolBits<8>, StrandOf<IoBits<4>>, StrandOf<PoolBits<8>>,
    IoBits<1>, IoBits<2>, IoBits<3>, IoBits<5>, IoBits<6>, IoBits<7>,
    PoolBits<1>, PoolBits<4>, PoolBits<5>, PoolBits<9>, PoolBits<12>, PoolBits<13>,
    StrandOf<IoBits<1>>, StrandOf<IoBits<2>>, StrandOf<IoBits<3>>,
    StrandOf<IoBits<5>>, StrandOf<IoBits<6>>, StrandOf<IoBits<7>>,
    StrandOf<PoolBits<1>>, StrandOf<PoolBits<4>>, StrandOf<PoolBits<5>>,
    StrandOf<PoolBits<9>>, StrandOf<PoolBits<12>>, StrandOf<PoolBits<13>>>;

// `ex` without its TaskExecutor layers: a TaskExecutor<E> by type (its inner executor: a
// reference, or a new copy of a work-tracking one), a recognised TaskExecutor target of a
// type-erased executor at run time, repeatedly (an inner any_io_executor may hold another);
// anything else as it is (a reference to `ex`).
template <typename E>
decltype(auto) without_tasks(const E& ex) {
  if constexpr (is_task_executor_v<E>) {
    return without_tasks_t<E>(without_tasks(ex.get_inner_executor()));
  } else if constexpr (TypeErasedExecutor<E>) {
    E inner = ex;
    while (Recognised::unwrap(inner)) {
    }
    return inner;
  } else {
    return (ex);
  }
}

}  // namespace internal

// TaskAbandoned
//
// What a task's teardown gets when the task's coroutine frame was destroyed before the
// coroutine finished: its io_context or thread_pool was destroyed with the task suspended
// (the completion handler is then never called, as with boost::asio::co_spawn).
class TaskAbandoned : public std::runtime_error {
 public:
  TaskAbandoned()
      : std::runtime_error(
            "scopereg::asio: the task was destroyed before it finished (its io_context or "
            "thread_pool was destroyed with the task suspended)") {}
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
    if (!error) {
      error = std::current_exception();
      return;
    }
    try {
      error = std::make_exception_ptr(TaskTeardownError(error, std::current_exception()));
    } catch (const std::bad_alloc&) {
      // No memory to describe both: the task's own error goes on, and the teardown's is
      // said on stderr, not lost.
      scopereg::internal::report_without_memory(
          "scopereg::asio", "the teardown of a failed task threw too");
    }
  }
}

// What the task's coroutine frame owns of the task (one parameter, so it exists from the
// moment co_spawn makes the frame): its pin, which keeps the task running until the frame
// ends, its teardown, and the body it runs. When the frame is destroyed before the
// coroutine finished -- its io_context or thread_pool destroyed with the task suspended,
// or before it first ran -- the destructor first destroys the body (its frames, and the
// guards they hold: a suspended `co_await` keeps the body's frame in `body_`), then runs
// the teardown there, in the task's scope, with a TaskAbandoned error, and only then
// releases the pin. (In one object, that order is the code's, not the order in which a
// compiler destroys a coroutine's parameters, which the standard leaves open.) What the
// teardown throws then is reported on stderr: no completion handler runs.
// The error a teardown gets for a task destroyed before it finished: one, made by the
// first co_spawn (which may throw), so that a task's destruction allocates nothing for it
// and its teardown runs even with no memory left. (Rethrown from any number of threads:
// an exception object is only read.)
inline const std::exception_ptr& task_abandoned_error() {
  static const std::exception_ptr error = std::make_exception_ptr(TaskAbandoned());
  return error;
}

template <typename Body, typename Teardown>
class TaskLife {
 public:
  TaskLife(TaskPin pin, Teardown teardown, Body body) noexcept(
      std::is_nothrow_move_constructible_v<Teardown>)
      : pin_(std::move(pin)), teardown_(std::move(teardown)), body_(std::move(body)) {}
  TaskLife(TaskLife&& other) noexcept(std::is_nothrow_move_constructible_v<Teardown>)
      : pin_(std::move(other.pin_)),
        teardown_(std::move(other.teardown_)),
        body_(std::move(other.body_)),
        armed_(std::exchange(other.armed_, false)) {}
  TaskLife& operator=(TaskLife&&) = delete;
  ~TaskLife() {
    if (!armed_ || pin_.task() == nullptr) return;
    { const Body gone(std::move(body_)); }  // the body's frames and guards, first
    TaskScope::Installed installed(pin_.task()->scope());
    try {
      teardown_(task_abandoned_error());
    } catch (...) {
      try {
        scopereg::internal::report_to_stderr(absl::InternalError(
            "scopereg::asio: the teardown of a task destroyed before it finished threw: " +
            scopereg::internal::describe_current_exception()));
      } catch (const std::bad_alloc&) {
        scopereg::internal::report_without_memory(
            "scopereg::asio", "the teardown of a task destroyed before it finished threw");
      }
    }
  }  // then pin_ goes: the task may end here
  Body& body() noexcept { return body_; }
  // The coroutine finished: the normal teardown runs instead.
  Teardown& disarm() noexcept {
    armed_ = false;
    return teardown_;
  }

 private:
  TaskPin pin_;
  Teardown teardown_;
  Body body_;
  bool armed_ = true;
};

// The task's coroutine: `life` (see TaskLife) keeps the task running until the frame
// ends, and holds the body it awaits.
template <typename T, typename AwEx, typename Teardown>
boost::asio::awaitable<T, AwEx> run_task(
    TaskLife<boost::asio::awaitable<T, AwEx>, Teardown> life) {
  std::exception_ptr error;
  if constexpr (std::is_void_v<T>) {
    try {
      co_await std::move(life.body());
    } catch (...) {
      error = std::current_exception();
    }
    run_teardown(life.disarm(), error);
    if (error) std::rethrow_exception(error);
  } else {
    std::optional<T> result;
    try {
      result.emplace(co_await std::move(life.body()));
    } catch (...) {
      error = std::current_exception();
    }
    run_teardown(life.disarm(), error);
    if (error) std::rethrow_exception(error);
    co_return std::move(*result);
  }
}

}  // namespace internal

// co_spawn
//
// boost::asio::co_spawn of `body` on a TaskExecutor over `ex` -- over `ex`'s inner
// executor when `ex` is a task's executor (see "Child tasks" in the contract) -- in a new
// task scope started from `start` (default fresh_scope), with an optional teardown (see
// the contract). Returns what boost::asio::co_spawn returns for `token`.
//
//   co_spawn(ex, body, token)                    fresh_scope, no teardown
//   co_spawn(ex, body, start, token)             no teardown
//   co_spawn(ex, body, teardown, token)          fresh_scope
//   co_spawn(ex, body, start, teardown, token)
template <typename Executor, typename T, typename AwEx, typename Start, typename Teardown,
          typename CompletionToken>
  requires internal::is_task_start_v<std::decay_t<Start>> &&
           std::is_invocable_v<Teardown&, std::exception_ptr>
auto co_spawn(const Executor& ex, boost::asio::awaitable<T, AwEx> body, Start&& start,
              Teardown teardown, CompletionToken&& token) {
  using Inner = internal::without_tasks_t<Executor>;
  static_assert(std::is_constructible_v<AwEx, TaskExecutor<Inner>>,
                "scopereg::asio::co_spawn: the coroutine is typed to an executor a "
                "TaskExecutor does not convert to; write it as boost::asio::awaitable<T> "
                "(any_io_executor) or awaitable<T, scopereg::asio::TaskExecutor<E>>");
  // Before the task starts (converting a type-erased executor may allocate and throw).
  decltype(auto) inner = internal::without_tasks(ex);
  (void)internal::task_abandoned_error();  // made here, where it may throw
  std::uint64_t gen = 0;
  internal::AsioTask* const task = internal::AsioTask::start(std::forward<Start>(start), gen);
  internal::TaskPin pin(task, gen);
  const TaskExecutor<Inner> task_ex =
      internal::TaskExecutorAccess::make(pin.task(), pin.generation(), inner);
  return boost::asio::co_spawn(
      task_ex,
      internal::run_task(internal::TaskLife<boost::asio::awaitable<T, AwEx>, Teardown>(
          std::move(pin), std::move(teardown), std::move(body))),
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

template <typename Executor, typename T, typename AwEx, typename Teardown,
          typename CompletionToken>
  requires(!internal::is_task_start_v<std::decay_t<Teardown>>) &&
          std::is_invocable_v<Teardown&, std::exception_ptr>
auto co_spawn(const Executor& ex, boost::asio::awaitable<T, AwEx> body, Teardown teardown,
              CompletionToken&& token) {
  return scopereg::asio::co_spawn(ex, std::move(body), fresh_scope, std::move(teardown),
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
