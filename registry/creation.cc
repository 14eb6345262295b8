#include "scopereg/internal/creation.h"

#include <atomic>
#include <exception>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <string>
#include <string_view>

#include "scopereg/error.h"

namespace scopereg::internal {

void throw_factory_reentered(const char* registry) {
  throw ScopeError(std::string("scopereg: the factory of ") + registry +
                   " re-entered the same registry in the same scope before returning; a "
                   "factory must not use the value it is creating");
}

void throw_set_inside_factory(const char* registry) {
  throw ScopeError(std::string("scopereg: set() or clear() of ") + registry +
                   " was called from inside the factory creating its value in the same "
                   "scope; a factory must not replace or clear the value it is creating");
}

void throw_scope_ending(bool set) {
  throw ScopeError(set ? "scopereg: cannot set a value in a scope that is ending"
                       : "scopereg: cannot create a value in a scope that is ending (a "
                         "value's destructor kept creating values in its own dying scope)");
}

void throw_no_scope(const char* strategy) {
  throw ScopeError(std::string("scopereg: no active scope for ") + strategy +
                   ": enter one first (for ExplicitScope, hold a ScopeGuard; for "
                   "CoroutineScope, call from a coroutine with a TaskScope, e.g. one "
                   "started by scopereg::asio::co_spawn; for a ScopeFunc, return a "
                   "non-null token), or use find(), which "
                   "returns null instead of creating");
}

void die_of_misuse(const char* what) noexcept {
  std::fprintf(stderr, "scopereg: fatal misuse: %s\n", what);
  std::abort();
}

namespace {
constinit std::atomic<void (*)()> g_unwinding_check{nullptr};
}  // namespace

void rethrow_if_unwinding() {
  if (auto check = g_unwinding_check.load(std::memory_order_acquire)) check();
}

void set_unwinding_check(void (*check)()) noexcept {
  g_unwinding_check.store(check, std::memory_order_release);
}

namespace {
constinit std::atomic<bool (*)() noexcept> g_can_yield{nullptr};
constinit std::atomic<void (*)()> g_yield{nullptr};
}  // namespace

bool can_yield() noexcept {
  auto can = g_can_yield.load(std::memory_order_acquire);
  return can != nullptr && can();
}

void yield_now() {
  if (auto yield = g_yield.load(std::memory_order_acquire)) yield();
}

void set_yield_hooks(bool (*can)() noexcept, void (*yield)()) noexcept {
  g_yield.store(yield, std::memory_order_release);
  g_can_yield.store(can, std::memory_order_release);
}

std::string describe_current_exception() {
  try {
    throw;
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "unknown exception (not derived from std::exception)";
  }
}

void report_to(const std::function<void(const absl::Status&)>& reporter,
               const absl::Status& status) {
  try {
    if (reporter) {
      reporter(status);
      return;
    }
  } catch (...) {
    rethrow_if_unwinding();
  }
  report_to_stderr(status);
}

void report_without_memory(std::string_view context, std::string_view what,
                           std::string_view more) noexcept {
  // "close failed: " reads "close failed" here: the description it led to is missing.
  std::string_view& last = more.empty() ? what : more;
  while (!last.empty() && (last.back() == ' ' || last.back() == ':')) last.remove_suffix(1);
  std::fprintf(stderr,
               "scopereg: %.*s: %.*s%.*s (out of memory: the error could not be described)\n",
               static_cast<int>(context.size()), context.data(), static_cast<int>(what.size()),
               what.data(), static_cast<int>(more.size()), more.data());
}

void describe_current_exception_to(std::string* out) noexcept {
  try {
    *out = describe_current_exception();
  } catch (const std::bad_alloc&) {
    try {
      // Short enough for any std::string's inline buffer (10 characters and more): no
      // allocation, except with a copy-on-write string (libstdc++'s old ABI), where it
      // may fail too and `out` is left as it was.
      out->assign("no memory");
    } catch (const std::bad_alloc&) {
    }
  }
}

void report_to_stderr(const absl::Status& status) {
  std::fprintf(stderr, "scopereg: %s\n", status.ToString().c_str());
}

}  // namespace scopereg::internal
