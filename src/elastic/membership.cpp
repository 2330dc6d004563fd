// MembershipStore over an aikido::Store: one key per version, published with compare-and-set.
#include <aikido/elastic.hpp>
#include <aikido/errors.hpp>

#include "base/error.hpp"
#include "base/crypto.hpp"
#include "elastic/proposal.hpp"

namespace aikido {
namespace {

using detail::str_cat;

class StoreMembership final : public MembershipStore {
 public:
  StoreMembership(std::shared_ptr<Store> store, std::string job_id)
      : store_(std::move(store)), prefix_(std::move(job_id) + "/cluster/") {
    if (!store_) throw ConfigError("a membership store needs a key-value store");
  }

  std::optional<ClusterSpec> latest() override {
    std::uint64_t v = 0;
    if (auto hint = store_->get(prefix_ + "latest")) v = parse_hint(*hint);
    auto text = store_->get(key(v));
    if (!text) return std::nullopt;  // the hint never runs ahead of the published versions
    // The hint may lag behind (it is set after the compare-and-set): walk forward to the last version.
    while (auto next = store_->get(key(v + 1))) {
      ++v;
      text = std::move(next);
    }
    return decode(*text);
  }

  std::optional<ClusterSpec> get(std::uint64_t version) override {
    auto text = store_->get(key(version));
    if (!text) return std::nullopt;
    return decode(*text);
  }

  bool propose(const ClusterSpec& next) override {
    next.validate();
    if (next.version > 0 && !store_->get(key(next.version - 1))) return false;  // not based on the latest
    const std::string text = elastic::encode_proposal(next);
    const auto after = store_->compare_and_set(key(next.version), std::nullopt, text);
    if (!after || *after != text) return false;
    store_->set(prefix_ + "latest", std::to_string(next.version));
    return true;
  }

  std::optional<ClusterSpec> watch(std::uint64_t after, std::chrono::milliseconds timeout) override {
    try {
      store_->wait(key(after + 1), timeout);
    } catch (const TimeoutError&) {
      return std::nullopt;
    }
    return latest();
  }

 private:
  static ClusterSpec decode(std::string_view text) { return elastic::decode_proposal(text); }

  std::string key(std::uint64_t version) const { return prefix_ + "v" + std::to_string(version); }

  std::uint64_t parse_hint(const std::string& text) const {
    try {
      std::size_t used = 0;
      const unsigned long long v = std::stoull(text, &used);
      if (used == text.size()) return v;
    } catch (const std::exception&) {
    }
    throw ProtocolError(
        str_cat("membership store: '", prefix_, "latest' holds '", text.substr(0, 32), "', not a version number"));
  }

  std::shared_ptr<Store> store_;
  const std::string prefix_;
};

}  // namespace

namespace elastic {

std::string encode_proposal(const ClusterSpec& spec) {
  std::uint8_t token[8];
  detail::random_bytes(token, sizeof token);
  return str_cat("proposal=", detail::to_hex(token), "\n", spec.encode());
}

ClusterSpec decode_proposal(std::string_view text) {
  if (text.starts_with("proposal=")) {
    const auto end = text.find('\n');
    text.remove_prefix(end == std::string_view::npos ? text.size() : end + 1);
  }
  return ClusterSpec::decode(text);
}

}  // namespace elastic

std::shared_ptr<MembershipStore> make_membership_store(std::shared_ptr<Store> store, std::string job_id) {
  return std::make_shared<StoreMembership>(std::move(store), std::move(job_id));
}

std::string worker_status_key(const std::string& job_id, std::uint64_t worker_id) {
  return job_id + "/status/w" + std::to_string(worker_id);
}

std::string no_session_key(const std::string& job_id) { return job_id + "/launcher/no-session"; }

std::string checkpoint_request_key(const std::string& job_id) { return job_id + "/checkpoint/request"; }
std::string checkpoint_done_key(const std::string& job_id) { return job_id + "/checkpoint/done"; }

}  // namespace aikido
