// http_types.h: what the HTTP front end hands to a strategy and gets back, free of Beast
// (the coroutine strategy's interface uses Asio's awaitable only).

#ifndef SCOPEREG_EXAMPLES_HTTP_TYPES_H_
#define SCOPEREG_EXAMPLES_HTTP_TYPES_H_

#include <utility>  // before Asio: g++ 12 needs it for std::exchange in Boost 1.74

#include <functional>
#include <string>

#ifdef SCOPEREG_EXAMPLE_HAVE_COROUTINE
#include <boost/asio/awaitable.hpp>
#endif

namespace example {

struct HttpRequest {
  std::string method;  // "GET", "POST", ...
  std::string target;  // "/orders/12"
  std::string content_type;
  std::string body;
};

struct HttpResponse {
  unsigned status = 200;
  std::string body;  // JSON
};

// Runs requests with one scope strategy and calls `done` with each response (on any
// thread). shutdown() finishes what was submitted and joins the strategy's threads.
class Dispatcher {
 public:
  virtual ~Dispatcher() = default;
  virtual void submit(HttpRequest request, std::function<void(HttpResponse)> done) = 0;
  virtual void shutdown() = 0;
};

#ifdef SCOPEREG_EXAMPLE_HAVE_COROUTINE
// A Dispatcher whose requests are Boost.Asio C++20 coroutines (--strategy=coroutine). The
// server serves its connections as coroutines too, and co_awaits run() for each request
// instead of calling submit().
class CoroutineDispatcher : public Dispatcher {
 public:
  // The response to `request`, which runs as a task of its own, in a scope of its own, on
  // the dispatcher's threads; the awaiting coroutine is resumed on its own executor. A
  // failed request is a response (5xx), not an exception.
  virtual boost::asio::awaitable<HttpResponse> run(HttpRequest request) = 0;
};
#endif

}  // namespace example

#endif  // SCOPEREG_EXAMPLES_HTTP_TYPES_H_
