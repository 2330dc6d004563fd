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
#include <string>

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

inline std::uint8_t read_u8(transport::Socket& socket) {
  std::uint8_t v;
  socket.read_exact(&v, 1);
  return v;
}

inline std::uint32_t read_u32(transport::Socket& socket) {
  unsigned char b[4];
  socket.read_exact(b, sizeof b);
  return std::uint32_t(b[0]) | std::uint32_t(b[1]) << 8 | std::uint32_t(b[2]) << 16 | std::uint32_t(b[3]) << 24;
}

inline std::uint64_t read_u64(transport::Socket& socket) {
  unsigned char b[8];
  socket.read_exact(b, sizeof b);
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = v << 8 | b[i];
  return v;
}

/// Reads a length-prefixed field; throws ProtocolError naming `what` when its length exceeds `cap`, before
/// allocating anything.
inline std::string read_bytes(transport::Socket& socket, std::size_t cap, const char* what) {
  const std::uint32_t size = read_u32(socket);
  if (size > cap) {
    throw ProtocolError(
        detail::str_cat("store message announces ", size, " bytes for its ", what, "; the limit is ", cap, " bytes"));
  }
  std::string v(size, '\0');
  if (size > 0) socket.read_exact(v.data(), size);
  return v;
}

}  // namespace aikido::store_protocol
