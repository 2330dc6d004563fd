#include "elastic.hpp"

#include <sys/eventfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <aikido/errors.hpp>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <thread>
#include <utility>

#include "base/env.hpp"
#include "base/error.hpp"
#include "base/log.hpp"
#include "events.hpp"
#include "launch/host_job.hpp"
#include "output.hpp"
#include "runtime/peer_env.hpp"
#include "transport/socket.hpp"

namespace aikido::run {
namespace {

using SteadyClock = std::chrono::steady_clock;

// A removed worker leaves at its next step boundary; past this it is stopped.
constexpr std::chrono::seconds kLeaveGrace{10};
// A worker without a session this long after its start is reported as probably not using one. Programs may load
// their data before they open the session; the example opens it first.
constexpr std::chrono::seconds kSessionGrace{10};
// A store call that takes longer than this was retried while the store was away (its client retries until it answers).
constexpr std::chrono::milliseconds kSlowStoreAnswer{500};
// What to do about a program that does not open a session.
constexpr const char* kUseASession =
    "run it without --elastic, or open an aikido::ElasticSession (ElasticSession::from_env(), see \"Elastic "
    "training\" in the README)";

std::int64_t unix_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string describe_status(int status) {
  if (WIFSIGNALED(status)) return "was " + killed_by(WTERMSIG(status));
  return "exited with status " + std::to_string(WEXITSTATUS(status));
}

}  // namespace

ElasticController::ElasticController(const Options& options, ElasticSetup setup, std::string job_id,
                                     std::vector<std::string> shared_environment)
    : options_(options),
      job_id_(std::move(job_id)),
      setup_(std::move(setup)),
      host_(setup_.host),
      shared_environment_(std::move(shared_environment)),
      store_(setup_.store),
      membership_(setup_.membership) {
  // Per-worker values replace the shared ones.
  std::erase_if(shared_environment_, [](const std::string& e) {
    for (const char* name : {env::kSize, env::kLocalSize, env::kClusterVersion, env::kHost}) {
      if (e.starts_with(std::string(name) + "=")) return true;
    }
    return false;
  });
  wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake_fd_ < 0) throw Error(std::string("eventfd: ") + std::strerror(errno));
  watcher_ = std::thread([this] { watch_loop(); });
  if (setup_.hosts) host_watcher_ = std::thread([this] { watch_hosts_loop(); });
}

void ElasticController::publish_first_version(const Options& options, MembershipStore& membership,
                                              const std::string& host) {
  ClusterSpec v0;
  v0.min_size = options.min_np;
  v0.max_size = options.max_np;
  for (int i = 0; i < options.np; ++i) v0.workers.push_back({std::uint64_t(i), host});
  v0.next_id = std::uint64_t(options.np);
  v0.proposed_unix_ms = unix_ms();
  if (!membership.propose(v0)) throw Error("cannot publish cluster version 0 in the job's store");
}

ElasticController::~ElasticController() {
  stopping_ = true;
  if (setup_.hosts) setup_.hosts->hosts().interrupt();
  if (watcher_.joinable()) watcher_.join();
  if (host_watcher_.joinable()) host_watcher_.join();
  ::close(wake_fd_);
}

void ElasticController::wake() {
  const std::uint64_t one = 1;
  [[maybe_unused]] const ssize_t n = ::write(wake_fd_, &one, sizeof one);
}

void ElasticController::watch_loop() {
  std::uint64_t version = 0;
  const auto& watcher = setup_.watch_membership ? setup_.watch_membership : membership_;
  while (!stopping_) {
    try {
      if (auto spec = watcher->watch(version, std::chrono::milliseconds(200))) {
        version = spec->version;
        wake();
      }
    } catch (const Error& e) {
      if (!setup_.hosts) return;                   // the embedded store is stopping
      log::debug("membership watch: ", e.what());  // etcd away: try again
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  }
}

void ElasticController::watch_hosts_loop() {
  std::vector<std::string> known;
  while (!stopping_) {
    try {
      std::vector<std::string> now;
      for (const auto& h : setup_.hosts->hosts().wait_for_change(SteadyClock::now() + std::chrono::seconds(1))) {
        now.push_back(h.id);
      }
      if (now != known) {
        known = std::move(now);
        hosts_changed_ = true;
        wake();
      }
    } catch (const Error& e) {
      log::debug("hosts watch: ", e.what());
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  }
}

std::vector<Supervisor::Worker> ElasticController::initial_workers() {
  const ClusterSpec spec = *membership_->latest();
  std::vector<Supervisor::Worker> workers;
  for (const auto& w : spec.workers) {
    if (w.host != host_) continue;
    workers.push_back(worker_for(spec, w.id));
    started(w.id, spec.version);
  }
  return workers;
}

void ElasticController::started(std::uint64_t id, std::uint64_t version) {
  started_for_[id] = version;
  sessions_[id].started = SteadyClock::now();
}

Supervisor::Worker ElasticController::worker_for(const ClusterSpec& spec, std::uint64_t id) const {
  Supervisor::Worker worker;
  worker.rank = spec.rank_of(id);
  worker.id = id;
  worker.environment = shared_environment_;
  auto add = [&](const char* name, const std::string& value) {
    worker.environment.push_back(std::string(name) + "=" + value);
  };
  int local_rank = 0;
  for (const auto& w : spec.workers) {
    if (w.id == id) break;
    if (w.host == host_) ++local_rank;
  }
  add(env::kElastic, "1");
  add(env::kWorkerId, std::to_string(id));
  add(env::kRank, std::to_string(worker.rank));
  add(env::kLocalRank, std::to_string(local_rank));
  add(env::kSize, std::to_string(spec.size()));
  add(env::kLocalSize, std::to_string(spec.workers_on(host_)));
  add(env::kHost, host_);
  add(env::kClusterVersion, std::to_string(spec.version));
  if (!options_.checkpoint.empty()) add(env::kCheckpoint, options_.checkpoint);
  if (!options_.resume.empty()) add(env::kResume, options_.resume);
  return worker;
}

void ElasticController::on_wake(Supervisor& supervisor) {
  std::uint64_t count;
  while (::read(wake_fd_, &count, sizeof count) > 0) {
  }
  const auto woke = SteadyClock::now();
  try {
    if (setup_.hosts) check_hosts(supervisor);
    for (auto it = pending_lost_.begin(); it != pending_lost_.end();) {
      it = remove_lost_worker(it->first, it->second) ? pending_lost_.erase(it) : std::next(it);
    }
    reconcile(supervisor);
    const auto now = SteadyClock::now();
    if (now < next_store_check_) return;
    next_store_check_ = now + setup_.store_check_interval;
    check_sessions(supervisor);
    learn_finished_elsewhere(supervisor);
    // The store's client retries until the store answers: a slow tick is an absence of the store (etcd restarting),
    // during which the workers could not write their heartbeats either.
    if (SteadyClock::now() - woke > kSlowStoreAnswer) store_was_away_ = true;
    // While rank 0 writes the checkpoint before a stop, its heartbeat pauses: no worker is killed for that.
    if (checkpoint_request_.empty()) check_heartbeats(supervisor);
  } catch (const Error& e) {
    // The store is away (etcd restarting, a leader election): the workers train on; try again at the next tick.
    if (!store_was_away_) log::warn("aikido-run: the job's store does not answer (", e.what(), "); trying again");
    store_was_away_ = true;
  }
}

void ElasticController::check_hosts(Supervisor& supervisor) {
  launch::HostJob& hosts = *setup_.hosts;
  if (hosts.hosts().lease_lost()) {
    if (!std::exchange(lease_loss_reported_, true)) {
      report("aikido-run: host " + host_ + " lost its place in job " + job_id_ +
             ": its lease in etcd expired (it was cut off for more than --host-timeout), and the other hosts went on "
             "without it; stopping its workers");
      supervisor.stop_job(1);
    }
    return;
  }
  if (!hosts_changed_.exchange(false)) return;
  if (auto next = hosts.remove_lost_hosts()) report("aikido-run: cluster " + next->describe());
}

// Every cluster version up to `latest` once in the event log, with who asked for it.
void ElasticController::record_versions(const ClusterSpec& latest) {
  if (!setup_.events) return;
  for (std::uint64_t v = recorded_versions_; v <= latest.version; ++v) {
    const auto spec = v == latest.version ? std::optional<ClusterSpec>(latest) : membership_->get(v);
    if (!spec) continue;
    nlohmann::json workers = nlohmann::json::array();
    for (const auto& w : spec->workers) workers.push_back({{"id", w.id}, {"host", w.host}});
    nlohmann::json e = {{"version", spec->version},  {"size", spec->size()}, {"reason", spec->reason},
                        {"by", spec->requested_by},  {"workers", workers},   {"min_size", spec->min_size},
                        {"max_size", spec->max_size}};
    if (spec->proposed_unix_ms > 0) e["proposed_time"] = double(spec->proposed_unix_ms) / 1e3;
    setup_.events->emit("cluster", std::move(e));
    if (spec->reason == "lost" || spec->reason == "restart") recovering_[spec->version] = unix_seconds();
  }
  recorded_versions_ = latest.version + 1;
}

bool ElasticController::session_open(std::uint64_t id) {
  try {
    return store_->get(worker_status_key(job_id_, id)).has_value();
  } catch (const Error&) {
    return false;
  }
}

void ElasticController::publish_no_session(const std::string& kind, const std::string& message) {
  try {
    store_->set(no_session_key(job_id_), kind.empty() ? std::string() : kind + " " + message);
  } catch (const Error&) {
  }
}

// Workers whose session has not opened yet: a rendezvous address without the status key means a plain Peer (the
// session publishes its status first, then connects); no status key long after the start, probably no session.
void ElasticController::check_sessions(Supervisor& supervisor) {
  if (!plain_peer_.empty()) return;  // said once for the job
  const auto now = SteadyClock::now();
  bool silent_reported = false;
  bool any_open = false;
  for (const auto& [id, watch] : sessions_) {
    silent_reported = silent_reported || (watch.reported_silent && !watch.open);
    any_open = any_open || watch.open;
  }
  for (std::uint64_t id : supervisor.running_workers()) {
    auto it = sessions_.find(id);
    if (it == sessions_.end() || it->second.open) continue;
    SessionWatch& watch = it->second;
    const std::uint64_t version = started_for_.at(id);
    const auto spec = membership_->get(version);
    if (!spec || !spec->contains(id)) continue;
    const int rank = spec->rank_of(id);
    bool joined = false;
    try {
      joined = store_->get(detail::endpoint_key(job_id_, version, rank)).has_value();  // before the status key
    } catch (const Error&) {
      continue;
    }
    if (session_open(id)) {
      watch.open = true;
      if (watch.reported_silent) {
        report("aikido-run: worker " + std::to_string(id) + " has opened its elastic session");
        publish_no_session("", "");
      }
      continue;
    }
    const std::string who = "worker " + std::to_string(id) + " (rank " + std::to_string(rank) + ")";
    // The program opens sessions (others did): a member still without one a connect timeout after its start is stuck
    // before training, or stopped. No heartbeat finds it, and the others wait for it at every version until they
    // give up and are replaced themselves: kill it, as for a silent heartbeat (with --restart it is replaced).
    const auto deadline = std::chrono::milliseconds(std::int64_t(options_.connect_timeout_s * 1000));
    const auto latest = membership_->latest();
    if (!joined && !watch.killed && any_open && latest && latest->contains(id) && now - watch.started >= deadline) {
      watch.killed = true;
      report("aikido-run: " + who + " has not opened its elastic session " + detail::seconds(deadline) +
             " after it started (--connect-timeout), while the others wait for it to join; killing it (SIGKILL)");
      supervisor.kill_worker(id);
      continue;
    }
    if (joined) {
      plain_peer_ = who +
                    " joined the cluster with a plain aikido::Peer instead of an aikido::ElasticSession: the program "
                    "does not follow the job's membership, so the job cannot be resized, recover from a lost worker "
                    "or write a checkpoint";
      report("aikido-run: " + plain_peer_ + "; " + kUseASession);
      publish_no_session("plain-peer", plain_peer_ + "; " + kUseASession);
      if (!options_.resume.empty()) {
        report("aikido-run: stopping the job: the checkpoint " + options_.resume +
               " (--resume) is read by the program's aikido::ElasticSession; without one every worker would train "
               "from its initial state");
        supervisor.stop_job(1);
      }
      return;
    }
    if (!watch.reported_silent && !silent_reported && now - watch.started >= kSessionGrace) {
      watch.reported_silent = true;
      silent_reported = true;
      std::string message = who + " has not opened an aikido::ElasticSession " + detail::seconds(kSessionGrace) +
                            " after it started; if the program does not use one, " + kUseASession +
                            ": resizes, recovery and checkpoints need it";
      if (!options_.resume.empty()) {
        message += "; without one it trains from its initial state, not from " + options_.resume;
      }
      report("aikido-run: " + message);
      publish_no_session("silent", message);
    }
  }
}

void ElasticController::reconcile(Supervisor& supervisor) {
  const auto spec = membership_->latest();
  if (!spec) return;
  record_versions(*spec);
  for (const auto& w : spec->workers) {
    if (w.host != host_) continue;
    if (!started_for_.contains(w.id) && finished_by_) {
      // A member has finished the training (a resize that came after it): a worker started now would wait for the
      // finished members to join it until its timeout, and fail.
      started_for_[w.id] = spec->version;
      report("aikido-run: not starting worker " + std::to_string(w.id) + " of cluster version " +
             std::to_string(spec->version) + ": worker " + std::to_string(*finished_by_) +
             " has finished the training");
      continue;
    }
    if (!started_for_.contains(w.id)) {
      started(w.id, spec->version);
      report("aikido-run: starting worker " + std::to_string(w.id) + " as rank " + std::to_string(spec->rank_of(w.id)) +
             " of cluster version " + std::to_string(spec->version));
      supervisor.start_worker(worker_for(*spec, w.id));
    }
  }
  const auto now = SteadyClock::now();
  for (std::uint64_t id : supervisor.running_workers()) {
    if (spec->contains(id)) {
      supervisor.set_rank(id, spec->rank_of(id));  // its output lines name its rank in the newest version
      continue;
    }
    auto [it, fresh] = removed_since_.emplace(id, now);
    if (!fresh && now - it->second >= kLeaveGrace) {
      report("aikido-run: worker " + std::to_string(id) +
             " was removed from the cluster but has not left; stopping it");
      supervisor.stop_worker(id);
      it->second = now + std::chrono::hours(24);  // once
    }
  }
}

void ElasticController::check_heartbeats(Supervisor& supervisor) {
  // Heartbeats cannot be written while the store is away: silence counts from when it answers again.
  auto asked = SteadyClock::now();
  const auto spec = membership_->latest();
  if (!spec) return;
  auto now = SteadyClock::now();
  if (std::exchange(store_was_away_, false) || now - asked > kSlowStoreAnswer) {
    for (auto& [id, hb] : heartbeats_) hb.changed = now;
  }
  const auto timeout = std::chrono::milliseconds(std::int64_t(options_.heartbeat_timeout_s * 1000));
  std::map<std::uint64_t, std::uint64_t> joined;
  for (std::uint64_t id : supervisor.running_workers()) {
    if (!spec->contains(id)) continue;
    asked = SteadyClock::now();
    const auto value = store_->get(worker_status_key(job_id_, id));
    if (value) {
      const auto at = value->find("version=");
      joined[id] = at == std::string::npos ? 0 : std::strtoull(value->c_str() + at + 8, nullptr, 10);
    }
    now = SteadyClock::now();
    if (now - asked > kSlowStoreAnswer) {
      for (auto& [other, hb] : heartbeats_) hb.changed = now;
    }
    if (!value) continue;  // not started yet
    if (value->starts_with("state=left")) {
      check_left_worker(supervisor, id, now, timeout);
      continue;
    }
    Heartbeat& hb = heartbeats_[id];
    if (*value != hb.value) {
      hb.value = *value;
      hb.changed = now;
      continue;
    }
    if (!hb.killed && now - hb.changed >= timeout) {
      hb.killed = true;
      report("aikido-run: worker " + std::to_string(id) + " (rank " + std::to_string(spec->rank_of(id)) +
             ") stopped responding: no heartbeat for " + detail::seconds(timeout) + "; killing it (SIGKILL)");
      supervisor.kill_worker(id);
    }
  }
  record_recoveries(*spec, joined);
}

namespace {

// Whether process `pid` is stopped by a signal (state T in /proc/PID/stat; not t, a debugger's tracing stop).
bool process_stopped(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat;
  std::getline(in, stat);
  const auto close = stat.rfind(')');  // the command name may hold spaces and parentheses
  return close != std::string::npos && close + 2 < stat.size() && stat[close + 2] == 'T';
}

}  // namespace

// A worker that left its session has no heartbeat: it may work for long after (writing its results), and that is
// not a hang. A process stopped by a signal for a heartbeat timeout does no work, though, and the job would wait for
// it for ever: it is killed, as a worker whose heartbeat stopped would be. Its training is over (it left), so no
// replacement follows and the job's status stays what the others make it.
void ElasticController::check_left_worker(Supervisor& supervisor, std::uint64_t id,
                                          std::chrono::steady_clock::time_point now,
                                          std::chrono::milliseconds timeout) {
  Heartbeat& hb = heartbeats_[id];
  const pid_t pid = supervisor.pid_of(id);
  if (pid <= 0 || !process_stopped(pid)) {
    hb.stopped_since.reset();
    return;
  }
  if (!hb.stopped_since) hb.stopped_since = now;
  if (hb.killed || now - *hb.stopped_since < timeout) return;
  hb.killed = true;
  const auto latest = membership_->latest();
  if (latest && latest->contains(id)) {  // a member that left its session: its training is over
    finished_here_ = true;
    if (!finished_by_) finished_by_ = id;
  }
  report("aikido-run: worker " + std::to_string(id) + " left its session and has been stopped (SIGSTOP) for " +
         detail::seconds(timeout) + " (--heartbeat-timeout); killing it (SIGKILL)");
  supervisor.kill_worker(id);
}

void ElasticController::record_recoveries(const ClusterSpec& latest,
                                          const std::map<std::uint64_t, std::uint64_t>& joined) {
  if (!setup_.events || recovering_.empty()) return;
  for (auto it = recovering_.begin(); it != recovering_.end();) {
    bool all = true;
    for (const auto& w : latest.workers) {
      if (w.host != host_) continue;
      const auto j = joined.find(w.id);
      all = all && j != joined.end() && j->second >= it->first;
    }
    if (!all) break;  // versions in order: a later one cannot have finished first
    const double now = unix_seconds();
    setup_.events->emit(
        "recovery",
        {{"version", it->first}, {"size", latest.size()}, {"started", it->second}, {"seconds", now - it->second}});
    it = recovering_.erase(it);
  }
}

bool ElasticController::prepare_stop() {
  if (options_.checkpoint.empty()) return false;
  const auto latest = membership_->latest();
  if (latest && !latest->workers.empty() && !session_open(latest->workers.front().id)) {
    report("aikido-run: no checkpoint is written to " + options_.checkpoint + ": rank 0 (worker " +
           std::to_string(latest->workers.front().id) + ") " +
           (plain_peer_.empty() ? "has not opened" : "does not use") + " an aikido::ElasticSession, which writes it");
    return false;
  }
  checkpoint_request_ = std::to_string(unix_ms());
  try {
    store_->set(checkpoint_request_key(job_id_), checkpoint_request_);
  } catch (const Error&) {
    return false;
  }
  report("aikido-run: asking rank 0 to write the last commit to " + options_.checkpoint +
         " before stopping the workers (a second signal stops them at once)");
  return true;
}

void ElasticController::stop_preparation_abandoned(const std::string& why) {
  report("aikido-run: no checkpoint was written to " + options_.checkpoint + ": rank 0 had not written it " + why);
}

bool ElasticController::stop_ready() {
  std::optional<std::string> done;
  try {
    done = store_->get(checkpoint_done_key(job_id_));
  } catch (const Error&) {
    return true;
  }
  const std::string prefix = checkpoint_request_ + " ";
  if (!done || done->rfind(prefix, 0) != 0) return false;
  report("aikido-run: rank 0: " + done->substr(prefix.size()));
  if (setup_.events) {
    setup_.events->emit("checkpoint", {{"path", options_.checkpoint}, {"text", done->substr(prefix.size())}});
  }
  return true;
}

// A member finished the training in cluster version V (its session's last status says which): workers started for a
// later version, which counts it as a member, wait for it in vain until their timeout. Stop them now.
void ElasticController::stop_workers_that_cannot_join(Supervisor& supervisor, std::uint64_t finished) {
  std::optional<std::string> status;
  try {
    status = store_->get(worker_status_key(job_id_, finished));
  } catch (const Error&) {
    return;
  }
  if (!status) return;
  const auto at = status->find("version=");
  if (at == std::string::npos) return;
  const std::uint64_t version = std::strtoull(status->c_str() + at + 8, nullptr, 10);
  for (std::uint64_t id : supervisor.running_workers()) {
    const auto it = started_for_.find(id);
    if (it == started_for_.end() || it->second <= version) continue;
    report("aikido-run: stopping worker " + std::to_string(id) + ": it was started for cluster version " +
           std::to_string(it->second) + ", which worker " + std::to_string(finished) +
           " never joined before it finished the training (at version " + std::to_string(version) + ")");
    supervisor.stop_worker(id);
  }
}

// Across hosts: another host's launcher saw its members finish the training (HostJob::finish marks the host
// finished) while this host's workers may have been started for a later version (this host rejoined just before):
// they would wait for the finished members until their timeout, fail and be replaced for ever. Act as if a member of
// this host had finished: stop the workers that cannot join, start and replace none.
void ElasticController::learn_finished_elsewhere(Supervisor& supervisor) {
  if (finished_by_ || !setup_.hosts) return;
  const auto latest = membership_->latest();
  if (!latest) return;
  const std::set<std::string> finished = setup_.hosts->finished_hosts();
  for (const auto& h : latest->hosts()) {
    if (h == host_ || !finished.count(h)) continue;
    for (const auto& w : latest->workers) {
      if (w.host != h) continue;
      finished_by_ = w.id;
      report("aikido-run: host " + h + " has finished the training (worker " + std::to_string(w.id) +
             "); no worker of this host is started or replaced from now on");
      stop_workers_that_cannot_join(supervisor, w.id);
      return;
    }
  }
}

std::optional<ClusterSpec> ElasticController::last_spec_with(std::uint64_t id, std::string* removed_by) const {
  const auto latest = membership_->latest();
  if (!latest) return std::nullopt;
  std::string reason = latest->reason;
  for (std::uint64_t v = latest->version + 1; v-- > 0;) {
    auto spec = membership_->get(v);
    if (!spec) return std::nullopt;
    if (spec->contains(id)) {
      if (removed_by) *removed_by = reason;
      return spec;
    }
    reason = spec->reason;
  }
  return std::nullopt;
}

bool ElasticController::on_exit(Supervisor& supervisor, std::uint64_t id, int status) {
  try {
    return handle_exit(supervisor, id, status);
  } catch (const Error& e) {
    // The store is away: a failed worker is removed once it answers again (on_wake retries).
    const bool failed = !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    report("aikido-run: worker " + std::to_string(id) + " " + describe_status(status) +
           "; the job's store does not answer (" + e.what() + ")" +
           (failed ? ", so it is removed from the cluster once it does" : ""));
    if (failed) pending_lost_[id] = options_.restart && !finished_by_ && restarts_ < options_.max_restarts;
    return true;
  }
}

bool ElasticController::handle_exit(Supervisor& supervisor, std::uint64_t id, int status) {
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
    // A member that exits cleanly has finished its training (a removed worker is no longer a member): the job is
    // ending, and a worker that fails from now on is not replaced, since a replacement would wait for finished
    // workers to join it.
    const auto latest = membership_->latest();
    if (latest && latest->contains(id)) finished_here_ = true;
    if (!finished_by_ && latest && latest->contains(id)) {
      finished_by_ = id;
      if (options_.restart) {
        report("aikido-run: worker " + std::to_string(id) + " (rank " + std::to_string(latest->rank_of(id)) +
               ") has finished the training; workers that fail from now on are not replaced");
      }
    }
    if (latest && latest->contains(id)) stop_workers_that_cannot_join(supervisor, id);
    if (!options_.resume.empty() && !session_open(id) && !std::exchange(resume_unmet_reported_, true)) {
      report("aikido-run: worker " + std::to_string(id) +
             " finished without opening an aikido::ElasticSession, so it did not resume from " + options_.resume +
             "; " + kUseASession);
      supervisor.set_exit_code(1);
    }
    return true;
  }
  if (!plain_peer_.empty()) {
    // Plain Peers cannot form a smaller cluster: the others fail as in a static job.
    report(
        "aikido-run: the program does not use aikido::ElasticSession, so the other workers cannot go on without "
        "worker " +
        std::to_string(id) + "; stopping the job");
    return false;
  }
  std::string removed_by;
  const auto last = last_spec_with(id, &removed_by);
  if (!last) {
    // Every worker aikido-run starts is in some version; say so rather than drop a failure silently.
    report("aikido-run: worker " + std::to_string(id) + " " + describe_status(status) +
           "; no cluster version in the store holds it, so nothing is changed");
    return true;
  }
  const bool member = membership_->latest()->contains(id);
  // Stopped or crashed after a planned shrink removed it: the cluster is meant to be smaller.
  if (!member && removed_by == "resize") return true;
  std::string not_replaced;
  if (options_.restart && finished_by_) {
    not_replaced = "; not replacing it: worker " + std::to_string(*finished_by_) + " has finished the training";
  } else if (options_.restart && restarts_ >= options_.max_restarts) {
    not_replaced = "; not replacing it: the job has started " + std::to_string(restarts_) + " replacement" +
                   (restarts_ == 1 ? "" : "s") + " (--max-restarts " + std::to_string(options_.max_restarts) + ")";
  }
  const bool replace = options_.restart && not_replaced.empty();
  if (setup_.events) {
    nlohmann::json e = {{"id", id},
                        {"rank", last->rank_of(id)},
                        {"version", last->version},
                        {"what", describe_status(status)},
                        {"replaced", replace}};
    if (WIFSIGNALED(status)) e["signal"] = signal_name(WTERMSIG(status));
    if (WIFEXITED(status)) e["status"] = WEXITSTATUS(status);
    setup_.events->emit("failure", std::move(e));
  }
  report("aikido-run: worker " + std::to_string(id) + " (rank " + std::to_string(last->rank_of(id)) + ") " +
         describe_status(status) + "; removing it from the cluster" + (replace ? " and starting a replacement" : "") +
         not_replaced);
  if (!remove_lost_worker(id, replace)) pending_lost_[id] = replace;
  try {
    reconcile(supervisor);
    const auto latest = membership_->latest();
    for (std::uint64_t running : supervisor.running_workers()) {
      if (latest->contains(running)) return true;
    }
    if (finished_by_) return true;  // the others finished: the failure came too late to lose any work
    if (setup_.hosts && latest->hosts().size() > 1 + std::size_t(latest->workers_on(host_) > 0)) return false;
  } catch (const Error&) {
    return true;  // the store is away: decide once it answers (on_wake retries the removal)
  }
  report(setup_.hosts ? "aikido-run: no worker of the cluster is running on this host"
                      : "aikido-run: no worker of the cluster is running");
  return false;
}

bool ElasticController::remove_lost_worker(std::uint64_t id, bool replace) {
  try {
    for (;;) {
      const auto spec = membership_->latest();
      ClusterSpec next = spec->contains(id) ? spec->without({id}, "lost") : *spec;
      next.version = spec->version + 1;
      const bool adds = replace && next.size() < next.max_size;
      // The replacement runs on this host, after this host's last worker: each host's workers stay contiguous.
      if (adds) next = next.with_workers_on(host_, 1, "restart");
      next.version = spec->version + 1;
      if (next.workers == spec->workers) return true;  // the survivors removed it already, nothing to add
      if (next.workers.empty()) {
        report("aikido-run: no worker is left in the cluster");
        return true;
      }
      next.proposed_unix_ms = unix_ms();
      next.requested_by = "aikido-run";
      if (membership_->propose(next)) {
        report("aikido-run: cluster " + next.describe());
        if (adds) ++restarts_;
        return true;
      }
    }
  } catch (const Error& e) {
    if (pending_lost_.count(id) == 0) {
      report("aikido-run: cannot remove worker " + std::to_string(id) + " from the cluster yet: " + e.what() +
             "; trying again");
    }
    return false;
  }
}

}  // namespace aikido::run
