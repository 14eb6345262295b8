// strategies.cc: the thread, fiber, explicit and coroutine dispatchers (see strategies.h).

#include "strategies.h"

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "scopereg/explicit_scope.h"
#include "scopereg/fiber_scope.h"

#ifdef SCOPEREG_EXAMPLE_HAVE_COROUTINE
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "scopereg/asio.h"
#include "scopereg/coroutine_scope.h"
#endif

namespace example {
namespace {

using Job = std::function<void()>;

// SQLite and the MariaDB client want more than the 64 KiB default.
constexpr std::size_t kFiberStack = 256 * 1024;

// A queue of jobs with a stop flag, shared by the workers that take from it.
class JobQueue {
 public:
  void push(Job job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      jobs_.push_back(std::move(job));
    }
    cv_.notify_one();
  }
  // Blocks for a job when `wait`; empty when stopped and drained (or none, without wait).
  Job pop(bool wait) {
    std::unique_lock<std::mutex> lock(mu_);
    if (wait) cv_.wait(lock, [this] { return stop_ || !jobs_.empty(); });
    if (jobs_.empty()) return {};
    Job job = std::move(jobs_.front());
    jobs_.pop_front();
    return job;
  }
  bool stopped() {
    std::lock_guard<std::mutex> lock(mu_);
    return stop_ && jobs_.empty();
  }
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> jobs_;
  bool stop_ = false;
};

// Worker threads running jobs from one queue.
class Workers {
 public:
  explicit Workers(int n) {
    for (int i = 0; i < n; ++i) {
      threads_.emplace_back([this] {
        while (Job job = queue_.pop(true)) job();
      });
    }
  }
  ~Workers() { join(); }
  void post(Job job) { queue_.push(std::move(job)); }
  void join() {
    queue_.stop();
    for (auto& t : threads_) {
      if (t.joinable()) t.join();
    }
  }

 private:
  JobQueue queue_;
  std::vector<std::thread> threads_;
};

// --strategy=thread
class ThreadDispatcher final : public Dispatcher {
 public:
  ThreadDispatcher(const StrategyOptions& o, Store& store) : service_(store), workers_(o.workers) {}
  void submit(HttpRequest request, std::function<void(HttpResponse)> done) override {
    workers_.post([this, request = std::move(request), done = std::move(done)] {
      done(service_.handle(request));  // this worker thread's scope; cleared at the end
    });
  }
  void shutdown() override { workers_.join(); }

 private:
  OrderService<scopereg::ThreadScope> service_;
  Workers workers_;  // after the service: joined before it is destroyed
};

// --strategy=fiber
class FiberDispatcher final : public Dispatcher {
 public:
  FiberDispatcher(const StrategyOptions& o, Store& store)
      : service_(store), fibers_per_thread_(o.fibers) {
    for (int i = 0; i < o.workers; ++i) threads_.emplace_back([this] { run(); });
  }
  ~FiberDispatcher() override { shutdown(); }
  void submit(HttpRequest request, std::function<void(HttpResponse)> done) override {
    queue_.push([this, request = std::move(request), done = std::move(done)] {
      done(service_.handle(request));  // this fiber's scope
    });
  }
  void shutdown() override {
    queue_.stop();
    for (auto& t : threads_) {
      if (t.joinable()) t.join();
    }
  }

 private:
  // One thread's scheduler, on the queue all threads share: resumes its unfinished fibers
  // round-robin and starts at most one new fiber per round (up to the limit), so that a
  // thread whose fibers do not yield (a blocking database call) does not take jobs an idle
  // thread could run; sleeps on the queue when it has no fiber.
  void run() {
    std::vector<scopereg::Fiber> fibers;
    for (;;) {
      if (static_cast<int>(fibers.size()) < fibers_per_thread_) {
        if (Job job = queue_.pop(fibers.empty())) {
          fibers.emplace_back(std::move(job), boost::context::fixedsize_stack(kFiberStack));
        }
      }
      if (fibers.empty()) {
        if (queue_.stopped()) return;
        continue;
      }
      for (auto& f : fibers) f.resume();
      std::erase_if(fibers, [](const scopereg::Fiber& f) { return f.done(); });
    }
  }

  OrderService<scopereg::FiberScope> service_;
  JobQueue queue_;
  const int fibers_per_thread_;
  std::vector<std::thread> threads_;
};

// --strategy=explicit
class ExplicitDispatcher final : public Dispatcher {
 public:
  ExplicitDispatcher(const StrategyOptions& o, Store& store)
      : service_(store), workers_(o.workers),
        executor_([this](std::function<void()> job) { workers_.post(std::move(job)); }) {}
  // Called on the event loop's thread.
  void submit(HttpRequest request, std::function<void(HttpResponse)> done) override {
    scopereg::ScopeGuard scope(++next_request_);  // the request's scope, entered here
    executor_.post([this, request = std::move(request), done = std::move(done)] {
      done(service_.handle(request));  // on a worker, in the request's scope
    });
  }  // the guard leaves; the scope lives on in the wrapped job, and ends with it
  void shutdown() override { workers_.join(); }

 private:
  OrderService<scopereg::ExplicitScope> service_;
  Workers workers_;
  scopereg::ScopedExecutor<std::function<void(std::function<void()>)>> executor_;
  std::uint64_t next_request_ = 0;
};

#ifdef SCOPEREG_EXAMPLE_HAVE_COROUTINE
// --strategy=coroutine
//
// Each request is a plain boost::asio::awaitable started by scopereg::asio::co_spawn on a
// boost::asio::thread_pool of --workers threads, in a fresh task scope of its own
// (scopereg::fresh_scope: the server's connection coroutine that awaits it has no scope,
// and the request inherits nothing). Its database work goes through an
// OrderService<CoroutineScope>; the unit of work is ended by the task's teardown,
// scopereg::asio::teardown_of(sessions): after the coroutine finished, in the task's scope,
// it tells the session teardown hook success or failure (rolling back) and checks the
// connection back into the pool -- before the response reaches the connection.
//
// Why CoroutineScope, not ExplicitScope: inside a task both name the task's scope (no
// ScopeGuard is entered in it), so OrderService<ExplicitScope> would work too; but
// CoroutineScope names only a task's scope -- a session asked for outside any task (a
// handler resumed off the TaskExecutor) throws ScopeError instead of silently landing in
// whatever explicit scope that thread has -- and a ScopeGuard entered inside the task
// would not change which session it gets.
//
// Blocking: a task calls SQLite or the MariaDB client synchronously, on its pool thread
// (a busy SQLite sleeps a little, as the thread strategy does). That is acceptable for
// these client calls: they wait for the database, never for work queued on this pool. A
// task never suspends between its first session get() and its teardown, so each pool
// thread holds at most one pooled connection: --workers connections suffice, and a task
// waiting in the pool's checkout waits for another thread's task, never for one suspended
// on its own thread.
class CoroutineTaskDispatcher final : public CoroutineDispatcher {
 private:  // first: spawn()'s return type is deduced, and run() and submit() use it
  // A task whose unit of work failed ends by this exception, so that teardown_of rolls
  // back; it carries what the request is answered.
  struct UnitOfWorkFailed : std::exception {
    explicit UnitOfWorkFailed(HttpResponse r) : response(std::move(r)) {}
    const char* what() const noexcept override { return "the request's unit of work failed"; }
    HttpResponse response;
  };

  static HttpResponse response_of(std::exception_ptr error) {
    try {
      std::rethrow_exception(error);
    } catch (const UnitOfWorkFailed& failed) {
      return failed.response;
    } catch (const std::exception& e) {  // not reached: the service answers its failures
      return json_error(500, e.what());
    }
  }

  template <typename Token>
  auto spawn(HttpRequest request, Token&& token) {
    return scopereg::asio::co_spawn(pool_.get_executor(), task(std::move(request)),
                                    scopereg::fresh_scope,
                                    scopereg::asio::teardown_of(service_.sessions()),
                                    std::forward<Token>(token));
  }

  // The request's task: on a pool thread, in its own scope (CoroutineScope::current() is
  // its token); the sessions it uses stay open until the teardown.
  boost::asio::awaitable<HttpResponse> task(HttpRequest request) {
    OrderService<scopereg::CoroutineScope>::Outcome outcome = service_.handle_open(request);
    if (outcome.failed) throw UnitOfWorkFailed(std::move(outcome.response));
    co_return std::move(outcome.response);
  }

 public:
  CoroutineTaskDispatcher(const StrategyOptions& o, Store& store)
      : service_(store), pool_(static_cast<std::size_t>(o.workers)) {}
  ~CoroutineTaskDispatcher() override { shutdown(); }

  // On the server's connection coroutine: starts the request's task on the pool and
  // awaits it without blocking the event loop.
  boost::asio::awaitable<HttpResponse> run(HttpRequest request) override {
    std::exception_ptr error;
    try {
      co_return co_await spawn(std::move(request), boost::asio::use_awaitable);
    } catch (...) {
      error = std::current_exception();
    }
    co_return response_of(error);
  }

  // The same task with a callback (for callers that are not coroutines): `done` runs on
  // the pool thread, in the task's scope, after the teardown.
  void submit(HttpRequest request, std::function<void(HttpResponse)> done) override {
    spawn(std::move(request),
          [done = std::move(done)](std::exception_ptr error, HttpResponse response) {
            done(error ? response_of(error) : std::move(response));
          });
  }

  // Finishes every task started (their completions go to whoever awaits them), then joins
  // the pool's threads. Not from a pool thread.
  void shutdown() override { pool_.join(); }


 private:
  OrderService<scopereg::CoroutineScope> service_;
  boost::asio::thread_pool pool_;  // after the service: joined before it is destroyed
};
#endif

}  // namespace

std::size_t concurrency(const StrategyOptions& o) {
  return static_cast<std::size_t>(o.workers) * (o.name == "fiber" ? o.fibers : 1);
}

std::function<void()> backoff_for(const StrategyOptions& o) {
  if (o.name == "fiber") {
    // A fiber yields to the others of its thread; once per round of them, the thread also
    // sleeps a little, so that fibers all waiting for the lock do not starve its holder
    // (on another thread) of the CPU.
    return [fibers = o.fibers] {
      if (scopereg::getcurrent().kind() != scopereg::ScopeKind::kFiber) {
        std::this_thread::sleep_for(std::chrono::microseconds(50));
        return;
      }
      thread_local int waits = 0;  // this dispatcher's fibers never change threads
      if (++waits % fibers == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
      scopereg::Fiber::yield();
    };
  }
  return [] { std::this_thread::sleep_for(std::chrono::microseconds(50)); };
}

std::string strategy_names() {
#ifdef SCOPEREG_EXAMPLE_HAVE_COROUTINE
  return "thread, fiber, explicit or coroutine";
#else
  return "thread, fiber or explicit";
#endif
}

std::unique_ptr<Dispatcher> make_dispatcher(const StrategyOptions& o, Store& store) {
  if (o.name == "thread") return std::make_unique<ThreadDispatcher>(o, store);
  if (o.name == "fiber") return std::make_unique<FiberDispatcher>(o, store);
  if (o.name == "explicit") return std::make_unique<ExplicitDispatcher>(o, store);
#ifdef SCOPEREG_EXAMPLE_HAVE_COROUTINE
  if (o.name == "coroutine") return std::make_unique<CoroutineTaskDispatcher>(o, store);
#else
  if (o.name == "coroutine") {
    throw std::invalid_argument(
        "--strategy=coroutine: this build has no scopereg::asio (Boost.Asio's awaitable.hpp "
        "was not found at configure time); use thread, fiber or explicit");
  }
#endif
  throw std::invalid_argument("--strategy=" + o.name + ": use " + strategy_names());
}

}  // namespace example
