// aikido-run --elastic: follows the job's membership store, starts and stops workers, removes lost ones.
#pragma once

#include <aikido/elastic.hpp>
#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "options.hpp"
#include "supervisor.hpp"

namespace aikido::launch {
class HostJob;
}

namespace aikido::run {

class JobEvents;

/// Where an elastic job's membership and status keys live, and which host this launcher runs.
struct ElasticSetup {
  /// Status keys, checkpoint requests and session marks.
  std::shared_ptr<Store> store;
  /// The cluster spec: proposals and reads; and the watcher thread's own (it blocks in watch()).
  std::shared_ptr<MembershipStore> membership;
  std::shared_ptr<MembershipStore> watch_membership;
  /// This host's id: the launcher starts the workers of the cluster that are on it, and no others.
  std::string host;
  /// A job across hosts: the other hosts (joins, losses, this host's lease). Null: a job on this host alone.
  launch::HostJob* hosts = nullptr;
  /// How often the workers' heartbeats and session marks are read from the store.
  std::chrono::milliseconds store_check_interval{100};
  /// Where cluster versions, failures, recoveries and checkpoints are recorded; null: nowhere.
  JobEvents* events = nullptr;
};

/// The launcher's side of an elastic job (the workers' side is aikido::ElasticSession), for the workers of one host.
///
/// - On one host, version 0 with -np workers, --min-np and --max-np is published first (publish_first_version);
///   across hosts, launch::HostJob agrees on the versions that add and remove hosts.
/// - Follows the store (a watcher thread wakes the supervisor through an eventfd): starts every worker of the
///   latest version that has no process yet; a worker that a version removed gets time to leave at its next step
///   boundary, then is stopped.
/// - A worker that crashes (any exit but status 0) is removed with a new version, and with --restart replaced by
///   a new worker in the same version (at most --max-restarts times); the survivors recover
///   (ElasticSession::recover).
/// - A member that exits with status 0 has finished the training: from then on the job is ending, and a worker
///   that fails is removed but not replaced (a replacement would wait for the finished workers to join it), and
///   workers started for a later version than the one the finished member last joined are stopped.
/// - Asked to stop (SIGINT, SIGTERM) with --checkpoint, it first has rank 0 write its newest commit there (up to
///   10 s), so that a job stopped from outside can resume (--resume).
/// - A worker whose heartbeat (the status key its session updates) stays unchanged for --heartbeat-timeout is
///   killed, which makes it a crashed worker: this is how a stopped (SIGSTOP) or frozen worker is found.
/// - Across hosts: a host whose record vanished from etcd is removed (HostJob::remove_lost_hosts); a launcher whose
///   own lease expired (it was cut off for --host-timeout) stops its workers, since the job went on without them.
/// - A program that never opens an ElasticSession is found and named at once (check_sessions): a worker whose
///   rendezvous address appears without its session's status key (which a session publishes first) joined with a
///   plain Peer; a worker without a status key kSessionGrace after its start is reported as probably so. Such a job
///   runs like a static one: aikido-ctl refuses to resize it, a lost worker ends it, --checkpoint writes nothing
///   (said at the stop), and with --resume it is stopped (it would train from its initial state).
class ElasticController final : public Controller {
 public:
  ElasticController(const Options& options, ElasticSetup setup, std::string job_id,
                    std::vector<std::string> shared_environment);
  ~ElasticController() override;

  /// Publishes version 0 of a job on this host alone: -np workers on `host`, --min-np, --max-np.
  static void publish_first_version(const Options& options, MembershipStore& membership, const std::string& host);

  /// The workers of the latest version that run on this host.
  std::vector<Supervisor::Worker> initial_workers();

  int wake_fd() const override { return wake_fd_; }
  std::chrono::milliseconds tick() const override { return std::chrono::milliseconds(100); }
  void on_wake(Supervisor& supervisor) override;
  bool on_exit(Supervisor& supervisor, std::uint64_t id, int status) override;
  /// With --checkpoint: asks rank 0 for its newest commit before the workers are stopped.
  bool prepare_stop() override;
  bool stop_ready() override;
  void stop_preparation_abandoned(const std::string& why) override;
  /// Whether a member on this host finished the training (exited with status 0, or left its session): what marks
  /// this host finished in a job across hosts (HostJob::finish). Not so for a host whose workers were only removed.
  bool member_finished_here() const { return finished_here_; }

 private:
  struct Heartbeat {
    std::string value;
    std::chrono::steady_clock::time_point changed;
    bool killed = false;
    // After the worker left its session (no heartbeat any more): since when its process is stopped (SIGSTOP, state
    // T in /proc), if it is.
    std::optional<std::chrono::steady_clock::time_point> stopped_since;
  };
  /// Whether a worker has opened its ElasticSession (its status key exists).
  struct SessionWatch {
    std::chrono::steady_clock::time_point started;
    bool open = false;
    bool reported_silent = false;  // said that it has no session kSessionGrace after its start
    bool killed = false;           // killed for having no session a connect timeout after its start
  };

  /// The newest spec that still holds worker `id`, and the reason of the version that removed it (empty while it
  /// is a member).
  std::optional<ClusterSpec> last_spec_with(std::uint64_t id, std::string* removed_by) const;
  Supervisor::Worker worker_for(const ClusterSpec& spec, std::uint64_t id) const;
  void reconcile(Supervisor& supervisor);
  /// Records every cluster version not recorded yet up to `latest` (JobEvents "cluster").
  void record_versions(const ClusterSpec& latest);
  /// Records the end of recoveries: every running member of this host has joined the version (JobEvents
  /// "recovery"). `joined`: each running member's version, from its status key.
  void record_recoveries(const ClusterSpec& latest, const std::map<std::uint64_t, std::uint64_t>& joined);
  void check_heartbeats(Supervisor& supervisor);
  void check_left_worker(Supervisor& supervisor, std::uint64_t id, std::chrono::steady_clock::time_point now,
                         std::chrono::milliseconds timeout);
  void check_sessions(Supervisor& supervisor);
  bool session_open(std::uint64_t id);
  /// Records why the job's workers do not use sessions ("plain-peer" or "silent", see no_session_key) for aikido-ctl.
  void publish_no_session(const std::string& kind, const std::string& message);
  /// Started worker `id` for cluster version `version`: watch whether it opens a session.
  void started(std::uint64_t id, std::uint64_t version);
  void stop_workers_that_cannot_join(Supervisor& supervisor, std::uint64_t finished);
  void learn_finished_elsewhere(Supervisor& supervisor);
  bool handle_exit(Supervisor& supervisor, std::uint64_t id, int status);
  /// Removes (and with --restart replaces) a lost worker; false when the store could not be reached (retried).
  bool remove_lost_worker(std::uint64_t id, bool replace);
  void check_hosts(Supervisor& supervisor);
  void watch_loop();
  void watch_hosts_loop();
  void wake();

  const Options options_;
  const std::string job_id_;
  const ElasticSetup setup_;
  const std::string host_;
  std::vector<std::string> shared_environment_;
  std::shared_ptr<Store> store_;
  std::shared_ptr<MembershipStore> membership_;
  int wake_fd_ = -1;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> hosts_changed_{false};
  std::thread watcher_;
  std::thread host_watcher_;
  std::chrono::steady_clock::time_point next_store_check_{};
  bool store_was_away_ = false;                 // a read of the store failed since the last heartbeat check
  std::map<std::uint64_t, bool> pending_lost_;  // lost workers whose removal waits for the store: replace?
  bool lease_loss_reported_ = false;
  std::map<std::uint64_t, std::uint64_t> started_for_;  // every worker started: the cluster version it was for
  std::map<std::uint64_t, std::chrono::steady_clock::time_point> removed_since_;
  std::map<std::uint64_t, Heartbeat> heartbeats_;
  std::map<std::uint64_t, SessionWatch> sessions_;
  std::string plain_peer_;              // set once a worker joined with a plain Peer: what aikido-run said
  bool resume_unmet_reported_ = false;  // said that a worker finished without resuming
  bool finished_here_ = false;          // a member on this host finished the training (exited 0 or left its session)
  std::optional<std::uint64_t> finished_by_;    // the first member that exited with status 0
  int restarts_ = 0;                            // replacements started
  std::string checkpoint_request_;              // the request prepare_stop() made
  std::uint64_t recorded_versions_ = 0;         // versions below this are in the event log
  std::map<std::uint64_t, double> recovering_;  // versions made after a loss: when they were recorded (unix s)
};

}  // namespace aikido::run
