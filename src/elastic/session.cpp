// ElasticSession: the resize and recovery protocol (see include/aikido/elastic.hpp for the contract).
//
// Versions. Every ClusterSpec version is written once (MembershipStore::propose is a compare-and-set on the next
// version), so "the spec of version v" means the same on every worker. A watcher thread records the highest
// version in the store (latest_seen_). Workers switch versions only at a step boundary, after an allreduce(max)
// of latest_seen_, or inside recover() after a failure; while connecting to version v, a newer version cancels the
// rendezvous (PeerConfig::cancel) and the worker moves on to the newest spec, so every worker ends up on the
// highest version, whatever order proposals came in.
//
// Establishing a version. Once connected, every member runs establish(): an allgather of a small header
// (has state, wants rollback, newest and oldest commit, topology), a consensus on the state registry, then:
//   - topology: a Peer reconnects with its configured topology, so every member runs the establishing collectives
//     on the same one; then all adopt the topology the lowest-ranked member with state used before the change
//     (set_topology, called by every member since all read the same header), so a topology chosen during training
//     survives changes and reaches new workers;
//   - rollback, when any member recovers from a failure: members with state load the newest commit that all of
//     them hold (commits are taken at the same steps everywhere and differ by at most one between workers);
//   - transfer, when any member has no state (a new worker): the lowest-ranked member with state broadcasts
//     every registered entry (sizes first, then bytes);
//   - commit: everyone snapshots the state it now holds, under the same commit number.
#include <unistd.h>

#include <aikido/elastic.hpp>
#include <aikido/errors.hpp>
#include <aikido/etcd.hpp>
#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "base/bytes.hpp"
#include "base/env.hpp"
#include "base/error.hpp"
#include "base/launcher_env.hpp"
#include "base/log.hpp"
#include "base/thread.hpp"
#include "elastic/checkpoint.hpp"
#include "runtime/peer_env.hpp"

namespace aikido {

using detail::str_cat;

namespace {

using SteadyClock = std::chrono::steady_clock;

double unix_ms_now() {
  return double(
             std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch())
                 .count()) /
         1000.0;
}

std::int64_t unix_ms() { return std::int64_t(unix_ms_now()); }

// Checkpoint files: "AIKIDOCK", u64 commit, u64 entries, then per entry u64 name length, name, u64 size, bytes; then
// "STEP" and the i64 step of the commit (-1: unknown), which files written before steps were recorded lack.

// Header each member contributes to establish().
enum HeaderField { kHasState, kWantsRollback, kNewestCommit, kOldestCommit, kTopology, kHeaderFields };

}  // namespace

struct ElasticSession::Entry {
  std::string name;
  std::span<std::byte> bytes;  // fixed-size entries
  std::function<std::vector<std::byte>()> save;
  std::function<void(std::span<const std::byte>)> load;
  bool fixed() const { return !save; }
  /// Restores a saved value (of the registered size, for a fixed entry).
  void restore(std::span<const std::byte> value) {
    if (!fixed()) {
      load(value);
    } else if (!value.empty()) {
      std::memcpy(bytes.data(), value.data(), value.size());
    }
  }
};

struct ElasticSession::Snapshot {
  std::uint64_t seq = 0;
  // The step the committed state stands at, as the first sync() after the commit names it (-1: unknown). Until that
  // sync() runs, the step after the last sync()'s: a training loop gives sync() the steps completed and commits at
  // the end of a step.
  std::int64_t step = -1;
  bool step_provisional = false;
  std::vector<std::vector<std::byte>> values;  // one per entry
};

std::unique_ptr<ElasticSession> ElasticSession::from_env() {
  ElasticConfig config;
  const bool elastic = env::get(env::kElastic).value_or("0") == "1";
  if (!elastic) {
    auto peer = std::make_unique<Peer>(Peer::from_env());
    config.peer = peer->config();
    return std::unique_ptr<ElasticSession>(new ElasticSession(std::move(config), std::move(peer)));
  }
  PeerConfig& c = config.peer;
  detail::read_peer_env(c);
  const env::Lookup lookup = env::process_lookup();
  if (!lookup(env::kStore) && !lookup(env::kStoreAddr)) {
    throw ConfigError(str_cat(env::kElastic, "=1 but neither ", env::kStore, " nor ", env::kStoreAddr,
                              " is set: an elastic job's membership lives in the store its launcher publishes it in; "
                              "start workers with aikido-run --elastic"));
  }
  const env::LaunchInfo launch = env::detect_launch(lookup);
  c.bind_address = detail::choose_bind_address(lookup, launch);
  // Three connections: rendezvous and proposals, the watcher's blocking waits, the heartbeat.
  c.store = connect_store(launch.store_url, c.secret, c.timeout, c.tls);
  config.status_store = connect_store(launch.store_url, c.secret, c.timeout, c.tls);
  if (launch.store_url.starts_with("etcd")) {
    // Jobs across hosts: the membership is one etcd key changed by transactions and followed by a watch stream.
    const EtcdOptions etcd = etcd_options_from_env(launch.store_url, c.timeout);
    config.membership = make_etcd_membership(etcd, c.job_id);
    config.watch_membership = make_etcd_membership(etcd, c.job_id);
  } else {
    config.membership = make_membership_store(c.store, c.job_id);
    config.watch_membership = make_membership_store(connect_store(launch.store_url, c.secret, c.timeout, c.tls), c.job_id);
  }
  config.worker_id = std::uint64_t(env::get_int(env::kWorkerId, env::get_int(env::kRank, 0, 0, 1 << 30), 0, INT64_MAX));
  if (auto path = env::get(env::kCheckpoint)) config.checkpoint_path = *path;
  if (auto path = env::get(env::kResume)) config.resume_path = *path;
  return std::make_unique<ElasticSession>(std::move(config));
}

ElasticSession::ElasticSession(ElasticConfig config) : ElasticSession(std::move(config), nullptr) {}

ElasticSession::ElasticSession(ElasticConfig config, std::unique_ptr<Peer> peer) : config_(std::move(config)) {
  if (config_.check_every < 1) throw ConfigError("ElasticConfig::check_every must be at least 1");
  if (config_.recovery_timeout.count() <= 0) config_.recovery_timeout = config_.peer.timeout;
  if (!config_.watch_membership) config_.watch_membership = config_.membership;
  if (!config_.membership) {
    peer_ = peer ? std::move(peer) : std::make_unique<Peer>(Peer::create(config_.peer));
    spec_.version = peer_->cluster_version();
    for (int r = 0; r < peer_->size(); ++r) spec_.workers.push_back({std::uint64_t(r), "static"});
    spec_.next_id = std::uint64_t(peer_->size());
    spec_.min_size = spec_.max_size = peer_->size();
    config_.worker_id = std::uint64_t(peer_->rank());
  } else {
    auto latest = config_.membership->latest();
    if (!latest) {
      throw ConfigError(
          "the membership store holds no cluster spec yet; the launcher publishes version 0 before "
          "it starts the workers (aikido-run --elastic)");
    }
    latest_seen_ = latest->version;
    const double start = unix_ms_now();
    PeerConfig alone = config_.peer;
    alone.rank = 0;
    alone.size = 1;
    alone.cancel = nullptr;
    peer_ = std::make_unique<Peer>(Peer::create(alone));
    // The status key exists before this worker publishes its rendezvous address: aikido-run takes a worker whose
    // address appears without it for a program that joined with a plain Peer instead of a session.
    status_version_ = latest->version;
    if (config_.status_store) publish_status();
    start_threads();
    try {
      ClusterSpec target = *latest;
      for (;;) {
        if (!target.contains(config_.worker_id)) {
          throw ConfigError(str_cat("worker ", config_.worker_id, " is not a member of cluster ", target.describe(),
                                    "; it was removed before it could join"));
        }
        try {
          connect(target);
          break;
        } catch (const Error& e) {
          if (!newer_version_seen(target.version)) throw;
          log::info("worker ", config_.worker_id, ": ", e.what());
          target = *config_.membership->latest();
        }
      }
    } catch (...) {
      stop_threads();  // the threads must not outlive a constructor that throws
      throw;
    }
    joined_late_ = spec_.version > 0;
    timings_ = ChangeTimings{};
    timings_.to_version = spec_.version;
    timings_.to_size = spec_.size();
    timings_.agree_to_connected = unix_ms_now() - start;
  }
  peer_->set_resize_handler([this](int n) { resize(n); });
}

ElasticSession::~ElasticSession() {
  stop_threads();
  if (peer_) peer_->set_resize_handler(nullptr);
}

void ElasticSession::start_threads() {
  watcher_ = std::thread([this] { watch_loop(); });
  detail::name_thread(watcher_, "aikido-elastic");
  if (config_.status_store) {
    heartbeat_ = std::thread([this] { heartbeat_loop(); });
    detail::name_thread(heartbeat_, "aikido-heartbt");
  }
}

void ElasticSession::stop_threads() {
  {
    std::lock_guard<std::mutex> lock(thread_mutex_);
    stopping_ = true;
  }
  thread_wake_.notify_all();
  if (watcher_.joinable()) watcher_.join();
  if (heartbeat_.joinable()) {
    heartbeat_.join();
    // Tell aikido-run that the silence from now on is not a hang.
    try {
      config_.status_store->set(worker_status_key(config_.peer.job_id, config_.worker_id),
                                str_cat("state=left version=", status_version_.load(), " step=", step_.load()));
    } catch (const Error&) {
    }
  }
}

void ElasticSession::watch_loop() {
  // Short waits, so that the destructor does not wait long for a thread blocked in the store.
  constexpr std::chrono::milliseconds kSlice{200};
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(thread_mutex_);
      if (stopping_) return;
    }
    try {
      auto spec = config_.watch_membership->watch(latest_seen_.load(), kSlice);
      if (spec) {
        std::uint64_t seen = latest_seen_.load();
        while (spec->version > seen && !latest_seen_.compare_exchange_weak(seen, spec->version)) {
        }
        drop_removed_peers(*spec);
      }
    } catch (const Error& e) {
      // The store is gone (aikido-run is stopping) or refused us: retry calmly.
      log::debug("worker ", config_.worker_id, ": membership watch failed: ", e.what());
      std::unique_lock<std::mutex> lock(thread_mutex_);
      thread_wake_.wait_for(lock, kSlice, [&] { return stopping_; });
    }
  }
}

// "state=joining version=V ..." until the worker has connected to its first cluster version (status_rank_ < 0), then
// "rank=R version=V step=S ..." (worker_status_key). Each value differs from the last (beat): aikido-run takes an
// unchanged value for a hung worker.
void ElasticSession::publish_status() {
  const int rank = status_rank_.load();
  const std::string value =
      rank < 0 ? str_cat("state=joining version=", status_version_.load(), " beat=", beat_++, " pid=", ::getpid())
               : str_cat("rank=", rank, " version=", status_version_.load(), " step=", step_.load(), " beat=", beat_++,
                         " pid=", ::getpid());
  config_.status_store->set(worker_status_key(config_.peer.job_id, config_.worker_id), value);
}

void ElasticSession::heartbeat_loop() {
  std::unique_lock<std::mutex> lock(thread_mutex_);
  while (!stopping_) {
    lock.unlock();
    try {
      publish_status();
      answer_checkpoint_request();
    } catch (const Error& e) {
      log::debug("worker ", config_.worker_id, ": heartbeat failed: ", e.what());
    }
    lock.lock();
    thread_wake_.wait_for(lock, config_.heartbeat_interval, [&] { return stopping_; });
  }
}

bool ElasticSession::newer_version_seen(std::uint64_t than) const { return latest_seen_.load() > than; }

// A version that removed workers after a failure ("lost", "host H lost", ...; not a planned shrink, whose workers leave
// at their next sync()) while this worker is still connected to them: a killed worker's connections are closed, but
// a host cut off from the others closes nothing, so a collective waiting for it would wait out its timeout. Treat them
// as lost now; the training loop then recovers into the newer version. A worker that the version removed itself
// (it was the one cut off) gives up every other rank.
void ElasticSession::drop_removed_peers(const ClusterSpec& newer) {
  if (newer.reason == "resize") return;
  std::unique_lock<std::mutex> lock(connected_mutex_, std::try_to_lock);
  if (!lock.owns_lock() || newer.version <= connected_.version) return;  // connecting right now: nothing to drop
  const bool removed_me = !newer.contains(config_.worker_id);
  for (int rank = 0; rank < connected_.size(); ++rank) {
    const std::uint64_t id = connected_.workers[std::size_t(rank)].id;
    if (id == config_.worker_id || (newer.contains(id) && !removed_me)) continue;
    peer_->mark_lost(rank, str_cat("cluster version ", newer.version, " (", newer.reason, ") removed ",
                                   removed_me ? "this worker" : str_cat("worker ", id)));
  }
}

void ElasticSession::connect(const ClusterSpec& spec) {
  PeerConfig c = config_.peer;
  c.rank = spec.rank_of(config_.worker_id);
  c.size = spec.size();
  c.cluster_version = spec.version;
  const std::uint64_t version = spec.version;
  c.cancel = [this, version] { return newer_version_seen(version); };
  if (c.size == 1) c.cancel = nullptr;
  {
    std::lock_guard<std::mutex> lock(connected_mutex_);
    connected_ = ClusterSpec{};
    peer_->reconnect(c);
    connected_ = spec;
  }
  spec_ = spec;
  status_rank_ = c.rank;
  status_version_ = spec.version;
}

void ElasticSession::register_bytes(std::string name, std::span<std::byte> bytes) {
  if (established_) throw ConfigError(str_cat("register '", name, "' before the first sync()"));
  entries_.push_back(Entry{std::move(name), bytes, nullptr, nullptr});
}

void ElasticSession::register_state(std::string name, std::function<std::vector<std::byte>()> save,
                                    std::function<void(std::span<const std::byte>)> load) {
  if (established_) throw ConfigError(str_cat("register '", name, "' before the first sync()"));
  if (!save || !load) throw ConfigError(str_cat("state '", name, "' needs both a save and a load function"));
  entries_.push_back(Entry{std::move(name), {}, std::move(save), std::move(load)});
}

void ElasticSession::register_sampler(std::string name, ElasticSampler& sampler) {
  register_value(std::move(name), sampler.state());
}

void ElasticSession::take_snapshot(std::uint64_t seq, std::int64_t step) {
  // Reuse the storage of the oldest commit once two are kept: touching fresh pages costs more than the copy.
  Snapshot snapshot;
  if (snapshots_.size() >= 2) {
    std::lock_guard<std::mutex> lock(snapshots_mutex_);
    snapshot = std::move(snapshots_.front());
    snapshots_.erase(snapshots_.begin());
  }
  snapshot.seq = seq;
  snapshot.step = step;
  snapshot.step_provisional = false;
  snapshot.values.resize(entries_.size());
  for (std::size_t i = 0; i < entries_.size(); ++i) {
    auto& e = entries_[i];
    if (e.fixed()) {
      snapshot.values[i].resize(e.bytes.size());
      if (!e.bytes.empty()) std::memcpy(snapshot.values[i].data(), e.bytes.data(), e.bytes.size());
    } else {
      snapshot.values[i] = e.save();
    }
  }
  std::lock_guard<std::mutex> lock(snapshots_mutex_);
  snapshots_.push_back(std::move(snapshot));
  commit_seq_ = seq;
}

void ElasticSession::restore_snapshot(std::uint64_t seq) {
  auto it = std::find_if(snapshots_.begin(), snapshots_.end(), [&](const Snapshot& s) { return s.seq == seq; });
  if (it == snapshots_.end()) {
    throw Error(str_cat("worker ", config_.worker_id, " holds no commit ", seq,
                        " to roll back to; commit() must be called at the same steps on every worker"));
  }
  for (std::size_t i = 0; i < entries_.size(); ++i) entries_[i].restore(it->values[i]);
  std::lock_guard<std::mutex> lock(snapshots_mutex_);
  snapshots_.erase(std::next(it), snapshots_.end());
  commit_seq_ = seq;
}

void ElasticSession::commit() {
  if (!established_) throw ConfigError("commit() before the first sync()");
  const std::int64_t last = step_.load();  // negative: sync() is not given steps
  take_snapshot(commit_seq_ + 1, last >= 0 ? last + 1 : -1);
  std::lock_guard<std::mutex> lock(snapshots_mutex_);
  snapshots_.back().step_provisional = true;
}

bool ElasticSession::establish(bool is_new) {
  Peer& peer = *peer_;
  const int size = peer.size();
  std::vector<std::int64_t> mine(kHeaderFields, 0), all(std::size_t(kHeaderFields * size));
  mine[kHasState] = is_new ? 0 : 1;
  mine[kWantsRollback] = needs_rollback_ ? 1 : 0;
  mine[kNewestCommit] = snapshots_.empty() ? 0 : std::int64_t(snapshots_.back().seq);
  mine[kOldestCommit] = snapshots_.empty() ? 0 : std::int64_t(snapshots_.front().seq);
  mine[kTopology] = topology_before_change_ ? std::int64_t(*topology_before_change_) : -1;
  peer.allgather(std::span<const std::int64_t>(mine), std::span<std::int64_t>(all), "aikido/elastic/header");

  std::string registry;
  for (const auto& e : entries_) {
    registry += str_cat(e.name, e.fixed() ? str_cat(":", e.bytes.size()) : std::string(":*"), "\n");
  }
  if (!peer.consensus(std::as_bytes(std::span<const char>(registry.data(), registry.size())),
                      "aikido/elastic/registry")) {
    throw MismatchError(str_cat("workers registered different state (this worker, rank ", peer.rank(),
                                ", registered: ", registry.empty() ? std::string("nothing") : registry,
                                "); register the same names with the same sizes, in the same order, everywhere"));
  }

  int source = -1;
  bool rollback = false, transfer = false;
  std::int64_t target = INT64_MAX, newest = 0;
  for (int r = 0; r < size; ++r) {
    const std::int64_t* h = &all[std::size_t(r * kHeaderFields)];
    if (h[kWantsRollback]) rollback = true;
    if (!h[kHasState]) {
      transfer = true;
      continue;
    }
    if (source < 0) source = r;
    target = std::min(target, h[kNewestCommit]);
    newest = std::max(newest, h[kNewestCommit]);
  }
  // A fresh job starts from rank 0's initial state, or from the checkpoint that rank 0 reads.
  const bool resume = source < 0 && !config_.resume_path.empty();
  if (source < 0) source = 0;
  const std::int64_t topology = all[std::size_t(source * kHeaderFields + kTopology)];
  if (topology >= 0) peer.set_topology(Topology(topology));

  // The step the state stands at after this change (named in checkpoint messages): this step boundary's, the
  // restored commit's, or the one the source sends with the state.
  std::int64_t state_step = step_.load();
  if (rollback && !is_new && target > 0 && target != INT64_MAX) {
    restore_snapshot(std::uint64_t(target));
    state_step = snapshots_.back().step;
  }
  if (transfer) {
    // Sizes first (callback entries may change size), then every entry's bytes.
    const bool sending = peer.rank() == source;
    std::string resume_error;
    if (resume && sending) {
      try {
        state_step = read_checkpoint(config_.resume_path);
      } catch (const Error& e) {
        resume_error = e.what();
      }
    }
    std::vector<std::vector<std::byte>> saved(entries_.size());
    // After the entries' sizes: whether the source failed to resume, and the step its state stands at.
    std::vector<std::int64_t> sizes(entries_.size() + 2, 0);
    sizes[entries_.size()] = resume_error.empty() ? 0 : 1;
    sizes[entries_.size() + 1] = state_step;
    for (std::size_t i = 0; i < entries_.size(); ++i) {
      auto& e = entries_[i];
      if (e.fixed()) {
        sizes[i] = std::int64_t(e.bytes.size());
      } else if (sending) {
        saved[i] = e.save();
        sizes[i] = std::int64_t(saved[i].size());
      }
    }
    peer.broadcast(std::span<std::int64_t>(sizes), source, "aikido/elastic/sizes");
    state_step = sizes[entries_.size() + 1];
    if (sizes[entries_.size()] != 0) {
      throw ConfigError(sending ? resume_error
                                : str_cat("rank ", source, " could not resume from the checkpoint ",
                                          config_.resume_path, " (its own error says why)"));
    }
    std::vector<Work> works;
    for (std::size_t i = 0; i < entries_.size(); ++i) {
      auto& e = entries_[i];
      if (e.fixed()) {
        if (sizes[i] != std::int64_t(e.bytes.size())) {
          throw MismatchError(str_cat("state '", e.name, "' has ", e.bytes.size(), " bytes on rank ", peer.rank(),
                                      " but ", sizes[i], " on rank ", source));
        }
        works.push_back(peer.broadcast_async(
            std::span<std::uint8_t>(reinterpret_cast<std::uint8_t*>(e.bytes.data()), e.bytes.size()), source,
            "aikido/elastic/state/" + e.name));
      } else {
        saved[i].resize(std::size_t(sizes[i]));
        works.push_back(peer.broadcast_async(
            std::span<std::uint8_t>(reinterpret_cast<std::uint8_t*>(saved[i].data()), saved[i].size()), source,
            "aikido/elastic/state/" + e.name));
      }
    }
    std::exception_ptr error;
    for (auto& w : works) {
      try {
        w.wait();
      } catch (...) {
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    if (!sending) {
      for (std::size_t i = 0; i < entries_.size(); ++i) {
        if (!entries_[i].fixed()) entries_[i].load(saved[i]);
      }
    }
  }
  if (is_new) {
    std::lock_guard<std::mutex> lock(snapshots_mutex_);
    snapshots_.clear();
  }
  take_snapshot(std::uint64_t(std::max<std::int64_t>(newest, 0)) + 1, state_step);
  needs_rollback_ = false;
  if (resume) resumed_ = true;
  established_ = true;
  joined_late_ = false;  // the state has arrived
  sync_count_ = 0;       // the check cadence restarts together on every member
  return resume;
}

SyncResult ElasticSession::leave(const ClusterSpec& target) {
  removed_ = true;
  stop_threads();
  spec_ = target;
  PeerConfig alone = config_.peer;
  alone.cluster_version = target.version;
  alone.rank = 0;
  alone.size = 1;
  alone.cancel = nullptr;
  peer_->reconnect(alone);
  return SyncResult::removed;
}

SyncResult ElasticSession::switch_to(ClusterSpec target, bool failure) {
  const double agreed = unix_ms_now();
  timings_ = ChangeTimings{};
  timings_.from_version = spec_.version;
  timings_.from_size = spec_.size();
  timings_.failure = failure;
  if (target.proposed_unix_ms > 0) timings_.decided_to_agreed = agreed - double(target.proposed_unix_ms);
  if (failure) needs_rollback_ = true;
  // The topology the members agreed on, read before connect() replaces the Peer's engine (establish() restores it).
  if (established_) topology_before_change_ = peer_->topology();
  const auto deadline = SteadyClock::now() + config_.recovery_timeout;
  for (;;) {
    if (!target.contains(config_.worker_id)) return leave(target);
    if (target.below_min()) {
      // Wait for replacements; give up at the deadline.
      auto next =
          config_.membership->watch(target.version, std::chrono::duration_cast<std::chrono::milliseconds>(std::max(
                                                        deadline - SteadyClock::now(), SteadyClock::duration(0))));
      if (next) {
        target = *next;
        continue;
      }
      if (target.rank_of(config_.worker_id) == 0) write_checkpoint();
      throw TimeoutError(
          str_cat("the cluster lost workers and has ", target.size(), " of at least ", target.min_size,
                  " (--min-np); no replacement joined within ", double(config_.recovery_timeout.count()) / 1000.0, " s",
                  config_.checkpoint_path.empty() ? std::string("")
                                                  : str_cat("; the last commit is in ", config_.checkpoint_path)));
    }
    const double connect_start = unix_ms_now();
    try {
      connect(target);
      const double connected = unix_ms_now();
      establish(!established_);  // a worker that never received the state still has none
      timings_.to_version = spec_.version;
      timings_.to_size = spec_.size();
      timings_.agree_to_connected = connected - connect_start;
      timings_.connected_to_restored = unix_ms_now() - connected;
      if (target.proposed_unix_ms > 0) timings_.decided_to_restored = unix_ms_now() - double(target.proposed_unix_ms);
      return SyncResult::changed;
    } catch (const Error& e) {
      // Superseded while connecting, or a member failed during the change: go on with the newest version.
      if (SteadyClock::now() >= deadline) throw;
      log::info("worker ", config_.worker_id, ": change to ", target.describe(), " failed: ", e.what());
      needs_rollback_ = true;
      timings_.failure = true;  // members may have moved on: the change ends as a recovery
      target = next_spec_after_failure(deadline);
    }
  }
}

ClusterSpec ElasticSession::next_spec_after_failure(SteadyClock::time_point deadline) {
  const std::uint64_t current = spec_.version;
  for (;;) {
    auto latest = config_.membership->latest();
    if (latest && latest->version > current) return *latest;
    // Nobody proposed yet: propose the cluster without the workers whose connections ended.
    std::vector<std::uint64_t> lost;
    for (int r : peer_->lost_ranks()) {
      if (r < spec_.size()) lost.push_back(spec_.workers[std::size_t(r)].id);
    }
    if (!lost.empty() && latest && latest->version == current) {
      ClusterSpec next = spec_.without(lost, "lost");
      next.requested_by = "survivors";
      next.proposed_unix_ms = unix_ms();
      if (!next.workers.empty() && config_.membership->propose(next)) {
        latest_seen_ = std::max(latest_seen_.load(), next.version);
        log::warn("worker ", config_.worker_id, ": proposed ", next.describe());
        return next;
      }
      continue;
    }
    const auto now = SteadyClock::now();
    if (now >= deadline) {
      throw TimeoutError(str_cat("worker ", config_.worker_id, ": no new cluster version after a failure at version ",
                                 current, " within ", double(config_.recovery_timeout.count()) / 1000.0,
                                 " s; no lost worker is known and nobody proposed a new membership"));
    }
    config_.membership->watch(current, std::min(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now),
                                                std::chrono::milliseconds(50)));
  }
}

SyncResult ElasticSession::recover() {
  if (!elastic()) {
    if (auto error = std::current_exception()) {
      // The cluster cannot change, but the state goes back to the last commit as it would in an elastic job, so a
      // program that goes on after the failure (a checkpoint of its own, a new session) has committed state.
      if (!snapshots_.empty()) restore_snapshot(snapshots_.back().seq);
      std::rethrow_exception(error);
    }
    throw ConfigError("recover() needs an elastic job (aikido-run --elastic), or a failure to rethrow");
  }
  // The recovery is this step's boundary: new workers start their step right after establishing, so the next
  // sync() must not run a check they would not run.
  recovered_outside_sync_ = true;
  return recover_in_sync();
}

SyncResult ElasticSession::recover_in_sync() {
  if (removed_) return SyncResult::removed;
  needs_rollback_ = true;
  const auto deadline = SteadyClock::now() + config_.recovery_timeout;
  // The survivors as seen at the failure: one that gives up on the recovery first and leaves must not make the
  // others count it as lost too.
  const std::vector<int> lost = peer_->lost_ranks();
  ClusterSpec next;
  try {
    next = next_spec_after_failure(deadline);
  } catch (const Error& e) {
    // No new membership: the store did not answer (etcd away for longer than the timeout), or nobody proposed one.
    // What is committed is kept: the lowest-ranked survivor writes it to the checkpoint file, if there is one.
    int first_survivor = 0;
    while (std::find(lost.begin(), lost.end(), first_survivor) != lost.end()) ++first_survivor;
    if (peer_->rank() != first_survivor || config_.checkpoint_path.empty()) throw;
    throw TimeoutError(str_cat(e.what(), "; ", write_checkpoint()));
  }
  return switch_to(std::move(next), true);
}

SyncResult ElasticSession::sync(std::int64_t step) {
  if (removed_) return SyncResult::removed;
  step_ = step;
  {
    std::lock_guard<std::mutex> lock(snapshots_mutex_);
    for (auto& snapshot : snapshots_) {
      if (snapshot.step_provisional) snapshot.step = std::max<std::int64_t>(step, -1);
      snapshot.step_provisional = false;
    }
  }
  if (recovered_outside_sync_) {
    recovered_outside_sync_ = false;
    return SyncResult::unchanged;
  }
  if (!established_) {
    const bool joined = joined_late_;
    bool resumed = false;
    try {
      resumed = establish(!established_);
    } catch (const PeerLostError&) {
      return recover_in_sync();
    } catch (const TimeoutError&) {
      return recover_in_sync();
    }
    return joined || resumed ? SyncResult::changed : SyncResult::unchanged;
  }
  if (!elastic()) return SyncResult::unchanged;
  if (++sync_count_ % std::uint64_t(config_.check_every) != 0) return SyncResult::unchanged;
  std::int64_t version = std::int64_t(latest_seen_.load());
  return agree_on_version(version, "aikido/elastic/check");
}

std::uint64_t ElasticSession::request_resize(int n, const std::string& requested_by) {
  if (!elastic()) throw ConfigError("resizing needs an elastic job: run under aikido-run --elastic");
  for (;;) {
    auto latest = config_.membership->latest();
    if (!latest) throw Error("the membership store holds no cluster spec");
    if (latest->size() == n) return latest->version;
    ClusterSpec next = latest->with_size(n);
    next.requested_by = requested_by;
    next.proposed_unix_ms = unix_ms();
    if (config_.membership->propose(next)) {
      latest_seen_ = std::max(latest_seen_.load(), next.version);
      return next.version;
    }
  }
}

std::uint64_t ElasticSession::request_removal(const std::vector<int>& ranks, const std::string& reason) {
  if (!elastic()) throw ConfigError("leaving workers behind needs an elastic job: run under aikido-run --elastic");
  std::vector<std::uint64_t> ids;
  for (int r : ranks) {
    if (r < 0 || r >= spec_.size()) {
      throw ConfigError(str_cat("request_removal: rank ", r, " is not in the cluster of ", spec_.size(), " workers"));
    }
    ids.push_back(spec_.workers[std::size_t(r)].id);
  }
  if (ids.size() >= spec_.workers.size()) throw ConfigError("request_removal: no worker would be left");
  for (;;) {
    auto latest = config_.membership->latest();
    if (!latest) throw Error("the membership store holds no cluster spec");
    const bool gone = std::none_of(ids.begin(), ids.end(), [&](std::uint64_t id) {
      return std::any_of(latest->workers.begin(), latest->workers.end(), [&](const auto& w) { return w.id == id; });
    });
    if (gone) return latest->version;
    ClusterSpec next = latest->without(ids, reason);
    next.proposed_unix_ms = unix_ms();
    if (config_.membership->propose(next)) {
      latest_seen_ = std::max(latest_seen_.load(), next.version);
      log::warn("worker ", config_.worker_id, ": proposed ", next.describe());
      return next.version;
    }
  }
}

SyncResult ElasticSession::resize(int n) {
  if (!elastic()) throw ConfigError("resizing needs an elastic job: run under aikido-run --elastic");
  if (n < spec_.min_size || n > spec_.max_size) {
    throw ConfigError(str_cat("cannot resize to ", n, " workers: the job allows ", spec_.min_size, " to ",
                              spec_.max_size, " (--min-np, --max-np)"));
  }
  std::int64_t version = std::int64_t(latest_seen_.load());
  if (rank() == 0) version = std::max(version, std::int64_t(request_resize(n)));
  return agree_on_version(version, "aikido/elastic/resize");
}

// Collective: the newest cluster version any worker knows of; switches to it when it is newer than ours. A peer
// lost meanwhile turns this into a recovery.
SyncResult ElasticSession::agree_on_version(std::int64_t version, const char* name) {
  try {
    peer_->allreduce(std::span<std::int64_t>(&version, 1), ReduceOp::max, name);
  } catch (const PeerLostError&) {
    return recover_in_sync();
  } catch (const TimeoutError&) {
    return recover_in_sync();
  }
  if (std::uint64_t(version) <= spec_.version) return SyncResult::unchanged;
  auto target = config_.membership->get(std::uint64_t(version));
  if (!target) throw ProtocolError(str_cat("cluster version ", version, " was announced but is not in the store"));
  return switch_to(*target, false);
}

std::string ElasticSession::write_checkpoint() {
  if (config_.checkpoint_path.empty()) return "no checkpoint file was given";
  std::vector<std::byte> bytes;
  std::int64_t step = -1;
  {
    std::lock_guard<std::mutex> lock(snapshots_mutex_);
    if (snapshots_.empty()) return "nothing is committed yet, so no checkpoint was written";
    const Snapshot& s = snapshots_.back();
    step = s.step >= 0 ? s.step : -1;
    detail::ByteWriter w;
    w.put(elastic::kCheckpointMagic).put(std::uint64_t(s.seq)).put(std::uint64_t(entries_.size()));
    for (std::size_t i = 0; i < entries_.size(); ++i) w.put_string(entries_[i].name).put_bytes(s.values[i]);
    w.put(elastic::kCheckpointStepTag).put(step);
    bytes = w.take();
  }
  // A file of its own to write before the rename: survivors that each count the others as lost may write at once.
  const std::string tmp = str_cat(config_.checkpoint_path, ".tmp.", ::getpid(), ".", config_.worker_id);
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  bool ok = f && std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  if (f) ok = std::fclose(f) == 0 && ok;
  if (!ok || std::rename(tmp.c_str(), config_.checkpoint_path.c_str()) != 0) {
    const std::string said =
        str_cat("cannot write the checkpoint ", config_.checkpoint_path, ": ", std::strerror(errno));
    log::warn(said);
    return said;
  }
  // Normal on a stop: aikido-run prints the answer, and a stop below the minimum says it in its error.
  const std::string said = step >= 0 ? str_cat("wrote the last commit (step ", step, ") to ", config_.checkpoint_path)
                                     : str_cat("wrote the last commit to ", config_.checkpoint_path);
  log::info(said);
  return said;
}

// On rank 0, from the heartbeat thread: answers aikido-run's request for a checkpoint (it is stopping the job).
void ElasticSession::answer_checkpoint_request() {
  if (config_.checkpoint_path.empty() || status_rank_.load() != 0) return;
  const auto request = config_.status_store->get(checkpoint_request_key(config_.peer.job_id));
  if (!request || request->empty() || *request == answered_checkpoint_) return;
  answered_checkpoint_ = *request;
  config_.status_store->set(checkpoint_done_key(config_.peer.job_id), *request + " " + write_checkpoint());
}

// Loads a checkpoint into the registered state (this worker only; establish() then sends it to the others).
std::int64_t ElasticSession::read_checkpoint(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw ConfigError(str_cat("cannot read the checkpoint ", path, " to resume from: ", std::strerror(errno)));
  std::vector<std::byte> bytes;
  if (std::fseek(f, 0, SEEK_END) == 0) {
    const long size = std::ftell(f);
    std::rewind(f);
    if (size > 0) bytes.resize(std::size_t(size));
  }
  const std::size_t got = std::fread(bytes.data(), 1, bytes.size(), f);
  std::fclose(f);
  bytes.resize(got);
  const std::string what = str_cat("the checkpoint ", path);
  const elastic::CheckpointContents contents = elastic::decode_checkpoint(bytes, what);
  const std::int64_t step = contents.step;
  const auto& values = contents.values;
  std::string mismatch;
  for (std::size_t i = 0; i < contents.names.size() && mismatch.empty(); ++i) {
    const std::string& name = contents.names[i];
    if (i >= entries_.size() || entries_[i].name != name) {
      mismatch = str_cat("its entry ", i, " is '", name, "' where this program registered ",
                         i < entries_.size() ? str_cat("'", entries_[i].name, "'") : std::string("nothing"));
    } else if (entries_[i].fixed() && values[i].size() != entries_[i].bytes.size()) {
      mismatch = str_cat("'", name, "' holds ", values[i].size(), " bytes where this program registered ",
                         entries_[i].bytes.size());
    }
  }
  const std::size_t count = values.size();
  if (mismatch.empty() && count != entries_.size()) {
    mismatch = str_cat("it holds ", count, " entries where this program registered ", entries_.size());
  }
  if (!mismatch.empty()) {
    throw ConfigError(str_cat(what, " does not fit this program's registered state: ", mismatch,
                              "; resume with the program (and model) that wrote it"));
  }
  for (std::size_t i = 0; i < entries_.size(); ++i) entries_[i].restore(values[i]);
  if (step >= 0) {
    log::info("resumed from ", path, " at step ", step);
  } else {
    log::info("resumed from ", path);
  }
  return step;
}

}  // namespace aikido
