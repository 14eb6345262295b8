#include "scopereg/session_cache.h"

#include <cstdio>
#include <exception>
#include <string>

namespace scopereg::internal {

std::string describe_current_exception() {
  try {
    throw;
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "unknown exception (not derived from std::exception)";
  }
}

void report_to_stderr(const absl::Status& status) {
  std::fprintf(stderr, "scopereg: %s\n", status.ToString().c_str());
}

}  // namespace scopereg::internal
