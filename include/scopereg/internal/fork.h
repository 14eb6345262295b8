// scopereg/internal/fork.h -- not part of the public API.
//
// fork() safety. A child process has only the thread that called fork(); a lock another
// thread held at that moment would stay locked in the child forever. So scopereg installs
// pthread_atfork handlers (on first use) that take every scopereg lock before fork() and
// release them after it, in the parent and in the child, in the lock order the rest of
// scopereg uses:
//
//   1. the list of ForkSafeMutex objects          (registry/fork.cc)
//   2. ExplicitScope's token table shards          (scopes/explicit_scope.cc)
//   3. the process mutex                           (registry_record.h)
//   4. every domain, then its live scopes' mutexes (scope_state.cc)
//   5. the binding index's shards                  (registry_record.cc)
//   6. every token-keyed registry's shards
//   7. every ForkSafeMutex (leaf locks: pools, session caches, factories)
//
// In the child, the values of the threads that do not exist there are abandoned: their
// scopes are unlinked and their values are neither destroyed nor reachable (their
// destructors would act on the parent's resources, such as its database connections).
// Their creations in progress are dropped (a caller in the child makes the value anew),
// no one counts as waiting, and every condition variable forgets its waiters at its first
// use (mutex.h): no notify is spent on a thread that is gone.

#ifndef SCOPEREG_INTERNAL_FORK_H_
#define SCOPEREG_INTERNAL_FORK_H_

#include <cstdint>

#include "absl/base/thread_annotations.h"
#include "scopereg/internal/mutex.h"

namespace scopereg::internal {

// Installs the handlers once per process. Cheap after the first call.
void install_fork_handlers() noexcept;

// The calling thread's serial (never reused; never 0).
std::uint64_t current_thread_serial() noexcept;
// The serial of the calling thread if `object` lies on its stack, else 0. Objects that
// scopereg keeps in process-wide lists record it: in a forked child, the stacks of the
// threads that did not survive are reused by new threads, so such objects are dropped from
// those lists there (their owners are gone with their threads).
std::uint64_t stack_owner(const void* object) noexcept;
// In the child: whether an object with that stack owner lived on a thread that is gone.
bool on_dead_stack(std::uint64_t owner) noexcept;
// In the child: whether the thread with that serial (current_thread_serial()) is gone (it
// is not the thread that called fork()). Its creations in progress are dropped there.
bool thread_gone_in_child(std::uint64_t serial) noexcept;

// A Mutex that fork() takes and releases (see the file comment). For leaf locks only: no
// other scopereg lock may be acquired while one is held. Construct and destroy it with no
// scopereg lock held.
class ABSL_LOCKABLE ForkSafeMutex : public Mutex {
 public:
  ForkSafeMutex();
  ForkSafeMutex(const ForkSafeMutex&) = delete;
  ForkSafeMutex& operator=(const ForkSafeMutex&) = delete;
  ~ForkSafeMutex();

 private:
  friend struct ForkList;
  const std::uint64_t stack_owner_ = stack_owner(this);
  ForkSafeMutex* prev_ = nullptr;
  ForkSafeMutex* next_ = nullptr;
};

// The parts each component contributes (defined next to the state they lock).
void lock_explicit_table_for_fork() ABSL_NO_THREAD_SAFETY_ANALYSIS;
void unlock_explicit_table_after_fork() ABSL_NO_THREAD_SAFETY_ANALYSIS;
// Require the process mutex (and, for the binding shards, the domains).
void lock_scopes_for_fork() ABSL_NO_THREAD_SAFETY_ANALYSIS;
void unlock_scopes_after_fork() ABSL_NO_THREAD_SAFETY_ANALYSIS;
void lock_subscribers_for_fork() ABSL_NO_THREAD_SAFETY_ANALYSIS;
void unlock_subscribers_after_fork() ABSL_NO_THREAD_SAFETY_ANALYSIS;
// In the child, with every lock free again: abandons the other threads' scopes, and drops
// what lived on their stacks from scopereg's lists.
void abandon_other_threads_in_child() noexcept;
void forget_dead_records_in_child() noexcept;

}  // namespace scopereg::internal

#endif  // SCOPEREG_INTERNAL_FORK_H_
