// scopereg/internal/sanitizers.h -- not part of the public API.
//
// The one place that detects sanitizer builds (g++ defines __SANITIZE_*__, clang answers
// __has_feature). Code that must announce stack switches or keep a switch out of
// instrumentation tests these macros and nothing else:
//   SCOPEREG_ASAN, SCOPEREG_TSAN   defined (as 1) in AddressSanitizer / ThreadSanitizer builds
//   SCOPEREG_NO_TSAN               attribute: do not instrument this function under TSan

#ifndef SCOPEREG_INTERNAL_SANITIZERS_H_
#define SCOPEREG_INTERNAL_SANITIZERS_H_

#if defined(__SANITIZE_ADDRESS__)
#define SCOPEREG_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SCOPEREG_ASAN 1
#endif
#endif

#if defined(__SANITIZE_THREAD__)
#define SCOPEREG_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SCOPEREG_TSAN 1
#endif
#endif

#if defined(SCOPEREG_TSAN) && defined(__clang__)
#define SCOPEREG_NO_TSAN __attribute__((no_sanitize("thread")))
#elif defined(SCOPEREG_TSAN)
#define SCOPEREG_NO_TSAN __attribute__((no_sanitize_thread))
#else
#define SCOPEREG_NO_TSAN
#endif

#endif  // SCOPEREG_INTERNAL_SANITIZERS_H_
