// The connection handshake (transport/handshake.hpp), both sides: the bytes after the first are what the other side
// sends; the first byte says which side this process plays.
#include <sys/socket.h>
#include <unistd.h>

#include "fuzz.hpp"
#include "transport/handshake.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace aikido;
  if (size < 1 || size > 4096) return 0;  // more than fits in a socket buffer would block the writer below
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) std::abort();
  if (size > 1 && ::write(fds[1], data + 1, size - 1) != ssize_t(size - 1)) std::abort();
  ::shutdown(fds[1], SHUT_WR);  // the other side sends nothing more: reads past the input end at once
  transport::Socket socket(fds[0]);
  const auto channel = transport::Channel(1 + data[0] % 3);
  const auto timeout = std::chrono::milliseconds(200);
  fuzz::expect_only_aikido_errors([&] {
    if (data[0] & 0x80) {
      transport::handshake_connect(socket, "fuzz-secret", channel, 7, 1, timeout);
    } else {
      transport::handshake_accept(socket, "fuzz-secret", channel, 7, 0, timeout);
    }
    // Random bytes cannot carry an HMAC under the secret: a handshake that succeeds is a broken check.
    fuzz::require(false, "a handshake succeeded without knowledge of the secret");
  });
  ::close(fds[1]);
  return 0;
}
