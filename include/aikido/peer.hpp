// aikido::Peer: one worker's session in a cluster, and the collectives it runs.
#pragma once

#include <aikido/errors.hpp>
#include <aikido/store.hpp>
#include <aikido/tls.hpp>
#include <aikido/types.hpp>
#include <aikido/work.hpp>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace aikido {

/// How ranks on the same host talk to each other. Ranks on different hosts always use TCP.
enum class TransportKind : std::uint8_t {
  automatic,    // the default: ranks of one host share a shared-memory segment, which carries every collective but
                // gather when all ranks are on that host, and the inside-host phases of hierarchical collectives
                // when the cluster spans hosts; other messages between them go over Unix-domain sockets; across
                // hosts, TCP
  tcp,          // TCP everywhere (the path used between hosts)
  unix_socket,  // Unix-domain sockets; all ranks must be on one host
};
const char* transport_name(TransportKind kind);
TransportKind parse_transport(std::string_view name);  // "auto", "tcp", "unix"; throws ConfigError otherwise

inline constexpr const char* kDefaultTcpCongestion = "cubic";

/// Latency and bandwidth between every pair of ranks, as measured (LinkMonitor::matrix measures one): the entry of
/// the link from rank `from` to rank `to` is at from * size + to. NaN where unknown (the diagonal, links not measured).
struct LinkMatrix {
  int size = 0;
  std::vector<double> latency_seconds;
  std::vector<double> bandwidth_bytes_per_second;
  /// A matrix of `size` ranks with every entry unknown.
  static LinkMatrix unmeasured(int size);
  double latency(int from, int to) const {
    return latency_seconds[std::size_t(from) * std::size_t(size) + std::size_t(to)];
  }
  double bandwidth(int from, int to) const {
    return bandwidth_bytes_per_second[std::size_t(from) * std::size_t(size) + std::size_t(to)];
  }
};

/// How many collectives a session posted on each path (Peer::path_counts()), counted when posted, whether they then
/// succeed or fail. Every rank of a cluster takes the same path for the same collective.
struct PathCounts {
  /// Collectives run whole through the same-host shared-memory segment (TransportKind::automatic with every rank on
  /// one host; every kind but gather).
  std::uint64_t shared_memory = 0;
  /// Collectives run whole over the connections (TCP or Unix-domain sockets): every collective of the other
  /// transports, gather, collectives of clusters that span hosts on other topologies than hierarchical, and those
  /// counted in `shared_memory_table_full`. A one-rank session, which has no connections, counts its collectives here.
  std::uint64_t sockets = 0;
  /// Of `sockets`: collectives that would have taken shared memory, but whose name found no place in the segment's
  /// table of names (it holds 512 distinct names per host and session; names are never removed). Every rank finds
  /// the table full alike.
  std::uint64_t shared_memory_table_full = 0;
  /// Collectives run in phases by host (the hierarchical topology on a cluster of several hosts with the same
  /// number of ranks, several, on each): inside each host, across hosts over the connections, inside again.
  std::uint64_t hierarchical = 0;
  /// The inside-host phases of those that ran through this host's shared-memory segment...
  std::uint64_t host_phases_shared_memory = 0;
  /// ...and those that ran over the connections: this host has no segment (another transport, or a rank could not
  /// map it), or the segment's table of names was full.
  std::uint64_t host_phases_sockets = 0;
  /// TCP connections to each rank on another host (PeerConfig::streams, or what measuring the link chose); 0 when
  /// every rank is on this host or the transport is not TCP.
  std::uint64_t streams_across_hosts = 0;
  /// Data segments sent on the second and later of those streams (large segments take turns on all of them).
  std::uint64_t segments_on_extra_streams = 0;
};

/// Everything a Peer needs to join a cluster. Peer::from_env() fills it from the AIKIDO_* environment
/// (src/base/env.hpp lists every variable with its default).
struct PeerConfig {
  int rank = 0;
  int size = 1;
  /// Identity of this rank's host: ranks with equal `host` share the same-host path and form one group of the
  /// hierarchical topology. Empty: this machine's host name.
  std::string host;
  /// Rendezvous store shared by all ranks of the cluster; required when size > 1.
  std::shared_ptr<Store> store;
  /// The job secret every connection proves knowledge of (HMAC-SHA256). May be empty only when size == 1.
  std::string secret;
  /// TLS on the TCP connections between ranks (AIKIDO_TLS...); see TlsOptions. Off by default.
  TlsOptions tls;
  /// Cluster version: connections and messages of another version are refused.
  std::uint64_t cluster_version = 0;
  Topology topology = Topology::ring;
  TransportKind transport = TransportKind::automatic;
  /// Deadline of each collective, and of connection setup unless connect_timeout is set.
  std::chrono::milliseconds timeout{60'000};
  /// Deadline of joining: waiting for every rank's address, connecting and the handshakes (AIKIDO_CONNECT_TIMEOUT).
  /// Zero: `timeout`.
  std::chrono::milliseconds connect_timeout{0};
  /// Address TCP listeners bind to; peers connect to it. Loopback unless the job spans hosts.
  std::string bind_address = "127.0.0.1";
  /// TCP connections between two ranks on different hosts (1 to 8): where one connection cannot fill the link
  /// between hosts (a long round trip for its window, or a core per stream), large segments take turns on several.
  /// 0 (the default): chosen at connection setup by measuring the link between the first two hosts (one stream
  /// against four at once: the fewest that carry within 10% as much), which also gives the link model its first
  /// latency and bandwidth (Peer::set_link_matrix).
  int streams = 0;
  /// Size of the pieces a large buffer is cut into for pipelining (see src/collective/plan.hpp). 0 (the default):
  /// chosen per plan from its slowest link, 1 MiB among ranks of one host, what the link carries in half a
  /// millisecond between hosts (256 KiB to 4 MiB; see Peer::set_link_matrix).
  std::size_t segment_bytes = 0;
  /// TCP congestion control of data connections (Linux's TCP_CONGESTION; `sysctl
  /// net.ipv4.tcp_allowed_congestion_control` lists what a process may choose). Empty: the system's default.
  /// cubic by default: with BBR, the default of some distributions, each burst of a collective is paced, and 4 MiB
  /// allreduces over loopback took about 1.6x as long (see bench/README.md). If the kernel lacks the default, the
  /// system's default is used; a congestion control set here that the kernel refuses is a ConfigError.
  std::string tcp_congestion = kDefaultTcpCongestion;
  /// Prefix of store keys and socket names, so that several jobs can share a store or a host.
  std::string job_id = "aikido";
  /// Checked while create() waits for other ranks: when it returns true, create() gives up and throws
  /// aikido::Error ("rendezvous cancelled"). The elastic session uses it to abandon a version that a newer one
  /// superseded. Empty: never.
  std::function<bool()> cancel;
};

namespace detail {
class Engine;
enum class CollectiveKind : std::uint8_t {
  allreduce,
  broadcast,
  allgather,
  reduce_scatter,
  gather,
  barrier,
  consensus
};
struct Request {
  CollectiveKind kind;
  DType dtype;
  ReduceOp op = ReduceOp::sum;
  int root = 0;
  const void* send = nullptr;  // `send_count` elements
  void* recv = nullptr;        // `recv_count` elements
  std::size_t send_count = 0;
  std::size_t recv_count = 0;
  std::string_view name;
  bool* agreed = nullptr;  // consensus result
};
}  // namespace detail

/// One worker's session in a cluster of `size()` ranks.
///
/// Collectives are matched across ranks by name and occurrence (the n-th post of a name on one rank meets the n-th
/// post of that name on every other rank), so ranks may post them in different orders and many may be in flight.
/// Every collective is asynchronous underneath; the blocking forms wait on the Work handle. Posting the same name
/// twice while the first is still running raises ConfigError. All methods are thread safe.
///
/// Buffers given to an `_async` call must stay alive and unchanged until its Work is done (see Work): `send` is
/// read while the collective runs (an out-of-place allreduce reads its input where it lies, without a copy).
///
/// Errors: TimeoutError when a collective does not finish within timeout(); PeerLostError when a rank it needs has
/// gone; MismatchError when ranks posted the same name with different sizes, types, operations or roots. After a
/// lost peer every later collective fails at once with PeerLostError.
class Peer {
 public:
  /// Joins the cluster its launcher describes in the environment: aikido-run's AIKIDO_* variables, or those of
  /// torchrun, OpenMPI's mpirun, PMIx/PMI, Slurm's srun, or RANK and WORLD_SIZE (Kubeflow); without any, a 1-rank
  /// peer. Started by another launcher, rank 0 serves the job's store (at MASTER_ADDR:MASTER_PORT unless
  /// AIKIDO_STORE names one) for as long as its Peer lives, and the other ranks wait for it; returns on every rank
  /// once all have joined. Throws ConfigError naming the variable to fix (malformed or contradictory launcher
  /// variables, no job secret for several ranks, no store address, a loopback address across hosts); see
  /// src/base/launcher_env.hpp and the README's "Started by other launchers".
  static Peer from_env();
  /// Joins the cluster described by `config`; blocks until every rank has connected (or config.timeout).
  static Peer create(const PeerConfig& config);

  Peer(Peer&&) noexcept;
  Peer& operator=(Peer&&) noexcept;
  ~Peer();

  int rank() const;
  int size() const;
  /// Rank among the ranks of this host, and their number.
  int local_rank() const;
  int local_size() const;
  std::uint64_t cluster_version() const;
  std::chrono::milliseconds timeout() const;
  Topology topology() const;
  /// The configuration this session was created with.
  const PeerConfig& config() const;
  /// Ranks whose connection ended (crashed, killed, or closed their session), in increasing order.
  std::vector<int> lost_ranks() const;
  /// Treats `rank` as lost, as if its connection had ended: collectives that need it fail with PeerLostError
  /// naming `why`, and later ones fail at once. For a rank that is known to be gone although its connection is
  /// still open (a host cut off from the others closes nothing): ElasticSession calls it when a newer cluster
  /// version removed a worker after a failure. Thread safe; no-op for this rank or one already lost.
  void mark_lost(int rank, const std::string& why);
  /// The collectives this session posted so far, by the path they took.
  PathCounts path_counts() const;
  /// Bytes this rank wrote to its connections (TCP or Unix-domain sockets: frame headers, names and payloads) since
  /// the Peer was created, across reconnect(). Collectives through same-host shared memory write none. Any thread.
  std::uint64_t bytes_sent() const;

  /// Replaces this session by a new one for `config` (another rank, size or cluster version), keeping this
  /// object: references to it stay valid. The old connections are closed first (collectives still in flight
  /// fail); then it blocks like create(). On failure the Peer is left as a 1-rank session of its own and the
  /// error is rethrown. Not thread safe: no other thread may use the Peer meanwhile. Used by ElasticSession.
  void reconnect(const PeerConfig& config);

  /// Asks for a cluster of `n` workers. Collective, at a step boundary. Needs an elastic job: the
  /// ElasticSession that owns this Peer handles it (see ElasticSession::resize); ConfigError otherwise.
  void resize(int n);
  /// Installs what resize() calls (ElasticSession does); empty: resize() throws ConfigError.
  void set_resize_handler(std::function<void(int)> handler);

  /// Switches the topology used by collectives posted after this call. Collective: every rank calls it at the
  /// same point of its program; it checks by consensus that all ranks asked for the same topology (MismatchError
  /// otherwise) and waits for collectives in flight to finish.
  void set_topology(Topology topology);

  /// Installs measured links: Topology::automatic chooses among ring, tree, hierarchical and multi_ring by the time
  /// this model predicts for each collective (from its kind and size), and pipelining segments follow the slowest
  /// link of each plan (unless PeerConfig::segment_bytes fixes them). Until then, and for entries that are NaN, the
  /// model assumes shared memory inside a host and 10 Gbit/s between hosts. Collective, like set_topology: every
  /// rank passes the same matrix (checked by consensus; MismatchError otherwise; ConfigError for a matrix of another
  /// size) after the collectives in flight finished, so all ranks choose alike from then on. Installing a new
  /// matrix (a link slowed down) re-plans every later collective.
  void set_link_matrix(const LinkMatrix& links);
  /// The installed measurements: before set_link_matrix, what was measured between the first two hosts when the
  /// connections were made (PeerConfig::streams = 0) on every pair of ranks on different hosts, NaN elsewhere.
  LinkMatrix link_matrix() const;
  /// The topology a collective posted now would run on: topology(), or what Topology::automatic resolves to for an
  /// allreduce of `bytes` bytes.
  Topology planned_topology(std::size_t bytes) const;
  /// How many bytes to fuse into one allreduce when `total_bytes` of many tensors (a model's gradients) are reduced
  /// in buckets while they are produced: 1 MiB on one host; across hosts, from the installed links and topology(),
  /// the smallest power of two of at least 1 MiB whose allreduce spends at most 10% of its time on latencies, at
  /// most a quarter of `total_bytes` and 32 MiB. The same on every rank that installed the same links.
  std::size_t fusion_bytes(std::size_t total_bytes) const;

  // Allreduce: recv[i] = op over ranks of send[i]. send and recv have equal sizes; they may be the same memory.
  template <class T>
  Work allreduce_async(std::span<const T> send, std::span<T> recv, ReduceOp op, std::string_view name) {
    return post({detail::CollectiveKind::allreduce, dtype_of<T>, op, 0, send.data(), recv.data(), send.size(),
                 recv.size(), name});
  }
  template <class T>
  void allreduce(std::span<const T> send, std::span<T> recv, ReduceOp op, std::string_view name) {
    allreduce_async(send, recv, op, name).wait();
  }
  template <class T>
  Work allreduce_async(std::span<T> buffer, ReduceOp op, std::string_view name) {
    return allreduce_async(std::span<const T>(buffer), buffer, op, name);
  }
  template <class T>
  void allreduce(std::span<T> buffer, ReduceOp op, std::string_view name) {
    allreduce_async(buffer, op, name).wait();
  }

  // Broadcast: every rank's buffer receives root's buffer.
  template <class T>
  Work broadcast_async(std::span<T> buffer, int root, std::string_view name) {
    return post({detail::CollectiveKind::broadcast, dtype_of<T>, ReduceOp::sum, root, buffer.data(), buffer.data(),
                 buffer.size(), buffer.size(), name});
  }
  template <class T>
  void broadcast(std::span<T> buffer, int root, std::string_view name) {
    broadcast_async(buffer, root, name).wait();
  }

  // Allgather: recv holds size() * send.size() elements, rank r's send at offset r * send.size().
  template <class T>
  Work allgather_async(std::span<const T> send, std::span<T> recv, std::string_view name) {
    return post({detail::CollectiveKind::allgather, dtype_of<T>, ReduceOp::sum, 0, send.data(), recv.data(),
                 send.size(), recv.size(), name});
  }
  template <class T>
  void allgather(std::span<const T> send, std::span<T> recv, std::string_view name) {
    allgather_async(send, recv, name).wait();
  }

  // Reduce-scatter: send holds size() * k elements; recv (k elements) receives block rank() of the reduction.
  template <class T>
  Work reduce_scatter_async(std::span<const T> send, std::span<T> recv, ReduceOp op, std::string_view name) {
    return post({detail::CollectiveKind::reduce_scatter, dtype_of<T>, op, 0, send.data(), recv.data(), send.size(),
                 recv.size(), name});
  }
  template <class T>
  void reduce_scatter(std::span<const T> send, std::span<T> recv, ReduceOp op, std::string_view name) {
    reduce_scatter_async(send, recv, op, name).wait();
  }

  // Gather: root's recv holds size() * send.size() elements in rank order; other ranks' recv is ignored (may be
  // empty).
  template <class T>
  Work gather_async(std::span<const T> send, std::span<T> recv, int root, std::string_view name) {
    return post({detail::CollectiveKind::gather, dtype_of<T>, ReduceOp::sum, root, send.data(), recv.data(),
                 send.size(), recv.size(), name});
  }
  template <class T>
  void gather(std::span<const T> send, std::span<T> recv, int root, std::string_view name) {
    gather_async(send, recv, root, name).wait();
  }

  /// Completes once every rank has posted a barrier of this name.
  Work barrier_async(std::string_view name = "barrier");
  void barrier(std::string_view name = "barrier") { barrier_async(name).wait(); }

  /// True when every rank holds the same bytes (same length and content). `agreed` is written before the work
  /// completes and must outlive it.
  Work consensus_async(std::span<const std::byte> value, bool& agreed, std::string_view name);
  bool consensus(std::span<const std::byte> value, std::string_view name);

  // Peer-to-peer model store (used by pair averaging): save() keeps a copy of a named buffer on this rank; any rank
  // may request() it. request() fills `out` with the latest saved version on `target` and throws ConfigError when
  // the target has no such name or its size differs.
  template <class T>
  void save(std::string_view name, std::span<const T> data) {
    save_bytes(name, dtype_of<T>, data.data(), data.size());
  }
  template <class T>
  Work request_async(int target, std::string_view name, std::span<T> out) {
    return request_bytes(target, name, dtype_of<T>, out.data(), out.size());
  }
  template <class T>
  void request(int target, std::string_view name, std::span<T> out) {
    request_async(target, name, out).wait();
  }

  /// Posts a type-erased collective (what the typed methods call).
  Work post(const detail::Request& request);

 private:
  explicit Peer(std::unique_ptr<detail::Engine> engine);
  void save_bytes(std::string_view name, DType dtype, const void* data, std::size_t count);
  Work request_bytes(int target, std::string_view name, DType dtype, void* out, std::size_t count);

  std::unique_ptr<detail::Engine> engine_;
  std::function<void(int)> resize_handler_;
  std::uint64_t bytes_sent_before_ = 0;  // by the sessions reconnect() replaced
};

}  // namespace aikido
