// db.h: the example's database connection, on SQLite (embedded, the default) or on a
// MariaDB server (when the example was built with libmariadb). One `Db` is one connection;
// the service keeps them in a scopereg::Pool<Db>.
//
//   DbUrl url = DbUrl::parse("mariadb://scopereg@127.0.0.1:3306/scopereg");
//   Db db = Db::open(url);
//   db.begin();
//   long long id = db.insert_order("alice", 42, "ref-1");
//   db.insert_audit(id, "order placed");
//   db.commit();
//
// Errors throw DbError; `lost()` tells a dead connection ("server has gone away", a KILL,
// the connection dropped mid-query) from an error in the statement itself.

#ifndef SCOPEREG_EXAMPLES_DB_H_
#define SCOPEREG_EXAMPLES_DB_H_

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace example {

class DbError : public std::runtime_error {
 public:
  DbError(const std::string& what, bool lost) : std::runtime_error(what), lost_(lost) {}
  // The connection is gone: the session must be discarded, never reused.
  bool lost() const { return lost_; }

 private:
  bool lost_;
};

// Where the data lives: --db=sqlite[:DIR] or --db=mariadb://USER[:PASSWORD]@HOST[:PORT]/DB
// (TCP) or --db=mariadb://USER@localhost/DB?socket=/path/to/mysqld.sock (Unix socket).
struct DbUrl {
  enum class Kind { kSqlite, kMariaDb } kind = Kind::kSqlite;
  std::string sqlite_path;  // the database file
  std::string user, password, host, database, socket;
  unsigned port = 0;

  // Throws std::invalid_argument naming what is wrong and the accepted forms.
  static DbUrl parse(std::string_view text);
  std::string describe() const;  // without the password
};

// Whether this build has the MariaDB backend (libmariadb was found by CMake).
bool mariadb_available();

struct Order {
  long long id = 0;
  std::string customer;
  long amount = 0;
  std::string ref;
  int audit_rows = 0;
};

// Counts every connection opened and closed, process-wide, so that leaks show.
struct ConnectionCounters {
  std::atomic<long> opened{0}, closed{0};
};
ConnectionCounters& connection_counters();

class Db {
 public:
  class Backend;
  // Opens a connection. `backoff` is called while SQLite is busy (a fiber yields there).
  static Db open(const DbUrl& url, std::function<void()> backoff = {});
  Db(Db&&) noexcept;
  Db& operator=(Db&&) noexcept;
  ~Db();

  void begin();
  void commit();
  void rollback();
  bool in_transaction() const;
  bool ping();   // a round trip to the server: false when the connection is dead
  // The server's id of this connection (its processlist ID); 0 for SQLite.
  unsigned long long server_id() const;
  // MariaDB: waits (up to `limit`) until the server has finished with connection `id` --
  // a KILLed connection's thread may still be completing its COMMIT. False on timeout.
  bool wait_until_gone(unsigned long long id, std::chrono::milliseconds limit);
  void close();  // idempotent

  long long insert_order(std::string_view customer, long amount, std::string_view ref);
  void insert_audit(long long order_id, std::string_view event);
  std::optional<Order> find_order(long long id);
  bool has_ref(std::string_view ref);
  // Every order's (id, ref), and the order id of every audit row: the invariant checks.
  std::vector<std::pair<long long, std::string>> all_order_refs();
  std::vector<long long> all_audit_order_ids();

  // Any statement, and a query's first column (administration and tests).
  void exec(const std::string& sql);
  std::vector<std::string> column(const std::string& sql);

  // Drops and creates the tables: every run starts empty.
  void reset_schema();
  // MariaDB only: connections of this connection's user other than itself (processlist).
  long other_connections_of_user();
  // MariaDB only: SHOW GLOBAL STATUS value, e.g. "Threads_connected".
  long global_status(std::string_view name);

 private:
  explicit Db(std::unique_ptr<Backend> backend);
  std::unique_ptr<Backend> backend_;
};

}  // namespace example

#endif  // SCOPEREG_EXAMPLES_DB_H_
