// Key-value store used for rendezvous: workers publish their addresses and find each other's.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>

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

/// Client of the store served by `aikido-run` (address "host:port"); every connection proves knowledge of `secret`.
std::shared_ptr<Store> connect_tcp_store(const std::string& address, const std::string& secret,
                                         std::chrono::milliseconds timeout);

}  // namespace aikido
