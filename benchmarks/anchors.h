// Anchor baselines the benchmarks compare scopereg with, kept in their own .cc files so
// that the "non-inlined" ones really are calls into another translation unit.
#ifndef SCOPEREG_BENCHMARKS_ANCHORS_H_
#define SCOPEREG_BENCHMARKS_ANCHORS_H_

#include <cstdint>

namespace scopereg::bench {

// Reads a constant-initialised thread_local int through a call the compiler cannot inline.
int* non_inlined_thread_local();

// Returns a token through an out-of-line function, as a ScopeFunc's target would be.
std::uint64_t non_inlined_token();

}  // namespace scopereg::bench

#endif  // SCOPEREG_BENCHMARKS_ANCHORS_H_
