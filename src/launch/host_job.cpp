#include "launch/host_job.hpp"

#include <aikido/errors.hpp>
#include <algorithm>
#include <set>

#include "base/crypto.hpp"
#include "base/error.hpp"
#include "base/log.hpp"
#include "elastic/proposal.hpp"

namespace aikido::launch {

using detail::str_cat;
using elastic::EtcdClock;

namespace {

std::int64_t unix_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Waits on the hosts' watch and on the cluster's watch in turn, so that a change of either wakes the caller soon;
// both block on open streams.
constexpr std::chrono::milliseconds kWatchSlice{200};

}  // namespace

std::string job_secret_check(const std::string& secret, const std::string& job_id) {
  const std::string message = "aikido job " + job_id;
  return detail::to_hex(
      detail::hmac_sha256(std::span(reinterpret_cast<const std::uint8_t*>(secret.data()), secret.size()),
                          std::span(reinterpret_cast<const std::uint8_t*>(message.data()), message.size())));
}

void check_job_secret(elastic::EtcdClient& client, const std::string& job_id, const std::string& secret) {
  using E = elastic::EtcdClient;
  const std::string key = job_id + "/secret-check";
  const std::string mine = job_secret_check(secret, job_id);
  const auto result = client.txn({{key, E::Compare::Target::create_revision, E::Compare::Result::equal, 0, {}}},
                                 {{E::Operation::Kind::put, key, mine}}, {{E::Operation::Kind::range, key}});
  if (result.succeeded || result.ranges.empty() || result.ranges.front().kvs.empty()) return;
  if (result.ranges.front().kvs.front().value != mine) {
    throw ConfigError(str_cat("this job secret differs from the one the hosts of job '", job_id,
                              "' use: give the same --secret-file as every host"));
  }
}

HostJob::HostJob(HostJobOptions options, std::shared_ptr<elastic::EtcdClient> client,
                 std::shared_ptr<MembershipStore> membership, HostRecord self)
    : options_(std::move(options)), client_(std::move(client)), membership_(std::move(membership)) {
  if (options_.min_hosts < 1 || options_.max_hosts < options_.min_hosts) {
    throw ConfigError(str_cat("--nnodes ", options_.min_hosts, ":", options_.max_hosts,
                              ": the minimum must be at least 1 and at most the maximum"));
  }
  if (options_.slots < 1) throw ConfigError("--nproc-per-node must be at least 1");
  if (options_.max_hosts * options_.slots > ClusterSpec::kMaxWorkers) {
    throw ConfigError(str_cat("--nnodes ", options_.max_hosts, " x --nproc-per-node ", options_.slots,
                              " exceeds the limit of ", ClusterSpec::kMaxWorkers, " workers"));
  }
  self.slots = options_.slots;
  hosts_ = std::make_unique<HostMembership>(client_, options_.job_id, std::move(self), options_.host_timeout);
}

HostJob::~HostJob() {
  if (left_) return;
  try {
    hosts_.reset();  // revokes the lease
    if (client_->range(options_.job_id + "/hosts/", true).kvs.empty()) client_->erase(options_.job_id + "/", true);
  } catch (const Error& e) {
    log::debug("leaving job ", options_.job_id, ": ", e.what());
  }
}

std::string HostJob::describe_hosts(const std::vector<HostRecord>& present) const {
  if (present.empty()) return "none";
  std::string out;
  for (const auto& h : present) out += (out.empty() ? "" : ", ") + h.describe();
  return out;
}

std::optional<ClusterSpec> HostJob::first_version(const std::vector<HostRecord>& present) const {
  if (int(present.size()) < options_.min_hosts) return std::nullopt;
  ClusterSpec spec;
  spec.min_size = options_.min_hosts * options_.slots;
  spec.max_size = options_.max_hosts * options_.slots;
  for (std::size_t i = 0; i < present.size() && int(i) < options_.max_hosts; ++i) {
    spec = spec.with_workers_on(present[i].id, present[i].slots, "initial");
  }
  spec.version = 0;
  spec.max_size = std::max(spec.max_size, spec.size());  // hosts that were given more slots
  spec.proposed_unix_ms = unix_ms();
  return spec;
}

ClusterSpec HostJob::join() {
  hosts_->join();
  const std::string& me = self().id;
  const auto deadline = EtcdClock::now() + options_.join_timeout;
  bool said_waiting = false, said_full = false;
  for (;;) {
    const auto present = hosts_->hosts();
    std::int64_t joined = 0;
    for (const auto& h : present) {
      if (h.id == me) joined = h.joined;
    }
    // The newest spec with its revision: workers on this host in a spec written before this launcher joined
    // belong to an earlier launcher of this host (killed and restarted), not to this one.
    const auto current = client_->range(elastic::etcd_cluster_key(options_.job_id));
    std::optional<ClusterSpec> latest;
    if (!current.kvs.empty()) latest = elastic::decode_proposal(current.kvs.front().value);
    if (latest) {
      const bool mine = latest->workers_on(me) > 0;
      if (mine && current.kvs.front().mod_revision > joined) return *latest;
      const ClusterSpec without_old = mine ? latest->without_host(me, "") : *latest;
      // A job that was resized up while this host was away (aikido-ctl puts new workers on the present hosts) may
      // have no room for all of this host's slots: it joins with those that fit, or waits when none does.
      const int room = without_old.max_size - int(without_old.size());
      const bool hosts_full = int(without_old.hosts().size()) >= options_.max_hosts;
      if (!hosts_full && room > 0) {
        ClusterSpec next = without_old.with_workers_on(me, std::min(options_.slots, room),
                                                       str_cat("host ", me, mine ? " restarted" : " joined"));
        next.version = latest->version + 1;
        next.proposed_unix_ms = unix_ms();
        if (membership_->propose(next)) return next;
        continue;  // another change won; read it
      }
      if (!said_full) {
        if (hosts_full) {
          log::warn("job ", options_.job_id, " runs on its maximum of ", options_.max_hosts, " hosts (--nnodes); host ",
                    me, " waits for a place");
        } else {
          log::warn("job ", options_.job_id, " runs with its maximum of ", without_old.max_size,
                    " workers (resized while host ", me, " was away); host ", me, " waits for a place");
        }
        said_full = true;
      }
    } else if (auto first = first_version(present)) {
      if (first->workers_on(me) > 0) {
        if (membership_->propose(*first)) return *first;
        continue;
      }
    } else if (!said_waiting) {
      log::info("host ", me, " waits for ", options_.min_hosts, " hosts to join job ", options_.job_id, " (",
                present.size(), " so far)");
      said_waiting = true;
    }
    if (EtcdClock::now() >= deadline) {
      throw TimeoutError(str_cat(
          latest ? str_cat("job ", options_.job_id, " had no place for host ", me, " (it runs on its maximum of ",
                           options_.max_hosts, " hosts or ", latest->max_size, " workers)")
                 : str_cat("only ", present.size(), " of the ", options_.min_hosts, " hosts that job ", options_.job_id,
                           " needs joined"),
          " within ", detail::seconds(options_.join_timeout), " (--join-timeout); hosts: ", describe_hosts(present),
          latest ? "" : "; start aikido-run on the other hosts with the same --store and --job-id"));
    }
    hosts_->wait_for_change(std::min(deadline, EtcdClock::now() + kWatchSlice));
    if (latest) membership_->watch(latest->version, kWatchSlice);
  }
}

std::set<std::string> HostJob::finished_hosts() {
  const std::string prefix = options_.job_id + "/finished/";
  std::set<std::string> hosts;
  for (const auto& kv : client_->range(prefix, true).kvs) hosts.insert(kv.key.substr(prefix.size()));
  return hosts;
}

bool HostJob::finished(const std::string& id) {
  return !client_->range(options_.job_id + "/finished/" + id).kvs.empty();
}

std::optional<ClusterSpec> HostJob::remove_lost_hosts() {
  for (;;) {
    if (hosts_->lease_lost()) return std::nullopt;
    const auto latest = membership_->latest();
    if (!latest) return std::nullopt;
    std::set<std::string> present;
    for (const auto& h : hosts_->hosts()) present.insert(h.id);
    if (!present.count(self().id)) return std::nullopt;  // this host's own record is gone: it is the lost one
    ClusterSpec next = *latest;
    std::string lost;
    const std::set<std::string> finished = finished_hosts();
    for (const auto& h : latest->hosts()) {
      if (present.count(h) || finished.count(h)) continue;
      next = next.without_host(h, "");
      lost += (lost.empty() ? "" : ", ") + h;
    }
    if (lost.empty() || next.workers.empty()) return std::nullopt;
    next.version = latest->version + 1;
    next.reason = str_cat("host ", lost, " lost");
    next.proposed_unix_ms = unix_ms();
    if (membership_->propose(next)) return next;
  }
}

void HostJob::finish(bool trained) {
  if (left_) return;
  left_ = true;
  try {
    if (trained) client_->put(options_.job_id + "/finished/" + self().id, "1");
    hosts_.reset();
    if (client_->range(options_.job_id + "/hosts/", true).kvs.empty()) client_->erase(options_.job_id + "/", true);
  } catch (const Error& e) {
    log::warn("host could not record the end of job ", options_.job_id, " in etcd: ", e.what());
  }
}

}  // namespace aikido::launch
