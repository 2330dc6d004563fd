#include <aikido/errors.hpp>
#include <aikido/store.hpp>
#include <algorithm>
#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>

#include "base/error.hpp"
#include "transport/interfaces.hpp"
#include "transport/socket.hpp"

namespace aikido {
namespace {

class MemoryStore final : public Store {
 public:
  void set(const std::string& key, const std::string& value) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      values_[key] = value;
    }
    changed_.notify_all();
  }

  std::optional<std::string> get(const std::string& key) override {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = values_.find(key);
    if (it == values_.end()) return std::nullopt;
    return it->second;
  }

  std::string wait(const std::string& key, std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!changed_.wait_for(lock, timeout, [&] { return values_.count(key) > 0; })) {
      throw TimeoutError(detail::str_cat("store key '", key, "' did not appear within ", timeout.count(), " ms"));
    }
    return values_[key];
  }

  std::optional<std::string> compare_and_set(const std::string& key, const std::optional<std::string>& expected,
                                             const std::string& desired) override {
    std::optional<std::string> result;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = values_.find(key);
      const bool present = it != values_.end();
      if (present != expected.has_value() || (present && it->second != *expected)) {
        return present ? std::optional<std::string>(it->second) : std::nullopt;
      }
      values_[key] = desired;
      result = desired;
    }
    changed_.notify_all();
    return result;
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::map<std::string, std::string> values_;
};

using detail::str_cat;
using transport::Clock;

constexpr std::chrono::milliseconds kFirstRetry{10};
constexpr std::chrono::milliseconds kLongestRetry{500};

// tcp://HOST:PORT. Retries what a store that is still coming up looks like: a host name that does not resolve yet (a
// Kubernetes pod's DNS record appears once the pod runs) and a host that is not reachable yet. connect_tcp_store
// itself retries refused connections (rank 0 not listening yet) until the deadline.
std::shared_ptr<Store> connect_tcp_url(const std::string& url, const std::string& secret,
                                       std::chrono::milliseconds timeout, const TlsOptions& tls = {}) {
  const std::string address = url.substr(url.find("://") + 3);
  const transport::Address parsed = transport::Address::parse(address);
  if (parsed.kind != transport::Address::Kind::tcp || parsed.port == 0) {
    throw ConfigError(str_cat("store URL '", url, "' is not tcp://HOST:PORT with a port above 0"));
  }
  const auto deadline = Clock::now() + timeout;
  auto retry = kFirstRetry;
  for (;;) {
    std::string why;
    if (!transport::resolve_ipv4(parsed.host)) {
      why = str_cat("the host name '", parsed.host, "' does not resolve");
    } else {
      const auto remaining = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      try {
        return connect_tcp_store(address, secret, std::max(remaining, std::chrono::milliseconds(1)), tls);
      } catch (const PeerLostError& e) {  // no route to the host yet, or a connection reset while it starts
        why = e.what();
      }
    }
    if (Clock::now() + retry >= deadline) {
      throw TimeoutError(str_cat("cannot reach the store at ", url, " within ", detail::seconds(timeout), ": ", why,
                                 "; check the address (AIKIDO_STORE, AIKIDO_STORE_ADDR, or MASTER_ADDR and "
                                 "MASTER_PORT) and that its server runs"));
    }
    std::this_thread::sleep_for(retry);
    retry = std::min(retry * 2, kLongestRetry);
  }
}

struct SchemeTable {
  std::mutex mutex;
  std::map<std::string, StoreConnector> connectors;  // guarded by mutex
};

SchemeTable& scheme_table() {
  static SchemeTable table{{}, {{"tcp", [](const std::string& url, const std::string& secret,
                                          std::chrono::milliseconds timeout) {
                                   return connect_tcp_url(url, secret, timeout);
                                 }}}};
  return table;
}

bool valid_scheme(const std::string& scheme) {
  return !scheme.empty() && std::all_of(scheme.begin(), scheme.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' || c == '-' || c == '.';
  });
}

}  // namespace

std::shared_ptr<Store> make_memory_store() { return std::make_shared<MemoryStore>(); }

void register_store_scheme(const std::string& scheme, StoreConnector connector) {
  if (!valid_scheme(scheme)) {
    throw ConfigError(str_cat("store URL scheme '", scheme, "' is not lower-case letters, digits, '+', '-' or '.'"));
  }
  if (!connector) throw ConfigError(str_cat("register_store_scheme('", scheme, "'): the connector is empty"));
  SchemeTable& table = scheme_table();
  std::lock_guard<std::mutex> lock(table.mutex);
  table.connectors[scheme] = std::move(connector);
}

std::vector<std::string> store_schemes() {
  SchemeTable& table = scheme_table();
  std::lock_guard<std::mutex> lock(table.mutex);
  std::vector<std::string> names;
  for (const auto& [name, connector] : table.connectors) names.push_back(name);
  return names;
}

std::shared_ptr<Store> connect_store(const std::string& url, const std::string& secret,
                                     std::chrono::milliseconds timeout, const TlsOptions& tls) {
  if (timeout.count() <= 0) throw ConfigError("the store timeout must be positive");
  const auto sep = url.find("://");
  const std::string scheme = sep == std::string::npos ? "" : url.substr(0, sep);
  if (!valid_scheme(scheme) || sep + 3 >= url.size()) {
    throw ConfigError(str_cat("store URL '", url, "' is not SCHEME://ADDRESS, such as tcp://HOST:PORT"));
  }
  if (scheme == "tcp" && tls.enabled) return connect_tcp_url(url, secret, timeout, tls);
  StoreConnector connector;
  {
    SchemeTable& table = scheme_table();
    std::lock_guard<std::mutex> lock(table.mutex);
    auto it = table.connectors.find(scheme);
    if (it != table.connectors.end()) connector = it->second;
  }
  if (!connector) {
    std::string known;
    for (const auto& name : store_schemes()) known += str_cat(known.empty() ? "" : ", ", name, "://");
    throw ConfigError(str_cat("store URL '", url, "' has the scheme '", scheme,
                              "', which this program does not know; it knows ", known));
  }
  return connector(url, secret, timeout);
}

}  // namespace aikido
