// scopereg/internal/mutex.h -- not part of the public API.
//
// std::mutex and std::condition_variable behind clang's thread-safety annotations, so that
// every "guarded by" in scopereg is checked by the compiler (-Wthread-safety) instead of
// being a comment. absl::Mutex is not used: Debian's libabsl is built with deadlock
// detection on, which adds about 17 ns to every lock and makes creation and scope ends
// measurably slower. These wrappers add nothing at run time.

#ifndef SCOPEREG_INTERNAL_MUTEX_H_
#define SCOPEREG_INTERNAL_MUTEX_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <condition_variable>
#include <mutex>
#include <new>

#include "absl/base/thread_annotations.h"

namespace scopereg::internal {

// A pause between two attempts at a lock held by another thread (tells the CPU it spins).
inline void cpu_pause() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// A std::mutex the analysis knows about. Constant-initialised and trivially destructible,
// so a namespace-scope Mutex is usable during static initialisation and process exit.
class ABSL_LOCKABLE Mutex {
 public:
  constexpr Mutex() noexcept = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  // Uncontended: one try_lock. Held by another thread: a short spin before sleeping. The
  // critical sections scopereg takes are a few loads and stores, and glibc's default
  // mutex sleeps at once: two threads meeting on one shard paid two system calls
  // (futex wait and wake) for a wait of tens of nanoseconds.
  void lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() {
    if (mu_.try_lock()) [[likely]] return;
    lock_slow();
  }
  void unlock() ABSL_UNLOCK_FUNCTION() { mu_.unlock(); }

 private:
  friend class CondVar;
  [[gnu::noinline]] void lock_slow() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    for (int spin = 0; spin < 64; ++spin) {
      cpu_pause();
      if (mu_.try_lock()) return;
    }
    mu_.lock();
  }
  std::mutex mu_;
};

// Holds a mutex (Mutex, or another lockable of scopereg's) for its scope
// (std::lock_guard, annotated).
template <typename M>
class ABSL_SCOPED_LOCKABLE BasicMutexLock {
 public:
  explicit BasicMutexLock(M& mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) { mu_.lock(); }
  BasicMutexLock(const BasicMutexLock&) = delete;
  BasicMutexLock& operator=(const BasicMutexLock&) = delete;
  ~BasicMutexLock() ABSL_UNLOCK_FUNCTION() { mu_.unlock(); }

 private:
  M& mu_;
};
using MutexLock = BasicMutexLock<Mutex>;

// How many times this process has been the child of a fork() (incremented by fork.cc's
// child handler, before the child has a second thread).
ABSL_CONST_INIT extern std::atomic<std::uint32_t> g_fork_generation;

// A condition variable waited on with a held Mutex. Every member, notify included, is
// called with that mutex held.
//
// fork(): a child may inherit a condition variable that still counts waiters of threads
// that do not exist there (they were waiting when the parent forked); glibc can then block
// a notify for ever, waiting for those waiters to leave. So each CondVar is made anew at
// its first use in a child (under its mutex, before anyone in the child waits on it). Cost
// otherwise: one relaxed load and a compare per call.
class CondVar {
 public:
  // Atomically releases `mu`, waits for a notification (or a spurious wake-up), and
  // re-acquires `mu` before returning. Callers re-check their condition in a loop.
  void wait(Mutex& mu) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    renew_in_child();
    std::unique_lock<std::mutex> lock(mu.mu_, std::adopt_lock);
    cv_.wait(lock);
    lock.release();
  }
  // As wait(), giving up at `deadline`: returns false if it timed out.
  template <typename Clock, typename Duration>
  bool wait_until(Mutex& mu, const std::chrono::time_point<Clock, Duration>& deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    renew_in_child();
    std::unique_lock<std::mutex> lock(mu.mu_, std::adopt_lock);
    const bool woken = cv_.wait_until(lock, deadline) == std::cv_status::no_timeout;
    lock.release();
    return woken;
  }
  void notify_one() noexcept {
    renew_in_child();
    cv_.notify_one();
  }
  void notify_all() noexcept {
    renew_in_child();
    cv_.notify_all();
  }

 private:
  void renew_in_child() noexcept {
    const std::uint32_t generation = g_fork_generation.load(std::memory_order_relaxed);
    if (generation != generation_) [[unlikely]] {
      // Not destroyed first: glibc's destructor would wait for the dead waiters too.
      new (&cv_) std::condition_variable;
      generation_ = generation;
    }
  }

  std::condition_variable cv_;
  std::uint32_t generation_ = 0;  // of the fork this cv was made in (read under the mutex)
};

}  // namespace scopereg::internal

#endif  // SCOPEREG_INTERNAL_MUTEX_H_
