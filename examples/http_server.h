// http_server.h: the HTTP/1.1 front end (Boost.Beast on one Asio event-loop thread). It
// reads each request, answers malformed or oversized ones itself (400, 413, 431), closes
// the connection of a client too slow to send its whole request (no session is held for
// it: a request reaches a strategy only once read), and hands the others to a Dispatcher, which runs
// them in their own scope on the strategy's workers and gives back the response to write.
// For a CoroutineDispatcher (http_types.h), each connection is a coroutine on the event
// loop that co_awaits each request's task.
// Listens on 127.0.0.1 only.

#ifndef SCOPEREG_EXAMPLES_HTTP_SERVER_H_
#define SCOPEREG_EXAMPLES_HTTP_SERVER_H_

#include <chrono>
#include <cstddef>
#include <memory>

#include "http_types.h"

namespace example {

struct ServerOptions {
  unsigned short port = 0;  // 0: an ephemeral port (see port())
  std::size_t body_limit = 4096;
  std::size_t header_limit = 8192;
  // A client must send a whole request within this time (a slow or stalled client's
  // connection is closed, as is an idle keep-alive one); also the limit for writing a
  // response.
  std::chrono::milliseconds io_timeout{10000};
};

class HttpServer {
 public:
  // Binds 127.0.0.1:port and starts serving on its own thread. Throws if it cannot bind.
  HttpServer(Dispatcher& dispatcher, ServerOptions options);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  unsigned short port() const;
  // Stops accepting and closes every connection, then shuts the dispatcher down (the
  // requests it has finish; their responses are dropped). Idempotent.
  void stop();

  struct Impl;  // the event loop's state (http_server.cc)

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace example

#endif  // SCOPEREG_EXAMPLES_HTTP_SERVER_H_
