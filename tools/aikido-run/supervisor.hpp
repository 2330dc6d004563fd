// Starts the workers of one host and watches them until they have all exited.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <set>
#include <string>
#include <vector>

namespace aikido::run {

class Supervisor;
class JobEvents;

/// What an elastic job adds to the supervisor: it is woken when its descriptor is readable or every tick, and it
/// decides what a worker's exit means. Called on the supervisor's thread.
class Controller {
 public:
  virtual ~Controller() = default;
  /// Readable when the controller has work (a new cluster version); -1: none.
  virtual int wake_fd() const = 0;
  /// Longest time between two calls of on_wake().
  virtual std::chrono::milliseconds tick() const = 0;
  /// Starts and stops workers through `supervisor` (start_worker, stop_worker, kill_worker).
  virtual void on_wake(Supervisor& supervisor) = 0;
  /// Worker `id` exited with wait status `status`. Returns true when the job goes on without it (a removed
  /// worker, or a lost one the cluster recovers from), false when its failure ends the job.
  virtual bool on_exit(Supervisor& supervisor, std::uint64_t id, int status) = 0;
  /// aikido-run was asked to stop (SIGINT or SIGTERM): true when the controller wants the workers to run a little
  /// longer first (to write a checkpoint); the supervisor then stops them once stop_ready() returns true, after
  /// 10 s at the latest, or at a second signal.
  virtual bool prepare_stop() { return false; }
  virtual bool stop_ready() { return true; }
  /// The workers are stopped before stop_ready() returned true: after 10 s (`why` says so) or at a second signal.
  virtual void stop_preparation_abandoned(const std::string& /*why*/) {}
};

/// Spawns one process per worker, relays their output with a rank prefix, and stops all of them when one fails
/// or when aikido-run is asked to stop.
///
/// Each worker runs in its own process group (signals reach the processes it starts too) and is killed by the
/// kernel should aikido-run die (PR_SET_PDEATHSIG). Stopping means SIGTERM (and SIGCONT, for stopped workers) to
/// every worker's group, then SIGKILL after the grace period.
///
/// Output: a worker's standard output is a pseudo-terminal (in raw mode: bytes pass unchanged) unless
/// Config::stdout_tty is false, because C stdio, C++ iostreams over it, Python and most runtimes flush a terminal
/// line by line but a pipe only when 4 KiB or more have gathered, which delays a worker's lines until it exits.
/// Standard error is a pipe (stdio does not buffer it). Every line goes out prefixed with "[LABEL] "
/// (worker_label: the rank, "RANK|wID" where rank and id differ).
class Supervisor {
 public:
  struct Config {
    /// Executed with `argv` (argv[0] included) by every worker.
    std::string program_path;
    std::vector<std::string> argv;
    /// Between SIGTERM and SIGKILL when workers are stopped.
    std::chrono::milliseconds grace{3000};
    /// Standard output on a pseudo-terminal (true) or a pipe.
    bool stdout_tty = true;
    /// Prefix every line with "[LABEL] " (false: pass lines on as they are, for launchers of other hosts whose
    /// lines carry their workers' labels already).
    bool label_lines = true;
    /// Where "worker_started" and "worker_exited" events go; null: nowhere.
    JobEvents* events = nullptr;
    /// --log-dir: every line of worker ID (both streams, unlabelled) also goes to LOG_DIR/rank-ID.log (ID is the
    /// rank in a static job, the worker id in an elastic one); empty: no files.
    std::string log_dir;
    /// --ranks-filter: only these ranks' lines reach the console (the log files get every line); empty: all.
    std::set<int> console_ranks;
    /// The console is a terminal: progress lines that end with a carriage return are updated in place.
    bool console_tty = false;
  };

  struct Worker {
    int rank = 0;
    /// Identity in an elastic job, which stays while the rank changes; the rank otherwise.
    std::uint64_t id = 0;
    /// Environment of the worker, "NAME=value" entries.
    std::vector<std::string> environment;
    /// The CPUs the worker is bound to before it starts; empty: not bound.
    std::vector<int> cpus;
    /// A program and argv of its own (the launcher of another host); empty: Config's.
    std::string program_path;
    std::vector<std::string> argv;
  };

  /// Blocks the signals the supervisor handles (SIGCHLD, SIGINT, SIGTERM, SIGHUP) in the calling thread and
  /// ignores SIGPIPE. Call before starting any other thread so that every thread inherits the mask.
  static void block_signals();

  explicit Supervisor(Config config);

  /// Starts the workers and returns once all have exited and their output is relayed. Returns aikido-run's exit
  /// status: 0 when every worker succeeded; the first failing worker's status (128 + signal number when it was
  /// killed by a signal); 128 + signal number when aikido-run itself received SIGINT, SIGTERM or SIGHUP.
  int run(const std::vector<Worker>& workers);

  /// Elastic jobs: `controller` decides what exits mean and may start and stop workers while run() runs.
  void set_controller(Controller* controller) { controller_ = controller; }

  // For the controller, from its callbacks only.
  /// Starts one more worker; false when it could not be started (reported).
  bool start_worker(const Worker& worker);
  /// Asks worker `id` to stop (SIGTERM and SIGCONT, SIGKILL after the grace period); no-op when not running.
  void stop_worker(std::uint64_t id);
  /// Kills worker `id` at once (SIGKILL).
  void kill_worker(std::uint64_t id);
  /// Ids of the running workers.
  std::vector<std::uint64_t> running_workers() const;
  /// Process id of running worker `id`, or -1.
  pid_t pid_of(std::uint64_t id) const;
  /// Worker `id` has rank `rank` from now on: its output lines say so.
  void set_rank(std::uint64_t id, int rank);
  /// The job's exit status, unless one was set before (the first failure's status wins).
  void set_exit_code(int code);
  /// Stops every worker (SIGTERM, SIGKILL after the grace period); the job exits with `code` unless an earlier
  /// failure set its status.
  void stop_job(int code);

 private:
  class Loop;

  Config config_;
  Controller* controller_ = nullptr;
  Loop* loop_ = nullptr;
};

}  // namespace aikido::run
