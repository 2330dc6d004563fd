// Client of the rendezvous store served by aikido-run or by rank 0 (protocol: runtime/store_protocol.hpp; server:
// runtime/store_server.hpp).
#include <aikido/errors.hpp>
#include <aikido/store.hpp>
#include <mutex>
#include <utility>

#include "base/error.hpp"
#include "runtime/store_protocol.hpp"
#include "transport/handshake.hpp"
#include "transport/socket.hpp"

namespace aikido {
namespace {

namespace sp = store_protocol;
using detail::str_cat;

// Rethrows the exception being handled with `context` in front of its message, keeping its type so that callers
// can still tell a timeout from a lost connection.
[[noreturn]] void rethrow_with_context(const std::string& context) {
  try {
    throw;
  } catch (const TimeoutError& e) {
    throw TimeoutError(context + e.what());
  } catch (const PeerLostError& e) {
    throw PeerLostError(context + e.what());
  } catch (const AuthError& e) {
    throw AuthError(context + e.what());
  } catch (const ProtocolError& e) {
    throw ProtocolError(context + e.what());
  } catch (const ConfigError& e) {
    throw ConfigError(context + e.what());
  } catch (const MismatchError& e) {
    throw MismatchError(context + e.what());
  } catch (const Error& e) {
    throw Error(context + e.what());
  }
}

class TcpStore final : public Store {
 public:
  TcpStore(std::string address, std::string secret, std::chrono::milliseconds timeout, const TlsOptions& tls)
      : text_(std::move(address)),
        secret_(std::move(secret)),
        timeout_(timeout),
        tls_(transport::TlsContext::shared(tls, secret_)) {
    if (timeout_.count() <= 0) throw ConfigError("the store timeout must be positive");
    address_ = transport::Address::parse(text_);
    std::lock_guard<std::mutex> lock(mutex_);
    ensure_connected();
  }

  void set(const std::string& key, const std::string& value) override {
    check_key(key);
    check_value(key, value);
    sp::Encoder request;
    request.u8(std::uint8_t(sp::Op::set));
    request.bytes(key);
    request.bytes(value);
    exchange(sp::Op::set, key, request, timeout_);
  }

  std::optional<std::string> get(const std::string& key) override {
    check_key(key);
    sp::Encoder request;
    request.u8(std::uint8_t(sp::Op::get));
    request.bytes(key);
    return exchange(sp::Op::get, key, request, timeout_);
  }

  std::string wait(const std::string& key, std::chrono::milliseconds timeout) override {
    check_key(key);
    const auto wait_ms = std::uint64_t(std::max<std::int64_t>(0, timeout.count()));
    sp::Encoder request;
    request.u8(std::uint8_t(sp::Op::wait));
    request.bytes(key);
    request.u64(wait_ms);
    // The server answers at the latest when the wait expires; allow one more I/O timeout for the answer to arrive.
    const auto io_timeout = std::chrono::milliseconds(std::min(wait_ms, sp::kMaxWaitMs)) + timeout_;
    auto value = exchange(sp::Op::wait, key, request, io_timeout);
    if (!value) {
      throw TimeoutError(str_cat("store key '", key, "' did not appear within ", timeout.count(),
                                 " ms at the rendezvous store ", text_,
                                 "; the rank that should set it may have failed to start or crashed"));
    }
    return *value;
  }

  std::optional<std::string> compare_and_set(const std::string& key, const std::optional<std::string>& expected,
                                             const std::string& desired) override {
    check_key(key);
    if (expected) check_value(key, *expected);
    check_value(key, desired);
    sp::Encoder request;
    request.u8(std::uint8_t(sp::Op::cas));
    request.bytes(key);
    request.u8(expected ? 1 : 0);
    if (expected) request.bytes(*expected);
    request.bytes(desired);
    return exchange(sp::Op::cas, key, request, timeout_);
  }

 private:
  static void check_key(const std::string& key) {
    if (key.size() > sp::kMaxKeyBytes) {
      throw ConfigError(str_cat("store key '", key.substr(0, 64), "...' is ", key.size(),
                                " bytes long; keys are "
                                "limited to ",
                                sp::kMaxKeyBytes, " bytes"));
    }
  }

  static void check_value(const std::string& key, const std::string& value) {
    if (value.size() > sp::kMaxValueBytes) {
      throw ConfigError(str_cat("value for store key '", key, "' is ", value.size(),
                                " bytes long; values are "
                                "limited to ",
                                sp::kMaxValueBytes, " bytes"));
    }
  }

  // Opens the connection when there is none (at construction, or after a failed request left the stream in an
  // unknown state). Caller holds mutex_.
  void ensure_connected() {
    if (socket_.valid()) return;
    const std::string context = str_cat("cannot open a connection to the rendezvous store at ", text_, ": ");
    try {
      transport::Socket socket = transport::connect(address_, transport::Clock::now() + timeout_);
      transport::handshake_connect(socket, secret_, transport::Channel::store, 0, -1, timeout_, tls_.get());
      socket_ = std::move(socket);
    } catch (const AuthError& e) {
      throw AuthError(str_cat(context, e.what(),
                              "; every worker needs the job's secret (AIKIDO_SECRET or AIKIDO_SECRET_FILE; aikido-run "
                              "gives its workers one)"));
    } catch (const TimeoutError& e) {
      throw TimeoutError(str_cat(context, e.what(),
                                 "; check the store's address (AIKIDO_STORE_ADDR, AIKIDO_STORE, or MASTER_ADDR and "
                                 "MASTER_PORT) and that its server (aikido-run, or rank 0) is still running"));
    } catch (const Error&) {
      rethrow_with_context(context);
    }
  }

  // Sends `request` and reads the response. Returns the value of an `ok` response, nullopt for `not_found` and
  // `timeout`. Any failure closes the connection; the next request opens a new one.
  std::optional<std::string> exchange(sp::Op op, const std::string& key, const sp::Encoder& request,
                                      std::chrono::milliseconds io_timeout) {
    std::lock_guard<std::mutex> lock(mutex_);
    ensure_connected();
    try {
      socket_.set_timeout(io_timeout);
      socket_.write_all(request.data().data(), request.data().size());
      return sp::read_response(socket_, op);
    } catch (const Error&) {
      socket_.close();
      rethrow_with_context(str_cat("store ", sp::op_name(op), " of key '", key, "' at ", text_, " failed: "));
    }
  }

  transport::Address address_;
  const std::string text_;
  const std::string secret_;
  const std::chrono::milliseconds timeout_;
  const std::shared_ptr<const transport::TlsContext> tls_;  // null: plain
  std::mutex mutex_;
  transport::Socket socket_;
};

}  // namespace

std::shared_ptr<Store> connect_tcp_store(const std::string& address, const std::string& secret,
                                         std::chrono::milliseconds timeout, const TlsOptions& tls) {
  return std::make_shared<TcpStore>(address, secret, timeout, tls);
}

}  // namespace aikido
