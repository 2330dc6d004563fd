// The handshake that opens every connection, data plane and control plane alike.
//
// Both sides prove knowledge of the job secret with HMAC-SHA256 over fresh nonces (mutual challenge-response),
// and the acceptor refuses a connector of another cluster version. Every message is of fixed size, so nothing
// variable-length is parsed before the connector has proved the secret.
//
//   connector -> acceptor   Hello     {magic, protocol, channel, cluster_version, rank, nonce_c}
//   acceptor  -> connector  Challenge {magic, status, rank, cluster_version, nonce_a, HMAC(secret, "A"|Hello|nonce_a)}
//   connector -> acceptor   Proof     {HMAC(secret, "C"|Hello|Challenge)}
//   acceptor  -> connector  Verdict   {magic, status}
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "transport/socket.hpp"
#include "transport/tls.hpp"

namespace aikido::transport {

/// What a connection is for; a connection opened for one channel cannot be used for another.
enum class Channel : std::uint8_t { data = 1, store = 2, control = 3 };

struct HandshakeResult {
  int peer_rank = -1;
  std::uint64_t peer_cluster_version = 0;
};

/// Runs the connector's side. Throws AuthError when the acceptor cannot prove the secret or refuses ours,
/// ProtocolError naming both versions when the acceptor is at another cluster version, TimeoutError past `timeout`.
/// With `tls` (and a TCP socket) the TLS handshake runs first and everything after it is encrypted; a side without
/// TLS and a side with it refuse each other with a ProtocolError that says so.
HandshakeResult handshake_connect(Socket& socket, const std::string& secret, Channel channel,
                                  std::uint64_t cluster_version, int rank, std::chrono::milliseconds timeout,
                                  const TlsContext* tls = nullptr);

/// Runs the acceptor's side. Throws AuthError, ProtocolError (bad magic, wrong channel, other cluster version, TLS
/// on one side only) or TimeoutError; the caller then closes the socket. `tls` as for handshake_connect.
HandshakeResult handshake_accept(Socket& socket, const std::string& secret, Channel channel,
                                 std::uint64_t cluster_version, int rank, std::chrono::milliseconds timeout,
                                 const TlsContext* tls = nullptr);

}  // namespace aikido::transport
