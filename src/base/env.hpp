// Every environment setting Aikido reads, in one place, with its default and meaning.
//
//   AIKIDO_RANK             this worker's rank, 0..size-1                          (default 0)
//   AIKIDO_SIZE             number of workers                                      (default 1)
//   AIKIDO_LOCAL_RANK       rank among the workers of this host (informational; the Peer recomputes it)
//   AIKIDO_LOCAL_SIZE       number of workers on this host (informational)
//   AIKIDO_LOCAL_CPUS       CPUs the workers of this host share; with more workers than that, waiting threads do not
//                           spin (default: the CPUs this process may run on; aikido-run sets it, since it binds
//                           each worker to its own CPUs)
//   AIKIDO_AUTO_THREADS     1: aikido-run chose OMP_NUM_THREADS (this host's CPUs / its workers), so the LibTorch
//                           integration may change the thread count when an elastic job's size changes
//   AIKIDO_HOST             identity of this worker's host                         (default: gethostname())
//   AIKIDO_STORE_ADDR       "host:port" of the rendezvous store served by aikido-run (required when size > 1)
//   AIKIDO_STORE            URL of the job's store, which takes precedence over AIKIDO_STORE_ADDR: tcp://HOST:PORT,
//                           or etcd://H1:P1[,H2:P2] (etcds:// for TLS) (default: AIKIDO_STORE_ADDR;
//                           started by other launchers, rank 0 serves one at MASTER_ADDR: src/base/launcher_env.hpp)
//   AIKIDO_STORE_CA         etcd's TLS: the CA file that signed the servers' certificates     (default: none)
//   AIKIDO_STORE_CERT       etcd's TLS: this client's certificate file, with AIKIDO_STORE_KEY (default: none)
//   AIKIDO_STORE_KEY        etcd's TLS: the key of AIKIDO_STORE_CERT                          (default: none)
//   AIKIDO_STORE_CREDENTIALS  etcd's authentication: a file of "user=NAME" and "password=SECRET" lines (default: none)
//   AIKIDO_STORE_PORT       port of the store rank 0 serves when started by other launchers (default: MASTER_PORT,
//                           else derived from the launcher's job id)
//   AIKIDO_SECRET           the job secret, hex; every connection proves it knows it (required when size > 1)
//   AIKIDO_SECRET_FILE      a file whose first line is the job secret, read when AIKIDO_SECRET is unset; every
//                           worker must be able to read it (make one: openssl rand -hex 32 > FILE)
//   AIKIDO_TLS              1: TLS 1.3 on every TCP connection (data and the store aikido-run serves); 0: none
//                           (default 0; any of the three files below turns it on)
//   AIKIDO_TLS_CERT         this side's certificate (PEM), with AIKIDO_TLS_KEY and AIKIDO_TLS_CA (default: one
//                           certificate derived from the job secret, the same on every side)
//   AIKIDO_TLS_KEY          the private key of AIKIDO_TLS_CERT (PEM)
//   AIKIDO_TLS_CA           the CA certificates (PEM) that must have signed the other side's certificate
//   AIKIDO_JOB_ID           prefix of store keys and socket names (default: the job id of the launcher that started
//                           the workers, when not aikido-run: Slurm's, OpenMPI's...; else "aikido")
//   AIKIDO_CLUSTER_VERSION  version of the cluster membership                      (default 0)
//   AIKIDO_TOPOLOGY         ring | tree | star | hierarchical | multi-ring | auto (default ring)
//   AIKIDO_TRANSPORT        auto | tcp | unix (auto: shared memory when all ranks share a host) (default auto)
//   AIKIDO_TIMEOUT          deadline of each collective, in seconds                (default 60)
//   AIKIDO_CONNECT_TIMEOUT  deadline of joining a cluster (addresses, connections, handshakes), in seconds
//                           (default: AIKIDO_TIMEOUT)
//   AIKIDO_STORE_TIMEOUT    deadline of each request to the rendezvous store, in seconds (default: AIKIDO_TIMEOUT)
//   AIKIDO_BIND_ADDRESS     address TCP listeners bind to and advertise (default: 127.0.0.1 when every worker is on
//                           one host; otherwise the address of AIKIDO_IFACE, or of the interface that routes to the
//                           store's host)
//   AIKIDO_IFACE            the interface whose first IPv4 address TCP listeners use, in NCCL_SOCKET_IFNAME's forms:
//                           eth0 or eth (name prefixes, comma-separated), =eth0 (exact), ^lo,docker (all but these)
//                           (default: unset; set at most one of AIKIDO_IFACE and AIKIDO_BIND_ADDRESS)
//   AIKIDO_SEGMENT_BYTES    pipelining segment size in bytes; 0: chosen per link  (default 0)
//   AIKIDO_STREAMS          TCP connections between two ranks on different hosts, 1..8; 0: chosen by measuring the
//                           link at connection setup                               (default 0)
//   AIKIDO_LOG_LEVEL        error | warn | info | debug                            (default warn)
//   AIKIDO_TCP_CONGESTION   TCP congestion control of data connections; "system": the kernel's (default cubic)
//   AIKIDO_METRICS_INTERVAL seconds between publications of a worker's training metrics to the store, for
//                           aikido-run's --metrics-port / --metrics-file (unset: not published)
//   AIKIDO_ELASTIC          1: the membership is in the store (aikido-run --elastic); ElasticSession follows it
//                           (0 or unset: not elastic)
//   AIKIDO_WORKER_ID        this worker's id in the ClusterSpec (elastic jobs)     (default: AIKIDO_RANK)
//   AIKIDO_CHECKPOINT       file the committed state is written to when an elastic job stops below its minimum
//                           size or aikido-run is asked to stop it                 (default: none)
//   AIKIDO_RESUME           a checkpoint (AIKIDO_CHECKPOINT) that an elastic job starts from when no worker holds
//                           state yet                                              (default: none)
//   AIKIDO_CONSOLE_TTY      1: the console the worker's lines end up on is a terminal (aikido-run's standard error
//                           is one), so progress lines may be updated in place (0 or unset: it is not)
//   AIKIDO_TIMELINE         a folder: each worker appends its timeline events (collectives, step phases, policy
//                           decisions) to FOLDER/worker-ID.jsonl, which aikido-run --timeline merges into a Chrome
//                           trace                                                  (default: none, no timeline)
//
// A bad value is never ignored: the reader throws ConfigError naming the variable and what it accepts, Peer creation
// checks every setting above first (check_environment), and aikido-run checks those it passes on before it starts
// any worker.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace aikido::env {

inline constexpr const char* kRank = "AIKIDO_RANK";
inline constexpr const char* kSize = "AIKIDO_SIZE";
inline constexpr const char* kLocalRank = "AIKIDO_LOCAL_RANK";
inline constexpr const char* kLocalSize = "AIKIDO_LOCAL_SIZE";
inline constexpr const char* kLocalCpus = "AIKIDO_LOCAL_CPUS";
inline constexpr const char* kAutoThreads = "AIKIDO_AUTO_THREADS";
inline constexpr const char* kHost = "AIKIDO_HOST";
inline constexpr const char* kStoreAddr = "AIKIDO_STORE_ADDR";
inline constexpr const char* kStore = "AIKIDO_STORE";
inline constexpr const char* kStorePort = "AIKIDO_STORE_PORT";
inline constexpr const char* kStoreCa = "AIKIDO_STORE_CA";
inline constexpr const char* kStoreCert = "AIKIDO_STORE_CERT";
inline constexpr const char* kStoreKey = "AIKIDO_STORE_KEY";
inline constexpr const char* kStoreCredentials = "AIKIDO_STORE_CREDENTIALS";
inline constexpr const char* kSecret = "AIKIDO_SECRET";
inline constexpr const char* kSecretFile = "AIKIDO_SECRET_FILE";
inline constexpr const char* kTls = "AIKIDO_TLS";
inline constexpr const char* kTlsCert = "AIKIDO_TLS_CERT";
inline constexpr const char* kTlsKey = "AIKIDO_TLS_KEY";
inline constexpr const char* kTlsCa = "AIKIDO_TLS_CA";
inline constexpr const char* kJobId = "AIKIDO_JOB_ID";
inline constexpr const char* kClusterVersion = "AIKIDO_CLUSTER_VERSION";
inline constexpr const char* kTopology = "AIKIDO_TOPOLOGY";
inline constexpr const char* kTransport = "AIKIDO_TRANSPORT";
inline constexpr const char* kTimeout = "AIKIDO_TIMEOUT";
inline constexpr const char* kConnectTimeout = "AIKIDO_CONNECT_TIMEOUT";
inline constexpr const char* kStoreTimeout = "AIKIDO_STORE_TIMEOUT";
inline constexpr const char* kBindAddress = "AIKIDO_BIND_ADDRESS";
inline constexpr const char* kIface = "AIKIDO_IFACE";
inline constexpr const char* kSegmentBytes = "AIKIDO_SEGMENT_BYTES";
inline constexpr const char* kStreams = "AIKIDO_STREAMS";
inline constexpr const char* kTcpCongestion = "AIKIDO_TCP_CONGESTION";  // "system": the kernel's default
inline constexpr const char* kLogLevel = "AIKIDO_LOG_LEVEL";
inline constexpr const char* kMetricsInterval = "AIKIDO_METRICS_INTERVAL";
inline constexpr const char* kElastic = "AIKIDO_ELASTIC";
inline constexpr const char* kWorkerId = "AIKIDO_WORKER_ID";
inline constexpr const char* kCheckpoint = "AIKIDO_CHECKPOINT";
inline constexpr const char* kResume = "AIKIDO_RESUME";
inline constexpr const char* kConsoleTty = "AIKIDO_CONSOLE_TTY";
inline constexpr const char* kTimeline = "AIKIDO_TIMELINE";

inline constexpr std::chrono::milliseconds kDefaultTimeout{60'000};
/// Accepted range of AIKIDO_SEGMENT_BYTES (and 0: chosen per link).
inline constexpr std::int64_t kMinSegmentBytes = 8;
inline constexpr std::int64_t kMaxSegmentBytes = std::int64_t(1) << 40;

/// The raw value, or nullopt when unset or empty.
std::optional<std::string> get(const char* name);
/// Integer value; throws ConfigError naming the variable when it is not an integer in [min, max].
std::int64_t get_int(const char* name, std::int64_t fallback, std::int64_t min, std::int64_t max);
/// CPUs the workers of this host share: AIKIDO_LOCAL_CPUS when set, else the CPUs this process may run on
/// (sched_getaffinity). A worker bound to one CPU by its launcher still sees the job's CPUs through the variable.
int local_cpus();
/// Duration given in (possibly fractional) seconds; throws ConfigError when not a positive number.
std::chrono::milliseconds get_seconds(const char* name, std::chrono::milliseconds fallback);

/// Why `value` is not a valid value of the setting `name` (one of the variables above), as a message that names the
/// variable and what it accepts ("AIKIDO_TIMEOUT='abc' is not a positive number of seconds; fix or unset it");
/// nullopt when it is valid or `name` is not one of them. An empty value counts as unset (valid).
std::optional<std::string> check_setting(std::string_view name, std::string_view value);
/// check_setting() for every variable above that this process's environment sets; throws ConfigError with the
/// first problem.
void check_environment();

}  // namespace aikido::env
