// Test helper: a value type that counts its constructions and destructions.
#ifndef SCOPEREG_TESTS_COUNTED_H_
#define SCOPEREG_TESTS_COUNTED_H_

#include <atomic>
#include <thread>

namespace scopereg::testing {

struct Counts {
  std::atomic<int> made{0};
  std::atomic<int> destroyed{0};
  int alive() const { return made.load() - destroyed.load(); }
};

// Neither copyable nor movable, on purpose: the registry must build it in place.
class Counted {
 public:
  explicit Counted(Counts& counts, int id = 0) : counts_(counts), id_(id) { ++counts_.made; }
  Counted(const Counted&) = delete;
  Counted& operator=(const Counted&) = delete;
  ~Counted() { ++counts_.destroyed; }
  int id() const { return id_; }
  std::thread::id creator() const { return creator_; }

 private:
  Counts& counts_;
  int id_;
  std::thread::id creator_ = std::this_thread::get_id();
};

}  // namespace scopereg::testing

#endif  // SCOPEREG_TESTS_COUNTED_H_
