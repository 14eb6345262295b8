// scopereg/internal/node.h -- not part of the public API.
//
// A registry value on the heap. Both backends store `NodeBase*`; deleting one destroys the
// value. Values are built in place (T need not be copyable or movable) and never move, so a
// reference handed out stays valid until the node is deleted.

#ifndef SCOPEREG_INTERNAL_NODE_H_
#define SCOPEREG_INTERNAL_NODE_H_

#include <utility>

namespace scopereg::internal {

struct NodeBase {
  virtual ~NodeBase() = default;
};

struct FromFactory {};
inline constexpr FromFactory kFromFactory{};

template <typename T>
struct Node final : NodeBase {
  template <typename... Args>
  explicit Node(std::in_place_t, Args&&... args) : value(std::forward<Args>(args)...) {}
  template <typename F>
  Node(FromFactory, F& factory) : value(factory()) {}
  T value;
};

template <typename T>
T& value_of(NodeBase* node) {
  return static_cast<Node<T>*>(node)->value;
}

}  // namespace scopereg::internal

#endif  // SCOPEREG_INTERNAL_NODE_H_
