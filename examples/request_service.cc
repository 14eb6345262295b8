// request_service: scopereg's main job. Processes a stream of simulated requests against
// two SQLite databases (orders and audit), each request in a transaction through per-scope
// sessions from a SessionCache whose connections come from one scopereg::Pool per
// database (checked out on a request's first use, checked back in at its end), with one of
// three strategies:
//
//   --strategy=thread    a pool of worker threads, one connection per thread
//   --strategy=fiber     many scopereg fibers on a few threads, one connection per fiber
//   --strategy=explicit  an event-loop dispatcher; each request's work is split into
//                        callbacks run on a pool through wrap(), all in the request's scope
//
// Every request ends with a TeardownGuard: commit on success, rollback on a simulated
// failure, then clear_for_current_scope(). --stale-rate closes connections behind the
// library's back, so validation must re-create them. At the end it prints a table and exits
// non-zero if an invariant fails (connections leaked or beyond the pools' limits, rows
// lost, requests unaccounted, checkouts not checked in).
//
//   request_service [--strategy=thread|fiber|explicit] [--requests=N] [--workers=N]
//                   [--fibers=N] [--db-dir=DIR] [--stale-rate=F] [--failure-rate=F]
//                   [--seed=N] [--quiet]

#include <sqlite3.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <functional>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "scopereg/explicit_scope.h"
#include "scopereg/fiber_scope.h"
#include "scopereg/session_cache.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Config {
  std::string strategy = "thread";
  long requests = 20000;
  int workers = 4;
  int fibers = 8;  // per worker thread, --strategy=fiber
  std::string db_dir;
  double stale_rate = 0.01;
  double failure_rate = 0.05;
  unsigned seed = 42;
  bool quiet = false;
};

struct Stats {
  std::atomic<long> done{0}, committed{0}, rolled_back{0}, errors{0}, pool_waits{0};
  std::atomic<long> opened{0}, closed{0}, stale_recreated{0}, broken{0};
  std::mutex latency_mu;
  std::vector<double> latencies_us;
  std::vector<double> pool_waits_us;  // guarded by latency_mu
  void record_pool_wait(Clock::duration d) {
    ++pool_waits;
    std::lock_guard<std::mutex> lock(latency_mu);
    pool_waits_us.push_back(std::chrono::duration<double, std::micro>(d).count());
  }
  void record_latency(Clock::time_point start) {
    const double us = std::chrono::duration<double, std::micro>(Clock::now() - start).count();
    std::lock_guard<std::mutex> lock(latency_mu);
    latencies_us.push_back(us);
  }
};
Stats g_stats;

// How a strategy waits while SQLite is busy: a fiber yields, a thread sleeps a little.
std::function<void()> g_backoff = [] { std::this_thread::sleep_for(std::chrono::microseconds(50)); };

// A SQLite connection. Counts every handle opened and closed, so leaks show.
class Db {
 public:
  explicit Db(const std::string& path) {
    if (sqlite3_open_v2(path.c_str(), &handle_, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE,
                        nullptr) != SQLITE_OK) {
      std::string error = handle_ ? sqlite3_errmsg(handle_) : "out of memory";
      sqlite3_close(handle_);
      throw std::runtime_error("cannot open " + path + ": " + error);
    }
    ++g_stats.opened;
    exec("PRAGMA synchronous=OFF");
  }
  Db(const Db&) = delete;
  Db& operator=(const Db&) = delete;
  ~Db() { close(); }

  void close() {
    if (handle_ != nullptr) {
      sqlite3_close(handle_);
      handle_ = nullptr;
      ++g_stats.closed;
    }
  }
  // The server went away: the handle is gone, the object does not know yet.
  void break_behind_back() {
    close();
    ++g_stats.broken;
  }
  bool ping() { return handle_ != nullptr && sqlite3_exec(handle_, "SELECT 1", nullptr, nullptr, nullptr) == SQLITE_OK; }
  bool in_transaction() { return handle_ != nullptr && sqlite3_get_autocommit(handle_) == 0; }

  // Runs `sql`, backing off while the database is locked by another connection.
  void exec(const std::string& sql) {
    if (handle_ == nullptr) throw std::runtime_error("connection is closed");
    for (;;) {
      char* error = nullptr;
      const int rc = sqlite3_exec(handle_, sql.c_str(), nullptr, nullptr, &error);
      if (rc == SQLITE_OK) return;
      std::string message = error ? error : sqlite3_errstr(rc);
      sqlite3_free(error);
      if (rc != SQLITE_BUSY && rc != SQLITE_LOCKED) {
        throw std::runtime_error(sql + ": " + message);
      }
      g_backoff();
    }
  }
  long count(const char* table) {
    sqlite3_stmt* stmt = nullptr;
    const std::string sql = std::string("SELECT COUNT(*) FROM ") + table;
    sqlite3_prepare_v2(handle_, sql.c_str(), -1, &stmt, nullptr);
    long n = -1;
    if (sqlite3_step(stmt) == SQLITE_ROW) n = sqlite3_column_int64(stmt, 0);
    sqlite3_finalize(stmt);
    return n;
  }

 private:
  sqlite3* handle_ = nullptr;
};

template <typename Scope>
using Sessions = scopereg::SessionCache<Db, Scope>;

// One pool per database, sized for the run's concurrency (no overflow: the limit is exact).
struct Pools {
  std::shared_ptr<scopereg::Pool<Db>> orders, audit;
  std::size_t limit = 0;  // pool_size + max_overflow of each
};
Pools g_pools;

std::shared_ptr<scopereg::Pool<Db>> make_pool(const std::string& name, const std::string& path,
                                              std::size_t size) {
  return std::make_shared<scopereg::Pool<Db>>(scopereg::PoolOptions<Db>{
      .connect = [path] { return Db(path); },
      .close = [](Db& db) { db.close(); },
      .ping = [](Db& db) { return db.ping(); },  // pre_ping: a dead idle one is replaced
      .reset_on_return = [](Db& db) {
        if (db.in_transaction()) db.exec("ROLLBACK");
      },
      .pool_size = size,
      .max_overflow = 0,
      .timeout = std::chrono::seconds(60),
      .name = name,
      .error_reporter = [](const absl::Status& status) {
        ++g_stats.errors;
        std::fprintf(stderr, "request_service: %s\n", std::string(status.message()).c_str());
      },
      .on_wait = [](Clock::duration d) { g_stats.record_pool_wait(d); }});
}

template <typename Scope>
void configure(Sessions<Scope>& sessions, const std::string& dir, std::size_t concurrency) {
  g_pools.orders = make_pool("orders", dir + "/orders.db", concurrency);
  g_pools.audit = make_pool("audit", dir + "/audit.db", concurrency);
  g_pools.limit = concurrency;
  for (const char* name : {"orders", "audit"}) {
    sessions.add(name, {.teardown = [](Db& db, bool ok) { db.exec(ok ? "COMMIT" : "ROLLBACK"); },
                        .validate = [](Db& db) {
                          const bool alive = db.ping();
                          if (!alive) ++g_stats.stale_recreated;
                          return alive;
                        },
                        .pool = std::string(name) == "orders" ? g_pools.orders : g_pools.audit});
  }
  sessions.set_error_reporter([](const absl::Status& status) {
    ++g_stats.errors;
    std::fprintf(stderr, "request_service: %s\n", std::string(status.message()).c_str());
  });
}

// Per-request randomness, derived from the request id: the same run every time.
struct RequestPlan {
  bool stale_orders, stale_audit, fail;
  int amount;
};
RequestPlan plan_for(const Config& config, long id) {
  std::mt19937_64 rng(config.seed * 1000003u + static_cast<unsigned long>(id));
  std::uniform_real_distribution<double> u(0, 1);
  return RequestPlan{u(rng) < config.stale_rate, u(rng) < config.stale_rate,
                     u(rng) < config.failure_rate, static_cast<int>(rng() % 1000)};
}

// The steps of one request. Between steps the caller may yield or hop threads.
template <typename Scope>
struct RequestSteps {
  Sessions<Scope>& s;
  typename Sessions<Scope>::SessionName orders, audit;

  void begin(const RequestPlan& plan) {
    Db& o = s.get(orders);
    if (plan.stale_orders) o.break_behind_back();  // the next get() must notice
    s.get(orders).exec("BEGIN IMMEDIATE");
  }
  void write(long id, const RequestPlan& plan) {
    s.get(orders).exec("INSERT INTO orders(request, amount) VALUES(" + std::to_string(id) + ", " +
                       std::to_string(plan.amount) + ")");
    Db& a = s.get(audit);
    if (plan.stale_audit) a.break_behind_back();
    s.get(audit).exec("BEGIN IMMEDIATE");
    s.get(audit).exec("INSERT INTO audit(request, event) VALUES(" + std::to_string(id) +
                      ", 'order placed')");
    if (plan.fail) throw std::runtime_error("simulated failure");
  }
};

void create_schema(const std::string& dir) {
  Db orders(dir + "/orders.db");
  orders.exec("PRAGMA journal_mode=WAL");
  orders.exec("CREATE TABLE orders(id INTEGER PRIMARY KEY, request INTEGER, amount INTEGER)");
  Db audit(dir + "/audit.db");
  audit.exec("PRAGMA journal_mode=WAL");
  audit.exec("CREATE TABLE audit(id INTEGER PRIMARY KEY, request INTEGER, event TEXT)");
}

void progress(const Config& config) {
  const long done = ++g_stats.done;
  const long step = std::max(1L, config.requests / 10);
  if (!config.quiet && config.requests >= 10000 && done % step == 0) {
    std::fprintf(stderr, "  %3ld%%  %ld requests\n", done * 100 / config.requests, done);
  }
}

// Runs one request start to end in the calling scope (thread and fiber strategies).
template <typename Scope>
void run_request(const Config& config, RequestSteps<Scope>& steps, long id,
                 const std::function<void()>& between_steps) {
  const Clock::time_point start = Clock::now();
  const RequestPlan plan = plan_for(config, id);
  try {
    typename Sessions<Scope>::TeardownGuard done(steps.s);  // commit or rollback, then clear
    steps.begin(plan);
    between_steps();
    steps.write(id, plan);
    between_steps();
    ++g_stats.committed;
  } catch (const std::exception&) {
    ++g_stats.rolled_back;
  }
  g_stats.record_latency(start);
  progress(config);
}

void run_threads(const Config& config) {
  Sessions<scopereg::ThreadScope> sessions;
  configure(sessions, config.db_dir, config.workers);
  RequestSteps<scopereg::ThreadScope> steps{sessions, sessions.intern("orders"),
                                            sessions.intern("audit")};
  std::atomic<long> next{0};
  std::vector<std::thread> workers;
  for (int w = 0; w < config.workers; ++w) {
    workers.emplace_back([&] {
      for (long id; (id = next++) < config.requests;) run_request(config, steps, id, [] {});
    });
  }
  for (auto& t : workers) t.join();
}

void run_fibers(const Config& config) {
  Sessions<scopereg::FiberScope> sessions;
  configure(sessions, config.db_dir, static_cast<std::size_t>(config.workers) * config.fibers);
  RequestSteps<scopereg::FiberScope> steps{sessions, sessions.intern("orders"),
                                           sessions.intern("audit")};
  g_backoff = [] { scopereg::Fiber::yield(); };  // let the lock holder on this thread run
  std::atomic<long> next{0};
  std::vector<std::thread> workers;
  for (int w = 0; w < config.workers; ++w) {
    workers.emplace_back([&] {
      std::vector<scopereg::Fiber> fibers;
      for (int f = 0; f < config.fibers; ++f) {
        fibers.emplace_back([&] {
          for (long id; (id = next++) < config.requests;) {
            run_request(config, steps, id, [] { scopereg::Fiber::yield(); });
          }
        });
      }
      // A round-robin scheduler: resume every unfinished fiber until all are done.
      for (bool any = true; any;) {
        any = false;
        for (auto& f : fibers) {
          if (!f.done()) {
            f.resume();
            any = true;
          }
        }
      }
    });
  }
  for (auto& t : workers) t.join();
}

// A small thread pool: the "executor" the event loop posts callbacks to.
class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { work(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  void post(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      tasks_.push_back(std::move(task));
    }
    cv_.notify_one();
  }

 private:
  void work() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !tasks_.empty(); });
        if (tasks_.empty()) return;
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

void run_explicit(const Config& config) {
  using Scope = scopereg::ExplicitScope;
  Sessions<Scope> sessions;
  configure(sessions, config.db_dir, config.workers);
  RequestSteps<Scope> steps{sessions, sessions.intern("orders"), sessions.intern("audit")};

  // The event loop: admits requests while fewer than `limit` are in flight.
  // At most one step of each request is queued or running, so with no more requests in
  // flight than pool threads, the step of a request that holds a write lock always finds
  // a thread while the others wait for that lock.
  const long limit = config.workers;
  std::mutex mu;
  std::condition_variable cv;
  long in_flight = 0;
  auto finished = [&] {
    std::lock_guard<std::mutex> lock(mu);
    --in_flight;
    cv.notify_one();
  };
  // Declared after what its tasks use, so it is joined before those are destroyed.
  Pool pool(config.workers);
  scopereg::ScopedExecutor executor([&pool](std::function<void()> task) { pool.post(std::move(task)); });
  for (long id = 0; id < config.requests; ++id) {
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return in_flight < limit; });
      ++in_flight;
    }
    const Clock::time_point start = Clock::now();
    const RequestPlan plan = plan_for(config, id);
    scopereg::ScopeGuard request(id);  // the request's scope; callbacks carry it along
    auto failed = std::make_shared<bool>(false);
    // Each step runs later on some pool thread, in this request's scope, and posts the next.
    auto finish = [&, start, failed] {
      {
        Sessions<Scope>::TeardownGuard done(sessions);
        if (*failed) done.fail();
      }
      ++(*failed ? g_stats.rolled_back : g_stats.committed);
      g_stats.record_latency(start);
      progress(config);
      finished();
    };
    auto write = [&, id, plan, failed, finish] {
      try {
        steps.write(id, plan);
      } catch (const std::exception&) {
        *failed = true;
      }
      executor.post(finish);
    };
    executor.post([&, plan, failed, write, finish] {
      try {
        steps.begin(plan);
        executor.post(write);
      } catch (const std::exception&) {
        *failed = true;
        executor.post(finish);
      }
    });
  }  // the guard leaves at once; the request's scope lives on in its callbacks
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return in_flight == 0; });
}

bool parse(int argc, char** argv, Config& config) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&](const char* key) -> const char* {
      const std::size_t n = std::strlen(key);
      return arg.compare(0, n, key) == 0 ? arg.c_str() + n : nullptr;
    };
    if (const char* v = value("--strategy=")) config.strategy = v;
    else if (const char* v = value("--requests=")) config.requests = std::atol(v);
    else if (const char* v = value("--workers=")) config.workers = std::atoi(v);
    else if (const char* v = value("--fibers=")) config.fibers = std::atoi(v);
    else if (const char* v = value("--db-dir=")) config.db_dir = v;
    else if (const char* v = value("--stale-rate=")) config.stale_rate = std::atof(v);
    else if (const char* v = value("--failure-rate=")) config.failure_rate = std::atof(v);
    else if (const char* v = value("--seed=")) config.seed = static_cast<unsigned>(std::atol(v));
    else if (arg == "--quiet") config.quiet = true;
    else {
      std::fprintf(stderr, "request_service: unknown option '%s'\n", arg.c_str());
      return false;
    }
  }
  if (config.strategy != "thread" && config.strategy != "fiber" && config.strategy != "explicit") {
    std::fprintf(stderr, "request_service: --strategy must be thread, fiber or explicit\n");
    return false;
  }
  if (config.requests < 0 || config.workers < 1 || config.fibers < 1) {
    std::fprintf(stderr, "request_service: --requests >= 0, --workers >= 1, --fibers >= 1\n");
    return false;
  }
  return true;
}

double percentile(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  const std::size_t k = std::min(v.size() - 1, static_cast<std::size_t>(p * (v.size() - 1) + 0.5));
  std::nth_element(v.begin(), v.begin() + k, v.end());
  return v[k];
}

}  // namespace

int main(int argc, char** argv) {
  Config config;
  if (!parse(argc, argv, config)) return 2;
  bool temporary = false;
  if (config.db_dir.empty()) {
    char pattern[] = "/tmp/scopereg-example-XXXXXX";
    if (mkdtemp(pattern) == nullptr) {
      std::perror("request_service: mkdtemp");
      return 1;
    }
    config.db_dir = pattern;
    temporary = true;
  } else {
    std::filesystem::create_directories(config.db_dir);
    std::filesystem::remove(config.db_dir + "/orders.db");
    std::filesystem::remove(config.db_dir + "/audit.db");
  }
  if (!config.quiet) {
    std::fprintf(stderr, "request_service: %ld requests, strategy=%s, workers=%d%s, db=%s\n",
                 config.requests, config.strategy.c_str(), config.workers,
                 config.strategy == "fiber" ? (" x " + std::to_string(config.fibers) + " fibers").c_str() : "",
                 config.db_dir.c_str());
  }
  long orders_rows = -1, audit_rows = -1;
  scopereg::PoolStats pool_orders, pool_audit;
  long pool_limit = 0;
  double seconds = 0;
  try {
    create_schema(config.db_dir);
    const Clock::time_point start = Clock::now();
    if (config.strategy == "thread") run_threads(config);
    if (config.strategy == "fiber") run_fibers(config);
    if (config.strategy == "explicit") run_explicit(config);
    seconds = std::chrono::duration<double>(Clock::now() - start).count();
    // The sessions are gone: every connection is back in its pool. Read the pools, then
    // close their idle connections.
    pool_orders = g_pools.orders->stats();
    pool_audit = g_pools.audit->stats();
    pool_limit = static_cast<long>(g_pools.limit);
    g_pools = Pools{};
    Db orders(config.db_dir + "/orders.db");
    Db audit(config.db_dir + "/audit.db");
    orders_rows = orders.count("orders");
    audit_rows = audit.count("audit");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "request_service: %s\n", e.what());
    return 1;
  }
  // The two counting connections above are closed by now.
  const long opened = g_stats.opened, closed = g_stats.closed;
  const long committed = g_stats.committed, rolled_back = g_stats.rolled_back;
  std::vector<double>& lat = g_stats.latencies_us;
  const double p50 = percentile(lat, 0.50), p99 = percentile(lat, 0.99);
  const double wait_p99 = percentile(g_stats.pool_waits_us, 0.99);
  const long limit = pool_limit;
  const long pool_connects = static_cast<long>(pool_orders.connects + pool_audit.connects);
  const bool balanced = pool_orders.checkouts == pool_orders.checkins &&
                        pool_audit.checkouts == pool_audit.checkins &&
                        pool_orders.checked_out == 0 && pool_audit.checked_out == 0;

  struct Check {
    const char* what;
    bool ok;
  };
  const Check checks[] = {
      {"every request done", g_stats.done == config.requests && committed + rolled_back == config.requests},
      {"connections opened == closed", opened == closed},
      {"orders rows == committed", orders_rows == committed},
      {"audit rows == committed", audit_rows == committed},
      {"no reported errors", g_stats.errors == 0},
      {"every broken connection re-created", g_stats.stale_recreated == g_stats.broken},
      {"pool connects <= limits + re-created", pool_connects <= 2 * limit + g_stats.stale_recreated},
      {"checked out == checked in", balanced},
  };
  std::printf("\nscopereg request_service — strategy %s\n", config.strategy.c_str());
  std::printf("  %-34s %12ld\n", "requests done", g_stats.done.load());
  std::printf("  %-34s %12ld\n", "committed", committed);
  std::printf("  %-34s %12ld\n", "rolled back (simulated failures)", rolled_back);
  std::printf("  %-34s %12ld\n", "connections opened", opened);
  std::printf("  %-34s %12ld\n", "connections closed", closed);
  std::printf("  %-34s %12ld\n", "stale connections re-created", g_stats.stale_recreated.load());
  std::printf("  %-34s %12ld\n", "pool limit (per database)", limit);
  std::printf("  %-34s %12llu\n", "pool checkouts",
              static_cast<unsigned long long>(pool_orders.checkouts + pool_audit.checkouts));
  std::printf("  %-34s %12llu\n", "pool checkins",
              static_cast<unsigned long long>(pool_orders.checkins + pool_audit.checkins));
  std::printf("  %-34s %12ld\n", "pool connects", pool_connects);
  std::printf("  %-34s %12ld\n", "pool waits", g_stats.pool_waits.load());
  std::printf("  %-34s %12.1f us\n", "pool wait p99", wait_p99);
  std::printf("  %-34s %12ld\n", "rows in orders.db", orders_rows);
  std::printf("  %-34s %12ld\n", "rows in audit.db", audit_rows);
  std::printf("  %-34s %12.0f req/s\n", "throughput", seconds > 0 ? config.requests / seconds : 0);
  std::printf("  %-34s %12.1f us\n", "latency p50", p50);
  std::printf("  %-34s %12.1f us\n", "latency p99", p99);
  bool all_ok = true;
  for (const Check& c : checks) {
    std::printf("  %-34s %12s\n", c.what, c.ok ? "ok" : "FAILED");
    all_ok = all_ok && c.ok;
  }
  if (temporary) std::filesystem::remove_all(config.db_dir);
  if (!all_ok) {
    std::printf("request_service: an invariant failed\n");
    return 1;
  }
  return 0;
}
