// scopereg/scoped_proxy.h
//
// ScopedProxy: a transparent proxy to the calling scope's value (also reachable through
// session_cache.h, where it was first declared).

#ifndef SCOPEREG_SCOPED_PROXY_H_
#define SCOPEREG_SCOPED_PROXY_H_

namespace scopereg {

// ScopedProxy
//
// Forwards `->` and `*` to the calling scope's value of a source: a ScopedRegistry, or a
// SessionCache's interned name (SQLAlchemy's scoped_session proxies the current session).
//
//   scopereg::ScopedRegistry<Session> registry(make_session);
//   scopereg::ScopedProxy session(registry);   // a global or a member
//   session->query(...);                        // the calling scope's Session, created lazily
//
// Creation follows the source: a missing value is created; where it cannot be (no active
// ExplicitScope), the source's ScopeError says why. Thread safety: as the source. Cost: the
// source's hit. The source must outlive the proxy.
template <typename Source>
class ScopedProxy {
 public:
  explicit ScopedProxy(Source& source) : source_(&source) {}

  auto* operator->() const { return &(*source_)(); }
  auto& operator*() const { return (*source_)(); }
  auto& get() const { return (*source_)(); }

 private:
  Source* source_;
};

}  // namespace scopereg

#endif  // SCOPEREG_SCOPED_PROXY_H_
