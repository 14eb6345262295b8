#include "scopereg/fiber_scope.h"

namespace scopereg {

ScopeFunc FiberScope::func() {
  return [] { return getcurrent(); };
}

}  // namespace scopereg
