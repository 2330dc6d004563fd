// Aikido's error model: every failure is an aikido::Error (or a subclass). Asynchronous failures are stored in the
// Work handle and rethrown by Work::wait().
#pragma once

#include <stdexcept>
#include <string>

namespace aikido {

/// Base of every exception the library throws.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

/// A collective or a connection did not complete within its deadline (AIKIDO_TIMEOUT).
class TimeoutError : public Error {
 public:
  using Error::Error;
};

/// A peer closed its connection, crashed, or failed its own part of a collective.
class PeerLostError : public Error {
 public:
  using Error::Error;
};

/// Ranks posted the same named collective with different sizes, element types, operations or roots.
class MismatchError : public Error {
 public:
  using Error::Error;
};

/// Invalid configuration or argument (bad environment variable, span of the wrong size, unknown topology).
class ConfigError : public Error {
 public:
  using Error::Error;
};

/// A connection failed the job-secret handshake.
class AuthError : public Error {
 public:
  using Error::Error;
};

/// A peer sent bytes that do not follow the wire protocol (bad magic, oversized length, wrong version).
class ProtocolError : public Error {
 public:
  using Error::Error;
};

}  // namespace aikido
