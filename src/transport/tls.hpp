// TLS 1.3 (OpenSSL's libssl) on TCP sockets.
//
// A TlsContext holds the certificate a side presents and how it checks the other side's: one certificate derived
// from the job secret (the default; every side has the same and accepts only it), or files given by the user
// (mutual TLS against a CA). start_tls() runs the TLS handshake on a connected Socket; from then on the Socket's
// reads and writes go through TLS and keep their meaning (blocking, non-blocking, timeouts, shutdown()).
//
// One connection is read by one thread and written by another at the same time (transport/connection.hpp), and an
// OpenSSL connection object must not be used by two threads at once. So every OpenSSL call runs under a
// per-connection mutex and never blocks: OpenSSL reads and writes memory buffers, and the stream moves bytes between
// them and the socket itself (send with MSG_NOSIGNAL, recv, both non-blocking), waiting with poll() outside the mutex.
// That also batches system calls: a write encrypts up to kTlsWriteSlice bytes (four 16 KiB records) and sends them
// with one call, and a read takes up to kTlsReadChunk bytes of records from the socket at once; OpenSSL's own socket
// I/O makes two calls per record to read and one to write. Kernel TLS is not used (records are encrypted in user
// space).
#pragma once

#include <aikido/tls.hpp>
#include <chrono>
#include <cstddef>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "transport/socket.hpp"

namespace aikido::transport {

/// Bytes handed to OpenSSL by one write call (four full TLS records).
inline constexpr std::size_t kTlsWriteSlice = 64 * 1024;
/// Bytes of records taken from the socket by one read call.
inline constexpr std::size_t kTlsReadChunk = 256 * 1024;

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
  /// Takes `ssl` (an SSL*, whose I/O this stream does through memory BIOs) for the connected socket `fd`.
  TlsStream(void* ssl, int fd);
  ~TlsStream();
  TlsStream(const TlsStream&) = delete;
  TlsStream& operator=(const TlsStream&) = delete;

  /// The TLS handshake, as client or server, until `deadline` (then TimeoutError). Errors as start_tls().
  void handshake(bool client, Clock::time_point deadline);
  /// Reads up to `size` bytes. `wait`: waits for the first byte (bounded by `timeout` unless it is 0; then
  /// TimeoutError); otherwise returns 0 when none has arrived. Throws PeerLostError when the connection ended.
  std::size_t read(void* data, std::size_t size, bool wait, std::chrono::milliseconds timeout);
  /// Writes up to kTlsWriteSlice of `size` bytes; `wait` and errors as for read. A write that returned 0 must be
  /// repeated with the same bytes first: they may be encrypted already and waiting for the socket.
  std::size_t write(const void* data, std::size_t size, bool wait, std::chrono::milliseconds timeout);
  /// Received bytes wait inside the stream (decrypted, or whole records not yet decrypted): the socket may show
  /// nothing to read although read() has data.
  bool has_buffered();

  /// What OpenSSL's I/O reads from and writes to (through a BIO of this file's own).
  struct Buffers {
    std::vector<char> in;  // received bytes: [in_begin, in_end) not yet taken by OpenSSL
    std::size_t in_begin = 0;
    std::size_t in_end = 0;
    std::string out;  // records produced: [out_begin, out.size()) not yet sent
    std::size_t out_begin = 0;
  };

 private:
  /// With mutex_ held: sends what OpenSSL produced, without blocking; true when nothing is left.
  bool flush_locked();
  /// With mutex_ held: takes what has arrived on the socket into OpenSSL's input; false when nothing had.
  bool fill_locked();

  std::mutex mutex_;  // one OpenSSL call at a time; guards everything below
  void* ssl_;
  int fd_;
  Buffers io_;
  std::size_t pending_plain_ = 0;  // bytes a write encrypted whose records still wait in io_.out
  bool starved_ = false;           // the last read emptied the socket and still lacked a whole record
};

/// Runs the TLS handshake as `role` on `socket` (connected); later reads and writes of `socket` are TLS. A
/// Unix-domain socket is left as it is (same-host connections stay plain). Throws AuthError when the other side's
/// certificate is refused, ProtocolError when the other side does not speak TLS (or speaks it with other settings),
/// TimeoutError at `deadline`, PeerLostError when the connection ends.
void start_tls(Socket& socket, const TlsContext& context, TlsRole role, Clock::time_point deadline);

}  // namespace aikido::transport
