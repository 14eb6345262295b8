// request_service: scopereg's main job. An HTTP/1.1 order service (Boost.Beast, on
// 127.0.0.1) whose every request runs in a scope of its own, with its database session
// from a scopereg::SessionCache backed by a scopereg::Pool of connections -- to SQLite
// (embedded, the default) or to a MariaDB server:
//
//   POST /orders       insert an order and its audit row in one transaction
//   GET  /orders/<id>  read one back
//   GET  /stats        the counters and invariant checks, as JSON
//
// By default it starts the service on an ephemeral port, drives it with its built-in load
// generator over real sockets (at 1 worker, then at --workers), checks the invariants from
// the database itself and exits non-zero if one fails. --serve keeps it running for curl
// or wrk until SIGINT/SIGTERM, then checks. --load=HOST:PORT only drives another server.
//
//   request_service [--strategy=thread|fiber|explicit|coroutine] [--workers=N] [--fibers=N]
//                   [--db=sqlite|sqlite:DIR|mariadb://USER[:PW]@HOST[:PORT]/DB[?socket=PATH]]
//                   [--requests=N] [--connections=C] [--bursts=B --idle-ms=MS]
//                   [--serve [--port=P] [--port-file=PATH]] [--load=HOST:PORT]
//                   [--pool-size=N] [--single] [--quiet]

#include <signal.h>
#include <stdlib.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "db.h"
#include "http_server.h"
#include "load_generator.h"
#include "service.h"
#include "strategies.h"

namespace {

using namespace example;

struct Config {
  StrategyOptions strategy;
  std::string db = "sqlite";
  std::size_t pool_size = 0;  // 0: the strategy's concurrency
  LoadOptions load;
  ServerOptions server;
  bool serve = false;
  bool single = false;  // skip the 1-worker round
  std::string load_only;
  std::string port_file;
  bool quiet = false;
};

const char kUsage[] =
    "usage: request_service [--strategy=thread|fiber|explicit|coroutine] [--workers=N]\n"
    "         [--fibers=N]\n"
    "         [--db=sqlite|sqlite:DIR|mariadb://USER[:PASSWORD]@HOST[:PORT]/DB[?socket=PATH]]\n"
    "         [--requests=N] [--connections=C] [--bursts=B] [--idle-ms=MS] [--get-every=N]\n"
    "         [--duplicate-every=N]\n"
    "         [--serve] [--port=P] [--port-file=PATH] [--load=HOST:PORT] [--pool-size=N]\n"
    "         [--body-limit=BYTES] [--io-timeout-ms=MS] [--single] [--quiet]\n";

bool to_long(const char* text, long min, long max, long& out) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || v < min || v > max) return false;
  out = v;
  return true;
}

bool parse(int argc, char** argv, Config& c) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const std::size_t eq = arg.find('=');
    const std::string key = arg.substr(0, eq);
    const char* value = eq == std::string::npos ? nullptr : argv[i] + eq + 1;
    auto number = [&](long min, long max) {
      long v = 0;
      if (value == nullptr || !to_long(value, min, max, v)) {
        throw std::invalid_argument(key + " needs a whole number from " + std::to_string(min) +
                                    " to " + std::to_string(max) + ", e.g. " + key + "=" +
                                    std::to_string(std::max(min, 1L)));
      }
      return v;
    };
    if (key == "--strategy" && value) c.strategy.name = value;
    else if (key == "--workers") c.strategy.workers = static_cast<int>(number(1, 256));
    else if (key == "--fibers") c.strategy.fibers = static_cast<int>(number(1, 1024));
    else if (key == "--db" && value) c.db = value;
    else if (key == "--requests") c.load.requests = number(0, 100000000);
    else if (key == "--connections") c.load.connections = static_cast<int>(number(1, 1024));
    else if (key == "--bursts") c.load.bursts = static_cast<int>(number(1, 1000));
    else if (key == "--idle-ms") c.load.idle = std::chrono::milliseconds(number(0, 600000));
    else if (key == "--get-every") c.load.get_every = static_cast<int>(number(0, 1000000));
    else if (key == "--duplicate-every") c.load.duplicate_every = static_cast<int>(number(0, 1000000));
    else if (key == "--port") c.server.port = static_cast<unsigned short>(number(0, 65535));
    else if (key == "--port-file" && value) c.port_file = value;
    else if (key == "--pool-size") c.pool_size = static_cast<std::size_t>(number(1, 10000));
    else if (key == "--body-limit") c.server.body_limit = static_cast<std::size_t>(number(16, 1 << 24));
    else if (key == "--io-timeout-ms") c.server.io_timeout = std::chrono::milliseconds(number(1, 3600000));
    else if (key == "--load" && value) c.load_only = value;
    else if (arg == "--serve") c.serve = true;
    else if (arg == "--single") c.single = true;
    else if (arg == "--quiet") c.quiet = true;
    else if (arg == "--help" || arg == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else {
      throw std::invalid_argument("unknown option '" + arg + "'");
    }
  }
  // (coroutine in a build without scopereg::asio: make_dispatcher says so)
  if (c.strategy.name != "thread" && c.strategy.name != "fiber" &&
      c.strategy.name != "explicit" && c.strategy.name != "coroutine") {
    throw std::invalid_argument("--strategy=" + c.strategy.name + ": use " + strategy_names());
  }
  c.load.progress = !c.quiet;
  return true;
}

// A SQLite database in a fresh temporary directory (removed at the end), or where asked.
struct Database {
  DbUrl url;
  std::string temporary_dir;
  explicit Database(const std::string& spec) : url(DbUrl::parse(spec)) {
    if (url.kind != DbUrl::Kind::kSqlite) return;
    std::string dir = url.sqlite_path;
    if (dir.empty()) {
      char pattern[] = "/tmp/scopereg-example-XXXXXX";
      if (mkdtemp(pattern) == nullptr) throw std::runtime_error("mkdtemp failed");
      dir = temporary_dir = pattern;
    }
    std::filesystem::create_directories(dir);
    url.sqlite_path = dir + "/orders.db";
  }
  ~Database() {
    if (!temporary_dir.empty()) std::filesystem::remove_all(temporary_dir);
  }
};

// Runs `f` on a connection of its own, on a new one if the connection dies (a test that
// KILLs connections may hit this one too).
template <typename F>
auto on_own_connection(const DbUrl& url, F f) {
  for (int attempt = 1;; ++attempt) {
    try {
      Db db = Db::open(url);
      return f(db);
    } catch (const DbError& e) {
      if (!e.lost() || attempt == 5) throw;
    }
  }
}

// One service on a fresh schema: store, strategy, HTTP server.
struct Service {
  Store store;
  std::unique_ptr<Dispatcher> dispatcher;
  HttpServer server;

  Service(const Config& c, const DbUrl& url, const StrategyOptions& s)
      : store(StoreOptions{url, c.pool_size ? c.pool_size : concurrency(s), backoff_for(s), c.quiet}),
        dispatcher(make_dispatcher(s, store)),
        server(*dispatcher, c.server) {}

  // Stops serving, closes the pool and checks the invariants from the database.
  std::vector<ReportLine> finish() {
    server.stop();
    store.close_pool();
    return on_own_connection(store.options().url,
                             [&](Db& db) { return store.report(db, true); });
  }
};

void reset_schema(const DbUrl& url) {
  on_own_connection(url, [](Db& db) { db.reset_schema(); });
}

int serve(const Config& c, const DbUrl& url) {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);  // before any thread starts: all inherit it
  reset_schema(url);
  Service service(c, url, c.strategy);
  std::printf("request_service: strategy %s, %d workers, db %s\n"
              "request_service: listening on http://127.0.0.1:%u (Ctrl-C to stop and check)\n",
              c.strategy.name.c_str(), c.strategy.workers, url.describe().c_str(),
              service.server.port());
  std::fflush(stdout);
  if (!c.port_file.empty()) {
    std::ofstream(c.port_file + ".tmp") << service.server.port() << "\n";
    std::filesystem::rename(c.port_file + ".tmp", c.port_file);
  }
  int signal = 0;
  sigwait(&signals, &signal);
  std::printf("\nrequest_service: stopping (signal %d)\n", signal);
  const bool ok = print_report(service.finish());
  std::printf(ok ? "request_service: every invariant holds\n"
                 : "request_service: an invariant FAILED\n");
  return ok ? 0 : 1;
}

// One round: a fresh schema, the service, the load; prints the table unless `quiet`.
bool round(const Config& c, const DbUrl& url, const StrategyOptions& s, LoadResult& load,
           bool print) {
  reset_schema(url);
  Service service(c, url, s);
  LoadOptions lo = c.load;
  lo.port = service.server.port();
  load = run_load(lo);
  std::vector<ReportLine> lines = service.finish();
  const ServiceCounters& k = service.store.counters();
  lines.push_back({"load generator: requests == answered", std::to_string(load.requests),
                   load.requests == k.requests && load.transport_errors == 0});
  lines.push_back({"load generator: 2xx/4xx/5xx == service's",
                   std::to_string(load.status_2xx) + "/" + std::to_string(load.status_4xx) + "/" +
                       std::to_string(load.status_5xx),
                   load.status_2xx == k.status_2xx && load.status_4xx == k.status_4xx &&
                       load.status_5xx == k.status_5xx});
  if (print) {
    std::printf("\nscopereg request_service -- strategy %s, %d workers, %d connections\n",
                s.name.c_str(), s.workers, c.load.connections);
    std::printf("  %-48s %14ld\n", "requests sent", load.requests);
    std::printf("  %-48s %14ld\n", "transport errors", load.transport_errors);
    std::printf("  %-48s %14.0f req/s\n", "throughput", load.per_second());
    std::printf("  %-48s %14.0f us\n", "latency p50", load.p50_us);
    std::printf("  %-48s %14.0f us\n", "latency p99", load.p99_us);
  }
  bool ok = true;
  for (const ReportLine& l : lines) ok = ok && l.ok != 0;
  if (print || !ok) ok = print_report(lines);
  return ok;
}

int drive(const Config& c, const DbUrl& url) {
  if (!c.quiet) {
    std::fprintf(stderr, "request_service: %ld requests over %d connections, strategy %s, db %s\n",
                 c.load.requests, c.load.connections, c.strategy.name.c_str(),
                 url.describe().c_str());
  }
  bool ok = true;
  LoadResult one, all;
  const bool scaling = !c.single && c.strategy.workers > 1;
  if (scaling) {
    StrategyOptions s = c.strategy;
    s.workers = 1;
    if (!c.quiet) std::fprintf(stderr, "request_service: round 1 of 2: 1 worker\n");
    ok = round(c, url, s, one, false) && ok;
    if (!c.quiet) {
      std::fprintf(stderr, "request_service: round 2 of 2: %d workers\n", c.strategy.workers);
    }
  }
  ok = round(c, url, c.strategy, all, !c.quiet) && ok;
  if (scaling) {
    std::printf("  %-48s %14.0f req/s (p50 %.0f us, p99 %.0f us)\n", "throughput at 1 worker",
                one.per_second(), one.p50_us, one.p99_us);
  }
  std::printf("  %-48s %14.0f req/s (p50 %.0f us, p99 %.0f us)\n",
              ("throughput at " + std::to_string(c.strategy.workers) + " workers").c_str(),
              all.per_second(), all.p50_us, all.p99_us);
  std::printf(ok ? "request_service: every invariant holds\n"
                 : "request_service: an invariant FAILED\n");
  return ok ? 0 : 1;
}

// --load=HOST:PORT: drive another server (the anchor), print one line of figures.
int load_only(const Config& c) {
  LoadOptions lo = c.load;
  const std::size_t colon = c.load_only.rfind(':');
  long port = 0;
  if (colon == std::string::npos || !to_long(c.load_only.c_str() + colon + 1, 1, 65535, port)) {
    throw std::invalid_argument("--load=" + c.load_only + ": use --load=HOST:PORT, e.g. --load=127.0.0.1:8080");
  }
  lo.host = c.load_only.substr(0, colon);
  lo.port = static_cast<unsigned short>(port);
  const LoadResult r = run_load(lo);
  std::printf("requests %ld 2xx %ld 4xx %ld 5xx %ld errors %ld req/s %.0f p50_us %.0f p99_us %.0f\n",
              r.requests, r.status_2xx, r.status_4xx, r.status_5xx, r.transport_errors,
              r.per_second(), r.p50_us, r.p99_us);
  return r.transport_errors == 0 && r.status_5xx == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  Config config;
  try {
    parse(argc, argv, config);
    if (!config.load_only.empty()) return load_only(config);
    Database database(config.db);
    return config.serve ? serve(config, database.url) : drive(config, database.url);
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "request_service: %s\n%s", e.what(), kUsage);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "request_service: %s\n", e.what());
    return 1;
  }
}
