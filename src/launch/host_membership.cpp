#include "launch/host_membership.hpp"

#include <aikido/errors.hpp>
#include <algorithm>
#include <sstream>

#include "base/error.hpp"
#include "base/log.hpp"
#include "base/thread.hpp"

namespace aikido::launch {

using detail::str_cat;
using elastic::EtcdClient;
using elastic::EtcdClock;

namespace {

std::int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(EtcdClock::now().time_since_epoch()).count();
}

}  // namespace

std::string HostRecord::encode() const {
  return str_cat("address=", address, " slots=", slots, " pid=", pid, " name=", host_name);
}

HostRecord HostRecord::decode(const std::string& id, const std::string& text) {
  HostRecord r;
  r.id = id;
  std::istringstream in(text);
  std::string field;
  bool have_address = false, have_slots = false;
  while (in >> field) {
    const auto eq = field.find('=');
    if (eq == std::string::npos) continue;
    const std::string name = field.substr(0, eq), value = field.substr(eq + 1);
    try {
      if (name == "address") {
        r.address = value;
        have_address = !value.empty();
      } else if (name == "slots") {
        r.slots = std::stoi(value);
        have_slots = r.slots >= 1;
      } else if (name == "pid") {
        r.pid = std::stoll(value);
      } else if (name == "name") {
        r.host_name = value;
      }
    } catch (const std::exception&) {
      have_slots = false;
    }
  }
  if (!have_address || !have_slots) {
    throw ProtocolError(str_cat("the record of host '", id, "' is unreadable: '", text.substr(0, 200), "'"));
  }
  return r;
}

std::string HostRecord::describe() const {
  return str_cat(id, " (", address, ", ", slots, slots == 1 ? " worker" : " workers", ", launcher pid ", pid,
                 host_name.empty() || host_name == id ? "" : " on " + host_name, ")");
}

HostMembership::HostMembership(std::shared_ptr<EtcdClient> client, std::string job_id, HostRecord self,
                               std::chrono::seconds host_timeout)
    : client_(std::move(client)), job_id_(std::move(job_id)), self_(std::move(self)), host_timeout_(host_timeout) {
  if (host_timeout_.count() < 1) throw ConfigError("the host timeout must be at least 1 s (--host-timeout)");
  if (self_.id.empty() || self_.id.find_first_of(" /\n") != std::string::npos) {
    throw ConfigError(str_cat("host id '", self_.id, "' must be non-empty, without spaces or '/' (--host-id)"));
  }
}

HostMembership::~HostMembership() {
  {
    std::lock_guard<std::mutex> lock(thread_mutex_);
    stopping_ = true;
  }
  thread_wake_.notify_all();
  if (keeper_.joinable()) keeper_.join();
  if (lease_ != 0 && !abandoned_) {
    try {
      client_->revoke_lease(lease_);
    } catch (const Error& e) {
      log::warn("could not revoke the lease of host ", self_.id, " (", e.what(), "); it expires within ",
                host_timeout_.count(), " s");
    }
  }
}

std::string HostMembership::key(const std::string& id) const { return job_id_ + "/hosts/" + id; }

void HostMembership::join() {
  const auto deadline = EtcdClock::now() + host_timeout_ + std::chrono::seconds(1);
  for (;;) {
    // A fresh lease for each attempt: waiting for another record may outlast a lease that nobody renews yet.
    lease_ = client_->grant_lease(host_timeout_);
    EtcdClient::Compare absent{
        key(self_.id), EtcdClient::Compare::Target::create_revision, EtcdClient::Compare::Result::equal, 0, {}};
    EtcdClient::Operation put{EtcdClient::Operation::Kind::put, key(self_.id), self_.encode(), lease_, false};
    auto result = client_->txn({absent}, {put}, {{EtcdClient::Operation::Kind::range, key(self_.id)}});
    if (result.succeeded) break;
    client_->revoke_lease(lease_);
    lease_ = 0;
    std::string holder = "another launcher";
    if (!result.ranges.empty() && !result.ranges.front().kvs.empty()) {
      try {
        holder = HostRecord::decode(self_.id, result.ranges.front().kvs.front().value).describe();
      } catch (const Error&) {
      }
    }
    if (EtcdClock::now() >= deadline) {
      throw ConfigError(str_cat("host id '", self_.id, "' is already taken in job '", job_id_, "' by ", holder,
                                "; give this launcher another --host-id, or stop the other launcher"));
    }
    log::info("host id '", self_.id, "' is held by ", holder, "; waiting up to ", host_timeout_.count(),
              " s for its lease to expire");
    // Wait for the record to go (its lease expires or its launcher leaves).
    const auto range = client_->range(key(self_.id));
    if (range.kvs.empty()) continue;
    elastic::EtcdWatch watch(*client_, key(self_.id), false, range.revision + 1);
    bool gone = false;
    while (!gone && EtcdClock::now() < deadline) {
      for (const auto& e : watch.next(deadline)) gone |= e.deleted;
    }
  }
  last_renewal_ms_ = now_ms();
  keeper_ = std::thread([this] { keep_alive_loop(); });
  detail::name_thread(keeper_, "aikido-lease");
}

void HostMembership::keep_alive_loop() {
  // Renewals three times per TTL, each with its own short patience, so that one slow answer is not a lost lease.
  const auto interval = std::chrono::duration_cast<std::chrono::milliseconds>(host_timeout_) / 3;
  EtcdOptions options = client_->options();
  options.unavailable_timeout = std::max(interval, std::chrono::milliseconds(200));
  options.request_timeout = std::min(options.request_timeout, options.unavailable_timeout);
  EtcdClient renewer(options);
  std::unique_lock<std::mutex> lock(thread_mutex_);
  while (!stopping_ && !abandoned_) {
    lock.unlock();
    try {
      if (renewer.keep_alive(lease_) > 0) {
        last_renewal_ms_ = now_ms();
      } else if (!lease_lost_.exchange(true)) {
        log::warn("the lease of host ", self_.id, " has expired: the job goes on without this host");
      }
    } catch (const Error& e) {
      log::debug("host ", self_.id, ": lease renewal failed: ", e.what());
    }
    lock.lock();
    if (lease_lost_) break;
    thread_wake_.wait_for(lock, interval, [&] { return stopping_ || abandoned_; });
  }
}

std::chrono::milliseconds HostMembership::since_renewal() const {
  return std::chrono::milliseconds(now_ms() - last_renewal_ms_.load());
}

void HostMembership::abandon() {
  {
    std::lock_guard<std::mutex> lock(thread_mutex_);
    abandoned_ = true;
  }
  thread_wake_.notify_all();
  if (keeper_.joinable()) keeper_.join();
}

std::vector<HostRecord> HostMembership::hosts() {
  auto range = client_->range(job_id_ + "/hosts/", true);
  {
    std::lock_guard<std::mutex> lock(watch_mutex_);
    if (!watch_) watch_ = std::make_shared<elastic::EtcdWatch>(*client_, job_id_ + "/hosts/", true, range.revision + 1);
  }
  std::vector<HostRecord> out;
  const std::string prefix = job_id_ + "/hosts/";
  for (const auto& kv : range.kvs) {
    try {
      HostRecord r = HostRecord::decode(kv.key.substr(prefix.size()), kv.value);
      r.joined = kv.create_revision;
      out.push_back(std::move(r));
    } catch (const ProtocolError& e) {
      log::warn("ignoring a host record: ", e.what());
    }
  }
  std::sort(out.begin(), out.end(), [](const HostRecord& a, const HostRecord& b) { return a.joined < b.joined; });
  return out;
}

std::vector<HostRecord> HostMembership::wait_for_change(EtcdClock::time_point until) {
  std::shared_ptr<elastic::EtcdWatch> watch;
  {
    std::lock_guard<std::mutex> lock(watch_mutex_);
    watch = watch_;
  }
  if (watch) {
    try {
      watch->next(until);
    } catch (const elastic::EtcdCompacted&) {
      std::lock_guard<std::mutex> lock(watch_mutex_);
      watch_.reset();  // hosts() below lists again and watches from there
    }
  }
  return hosts();
}

void HostMembership::interrupt() {
  std::shared_ptr<elastic::EtcdWatch> watch;
  {
    std::lock_guard<std::mutex> lock(watch_mutex_);
    watch = watch_;
  }
  if (watch) watch->interrupt();
}

}  // namespace aikido::launch
