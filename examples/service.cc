// service.cc: the Store's pool, counters and invariant checks (see service.h).

#include "service.h"

#include <thread>
#include <unordered_map>

namespace example {

Store::Store(StoreOptions options) : options_(std::move(options)) {
  const DbUrl url = options_.url;
  const std::function<void()> backoff = options_.backoff;
  pool_ = std::make_shared<scopereg::Pool<Db>>(scopereg::PoolOptions<Db>{
      .connect = [url, backoff] { return Db::open(url, backoff); },
      .close = [](Db& db) { db.close(); },
      // pre_ping: an idle connection the server closed (wait_timeout, KILL) is replaced
      // at checkout, before a request sees "server has gone away".
      .ping = [](Db& db) { return db.ping(); },
      .reset_on_return = [](Db& db) {
        if (db.in_transaction()) db.rollback();
      },
      .pool_size = options_.pool_size,
      .max_overflow = 0,
      .timeout = std::chrono::seconds(10),
      .name = "db",
      .error_reporter = [this](const absl::Status& s) { report_error(s); },
      .on_wait = [this](scopereg::Pool<Db>::Clock::duration) { ++counters_.pool_waits; }});
}

void Store::report_error(const absl::Status& status) {
  ++counters_.reported_errors;
  if (!options_.quiet) {
    std::fprintf(stderr, "request_service: %s\n", std::string(status.message()).c_str());
  }
}

void Store::record_outcome(const std::string& ref, unsigned status) {
  std::lock_guard<std::mutex> lock(outcomes_mu_);
  outcomes_.emplace_back(ref, status);
}

std::vector<ReportLine> Store::report(Db& db, bool final) {
  const scopereg::PoolStats pool = pool_->stats();
  const auto refs = db.all_order_refs();
  const auto audits = db.all_audit_order_ids();
  std::unordered_map<std::string, std::pair<long long, int>> by_ref;  // ref -> id, rows
  for (const auto& [id, ref] : refs) {
    auto& e = by_ref[ref];
    e.first = id;
    ++e.second;
  }
  std::unordered_map<long long, int> audit_rows;
  for (long long id : audits) ++audit_rows[id];
  long answered_2xx = 0, answered_5xx = 0, missing = 0, left_rows = 0;
  {
    std::lock_guard<std::mutex> lock(outcomes_mu_);
    std::unordered_map<std::string, bool> stored;  // refs answered 2xx
    for (const auto& [ref, status] : outcomes_) {
      if (status >= 300) continue;
      ++answered_2xx;
      stored[ref] = true;
      const auto it = by_ref.find(ref);
      if (it == by_ref.end() || it->second.second != 1 || audit_rows[it->second.first] != 1) {
        ++missing;
      }
    }
    for (const auto& [ref, status] : outcomes_) {
      if (status < 500) continue;
      ++answered_5xx;
      // A ref repeated after its order was stored (409 expected) may fail 5xx too: the
      // row is the first one's.
      if (by_ref.contains(ref) && !stored.contains(ref)) ++left_rows;
    }
  }
  bool every_order_audited = true;
  for (const auto& [id, ref] : refs) every_order_audited &= audit_rows[id] == 1;

  const ServiceCounters& c = counters_;
  const long replaced = static_cast<long>(pool.ping_failures + pool.invalidated + pool.recycled);
  auto n = [](auto v) { return std::to_string(v); };
  std::vector<ReportLine> lines = {
      {"database", options_.url.describe()},
      {"requests answered", n(c.requests.load())},
      {"2xx", n(c.status_2xx.load())},
      {"4xx", n(c.status_4xx.load())},
      {"5xx", n(c.status_5xx.load())},
      {"commits", n(c.commits.load())},
      {"rollbacks", n(c.rollbacks.load())},
      {"connections lost mid-request (discarded)", n(c.lost_connections.load())},
      {"pool limit", n(options_.pool_size)},
      {"connections opened", n(pool.connects)},
      {"connections closed", n(pool.closes)},
      {"stale connections replaced (pre-ping)", n(pool.ping_failures)},
      {"broken connections discarded", n(pool.invalidated)},
      {"pool checkouts", n(pool.checkouts)},
      {"pool waits", n(pool.waits)},
      {"errors reported", n(c.reported_errors.load())},
      {"rows in orders", n(refs.size())},
      {"rows in audit", n(audits.size())},
      {"every 2xx order stored once, with its audit row", n(answered_2xx), missing == 0},
      {"no 5xx order left a row", n(answered_5xx), left_rows == 0},
      {"rows in orders == commits", n(refs.size()),
       static_cast<long>(refs.size()) == c.commits.load()},
      {"every order has exactly one audit row", n(audits.size()),
       every_order_audited && audits.size() == refs.size()},
      {"connections opened <= pool limit + replaced", n(pool.connects),
       static_cast<long>(pool.connects) <= static_cast<long>(options_.pool_size) + replaced},
  };
  if (final) {
    lines.push_back({"every checkout checked in", n(pool.checkins),
                     pool.checkouts == pool.checkins && pool.checked_out == 0});
    lines.push_back({"pool connections closed == opened", n(pool.closes),
                     pool.closes == pool.connects && pool.idle == 0});
    // Process-wide, every Db ever opened, minus the one reading this report.
    const long open = connection_counters().opened - connection_counters().closed - 1;
    lines.push_back({"no connection left open (client side)", n(open), open == 0});
    if (options_.url.kind == DbUrl::Kind::kMariaDb) {
      // The server's own view: its processlist. A closed connection may take a moment
      // to leave it.
      long others = db.other_connections_of_user();
      for (int i = 0; i < 50 && others != 0; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        others = db.other_connections_of_user();
      }
      lines.push_back({"no connection left (server processlist)", n(others), others == 0});
      lines.push_back({"server Threads_connected (incl. this check)",
                       n(db.global_status("Threads_connected"))});
    }
  }
  return lines;
}

std::string report_json(const std::vector<ReportLine>& lines) {
  std::string figures, checks;
  bool all_ok = true;
  for (const ReportLine& l : lines) {
    std::string& out = l.ok < 0 ? figures : checks;
    if (!out.empty()) out += ',';
    out.append(json_string(l.name)).append(":");
    if (l.ok < 0) {
      out += l.value.find_first_not_of("0123456789") == std::string::npos && !l.value.empty()
                 ? l.value
                 : json_string(l.value);
    } else {
      out += l.ok ? "true" : "false";
      all_ok = all_ok && l.ok;
    }
  }
  return "{\"figures\":{" + figures + "},\"checks\":{" + checks + "},\"ok\":" +
         (all_ok ? "true" : "false") + "}";
}

bool print_report(const std::vector<ReportLine>& lines) {
  bool all_ok = true;
  for (const ReportLine& l : lines) {
    if (l.ok < 0) {
      std::printf("  %-48s %14s\n", l.name.c_str(), l.value.c_str());
    } else {
      std::printf("  %-48s %14s  %s\n", l.name.c_str(), l.value.c_str(), l.ok ? "ok" : "FAILED");
      all_ok = all_ok && l.ok;
    }
  }
  return all_ok;
}

HttpResponse json_error(unsigned status, const std::string& message, const std::string& ref) {
  std::string body = "{\"error\":" + json_string(message);
  if (!ref.empty()) body += ",\"ref\":" + json_string(ref);
  return HttpResponse{status, body + "}"};
}

}  // namespace example
