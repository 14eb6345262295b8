// scopereg/internal/mutex.h -- not part of the public API.
//
// scopereg's own mutex and condition variable: one word each (futex-based on Linux),
// behind clang's thread-safety annotations, so that every "guarded by" in scopereg is
// checked by the compiler (-Wthread-safety) instead of being a comment.
//
// Why not std::mutex: a scope's life takes three uncontended lock pairs, and glibc's
// pthread_mutex_trylock/unlock (out of line, checking the mutex kind and lock elision)
// measured about 38% of it; an inline compare-and-swap and exchange cost a fraction of
// that. Why not absl::Mutex: Debian's libabsl is built with deadlock detection on, which
// adds about 17 ns to every lock.

#ifndef SCOPEREG_INTERNAL_MUTEX_H_
#define SCOPEREG_INTERNAL_MUTEX_H_

#include <atomic>
#include <chrono>
#include <cstdint>

#include "absl/base/thread_annotations.h"

namespace scopereg::internal {

// A pause between two attempts at a lock held by another thread (tells the CPU it spins).
inline void cpu_pause() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Sleeping on a word (registry/mutex.cc): futex(2) on Linux, C++20 atomic waits
// elsewhere. Every wait may also return spuriously; callers re-check in a loop.
// Returns when `word` no longer holds `expected`, or on a wake.
void wait_on_word(std::atomic<std::uint32_t>& word, std::uint32_t expected) noexcept;
// As wait_on_word(), giving up at `deadline`: returns false if the deadline has passed
// when it returns (whatever ended the wait).
bool wait_on_word_until(std::atomic<std::uint32_t>& word, std::uint32_t expected,
                        std::chrono::steady_clock::time_point deadline) noexcept;
// Wakes one, or every, thread sleeping on `word`. Harmless when none is.
void wake_one_on_word(std::atomic<std::uint32_t>& word) noexcept;
void wake_all_on_word(std::atomic<std::uint32_t>& word) noexcept;

// Mutex
//
// A one-word mutex (Drepper's three-state futex mutex: 0 free, 1 locked, 2 locked and
// maybe waited for). Uncontended: one inline compare-and-swap to lock, one exchange to
// unlock. Held by another thread: a short spin (scopereg's critical sections are a few
// loads and stores; sleeping at once paid two system calls for a wait of tens of
// nanoseconds), then a sleep on the word.
//
// Constant-initialised and trivially destructible, so a namespace-scope Mutex is usable
// during static initialisation and process exit. Not recursive. fork(): copied as it is;
// scopereg's fork handlers (fork.h) hold every scopereg lock across fork() and release it
// in the child.
class ABSL_LOCKABLE Mutex {
 public:
  constexpr Mutex() noexcept = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void lock() noexcept ABSL_EXCLUSIVE_LOCK_FUNCTION() {
    std::uint32_t expected = 0;
    if (word_.compare_exchange_strong(expected, 1, std::memory_order_acquire)) [[likely]] {
      return;
    }
    lock_slow();
  }
  void unlock() noexcept ABSL_UNLOCK_FUNCTION() {
    if (word_.exchange(0, std::memory_order_release) == 2) [[unlikely]] {
      wake_one_on_word(word_);
    }
  }

 private:
  [[gnu::noinline]] void lock_slow() noexcept;  // registry/mutex.cc
  std::atomic<std::uint32_t> word_{0};
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

// CondVar
//
// A condition variable waited on with a held Mutex. Every member, notify included, is
// called with that mutex held. A notification bumps a sequence word and wakes sleepers on
// it; a waiter reads the word before releasing the mutex, so no notification made after
// that is lost. Spurious wake-ups happen: callers re-check their condition in a loop.
// Cost of a notify with no waiter: one load and a compare (no system call).
//
// fork(): a child may inherit a count of waiters of threads that do not exist there (they
// were waiting when the parent forked). Nothing ever waits for them, but each notify
// would make a needless system call; so the count is reset at the CondVar's first use in
// a child (under its mutex, before anyone in the child waits on it).
class CondVar {
 public:
  constexpr CondVar() noexcept = default;
  CondVar(const CondVar&) = delete;
  CondVar& operator=(const CondVar&) = delete;

  // Atomically releases `mu`, waits for a notification (or a spurious wake-up), and
  // re-acquires `mu` before returning.
  void wait(Mutex& mu) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    const std::uint32_t seq = enter_wait();
    mu.unlock();
    wait_on_word(seq_, seq);
    mu.lock();
    --waiters_;
  }
  // As wait(), giving up at `deadline`: returns false if the deadline has passed
  // (std::condition_variable's meaning of a timeout).
  template <typename Duration>
  bool wait_until(Mutex& mu,
                  const std::chrono::time_point<std::chrono::steady_clock, Duration>& deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    const std::uint32_t seq = enter_wait();
    mu.unlock();
    const bool woken = wait_on_word_until(
        seq_, seq,
        std::chrono::time_point_cast<std::chrono::steady_clock::duration>(deadline));
    mu.lock();
    --waiters_;
    return woken;
  }
  void notify_one() noexcept {
    renew_in_child();
    if (waiters_ == 0) return;
    seq_.fetch_add(1, std::memory_order_relaxed);
    wake_one_on_word(seq_);
  }
  void notify_all() noexcept {
    renew_in_child();
    if (waiters_ == 0) return;
    seq_.fetch_add(1, std::memory_order_relaxed);
    wake_all_on_word(seq_);
  }

 private:
  std::uint32_t enter_wait() noexcept {
    renew_in_child();
    ++waiters_;
    return seq_.load(std::memory_order_relaxed);
  }
  void renew_in_child() noexcept {
    const std::uint32_t generation = g_fork_generation.load(std::memory_order_relaxed);
    if (generation != generation_) [[unlikely]] {
      waiters_ = 0;
      generation_ = generation;
    }
  }

  std::atomic<std::uint32_t> seq_{0};  // bumped by every notify that has a waiter
  std::uint32_t waiters_ = 0;          // threads between enter_wait() and relocking
  std::uint32_t generation_ = 0;       // fork generation the count belongs to
};

}  // namespace scopereg::internal

#endif  // SCOPEREG_INTERNAL_MUTEX_H_
