// http_server.cc: the Beast front end (see http_server.h). One event-loop thread reads and
// writes every connection asynchronously; requests run on the dispatcher's workers.

#include <utility>  // before Asio/Beast: g++ 12 needs it for std::exchange in Boost 1.74

#include "http_server.h"

#include "order_body.h"  // json_string

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <optional>
#include <thread>

namespace example {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

struct HttpServer::Impl {
  Impl(Dispatcher& d, ServerOptions o)
      : dispatcher(d), options(o), acceptor(io) {
    const tcp::endpoint endpoint(asio::ip::make_address("127.0.0.1"), options.port);
    acceptor.open(endpoint.protocol());
    acceptor.set_option(asio::socket_base::reuse_address(true));
    acceptor.bind(endpoint);
    acceptor.listen(asio::socket_base::max_listen_connections);
    port = acceptor.local_endpoint().port();
  }

  void accept();

  Dispatcher& dispatcher;
  const ServerOptions options;
  asio::io_context io;  // before what uses it: destroyed last
  tcp::acceptor acceptor;
  unsigned short port = 0;
  std::thread thread;
  bool stopped = false;
};

namespace {

// One client connection: read a request, hand it over, write the response, repeat.
class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(tcp::socket socket, HttpServer::Impl& server)
      : stream_(std::move(socket)), server_(server) {}

  void read() {
    parser_.emplace();
    parser_->body_limit(server_.options.body_limit);
    parser_->header_limit(static_cast<std::uint32_t>(server_.options.header_limit));
    stream_.expires_after(server_.options.io_timeout);
    http::async_read(stream_, buffer_, *parser_,
                     [self = shared_from_this()](beast::error_code ec, std::size_t) {
                       self->on_read(ec);
                     });
  }

 private:
  void on_read(beast::error_code ec) {
    if (ec == http::error::end_of_stream) return close();  // the client is done
    // Too slow to send its request, or an idle keep-alive: Beast has closed the socket.
    if (ec == beast::error::timeout) return;
    if (ec == http::error::body_limit) {
      return reply_error(413, "the body is larger than " +
                                  std::to_string(server_.options.body_limit) + " bytes");
    }
    if (ec == http::error::header_limit) return reply_error(431, "the headers are too large");
    if (ec && ec.category() == http::make_error_code(http::error::bad_target).category()) {
      return reply_error(400, "malformed HTTP request: " + ec.message());
    }
    if (ec) return close();  // reset or closed by the client mid-request: nothing to answer
    stream_.expires_never();  // the request runs as long as it runs
    http::request<http::string_body> request = parser_->release();
    const bool keep_alive = request.keep_alive();
    HttpRequest r{std::string(request.method_string()), std::string(request.target()),
                  std::string(request[http::field::content_type]), std::move(request.body())};
    server_.dispatcher.submit(std::move(r), [self = shared_from_this(), keep_alive](HttpResponse response) {
      // On a worker thread: back to the event loop to write.
      asio::post(self->stream_.get_executor(), [self, keep_alive, response = std::move(response)] {
        self->write(response, keep_alive);
      });
    });
  }

  void reply_error(unsigned status, const std::string& message) {
    write(HttpResponse{status, "{\"error\":" + json_string(message) + "}"}, false);
  }

  void write(const HttpResponse& r, bool keep_alive) {
    response_ = {};
    response_.result(r.status);
    response_.version(11);
    response_.set(http::field::server, "scopereg-request-service");
    response_.set(http::field::content_type, "application/json");
    response_.keep_alive(keep_alive);
    response_.body() = r.body + "\n";
    response_.prepare_payload();
    stream_.expires_after(server_.options.io_timeout);
    http::async_write(stream_, response_,
                      [self = shared_from_this(), keep_alive](beast::error_code ec, std::size_t) {
                        if (ec || !keep_alive) return self->close();
                        self->read();
                      });
  }

  void close() {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    stream_.close();
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  http::response<http::string_body> response_;  // alive while it is written
  HttpServer::Impl& server_;
};

}  // namespace

void HttpServer::Impl::accept() {
  acceptor.async_accept([this](beast::error_code ec, tcp::socket socket) {
    if (ec == asio::error::operation_aborted || !acceptor.is_open()) return;
    if (!ec) {
      socket.set_option(tcp::no_delay(true), ec);
      std::make_shared<Connection>(std::move(socket), *this)->read();
    }
    accept();
  });
}

HttpServer::HttpServer(Dispatcher& dispatcher, ServerOptions options)
    : impl_(std::make_unique<Impl>(dispatcher, options)) {
  impl_->accept();
  impl_->thread = std::thread([this] { impl_->io.run(); });
}

HttpServer::~HttpServer() { stop(); }

unsigned short HttpServer::port() const { return impl_->port; }

void HttpServer::stop() {
  if (impl_->stopped) return;
  impl_->stopped = true;
  impl_->io.stop();
  impl_->thread.join();
  beast::error_code ignored;
  impl_->acceptor.close(ignored);
  // Requests still running finish; their responses go to a loop that no longer runs.
  impl_->dispatcher.shutdown();
}

}  // namespace example
