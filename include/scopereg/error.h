// scopereg/error.h
//
// The library's own exception type. scopereg throws `ScopeError` for misuse that is a
// bug in the caller (asking for a value with no active scope, re-entering a factory,
// passing creation arguments when a value already exists). Every message says what
// was expected and how to fix the call. Errors raised by user code (factories, close
// hooks) are never wrapped: they reach the caller unchanged.

#ifndef SCOPEREG_ERROR_H_
#define SCOPEREG_ERROR_H_

#include <stdexcept>
#include <string>

namespace scopereg {

// ScopeError
//
// Thrown for caller misuse. Derives from std::logic_error: catching it and carrying on is
// legitimate (the registry is left unchanged), but the condition it reports is a bug to fix.
class ScopeError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

}  // namespace scopereg

#endif  // SCOPEREG_ERROR_H_
