#include "scopereg/scope.h"

#include <atomic>

namespace scopereg {

namespace internal {
namespace {
char kScopeTokenTag = 0;  // writable: never folded with other data (token_ref.h)
}  // namespace

template <>
const void* token_type_tag<ScopeToken>() noexcept {
  return &kScopeTokenTag;
}
}  // namespace internal

namespace {
constinit std::atomic<std::uint64_t> g_next_serial{1};
constinit std::atomic<std::uint32_t> g_next_kind{64};
}  // namespace

void end_scope(ScopeToken token) {
  if (token.is_null()) return;
  internal::end_scope_everywhere(internal::TokenRef::of(token));
}

ScopeKind new_scope_kind() noexcept {
  return static_cast<ScopeKind>(g_next_kind.fetch_add(1, std::memory_order_relaxed));
}

ScopeToken new_scope_token(ScopeKind kind) noexcept {
  // Serials come to each thread in blocks: minting one writes no shared cache line.
  constexpr std::uint64_t kBlock = 1024;
  thread_local constinit std::uint64_t next = 0;
  thread_local constinit std::uint64_t end = 0;
  if (next == end) [[unlikely]] {
    next = g_next_serial.fetch_add(kBlock, std::memory_order_relaxed);
    end = next + kBlock;
  }
  return ScopeToken(next++, kind);
}

}  // namespace scopereg
