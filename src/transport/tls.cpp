#include "transport/tls.hpp"

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <deque>
#include <utility>

#include "base/crypto.hpp"
#include "base/env.hpp"
#include "base/error.hpp"

namespace aikido {

TlsOptions TlsOptions::from_env() {
  TlsOptions o;
  if (auto value = env::get(env::kTls)) {
    if (*value != "0" && *value != "1") {
      throw ConfigError(detail::str_cat(env::kTls, "='", *value, "' is not 0 or 1; fix or unset it"));
    }
    o.enabled = *value == "1";
  }
  o.cert_file = env::get(env::kTlsCert).value_or("");
  o.key_file = env::get(env::kTlsKey).value_or("");
  o.ca_file = env::get(env::kTlsCa).value_or("");
  const int given = int(!o.cert_file.empty()) + int(!o.key_file.empty()) + int(!o.ca_file.empty());
  if (given != 0 && given != 3) {
    throw ConfigError(detail::str_cat("TLS with files of its own needs all of ", env::kTlsCert, ", ", env::kTlsKey,
                                      " and ", env::kTlsCa, " (aikido-run --tls-cert, --tls-key, --tls-ca); ",
                                      given, " of them are set"));
  }
  if (given == 3) o.enabled = true;
  return o;
}

std::string TlsOptions::describe() const {
  if (!enabled) return "off";
  if (cert_file.empty()) return "on (certificate derived from the job secret)";
  return detail::str_cat("on (certificate ", cert_file, ", CA ", ca_file, ")");
}

namespace transport {
namespace {

using detail::str_cat;

SSL* ssl_of(void* p) { return static_cast<SSL*>(p); }
SSL_CTX* ctx_of(void* p) { return static_cast<SSL_CTX*>(p); }

// OpenSSL's queued errors of this thread, as one line (and the queue emptied).
std::string openssl_errors() {
  std::string out;
  while (const unsigned long e = ERR_get_error()) {
    char buffer[256];
    ERR_error_string_n(e, buffer, sizeof buffer);
    if (!out.empty()) out += "; ";
    out += buffer;
  }
  return out.empty() ? "no detail from OpenSSL" : out;
}

// Waits until `fd` is ready for `events` or `timeout` (0: without bound) passes; false on the timeout.
bool wait_ready(int fd, short events, std::chrono::milliseconds timeout) {
  pollfd pfd{fd, events, 0};
  for (;;) {
    const int r = ::poll(&pfd, 1, timeout.count() > 0 ? int(timeout.count()) : -1);
    if (r > 0) return true;
    if (r == 0) return false;
    if (errno != EINTR) detail::throw_system("poll on a TLS connection");
  }
}

// A BIO over TlsStream::Buffers: OpenSSL takes received bytes from `in` and appends records to `out`; the stream
// moves them from and to the socket.
int buffers_write(BIO* bio, const char* data, int size) {
  auto* io = static_cast<TlsStream::Buffers*>(BIO_get_data(bio));
  BIO_clear_retry_flags(bio);
  io->out.append(data, std::size_t(size));
  return size;
}

int buffers_read(BIO* bio, char* data, int size) {
  auto* io = static_cast<TlsStream::Buffers*>(BIO_get_data(bio));
  BIO_clear_retry_flags(bio);
  const std::size_t take = std::min(std::size_t(size), io->in_end - io->in_begin);
  if (take == 0) {
    BIO_set_retry_read(bio);
    return -1;
  }
  std::memcpy(data, io->in.data() + io->in_begin, take);
  io->in_begin += take;
  return int(take);
}

long buffers_ctrl(BIO*, int cmd, long, void*) { return cmd == BIO_CTRL_FLUSH ? 1 : 0; }

int buffers_create(BIO* bio) {
  BIO_set_init(bio, 1);
  return 1;
}

BIO_METHOD* buffers_method() {
  static BIO_METHOD* method = [] {
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "aikido buffers");
    if (m == nullptr || BIO_meth_set_write(m, buffers_write) != 1 || BIO_meth_set_read(m, buffers_read) != 1 ||
        BIO_meth_set_ctrl(m, buffers_ctrl) != 1 || BIO_meth_set_create(m, buffers_create) != 1) {
      throw Error("cannot create the TLS stream's BIO method: " + openssl_errors());
    }
    return m;
  }();
  return method;
}

// The certificate every side of a job derives from its secret: an Ed25519 key (deterministic) that signs a
// certificate with fixed fields (Ed25519 signatures are deterministic too), so every side builds the same bytes.
struct DerivedIdentity {
  EVP_PKEY* key = nullptr;
  X509* cert = nullptr;
};

DerivedIdentity derive_identity(const std::string& secret) {
  static constexpr char kLabel[] = "aikido tls certificate key v1";
  const detail::Digest seed =
      detail::hmac_sha256({reinterpret_cast<const std::uint8_t*>(secret.data()), secret.size()},
                          {reinterpret_cast<const std::uint8_t*>(kLabel), sizeof kLabel - 1});
  DerivedIdentity id;
  id.key = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr, seed.data(), seed.size());
  id.cert = X509_new();
  bool ok = id.key != nullptr && id.cert != nullptr;
  ok = ok && X509_set_version(id.cert, 2) == 1;
  ok = ok && ASN1_INTEGER_set(X509_get_serialNumber(id.cert), 1) == 1;
  ok = ok && ASN1_TIME_set_string_X509(X509_getm_notBefore(id.cert), "20000101000000Z") == 1;
  ok = ok && ASN1_TIME_set_string_X509(X509_getm_notAfter(id.cert), "99991231235959Z") == 1;
  X509_NAME* name = ok ? X509_get_subject_name(id.cert) : nullptr;
  ok = ok && X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                                        reinterpret_cast<const unsigned char*>("aikido job"), -1, -1, 0) == 1;
  ok = ok && X509_set_issuer_name(id.cert, name) == 1;
  ok = ok && X509_set_pubkey(id.cert, id.key) == 1;
  ok = ok && X509_sign(id.cert, id.key, nullptr) > 0;
  if (!ok) {
    EVP_PKEY_free(id.key);
    X509_free(id.cert);
    throw Error("cannot derive the job's TLS certificate: " + openssl_errors());
  }
  return id;
}

// Accepts exactly the job's derived certificate (the leaf the other side presented), nothing else.
int verify_derived(X509_STORE_CTX* store, void* ours) {
  X509* theirs = X509_STORE_CTX_get0_cert(store);
  if (theirs != nullptr && X509_cmp(theirs, static_cast<X509*>(ours)) == 0) return 1;
  X509_STORE_CTX_set_error(store, X509_V_ERR_CERT_REJECTED);
  return 0;
}

void load_files(SSL_CTX* ctx, const TlsOptions& o) {
  if (SSL_CTX_use_certificate_chain_file(ctx, o.cert_file.c_str()) != 1) {
    throw ConfigError(str_cat("cannot use the TLS certificate '", o.cert_file, "' (--tls-cert, ", env::kTlsCert,
                              "): ", openssl_errors()));
  }
  if (SSL_CTX_use_PrivateKey_file(ctx, o.key_file.c_str(), SSL_FILETYPE_PEM) != 1) {
    if (ERR_GET_REASON(ERR_peek_last_error()) == X509_R_KEY_VALUES_MISMATCH) {
      throw ConfigError(str_cat("the TLS key '", o.key_file, "' (--tls-key, ", env::kTlsKey,
                                ") does not belong to the certificate '", o.cert_file, "': ", openssl_errors()));
    }
    throw ConfigError(str_cat("cannot use the TLS key '", o.key_file, "' (--tls-key, ", env::kTlsKey,
                              "): ", openssl_errors()));
  }
  if (SSL_CTX_check_private_key(ctx) != 1) {
    throw ConfigError(str_cat("the TLS key '", o.key_file, "' does not belong to the certificate '", o.cert_file,
                              "': ", openssl_errors()));
  }
  if (SSL_CTX_load_verify_locations(ctx, o.ca_file.c_str(), nullptr) != 1) {
    throw ConfigError(str_cat("cannot use the TLS CA file '", o.ca_file, "' (--tls-ca, ", env::kTlsCa,
                              "): ", openssl_errors()));
  }
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
}

// Alerts by which the other side says it refused our certificate.
bool refused_our_certificate(int reason) {
  switch (reason) {
    case SSL_R_SSLV3_ALERT_BAD_CERTIFICATE:
    case SSL_R_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_REVOKED:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN:
    case SSL_R_TLSV1_ALERT_UNKNOWN_CA:
    case SSL_R_TLSV1_ALERT_DECRYPT_ERROR:
    case SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED:
      return true;
    default:
      return false;
  }
}

[[noreturn]] void throw_handshake_failure(SSL* ssl, int error) {
  const long verify = SSL_get_verify_result(ssl);
  const unsigned long first = ERR_peek_error();
  const std::string detail = openssl_errors();
  if (verify != X509_V_OK) {
    throw AuthError(str_cat("refused the other side's TLS certificate (", X509_verify_cert_error_string(verify),
                            "): with the default certificate its job secret differs; with --tls-cert/--tls-ca it "
                            "was not signed by this side's CA"));
  }
  if (first != 0 && ERR_GET_LIB(first) == ERR_LIB_SSL && refused_our_certificate(ERR_GET_REASON(first))) {
    throw AuthError(str_cat("the other side refused this side's TLS certificate (", detail,
                            "): the job secrets or CAs differ"));
  }
  if (error == SSL_ERROR_ZERO_RETURN || (error == SSL_ERROR_SYSCALL && first == 0)) {
    throw PeerLostError("the other side closed the connection during the TLS handshake; is it started without "
                        "TLS (every worker, aikido-run and aikido-ctl need the same --tls setting), or did it refuse "
                        "this side's certificate?");
  }
  throw ProtocolError(str_cat("TLS handshake failed (", detail,
                              "); does the other side use TLS with the same settings (--tls, AIKIDO_TLS)?"));
}

}  // namespace

TlsContext::~TlsContext() { SSL_CTX_free(ctx_of(ctx_)); }

std::shared_ptr<const TlsContext> TlsContext::create(const TlsOptions& options, const std::string& secret) {
  std::shared_ptr<TlsContext> context(new TlsContext());
  SSL_CTX* ctx = SSL_CTX_new(TLS_method());
  if (ctx == nullptr) throw Error("cannot create a TLS context: " + openssl_errors());
  context->ctx_ = ctx;
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  // AES-128-GCM first: the fastest with AES instructions, and as strong as the job needs.
  SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256");
  SSL_CTX_set_num_tickets(ctx, 0);  // connections are never resumed
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
  const int files = int(!options.cert_file.empty()) + int(!options.key_file.empty()) + int(!options.ca_file.empty());
  if (files == 3) {
    load_files(ctx, options);
  } else if (files != 0) {
    throw ConfigError("TLS with files of its own needs all three: --tls-cert, --tls-key and --tls-ca");
  } else {
    if (secret.empty()) {
      throw ConfigError(str_cat("TLS with the certificate derived from the job secret needs the secret (",
                                env::kSecret, " or ", env::kSecretFile, "), or --tls-cert, --tls-key and --tls-ca"));
    }
    DerivedIdentity id = derive_identity(secret);
    const bool ok = SSL_CTX_use_certificate(ctx, id.cert) == 1 && SSL_CTX_use_PrivateKey(ctx, id.key) == 1;
    EVP_PKEY_free(id.key);
    if (!ok) {
      X509_free(id.cert);
      throw Error("cannot use the job's derived TLS certificate: " + openssl_errors());
    }
    X509* ours = SSL_CTX_get0_certificate(ctx);  // owned by ctx from here on
    X509_free(id.cert);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
    SSL_CTX_set_cert_verify_callback(ctx, verify_derived, ours);
  }
  context->description_ = options.describe();
  return context;
}

std::shared_ptr<const TlsContext> TlsContext::shared(const TlsOptions& options, const std::string& secret) {
  if (!options.enabled) return nullptr;
  const detail::Digest digest = detail::sha256(secret.data(), secret.size());
  const std::string key = str_cat(options.cert_file, '\n', options.key_file, '\n', options.ca_file, '\n',
                                  detail::to_hex(digest));
  static std::mutex mutex;
  static std::deque<std::pair<std::string, std::shared_ptr<const TlsContext>>> recent;
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& [k, context] : recent) {
    if (k == key) return context;
  }
  auto context = create(options, secret);
  recent.emplace_back(key, context);
  if (recent.size() > 4) recent.pop_front();
  return context;
}

void start_tls(Socket& socket, const TlsContext& context, TlsRole role, Clock::time_point deadline) {
  int domain = 0;
  socklen_t len = sizeof domain;
  if (::getsockopt(socket.fd(), SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 && domain == AF_UNIX) return;
  ERR_clear_error();
  SSL* ssl = SSL_new(ctx_of(context.native()));
  if (ssl == nullptr) throw Error("cannot start TLS on a connection: " + openssl_errors());
  auto stream = std::make_unique<TlsStream>(ssl, socket.fd());
  stream->handshake(role == TlsRole::client, deadline);
  socket.attach_tls(std::move(stream));
}

TlsStream::TlsStream(void* ssl, int fd) : ssl_(ssl), fd_(fd) {
  io_.in.resize(kTlsReadChunk);
  BIO* bio = BIO_new(buffers_method());
  if (bio == nullptr) {
    SSL_free(ssl_of(ssl));
    throw Error("cannot start TLS on a connection: " + openssl_errors());
  }
  BIO_set_data(bio, &io_);
  SSL_set_bio(ssl_of(ssl), bio, bio);  // the same BIO both ways: ssl takes our one reference
}

TlsStream::~TlsStream() { SSL_free(ssl_of(ssl_)); }

bool TlsStream::flush_locked() {
  while (io_.out_begin < io_.out.size()) {
    const ssize_t n =
        ::send(fd_, io_.out.data() + io_.out_begin, io_.out.size() - io_.out_begin, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      io_.out_begin += std::size_t(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return false;
    throw PeerLostError(str_cat("connection failed while writing: ", std::strerror(n < 0 ? errno : EPIPE)));
  }
  io_.out.clear();
  io_.out_begin = 0;
  return true;
}

bool TlsStream::fill_locked() {
  if (io_.in_begin == io_.in_end) io_.in_begin = io_.in_end = 0;
  if (io_.in_end == io_.in.size()) {
    if (io_.in_begin == 0) return true;  // full of records OpenSSL has not taken yet
    std::memmove(io_.in.data(), io_.in.data() + io_.in_begin, io_.in_end - io_.in_begin);
    io_.in_end -= io_.in_begin;
    io_.in_begin = 0;
  }
  for (;;) {
    const ssize_t n = ::recv(fd_, io_.in.data() + io_.in_end, io_.in.size() - io_.in_end, MSG_DONTWAIT);
    if (n > 0) {
      io_.in_end += std::size_t(n);
      starved_ = false;
      return true;
    }
    if (n == 0) throw PeerLostError("connection closed by the other side");
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
    throw PeerLostError(str_cat("connection failed while reading: ", std::strerror(errno)));
  }
}

void TlsStream::handshake(bool client, Clock::time_point deadline) {
  auto wait_until_deadline = [&](short events) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0 || !wait_ready(fd_, events, left)) {
      throw TimeoutError("the TLS handshake did not finish in time");
    }
  };
  std::lock_guard<std::mutex> lock(mutex_);
  SSL* ssl = ssl_of(ssl_);
  try {
    for (;;) {
      ERR_clear_error();
      const int r = client ? SSL_connect(ssl) : SSL_accept(ssl);
      const int error = r == 1 ? SSL_ERROR_NONE : SSL_get_error(ssl, r);
      if (r != 1 && error != SSL_ERROR_WANT_READ) {
        try {
          flush_locked();  // the alert that tells the other side why
        } catch (const Error&) {
        }
        throw_handshake_failure(ssl, error);
      }
      while (!flush_locked()) wait_until_deadline(POLLOUT);
      if (r == 1) return;
      while (!fill_locked()) wait_until_deadline(POLLIN);
    }
  } catch (const PeerLostError&) {
    throw PeerLostError(
        "the other side closed the connection during the TLS handshake; is it started without TLS (every worker, "
        "aikido-run and aikido-ctl need the same --tls setting), or did it refuse this side's certificate?");
  }
}

std::size_t TlsStream::read(void* data, std::size_t size, bool wait, std::chrono::milliseconds timeout) {
  if (size == 0) return 0;
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (;;) {
        ERR_clear_error();
        std::size_t n = 0;
        const int r = SSL_read_ex(ssl_of(ssl_), data, size, &n);
        if (r == 1) {
          if (io_.out_begin < io_.out.size()) {
            try {
              flush_locked();  // anything reading produced (and records of a write still waiting)
            } catch (const Error&) {
            }
          }
          return n;
        }
        const int error = SSL_get_error(ssl_of(ssl_), r);
        if (error == SSL_ERROR_ZERO_RETURN) throw PeerLostError("connection closed by the other side");
        if (error != SSL_ERROR_WANT_READ) {
          throw PeerLostError("TLS connection failed while reading: " + openssl_errors());
        }
        if (!fill_locked()) break;
      }
      starved_ = true;
    }
    if (!wait) return 0;
    if (!wait_ready(fd_, POLLIN, timeout)) throw TimeoutError("timed out reading from connection");
  }
}

std::size_t TlsStream::write(const void* data, std::size_t size, bool wait, std::chrono::milliseconds timeout) {
  if (size == 0) return 0;
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (flush_locked()) {
        if (pending_plain_ > 0) {  // the caller repeats the bytes whose records are now sent
          const std::size_t n = std::exchange(pending_plain_, 0);
          return n;
        }
        ERR_clear_error();
        std::size_t n = 0;
        if (SSL_write_ex(ssl_of(ssl_), data, std::min(size, kTlsWriteSlice), &n) != 1) {
          throw PeerLostError("TLS connection failed while writing: " + openssl_errors());
        }
        if (flush_locked()) return n;
        pending_plain_ = n;
      }
    }
    if (!wait) return 0;
    if (!wait_ready(fd_, POLLOUT, timeout)) throw TimeoutError("timed out writing to connection");
  }
}

bool TlsStream::has_buffered() {
  std::lock_guard<std::mutex> lock(mutex_);
  return SSL_pending(ssl_of(ssl_)) > 0 || (io_.in_end > io_.in_begin && !starved_);
}

}  // namespace transport
}  // namespace aikido
