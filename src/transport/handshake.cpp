#include "transport/handshake.hpp"

#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "base/error.hpp"
#include "base/crypto.hpp"

namespace aikido::transport {
namespace {

using detail::Digest;
using detail::str_cat;

constexpr std::uint32_t kHelloMagic = 0x41494b48;      // "AIKH"
constexpr std::uint32_t kChallengeMagic = 0x41494b43;  // "AIKC"
constexpr std::uint32_t kVerdictMagic = 0x41494b56;    // "AIKV"
constexpr std::uint16_t kProtocol = 1;

enum Status : std::uint8_t { kOk = 0, kWrongVersion = 1, kWrongChannel = 2, kBadProof = 3, kTlsRequired = 4 };

#pragma pack(push, 1)
struct Hello {
  std::uint32_t magic;
  std::uint16_t protocol;
  std::uint8_t channel;
  std::uint8_t reserved;
  std::uint64_t cluster_version;
  std::int32_t rank;
  std::uint8_t nonce[32];
};
struct Challenge {
  std::uint32_t magic;
  std::uint8_t status;
  std::uint8_t reserved[3];
  std::uint64_t cluster_version;
  std::int32_t rank;
  std::uint8_t nonce[32];
  std::uint8_t mac[32];
};
struct Proof {
  std::uint8_t mac[32];
};
struct Verdict {
  std::uint32_t magic;
  std::uint8_t status;
  std::uint8_t reserved[3];
};
#pragma pack(pop)

Digest mac_of(const std::string& secret, char role, const void* a, std::size_t a_size, const void* b,
              std::size_t b_size) {
  std::vector<std::uint8_t> message(1 + a_size + b_size);
  message[0] = std::uint8_t(role);
  std::memcpy(message.data() + 1, a, a_size);
  std::memcpy(message.data() + 1 + a_size, b, b_size);
  return detail::hmac_sha256({reinterpret_cast<const std::uint8_t*>(secret.data()), secret.size()}, message);
}

Digest as_digest(const std::uint8_t* p) {
  Digest d;
  std::memcpy(d.data(), p, d.size());
  return d;
}

const char* channel_name(std::uint8_t c) {
  switch (c) {
    case std::uint8_t(Channel::data):
      return "data";
    case std::uint8_t(Channel::store):
      return "store";
    case std::uint8_t(Channel::control):
      return "control";
  }
  return "unknown";
}

// The challenge's MAC covers everything in it except the MAC itself.
constexpr std::size_t kChallengeSigned = offsetof(Challenge, mac);

// A TLS connection starts with a handshake record (content type 22).
constexpr std::uint8_t kTlsHandshakeRecord = 0x16;

constexpr const char* kSameTlsSetting =
    "every worker, aikido-run and aikido-ctl of a job need the same TLS setting (--tls / AIKIDO_TLS=1)";

bool is_tcp(const Socket& socket) {
  int domain = 0;
  socklen_t len = sizeof domain;
  return ::getsockopt(socket.fd(), SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 && domain != AF_UNIX;
}

// The first byte the connector sent, left in the socket; waits for it until `timeout`.
std::uint8_t peek_first_byte(Socket& socket, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    std::uint8_t byte = 0;
    const ssize_t n = ::recv(socket.fd(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 1) return byte;
    if (n == 0) throw PeerLostError("connection closed by the other side before its hello");
    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      throw PeerLostError(str_cat("connection failed before its hello: ", std::strerror(errno)));
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) throw TimeoutError("no hello arrived in time");
    pollfd pfd{socket.fd(), POLLIN, 0};
    ::poll(&pfd, 1, int(left));
  }
}

}  // namespace

HandshakeResult handshake_connect(Socket& socket, const std::string& secret, Channel channel,
                                  std::uint64_t cluster_version, int rank, std::chrono::milliseconds timeout,
                                  const TlsContext* tls) {
  if (tls != nullptr && is_tcp(socket)) start_tls(socket, *tls, TlsRole::client, Clock::now() + timeout);
  socket.set_timeout(timeout);
  Hello hello{};
  hello.magic = kHelloMagic;
  hello.protocol = kProtocol;
  hello.channel = std::uint8_t(channel);
  hello.cluster_version = cluster_version;
  hello.rank = rank;
  detail::random_bytes(hello.nonce, sizeof hello.nonce);
  socket.write_all(&hello, sizeof hello);

  Challenge challenge{};
  socket.read_exact(&challenge, sizeof challenge);
  if (challenge.magic != kChallengeMagic) throw ProtocolError("the other side is not an Aikido endpoint (bad magic)");
  if (challenge.status == kWrongVersion) {
    throw ProtocolError(str_cat("connection refused: this side is at cluster version ", cluster_version,
                                ", the other side at ", challenge.cluster_version));
  }
  if (challenge.status == kTlsRequired) {
    throw ProtocolError(str_cat("connection refused: the other side requires TLS and this side does not use it; ",
                                kSameTlsSetting));
  }
  if (challenge.status == kWrongChannel) {
    throw ProtocolError(str_cat("connection refused: the endpoint does not serve the ",
                                channel_name(std::uint8_t(channel)), " channel"));
  }
  const Digest expected = mac_of(secret, 'A', &hello, sizeof hello, &challenge, kChallengeSigned);
  if (!detail::digest_equal(expected, as_digest(challenge.mac))) {
    throw AuthError("the other side does not know the job secret (AIKIDO_SECRET differs)");
  }
  Proof proof{};
  const Digest mine = mac_of(secret, 'C', &hello, sizeof hello, &challenge, sizeof challenge);
  std::memcpy(proof.mac, mine.data(), mine.size());
  socket.write_all(&proof, sizeof proof);

  Verdict verdict{};
  socket.read_exact(&verdict, sizeof verdict);
  if (verdict.magic != kVerdictMagic || verdict.status != kOk) {
    throw AuthError("connection refused: the other side rejected our proof of the job secret (AIKIDO_SECRET differs)");
  }
  socket.set_timeout(std::chrono::milliseconds(0));
  return {challenge.rank, challenge.cluster_version};
}

HandshakeResult handshake_accept(Socket& socket, const std::string& secret, Channel channel,
                                 std::uint64_t cluster_version, int rank, std::chrono::milliseconds timeout,
                                 const TlsContext* tls) {
  const bool use_tls = tls != nullptr && is_tcp(socket);
  bool plain_to_tls = false;  // a connector without TLS reached this TLS endpoint: tell it why it is refused
  if (use_tls) {
    if (peek_first_byte(socket, timeout) == kTlsHandshakeRecord) {
      start_tls(socket, *tls, TlsRole::server, Clock::now() + timeout);
    } else {
      plain_to_tls = true;
    }
  }
  socket.set_timeout(timeout);
  Hello hello{};
  socket.read_exact(&hello, sizeof hello);
  if (!use_tls && is_tcp(socket) && reinterpret_cast<const std::uint8_t*>(&hello)[0] == kTlsHandshakeRecord) {
    throw ProtocolError(str_cat("refused a connection that speaks TLS: this side does not use it; ", kSameTlsSetting));
  }
  if (hello.magic != kHelloMagic || hello.protocol != kProtocol) {
    throw ProtocolError("refused a connection that did not start with an Aikido hello");
  }
  Challenge challenge{};
  challenge.magic = kChallengeMagic;
  challenge.rank = rank;
  challenge.cluster_version = cluster_version;
  if (plain_to_tls) {
    challenge.status = kTlsRequired;
    socket.write_all(&challenge, sizeof challenge);
    throw ProtocolError(str_cat("refused a connection", hello.rank >= 0 ? str_cat(" from rank ", hello.rank) : "",
                                " without TLS: this side requires it; ", kSameTlsSetting));
  }
  if (hello.channel != std::uint8_t(channel)) {
    challenge.status = kWrongChannel;
    socket.write_all(&challenge, sizeof challenge);
    throw ProtocolError(str_cat("refused a connection for the ", channel_name(hello.channel), " channel on the ",
                                channel_name(std::uint8_t(channel)), " endpoint"));
  }
  if (hello.cluster_version != cluster_version) {
    challenge.status = kWrongVersion;
    socket.write_all(&challenge, sizeof challenge);
    throw ProtocolError(str_cat("refused a connection from rank ", hello.rank, " at cluster version ",
                                hello.cluster_version, "; this endpoint is at version ", cluster_version));
  }
  detail::random_bytes(challenge.nonce, sizeof challenge.nonce);
  const Digest mine = mac_of(secret, 'A', &hello, sizeof hello, &challenge, kChallengeSigned);
  std::memcpy(challenge.mac, mine.data(), mine.size());
  socket.write_all(&challenge, sizeof challenge);

  Proof proof{};
  socket.read_exact(&proof, sizeof proof);
  const Digest expected = mac_of(secret, 'C', &hello, sizeof hello, &challenge, sizeof challenge);
  Verdict verdict{};
  verdict.magic = kVerdictMagic;
  const bool ok = detail::digest_equal(expected, as_digest(proof.mac));
  verdict.status = ok ? kOk : kBadProof;
  socket.write_all(&verdict, sizeof verdict);
  if (!ok) throw AuthError(str_cat("refused a connection claiming rank ", hello.rank, ": wrong job secret"));
  socket.set_timeout(std::chrono::milliseconds(0));
  return {hello.rank, hello.cluster_version};
}

}  // namespace aikido::transport
