#include "scopereg/func_scope.h"

#include "scopereg/error.h"

namespace scopereg {

template class FuncScopeOf<ScopeToken>;

namespace internal {

void throw_empty_scope_func() {
  throw ScopeError(
      "scopereg: FuncScope needs a scope function; got an empty one. Pass a callable "
      "returning the current token, e.g. ThreadScope::func()");
}

}  // namespace internal
}  // namespace scopereg
