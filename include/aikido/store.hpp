// Key-value store used for rendezvous: workers publish their addresses and find each other's.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <aikido/tls.hpp>

namespace aikido {

/// A shared key-value store. Implementations are thread safe.
class Store {
 public:
  virtual ~Store() = default;
  /// Sets `key` to `value` (overwrites).
  virtual void set(const std::string& key, const std::string& value) = 0;
  /// The value of `key`, or nullopt when absent.
  virtual std::optional<std::string> get(const std::string& key) = 0;
  /// Waits until `key` exists and returns its value; throws TimeoutError naming the key after `timeout`.
  virtual std::string wait(const std::string& key, std::chrono::milliseconds timeout) = 0;
  /// Sets `key` to `desired` when its current value is `expected` (nullopt: absent). Returns the value after the
  /// call: `desired` on success, the current value otherwise (empty optional when absent).
  virtual std::optional<std::string> compare_and_set(const std::string& key, const std::optional<std::string>& expected,
                                                     const std::string& desired) = 0;
};

/// A store inside this process, for ranks that run as threads of one process (tests, single-process runs).
std::shared_ptr<Store> make_memory_store();

/// Client of the store served by `aikido-run` (address "host:port"); every connection proves knowledge of `secret`,
/// inside TLS when `tls` is enabled (the server must use TLS too).
std::shared_ptr<Store> connect_tcp_store(const std::string& address, const std::string& secret,
                                         std::chrono::milliseconds timeout, const TlsOptions& tls = {});

/// Opens the store a URL names: "SCHEME://ADDRESS". Built in: tcp://HOST:PORT, the store that aikido-run (or rank 0
/// of a job started by another launcher) serves; every connection proves knowledge of `secret`. Other schemes
/// (etcd://H1:P1,H2:P2) are those registered with register_store_scheme. Waits up to `timeout` for the store to
/// come up (a server that refuses connections, a host name that does not resolve yet) before TimeoutError.
/// Throws ConfigError for a malformed URL or an unknown scheme (the message lists the known ones), AuthError when
/// the store rejects the secret. Thread safe. `tls` applies to tcp:// (the built-in client, even where another
/// connector was registered for tcp); etcd's TLS has settings of its own (etcds://, AIKIDO_STORE_CA...).
std::shared_ptr<Store> connect_store(const std::string& url, const std::string& secret,
                                     std::chrono::milliseconds timeout, const TlsOptions& tls = {});

/// Opens a store of one scheme: called with the whole URL, the secret and the timeout of connect_store.
using StoreConnector = std::function<std::shared_ptr<Store>(const std::string& url, const std::string& secret,
                                                            std::chrono::milliseconds timeout)>;
/// Makes connect_store open URLs of `scheme` ("etcd") with `connector`, replacing an earlier registration of the
/// same scheme. Thread safe; register before the first connect_store that needs it.
void register_store_scheme(const std::string& scheme, StoreConnector connector);
/// The schemes connect_store knows, sorted.
std::vector<std::string> store_schemes();

}  // namespace aikido
