// Starts the workers of one host and watches them until they have all exited.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

namespace aikido::run {

/// Spawns one process per worker, relays their output with a rank prefix, and stops all of them when one fails
/// or when aikido-run is asked to stop.
///
/// Each worker runs in its own process group (signals reach the processes it starts too) and is killed by the
/// kernel should aikido-run die (PR_SET_PDEATHSIG). Stopping means SIGTERM (and SIGCONT, for stopped workers) to
/// every worker's group, then SIGKILL after the grace period.
class Supervisor {
 public:
  struct Worker {
    int rank = 0;
    /// Environment of the worker, "NAME=value" entries.
    std::vector<std::string> environment;
    /// The CPU the worker is bound to before it starts; -1: not bound.
    int cpu = -1;
  };

  /// Blocks the signals the supervisor handles (SIGCHLD, SIGINT, SIGTERM, SIGHUP) in the calling thread and
  /// ignores SIGPIPE. Call before starting any other thread so that every thread inherits the mask.
  static void block_signals();

  /// `program_path` is executed with `argv` (argv[0] included) by every worker.
  Supervisor(std::string program_path, std::vector<std::string> argv, std::chrono::milliseconds grace);

  /// Starts the workers and returns once all have exited and their output is relayed. Returns aikido-run's exit
  /// status: 0 when every worker succeeded; the first failing worker's status (128 + signal number when it was
  /// killed by a signal); 128 + signal number when aikido-run itself received SIGINT, SIGTERM or SIGHUP.
  int run(const std::vector<Worker>& workers);

 private:
  std::string program_path_;
  std::vector<std::string> argv_;
  std::chrono::milliseconds grace_;
};

}  // namespace aikido::run
