// What a launcher does about the hosts of a job that spans hosts: joining it, the cluster's first version, a host
// that joins a running job, hosts that are lost, and the end of the job. Its workers are the supervisor's business
// (tools/aikido-run); this class decides which of the cluster's workers belong to this host.
//
// Protocol, all through etcd (keys under "<job>/"):
//   hosts/<id>     each launcher's HostRecord, under its lease (host_membership.hpp)
//   cluster        the newest ClusterSpec, replaced by compare-and-set (make_etcd_membership)
//   finished/<id>  written by a launcher whose workers all finished the training, before it leaves
// - The first version: once at least `min_hosts` hosts have joined, any launcher that sees them proposes version 0
//   with `slots` workers on each of the first `max_hosts` hosts in join order; exactly one proposal wins.
// - A host that joins a running job (fewer than `max_hosts` hosts in the latest version) proposes the next version
//   with its workers appended; with `max_hosts` hosts in it, it waits for a place.
// - A host whose record vanished (its launcher exited or its lease expired) while the latest version still has
//   workers on it is removed by whichever launcher proposes first ("host H lost"); the survivors' workers recover
//   as from any lost worker. A host that left after writing finished/<id> is not a loss: the job is ending.
#pragma once

#include <aikido/cluster_spec.hpp>
#include <aikido/elastic.hpp>
#include <chrono>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "launch/host_membership.hpp"

namespace aikido::launch {

/// Where every launcher of a job in etcd proves it holds the job's secret, and the value it proves it with: an HMAC
/// of the job id under the secret (never the secret itself). check_job_secret() writes it when absent and throws
/// ConfigError when it differs (a host, or aikido-ctl, given another secret file).
std::string job_secret_check(const std::string& secret, const std::string& job_id);
void check_job_secret(elastic::EtcdClient& client, const std::string& job_id, const std::string& secret);

struct HostJobOptions {
  std::string job_id;
  int min_hosts = 1;
  int max_hosts = 1;
  int slots = 1;  // workers per host (--nproc-per-node)
  std::chrono::milliseconds join_timeout{300'000};
  std::chrono::seconds host_timeout{5};
};

class HostJob {
 public:
  /// Checks the options (ConfigError naming the flag). `membership` is the job's etcd membership.
  HostJob(HostJobOptions options, std::shared_ptr<elastic::EtcdClient> client,
          std::shared_ptr<MembershipStore> membership, HostRecord self);
  ~HostJob();

  /// Claims this host and waits until the latest cluster version has workers on it (see the protocol above).
  /// Returns that version. TimeoutError after the join timeout, naming the hosts that did join and what to do.
  ClusterSpec join();

  /// After the hosts changed: proposes the removal of hosts that vanished without finishing. Returns the version
  /// it published, if any. Proposes nothing once this host's own lease is lost.
  std::optional<ClusterSpec> remove_lost_hosts();

  /// Leaves the job at the end of this host's part; `trained`: a member on this host finished the training, which
  /// marks the host finished (other launchers then know the training is over, and finished hosts are never removed
  /// as lost). A host whose workers were only removed leaves unmarked. The last host to leave deletes the job's keys.
  void finish(bool trained);

  /// True when host `id` wrote finished/<id>.
  bool finished(const std::string& id);
  /// The hosts that wrote finished/<id> (one request to etcd).
  std::set<std::string> finished_hosts();

  HostMembership& hosts() { return *hosts_; }
  const HostRecord& self() const { return hosts_->self(); }
  const HostJobOptions& options() const { return options_; }

 private:
  /// Version 0 for `present` hosts (join order), or nullopt when fewer than min_hosts joined.
  std::optional<ClusterSpec> first_version(const std::vector<HostRecord>& present) const;
  std::string describe_hosts(const std::vector<HostRecord>& present) const;

  const HostJobOptions options_;
  std::shared_ptr<elastic::EtcdClient> client_;
  std::shared_ptr<MembershipStore> membership_;
  std::unique_ptr<HostMembership> hosts_;
  bool left_ = false;
};

}  // namespace aikido::launch
