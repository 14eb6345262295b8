// http_types.h: what the HTTP front end hands to a strategy and gets back, free of Beast.

#ifndef SCOPEREG_EXAMPLES_HTTP_TYPES_H_
#define SCOPEREG_EXAMPLES_HTTP_TYPES_H_

#include <functional>
#include <string>

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

}  // namespace example

#endif  // SCOPEREG_EXAMPLES_HTTP_TYPES_H_
