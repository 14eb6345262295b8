// db.cc: the SQLite and MariaDB backends of Db (see db.h).

#include "db.h"

#include <sqlite3.h>

#include <charconv>
#include <mutex>
#include <thread>
#include <cstdlib>
#include <string>
#include <utility>

#ifdef SCOPEREG_EXAMPLE_HAVE_MARIADB
#include <mysql.h>
#include <mysqld_error.h>
#include <errmsg.h>
#endif

namespace example {

ConnectionCounters& connection_counters() {
  static ConnectionCounters counters;
  return counters;
}

bool mariadb_available() {
#ifdef SCOPEREG_EXAMPLE_HAVE_MARIADB
  return true;
#else
  return false;
#endif
}

// ---- URLs ----

namespace {

[[noreturn]] void bad_url(std::string_view text, const std::string& why) {
  throw std::invalid_argument(
      "--db='" + std::string(text) + "': " + why +
      ". Use --db=sqlite (a temporary directory), --db=sqlite:DIR, "
      "--db=mariadb://USER[:PASSWORD]@HOST[:PORT]/DATABASE or "
      "--db=mariadb://USER@localhost/DATABASE?socket=/path/to/mysqld.sock");
}

}  // namespace

DbUrl DbUrl::parse(std::string_view text) {
  DbUrl url;
  if (text == "sqlite" || text.starts_with("sqlite:")) {
    url.kind = Kind::kSqlite;
    url.sqlite_path = text == "sqlite" ? "" : std::string(text.substr(7));
    if (text != "sqlite" && url.sqlite_path.empty()) bad_url(text, "the directory is empty");
    return url;
  }
  constexpr std::string_view kScheme = "mariadb://";
  if (!text.starts_with(kScheme)) bad_url(text, "unknown database kind");
  url.kind = Kind::kMariaDb;
  std::string_view rest = text.substr(kScheme.size());
  const std::size_t at = rest.find('@');
  if (at == std::string_view::npos || at == 0) bad_url(text, "the user is missing (USER@...)");
  const std::string_view credentials = rest.substr(0, at);
  const std::size_t colon = credentials.find(':');
  url.user = std::string(credentials.substr(0, colon));
  if (colon != std::string_view::npos) url.password = std::string(credentials.substr(colon + 1));
  rest = rest.substr(at + 1);
  const std::size_t slash = rest.find('/');
  if (slash == std::string_view::npos) bad_url(text, "the database name is missing (.../DATABASE)");
  std::string_view hostport = rest.substr(0, slash);
  std::string_view path = rest.substr(slash + 1);
  const std::size_t question = path.find('?');
  if (question != std::string_view::npos) {
    const std::string_view query = path.substr(question + 1);
    path = path.substr(0, question);
    if (!query.starts_with("socket=") || query.size() == 7) {
      bad_url(text, "the only option is ?socket=/path/to/mysqld.sock");
    }
    url.socket = std::string(query.substr(7));
  }
  if (path.empty()) bad_url(text, "the database name is empty");
  url.database = std::string(path);
  const std::size_t port_colon = hostport.rfind(':');
  if (port_colon != std::string_view::npos) {
    const std::string_view port = hostport.substr(port_colon + 1);
    unsigned value = 0;
    auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
    if (ec != std::errc() || end != port.data() + port.size() || value == 0 || value > 65535) {
      bad_url(text, "the port '" + std::string(port) + "' is not a number from 1 to 65535");
    }
    url.port = value;
    hostport = hostport.substr(0, port_colon);
  }
  url.host = hostport.empty() ? "localhost" : std::string(hostport);
  if (!mariadb_available()) {
    throw std::invalid_argument(
        "--db=mariadb://...: this request_service was built without MariaDB (CMake did not "
        "find libmariadb). Install libmariadb-dev (or run with SCOPEREG_WITH_SERVICE=1 bash "
        ".ci/deps) and rebuild, or use --db=sqlite");
  }
  return url;
}

std::string DbUrl::describe() const {
  if (kind == Kind::kSqlite) return "sqlite:" + sqlite_path;
  std::string s = "mariadb://";
  s.append(user).append("@").append(host);
  if (port != 0) s.append(":").append(std::to_string(port));
  s.append("/").append(database);
  if (!socket.empty()) s.append("?socket=").append(socket);
  return s;
}

// ---- the backend interface ----

class Db::Backend {
 public:
  virtual ~Backend() = default;
  virtual void exec(const std::string& sql) = 0;
  virtual bool in_transaction() const = 0;
  virtual bool ping() = 0;
  virtual void close() = 0;
  virtual long long last_insert_id() = 0;
  virtual unsigned long long server_id() const { return 0; }
  // `s` as a string literal of the backend's SQL dialect.
  virtual std::string quote(std::string_view s) = 0;
  // Runs a query and calls `row` with each row's columns (NULL as "").
  virtual void query(const std::string& sql,
                     const std::function<void(const std::vector<std::string>&)>& row) = 0;
  virtual void reset_schema() = 0;
};

namespace {

long long to_ll(const std::string& s) { return std::strtoll(s.c_str(), nullptr, 10); }

// ---- SQLite ----

class SqliteBackend final : public Db::Backend {
 public:
  SqliteBackend(const std::string& path, std::function<void()> backoff)
      : backoff_(std::move(backoff)) {
    if (sqlite3_open_v2(path.c_str(), &db_, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE,
                        nullptr) != SQLITE_OK) {
      std::string error = db_ ? sqlite3_errmsg(db_) : "out of memory";
      sqlite3_close(db_);
      throw DbError("cannot open " + path + ": " + error, true);
    }
    ++connection_counters().opened;
    exec("PRAGMA synchronous=NORMAL");
  }
  ~SqliteBackend() override { close(); }

  void close() override {
    if (db_ == nullptr) return;
    sqlite3_close_v2(db_);
    db_ = nullptr;
    ++connection_counters().closed;
  }
  bool in_transaction() const override { return db_ != nullptr && sqlite3_get_autocommit(db_) == 0; }
  bool ping() override {
    if (db_ == nullptr) return false;
    try {
      query("SELECT 1", [](const std::vector<std::string>&) {});
      return true;
    } catch (const DbError&) {
      return false;
    }
  }
  void exec(const std::string& sql) override {
    query(sql == "BEGIN" ? "BEGIN IMMEDIATE" : sql, [](const std::vector<std::string>&) {});
  }
  long long last_insert_id() override { return sqlite3_last_insert_rowid(db_); }
  std::string quote(std::string_view s) override {
    std::string out = "'";
    for (char c : s) {
      if (c == '\'') out += '\'';
      out += c;
    }
    return out + "'";
  }
  void query(const std::string& sql,
             const std::function<void(const std::vector<std::string>&)>& row) override {
    if (db_ == nullptr) throw DbError("the connection is closed", true);
    sqlite3_stmt* stmt = nullptr;
    for (;;) {
      const int rc = sqlite3_prepare_v2(db_, sql.c_str(), -1, &stmt, nullptr);
      if (rc == SQLITE_OK) break;
      if (!busy(rc)) throw DbError(sql + ": " + sqlite3_errmsg(db_), false);
    }
    std::vector<std::string> columns;
    for (;;) {
      const int rc = sqlite3_step(stmt);
      if (rc == SQLITE_DONE) break;
      if (rc == SQLITE_ROW) {
        columns.resize(sqlite3_column_count(stmt));
        for (std::size_t i = 0; i < columns.size(); ++i) {
          const unsigned char* text = sqlite3_column_text(stmt, static_cast<int>(i));
          columns[i] = text ? reinterpret_cast<const char*>(text) : "";
        }
        row(columns);
        continue;
      }
      if (busy(rc)) {
        sqlite3_reset(stmt);
        continue;
      }
      std::string error = sql + ": " + sqlite3_errmsg(db_);
      sqlite3_finalize(stmt);
      throw DbError(error, false);
    }
    sqlite3_finalize(stmt);
  }
  void reset_schema() override {
    exec("PRAGMA journal_mode=WAL");
    exec("DROP TABLE IF EXISTS audit");
    exec("DROP TABLE IF EXISTS orders");
    exec("CREATE TABLE orders(id INTEGER PRIMARY KEY AUTOINCREMENT, ref TEXT NOT NULL UNIQUE, "
         "customer TEXT NOT NULL, amount INTEGER NOT NULL)");
    exec("CREATE TABLE audit(id INTEGER PRIMARY KEY AUTOINCREMENT, order_id INTEGER NOT NULL, "
         "event TEXT NOT NULL)");
  }

 private:
  // Another connection holds the write lock: wait (a fiber yields to the others).
  bool busy(int rc) {
    if (rc != SQLITE_BUSY && rc != SQLITE_LOCKED) return false;
    if (backoff_) backoff_();
    return true;
  }
  sqlite3* db_ = nullptr;
  std::function<void()> backoff_;
};

// ---- MariaDB ----

#ifdef SCOPEREG_EXAMPLE_HAVE_MARIADB

// Error codes that mean the connection is dead: the server closed it (wait_timeout, KILL,
// restart) or the network dropped it.
bool connection_lost(unsigned code) {
  return code == CR_SERVER_GONE_ERROR    // 2006: MySQL server has gone away
         || code == CR_SERVER_LOST       // 2013: Lost connection to server during query
         || code == CR_SERVER_LOST_EXTENDED || code == CR_CONNECTION_ERROR ||
         code == ER_CONNECTION_KILLED    // 1927: Connection was killed
         || code == ER_SERVER_SHUTDOWN || code == CR_COMMANDS_OUT_OF_SYNC;
}

class MariaDbBackend final : public Db::Backend {
 public:
  explicit MariaDbBackend(const DbUrl& url) {
    mysql_ = mysql_init(nullptr);
    if (mysql_ == nullptr) throw DbError("mysql_init: out of memory", true);
    // Never reconnect behind our back: a silent reconnect would lose the transaction
    // without telling us. A dead connection is the pool's business (pre-ping, discard).
    my_bool reconnect = 0;
    mysql_options(mysql_, MYSQL_OPT_RECONNECT, &reconnect);
    unsigned timeout = 5;
    mysql_options(mysql_, MYSQL_OPT_CONNECT_TIMEOUT, &timeout);
    unsigned io_timeout = 30;
    mysql_options(mysql_, MYSQL_OPT_READ_TIMEOUT, &io_timeout);
    mysql_options(mysql_, MYSQL_OPT_WRITE_TIMEOUT, &io_timeout);
    const bool unix_socket = !url.socket.empty();
    if (mysql_real_connect(mysql_, url.host.c_str(), url.user.c_str(),
                           url.password.empty() ? nullptr : url.password.c_str(),
                           url.database.c_str(), unix_socket ? 0 : url.port,
                           unix_socket ? url.socket.c_str() : nullptr, 0) == nullptr) {
      std::string error = "cannot connect to " + url.describe() + ": " + mysql_error(mysql_);
      mysql_close(mysql_);
      throw DbError(error, true);
    }
    ++connection_counters().opened;
  }
  ~MariaDbBackend() override { close(); }

  void close() override {
    if (mysql_ == nullptr) return;
    mysql_close(mysql_);
    mysql_ = nullptr;
    ++connection_counters().closed;
  }
  bool in_transaction() const override {
    return mysql_ != nullptr && (mysql_->server_status & SERVER_STATUS_IN_TRANS) != 0;
  }
  bool ping() override { return mysql_ != nullptr && mysql_ping(mysql_) == 0; }
  void exec(const std::string& sql) override {
    run(sql == "BEGIN" ? "START TRANSACTION" : sql);
  }
  long long last_insert_id() override { return static_cast<long long>(mysql_insert_id(mysql_)); }
  unsigned long long server_id() const override { return mysql_ ? mysql_thread_id(mysql_) : 0; }
  std::string quote(std::string_view s) override {
    if (mysql_ == nullptr) throw DbError("the connection is closed", true);
    std::string out(2 * s.size() + 3, '\0');
    out[0] = '\'';
    const unsigned long n = mysql_real_escape_string(mysql_, out.data() + 1, s.data(), s.size());
    out.resize(n + 1);
    return out + "'";
  }
  void query(const std::string& sql,
             const std::function<void(const std::vector<std::string>&)>& row) override {
    run(sql);
    MYSQL_RES* result = mysql_store_result(mysql_);
    if (result == nullptr) {
      if (mysql_field_count(mysql_) != 0) fail(sql);
      return;
    }
    const unsigned n = mysql_num_fields(result);
    std::vector<std::string> columns(n);
    while (MYSQL_ROW r = mysql_fetch_row(result)) {
      for (unsigned i = 0; i < n; ++i) columns[i] = r[i] ? r[i] : "";
      row(columns);
    }
    mysql_free_result(result);
  }
  void reset_schema() override {
    run("DROP TABLE IF EXISTS audit");
    run("DROP TABLE IF EXISTS orders");
    run("CREATE TABLE orders(id BIGINT AUTO_INCREMENT PRIMARY KEY, ref VARCHAR(64) NOT NULL "
        "UNIQUE, customer VARCHAR(64) NOT NULL, amount INT NOT NULL) ENGINE=InnoDB");
    run("CREATE TABLE audit(id BIGINT AUTO_INCREMENT PRIMARY KEY, order_id BIGINT NOT NULL, "
        "event VARCHAR(64) NOT NULL, KEY(order_id)) ENGINE=InnoDB");
  }

 private:
  void run(const std::string& sql) {
    if (mysql_ == nullptr) throw DbError("the connection is closed", true);
    if (mysql_real_query(mysql_, sql.data(), sql.size()) != 0) fail(sql);
  }
  [[noreturn]] void fail(const std::string& sql) {
    const unsigned code = mysql_errno(mysql_);
    throw DbError(sql.substr(0, 60) + ": error " + std::to_string(code) + ": " +
                      mysql_error(mysql_),
                  connection_lost(code));
  }
  MYSQL* mysql_ = nullptr;
};

#endif  // SCOPEREG_EXAMPLE_HAVE_MARIADB

}  // namespace

// ---- Db ----

Db Db::open(const DbUrl& url, std::function<void()> backoff) {
#ifdef SCOPEREG_EXAMPLE_HAVE_MARIADB
  if (url.kind == DbUrl::Kind::kMariaDb) {
    // The client library's global set-up is not thread-safe: once, before any connection.
    static std::once_flag once;
    std::call_once(once, [] { mysql_library_init(0, nullptr, nullptr); });
    return Db(std::make_unique<MariaDbBackend>(url));
  }
#endif
  if (url.kind != DbUrl::Kind::kSqlite) throw DbError("MariaDB support is not built in", false);
  return Db(std::make_unique<SqliteBackend>(url.sqlite_path, std::move(backoff)));
}

Db::Db(std::unique_ptr<Backend> backend) : backend_(std::move(backend)) {}
Db::Db(Db&&) noexcept = default;
Db& Db::operator=(Db&&) noexcept = default;
Db::~Db() = default;

void Db::begin() { backend_->exec("BEGIN"); }
void Db::commit() { backend_->exec("COMMIT"); }
void Db::rollback() { backend_->exec("ROLLBACK"); }
bool Db::in_transaction() const { return backend_->in_transaction(); }
bool Db::ping() { return backend_->ping(); }
void Db::close() { backend_->close(); }
unsigned long long Db::server_id() const { return backend_->server_id(); }

bool Db::wait_until_gone(unsigned long long id, std::chrono::milliseconds limit) {
  if (id == 0) return true;
  const auto deadline = std::chrono::steady_clock::now() + limit;
  const std::string sql =
      "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = " + std::to_string(id);
  while (column(sql) != std::vector<std::string>{"0"}) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}
long long Db::insert_order(std::string_view customer, long amount, std::string_view ref) {
  backend_->exec("INSERT INTO orders(ref, customer, amount) VALUES(" + backend_->quote(ref) +
                 ", " + backend_->quote(customer) + ", " + std::to_string(amount) + ")");
  return backend_->last_insert_id();
}

void Db::insert_audit(long long order_id, std::string_view event) {
  backend_->exec("INSERT INTO audit(order_id, event) VALUES(" + std::to_string(order_id) + ", " +
                 backend_->quote(event) + ")");
}

std::optional<Order> Db::find_order(long long id) {
  std::optional<Order> order;
  backend_->query(
      "SELECT o.id, o.customer, o.amount, o.ref, (SELECT COUNT(*) FROM audit a WHERE "
      "a.order_id = o.id) FROM orders o WHERE o.id = " + std::to_string(id),
      [&](const std::vector<std::string>& r) {
        order = Order{to_ll(r[0]), r[1], static_cast<long>(to_ll(r[2])), r[3],
                      static_cast<int>(to_ll(r[4]))};
      });
  return order;
}

bool Db::has_ref(std::string_view ref) {
  bool found = false;
  backend_->query("SELECT 1 FROM orders WHERE ref = " + backend_->quote(ref),
                  [&](const std::vector<std::string>&) { found = true; });
  return found;
}

void Db::reset_schema() { backend_->reset_schema(); }
void Db::exec(const std::string& sql) { backend_->exec(sql); }

std::vector<std::string> Db::column(const std::string& sql) {
  std::vector<std::string> values;
  backend_->query(sql, [&](const std::vector<std::string>& r) { values.push_back(r.at(0)); });
  return values;
}

std::vector<std::pair<long long, std::string>> Db::all_order_refs() {
  std::vector<std::pair<long long, std::string>> refs;
  backend_->query("SELECT id, ref FROM orders", [&](const std::vector<std::string>& r) {
    refs.emplace_back(to_ll(r[0]), r[1]);
  });
  return refs;
}

std::vector<long long> Db::all_audit_order_ids() {
  std::vector<long long> ids;
  backend_->query("SELECT order_id FROM audit",
                  [&](const std::vector<std::string>& r) { ids.push_back(to_ll(r[0])); });
  return ids;
}

long Db::other_connections_of_user() {
  long n = -1;
  backend_->query(
      "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = SUBSTRING_INDEX(USER(), '@', 1) "
      "AND ID <> CONNECTION_ID()",
      [&](const std::vector<std::string>& r) { n = to_ll(r[0]); });
  return n;
}

long Db::global_status(std::string_view name) {
  long n = -1;
  backend_->query("SHOW GLOBAL STATUS LIKE '" + std::string(name) + "'",
                  [&](const std::vector<std::string>& r) { n = to_ll(r[1]); });
  return n;
}

}  // namespace example
