// service.h: the order service behind the HTTP front end.
//
// Store: what every strategy shares -- the database URL, one scopereg::Pool<Db> (pre-ping
// on checkout: a connection the server dropped while idle is replaced, never handed out),
// the counters, and the status of every POST /orders answered (for the invariants).
//
// OrderService<Scope>: the request handler for one scope strategy. Each request runs in
// its own scope and ends with a TeardownGuard: the session (a pooled connection) is rolled
// back if the request failed, then cleared -- checked back into the pool, or discarded if
// its connection died. handle() ends it itself; handle_open() leaves it to the caller (the
// coroutine strategy's task teardown, scopereg::asio::teardown_of(sessions())).
//
//   POST /orders       {"customer":"alice","amount":42,"ref":"k1"} -> 201 {"id":7,"ref":"k1"}
//   GET  /orders/<id>  -> 200 {"id":7,"customer":"alice","amount":42,"ref":"k1","audited":true}
//   GET  /stats        -> 200 the counters and the invariant checks

#ifndef SCOPEREG_EXAMPLES_SERVICE_H_
#define SCOPEREG_EXAMPLES_SERVICE_H_

#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "db.h"
#include "http_types.h"
#include "order_body.h"
#include "scopereg/session_cache.h"

namespace example {

struct StoreOptions {
  DbUrl url;
  std::size_t pool_size = 4;  // connections kept; also the limit (no overflow)
  std::function<void()> backoff;  // while SQLite is busy
  bool quiet = false;             // errors reported by the pool or the cache: not printed
};

struct ServiceCounters {
  std::atomic<long> requests{0}, status_2xx{0}, status_4xx{0}, status_5xx{0};
  std::atomic<long> commits{0}, rollbacks{0}, lost_connections{0}, reported_errors{0};
  std::atomic<long> in_flight{0}, pool_waits{0};
};

// One line of a report: a figure, or an invariant check (`ok` set).
struct ReportLine {
  std::string name;
  std::string value;
  int ok = -1;  // -1: a figure; 0: a failed check; 1: a check that holds
};

class Store {
 public:
  explicit Store(StoreOptions options);
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  const StoreOptions& options() const { return options_; }
  const std::shared_ptr<scopereg::Pool<Db>>& pool() const { return pool_; }
  ServiceCounters& counters() { return counters_; }
  void report_error(const absl::Status& status);

  // Records the status a POST /orders with this ref was answered with.
  void record_outcome(const std::string& ref, unsigned status);
  std::string next_ref() { return "srv-" + std::to_string(++refs_); }

  // The figures and invariant checks, read from the database through `db`. Exact once no
  // request is in flight. With `final`, also: every connection returned and closed (call
  // after close_pool()).
  std::vector<ReportLine> report(Db& db, bool final);
  // Closes the pool's idle connections (the end of the run).
  void close_pool() { pool_->dispose(); }

 private:
  StoreOptions options_;
  ServiceCounters counters_;
  std::shared_ptr<scopereg::Pool<Db>> pool_;
  std::atomic<long> refs_{0};
  std::mutex outcomes_mu_;
  std::vector<std::pair<std::string, unsigned>> outcomes_;  // guarded by outcomes_mu_
};

std::string report_json(const std::vector<ReportLine>& lines);
// Prints the table; returns whether every check holds.
bool print_report(const std::vector<ReportLine>& lines);

HttpResponse json_error(unsigned status, const std::string& message, const std::string& ref = "");

template <typename Scope>
class OrderService {
 public:
  using Sessions = scopereg::SessionCache<Db, Scope>;

  explicit OrderService(Store& store) : store_(store), db_(add_session()) {}

  // Handles one request. Call it in the request's own scope. Its unit of work ends here,
  // before the response is returned (in_session's TeardownGuard).
  HttpResponse handle(const HttpRequest& request) {
    UnitOfWork unit;
    return handle(request, unit);
  }

  // A response, and whether the request's unit of work must be rolled back.
  struct Outcome {
    HttpResponse response;
    bool failed = false;
  };
  // Handles one request and leaves its unit of work open: the caller ends it afterwards,
  // in the same scope, with a teardown of sessions() told `failed` -- the coroutine
  // strategy's task teardown, scopereg::asio::teardown_of(sessions()), which rolls back
  // when the task ends by an exception.
  Outcome handle_open(const HttpRequest& request) {
    UnitOfWork unit{.caller_ends = true};
    HttpResponse response = handle(request, unit);
    return {std::move(response), unit.failed};
  }

  // The per-scope sessions (for a caller that ends the unit of work: handle_open()).
  Sessions& sessions() { return sessions_; }

 private:
  // How a request's unit of work ends: in in_session (a TeardownGuard), or by the caller
  // (handle_open), which is then told whether it failed.
  struct UnitOfWork {
    bool caller_ends = false;
    bool failed = false;
  };

  HttpResponse handle(const HttpRequest& request, UnitOfWork& unit) {
    ++store_.counters().in_flight;
    HttpResponse response;
    try {
      response = route(request, unit);
    } catch (const std::exception& e) {
      unit.failed = true;
      response = json_error(500, e.what());
    }
    --store_.counters().in_flight;
    ++store_.counters().requests;
    const unsigned s = response.status;
    ++(s < 300 ? store_.counters().status_2xx
               : s < 500 ? store_.counters().status_4xx : store_.counters().status_5xx);
    return response;
  }

  HttpResponse route(const HttpRequest& r, UnitOfWork& unit) {
    const std::string& t = r.target;
    if (t == "/orders") {
      if (r.method != "POST") return json_error(405, "use POST /orders");
      return post_order(r, unit);
    }
    if (t.starts_with("/orders/")) {
      if (r.method != "GET") return json_error(405, "use GET /orders/<id>");
      const std::string digits = t.substr(8);
      if (digits.empty() || digits.size() > 18 ||
          digits.find_first_not_of("0123456789") != std::string::npos) {
        return json_error(400, "the order id must be a positive integer: GET /orders/<id>");
      }
      return get_order(std::stoll(digits), unit);
    }
    if (t == "/stats") {
      if (r.method != "GET") return json_error(405, "use GET /stats");
      return in_session(unit, [&](Db& db) {
        return HttpResponse{200, report_json(store_.report(db, false))};
      });
    }
    return json_error(404, "no such path; try POST /orders, GET /orders/<id>, GET /stats");
  }

  HttpResponse post_order(const HttpRequest& r, UnitOfWork& unit) {
    ParsedOrder parsed = parse_order(r.content_type, r.body);
    if (!parsed.ok) return json_error(parsed.status, parsed.error);
    NewOrder& order = parsed.order;
    if (order.ref.empty()) order.ref = store_.next_ref();
    bool committing = false;
    HttpResponse response = in_session(
        unit,
        [&](Db& db) {
          db.begin();
          const long long id = db.insert_order(order.customer, order.amount, order.ref);
          db.insert_audit(id, "order placed");
          committing = true;
          db.commit();
          ++store_.counters().commits;
          return HttpResponse{201, "{\"id\":" + std::to_string(id) +
                                       ",\"ref\":" + json_string(order.ref) + "}"};
        },
        order.ref, &committing);
    store_.record_outcome(order.ref, response.status);
    return response;
  }

  HttpResponse get_order(long long id, UnitOfWork& unit) {
    return in_session(unit, [&](Db& db) {
      const std::optional<Order> o = db.find_order(id);
      if (!o) return json_error(404, "no order " + std::to_string(id));
      return HttpResponse{200, "{\"id\":" + std::to_string(o->id) + ",\"customer\":" +
                                   json_string(o->customer) + ",\"amount\":" +
                                   std::to_string(o->amount) + ",\"ref\":" + json_string(o->ref) +
                                   ",\"audited\":" + (o->audit_rows == 1 ? "true" : "false") + "}"};
    });
  }

  // Runs `work` with the scope's session, in a unit of work that ends here -- a
  // TeardownGuard rolls back what a failure left open and returns the connection to the
  // pool -- or, when the caller ends it (handle_open), marked failed for the caller's
  // teardown to do the same. A dead connection is invalidated: the pool closes it instead
  // of reusing it.
  template <typename Work>
  HttpResponse in_session(UnitOfWork& unit, Work work, const std::string& ref = "",
                          bool* committing = nullptr) {
    std::optional<typename Sessions::TeardownGuard> done;
    if (!unit.caller_ends) done.emplace(sessions_);
    const auto fail = [&] {
      unit.failed = true;
      if (done) done->fail();
    };
    Db* db = nullptr;
    try {
      db = &sessions_.get(db_);
      return work(*db);
    } catch (const DbError& e) {
      fail();
      if (!e.lost()) {
        if (std::string(e.what()).find("UNIQUE") != std::string::npos ||
            std::string(e.what()).find("Duplicate entry") != std::string::npos) {
          return json_error(409, "an order with this ref exists already", ref);
        }
        return json_error(500, std::string("database error: ") + e.what(), ref);
      }
      ++store_.counters().lost_connections;
      const unsigned long long server_id = db != nullptr ? db->server_id() : 0;
      (void)sessions_.invalidate(db_);  // discarded, never back in the pool
      // The connection died during COMMIT: the transaction may have committed or not.
      // Ask the database (on another connection) instead of guessing.
      if (committing != nullptr && *committing && committed_anyway(ref, server_id)) {
        ++store_.counters().commits;
        return HttpResponse{201, "{\"ref\":" + json_string(ref) + "}"};
      }
      return json_error(503, std::string("database connection lost: ") + e.what(), ref);
    } catch (const scopereg::PoolTimeout& e) {
      fail();
      return json_error(503, e.what(), ref);
    } catch (...) {
      fail();  // (a TeardownGuard sees the exception itself; a caller's teardown needs this)
      throw;
    }
  }

  // Whether the order `ref` was committed by connection `server_id`, which died during
  // its COMMIT. The server may still be finishing that connection's work after the client
  // saw it drop: wait until it is gone from the processlist, then look.
  bool committed_anyway(const std::string& ref, unsigned long long server_id) {
    try {
      auto lease = store_.pool()->checkout();
      if (!lease->wait_until_gone(server_id, std::chrono::seconds(10))) return false;
      return lease->has_ref(ref);
    } catch (const std::exception&) {
      return false;  // unknown: answered 503; the invariant check will tell
    }
  }

  // One session name, "db": its values are checked out of the store's pool. The teardown
  // hook rolls back a failed request's open transaction (success commits explicitly,
  // before the response is sent, so that a failed COMMIT is answered 5xx).
  typename Sessions::SessionName add_session() {
    sessions_.add("db", {.teardown = [this](Db& db, bool ok) {
                           if (ok || !db.in_transaction()) return;
                           ++store_.counters().rollbacks;
                           db.rollback();
                         },
                         .pool = store_.pool()});
    sessions_.set_error_reporter([this](const absl::Status& s) { store_.report_error(s); });
    return sessions_.intern("db");
  }

  Store& store_;
  Sessions sessions_;
  const typename Sessions::SessionName db_;
};

}  // namespace example

#endif  // SCOPEREG_EXAMPLES_SERVICE_H_
