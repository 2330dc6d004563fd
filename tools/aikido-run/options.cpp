#include "options.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <aikido/peer.hpp>
#include <aikido/types.hpp>
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string_view>

#include "base/env.hpp"

namespace aikido::run {
namespace {

// `value` as a whole decimal integer within [min, max]; nullopt when it is not one.
std::optional<long long> integer_in(const std::string& value, long long min, long long max) {
  errno = 0;
  char* end = nullptr;
  const long long n = std::strtoll(value.c_str(), &end, 10);
  if (value.empty() || errno != 0 || *end != '\0' || n < min || n > max) return std::nullopt;
  return n;
}

void parse_np(const std::string& flag, const std::string& value, int* np) {
  const auto n = integer_in(value, 1, kMaxWorkers);
  if (!n) {
    throw UsageError("aikido-run: " + flag + " '" + value + "' is not a positive integer (at most " +
                     std::to_string(kMaxWorkers) + ")");
  }
  *np = int(*n);
}

int check_port(const std::string& value, const std::string& flag = "--metrics-port") {
  const auto port = integer_in(value, 0, 65535);
  if (!port) {
    throw UsageError("aikido-run: " + flag + " '" + value + "' is not a port number (0..65535; 0 picks a free one)");
  }
  return int(*port);
}

// A list of ranks: "0", "0,2", "0-3,6".
std::set<int> parse_ranks(const std::string& flag, const std::string& value) {
  std::set<int> ranks;
  std::size_t begin = 0;
  while (begin <= value.size()) {
    const std::size_t end = std::min(value.find(',', begin), value.size());
    const std::string item = value.substr(begin, end - begin);
    const auto dash = item.find('-', 1);
    const auto first = integer_in(item.substr(0, dash), 0, kMaxWorkers - 1);
    const auto last = dash == std::string::npos ? first : integer_in(item.substr(dash + 1), 0, kMaxWorkers - 1);
    if (!first || !last || *first > *last) {
      throw UsageError("aikido-run: " + flag + " '" + value +
                       "' is not a list of ranks: R, R1,R2 or FIRST-LAST (ranks 0.." + std::to_string(kMaxWorkers - 1) +
                       "), e.g. 0 or 0,2-3");
    }
    for (long long r = *first; r <= *last; ++r) ranks.insert(int(r));
    begin = end + 1;
  }
  return ranks;
}

std::string check_seconds(const std::string& value, const std::string& flag = "--timeout") {
  errno = 0;
  char* end = nullptr;
  const double seconds = std::strtod(value.c_str(), &end);
  if (value.empty() || errno != 0 || *end != '\0' || !(seconds > 0) || !std::isfinite(seconds)) {
    throw UsageError("aikido-run: " + flag + " '" + value + "' is not a positive number of seconds");
  }
  return value;
}

std::string check_segment_bytes(const std::string& value) {
  if (value != "0" && !integer_in(value, env::kMinSegmentBytes, env::kMaxSegmentBytes)) {
    throw UsageError("aikido-run: --segment-bytes '" + value + "' is not a number of bytes from " +
                     std::to_string(env::kMinSegmentBytes) + " to " + std::to_string(env::kMaxSegmentBytes) +
                     ", or 0 (chosen per link)");
  }
  return value;
}

std::string check_streams(const std::string& value) {
  if (!integer_in(value, 0, 8)) {
    throw UsageError("aikido-run: --streams '" + value +
                     "' is not a number of TCP streams from 1 to 8, or 0 (chosen by measuring the link)");
  }
  return value;
}

std::string check_topology(const std::string& value) {
  try {
    parse_topology(value);
  } catch (const Error& e) {
    throw UsageError(std::string("aikido-run: --topology: ") + e.what());
  }
  return value;
}

std::string check_transport(const std::string& value) {
  try {
    parse_transport(value);
  } catch (const Error& e) {
    throw UsageError(std::string("aikido-run: --transport: ") + e.what());
  }
  return value;
}

int parse_count(const std::string& flag, const std::string& value) {
  int n = 0;
  parse_np(flag, value, &n);
  return n;
}

int parse_restarts(const std::string& value) {
  const auto n = integer_in(value, 0, 1'000'000);
  if (!n) throw UsageError("aikido-run: --max-restarts '" + value + "' is not a number of replacements (0 or more)");
  return int(*n);
}

// --nnodes N or MIN:MAX.
std::pair<int, int> parse_nnodes(const std::string& value) {
  const auto colon = value.find(':');
  const auto min = integer_in(value.substr(0, colon), 1, kMaxWorkers);
  const auto max = colon == std::string::npos ? min : integer_in(value.substr(colon + 1), 1, kMaxWorkers);
  if (!min || !max) {
    throw UsageError("aikido-run: --nnodes '" + value + "' is not N or MIN:MAX (numbers of hosts, 1.." +
                     std::to_string(kMaxWorkers) + ")");
  }
  if (*min > *max) {
    throw UsageError("aikido-run: --nnodes " + value + ": the minimum " + std::to_string(*min) +
                     " is above the maximum " + std::to_string(*max));
  }
  return {int(*min), int(*max)};
}

std::string nonempty(const std::string& flag, const std::string& value, const char* what) {
  if (value.empty()) throw UsageError("aikido-run: " + flag + " needs " + what);
  return value;
}

std::string readable_file(const std::string& flag, const std::string& value) {
  nonempty(flag, value, "a file name");
  if (::access(value.c_str(), R_OK) != 0) {
    throw UsageError("aikido-run: " + flag + " " + value + ": cannot read it (" + std::strerror(errno) + ")");
  }
  return value;
}

// --tls and its files over AIKIDO_TLS and its files from aikido-run's environment; the files go together.
TlsOptions resolve_tls(bool flag, const TlsOptions& files) {
  TlsOptions tls;
  try {
    tls = TlsOptions::from_env();
  } catch (const ConfigError& e) {
    throw UsageError(std::string("aikido-run: ") + e.what());
  }
  const int given = int(!files.cert_file.empty()) + int(!files.key_file.empty()) + int(!files.ca_file.empty());
  if (given != 0 && given != 3) {
    throw UsageError(
        "aikido-run: TLS with certificates of your own needs all of --tls-cert, --tls-key and --tls-ca (without "
        "them, --tls derives one certificate from the job secret)");
  }
  if (given == 3) {
    // Absolute, for workers started in another directory (and other hosts' launchers).
    tls.cert_file = std::filesystem::absolute(files.cert_file).string();
    tls.key_file = std::filesystem::absolute(files.key_file).string();
    tls.ca_file = std::filesystem::absolute(files.ca_file).string();
  }
  tls.enabled = tls.enabled || flag || given == 3;
  return tls;
}

// The timeouts, from the shortest to the longest (README, "Timeouts"): the heartbeat (a stopped worker is found by its
// silence), the host lease (a lost host leaves the membership), each store request, then the collective deadline,
// which must outlast them all, or survivors fail with TimeoutError before the launcher has told them who is gone.
// Settings that break the order are refused here, before any worker starts.
void check_timeouts(Options& options, bool heartbeat_given) {
  auto seconds_of = [](const std::optional<std::string>& flag, const char* variable, double fallback) {
    if (flag) return std::stod(*flag);
    const char* value = std::getenv(variable);
    if (value && *value && !env::check_setting(variable, value)) return std::stod(value);
    return fallback;
  };
  const double collective = seconds_of(options.timeout, env::kTimeout, env::kDefaultTimeout.count() / 1000.0);
  const double store = seconds_of(options.store_timeout, env::kStoreTimeout, collective);
  options.connect_timeout_s = seconds_of(options.connect_timeout, env::kConnectTimeout, collective);
  auto text = [](double s) {
    std::ostringstream out;
    out << s << " s";
    return out.str();
  };
  if (store > collective) {
    throw UsageError("aikido-run: the store timeout (" + text(store) + ") is longer than the collective timeout (" +
                     text(collective) + "); a store request must end before the collectives that wait on it. Lower " +
                     "--store-timeout (AIKIDO_STORE_TIMEOUT) or raise --timeout");
  }
  if (options.elastic) {
    constexpr double kMinHeartbeat = 0.5;  // two beats of the sessions' 250 ms heartbeat
    if (!heartbeat_given) options.heartbeat_timeout_s = std::min(options.heartbeat_timeout_s, collective / 2);
    if (options.heartbeat_timeout_s < kMinHeartbeat) {
      throw UsageError("aikido-run: --heartbeat-timeout " + text(options.heartbeat_timeout_s) +
                       " is shorter than two heartbeats (workers beat every 0.25 s): healthy workers would be " +
                       "killed. Give at least 0.5" + (heartbeat_given ? "" : ", or raise --timeout"));
    }
    if (options.heartbeat_timeout_s >= collective) {
      throw UsageError("aikido-run: --heartbeat-timeout " + text(options.heartbeat_timeout_s) +
                       " is not shorter than the collective timeout (" + text(collective) +
                       "): a stopped worker would make the others' collectives time out before the launcher " +
                       "finds it. Lower --heartbeat-timeout or raise --timeout");
    }
  }
  if (options.across_hosts() && options.host_timeout_s >= collective) {
    throw UsageError("aikido-run: --host-timeout " + text(options.host_timeout_s) +
                     " is not shorter than the collective timeout (" + text(collective) +
                     "): a lost host would make the other hosts' collectives time out before it leaves the " +
                     "membership. Lower --host-timeout or raise --timeout");
  }
}

// The rules of jobs across hosts (--nnodes on every host, or -H / --hostfile from one).
void check_hosts_options(Options& options, bool have_np, const std::vector<std::string>& host_flags) {
  const bool across = options.across_hosts();
  const bool starts = options.starts_hosts();
  if (!options.host_list.empty() && !options.hostfile.empty()) {
    throw UsageError("aikido-run: give the hosts with -H or with --hostfile, not both");
  }
  if (across && starts) {
    throw UsageError(
        "aikido-run: -H and --hostfile start aikido-run on every host from here; --nnodes is for starting it on "
        "each host yourself: give one or the other");
  }
  if (!across && !starts && !host_flags.empty()) {
    throw UsageError("aikido-run: " + host_flags.front() + " is for jobs across hosts: it needs --nnodes (or -H)");
  }
  if (!options.host_address.empty() && !options.iface.empty()) {
    throw UsageError("aikido-run: give this host's address with --host-address or --iface, not both");
  }
  const bool etcd = options.store.starts_with("etcd://") || options.store.starts_with("etcds://");
  if (!options.store.empty() && !etcd && !options.store.starts_with("tcp://")) {
    throw UsageError("aikido-run: --store '" + options.store +
                     "' is not etcd://HOST:PORT[,HOST:PORT...] (etcds:// for TLS) or tcp://HOST:PORT");
  }
  if (options.elastic && (across || starts) && !etcd) {
    throw UsageError(
        "aikido-run: an elastic job across hosts needs etcd as its store, which keeps the membership while hosts "
        "come and go: --store etcd://HOST:PORT");
  }
  if (starts) {
    if (!have_np) throw UsageError("aikido-run: -H and --hostfile need -np N, the number of workers to start");
    if (options.node_rank >= 0) throw UsageError("aikido-run: --node-rank is given to each host by -H itself");
    return;
  }
  if (!across) return;
  if (have_np) {
    throw UsageError(
        "aikido-run: -np does not go with --nnodes: give the workers of each host with --nproc-per-node K");
  }
  const auto [min_hosts, max_hosts] = *options.nnodes;
  if (options.store.empty()) {
    throw UsageError(
        "aikido-run: --nnodes needs --store: etcd://HOST:PORT[,HOST:PORT...] (every job across hosts; needed when "
        "hosts may come and go), or tcp://HOST:PORT (a fixed set of hosts, with --node-rank; node 0 serves it)");
  }
  if (etcd) {
    if (options.job_id.empty()) {
      throw UsageError("aikido-run: --nnodes with an etcd store needs --job-id ID, the same on every host");
    }
    if (options.node_rank >= 0) {
      throw UsageError("aikido-run: --node-rank is for stores other than etcd (etcd orders hosts as they join)");
    }
    options.elastic = true;  // the workers follow the membership in etcd
  } else {
    if (min_hosts != max_hosts) {
      throw UsageError("aikido-run: --nnodes " + std::to_string(min_hosts) + ":" + std::to_string(max_hosts) +
                       " lets hosts come and go, which needs etcd as the store: --store etcd://HOST:PORT");
    }
    if (options.node_rank < 0 || options.node_rank >= max_hosts) {
      throw UsageError("aikido-run: --store " + options.store + " needs --node-rank I, this host's place (0.." +
                       std::to_string(max_hosts - 1) + "); node 0 serves the store");
    }
  }
  if (options.job_id.empty()) options.job_id = "aikido";
  options.np = options.nproc_per_node;
  options.min_np = min_hosts * options.nproc_per_node;
  options.max_np = max_hosts * options.nproc_per_node;
}

bool is_executable_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(path.c_str(), X_OK) == 0;
}

}  // namespace

std::string usage() {
  return R"(usage: aikido-run -np N [options] PROGRAM [ARGS...]
       aikido-run --nnodes MIN[:MAX] --nproc-per-node K --store URL --job-id ID --secret-file F [options] PROGRAM ...
       aikido-run -np N -H HOST:SLOTS,... | --hostfile F --secret-file F [options] PROGRAM [ARGS...]
       aikido-run --dashboard PORT --replay F

Starts N workers of PROGRAM on this host, each with the environment of one rank of an Aikido cluster, serves
their rendezvous store, and prefixes every line they print with "[RANK] " (in an elastic job, where a worker's
rank changes while its id stays, "[RANK|wID] " once they differ: "[2|w3] " is rank 2, worker 3). The second form
runs on every host of a job across hosts, the third starts it on every host from here (see "Jobs across hosts").

options:
  -np N, -n N           number of workers to start (required; 1..1024)
  --topology T          collective topology: ring, tree, star, hierarchical,
                        multi-ring or auto (chosen from measured links)          (sets AIKIDO_TOPOLOGY)
  --timeout S           deadline of each collective, in seconds                  (sets AIKIDO_TIMEOUT)
  --connect-timeout S   deadline of joining the cluster (addresses, connections, handshakes)
                        (default: --timeout)                                     (sets AIKIDO_CONNECT_TIMEOUT)
  --store-timeout S     deadline of each request to the rendezvous store (default: --timeout; at most
                        --timeout)                                               (sets AIKIDO_STORE_TIMEOUT)
  --transport K         same-host transport: auto, tcp or unix                   (sets AIKIDO_TRANSPORT)
  --segment-bytes B     pipelining segment size in bytes; 0 (default): chosen per link from its measured
                        bandwidth                                                (sets AIKIDO_SEGMENT_BYTES)
  --streams N           TCP connections between two workers on different hosts, 1..8; 0 (default):
                        chosen by measuring the link at connection setup         (sets AIKIDO_STREAMS)
  --tls                 TLS 1.3 on every TCP connection of the job: between workers and to the store this
                        aikido-run serves (same-host shared memory and Unix sockets stay plain). Every side
                        uses a certificate derived from the job secret unless the three files below are given.
                        Recommended across hosts                                 (sets AIKIDO_TLS)
  --tls-cert F, --tls-key F, --tls-ca F
                        TLS with certificates of your own (implies --tls): this host's certificate and key
                        (PEM) and the CA that signed every host's certificate (mutual TLS)
                                                              (sets AIKIDO_TLS_CERT, AIKIDO_TLS_KEY, AIKIDO_TLS_CA)
  --metrics-port P      serve every worker's training metrics in Prometheus text format on
                        http://127.0.0.1:P/metrics (0: a free port, printed at start)
  --metrics-file F      append every worker's training metrics to F as JSON lines
  --metrics-interval S  seconds between metrics updates (default 1)            (sets AIKIDO_METRICS_INTERVAL)
                        Across hosts every worker publishes its metrics, so that these flags on any one
                        host's aikido-run cover the whole job
  --dashboard PORT      serve a live dashboard of the job on http://127.0.0.1:PORT/ (0: a free port; the URL
                        is printed at start): throughput, step time split per worker (stragglers marked), loss
                        and accuracy, cluster size, gradient statistics, links, job state, with every resize,
                        failure, recovery, checkpoint and policy decision annotated. Updates every metrics
                        interval (server-sent events). Combine with --metrics-file to record what it shows
  --dashboard-address A serve the dashboard on address A instead of 127.0.0.1 (anyone who reaches A:PORT sees
                        it: there is no login)
  --replay F            with --dashboard: show the finished run recorded in F by --metrics-file (no PROGRAM);
                        runs until interrupted (Ctrl-C)
  --log-dir DIR         also write each worker's output (stdout and stderr, unlabelled) to DIR/rank-N.log (N:
                        the rank; in an elastic job the worker id, which stays while the rank changes), and
                        aikido-run's own events and messages to DIR/events.jsonl (JSON lines); DIR is created
  --ranks-filter LIST   show only these ranks' lines on the console (like torchrun's --local-ranks-filter):
                        0, 0,2 or 0-3; the log files of --log-dir still get every line
  --quiet-ranks LIST    the opposite: show every rank's lines but these
  --timeline F          write a Chrome trace of the job to F when it ends (JSON; open it in Perfetto or
                        chrome://tracing): per worker, every collective (name, bytes, algorithm; posted,
                        started, finished), the phases of every training step (forward and backward,
                        communication, wait, optimizer), and the job's elastic and policy events (sets
                        AIKIDO_TIMELINE)
  --elastic             the job's membership may change while it runs: workers follow a versioned cluster
                        spec in the job's store (aikido::ElasticSession); see "Elastic jobs" below
  --min-np A            elastic: fewest workers the job runs with (default 1)
  --max-np B            elastic: most workers the job may grow to (default: N)
  --restart             elastic: start a replacement for every worker that crashes or stops responding, until
                        one member has finished the training
  --max-restarts R      elastic: start at most R replacements in the job (default 10; 0: none)
  --control-file F      elastic: write the control endpoint and the job secret to F (mode 0600) for aikido-ctl
  --heartbeat-timeout S elastic: a worker whose heartbeat is silent this long is killed and replaced
                        (default 3, or half of --timeout when that is shorter; at least 0.5, below --timeout);
                        one that left its session and is stopped (SIGSTOP) this long is killed
  --checkpoint F        elastic: where rank 0 writes the last commit when the job stops below --min-np or
                        is stopped by SIGINT or SIGTERM (sets AIKIDO_CHECKPOINT)
  --resume F            elastic: start from the checkpoint F (written by --checkpoint) instead of the
                        program's initial state; the program must register the same state (sets AIKIDO_RESUME)
  --bind-to W           core (default): when there are no more workers than CPUs, bind each worker to its own
                        block of the CPUs aikido-run may use (CPUs / N each), so that waiting workers spin on
                        their own cores; none: do not bind (elastic jobs never bind)
  --stdout K            tty (default): each worker's standard output is a pseudo-terminal, so that C stdio,
                        iostreams and most runtimes pass on each line at once (on a pipe, stdio holds output
                        back until 4 KiB gather or the program exits); pipe: a pipe, for programs that behave
                        differently on a terminal (colours, progress bars). Standard error is always a pipe
  --grace-period S      seconds between SIGTERM and SIGKILL when aikido-run stops workers (default 3)

jobs across hosts (one aikido-run per host):
  --nnodes MIN[:MAX]    the job runs on MIN to MAX hosts (N: N:N); it starts once MIN hosts have joined; with MIN <
                        MAX hosts may join a running job and be lost (then the store must be etcd)
  --nproc-per-node K    workers on this host (default 1)
  --store URL           etcd://HOST:PORT[,HOST:PORT...] (etcds:// for TLS): the launchers find each other there and
                        it holds the job's membership; or tcp://HOST:PORT for a fixed set of hosts (with
                        --node-rank; node 0 serves this store on its address)
  --job-id ID           the job's name in the store, the same on every host (with etcd: required)
  --node-rank I         with a tcp:// store: this host's place, 0..N-1 (ranks follow it)
  --host-address A      the address this host's workers listen on (default: the interface that routes to the
                        store's host); never a loopback address when other hosts must reach it
  --iface NAME          take that address from an interface: eth0, a prefix (eth), =eth0 exact, ^lo,docker0 all but
  --host-id ID          this host's id in the job (default: its host name); two launchers cannot share one
  --join-timeout S      how long to wait for MIN hosts (default 300)
  --host-timeout S      a host whose launcher is silent this long (killed, cut off) is removed (default 5)
  --secret-file F       the job secret, the first line of F, the same on every host (AIKIDO_SECRET_FILE); a job
                        across hosts needs one: openssl rand -hex 32 > F
  --store-ca F, --store-cert F, --store-key F
                        etcd's TLS: the CA of its servers, and a client certificate and key
  --store-credentials F etcd's authentication: a file of user=NAME and password=SECRET lines
jobs across hosts started from here:
  -H HOST:SLOTS,...     start aikido-run on these hosts, -np workers placed host by host (like mpirun)
  --hostfile F          the hosts, one per line: HOST slots=N
  --launch-command CMD  how to start a command on a host (default: ssh); CMD HOST 'COMMAND LINE' must run it
  -h, --help            print this help and exit
  --                    end of options (use when PROGRAM starts with '-')

Options take their value as the next argument or after '=' (--timeout=5). Options not given on the command line
pass through from aikido-run's own environment (AIKIDO_TOPOLOGY, AIKIDO_TIMEOUT, AIKIDO_LOG_LEVEL, ...); aikido-run
checks them like the options and exits with status 2, starting no worker, when one has a bad value.

Each worker gets AIKIDO_RANK, AIKIDO_SIZE, AIKIDO_LOCAL_RANK, AIKIDO_LOCAL_SIZE, AIKIDO_HOST, AIKIDO_STORE_ADDR,
AIKIDO_SECRET (a fresh random job secret), AIKIDO_JOB_ID (a fresh random id) and AIKIDO_CLUSTER_VERSION=0.
Unless aikido-run's own environment sets them, workers also get settings for their numeric libraries:
  OMP_NUM_THREADS                         this host's cores divided by the number of workers (at least 1), so that
                                          workers sharing the host do not oversubscribe its cores; with it
                                          AIKIDO_AUTO_THREADS=1, by which the LibTorch integration keeps that share
                                          as an elastic job grows and shrinks
  OPENBLAS_NUM_THREADS=1                  BLAS runs inside those threads (threads of its own would oversubscribe)
  GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296
                                          malloc keeps large freed blocks for reuse instead of returning them to
                                          the kernel (fresh pages cost a page fault each)
Workers read standard input from /dev/null; their standard output is a terminal (see --stdout).

Training metrics (gradient noise scale, variance, SNR, throughput, step time split; see the README) come from
workers that use the LibTorch integration's DistributedOptimizer. With --metrics-port or --metrics-file, workers
publish them to aikido-run every interval; at the end aikido-run prints a summary line per worker on stderr.
In an elastic job only the ranks of the latest cluster version are served and summarised.

Elastic jobs (--elastic): the program opens an aikido::ElasticSession (ElasticSession::from_env()), which follows
the job's cluster spec, sends the training state to new workers and rolls it back after a lost worker. aikido-run
publishes version 0 with N workers, starts the workers a new version adds (aikido-ctl resize, a policy), stops
those it removes if they do not leave, and removes a worker that crashes or whose heartbeat stops (with --restart
it starts a replacement). A program whose workers join with a plain aikido::Peer instead is named at once (a worker
without any session, after 10 s): it runs like a static job, aikido-ctl refuses to resize it, a lost worker ends it,
--checkpoint writes nothing and --resume stops it.

Jobs across hosts: every host runs aikido-run --nnodes with the same --store, --job-id and --secret-file. With
etcd, the launchers join through it (an etcd lease of --host-timeout keeps each host's place): version 0 of the
cluster has the workers of the first hosts to join, host by host (ranks r..r+K-1 share a host), a host that joins
later is added at the workers' next step boundary, a host whose launcher exits, is killed or is cut off from etcd
is removed, and a launcher that finds its host removed stops its workers and exits with status 1. The workers
follow the membership as in an elastic job (AIKIDO_ELASTIC=1), listen on --host-address, and reach the store as
AIKIDO_STORE. etcd may restart or change leader while the job trains: the workers do not wait for it. -H and
--hostfile start those launchers through --launch-command; without --store, this aikido-run serves a tcp:// store
for a job of fixed size. aikido-ctl --store URL --job-id ID --secret-file F inspects and resizes such a job.

When a worker exits with a non-zero status or is killed by a signal, aikido-run reports it, stops the other
workers (SIGTERM, then SIGKILL after --grace-period, 3 s) and exits with that worker's status (128 + signal number
for a signal). On SIGINT or SIGTERM it stops all workers the same way and exits with 130 or 143; a second signal
kills them at once (an elastic job with --checkpoint first has rank 0 write its last commit, up to 10 s; then
a second signal stops the workers, a third kills them). A bad command line exits with status 2.
)";
}

std::string find_program(const std::string& program) {
  if (program.find('/') != std::string::npos) {
    struct stat st {};
    if (::stat(program.c_str(), &st) != 0) throw UsageError("aikido-run: program '" + program + "' does not exist");
    if (!S_ISREG(st.st_mode) || ::access(program.c_str(), X_OK) != 0) {
      throw UsageError("aikido-run: program '" + program + "' is not an executable file");
    }
    return program;
  }
  const char* env_path = std::getenv("PATH");
  const std::string path = env_path != nullptr ? env_path : "/usr/local/bin:/usr/bin:/bin";
  std::size_t begin = 0;
  for (;;) {
    const std::size_t end = std::min(path.find(':', begin), path.size());
    std::string dir = path.substr(begin, end - begin);
    if (dir.empty()) dir = ".";  // an empty PATH entry means the current directory
    const std::string candidate = dir + "/" + program;
    if (is_executable_file(candidate)) return candidate;
    if (end == path.size()) break;
    begin = end + 1;
  }
  throw UsageError("aikido-run: program '" + program + "' not found in PATH");
}

Options parse_options(int argc, char** argv) {
  Options options;
  bool have_np = false;
  bool heartbeat_given = false;
  bool max_restarts_given = false;
  bool tls_flag = false;
  TlsOptions tls_files;
  std::vector<std::string> elastic_flags;
  std::vector<std::string> host_flags;
  int i = 1;
  for (; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--") {
      ++i;
      break;
    }
    if (arg.size() < 2 || arg[0] != '-') break;  // PROGRAM
    if (arg == "-h" || arg == "--help") {
      options.help = true;
      return options;
    }
    std::string flag = arg;
    std::optional<std::string> value;
    if (const auto eq = arg.find('='); eq != std::string::npos) {
      flag = arg.substr(0, eq);
      value = arg.substr(eq + 1);
    }
    if (flag == "--replay" && !value && i + 1 < argc) value = argv[++i];
    if (flag == "--replay") {
      // A replay runs no program: the rest of the command line is not needed.
      options.replay = readable_file(flag, value.value_or(""));
      continue;
    }
    if (flag == "--elastic" || flag == "--restart" || flag == "--tls") {
      if (value) throw UsageError("aikido-run: option " + flag + " takes no value");
      (flag == "--elastic" ? options.elastic : flag == "--tls" ? tls_flag : options.restart) = true;
      continue;
    }
    const bool known =
        flag == "-np" || flag == "--np" || flag == "-n" || flag == "--topology" || flag == "--timeout" ||
        flag == "--connect-timeout" || flag == "--store-timeout" || flag == "--transport" ||
        flag == "--segment-bytes" || flag == "--streams" || flag == "--metrics-port" || flag == "--metrics-file" ||
        flag == "--metrics-interval" || flag == "--min-np" || flag == "--max-np" || flag == "--control-file" ||
        flag == "--heartbeat-timeout" || flag == "--checkpoint" || flag == "--resume" || flag == "--bind-to" ||
        flag == "--max-restarts" || flag == "--grace-period" || flag == "--stdout" || flag == "--nnodes" ||
        flag == "--nproc-per-node" || flag == "--node-rank" || flag == "--store" || flag == "--job-id" ||
        flag == "--host-address" || flag == "--iface" || flag == "--host-id" || flag == "--join-timeout" ||
        flag == "--host-timeout" || flag == "--secret-file" || flag == "--store-ca" || flag == "--store-cert" ||
        flag == "--store-key" || flag == "--store-credentials" || flag == "-H" || flag == "--hosts" ||
        flag == "--hostfile" || flag == "--launch-command" || flag == "--log-dir" || flag == "--ranks-filter" ||
        flag == "--quiet-ranks" || flag == "--timeline" || flag == "--dashboard" || flag == "--dashboard-address" ||
        flag == "--tls-cert" || flag == "--tls-key" || flag == "--tls-ca";
    if (!known) throw UsageError("aikido-run: unknown option '" + arg + "'; see aikido-run --help");
    if (!value) {
      if (i + 1 >= argc) throw UsageError("aikido-run: option " + flag + " needs a value; see aikido-run --help");
      value = argv[++i];
    }
    const bool host_flag =
        flag != "--nnodes" && flag != "-H" && flag != "--hosts" && flag != "--hostfile" &&
        (flag == "--nproc-per-node" || flag == "--node-rank" || flag == "--store" || flag == "--job-id" ||
         flag == "--host-address" || flag == "--iface" || flag == "--host-id" || flag == "--join-timeout" ||
         flag == "--host-timeout" || flag == "--secret-file" ||
         (flag.starts_with("--store-") && flag != "--store-timeout") || flag == "--launch-command");
    if (host_flag) host_flags.push_back(flag);
    if (flag == "-np" || flag == "--np" || flag == "-n") {
      parse_np(flag, *value, &options.np);
      have_np = true;
    } else if (flag == "--nnodes") {
      options.nnodes = parse_nnodes(*value);
    } else if (flag == "--nproc-per-node") {
      options.nproc_per_node = parse_count(flag, *value);
    } else if (flag == "--node-rank") {
      const auto n = integer_in(*value, 0, kMaxWorkers - 1);
      if (!n) throw UsageError("aikido-run: --node-rank '" + *value + "' is not a host index (0 or more)");
      options.node_rank = int(*n);
    } else if (flag == "--store") {
      options.store = nonempty(flag, *value, "a URL (etcd://HOST:PORT or tcp://HOST:PORT)");
    } else if (flag == "--job-id") {
      options.job_id = nonempty(flag, *value, "an id");
      if (options.job_id.find_first_of(" /\n") != std::string::npos) {
        throw UsageError("aikido-run: --job-id '" + *value + "' must not contain spaces or '/'");
      }
    } else if (flag == "--host-address") {
      options.host_address = nonempty(flag, *value, "an IPv4 address");
    } else if (flag == "--iface") {
      options.iface = nonempty(flag, *value, "an interface name (eth0, ^lo,docker0, =eth0)");
    } else if (flag == "--host-id") {
      options.host_id = nonempty(flag, *value, "an id");
      if (options.host_id.find_first_of(" /\n") != std::string::npos) {
        throw UsageError("aikido-run: --host-id '" + *value + "' must not contain spaces or '/'");
      }
    } else if (flag == "--join-timeout") {
      options.join_timeout_s = std::stod(check_seconds(*value, flag));
    } else if (flag == "--host-timeout") {
      options.host_timeout_s = std::stod(check_seconds(*value, flag));
    } else if (flag == "--secret-file") {
      options.secret_file = readable_file(flag, *value);
    } else if (flag == "--store-ca") {
      options.store_ca = readable_file(flag, *value);
    } else if (flag == "--store-cert") {
      options.store_cert = readable_file(flag, *value);
    } else if (flag == "--store-key") {
      options.store_key = readable_file(flag, *value);
    } else if (flag == "--tls-cert") {
      tls_files.cert_file = readable_file(flag, *value);
    } else if (flag == "--tls-key") {
      tls_files.key_file = readable_file(flag, *value);
    } else if (flag == "--tls-ca") {
      tls_files.ca_file = readable_file(flag, *value);
    } else if (flag == "--store-credentials") {
      options.store_credentials = readable_file(flag, *value);
    } else if (flag == "-H" || flag == "--hosts") {
      options.host_list = nonempty(flag, *value, "hosts: HOST:SLOTS,HOST:SLOTS,...");
    } else if (flag == "--hostfile") {
      options.hostfile = readable_file(flag, *value);
    } else if (flag == "--launch-command") {
      options.launch_command = nonempty(flag, *value, "a command (ssh by default)");
    } else if (flag == "--topology") {
      options.topology = check_topology(*value);
    } else if (flag == "--timeout") {
      options.timeout = check_seconds(*value);
    } else if (flag == "--connect-timeout") {
      options.connect_timeout = check_seconds(*value, flag);
    } else if (flag == "--store-timeout") {
      options.store_timeout = check_seconds(*value, flag);
    } else if (flag == "--transport") {
      options.transport = check_transport(*value);
    } else if (flag == "--metrics-port") {
      options.metrics_port = check_port(*value);
    } else if (flag == "--log-dir") {
      options.log_dir = nonempty(flag, *value, "a folder (created when missing)");
    } else if (flag == "--ranks-filter") {
      if (!options.console_ranks.empty()) throw UsageError("aikido-run: give --ranks-filter or --quiet-ranks, once");
      options.console_ranks = parse_ranks(flag, *value);
    } else if (flag == "--quiet-ranks") {
      if (!options.console_ranks.empty()) throw UsageError("aikido-run: give --ranks-filter or --quiet-ranks, once");
      const std::set<int> quiet = parse_ranks(flag, *value);
      for (int r = 0; r < kMaxWorkers; ++r) {
        if (!quiet.contains(r)) options.console_ranks.insert(r);
      }
    } else if (flag == "--timeline") {
      options.timeline = nonempty(flag, *value, "a file name (the Chrome trace, JSON)");
    } else if (flag == "--dashboard") {
      options.dashboard_port = check_port(*value, flag);
    } else if (flag == "--dashboard-address") {
      options.dashboard_address = nonempty(flag, *value, "an IPv4 address to serve the dashboard on");
    } else if (flag == "--metrics-file") {
      if (value->empty()) throw UsageError("aikido-run: --metrics-file needs a file name");
      options.metrics_file = *value;
    } else if (flag == "--metrics-interval") {
      options.metrics_interval = std::stod(check_seconds(*value, "--metrics-interval"));
    } else if (flag == "--min-np") {
      options.min_np = parse_count(flag, *value);
      elastic_flags.push_back(flag);
    } else if (flag == "--max-np") {
      options.max_np = parse_count(flag, *value);
      elastic_flags.push_back(flag);
    } else if (flag == "--control-file") {
      if (value->empty()) throw UsageError("aikido-run: --control-file needs a file name");
      options.control_file = *value;
      elastic_flags.push_back(flag);
    } else if (flag == "--checkpoint") {
      if (value->empty()) throw UsageError("aikido-run: --checkpoint needs a file name");
      options.checkpoint = *value;
      elastic_flags.push_back(flag);
    } else if (flag == "--resume") {
      if (value->empty()) throw UsageError("aikido-run: --resume needs a checkpoint file");
      if (::access(value->c_str(), R_OK) != 0) {
        throw UsageError("aikido-run: --resume " + *value + ": cannot read it (" + std::strerror(errno) +
                         "); give a file that --checkpoint wrote");
      }
      options.resume = *value;
      elastic_flags.push_back(flag);
    } else if (flag == "--heartbeat-timeout") {
      options.heartbeat_timeout_s = std::stod(check_seconds(*value, flag));
      heartbeat_given = true;
      elastic_flags.push_back(flag);
    } else if (flag == "--max-restarts") {
      options.max_restarts = parse_restarts(*value);
      max_restarts_given = true;
      elastic_flags.push_back(flag);
    } else if (flag == "--bind-to") {
      if (*value != "core" && *value != "none") {
        throw UsageError("aikido-run: --bind-to expects core or none, got '" + *value + "'");
      }
      options.bind_to_core = *value == "core";
    } else if (flag == "--grace-period") {
      options.grace_period_s = std::stod(check_seconds(*value, flag));
    } else if (flag == "--stdout") {
      if (*value != "tty" && *value != "pipe") {
        throw UsageError("aikido-run: --stdout expects tty or pipe, got '" + *value + "'");
      }
      options.stdout_tty = *value == "tty";
    } else if (flag == "--streams") {
      options.streams = check_streams(*value);
    } else {
      options.segment_bytes = check_segment_bytes(*value);
    }
  }
  if (!options.replay.empty()) {
    if (!options.dashboard_port) {
      throw UsageError("aikido-run: --replay F shows a recorded run on the dashboard: it needs --dashboard PORT");
    }
    if (i < argc || have_np) {
      throw UsageError("aikido-run: --replay shows a finished run and starts no workers: drop -np and PROGRAM");
    }
    return options;
  }
  if (!have_np && !options.across_hosts()) {
    throw UsageError("aikido-run: missing -np N, the number of workers to start; see aikido-run --help");
  }
  if (options.across_hosts()) {
    for (const std::string& f : elastic_flags) {
      if (f == "--min-np" || f == "--max-np") {
        throw UsageError("aikido-run: " + f + " does not go with --nnodes: its MIN:MAX counts hosts");
      }
    }
  }
  check_hosts_options(options, have_np, host_flags);
  if (options.restart) elastic_flags.push_back("--restart");
  if (!options.elastic && !elastic_flags.empty()) {
    throw UsageError("aikido-run: " + elastic_flags.front() + " needs --elastic");
  }
  if (max_restarts_given && !options.restart) throw UsageError("aikido-run: --max-restarts needs --restart");
  if (options.max_np == 0) options.max_np = options.np;
  if (options.min_np > options.np && !options.across_hosts()) {
    throw UsageError("aikido-run: --min-np " + std::to_string(options.min_np) + " is above -np " +
                     std::to_string(options.np) + "; the job must start with at least its minimum");
  }
  if (options.max_np < options.np && !options.across_hosts()) {
    throw UsageError("aikido-run: --max-np " + std::to_string(options.max_np) + " is below -np " +
                     std::to_string(options.np));
  }
  check_timeouts(options, heartbeat_given);
  options.tls = resolve_tls(tls_flag, tls_files);
  if (i >= argc)
    throw UsageError("aikido-run: missing PROGRAM to run; usage: aikido-run -np N [options] PROGRAM [ARGS...]");
  options.program = argv[i];
  options.program_path = find_program(options.program);
  options.argv.assign(argv + i, argv + argc);
  return options;
}

}  // namespace aikido::run
