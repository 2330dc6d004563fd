// Elastic training: a membership store with versions, and the ElasticSession that lets a training loop grow, shrink
// and survive lost workers while its Peer stays the same object.
#pragma once

#include <aikido/cluster_spec.hpp>
#include <aikido/peer.hpp>
#include <aikido/store.hpp>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace aikido {

/// The versioned membership of one job: every version of the ClusterSpec, each written once.
///
/// Implementations: over any aikido::Store (make_membership_store: the store embedded in aikido-run, or an
/// in-process store); an etcd backend implements the same interface. Thread safe.
class MembershipStore {
 public:
  virtual ~MembershipStore() = default;
  /// The spec of the highest version, or nullopt before the first was published.
  virtual std::optional<ClusterSpec> latest() = 0;
  /// The spec of `version`, or nullopt when it does not exist (yet).
  virtual std::optional<ClusterSpec> get(std::uint64_t version) = 0;
  /// Compare-and-set: publishes `next` when its version is exactly one above the latest (0 on an empty store) and
  /// nobody published that version first. Returns false when another proposal won; read latest() and retry.
  /// Throws ConfigError when `next` is invalid.
  virtual bool propose(const ClusterSpec& next) = 0;
  /// Watch: waits until a version above `after` exists and returns the latest spec; nullopt after `timeout`.
  virtual std::optional<ClusterSpec> watch(std::uint64_t after, std::chrono::milliseconds timeout) = 0;
};

/// Membership kept in `store` under "<job_id>/cluster/v<N>" (one key per version, written with compare-and-set)
/// and "<job_id>/cluster/latest" (a hint). watch() blocks in Store::wait, so give a watcher its own store
/// connection when the store serialises requests (the TCP client does).
std::shared_ptr<MembershipStore> make_membership_store(std::shared_ptr<Store> store, std::string job_id);

/// Key under which ElasticSession publishes a worker's status: "state=joining version=V beat=N" from the moment the
/// session opens (before it publishes its rendezvous address) until it has joined, then "rank=R version=V step=S
/// beat=N", and "state=left version=V step=S" once its session ends. aikido-run reads it to find workers that stopped
/// responding, workers that never open a session, and the version a finished worker last joined; aikido-ctl to
/// print the cluster.
std::string worker_status_key(const std::string& job_id, std::uint64_t worker_id);

/// Key under which aikido-run records that the job's program does not open an ElasticSession: "plain-peer MESSAGE"
/// when a worker joined with a plain Peer, "silent MESSAGE" while a worker has not opened a session long after its
/// start; empty or absent otherwise. aikido-ctl shows it and refuses to resize a job whose workers use plain Peers.
std::string no_session_key(const std::string& job_id);

/// Keys by which aikido-run asks for a checkpoint before it stops a job (SIGINT, SIGTERM): it writes a request id
/// under checkpoint_request_key; rank 0's session writes its newest commit to ElasticConfig::checkpoint_path and
/// answers under checkpoint_done_key with "ID " and what happened.
std::string checkpoint_request_key(const std::string& job_id);
std::string checkpoint_done_key(const std::string& job_id);

/// Global-position sharding of an index space for elastic data parallelism.
///
/// The epoch's position counts the samples the whole cluster has consumed. A step with `size` workers and a
/// per-worker batch of `batch` gives worker `rank` the samples [position + rank * batch, ... + batch) of the
/// epoch's permutation (clipped at the end), and advance() moves the position by size * batch. Because only the
/// position and the epoch are state, a resize between two steps changes who reads what but never skips or repeats
/// a sample. Register it with ElasticSession::register_sampler so that it is committed, rolled back and sent to
/// new workers with the model. A plain value; not thread safe.
class ElasticSampler {
 public:
  /// `dataset_size` samples, shuffled per epoch with `seed` (no shuffle when shuffle is false).
  explicit ElasticSampler(std::uint64_t dataset_size, std::uint64_t seed = 0, bool shuffle = true);

  struct Range {
    std::uint64_t begin = 0;  // position in the epoch's order
    std::uint64_t end = 0;
  };
  /// The positions this rank reads in the current step.
  Range shard(int rank, int size, std::uint64_t batch) const;
  /// Sample index at `position` of the current epoch's order.
  std::uint64_t index(std::uint64_t position) const;
  /// Moves past the step's samples; returns true when the epoch ended (the next epoch starts at position 0).
  bool advance(int size, std::uint64_t batch);

  std::uint64_t epoch() const { return state_.epoch; }
  std::uint64_t position() const { return state_.position; }
  std::uint64_t dataset_size() const { return dataset_size_; }

  /// The state to register: epoch and position.
  struct State {
    std::uint64_t epoch = 0;
    std::uint64_t position = 0;
  };
  State& state() { return state_; }

 private:
  void shuffle_epoch() const;

  std::uint64_t dataset_size_;
  std::uint64_t seed_;
  bool shuffle_;
  State state_;
  mutable std::uint64_t order_epoch_ = ~std::uint64_t(0);  // the permutation is computed lazily, per epoch
  mutable std::vector<std::uint32_t> order_;
};

/// What ElasticSession::sync() found at a step boundary.
enum class SyncResult : std::uint8_t {
  unchanged,  // same cluster; go on
  changed,    // the cluster changed (or this worker just joined): rank(), size() and registered state may have
              // changed; recompute whatever depends on them
  removed,    // this worker is no longer a member: leave the training loop
};

/// How long each phase of the last membership change took on this worker (ms; -1 when the phase did not occur).
struct ChangeTimings {
  std::uint64_t from_version = 0;
  std::uint64_t to_version = 0;
  int from_size = 0;
  int to_size = 0;
  bool failure = false;               // a recovery after a lost worker, not a planned resize
  double decided_to_agreed = -1;      // the proposal's time until every survivor agreed at a step boundary
  double agree_to_connected = -1;     // new connections of the new version (includes waiting for new processes)
  double connected_to_restored = -1;  // state transfer, rollback and commit
  double decided_to_restored = -1;    // the whole change, from the proposal (wall clock; same host)
};

/// Settings of an ElasticSession; ElasticSession::from_env() fills them from aikido-run's environment.
struct ElasticConfig {
  /// Secret, job id, timeout, topology, transport... of the Peer. rank, size and cluster_version are ignored:
  /// the membership store decides them. `peer.store` is used for rendezvous.
  PeerConfig peer;
  /// This worker's id in the ClusterSpec.
  std::uint64_t worker_id = 0;
  /// Null: a static session (the Peer's cluster never changes; commit() and rollback still work locally).
  std::shared_ptr<MembershipStore> membership;
  /// Membership for the watcher thread, which blocks in watch(); may be `membership` itself when its store does
  /// not serialise requests (the in-process store). Null: the same as `membership`.
  std::shared_ptr<MembershipStore> watch_membership;
  /// Store for the heartbeat and status key (worker_status_key); null: none. Needs its own connection for the
  /// same reason as the watcher.
  std::shared_ptr<Store> status_store;
  std::chrono::milliseconds heartbeat_interval{250};
  /// sync() checks for membership changes every `check_every` calls (one 8-byte allreduce per check).
  int check_every = 1;
  /// How long recover() waits for a usable cluster (a new version, or replacements when below the minimum).
  /// Zero: the peer's timeout.
  std::chrono::milliseconds recovery_timeout{0};
  /// When the job stops below its minimum size, or aikido-run is asked to stop it (checkpoint_request_key), rank 0
  /// writes the newest commit here first (empty: nowhere).
  std::string checkpoint_path;
  /// A checkpoint written through checkpoint_path: when no member holds state yet (a fresh job), rank 0 reads it
  /// and every worker starts from it instead of its initial state (empty: none). The program must register the
  /// same state as the one that wrote it; ConfigError on every worker otherwise.
  std::string resume_path;
};

/// One worker's membership in an elastic job, and the state it carries across membership changes.
///
/// The session owns the Peer; peer() stays the same object for the session's lifetime while its rank(), size()
/// and cluster_version() follow the membership. Training state (model, optimizer state, step, data position, ...)
/// is registered by name; the session sends it to new workers, keeps committed copies in memory and rolls back
/// to them after a failure. The LibTorch integration registers its parameters and optimizer state the same way.
///
/// Protocol. sync() is called by every worker at the same step boundary. Every `check_every` calls it runs one
/// 8-byte allreduce (max) of the highest membership version each worker has seen (a watcher thread follows the
/// store), so all workers agree on the version to switch to at the same step; collectives in flight finish on
/// the old version first. On a change, removed workers (the highest ranks on a shrink) leave; survivors open new
/// connections at the new version (connections of other versions are refused in the handshake); then all
/// members exchange a small header (allgather), roll back to the agreed commit when any of them recovers from a
/// failure, rank 0 broadcasts the registered state to new workers, and everyone commits. A worker started for a
/// new version (aikido-run starts them) receives the state in its first sync(). The topology (Peer::set_topology)
/// belongs to the cluster: after a change every member, new workers included, uses the one the members used before
/// it (a recovery does not roll it back).
///
/// Failures. When a collective throws PeerLostError or TimeoutError, call recover() (sync() does it itself for
/// its own check): it proposes the cluster without the lost workers (or adopts a version aikido-run or another
/// survivor proposed), reconnects, and restores the last committed state on every member. Commits are kept two
/// deep, so members whose last commits differ by one (a failure during the step that commits) agree on the older.
///
/// Threading: sync(), recover(), resize(), commit() and the registration calls belong to the training thread;
/// no other thread may use peer() while they run. Registered buffers must outlive the session.
class ElasticSession {
 public:
  /// Joins the job its launcher describes in the environment. With `aikido-run --elastic` (AIKIDO_ELASTIC=1) the
  /// membership comes from the job's store (AIKIDO_STORE or AIKIDO_STORE_ADDR); otherwise, and under torchrun,
  /// mpirun, srun or Kubernetes, a static session around Peer::from_env(). Blocks until connected.
  static std::unique_ptr<ElasticSession> from_env();
  /// Joins with explicit settings (tests, other launchers). Finds this worker in the latest ClusterSpec; throws
  /// ConfigError when it is not a member.
  explicit ElasticSession(ElasticConfig config);
  ~ElasticSession();
  ElasticSession(const ElasticSession&) = delete;
  ElasticSession& operator=(const ElasticSession&) = delete;

  Peer& peer() { return *peer_; }
  int rank() const { return peer_->rank(); }
  int size() const { return peer_->size(); }
  std::uint64_t cluster_version() const { return peer_->cluster_version(); }
  std::uint64_t worker_id() const { return config_.worker_id; }
  const ClusterSpec& spec() const { return spec_; }
  bool elastic() const { return config_.membership != nullptr; }
  /// True once this worker was removed from the cluster (sync() returned removed).
  bool removed() const { return removed_; }
  /// True for a worker that joined a running job, until its first sync() gives it the registered state: until then
  /// it must not run collectives of its own (the members would not post them).
  bool joining() const { return joined_late_; }
  /// True once the registered state came from the checkpoint ElasticConfig::resume_path (the first sync() of a job
  /// that resumed; it returned changed), on every worker of that first cluster.
  bool resumed() const { return resumed_; }

  // State registry. Names must be registered in the same order with the same sizes on every worker before the
  // first sync(); MismatchError otherwise.
  /// A buffer whose size never changes (parameters): sent and restored in place.
  void register_bytes(std::string name, std::span<std::byte> bytes);
  template <class T>
  void register_span(std::string name, std::span<T> values) {
    static_assert(std::is_trivially_copyable_v<T>);
    register_bytes(std::move(name), std::as_writable_bytes(values));
  }
  template <class T>
  void register_value(std::string name, T& value) {
    register_span(std::move(name), std::span<T>(&value, 1));
  }
  /// State of any shape (optimizer state created lazily, RNG state): `save` serialises it, `load` restores it.
  /// `load` runs on one worker at a time (a rollback, or the state arriving at a new worker), at points that the
  /// other workers do not share: it must not run collectives.
  void register_state(std::string name, std::function<std::vector<std::byte>()> save,
                      std::function<void(std::span<const std::byte>)> load);
  /// The sampler's epoch and position.
  void register_sampler(std::string name, ElasticSampler& sampler);

  /// At a step boundary, on every worker: applies a pending membership change (see the class comment). `step` is
  /// reported in the status key and names the commits taken since the last sync() (give the steps completed). Wait for
  /// this worker's own asynchronous collectives first: a change closes the old version's connections, and collectives
  /// still in flight then fail. The first sync() of a job that resumed from a checkpoint (ElasticConfig::resume_path)
  /// returns changed on every worker: the state was replaced.
  SyncResult sync(std::int64_t step = -1);

  /// Proposes, from any single worker, the current cluster without the workers now at `ranks` (workers a deadline
  /// gave up on: a straggler's connections stay open, so recover() cannot tell it is gone). Every member applies it
  /// at its next sync() or recover(); the workers left out find themselves removed. When the latest version already
  /// lacks them (another worker's proposal won), nothing is proposed. Returns the version that leaves them out.
  /// ConfigError in a static session, for a rank outside the cluster, or when no worker would be left.
  std::uint64_t request_removal(const std::vector<int>& ranks, const std::string& reason);

  /// Asks for `n` workers. Collective: every worker calls it at the same step boundary; it applies the change at
  /// once (like sync()) and returns its result. ConfigError when n is outside the job's [min, max].
  SyncResult resize(int n);

  /// Proposes `n` workers from any single worker (a policy's decision); every worker applies it at its next
  /// sync(). ConfigError when n is outside the job's [min, max]; returns the proposed version. `requested_by` is
  /// recorded in the version (ClusterSpec::requested_by): who asked, for status, logs and the dashboard.
  std::uint64_t request_resize(int n, const std::string& requested_by = "program");

  /// Copies the registered state into the in-memory commit (the previous commit is kept too). Call at the same
  /// step on every worker, after the step's collectives succeeded. The commit belongs to the step that the next
  /// sync() is given, which a checkpoint written from it names ("wrote the last commit (step S) to F").
  void commit();

  /// After a collective failed with PeerLostError or TimeoutError: agrees on the new cluster, reconnects and
  /// rolls every member back to the last common commit. The recovery is a step boundary: the sync() that follows
  /// it returns unchanged at once (new workers that joined start their step right after it). Returns changed, or
  /// removed when the others went on without this worker. Throws TimeoutError when no usable cluster forms within the
  /// recovery timeout (for instance below --min-np without replacements; rank 0 writes the checkpoint first). In a
  /// static session, called while handling the failure, it rolls this worker back to its last commit and rethrows
  /// the failure (the cluster cannot change); ConfigError when there is no failure to rethrow.
  SyncResult recover();

  /// Phases of the last membership change on this worker.
  const ChangeTimings& last_change() const { return timings_; }

 private:
  struct Entry;
  struct Snapshot;

  void start_threads();
  void stop_threads();
  void watch_loop();
  void heartbeat_loop();
  void publish_status();
  bool newer_version_seen(std::uint64_t than) const;
  void drop_removed_peers(const ClusterSpec& newer);
  ElasticSession(ElasticConfig config, std::unique_ptr<Peer> peer);
  ClusterSpec next_spec_after_failure(std::chrono::steady_clock::time_point deadline);
  /// Reconnects the Peer for `target` (or a newer spec that supersedes it while connecting) and establishes it.
  SyncResult switch_to(ClusterSpec target, bool failure);
  void connect(const ClusterSpec& spec);
  /// Returns true when the state came from ElasticConfig::resume_path.
  bool establish(bool is_new);
  void take_snapshot(std::uint64_t seq, std::int64_t step);
  void restore_snapshot(std::uint64_t seq);
  /// Writes the newest commit to checkpoint_path; says what happened. Any thread (the heartbeat answers requests).
  std::string write_checkpoint();
  void answer_checkpoint_request();
  /// Loads the checkpoint into the registered state; returns the step it was committed at (-1: unknown).
  std::int64_t read_checkpoint(const std::string& path);
  SyncResult leave(const ClusterSpec& target);
  SyncResult recover_in_sync();
  SyncResult agree_on_version(std::int64_t version, const char* name);

  ElasticConfig config_;
  std::unique_ptr<Peer> peer_;
  ClusterSpec spec_;
  // The spec the Peer is connected for, for the watcher thread (drop_removed_peers); empty while reconnecting.
  std::mutex connected_mutex_;
  ClusterSpec connected_;
  bool removed_ = false;
  bool established_ = false;
  bool joined_late_ = false;  // this worker joined a running job and has not received the state yet
  bool resumed_ = false;      // the state came from the resume checkpoint
  bool needs_rollback_ = false;
  std::optional<Topology> topology_before_change_;  // the members' topology when the current change began
  std::mutex snapshots_mutex_;                      // snapshots_: changed by the training thread, read by the heartbeat
  std::string answered_checkpoint_;                 // the last checkpoint request the heartbeat answered
  bool recovered_outside_sync_ = false;
  std::uint64_t sync_count_ = 0;
  std::vector<Entry> entries_;
  std::vector<Snapshot> snapshots_;  // at most two: the last commits, oldest first
  std::uint64_t commit_seq_ = 0;
  ChangeTimings timings_;

  std::atomic<std::uint64_t> latest_seen_{0};
  std::atomic<std::int64_t> step_{-1};
  std::atomic<int> status_rank_{-1};  // -1 until connected to the first cluster version
  std::uint64_t beat_ = 0;            // heartbeats published: the constructor's, then the heartbeat thread's
  std::atomic<std::uint64_t> status_version_{0};
  std::mutex thread_mutex_;
  std::condition_variable thread_wake_;
  bool stopping_ = false;
  std::thread watcher_;
  std::thread heartbeat_;
};

}  // namespace aikido
