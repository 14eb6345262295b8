// Pool<T> beside its anchor, the obvious pool, in one binary and run.
//
//   BM_Pool_CheckoutCheckin   scopereg Pool<int> (pool_size 4): checkout() of an idle
//                             object, then its return (the Lease's destructor)
//   BM_Pool_MutexDeque        anchor: std::mutex + std::deque<std::unique_ptr<int>> +
//                             std::condition_variable; checkout pops or creates, checkin
//                             pushes and notifies
//
// At 2 threads both threads share the one pool (each holds at most one of its 4 objects,
// so nobody waits): the per-thread cost then includes the contended lock.
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <memory>
#include <mutex>

#include "benchmark/benchmark.h"
#include "scopereg/pool.h"

namespace scopereg::bench {
namespace {

Pool<int>& pool() {
  static auto* p = new Pool<int>(PoolOptions<int>{.connect = [] { return 1; }, .pool_size = 4});
  return *p;
}

void BM_Pool_CheckoutCheckin(benchmark::State& state) {
  Pool<int>& p = pool();
  p.checkout().release();  // one idle object at least: the loop measures reuse
  for (auto _ : state) {
    Pool<int>::Lease lease = p.checkout();
    benchmark::DoNotOptimize(*lease);
  }
}
BENCHMARK(BM_Pool_CheckoutCheckin)->Threads(1)->Threads(2);

// The pool anyone would write first.
class MutexDequePool {
 public:
  explicit MutexDequePool(std::size_t limit) : limit_(limit) {}

  std::unique_ptr<int> checkout() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (!idle_.empty()) {
        std::unique_ptr<int> object = std::move(idle_.back());
        idle_.pop_back();
        return object;
      }
      if (total_ < limit_) {
        ++total_;
        lock.unlock();
        return std::make_unique<int>(1);
      }
      cv_.wait(lock);
    }
  }

  void checkin(std::unique_ptr<int> object) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      idle_.push_back(std::move(object));
    }
    cv_.notify_one();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<int>> idle_;
  std::size_t total_ = 0;
  const std::size_t limit_;
};

MutexDequePool& anchor_pool() {
  static auto* p = new MutexDequePool(4);
  return *p;
}

void BM_Pool_MutexDeque(benchmark::State& state) {
  MutexDequePool& p = anchor_pool();
  p.checkin(p.checkout());
  for (auto _ : state) {
    std::unique_ptr<int> object = p.checkout();
    benchmark::DoNotOptimize(*object);
    p.checkin(std::move(object));
  }
}
BENCHMARK(BM_Pool_MutexDeque)->Threads(1)->Threads(2);

}  // namespace
}  // namespace scopereg::bench

BENCHMARK_MAIN();
