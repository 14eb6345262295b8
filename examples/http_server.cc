// http_server.cc: the Beast front end (see http_server.h). One event-loop thread reads and
// writes every connection asynchronously; requests run on the dispatcher's workers. A
// connection is a chain of callbacks (Connection), or, for a CoroutineDispatcher
// (--strategy=coroutine), one coroutine on the event loop (serve_connection) that
// co_awaits each request's task.

#include <utility>  // before Asio/Beast: g++ 12 needs it for std::exchange in Boost 1.74

#include "http_server.h"

#include "order_body.h"  // json_string

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#ifdef SCOPEREG_EXAMPLE_HAVE_COROUTINE
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/use_awaitable.hpp>
#endif
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
#ifdef SCOPEREG_EXAMPLE_HAVE_COROUTINE
  // Set when the dispatcher's requests are coroutines: connections are coroutines too.
  CoroutineDispatcher* const coroutines = dynamic_cast<CoroutineDispatcher*>(&dispatcher);
#endif
  const ServerOptions options;
  asio::io_context io;  // before what uses it: destroyed last
  tcp::acceptor acceptor;
  unsigned short port = 0;
  std::thread thread;
  bool stopped = false;
};

namespace {

// What the dispatcher gets of a request that was read whole.
HttpRequest to_request(http::request<http::string_body>&& request) {
  return HttpRequest{std::string(request.method_string()), std::string(request.target()),
                     std::string(request[http::field::content_type]),
                     std::move(request.body())};
}

// The answer to a request that could not be read: an error response (the connection is
// closed after writing it), or none (the connection is closed at once: the client is done,
// or it reset or closed the connection mid-request; nothing to answer). A read that timed
// out is not for this: Beast has closed the socket already.
std::optional<HttpResponse> read_error_response(beast::error_code ec, const ServerOptions& o) {
  auto error = [](unsigned status, const std::string& message) {
    return HttpResponse{status, "{\"error\":" + json_string(message) + "}"};
  };
  if (ec == http::error::end_of_stream) return std::nullopt;  // the client is done
  if (ec == http::error::body_limit) {
    return error(413, "the body is larger than " + std::to_string(o.body_limit) + " bytes");
  }
  if (ec == http::error::header_limit) return error(431, "the headers are too large");
  if (ec.category() == http::make_error_code(http::error::bad_target).category()) {
    return error(400, "malformed HTTP request: " + ec.message());
  }
  return std::nullopt;  // reset or closed by the client mid-request: nothing to answer
}

// The message written for a response.
http::response<http::string_body> to_message(const HttpResponse& r, bool keep_alive) {
  http::response<http::string_body> message;
  message.result(r.status);
  message.version(11);
  message.set(http::field::server, "scopereg-request-service");
  message.set(http::field::content_type, "application/json");
  message.keep_alive(keep_alive);
  message.body() = r.body + "\n";
  message.prepare_payload();
  return message;
}

void close_stream(beast::tcp_stream& stream) {
  beast::error_code ignored;
  stream.socket().shutdown(tcp::socket::shutdown_send, ignored);
  stream.close();
}

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
    // Too slow to send its request, or an idle keep-alive: Beast has closed the socket.
    if (ec == beast::error::timeout) return;
    if (ec) {
      if (std::optional<HttpResponse> reply = read_error_response(ec, server_.options)) {
        return write(*reply, false);
      }
      return close();
    }
    stream_.expires_never();  // the request runs as long as it runs
    http::request<http::string_body> request = parser_->release();
    const bool keep_alive = request.keep_alive();
    HttpRequest r = to_request(std::move(request));
    server_.dispatcher.submit(std::move(r), [self = shared_from_this(), keep_alive](HttpResponse response) {
      // On a worker thread: back to the event loop to write.
      asio::post(self->stream_.get_executor(), [self, keep_alive, response = std::move(response)] {
        self->write(response, keep_alive);
      });
    });
  }

  void write(const HttpResponse& r, bool keep_alive) {
    response_ = to_message(r, keep_alive);
    stream_.expires_after(server_.options.io_timeout);
    http::async_write(stream_, response_,
                      [self = shared_from_this(), keep_alive](beast::error_code ec, std::size_t) {
                        if (ec || !keep_alive) return self->close();
                        self->read();
                      });
  }

  void close() { close_stream(stream_); }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  http::response<http::string_body> response_;  // alive while it is written
  HttpServer::Impl& server_;
};

#ifdef SCOPEREG_EXAMPLE_HAVE_COROUTINE
// The same connection as one coroutine on the event loop (--strategy=coroutine): read a
// request, co_await its task (which runs on the dispatcher's threads in a scope of its
// own; this coroutine has no scope and needs none), write the response, repeat. I/O
// errors come back as error codes (redirect_error), not exceptions. A connection suspended
// when the event loop stops is destroyed with the io_context, which closes its socket.
asio::awaitable<void> serve_connection(tcp::socket socket, HttpServer::Impl& server) {
  const ServerOptions& o = server.options;
  beast::tcp_stream stream(std::move(socket));
  beast::flat_buffer buffer;
  for (;;) {
    http::request_parser<http::string_body> parser;
    parser.body_limit(o.body_limit);
    parser.header_limit(static_cast<std::uint32_t>(o.header_limit));
    stream.expires_after(o.io_timeout);
    beast::error_code ec;
    co_await http::async_read(stream, buffer, parser,
                              asio::redirect_error(asio::use_awaitable, ec));
    // Too slow to send its request, or an idle keep-alive: Beast has closed the socket.
    if (ec == beast::error::timeout) co_return;
    HttpResponse response;
    bool keep_alive = false;
    if (ec) {
      std::optional<HttpResponse> reply = read_error_response(ec, o);
      if (!reply) break;
      response = std::move(*reply);
    } else {
      stream.expires_never();  // the request runs as long as it runs
      http::request<http::string_body> request = parser.release();
      keep_alive = request.keep_alive();
      response = co_await server.coroutines->run(to_request(std::move(request)));
    }
    http::response<http::string_body> message = to_message(response, keep_alive);
    stream.expires_after(o.io_timeout);
    co_await http::async_write(stream, message, asio::redirect_error(asio::use_awaitable, ec));
    if (ec || !keep_alive) break;
  }
  close_stream(stream);
}
#endif

}  // namespace

void HttpServer::Impl::accept() {
  acceptor.async_accept([this](beast::error_code ec, tcp::socket socket) {
    if (ec == asio::error::operation_aborted || !acceptor.is_open()) return;
    if (!ec) {
      socket.set_option(tcp::no_delay(true), ec);
#ifdef SCOPEREG_EXAMPLE_HAVE_COROUTINE
      if (coroutines != nullptr) {
        asio::co_spawn(io, serve_connection(std::move(socket), *this), asio::detached);
        return accept();
      }
#endif
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
