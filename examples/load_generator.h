// load_generator.h: a small HTTP load generator over real sockets: C keep-alive
// connections, each sending POST /orders (every Nth request a GET /orders/<id> of an order
// it created, every Mth POST a repeated ref that must be refused) until N requests are done; optionally in bursts separated by idle
// periods (so that pooled connections sit idle longer than the server's wait_timeout).

#ifndef SCOPEREG_EXAMPLES_LOAD_GENERATOR_H_
#define SCOPEREG_EXAMPLES_LOAD_GENERATOR_H_

#include <chrono>
#include <string>
#include <vector>

namespace example {

struct LoadOptions {
  std::string host = "127.0.0.1";
  unsigned short port = 0;
  long requests = 20000;
  int connections = 16;
  int get_every = 5;   // every 5th request of a connection is a GET (0: POSTs only)
  // Every 50th POST of a connection repeats the ref of its previous one: answered 409,
  // rolled back (0: never).
  int duplicate_every = 50;
  int bursts = 1;      // the requests are split into this many bursts...
  std::chrono::milliseconds idle{0};  // ...with this idle time between them
  std::string ref_prefix = "lg";      // refs are <prefix>-<n>: unique per run
  bool progress = true;               // a progress line on stderr
};

struct LoadResult {
  long requests = 0, status_2xx = 0, status_4xx = 0, status_5xx = 0, transport_errors = 0;
  long posts_2xx = 0, posts_5xx = 0;
  double seconds = 0;  // without the idle periods
  double p50_us = 0, p99_us = 0;
  double per_second() const { return seconds > 0 ? requests / seconds : 0; }
};

LoadResult run_load(const LoadOptions& options);

}  // namespace example

#endif  // SCOPEREG_EXAMPLES_LOAD_GENERATOR_H_
