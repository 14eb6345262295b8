// Tests of request_service's front end: body parsing, database URLs, and the HTTP server
// under bad input, disconnecting and slow clients, for every scope strategy. Each server
// test runs a real server on a loopback port over a fresh SQLite database and talks to it
// over real sockets.

#include <utility>  // before Asio/Beast (g++ 12 with Boost 1.74)

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <stdlib.h>

#include <cstdlib>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <optional>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include "db.h"
#include "gtest/gtest.h"
#include "http_server.h"
#include "order_body.h"
#include "service.h"
#include "strategies.h"

namespace example {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using namespace std::chrono_literals;

// ---- body parsing ----

TEST(OrderBody, AcceptsJsonAndForm) {
  ParsedOrder p = parse_order("application/json",
                              R"( {"customer": "alice b", "amount": 42, "ref": "k-1.x"} )");
  ASSERT_TRUE(p.ok) << p.error;
  EXPECT_EQ(p.order.customer, "alice b");
  EXPECT_EQ(p.order.amount, 42);
  EXPECT_EQ(p.order.ref, "k-1.x");

  p = parse_order("application/json; charset=utf-8", R"({"amount":7,"customer":"bob\u0040x"})");
  ASSERT_TRUE(p.ok) << p.error;
  EXPECT_EQ(p.order.customer, "bob@x");
  EXPECT_EQ(p.order.ref, "");

  p = parse_order("application/x-www-form-urlencoded", "customer=carol+d%40e&amount=1000000&ref=r1");
  ASSERT_TRUE(p.ok) << p.error;
  EXPECT_EQ(p.order.customer, "carol d@e");
  EXPECT_EQ(p.order.amount, 1000000);
}

TEST(OrderBody, RefusesWhatIsNotStrictlyAnOrder) {
  struct Case {
    const char* type;
    const char* body;
    const char* says;  // a piece of the message
  } cases[] = {
      {"application/json", "", "must be a JSON object"},
      {"application/json", "[1]", "must be a JSON object"},
      {"application/json", R"({"customer":"a","amount":1} x)", "unexpected bytes"},
      {"application/json", R"({"customer":"a","amount":1.5})", "integer"},
      {"application/json", R"({"customer":"a","amount":1e3})", "integer"},
      {"application/json", R"({"customer":"a","amount":01})", "integer"},
      {"application/json", R"({"customer":"a","amount":"1"})", "integer"},
      {"application/json", R"({"customer":"a","amount":0})", "from 1 to 1000000"},
      {"application/json", R"({"customer":"a","amount":1000001})", "from 1 to 1000000"},
      {"application/json", R"({"customer":"a","amount":99999999999999999999})", "integer"},
      {"application/json", R"({"customer":{"x":1},"amount":1})", "string or an integer"},
      {"application/json", R"({"customer":"a","amount":1,"amount":2})", "repeated"},
      {"application/json", R"({"customer":"a","amount":1,"admin":true})", "string or an integer"},
      {"application/json", R"({"customer":"a","amount":1,"admin":"x"})", "unknown field"},
      {"application/json", R"({"amount":1})", "\"customer\" is required"},
      {"application/json", R"({"customer":"a"})", "\"amount\" is required"},
      {"application/json", R"({"customer":"a;drop","amount":1})", "\"customer\" must be"},
      {"application/json", R"({"customer":"","amount":1})", "\"customer\" must be"},
      {"application/json", R"({"customer":"a","amount":1,"ref":"a b"})", "\"ref\" must be"},
      {"application/json", R"({"customer":"a\u00e9","amount":1})", "outside ASCII"},
      {"application/json", R"({"customer":"a,"amount":1})", "expected"},
      {"application/json", R"({"customer":"a")", "expected ',' or '}'"},
      {"application/json", R"({"customer":"a","amount":1)", "expected ',' or '}'"},
      {"application/json", R"({"customer":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","amount":1})",
       "longer than 64"},
      {"application/x-www-form-urlencoded", "customer=a&amount=x", "integer"},
      {"application/x-www-form-urlencoded", "customer=a&amount", "without '='"},
      {"application/x-www-form-urlencoded", "customer=a%2&amount=1", "%-escape"},
      {"application/x-www-form-urlencoded", "", "empty"},
  };
  for (const Case& c : cases) {
    const ParsedOrder p = parse_order(c.type, c.body);
    EXPECT_FALSE(p.ok) << c.body;
    EXPECT_EQ(p.status, 400u) << c.body;
    EXPECT_NE(p.error.find(c.says), std::string::npos) << c.body << " -> " << p.error;
  }
  const ParsedOrder p = parse_order("text/plain", "customer=a&amount=1");
  EXPECT_FALSE(p.ok);
  EXPECT_EQ(p.status, 415u);
}

// ---- database URLs ----

TEST(DbUrl, ParsesTheAcceptedForms) {
  EXPECT_EQ(DbUrl::parse("sqlite").kind, DbUrl::Kind::kSqlite);
  EXPECT_EQ(DbUrl::parse("sqlite:/tmp/x").sqlite_path, "/tmp/x");
  if (!mariadb_available()) GTEST_SKIP() << "built without libmariadb";
  DbUrl u = DbUrl::parse("mariadb://me:secret@127.0.0.1:3307/shop");
  EXPECT_EQ(u.user, "me");
  EXPECT_EQ(u.password, "secret");
  EXPECT_EQ(u.host, "127.0.0.1");
  EXPECT_EQ(u.port, 3307u);
  EXPECT_EQ(u.database, "shop");
  EXPECT_EQ(u.describe().find("secret"), std::string::npos);
  u = DbUrl::parse("mariadb://me@localhost/shop?socket=/run/m.sock");
  EXPECT_EQ(u.socket, "/run/m.sock");
  EXPECT_EQ(u.port, 0u);
}

TEST(DbUrl, RefusesBadOnesNamingTheForms) {
  for (const char* bad : {"postgres://x@y/z", "sqlite:", "mariadb://localhost/db",
                          "mariadb://me@localhost", "mariadb://me@localhost:99999/db",
                          "mariadb://me@localhost:x/db", "mariadb://me@localhost/",
                          "mariadb://me@localhost/db?sock=/x"}) {
    try {
      DbUrl::parse(bad);
      ADD_FAILURE() << bad << " was accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("--db=mariadb://USER"), std::string::npos)
          << bad << ": " << e.what();
    }
  }
}

// ---- the server ----

// Every strategy this build has (coroutine: with scopereg::asio).
const char* const kStrategies[] = {"thread", "fiber", "explicit",
#ifdef SCOPEREG_EXAMPLE_HAVE_COROUTINE
                                   "coroutine",
#endif
};

struct Reply {
  unsigned status = 0;
  std::string body;
};

// A raw client: sends bytes, reads one HTTP response (status 0 if none came).
class RawClient {
 public:
  explicit RawClient(unsigned short port) : socket_(io_) {
    socket_.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port));
  }
  void send(const std::string& bytes) { asio::write(socket_, asio::buffer(bytes)); }
  Reply read() {
    http::response<http::string_body> response;
    beast::error_code ec;
    http::read(socket_, buffer_, response, ec);
    if (ec) return {};
    return {response.result_int(), response.body()};
  }
  // Whether the server closed the connection (reads EOF).
  bool closed_by_server() {
    char c;
    beast::error_code ec;
    socket_.read_some(asio::buffer(&c, 1), ec);
    return ec == asio::error::eof || ec == asio::error::connection_reset;
  }
  void close() { socket_.close(); }

 private:
  asio::io_context io_;
  tcp::socket socket_;
  beast::flat_buffer buffer_;
};

std::string post(const std::string& body, const std::string& type = "application/json") {
  return "POST /orders HTTP/1.1\r\nHost: t\r\nContent-Type: " + type +
         "\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
}
std::string get(const std::string& target) {
  return "GET " + target + " HTTP/1.1\r\nHost: t\r\n\r\n";
}

class ServerTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/scopereg-example-test-XXXXXX";
    ASSERT_NE(mkdtemp(pattern), nullptr);
    dir_ = pattern;
    url_.sqlite_path = dir_ + "/orders.db";
    Db::open(url_).reset_schema();
    StrategyOptions s{.name = GetParam(), .workers = 2, .fibers = 2};
    store_ = std::make_unique<Store>(StoreOptions{url_, concurrency(s), backoff_for(s), true});
    dispatcher_ = make_dispatcher(s, *store_);
    server_ = std::make_unique<HttpServer>(
        *dispatcher_, ServerOptions{.body_limit = 1024, .io_timeout = 300ms});
  }
  void TearDown() override {
    if (server_) server_->stop();
    server_.reset();
    dispatcher_.reset();
    store_.reset();
    std::filesystem::remove_all(dir_);
  }

  unsigned short port() const { return server_->port(); }
  Reply exchange(const std::string& bytes) {
    RawClient c(port());
    c.send(bytes);
    return c.read();
  }
  long rows() {
    Db db = Db::open(url_);
    return static_cast<long>(db.all_order_refs().size() + db.all_audit_order_ids().size());
  }
  // Waits until no request is in flight and every session is back in the pool.
  bool settled() {
    for (int i = 0; i < 200; ++i) {
      if (store_->counters().in_flight == 0 && store_->pool()->stats().checked_out == 0) return true;
      std::this_thread::sleep_for(10ms);
    }
    return false;
  }
  // The service still works: a good order is stored.
  void expect_still_serving(const std::string& ref) {
    const Reply r = exchange(post(R"({"customer":"ok","amount":5,"ref":")" + ref + "\"}"));
    EXPECT_EQ(r.status, 201u) << r.body;
    Db db = Db::open(url_);
    EXPECT_TRUE(db.has_ref(ref));
  }

  std::string dir_;
  DbUrl url_;
  std::unique_ptr<Store> store_;
  std::unique_ptr<Dispatcher> dispatcher_;
  std::unique_ptr<HttpServer> server_;
};

TEST_P(ServerTest, StoresAndReadsAnOrder) {
  Reply r = exchange(post(R"({"customer":"alice","amount":42,"ref":"a1"})"));
  ASSERT_EQ(r.status, 201u) << r.body;
  EXPECT_NE(r.body.find(R"("ref":"a1")"), std::string::npos);
  const std::string id = r.body.substr(6, r.body.find(',') - 6);  // {"id":N,...
  r = exchange(get("/orders/" + id));
  EXPECT_EQ(r.status, 200u);
  EXPECT_NE(r.body.find(R"("customer":"alice","amount":42,"ref":"a1","audited":true)"),
            std::string::npos) << r.body;
  r = exchange(post("customer=bob&amount=3", "application/x-www-form-urlencoded"));
  EXPECT_EQ(r.status, 201u) << r.body;
  r = exchange(post(R"({"customer":"alice","amount":42,"ref":"a1"})"));
  EXPECT_EQ(r.status, 409u) << r.body;  // the ref exists: refused, rolled back
  EXPECT_EQ(rows(), 4);
  r = exchange(get("/stats"));
  EXPECT_EQ(r.status, 200u);
  EXPECT_NE(r.body.find(R"("ok":true)"), std::string::npos) << r.body;
  EXPECT_TRUE(settled());
  EXPECT_EQ(store_->counters().commits, 2);
  EXPECT_EQ(store_->counters().rollbacks, 1);
}

TEST_P(ServerTest, MalformedHttpIs400AndWritesNothing) {
  for (const char* bad : {"BLAH\r\n\r\n", "GET /orders/1 HTTP/9.9\r\n\r\n",
                          "POST /orders HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                          "GET / HTTP/1.1\r\nBad Header\r\n\r\n"}) {
    RawClient c(port());
    c.send(bad);
    const Reply r = c.read();
    EXPECT_EQ(r.status, 400u) << bad << " -> " << r.body;
    EXPECT_NE(r.body.find("malformed HTTP"), std::string::npos) << r.body;
    EXPECT_TRUE(c.closed_by_server()) << bad;
  }
  EXPECT_EQ(rows(), 0);
  expect_still_serving("after-malformed");
}

TEST_P(ServerTest, TooLargeIs413AndWritesNothing) {
  const std::string big = R"({"customer":"a","amount":1,"ref":")" + std::string(2000, 'x') + "\"}";
  Reply r = exchange(post(big));
  EXPECT_EQ(r.status, 413u) << r.body;
  r = exchange("GET /stats HTTP/1.1\r\nHost: t\r\nX-Big: " + std::string(10000, 'y') + "\r\n\r\n");
  EXPECT_EQ(r.status, 431u) << r.body;
  EXPECT_EQ(rows(), 0);
  expect_still_serving("after-large");
}

TEST_P(ServerTest, UnknownPathsAndMethodsAreRefused) {
  EXPECT_EQ(exchange(get("/")).status, 404u);
  EXPECT_EQ(exchange(get("/orders/../../etc/passwd")).status, 400u);
  EXPECT_EQ(exchange(get("/orders/12x")).status, 400u);
  EXPECT_EQ(exchange(get("/orders/")).status, 400u);
  EXPECT_EQ(exchange(get("/orders/999")).status, 404u);
  EXPECT_EQ(exchange(get("/orders")).status, 405u);
  EXPECT_EQ(exchange("DELETE /orders/1 HTTP/1.1\r\nHost: t\r\n\r\n").status, 405u);
  EXPECT_EQ(exchange(post("{}", "text/plain")).status, 415u);
  EXPECT_EQ(rows(), 0);
  EXPECT_TRUE(settled());
  expect_still_serving("after-unknown");
}

TEST_P(ServerTest, InvalidBodiesAre400WithTheReasonAndWriteNothing) {
  Reply r = exchange(post(R"({"customer":"a","amount":1.5})"));
  EXPECT_EQ(r.status, 400u);
  EXPECT_NE(r.body.find("integer"), std::string::npos) << r.body;
  r = exchange(post(R"({"customer":"a","amount":1,"extra":"x"})"));
  EXPECT_EQ(r.status, 400u);
  EXPECT_NE(r.body.find("unknown field"), std::string::npos) << r.body;
  r = exchange(post("not json"));
  EXPECT_EQ(r.status, 400u);
  EXPECT_EQ(rows(), 0);
  expect_still_serving("after-invalid");
}

TEST_P(ServerTest, AClientDisconnectingMidRequestWritesNothing) {
  {
    RawClient c(port());
    const std::string whole = post(R"({"customer":"gone","amount":1,"ref":"gone"})");
    c.send(whole.substr(0, whole.size() - 10));  // the body is cut short
    c.close();
  }
  {
    RawClient c(port());
    c.send("POST /orders HTTP/1.1\r\nHost: t\r\nContent-");  // inside the headers
    c.close();
  }
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(rows(), 0);
  EXPECT_TRUE(settled());
  expect_still_serving("after-disconnect");
}

TEST_P(ServerTest, AClientLeavingBeforeTheResponseStillEndsItsScope) {
  {
    RawClient c(port());
    c.send(post(R"({"customer":"left","amount":1,"ref":"left"})"));
    c.close();  // never reads the answer
  }
  EXPECT_TRUE(settled());
  for (int i = 0; i < 100 && store_->counters().requests < 1; ++i) std::this_thread::sleep_for(10ms);
  EXPECT_TRUE(settled());
  EXPECT_EQ(store_->pool()->stats().checked_out, 0u);
  Db db = Db::open(url_);
  EXPECT_TRUE(db.has_ref("left"));  // the request ran whole: committed
  expect_still_serving("after-leaving");
}

TEST_P(ServerTest, ASlowClientTimesOutWithoutHoldingASession) {
  RawClient slow(port());
  slow.send("POST /orders HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n");
  // While it stalls, others are served and no session is held for it.
  expect_still_serving("while-slow");
  EXPECT_TRUE(settled());
  std::this_thread::sleep_for(400ms);  // past the 300 ms limit
  EXPECT_TRUE(slow.closed_by_server());  // closed, never handed to a strategy
  EXPECT_EQ(rows(), 2);  // the one order of expect_still_serving
  EXPECT_TRUE(settled());
}

TEST_P(ServerTest, ASlowReaderDoesNotHoldItsSession) {
  RawClient slow(port());
  slow.send(post(R"({"customer":"slow","amount":1,"ref":"slow"})"));
  // It does not read yet: its request has run, its scope ended, its session is back.
  for (int i = 0; i < 200 && store_->counters().requests < 1; ++i) std::this_thread::sleep_for(5ms);
  EXPECT_TRUE(settled());
  EXPECT_EQ(store_->pool()->stats().checked_out, 0u);
  expect_still_serving("while-slow-reader");
  const Reply r = slow.read();
  EXPECT_EQ(r.status, 201u) << r.body;
}

TEST_P(ServerTest, KeepAliveServesManyRequestsOnOneConnection) {
  RawClient c(port());
  for (int i = 0; i < 20; ++i) {
    c.send(post(R"({"customer":"k","amount":1,"ref":"k)" + std::to_string(i) + "\"}"));
    const Reply r = c.read();
    ASSERT_EQ(r.status, 201u) << r.body;
  }
  EXPECT_EQ(rows(), 40);
}

INSTANTIATE_TEST_SUITE_P(Strategies, ServerTest, ::testing::ValuesIn(kStrategies),
                         [](const auto& info) { return std::string(info.param); });

#ifdef SCOPEREG_EXAMPLE_HAVE_COROUTINE
// The coroutine dispatcher without the server: submit() runs the same task as run() and
// calls back after the task's teardown (scopereg::asio::teardown_of) -- the session is
// already back in the pool when `done` runs, committed or rolled back.
TEST(CoroutineStrategy, SubmitCallsBackAfterTheTaskTeardown) {
  char pattern[] = "/tmp/scopereg-example-test-XXXXXX";
  ASSERT_NE(mkdtemp(pattern), nullptr);
  const std::string dir = pattern;
  DbUrl url;
  url.sqlite_path = dir + "/orders.db";
  Db::open(url).reset_schema();
  {
    const StrategyOptions s{.name = "coroutine", .workers = 2};
    Store store(StoreOptions{url, concurrency(s), backoff_for(s), true});
    std::unique_ptr<Dispatcher> dispatcher = make_dispatcher(s, store);
    auto order = [&](const std::string& ref) {
      std::promise<std::pair<HttpResponse, std::size_t>> answered;
      dispatcher->submit(
          HttpRequest{"POST", "/orders", "application/json",
                      R"({"customer":"c","amount":3,"ref":")" + ref + "\"}"},
          [&](HttpResponse r) { answered.set_value({r, store.pool()->stats().checked_out}); });
      return answered.get_future().get();
    };
    auto [created, held] = order("c1");
    EXPECT_EQ(created.status, 201u) << created.body;
    EXPECT_EQ(held, 0u);  // checked in by the teardown, before the callback
    auto [refused, held_after] = order("c1");
    EXPECT_EQ(refused.status, 409u) << refused.body;
    EXPECT_EQ(held_after, 0u);
    dispatcher->shutdown();
    EXPECT_EQ(store.counters().commits, 1);
    EXPECT_EQ(store.counters().rollbacks, 1);  // the failed task's teardown rolled back
    EXPECT_TRUE(Db::open(url).has_ref("c1"));
    store.close_pool();
  }
  std::filesystem::remove_all(dir);
}
#endif

// ---- on a real MariaDB server: the seed's failure ----

// A throwaway server for the suite (.ci/mariadb); the tests skip, with the reason, where
// none can run.
class MariaDbTest : public ::testing::TestWithParam<const char*> {
 protected:
  static void SetUpTestSuite() {
    if (!mariadb_available()) {
      skip_reason_ = "request_service was built without libmariadb";
      return;
    }
    char pattern[] = "/tmp/scopereg-mariadb-test-XXXXXX";
    if (mkdtemp(pattern) == nullptr) {
      skip_reason_ = "mkdtemp failed";
      return;
    }
    dir_ = pattern;
    const std::string command = "WAIT_TIMEOUT=30 bash " SCOPEREG_SOURCE_DIR "/.ci/mariadb start " +
                                dir_ + " >" + dir_ + ".log 2>&1";
    const int status = std::system(command.c_str());
    if (status != 0) {
      skip_reason_ = "no MariaDB server could start here (.ci/mariadb: see " + dir_ + ".log)";
      dir_.clear();
      return;
    }
    std::ifstream env(dir_ + "/env");
    for (std::string line; std::getline(env, line);) {
      if (line.starts_with("SCOPEREG_MARIADB_URL=")) url_ = DbUrl::parse(line.substr(21));
    }
  }
  static void TearDownTestSuite() {
    if (dir_.empty()) return;
    const std::string command = "bash " SCOPEREG_SOURCE_DIR "/.ci/mariadb stop " + dir_;
    EXPECT_EQ(std::system(command.c_str()), 0);
    std::filesystem::remove(dir_ + ".log");
  }

  void SetUp() override {
    if (!skip_reason_.empty()) GTEST_SKIP() << "SKIPPED: " << skip_reason_;
    Db::open(url_).reset_schema();
    StrategyOptions s{.name = GetParam(), .workers = 2, .fibers = 2};
    store_ = std::make_unique<Store>(StoreOptions{url_, 2, backoff_for(s), true});
    dispatcher_ = make_dispatcher(s, *store_);
    server_ = std::make_unique<HttpServer>(*dispatcher_, ServerOptions{});
    admin_.emplace(Db::open(url_));  // the same user may KILL its own connections
  }
  void TearDown() override {
    if (server_) server_->stop();
    server_.reset();
    dispatcher_.reset();
    if (store_) store_->close_pool();
    store_.reset();
    admin_.reset();
  }

  Reply order(const std::string& ref) {
    RawClient c(server_->port());
    c.send(post(R"({"customer":"m","amount":9,"ref":")" + ref + "\"}"));
    return c.read();
  }
  // The service's connections (all but the admin's), or those running a statement.
  std::vector<std::string> service_connections(bool busy_only) {
    return admin_->column(
        "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = 'scopereg' AND "
        "ID <> CONNECTION_ID()" + std::string(busy_only ? " AND COMMAND = 'Query'" : ""));
  }

  static inline std::string dir_, skip_reason_;
  static inline DbUrl url_;
  std::unique_ptr<Store> store_;
  std::unique_ptr<Dispatcher> dispatcher_;
  std::unique_ptr<HttpServer> server_;
  std::optional<Db> admin_;
};

TEST_P(MariaDbTest, AnIdleConnectionTheServerDroppedIsReplacedByThePrePing) {
  ASSERT_EQ(order("warm").status, 201u);  // one connection, idle in the pool now
  const auto idle = service_connections(false);
  ASSERT_EQ(idle.size(), 1u);
  admin_->exec("KILL CONNECTION " + idle[0]);
  const Reply r = order("after-kill");
  EXPECT_EQ(r.status, 201u) << r.body;  // the request never saw the dead connection
  const scopereg::PoolStats stats = store_->pool()->stats();
  EXPECT_EQ(stats.ping_failures, 1u);
  EXPECT_EQ(stats.connects, 2u);
  EXPECT_EQ(store_->counters().status_5xx, 0);
}

TEST_P(MariaDbTest, AConnectionKilledMidTransactionFailsOnlyThatRequestAndIsDiscarded) {
  ASSERT_EQ(order("warm").status, 201u);
  // Hold the table: the next request's INSERT waits inside its transaction.
  admin_->exec("LOCK TABLES orders WRITE");
  RawClient victim(server_->port());
  victim.send(post(R"({"customer":"m","amount":9,"ref":"victim"})"));
  std::vector<std::string> busy;
  for (int i = 0; i < 500 && busy.empty(); ++i) {
    std::this_thread::sleep_for(10ms);
    busy = service_connections(true);
  }
  ASSERT_EQ(busy.size(), 1u) << "the request never reached the database";
  admin_->exec("KILL CONNECTION " + busy[0]);
  admin_->exec("UNLOCK TABLES");
  const Reply r = victim.read();
  EXPECT_EQ(r.status, 503u) << r.body;
  EXPECT_NE(r.body.find("connection lost"), std::string::npos) << r.body;
  EXPECT_NE(r.body.find(R"("ref":"victim")"), std::string::npos) << r.body;
  EXPECT_FALSE(admin_->has_ref("victim"));  // rolled back with its connection
  const scopereg::PoolStats stats = store_->pool()->stats();
  EXPECT_EQ(stats.invalidated, 1u);  // discarded, not returned to the pool
  EXPECT_EQ(stats.checked_out, 0u);
  EXPECT_EQ(store_->counters().lost_connections, 1);
  EXPECT_EQ(order("next").status, 201u);  // the service keeps answering
  EXPECT_TRUE(admin_->has_ref("next"));
}

INSTANTIATE_TEST_SUITE_P(Strategies, MariaDbTest, ::testing::ValuesIn(kStrategies),
                         [](const auto& info) { return std::string(info.param); });

}  // namespace
}  // namespace example
