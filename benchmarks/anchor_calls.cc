#include "anchors.h"

namespace scopereg::bench {

namespace {
thread_local constinit int t_value = 1;
}

int* non_inlined_thread_local() { return &t_value; }

std::uint64_t non_inlined_token() { return 42; }

}  // namespace scopereg::bench
