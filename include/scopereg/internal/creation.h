// scopereg/internal/creation.h -- not part of the public API.
//
// The creation protocol, written once for both backends (slot arrays and token-keyed
// maps): a value is made by its factory outside every lock, at most once per scope;
// callers of the same scope that arrive meanwhile wait for it; a factory that re-enters
// its own registry in its own scope gets a ScopeError instead of waiting for itself; a
// factory that throws leaves nothing behind. The error texts live in creation.cc, so a
// misuse reads the same whichever strategy the registry uses.
//
// A backend describes one place where a registry's value for one scope lives as a *cell*:
//
//   Mutex& mu()                         the lock guarding the cell
//   void reserve_store()                called by the protocol (no lock held) before a
//                                       step that may store a value: makes sure the store
//                                       needs nothing that can fail afterwards
//   NodeBase* load()                    the value, or null              (mu held)
//   const void* creator()               the context running the factory, or null  (mu held)
//   void check_can_create(bool set)     throws ScopeError when the scope no longer takes
//                                       values (set: for set(), else for creation)  (mu held)
//   void begin_create(const void* ctx)  marks the value as being created by ctx  (mu held)
//   bool creating(const void* ctx)      whether ctx's mark is still there        (mu held)
//   void abort_create(const void* ctx)  drops ctx's mark, if any; never throws   (mu held)
//   void finish_create(NodeBase* n, const void* ctx)
//                                       drops ctx's mark and stores n            (mu held)
//   NodeBase* swap(NodeBase* n)         stores n (null removes), returns the old (mu held)
//   void wait()                         waits for a change by another context    (mu held)
//   void notify_all()                   wakes waiters
//
// `mu()` is annotated ABSL_LOCK_RETURNED and the others ABSL_EXCLUSIVE_LOCKS_REQUIRED on
// the same mutex, so clang's -Wthread-safety checks this file against each backend.

#ifndef SCOPEREG_INTERNAL_CREATION_H_
#define SCOPEREG_INTERNAL_CREATION_H_

#include <functional>
#include <string>
#include <string_view>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "scopereg/internal/context_state.h"
#include "scopereg/internal/mutex.h"
#include "scopereg/internal/node.h"

namespace scopereg::internal {

// Misuse errors of the protocol (ScopeError; the texts name the fix).
// `registry` names the registry in the message (its value type, or the name it was given).
[[noreturn]] void throw_factory_reentered(const char* registry);
[[noreturn]] void throw_set_inside_factory(const char* registry);
[[noreturn]] void throw_scope_ending(bool set);
[[noreturn]] void throw_no_scope(const char* strategy);
// Misuse that cannot throw (it is found in a destructor): prints what and why, aborts.
[[noreturn]] void die_of_misuse(const char* what) noexcept;

// Called first in every catch (...) of scopereg that does not rethrow: rethrows the
// exception in flight if it is the unwinding of a fiber being destroyed
// (boost::context::detail::forced_unwind), which must never be swallowed. A no-op unless
// scopereg::fiber is linked in (it installs the check).
void rethrow_if_unwinding();
void set_unwinding_check(void (*check)()) noexcept;

// Cooperative waiting, installed by a runtime (scopereg::fiber): can_yield() tells whether
// the caller runs in a context that can yield (a scopereg Fiber); yield_now() yields it.
// Code that waits for another context of the same thread (Pool::checkout) yields instead
// of blocking the thread.
bool can_yield() noexcept;
void yield_now();
void set_yield_hooks(bool (*can)() noexcept, void (*yield)()) noexcept;

// Describes the exception in flight (for status messages); "unknown exception" otherwise.
std::string describe_current_exception();
// Where failure reports go when no reporter is set: one line on stderr.
void report_to_stderr(const absl::Status& status);
// The last resort of a report that could not be built for want of memory: one line on
// stderr naming `context` and what failed (`what` followed by `more`), written without
// allocating. An error is never lost silently, even then.
void report_without_memory(std::string_view context, std::string_view what,
                           std::string_view more = {}) noexcept;
// Writes a description of the exception in flight to `*out`: "no memory" (no allocation)
// when even that description cannot be made. Call from a catch block.
void describe_current_exception_to(std::string* out) noexcept;
// Hands `status` to `reporter`, or to stderr when there is none or it throws: a report is
// never lost.
void report_to(const std::function<void(const absl::Status&)>& reporter,
               const absl::Status& status);

// Yields the calling fiber (can_yield() must be true) with `mu`, held by the caller,
// released meanwhile; returns, or rethrows the fiber's unwinding, with `mu` held again (as
// the caller's MutexLock expects).
template <typename M>
void yield_unlocked(M& mu) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  mu.unlock();
  try {
    yield_now();
  } catch (...) {  // the fiber is being destroyed (forced_unwind)
    mu.lock();
    throw;
  }
  mu.lock();
}

// Waits, with the cell's mutex held, for a change by the context creating the value.
// Inside a scopereg Fiber it yields instead of blocking: the creator may be another fiber
// of this thread whose factory yields (a Pool checkout does), and a blocked thread would
// never resume it.
template <typename Cell>
void wait_for_creator(Cell& cell) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  if (can_yield()) {
    yield_unlocked(cell.mu());
  } else {
    cell.wait();
  }
}

// get_or_create
//
// Returns the cell's value, creating it with `make` when absent; `*created` tells which.
// `make` runs with no lock held. Throws what `make` throws (nothing is stored, waiters
// wake and retry), ScopeError on re-entry or when the scope no longer takes values, and
// std::bad_alloc when storing the value made needs memory there is not (the value is
// then destroyed, nothing is stored, waiters wake and retry).
template <typename Cell>
NodeBase* get_or_create(Cell& cell, absl::FunctionRef<NodeBase*()> make, bool* created,
                        const char* registry) {
  const void* const context = current_context_id();
  cell.reserve_store();
  MutexLock lock(cell.mu());
  for (;;) {
    if (NodeBase* node = cell.load()) {
      *created = false;
      return node;
    }
    cell.check_can_create(/*set=*/false);
    if (const void* creator = cell.creator()) {
      if (creator == context) throw_factory_reentered(registry);
      wait_for_creator(cell);
      continue;
    }
    cell.begin_create(context);
    NodeBase* node = nullptr;
    cell.mu().unlock();
    try {
      node = make();
    } catch (...) {  // also Boost.Context's forced_unwind: rethrown below
      cell.mu().lock();
      cell.abort_create(context);
      cell.notify_all();
      throw;
    }
    cell.mu().lock();
    bool ours = false;
    try {
      // Our mark is gone only in a fork() child that dropped it: marks of threads gone at
      // the fork are, and this is a fiber that began its factory on one of them.
      ours = cell.creating(context);
      if (ours) cell.finish_create(node, context);  // may allocate and throw
    } catch (...) {
      // Nothing stored: the mark goes, waiters wake and retry, and the value made is
      // destroyed (outside the lock, as every value is) before the error goes on.
      cell.abort_create(context);
      cell.notify_all();
      cell.mu().unlock();
      release(node);
      cell.mu().lock();  // for `lock`'s destructor
      throw;
    }
    if (!ours) [[unlikely]] {
      // What the child stored meanwhile, or is making, wins; ours is destroyed.
      cell.mu().unlock();
      release(node);
      cell.mu().lock();
      continue;
    }
    cell.notify_all();
    *created = true;
    return node;
  }
}

// exchange
//
// Installs `node` (null removes) and returns the previous value for the caller to delete
// outside the lock. Waits while another context is creating the value; throws ScopeError
// when called from inside that factory, or (for a non-null node) when the scope no longer
// takes values.
template <typename Cell>
NodeBase* exchange(Cell& cell, NodeBase* node, const char* registry) {
  const void* const context = current_context_id();
  if (node != nullptr) cell.reserve_store();
  MutexLock lock(cell.mu());
  for (;;) {
    const void* creator = cell.creator();
    if (creator == nullptr) break;
    if (creator == context) throw_set_inside_factory(registry);
    wait_for_creator(cell);
  }
  if (node != nullptr) cell.check_can_create(/*set=*/true);
  return cell.swap(node);
}

// The name of type T, for messages ("Db", "std::vector<int>"), without RTTI.
template <typename T>
std::string type_name() {
  const std::string_view f = __PRETTY_FUNCTION__;
  const std::size_t start = f.find("T = ");
  if (start == std::string_view::npos) return "T";
  const std::size_t end = f.find_first_of(";]", start + 4);
  return std::string(f.substr(start + 4, end - start - 4));
}

}  // namespace scopereg::internal

#endif  // SCOPEREG_INTERNAL_CREATION_H_
