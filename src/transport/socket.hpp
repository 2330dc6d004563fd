// Stream sockets (TCP and Unix-domain), listeners and addresses. Every blocking call takes a deadline.
#pragma once

#include <sys/uio.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace aikido::transport {

using Clock = std::chrono::steady_clock;

/// "tcp:HOST:PORT" or "unix:@NAME" (Linux abstract namespace) or "unix:/PATH".
struct Address {
  enum class Kind { tcp, unix_socket };
  Kind kind = Kind::tcp;
  std::string host;  // tcp
  int port = 0;      // tcp
  std::string path;  // unix; a leading '@' means the abstract namespace
  std::string to_string() const;
  /// Parses the form above; plain "HOST:PORT" is taken as tcp. Throws ConfigError on anything else.
  static Address parse(const std::string& text);
};

class TlsStream;

/// An owned, connected stream socket. Reads and writes block; a closed or reset connection throws PeerLostError.
/// After start_tls() (transport/tls.hpp) every read and write goes through TLS, with the same meaning.
class Socket {
 public:
  Socket();
  explicit Socket(int fd);
  Socket(Socket&& other) noexcept;
  Socket& operator=(Socket&& other) noexcept;
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;
  ~Socket();

  int fd() const { return fd_; }
  bool valid() const { return fd_ >= 0; }

  /// Reads exactly `size` bytes. Throws PeerLostError on end of stream or error, TimeoutError when a receive
  /// timeout set by set_timeout() expires.
  void read_exact(void* data, std::size_t size);
  /// Reads what has arrived, up to `size` bytes, without blocking; returns the number of bytes read (0 when
  /// nothing is there). Throws PeerLostError on end of stream or error.
  std::size_t try_read(void* data, std::size_t size);
  /// Reads what has arrived, at least one byte, up to `size` bytes, waiting for the first. Throws like read_exact.
  std::size_t read_some(void* data, std::size_t size);
  /// Writes all of `size` bytes; throws PeerLostError when the connection is gone.
  void write_all(const void* data, std::size_t size);
  /// Writes all the buffers in order with as few system calls as possible. Modifies `iov`.
  void writev_all(iovec* iov, int count);
  /// Writes what the kernel takes now without blocking; returns the number of bytes written (0 when the socket
  /// buffer is full). Throws PeerLostError when the connection is gone.
  std::size_t try_writev(iovec* iov, int count);
  /// Bounds every later read and write (0: no bound). Used during handshakes.
  void set_timeout(std::chrono::milliseconds timeout);
  /// Wakes any thread blocked on this socket (reads return end of stream); the descriptor stays open.
  void shutdown();
  void close();

  /// From start_tls(): reads and writes go through `tls` from now on.
  void attach_tls(std::unique_ptr<TlsStream> tls);
  /// The TLS state, or nullptr for a plain socket.
  TlsStream* tls() const { return tls_.get(); }
  /// Bytes already received and decrypted wait inside TLS, so polling the descriptor may not show them: read
  /// before waiting. Always false for a plain socket.
  bool has_buffered() const;

 private:
  int fd_ = -1;
  std::unique_ptr<TlsStream> tls_;
  std::chrono::milliseconds timeout_{0};  // set_timeout(), for TLS (a plain socket has it in the kernel)
};

/// A listening socket bound to an address; port 0 (tcp) picks a free port.
class Listener {
 public:
  static Listener bind_tcp(const std::string& host, int port);
  /// A Unix-domain listener; `name` starting with '@' is in the abstract namespace.
  static Listener bind_unix(const std::string& name);

  Listener() = default;
  Listener(Listener&&) noexcept = default;
  Listener& operator=(Listener&&) noexcept = default;

  const Address& address() const { return address_; }
  /// Waits until a connection arrives or `deadline`; throws TimeoutError on the deadline.
  Socket accept(Clock::time_point deadline);
  /// Like accept, but returns an invalid socket when `deadline` passes.
  Socket try_accept(Clock::time_point deadline);
  int fd() const { return socket_.fd(); }
  void close() { socket_.close(); }

 private:
  Socket socket_;
  Address address_;
};

/// Connects to `address`, retrying while nobody listens yet, until `deadline` (then TimeoutError naming the
/// address). TCP connections get TCP_NODELAY.
Socket connect(const Address& address, Clock::time_point deadline);

/// Large kernel buffers for bulk data connections.
void set_bulk_buffers(Socket& socket);

/// Sets the TCP congestion control of `fd` (a TCP socket; the empty name leaves it alone); 0 or the errno of the
/// refusal.
int set_congestion_control(int fd, const std::string& name);

/// This machine's host name.
std::string host_name();

}  // namespace aikido::transport
