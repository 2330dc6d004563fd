// Command line of aikido-run.
#pragma once

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace aikido::run {

/// A bad command line; the message is printed as is and aikido-run exits with status 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline constexpr int kMaxWorkers = 1024;

/// GLIBC_TUNABLES that workers get unless it is set: keep freed blocks up to 32 MiB in the heap and never trim it
/// below 4 GiB, so that training loops reuse memory instead of faulting in fresh pages every step.
inline constexpr const char* kMallocTunables =
    "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296";

struct Options {
  bool help = false;
  int np = 0;
  // Validated values of the optional flags, passed to the workers as AIKIDO_* when given.
  std::optional<std::string> topology;
  std::optional<std::string> timeout;
  std::optional<std::string> transport;
  std::optional<std::string> segment_bytes;
  // Metrics exporters (metrics_exporter.hpp): Prometheus over HTTP on 127.0.0.1:port, JSON lines to a file.
  std::optional<int> metrics_port;
  std::optional<std::string> metrics_file;
  double metrics_interval = 1.0;  // seconds
  // Elastic jobs (--elastic): membership in the store, resizes, recovery from lost workers.
  bool elastic = false;
  int min_np = 1;
  int max_np = 0;  // 0: -np
  bool restart = false;
  int max_restarts = 10;  // replacements --restart starts in one job
  std::string control_file;
  double heartbeat_timeout_s = 3.0;
  std::string checkpoint;
  std::string resume;  // a checkpoint the job starts from
  /// Bind each worker to one CPU (the launcher's allowed CPUs, in order) when there are no more workers than CPUs.
  bool bind_to_core = true;
  /// Seconds between SIGTERM and SIGKILL when workers are stopped.
  double grace_period_s = 3.0;
  /// Workers' standard output on a pseudo-terminal (line-buffered by C stdio), else a pipe.
  bool stdout_tty = true;
  /// PROGRAM as given, and the file it resolved to (PATH lookup like execvp).
  std::string program;
  std::string program_path;
  /// PROGRAM ARGS...: argv of each worker.
  std::vector<std::string> argv;
};

/// Parses and validates the command line, resolving PROGRAM. Throws UsageError with a message that starts with
/// "aikido-run: " and says what to fix.
Options parse_options(int argc, char** argv);

/// The text printed by --help.
std::string usage();

/// Resolves `program` like execvp: names with a '/' are taken as paths, others are searched in PATH. Throws
/// UsageError when nothing executable is found.
std::string find_program(const std::string& program);

}  // namespace aikido::run
