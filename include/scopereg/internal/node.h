// scopereg/internal/node.h -- not part of the public API.
//
// A registry value on the heap. Both backends store `NodeBase*`; values are built in place
// (T need not be copyable or movable) and never move, so a reference handed out stays
// valid until the node is destroyed.
//
// A node may be bound in several scopes at once (copy_context(), inheriting guards share
// values instead of copying them): it counts its bindings, and whoever removes the last
// one destroys it (`release`). A fresh node has one binding.
//
// A value type that declares `void on_scope_enter()` and `void on_scope_leave()` is
// "hooked": its node calls them when its scope becomes, or stops being, current on a
// thread (switch_hooks.h).

#ifndef SCOPEREG_INTERNAL_NODE_H_
#define SCOPEREG_INTERNAL_NODE_H_

#include <atomic>
#include <cstdint>
#include <utility>

namespace scopereg::internal {

struct NodeBase {
  explicit NodeBase(bool hooked = false) : hooked(hooked) {}
  NodeBase(const NodeBase&) = delete;
  NodeBase& operator=(const NodeBase&) = delete;
  virtual ~NodeBase() = default;
  // The value's on_scope_enter() / on_scope_leave(); only called when `hooked`.
  virtual void enter() {}
  virtual void leave() {}

  std::atomic<std::uint32_t> bindings{1};
  const bool hooked;
};

// One more scope binds `node`.
inline NodeBase* share(NodeBase* node) noexcept {
  node->bindings.fetch_add(1, std::memory_order_relaxed);
  return node;
}

// Drops one binding unless it is the last; returns whether it did. A scope that ends can
// drop a shared value's binding this way without queueing it for destruction.
inline bool release_if_shared(NodeBase* node) noexcept {
  std::uint32_t n = node->bindings.load(std::memory_order_relaxed);
  while (n > 1) {
    if (node->bindings.compare_exchange_weak(n, n - 1, std::memory_order_acq_rel,
                                             std::memory_order_relaxed)) {
      return true;
    }
  }
  return false;
}

// A scope stops binding `node` (null is ignored): the last binding destroys it, here.
inline void release(NodeBase* node) noexcept {
  if (node == nullptr) return;
  // The only binding is the caller's: no one else can take one (share() needs a binding
  // of one's own), so the count need not be written. Acquire: every other binding's
  // release happened before.
  if (node->bindings.load(std::memory_order_acquire) == 1 ||
      node->bindings.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    delete node;
  }
}

// Whether T has the switch hooks.
template <typename T>
concept HookedValue = requires(T& value) {
  value.on_scope_enter();
  value.on_scope_leave();
};

struct FromFactory {};
inline constexpr FromFactory kFromFactory{};

template <typename T>
struct Node final : NodeBase {
  template <typename... Args>
  explicit Node(std::in_place_t, Args&&... args)
      : NodeBase(HookedValue<T>), value(std::forward<Args>(args)...) {}
  template <typename F>
  Node(FromFactory, F& factory) : NodeBase(HookedValue<T>), value(factory()) {}
  void enter() override {
    if constexpr (HookedValue<T>) value.on_scope_enter();
  }
  void leave() override {
    if constexpr (HookedValue<T>) value.on_scope_leave();
  }
  T value;
};

template <typename T>
T& value_of(NodeBase* node) {
  return static_cast<Node<T>*>(node)->value;
}

}  // namespace scopereg::internal

#endif  // SCOPEREG_INTERNAL_NODE_H_
