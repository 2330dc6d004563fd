// The hosts of a job that spans hosts, kept in etcd: one record per launcher, alive as long as its lease.
//
// Each launcher (aikido-run on one host) claims "<job>/hosts/<host id>" with a transaction that succeeds only when
// the key does not exist, so two launchers cannot claim one host id. The record is attached to an etcd lease of
// --host-timeout seconds that a thread of this class keeps alive: a launcher that exits revokes it (its host leaves
// at once), one that is killed or cut off from etcd stops renewing it, and etcd deletes the record when it expires.
// Every launcher watches the records; the order of the hosts is the order in which they joined (the records'
// create revisions), which is the order of their workers in the cluster spec.
//
// A launcher that cannot reach etcd keeps its workers running (etcd may be restarting, and leases survive a
// restart); it learns that it was removed when etcd answers again that its lease no longer exists (lease_lost()).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "elastic/etcd_client.hpp"

namespace aikido::launch {

/// What a launcher publishes about its host.
struct HostRecord {
  std::string id;       // the host id (its host name unless given); worker specs name it
  std::string address;  // the address its workers listen on
  int slots = 1;        // workers it runs (--nproc-per-node)
  std::int64_t pid = 0;
  std::string host_name;  // gethostname() of the launcher, for messages
  /// etcd's create revision of the record: the order in which hosts joined. Not encoded.
  std::int64_t joined = 0;

  /// "address=A slots=K pid=P name=N"; decode() throws ProtocolError on anything else.
  std::string encode() const;
  static HostRecord decode(const std::string& id, const std::string& text);
  /// "h1 (198.18.0.11, 2 workers, launcher pid 42)": for messages.
  std::string describe() const;
};

class HostMembership {
 public:
  /// `host_timeout`: the lease's TTL (whole seconds, at least 1).
  HostMembership(std::shared_ptr<elastic::EtcdClient> client, std::string job_id, HostRecord self,
                 std::chrono::seconds host_timeout);
  /// Revokes the lease (the host leaves at once) unless abandon() was called.
  ~HostMembership();
  HostMembership(const HostMembership&) = delete;
  HostMembership& operator=(const HostMembership&) = delete;

  /// Claims the host id and starts the keep-alive thread. A record of the same id that belongs to another
  /// launcher is waited for up to the host timeout (a launcher that was just killed still holds it); then
  /// ConfigError names the launcher that holds it and what to change.
  void join();

  /// The hosts of the job, in the order they joined (this one included once it joined).
  std::vector<HostRecord> hosts();
  /// Waits until the set of hosts changes or `until`, whichever comes first, and returns the hosts then. Follows
  /// one watch stream (no polling), opened by the first hosts(); one thread at a time.
  std::vector<HostRecord> wait_for_change(elastic::EtcdClock::time_point until);
  /// Makes a wait_for_change() in progress return at once. Any thread.
  void interrupt();

  /// True once etcd answered that this launcher's lease no longer exists: the other launchers have removed this
  /// host (its renewals did not reach etcd for the host timeout). Its workers must stop.
  bool lease_lost() const { return lease_lost_.load(); }
  /// Time since the last renewal that etcd acknowledged.
  std::chrono::milliseconds since_renewal() const;

  const HostRecord& self() const { return self_; }
  std::int64_t lease() const { return lease_; }

  /// Stops renewing without revoking, as a launcher that was killed would (tests).
  void abandon();

 private:
  void keep_alive_loop();
  std::string key(const std::string& id) const;

  std::shared_ptr<elastic::EtcdClient> client_;
  const std::string job_id_;
  HostRecord self_;
  const std::chrono::seconds host_timeout_;
  std::int64_t lease_ = 0;
  std::atomic<bool> lease_lost_{false};
  std::atomic<std::int64_t> last_renewal_ms_{0};  // steady clock, ms

  std::mutex watch_mutex_;  // guards the pointer; the watch itself is used by one thread at a time
  std::shared_ptr<elastic::EtcdWatch> watch_;

  std::mutex thread_mutex_;
  std::condition_variable thread_wake_;
  bool stopping_ = false;
  bool abandoned_ = false;
  std::thread keeper_;
};

}  // namespace aikido::launch
