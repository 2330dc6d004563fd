// Wire protocol of the rendezvous store that aikido-run serves (src/runtime/store_server.*) and workers use
// (src/runtime/tcp_store.cpp).
//
// A connection starts with the handshake of transport/handshake.hpp on Channel::store; nothing below is parsed
// before the connector has proved the job secret. Then the client sends one request and reads its response, in
// turn, until it closes. Integers are little-endian; a `bytes` field is a u32 length followed by that many bytes.
//
//   request   u8 op, bytes key, then by op:
//     set       bytes value
//     get       -
//     wait      u64 timeout_ms
//     cas       u8 has_expected, [bytes expected], bytes desired
//   response  u8 status, then by status:
//     ok        bytes value          (get, wait, cas: the value after the call; set: nothing)
//     not_found -                    (get: absent; cas: the key is still absent)
//     timeout   -                    (wait: the key did not appear in time)
//     error     bytes message        (the server refused the request; it closes the connection afterwards)
//
// Every length is checked against its cap before anything is allocated; a violation is a ProtocolError and the
// connection is closed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

#include "base/error.hpp"
#include "transport/socket.hpp"

namespace aikido::store_protocol {

inline constexpr std::size_t kMaxKeyBytes = 4 << 10;
inline constexpr std::size_t kMaxValueBytes = 16 << 20;
inline constexpr std::size_t kMaxMessageBytes = 4 << 10;
/// Longest wait a client may ask for; longer requests are shortened to this.
inline constexpr std::uint64_t kMaxWaitMs = 24ull * 3600 * 1000;

enum class Op : std::uint8_t { set = 1, get = 2, wait = 3, cas = 4 };
enum class Status : std::uint8_t { ok = 0, not_found = 1, timeout = 2, error = 3 };

inline const char* op_name(Op op) {
  switch (op) {
    case Op::set:
      return "set";
    case Op::get:
      return "get";
    case Op::wait:
      return "wait";
    case Op::cas:
      return "compare_and_set";
  }
  return "unknown";
}

/// Appends fields to a message that is then sent with one write.
class Encoder {
 public:
  void u8(std::uint8_t v) { out_.push_back(char(v)); }
  void u32(std::uint32_t v) {
    for (int i = 0; i < 4; ++i) out_.push_back(char((v >> (8 * i)) & 0xff));
  }
  void u64(std::uint64_t v) {
    for (int i = 0; i < 8; ++i) out_.push_back(char((v >> (8 * i)) & 0xff));
  }
  void bytes(const std::string& v) {
    u32(std::uint32_t(v.size()));
    out_ += v;
  }
  const std::string& data() const { return out_; }

 private:
  std::string out_;
};

// The readers below take any Source with `void read_exact(void* data, std::size_t size)` that throws when the bytes
// run out: a transport::Socket on the wire, a MemorySource in tests and fuzz targets.

/// Bytes in memory as a Source; reading past the end throws PeerLostError, as a closed connection does.
class MemorySource {
 public:
  explicit MemorySource(std::string_view bytes) : bytes_(bytes) {}
  void read_exact(void* data, std::size_t size) {
    if (size > bytes_.size()) throw PeerLostError("store message ends early (connection closed)");
    if (size > 0) std::memcpy(data, bytes_.data(), size);
    bytes_.remove_prefix(size);
  }
  std::size_t remaining() const { return bytes_.size(); }

 private:
  std::string_view bytes_;
};

template <class Source>
std::uint8_t read_u8(Source& source) {
  std::uint8_t v;
  source.read_exact(&v, 1);
  return v;
}

template <class Source>
std::uint32_t read_u32(Source& source) {
  unsigned char b[4];
  source.read_exact(b, sizeof b);
  return std::uint32_t(b[0]) | std::uint32_t(b[1]) << 8 | std::uint32_t(b[2]) << 16 | std::uint32_t(b[3]) << 24;
}

template <class Source>
std::uint64_t read_u64(Source& source) {
  unsigned char b[8];
  source.read_exact(b, sizeof b);
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = v << 8 | b[i];
  return v;
}

/// Reads a length-prefixed field; throws ProtocolError naming `what` when its length exceeds `cap`, before
/// allocating anything.
template <class Source>
std::string read_bytes(Source& source, std::size_t cap, const char* what) {
  const std::uint32_t size = read_u32(source);
  if (size > cap) {
    throw ProtocolError(
        detail::str_cat("store message announces ", size, " bytes for its ", what, "; the limit is ", cap, " bytes"));
  }
  std::string v(size, '\0');
  if (size > 0) source.read_exact(v.data(), size);
  return v;
}

/// One request as the server reads it.
struct Request {
  Op op = Op::get;
  std::string key;
  std::string value;                    // set, cas: the value to store
  std::optional<std::string> expected;  // cas: the value expected (nullopt: the key must be absent)
  std::uint64_t timeout_ms = 0;         // wait
};

/// Reads one request (server side). ProtocolError on an unknown op, a bad flag or a field over its cap;
/// the Source's error when the bytes end early.
template <class Source>
Request read_request(Source& source) {
  Request request;
  const std::uint8_t op_byte = read_u8(source);
  if (op_byte < std::uint8_t(Op::set) || op_byte > std::uint8_t(Op::cas)) {
    throw ProtocolError(detail::str_cat("unknown store request op ", int(op_byte)));
  }
  request.op = Op(op_byte);
  request.key = read_bytes(source, kMaxKeyBytes, "key");
  switch (request.op) {
    case Op::set:
      request.value = read_bytes(source, kMaxValueBytes, "value");
      break;
    case Op::get:
      break;
    case Op::wait:
      request.timeout_ms = read_u64(source);
      break;
    case Op::cas: {
      const std::uint8_t has_expected = read_u8(source);
      if (has_expected > 1) throw ProtocolError(detail::str_cat("invalid compare_and_set flag ", int(has_expected)));
      if (has_expected) request.expected = read_bytes(source, kMaxValueBytes, "expected value");
      request.value = read_bytes(source, kMaxValueBytes, "value");
      break;
    }
  }
  return request;
}

/// Reads the response to a request of `op` (client side): the value of an `ok` response (empty for set), nullopt
/// for `not_found` and `timeout`. ProtocolError for an `error` response (with the server's message), an unknown
/// status, a status that `op` cannot get (set answers only ok), or a field over its cap.
template <class Source>
std::optional<std::string> read_response(Source& source, Op op) {
  const std::uint8_t status = read_u8(source);
  switch (Status(status)) {
    case Status::ok:
      if (op == Op::set) return std::string();
      return read_bytes(source, kMaxValueBytes, "value");
    case Status::not_found:
    case Status::timeout:
      if (op == Op::set || (Status(status) == Status::timeout) != (op == Op::wait)) {
        throw ProtocolError(detail::str_cat("the server answered a ", op_name(op), " request with status ",
                                            Status(status) == Status::timeout ? "timeout" : "not_found"));
      }
      return std::nullopt;
    case Status::error:
      throw ProtocolError(
          detail::str_cat("the server refused the request: ", read_bytes(source, kMaxMessageBytes, "error message")));
  }
  throw ProtocolError(detail::str_cat("the server answered with unknown status ", int(status)));
}

}  // namespace aikido::store_protocol
