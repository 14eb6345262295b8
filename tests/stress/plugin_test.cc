// Plugins (CTest label "stress"): a shared library using scopereg is loaded with dlopen,
// used from several threads, and unloaded with dlclose while those threads still hold
// values; then the threads exit. Both link modes: scopereg linked statically into the
// plugin, and scopereg as a shared library of its own. Every value must be destroyed
// exactly once, nothing may crash, and the plugin must really be unmapped at the end.
// docs/fork-and-plugins.md says what a plugin author must do.

#include <dlfcn.h>

#include <atomic>
#include <cstdlib>
#include <latch>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/lsan_interface.h>
#define SCOPEREG_TEST_LSAN 1
#endif

namespace {

using InitFn = void (*)(std::atomic<int>*, std::atomic<int>*);
using UseFn = void (*)(int);

constexpr int kThreads = 4;
constexpr int kValuesPerThread = 4;  // thread, session, explicit scope, fiber

long rounds() {
  const char* env = std::getenv("SCOPEREG_STRESS_SCALE");
  const long s = env != nullptr ? std::atol(env) : 1;
  return 20 * (s > 0 ? s : 1);
}

// With scopereg linked statically into the plugin, the threads that used it registered
// thread_local destructors in the plugin's code, so glibc keeps the plugin loaded (and its
// globals alive) until those threads have exited: dlclose is deferred, not refused. The
// threads' own values are destroyed at their exit by the plugin's still-mapped code; the
// rest when the plugin is finally unloaded (here: the next dlclose after they exited).
// With scopereg as a shared library, the plugin is unloaded by dlclose at once.
// A plugin with scopereg linked in statically carries its own copy of scopereg's
// process-wide state, which is never destroyed (threads may exit after static
// destruction): each unload of such a plugin leaks it (about 3.5 KB; documented in
// docs/fork-and-plugins.md). LeakSanitizer is told to ignore what that copy allocates.
struct IgnoreLeaksOfStaticCopy {
  explicit IgnoreLeaksOfStaticCopy(bool on) : on(on) {
#ifdef SCOPEREG_TEST_LSAN
    if (on) __lsan_disable();
#endif
  }
  ~IgnoreLeaksOfStaticCopy() {
#ifdef SCOPEREG_TEST_LSAN
    if (on) __lsan_enable();
#endif
  }
  bool on;
};

void load_use_unload(const char* path, int round, bool deferred_by_glibc) {
  IgnoreLeaksOfStaticCopy ignore(deferred_by_glibc);
  std::atomic<int> made{0}, destroyed{0};
  void* plugin = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  ASSERT_NE(plugin, nullptr) << dlerror();
  auto init = reinterpret_cast<InitFn>(dlsym(plugin, "plugin_init"));
  auto use = reinterpret_cast<UseFn>(dlsym(plugin, "plugin_use"));
  ASSERT_NE(init, nullptr);
  ASSERT_NE(use, nullptr);
  init(&made, &destroyed);

  std::latch used(kThreads);
  std::atomic<bool> leave{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
#ifdef SCOPEREG_TEST_LSAN
      // Until this thread's end: its thread_local destructors, in the plugin's copy of
      // scopereg, still allocate that copy's never-destroyed state.
      if (deferred_by_glibc) __lsan_disable();
#endif
      use(round * 100 + t);
      used.count_down();
      while (!leave) std::this_thread::yield();  // holding its values, in host code
    });
  }
  used.wait();
  EXPECT_EQ(made.load(), kThreads * kValuesPerThread);
  EXPECT_EQ(destroyed.load(), 0);

  ASSERT_EQ(dlclose(plugin), 0) << dlerror();
  if (!deferred_by_glibc) {
    // The plugin's globals are gone, and with them every value, also those of threads
    // that are still running.
    EXPECT_EQ(destroyed.load(), made.load());
  } else {
    EXPECT_EQ(destroyed.load(), 0);
  }

  leave = true;
  for (auto& t : threads) t.join();  // thread exit
  if (deferred_by_glibc) {
    // The threads' own values (thread and session) died with them; the plugin is still
    // loaded until the next dlclose.
    EXPECT_EQ(destroyed.load(), kThreads * 2);
    void* again = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    ASSERT_NE(again, nullptr);
    ASSERT_EQ(dlclose(again), 0) << dlerror();
  }
  EXPECT_EQ(destroyed.load(), made.load()) << "a value was lost or destroyed twice";
  // The plugin is unmapped for real.
  void* still = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
  EXPECT_EQ(still, nullptr) << path << " is still mapped";
  if (still != nullptr) dlclose(still);
}

TEST(Plugin, UnloadedWhileThreadsHoldValuesWithScoperegLinkedStatically) {
  for (long r = 0; r < rounds(); ++r) load_use_unload(SCOPEREG_PLUGIN_STATIC, static_cast<int>(r), true);
}

TEST(Plugin, UnloadedWhileThreadsHoldValuesWithScoperegAsASharedLibrary) {
  for (long r = 0; r < rounds(); ++r) load_use_unload(SCOPEREG_PLUGIN_SHARED, static_cast<int>(r), false);
}

}  // namespace
