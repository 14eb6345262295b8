// load_generator.cc: see load_generator.h. Blocking Beast clients, one thread per
// connection.

#include <utility>  // before Asio/Beast (g++ 12 with Boost 1.74)

#include "load_generator.h"

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdio>
#include <mutex>
#include <thread>

#include <unistd.h>

namespace example {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

namespace {

double percentile(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  const std::size_t k = std::min(v.size() - 1, static_cast<std::size_t>(p * (v.size() - 1) + 0.5));
  std::nth_element(v.begin(), v.begin() + static_cast<long>(k), v.end());
  return v[k];
}

// One keep-alive connection; reconnects after a transport error.
class Client {
 public:
  Client(const LoadOptions& o) : options_(o), socket_(io_) {}

  // Sends one request; the status, or 0 on a transport error.
  unsigned send(http::verb verb, const std::string& target, const std::string& body,
                std::string* response_body) {
    beast::error_code ec;
    if (!socket_.is_open()) {
      tcp::resolver resolver(io_);
      asio::connect(socket_, resolver.resolve(options_.host, std::to_string(options_.port), ec), ec);
      if (ec) return fail();
      socket_.set_option(tcp::no_delay(true), ec);
    }
    http::request<http::string_body> request{verb, target, 11};
    request.set(http::field::host, options_.host);
    if (verb == http::verb::post) {
      request.set(http::field::content_type, "application/json");
      request.body() = body;
    }
    request.prepare_payload();
    http::write(socket_, request, ec);
    if (ec) return fail();
    http::response<http::string_body> response;
    http::read(socket_, buffer_, response, ec);
    if (ec) return fail();
    if (!response.keep_alive()) socket_.close(ec);
    if (response_body != nullptr) *response_body = std::move(response.body());
    return response.result_int();
  }

 private:
  unsigned fail() {
    beast::error_code ignored;
    socket_.close(ignored);
    buffer_.clear();
    return 0;
  }
  const LoadOptions& options_;
  asio::io_context io_;
  tcp::socket socket_;
  beast::flat_buffer buffer_;
};

long long id_in(const std::string& body) {
  const std::size_t at = body.find("\"id\":");
  return at == std::string::npos ? 0 : std::atoll(body.c_str() + at + 5);
}

}  // namespace

LoadResult run_load(const LoadOptions& o) {
  LoadResult result;
  std::atomic<long> next{0}, done{0};
  std::atomic<long> s2{0}, s4{0}, s5{0}, errors{0}, p2{0}, p5{0};
  std::mutex mu;
  std::vector<double> latencies;
  const int bursts = std::max(1, o.bursts);
  Clock::duration busy{};
  Clock::time_point burst_start = Clock::now();
  long burst_end = o.requests / bursts;
  int burst = 0;
  // At each burst's end: account its time, idle, and open the next one.
  std::barrier sync(o.connections, [&]() noexcept {
    busy += Clock::now() - burst_start;
    if (++burst < bursts) {
      std::this_thread::sleep_for(o.idle);
      burst_end = burst + 1 == bursts ? o.requests : o.requests / bursts * (burst + 1);
    }
    burst_start = Clock::now();
  });
  auto connection = [&](int c) {
    Client client(o);
    std::vector<double> mine;
    long long last_id = 0;
    long count = 0, posts = 0;
    std::string last_ref;
    std::string body;
    for (int b = 0; b < bursts; ++b) {
      for (long i; (i = next.fetch_add(1)) < burst_end;) {
        const Clock::time_point start = Clock::now();
        const bool get = o.get_every > 0 && last_id > 0 && ++count % o.get_every == 0;
        unsigned status;
        if (get) {
          status = client.send(http::verb::get, "/orders/" + std::to_string(last_id), "", nullptr);
        } else {
          const bool duplicate =
              o.duplicate_every > 0 && !last_ref.empty() && ++posts % o.duplicate_every == 0;
          if (!duplicate) last_ref = o.ref_prefix + "-" + std::to_string(i);
          status = client.send(http::verb::post, "/orders",
                               "{\"customer\":\"customer-" + std::to_string(i % 97) +
                                   "\",\"amount\":" + std::to_string(1 + i % 997) +
                                   ",\"ref\":\"" + last_ref + "\"}",
                               &body);
          if (status == 201) last_id = id_in(body);
          if (status >= 200 && status < 300) ++p2;
          if (status >= 500) ++p5;
        }
        mine.push_back(std::chrono::duration<double, std::micro>(Clock::now() - start).count());
        ++(status == 0 ? errors : status < 300 ? s2 : status < 500 ? s4 : s5);
        ++done;
      }
      next.store(burst_end);  // the overshoot of fetch_add
      sync.arrive_and_wait();
    }
    (void)c;
    std::lock_guard<std::mutex> lock(mu);
    latencies.insert(latencies.end(), mine.begin(), mine.end());
  };
  std::atomic<bool> finished{false};
  // The progress line: rewritten in place on a terminal, else printed at every quarter.
  const bool tty = isatty(STDERR_FILENO) != 0;
  std::thread progress([&] {
    long shown = 0;
    const long step = tty ? 1 : std::max(1L, o.requests / 4);
    for (bool last = false; !last;) {
      last = finished.load();
      if (!last) std::this_thread::sleep_for(std::chrono::milliseconds(200));
      const long d = done.load();
      if (!o.progress || (d / step <= shown / step && !(last && tty))) continue;
      shown = d;
      std::fprintf(stderr, "%s  load: %3ld%%  %ld/%ld requests  2xx %ld  4xx %ld  5xx %ld  errors %ld%s",
                   tty ? "\r" : "", d * 100 / std::max(1L, o.requests), d, o.requests, s2.load(),
                   s4.load(), s5.load(), errors.load(), tty && !last ? "" : "\n");
    }
  });
  std::vector<std::thread> threads;
  for (int c = 0; c < o.connections; ++c) threads.emplace_back(connection, c);
  for (auto& t : threads) t.join();
  finished = true;
  progress.join();
  result.requests = done;
  result.status_2xx = s2;
  result.status_4xx = s4;
  result.status_5xx = s5;
  result.transport_errors = errors;
  result.posts_2xx = p2;
  result.posts_5xx = p5;
  result.seconds = std::chrono::duration<double>(busy).count();
  result.p50_us = percentile(latencies, 0.50);
  result.p99_us = percentile(latencies, 0.99);
  return result;
}

}  // namespace example
