// TLS 1.3 (OpenSSL's libssl) on TCP sockets.
//
// A TlsContext holds the certificate a side presents and how it checks the other side's: one certificate derived
// from the job secret (the default; every side has the same and accepts only it), or files given by the user
// (mutual TLS against a CA). start_tls() runs the TLS handshake on a connected Socket; from then on the Socket's
// reads and writes go through TLS and keep their meaning (blocking, non-blocking, timeouts, shutdown()).
//
// One connection is read by one thread and written by another at the same time (transport/connection.hpp), and an
// OpenSSL connection object must not be used by two threads at once. So the socket is put in non-blocking mode, every
// OpenSSL call runs under a per-connection mutex and returns at once, and waiting (for the socket to become readable
// or writable) happens outside the mutex with poll(). A write passes at most kTlsWriteSlice bytes to OpenSSL per
// call, so the mutex is never held for long while the other direction waits for it.
//
// Kernel TLS: OpenSSL is asked to hand the record layer to the kernel (SSL_OP_ENABLE_KTLS); where the kernel has no
// "tls" module (tls_kernel_offload() says which) records are encrypted in user space.
#pragma once

#include <aikido/tls.hpp>
#include <chrono>
#include <cstddef>
#include <memory>
#include <mutex>
#include <string>

#include "transport/socket.hpp"

namespace aikido::transport {

/// Bytes handed to OpenSSL by one write call (four full TLS records).
inline constexpr std::size_t kTlsWriteSlice = 64 * 1024;

/// What a side of a job presents and accepts. Immutable once created; shared by every connection of a process.
class TlsContext {
 public:
  /// Loads or derives the certificate of `options` (which must be enabled). Throws ConfigError naming the file or
  /// setting to fix: a file that cannot be read or parsed, a key that does not match its certificate, or no job
  /// secret to derive a certificate from.
  static std::shared_ptr<const TlsContext> create(const TlsOptions& options, const std::string& secret);
  /// What a connection's handshake is given: nullptr when `options` are not enabled, else a context as create()
  /// makes, shared with earlier calls for the same options and secret (the last few are kept, so that a job's many
  /// connections and sessions load or derive their certificate once).
  static std::shared_ptr<const TlsContext> shared(const TlsOptions& options, const std::string& secret);

  ~TlsContext();
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;

  /// The underlying SSL_CTX*.
  void* native() const { return ctx_; }
  const std::string& description() const { return description_; }

 private:
  TlsContext() = default;
  void* ctx_ = nullptr;
  std::string description_;
};

enum class TlsRole { client, server };

/// The TLS state of one Socket; see the top of this file. Used by Socket only.
class TlsStream {
 public:
  TlsStream(void* ssl, int fd) : ssl_(ssl), fd_(fd) {}
  ~TlsStream();
  TlsStream(const TlsStream&) = delete;
  TlsStream& operator=(const TlsStream&) = delete;

  /// Reads up to `size` bytes. `wait`: waits for the first byte (bounded by `timeout` unless it is 0; then
  /// TimeoutError); otherwise returns 0 when none has arrived. Throws PeerLostError when the connection ended.
  std::size_t read(void* data, std::size_t size, bool wait, std::chrono::milliseconds timeout);
  /// Writes up to kTlsWriteSlice of `size` bytes; `wait` and errors as for read. A write that returned 0 must be
  /// repeated with the same bytes first (OpenSSL may have taken them into a record already).
  std::size_t write(const void* data, std::size_t size, bool wait, std::chrono::milliseconds timeout);
  /// Decrypted bytes are waiting inside OpenSSL: the socket may show nothing to read although read() has data.
  bool has_buffered();
  void* ssl() const { return ssl_; }

 private:
  std::mutex mutex_;  // one OpenSSL call at a time
  void* ssl_;
  int fd_;
};

/// Runs the TLS handshake as `role` on `socket` (connected); later reads and writes of `socket` are TLS. A
/// Unix-domain socket is left as it is (same-host connections stay plain). Throws AuthError when the other side's
/// certificate is refused, ProtocolError when the other side does not speak TLS (or speaks it with other settings),
/// TimeoutError at `deadline`, PeerLostError when the connection ends.
void start_tls(Socket& socket, const TlsContext& context, TlsRole role, Clock::time_point deadline);

/// True when this process's OpenSSL moved the records of `socket` (after start_tls) to the kernel.
bool tls_kernel_offload(const Socket& socket);

}  // namespace aikido::transport
