#include "scopereg/internal/creation.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "scopereg/error.h"

namespace scopereg::internal {

void throw_factory_reentered() {
  throw ScopeError(
      "scopereg: a registry's factory re-entered the same registry in the same scope "
      "before returning; a factory must not use the value it is creating");
}

void throw_set_inside_factory() {
  throw ScopeError(
      "scopereg: set() or clear() was called from inside the factory creating the same "
      "registry's value in the same scope; a factory must not replace or clear the value "
      "it is creating");
}

void throw_scope_ending(bool set) {
  throw ScopeError(set ? "scopereg: cannot set a value in a scope that is ending"
                       : "scopereg: cannot create a value in a scope that is ending (a "
                         "value's destructor kept creating values in its own dying scope)");
}

void throw_no_scope(const char* strategy) {
  throw ScopeError(std::string("scopereg: no active scope for ") + strategy +
                   ": enter one first (for ExplicitScope, hold a ScopeGuard; for a "
                   "ScopeFunc, return a non-null token), or use find(), which "
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

}  // namespace scopereg::internal
