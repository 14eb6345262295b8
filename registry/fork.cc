#include "scopereg/internal/fork.h"

#include <pthread.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>

#include "scopereg/internal/registry_record.h"

namespace scopereg::internal {

struct ForkList {
  std::mutex mu;
  ForkSafeMutex* head = nullptr;  // guarded by mu

  static ForkList& get() {
    static ForkList* const list = new ForkList;  // never destroyed, on purpose
    return *list;
  }
  static void lock_all() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    for (ForkSafeMutex* m = get().head; m != nullptr; m = m->next_) m->lock();
  }
  static void unlock_all() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    for (ForkSafeMutex* m = get().head; m != nullptr; m = m->next_) m->unlock();
  }
  // In the child: mutexes that lived on the stacks of threads that are gone.
  static void forget_dead() {
    ForkList& list = get();
    for (ForkSafeMutex* m = list.head; m != nullptr;) {
      ForkSafeMutex* next = m->next_;
      if (on_dead_stack(m->stack_owner_)) {
        if (m->prev_ != nullptr) m->prev_->next_ = next; else list.head = next;
        if (next != nullptr) next->prev_ = m->prev_;
      }
      m = next;
    }
  }
};

namespace {
constinit std::atomic<std::uint64_t> g_next_thread_serial{1};
thread_local constinit std::uint64_t t_thread_serial = 0;
thread_local constinit std::uintptr_t t_stack_lo = 0;
thread_local constinit std::uintptr_t t_stack_hi = 0;
constinit std::uint64_t g_forking_thread = 0;  // in a child: the thread that forked
}  // namespace

constinit std::atomic<std::uint32_t> g_fork_generation{0};

std::uint64_t current_thread_serial() noexcept {
  if (t_thread_serial == 0) t_thread_serial = g_next_thread_serial.fetch_add(1);
  return t_thread_serial;
}

std::uint64_t stack_owner(const void* object) noexcept {
  if (t_stack_hi == 0) {
    pthread_attr_t attr;
    void* lo = nullptr;
    std::size_t size = 0;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
      pthread_attr_getstack(&attr, &lo, &size);
      pthread_attr_destroy(&attr);
    }
    t_stack_lo = reinterpret_cast<std::uintptr_t>(lo);
    t_stack_hi = t_stack_lo + size;
    if (t_stack_hi == 0) t_stack_hi = 1;  // unknown: never "on our stack"
  }
  const auto p = reinterpret_cast<std::uintptr_t>(object);
  return p >= t_stack_lo && p < t_stack_hi ? current_thread_serial() : 0;
}

bool on_dead_stack(std::uint64_t owner) noexcept {
  return owner != 0 && owner != g_forking_thread;
}

bool thread_gone_in_child(std::uint64_t serial) noexcept { return serial != g_forking_thread; }

ForkSafeMutex::ForkSafeMutex() {
  install_fork_handlers();
  ForkList& list = ForkList::get();
  std::lock_guard<std::mutex> lock(list.mu);
  next_ = list.head;
  if (list.head != nullptr) list.head->prev_ = this;
  list.head = this;
}

ForkSafeMutex::~ForkSafeMutex() {
  ForkList& list = ForkList::get();
  std::lock_guard<std::mutex> lock(list.mu);
  if (prev_ != nullptr) prev_->next_ = next_; else list.head = next_;
  if (next_ != nullptr) next_->prev_ = prev_;
}

namespace {

void prepare() ABSL_NO_THREAD_SAFETY_ANALYSIS {
  g_forking_thread = current_thread_serial();
  ForkList& list = ForkList::get();
  list.mu.lock();
  lock_explicit_table_for_fork();
  g_process_mutex.lock();
  lock_scopes_for_fork();
  lock_bindings_for_fork();
  lock_subscribers_for_fork();
  ForkList::lock_all();
}

void release() ABSL_NO_THREAD_SAFETY_ANALYSIS {
  ForkList& list = ForkList::get();
  ForkList::unlock_all();
  unlock_subscribers_after_fork();
  unlock_bindings_after_fork();
  unlock_scopes_after_fork();
  g_process_mutex.unlock();
  unlock_explicit_table_after_fork();
  list.mu.unlock();
}

void in_parent() { release(); }

void in_child() {
  g_fork_generation.fetch_add(1, std::memory_order_relaxed);  // condition variables renew
  release();
  ForkList::forget_dead();
  forget_dead_records_in_child();
  abandon_other_threads_in_child();
}

}  // namespace

void install_fork_handlers() noexcept {
  static const bool installed = [] {
    if (pthread_atfork(&prepare, &in_parent, &in_child) != 0) std::abort();
    return true;
  }();
  (void)installed;
}

}  // namespace scopereg::internal
