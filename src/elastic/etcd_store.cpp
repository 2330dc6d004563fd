// aikido::Store and MembershipStore kept in etcd (include/aikido/etcd.hpp).
#include <aikido/errors.hpp>
#include <aikido/etcd.hpp>
#include <fstream>
#include <mutex>

#include "base/error.hpp"
#include "elastic/etcd_client.hpp"
#include "elastic/proposal.hpp"

namespace aikido {

using detail::str_cat;
using elastic::EtcdClient;
using elastic::EtcdClock;
using elastic::EtcdCompacted;
using elastic::EtcdWatch;

EtcdOptions parse_etcd_url(std::string_view url) {
  const std::string_view kForm = "etcd://HOST:PORT[,HOST:PORT...] (etcds:// for TLS)";
  EtcdOptions options;
  std::string_view rest;
  bool tls = false;
  if (url.starts_with("etcd://")) {
    rest = url.substr(7);
  } else if (url.starts_with("etcds://")) {
    rest = url.substr(8);
    tls = true;
  } else {
    throw ConfigError(str_cat("store '", url, "' is not an etcd URL; the form is ", kForm));
  }
  while (!rest.empty()) {
    const auto comma = rest.find(',');
    std::string_view endpoint = rest.substr(0, comma);
    rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
    while (endpoint.ends_with('/')) endpoint.remove_suffix(1);
    const auto colon = endpoint.rfind(':');
    if (endpoint.empty() || colon == std::string_view::npos || colon == 0 || colon + 1 == endpoint.size() ||
        endpoint.substr(colon + 1).find_first_not_of("0123456789") != std::string_view::npos) {
      throw ConfigError(str_cat("store '", url, "': '", endpoint, "' is not HOST:PORT; the form is ", kForm));
    }
    options.endpoints.push_back(str_cat(tls ? "https://" : "http://", endpoint));
  }
  if (options.endpoints.empty()) throw ConfigError(str_cat("store '", url, "' names no endpoint; the form is ", kForm));
  return options;
}

void read_etcd_credentials(const std::string& path, EtcdOptions& options) {
  std::ifstream in(path);
  if (!in) throw ConfigError(str_cat("cannot read the etcd credentials file '", path, "'"));
  std::string line, user, password;
  while (std::getline(in, line)) {
    if (line.starts_with("user=")) user = line.substr(5);
    if (line.starts_with("password=")) password = line.substr(9);
  }
  if (user.empty() || password.empty()) {
    throw ConfigError(
        str_cat("the etcd credentials file '", path, "' needs a 'user=NAME' and a 'password=SECRET' line"));
  }
  options.user = std::move(user);
  options.password = std::move(password);
}

namespace {

class EtcdStore final : public Store {
 public:
  explicit EtcdStore(const EtcdOptions& options) : client_(options) {}

  void set(const std::string& key, const std::string& value) override { client_.put(key, value); }

  std::optional<std::string> get(const std::string& key) override {
    auto range = client_.range(key);
    if (range.kvs.empty()) return std::nullopt;
    return std::move(range.kvs.front().value);
  }

  std::string wait(const std::string& key, std::chrono::milliseconds timeout) override {
    const auto deadline = EtcdClock::now() + timeout;
    for (;;) {
      auto range = client_.range(key);
      if (!range.kvs.empty()) return std::move(range.kvs.front().value);
      EtcdWatch watch(client_, key, false, range.revision + 1);
      try {
        for (;;) {
          for (auto& event : watch.next(deadline)) {
            if (!event.deleted) return std::move(event.kv.value);
          }
          if (EtcdClock::now() >= deadline) {
            throw TimeoutError(str_cat("store key '", key, "' did not appear in ", client_.describe(), " within ",
                                       detail::seconds(timeout)));
          }
        }
      } catch (const EtcdCompacted&) {
        // Read it again and watch from the current revision.
      }
    }
  }

  std::optional<std::string> compare_and_set(const std::string& key, const std::optional<std::string>& expected,
                                             const std::string& desired) override {
    EtcdClient::Compare compare;
    compare.key = key;
    if (expected) {
      compare.target = EtcdClient::Compare::Target::value;
      compare.value = *expected;
    } else {
      compare.target = EtcdClient::Compare::Target::create_revision;
      compare.number = 0;
    }
    const auto result = client_.txn({compare}, {{EtcdClient::Operation::Kind::put, key, desired}},
                                    {{EtcdClient::Operation::Kind::range, key}});
    if (result.succeeded) return desired;
    if (result.ranges.empty() || result.ranges.front().kvs.empty()) return std::nullopt;
    return result.ranges.front().kvs.front().value;
  }

 private:
  EtcdClient client_;
};

class EtcdMembership final : public MembershipStore {
 public:
  EtcdMembership(const EtcdOptions& options, std::string job_id)
      : client_(options), key_(elastic::etcd_cluster_key(job_id)) {}

  std::optional<ClusterSpec> latest() override {
    auto range = client_.range(key_);
    if (range.kvs.empty()) return std::nullopt;
    return decode(range.kvs.front().value);
  }

  std::optional<ClusterSpec> get(std::uint64_t version) override {
    auto range = client_.range(history_key(version));
    if (range.kvs.empty()) return std::nullopt;
    return decode(range.kvs.front().value);
  }

  bool propose(const ClusterSpec& next) override {
    next.validate();
    EtcdClient::Compare compare;
    compare.key = key_;
    if (next.version == 0) {
      compare.target = EtcdClient::Compare::Target::create_revision;
      compare.number = 0;
    } else {
      auto current = client_.range(key_);
      if (current.kvs.empty() || decode(current.kvs.front().value).version != next.version - 1) return false;
      compare.target = EtcdClient::Compare::Target::mod_revision;
      compare.number = current.kvs.front().mod_revision;
    }
    // When the answer to a transaction that did succeed was lost and the call was repeated, the failed repetition
    // still finds its own text in the key.
    const std::string text = elastic::encode_proposal(next);
    const auto result = client_.txn({compare},
                                    {{EtcdClient::Operation::Kind::put, key_, text},
                                     {EtcdClient::Operation::Kind::put, history_key(next.version), text}},
                                    {{EtcdClient::Operation::Kind::range, key_}});
    if (result.succeeded) return true;
    return !result.ranges.empty() && !result.ranges.front().kvs.empty() &&
           result.ranges.front().kvs.front().value == text;
  }

  std::optional<ClusterSpec> watch(std::uint64_t after, std::chrono::milliseconds timeout) override {
    std::lock_guard<std::mutex> lock(watch_mutex_);
    const auto deadline = EtcdClock::now() + timeout;
    for (;;) {
      if (!watch_) {
        auto range = client_.range(key_);
        known_ = range.kvs.empty() ? std::nullopt : std::optional<ClusterSpec>(decode(range.kvs.front().value));
        watch_ = std::make_unique<EtcdWatch>(client_, key_, false, range.revision + 1);
      }
      if (known_ && known_->version > after) return known_;
      try {
        for (auto& event : watch_->next(deadline)) {
          if (!event.deleted) known_ = decode(event.kv.value);
        }
      } catch (const EtcdCompacted&) {
        watch_.reset();  // list again
        continue;
      }
      if (known_ && known_->version > after) return known_;
      if (EtcdClock::now() >= deadline) return std::nullopt;
    }
  }

 private:
  static ClusterSpec decode(std::string_view text) { return elastic::decode_proposal(text); }

  std::string history_key(std::uint64_t version) const { return key_ + "/v" + std::to_string(version); }

  EtcdClient client_;
  const std::string key_;
  std::mutex watch_mutex_;
  std::unique_ptr<EtcdWatch> watch_;
  std::optional<ClusterSpec> known_;
};

}  // namespace

std::shared_ptr<Store> connect_etcd_store(const EtcdOptions& options) { return std::make_shared<EtcdStore>(options); }

std::shared_ptr<MembershipStore> make_etcd_membership(const EtcdOptions& options, std::string job_id) {
  return std::make_shared<EtcdMembership>(options, std::move(job_id));
}

}  // namespace aikido
