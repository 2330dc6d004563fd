// Command line of aikido-run.
#pragma once

#include <aikido/tls.hpp>

#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
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
  std::optional<std::string> connect_timeout;  // --connect-timeout: AIKIDO_CONNECT_TIMEOUT
  std::optional<std::string> store_timeout;    // --store-timeout: AIKIDO_STORE_TIMEOUT
  std::optional<std::string> transport;
  std::optional<std::string> segment_bytes;
  std::optional<std::string> streams;
  // Metrics exporters (metrics_exporter.hpp): Prometheus over HTTP on 127.0.0.1:port, JSON lines to a file.
  std::optional<int> metrics_port;
  std::optional<std::string> metrics_file;
  double metrics_interval = 1.0;  // seconds
  /// --log-dir: each worker's lines also in DIR/rank-N.log, aikido-run's events in DIR/events.jsonl.
  std::string log_dir;
  /// --ranks-filter / --quiet-ranks: the ranks whose lines reach the console; empty: all.
  std::set<int> console_ranks;
  /// --timeline F: a Chrome trace of the job (collectives, step phases, elastic and policy events).
  std::string timeline;
  /// --dashboard PORT: the live page on http://ADDRESS:PORT/ (0: a free port); --dashboard-address ADDRESS.
  std::optional<int> dashboard_port;
  std::string dashboard_address = "127.0.0.1";
  /// --replay F (with --dashboard): shows the run that --metrics-file F recorded instead of running PROGRAM.
  std::string replay;
  // Elastic jobs (--elastic): membership in the store, resizes, recovery from lost workers.
  bool elastic = false;
  int min_np = 1;
  int max_np = 0;  // 0: -np
  bool restart = false;
  int max_restarts = 10;  // replacements --restart starts in one job
  std::string control_file;
  double heartbeat_timeout_s = 3.0;
  double connect_timeout_s = 30.0;  // the workers' deadline of joining a cluster version (--connect-timeout)  //
                                    // without --heartbeat-timeout: 3, or half the collective timeout when shorter
  std::string checkpoint;
  std::string resume;  // a checkpoint the job starts from
  /// Bind each worker to one CPU (the launcher's allowed CPUs, in order) when there are no more workers than CPUs.
  bool bind_to_core = true;
  /// Seconds between SIGTERM and SIGKILL when workers are stopped.
  double grace_period_s = 3.0;
  /// Workers' standard output on a pseudo-terminal (line-buffered by C stdio), else a pipe.
  bool stdout_tty = true;
  // Jobs across hosts. One launcher per host (torchrun's spellings): --nnodes MIN[:MAX] with --nproc-per-node K,
  // --store and --job-id; or all of them started from here (Horovod's spellings): -H h1:2,h2:2 or --hostfile F.
  /// --nnodes MIN:MAX (MIN == MAX for N); unset: a job on this host alone.
  std::optional<std::pair<int, int>> nnodes;
  int nproc_per_node = 1;
  /// --node-rank I: this host's place in a job whose store is not etcd (hosts ordered by it).
  int node_rank = -1;
  /// The job's store: "etcd://H1:P1,..." (etcds:// for TLS) or "tcp://HOST:PORT" (the store node 0 serves).
  std::string store;
  std::string job_id;
  /// The address this host's workers listen on and publish (--host-address), or the interface to take it from
  /// (--iface, NCCL's forms: eth0, ^lo,docker0, =eth0); this host's id in the job (--host-id; its host name).
  std::string host_address;
  std::string iface;
  std::string host_id;
  double join_timeout_s = 300;
  double host_timeout_s = 5;
  /// A file whose first line is the job secret, shared by every host (--secret-file, AIKIDO_SECRET_FILE).
  std::string secret_file;
  /// etcd's TLS and authentication (--store-ca, --store-cert, --store-key, --store-credentials).
  std::string store_ca;
  std::string store_cert;
  std::string store_key;
  std::string store_credentials;
  /// TLS on every TCP connection of the job (--tls, --tls-cert, --tls-key, --tls-ca; else AIKIDO_TLS...).
  TlsOptions tls;
  /// -H / --hostfile: start one launcher per host through --launch-command (ssh by default).
  std::string host_list;
  std::string hostfile;
  std::string launch_command;

  /// True for a launcher of one host of a job across hosts (--nnodes).
  bool across_hosts() const { return nnodes.has_value(); }
  /// True when this aikido-run starts the launchers of other hosts (-H, --hostfile).
  bool starts_hosts() const { return !host_list.empty() || !hostfile.empty(); }

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
