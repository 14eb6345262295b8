#include "scopereg/internal/mutex.h"

#include <algorithm>
#include <climits>
#include <thread>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#endif

namespace scopereg::internal {

void Mutex::lock_slow() noexcept {
  for (int spin = 0; spin < 64; ++spin) {
    std::uint32_t expected = 0;
    if (word_.load(std::memory_order_relaxed) == 0 &&
        word_.compare_exchange_weak(expected, 1, std::memory_order_acquire)) {
      return;
    }
    cpu_pause();
  }
  // 2: locked, and someone may be waiting (unlock() then wakes one). Once a thread has
  // slept it keeps the word at 2 when it takes the lock, so the next unlock wakes the
  // next sleeper.
  while (word_.exchange(2, std::memory_order_acquire) != 0) wait_on_word(word_, 2);
}

#if defined(__linux__)

namespace {
long futex(std::atomic<std::uint32_t>& word, int op, std::uint32_t value,
           const struct timespec* timeout) noexcept {
  static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t));
#if !defined(__LP64__) && defined(SYS_futex_time64) && !defined(SYS_futex)
  constexpr long kFutex = SYS_futex_time64;
#elif !defined(__LP64__) && defined(SYS_futex_time64)
  // A 32-bit target: its struct timespec may have a 64-bit time_t, which only
  // futex_time64 reads (the timeout is used by waits with a deadline alone).
  constexpr long kFutex = sizeof(time_t) == 8 ? SYS_futex_time64 : SYS_futex;
#else
  constexpr long kFutex = SYS_futex;
#endif
  return syscall(kFutex, reinterpret_cast<std::uint32_t*>(&word), op, value, timeout,
                 nullptr, FUTEX_BITSET_MATCH_ANY);
}
}  // namespace

void wait_on_word(std::atomic<std::uint32_t>& word, std::uint32_t expected) noexcept {
  futex(word, FUTEX_WAIT_PRIVATE, expected, nullptr);  // EAGAIN, EINTR: the caller loops
}

bool wait_on_word_until(std::atomic<std::uint32_t>& word, std::uint32_t expected,
                        std::chrono::steady_clock::time_point deadline) noexcept {
  // libstdc++'s steady_clock is CLOCK_MONOTONIC, the clock FUTEX_WAIT_BITSET measures an
  // absolute timeout against.
  const auto since_epoch = deadline.time_since_epoch();
  if (since_epoch <= std::chrono::steady_clock::duration::zero()) return false;
  const auto secs = std::chrono::duration_cast<std::chrono::seconds>(since_epoch);
  struct timespec at;
  at.tv_sec = static_cast<time_t>(std::min<std::chrono::seconds::rep>(
      secs.count(), std::chrono::seconds::rep{LONG_MAX}));
  at.tv_nsec = static_cast<long>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(since_epoch - secs).count());
  futex(word, FUTEX_WAIT_BITSET_PRIVATE, expected, &at);  // woken, EAGAIN, EINTR, ETIMEDOUT
  // As std::condition_variable::wait_until: timed out when the deadline has passed, however
  // the wait ended.
  return std::chrono::steady_clock::now() < deadline;
}

void wake_one_on_word(std::atomic<std::uint32_t>& word) noexcept {
  futex(word, FUTEX_WAKE_PRIVATE, 1, nullptr);
}

void wake_all_on_word(std::atomic<std::uint32_t>& word) noexcept {
  futex(word, FUTEX_WAKE_PRIVATE, INT_MAX, nullptr);
}

#else  // C++20 atomic waits; a timed wait polls (they have no timeout).

void wait_on_word(std::atomic<std::uint32_t>& word, std::uint32_t expected) noexcept {
  word.wait(expected, std::memory_order_relaxed);
}

bool wait_on_word_until(std::atomic<std::uint32_t>& word, std::uint32_t expected,
                        std::chrono::steady_clock::time_point deadline) noexcept {
  while (word.load(std::memory_order_relaxed) == expected) {
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) return false;
    std::this_thread::sleep_for(
        std::min<std::chrono::steady_clock::duration>(deadline - now,
                                                      std::chrono::microseconds(200)));
  }
  return true;
}

void wake_one_on_word(std::atomic<std::uint32_t>& word) noexcept { word.notify_one(); }
void wake_all_on_word(std::atomic<std::uint32_t>& word) noexcept { word.notify_all(); }

#endif

}  // namespace scopereg::internal
