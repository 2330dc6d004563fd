// The engine behind aikido::Peer: runs named collectives over a set of connections.
//
// Every collective is a Collective object: its plan (src/collective/plan.hpp), the buffer the plan works on, and
// per-op progress. Ops whose dependencies are met are "armed": an armed send is queued on its connection; an armed
// receive waits in `armed_` keyed by (name, occurrence, tag, source) until its frame arrives. A frame that arrives
// before its receive is armed waits in the mailbox. Data moves outside the engine lock; the lock only guards
// bookkeeping.
//
// Flow control: segments up to `kEagerBytes` are sent at once; larger ones only after the receiver said `ready`
// for that collective (it has posted it), so unexpected data is bounded by what receivers have posted.
//
// Waiting: a thread in Work::wait() for a collective drives the connections itself while it waits: it takes the
// connections' ReceiveGate (the receive threads park), reads and handles every frame that arrives, on any
// connection and for any collective, and leaves when its collective is done or its wait times out. It spins
// briefly (pause instructions for kPause unless ranks outnumber the host's CPUs, env::local_cpus(); then yielding the
// core until kSpin), then sleeps in poll() on the sockets. So a chain of messages costs no thread hand-off per message,
// and the waiter is not woken by a condition variable at the end. It gives the gate back before anything that may block
// (mailbox full, completion callbacks), so a blocked handler never keeps frames of other collectives from being
// read. Collectives nobody waits for progress on the receive threads as before, and so do collectives over
// kEagerBytes when there are several connections (one thread reading a large payload would hold up the others),
// and collectives over kEagerBytes when more ranks than CPUs share the host (see set_drive). Model-store requests are
// waited for the same way.
//
// Agreement: `ready` carries the receiver's signature of the collective (kind, type, op, root, count, topology),
// and a collective completes only once every rank it sends to has said `ready` and every frame it received matched
// its own signature. In a small allreduce (all segments eager) a rank that both sends to and receives from a peer
// sends it no `ready`: the peer's data frames, signed alike, stand for it. So each rank checks all of its plan's
// neighbours, and a mismatch found anywhere is sent to every rank (`abort`); a rank that hears of a failure passes
// it on to every rank before anything else it sends, its goodbye included. Where every rank's result depends on every
// other rank's data (allreduce, allgather, reduce_scatter), a mismatch stops the data at the first neighbour, so no
// rank completes; a broadcast or gather, where it does not, exchanges `ready` among all ranks instead
// (Plan::ready_to, Plan::ready_from). The same holds for lost ranks: every rank that fails a collective tells the
// others, so a rank that needs a lost one only through others hears of it at once.
//
// Groups: a collective on the message path may run among some of the ranks only (MessageRoute::members): the phases
// of a hierarchical collective do. Its messages, `ready` frames, aborts and stall queries stay among those ranks.
//
// Files: engine.cpp posts, runs and finishes collectives; engine_wait.cpp is the waiting above; engine_failures.cpp
// fails collectives, handles lost peers and runs the watchdog (timeouts, descriptions of stalled collectives);
// engine_hierarchy.cpp runs hierarchical collectives as phases inside and across hosts; engine_links.cpp holds the
// link model (measured links, the topology `automatic` resolves to, segment sizes). The Collective record they share
// is in engine_collective.hpp.
#pragma once

#include <aikido/peer.hpp>
#include <aikido/work.hpp>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "collective/algorithms.hpp"
#include "collective/links.hpp"
#include "runtime/buffer_pool.hpp"
#include "runtime/shm_collectives.hpp"
#include "runtime/work_state.hpp"
#include "transport/connection.hpp"

namespace aikido::detail {

/// Segments up to this size are sent without waiting for the receiver's `ready`.
inline constexpr std::size_t kEagerBytes = 64 * 1024;
/// The `tag` of stall_query and stall_reply frames: the path of the collective asked about (the same name may run
/// on both, numbered separately).
inline constexpr std::uint64_t kStallMessagePath = 0;
inline constexpr std::uint64_t kStallSharedMemoryPath = 1;

using Clock = std::chrono::steady_clock;

/// What a rank learned about the cluster at rendezvous.
struct ClusterInfo {
  int local_rank = 0;
  int local_size = 1;
  std::vector<int> host_of_rank;  // host group per rank, 0..hosts-1
};

/// A cluster of several hosts with the same number of ranks on each (several): where hierarchical collectives run
/// in phases inside and across hosts. Ranks are numbered by host (in order of their lowest rank) and by local index
/// (rank order within the host).
struct HostLayout {
  int hosts = 0;
  int per_host = 0;
  int host = 0;   // this rank's host
  int local = 0;  // this rank's index on its host
  /// This host's ranks, by local index.
  std::vector<int> local_ranks;
  /// groups[l]: the ranks of local index l, by host: those that carry slice l of a buffer across hosts.
  std::vector<std::vector<int>> groups;
  /// The layout of `info`, or nullopt when it has one host, one rank per host, or hosts with different numbers of
  /// ranks.
  static std::optional<HostLayout> of(const ClusterInfo& info, int rank);
};

/// How the message path runs one collective (Engine::post_messages).
struct MessageRoute {
  /// The ranks taking part, in the algorithm's order; empty: every rank, in rank order. Sizes in the request are
  /// those of the group (an allgather's recv holds members * send elements).
  std::vector<int> members;
  /// The topology of its plan; empty: the engine's (resolved when `automatic`).
  std::optional<Topology> topology;
  /// What the ranks must have posted alike beside kind, type, op and root; empty: the request's element count. A
  /// phase of a hierarchical collective carries the count of the whole collective, so that ranks that posted
  /// different sizes fail every phase alike.
  std::optional<std::uint64_t> signature_count;
  /// Likewise the root the ranks must have posted alike; empty: the request's.
  std::optional<int> signature_root;
  /// Reduce-scatter and allgather over slices: `recv` is the whole buffer (`recv_count` elements, worked on in
  /// place; reduce_scatter copies `send` in first when it is other memory) and member i's block is its even share
  /// (collective::block_offset/block_count), as on the same-host path.
  bool slices = false;
  /// A phase of a hierarchical collective: counted as part of that (PathCounts::hierarchical), not in `sockets`.
  bool phase = false;
};

class HierarchicalCollective;
struct HierarchyPlan;
struct Collective;

/// A request() waiting for its reply.
struct PendingRequest {
  std::uint64_t id = 0;
  int target = 0;
  std::string name;
  DType dtype{};
  std::size_t count = 0;
  void* out = nullptr;
  bool running = false;
  bool finished = false;
  Clock::time_point deadline;
  std::shared_ptr<WorkState> work;
};

class Engine final : public transport::FrameHandler {
 public:
  /// Takes ownership of the connected, authenticated sockets to every other rank (index = rank; the own slot is
  /// empty): one, or several streams to a rank on another host (the first carries every control frame and small
  /// segments, large segments take turns on all). `shm`, when given, is this host's shared-memory segment among
  /// its ranks: when every rank is on this host it runs the collectives it handles; otherwise the inside-host
  /// phases of hierarchical collectives. `measured`: links measured at connection setup (the link model's start).
  Engine(PeerConfig config, ClusterInfo cluster, std::vector<std::vector<transport::Socket>> sockets,
         std::shared_ptr<ShmCollectives> shm = nullptr, LinkMatrix measured = {});
  ~Engine() override;

  const PeerConfig& config() const { return config_; }
  const ClusterInfo& cluster() const { return cluster_; }
  Topology topology() const;
  void set_topology(Topology topology);

  Work post(const Request& request);
  /// The message path, for one collective among `route.members` (all ranks when empty) under `name`.
  Work post_messages(const Request& request, const std::string& name, const MessageRoute& route);
  /// What a rank that will not post the next occurrence of `name` among `members` does instead (a later phase of a
  /// hierarchical collective that failed here): it counts the occurrence and tells the members it failed with
  /// `text`, so that they fail it too rather than wait for it.
  void abandon_messages(const std::string& name, const std::vector<int>& members, transport::WireError kind,
                        const std::string& text);
  /// This host's shared-memory segment, if it has one.
  const std::shared_ptr<ShmCollectives>& shared_memory() const { return shm_; }
  /// The layout of a cluster whose hierarchical collectives run in phases (nullptr otherwise).
  const HostLayout* host_layout() const { return hierarchy_ ? &*hierarchy_ : nullptr; }
  BufferPool& pool() { return pool_; }
  /// A hierarchical collective counts its inside-host phases (PathCounts::host_phases_*).
  void count_host_phase(bool shared_memory);
  /// A hierarchical collective ended here (posted again under its name from now on).
  void hierarchical_finished(const std::string& name);
  void save(std::string_view name, DType dtype, const void* data, std::size_t count);
  Work request(int target, std::string_view name, DType dtype, void* out, std::size_t count);

  /// Waits until no collective is in flight (used before switching topology).
  void drain();
  /// Installs measured links (collective: Peer::set_link_matrix).
  void set_link_matrix(const LinkMatrix& links);
  LinkMatrix link_matrix() const;
  /// What the engine plans with: the installed measurements, defaults where unknown.
  collective::LinkModel link_model() const;
  /// Ranks whose connection ended, in increasing order.
  std::vector<int> lost_ranks() const;
  /// Ends the connection to rank `p` as if it had been lost, naming `why` (Peer::mark_lost).
  void drop_peer(int p, const std::string& why);
  PathCounts path_counts() const;
  /// Bytes written to the connections so far.
  std::uint64_t bytes_sent() const;

  void on_frame(transport::Connection& connection, const transport::FrameHeader& header,
                const std::string& name) override;
  void on_lost(transport::Connection& connection, const std::string& reason, bool goodbye,
               bool broke_protocol) override;

 private:
  /// post() without the timeline; `algorithm` (when not null) is set to "shared-memory" when that path takes it.
  Work post_collective(const Request& request, const char** algorithm);
  struct MessageKey {
    std::string name;
    std::uint64_t seq;
    std::uint64_t tag;
    int source;
    bool operator==(const MessageKey&) const = default;
  };
  struct MessageKeyHash {
    std::size_t operator()(const MessageKey& k) const;
  };
  struct CollectiveKey {
    std::string name;
    std::uint64_t seq;
    bool operator==(const CollectiveKey&) const = default;
  };
  struct CollectiveKeyHash {
    std::size_t operator()(const CollectiveKey& k) const;
  };
  struct Early {  // a data frame that arrived before its receive was armed
    transport::FrameHeader header;
    PooledBuffer data;
  };
  struct Tombstone {  // a collective that failed here: frames still arriving for it are dropped
    std::string error;
    std::uint8_t kind;
  };
  struct ArmedRecv {
    std::shared_ptr<Collective> collective;
    std::uint32_t op;
  };
  // Deferred work that must run without the engine lock.
  struct Progress {
    struct Copy {
      std::shared_ptr<Collective> collective;
      std::uint32_t op;
      Early early;
    };
    std::vector<Copy> copies;
    std::vector<std::pair<transport::Connection*, transport::OutgoingFrame>> sends;
    std::vector<std::shared_ptr<Collective>> finished;
  };

  // All of these run with mutex_ held.
  void arm(const std::shared_ptr<Collective>& c, std::uint32_t op, Progress& progress);
  void issue_send(const std::shared_ptr<Collective>& c, std::uint32_t op, Progress& progress);
  void complete_op(const std::shared_ptr<Collective>& c, std::uint32_t op, Progress& progress);
  void maybe_finish(const std::shared_ptr<Collective>& c, Progress& progress);
  void fail(const std::shared_ptr<Collective>& c, std::exception_ptr error, transport::WireError kind, bool tell_peers,
            Progress& progress);
  void abandon_transfers(const Collective& c);
  /// Remembers that collective `key` failed here with `error`, so that its late frames are dropped and a later post
  /// of it fails alike; false when it was remembered already.
  bool bury(const CollectiveKey& key, const std::string& error, transport::WireError kind);
  /// A frame of `c` arrived: false (and `c` failed with MismatchError) when its signature differs from this rank's;
  /// otherwise a data frame that stands for its sender's `ready` (see post()) counts as that `ready`.
  bool accept_frame(const std::shared_ptr<Collective>& c, const transport::FrameHeader& header, Progress& progress);
  std::string lost_summary() const;
  std::string describe_wait(const Collective& c) const;
  void send_control(int peer, transport::FrameType type, const std::string& name, std::uint64_t seq, std::int32_t root,
                    std::string payload, std::uint64_t tag = 0);
  /// send_control to every connected rank but this one and `except` (-1: none): an `abort` tells them that collective
  /// (name, seq) failed (root: the WireError kind, payload: the error text); a `stall_query` asks whether they posted
  /// it and what they are waiting in (tag: the path, kStallMessagePath or kStallSharedMemoryPath).
  void send_control_to_all(transport::FrameType type, const std::string& name, std::uint64_t seq, std::int32_t root,
                           const std::string& payload, int except, std::uint64_t tag = 0,
                           const std::vector<int>* members = nullptr);
  /// Answers a stall_query: whether this rank posted (name, seq) on the path the query names, and waiting_in().
  void answer_stall_query(const transport::FrameHeader& header, const std::string& name);
  void receive_stall_reply(transport::Connection& connection, const transport::FrameHeader& header,
                           const std::string& name);
  /// What this rank is waiting in, as the end of a sentence that begins "rank R ": "is waiting in allreduce 'x'
  /// (seq 3)", "is in no collective", ...
  std::string waiting_in() const;
  void send_ready(const Collective& c, int peer);
  /// The stream a data frame of `bytes` to `peer` goes on.
  transport::Connection* stream_for(int peer, std::uint64_t bytes);
  void on_ready(const std::shared_ptr<Collective>& c, const transport::FrameHeader& header, Progress& progress);
  /// True when `c` still needs something from `peer` that has not arrived yet.
  bool needs_peer(const Collective& c, int peer) const;

  // Runs deferred copies and completions; takes and releases `lock` as needed; returns with it released.
  void run(std::unique_lock<std::mutex>& lock, Progress& progress);
  void finish_collective(Collective& c);

  void check_segment_expected(const Collective& c, int source, std::uint64_t tag) const;
  void receive_data(transport::Connection& connection, const transport::FrameHeader& header, const std::string& name);
  void receive_p2p_request(transport::Connection& connection, const transport::FrameHeader& header,
                           const std::string& name);
  void receive_p2p_reply(transport::Connection& connection, const transport::FrameHeader& header);
  std::string read_text(transport::Connection& connection, std::uint64_t bytes);
  void watchdog_loop();
  /// The Work::wait() hook: reads the connections on the calling thread until `work` is done or `until`. Called
  /// with gate_ held by this thread.
  void drive(WorkState& work, Clock::time_point until);
  /// Lets Work::wait() on `work` (of a collective or request of `bytes`) drive the connections (see drive). Call
  /// before the work is handed out.
  void set_drive(WorkState& work, std::size_t bytes);
  /// How long drive() spins with pause instructions before it yields (engine_wait.cpp).
  static std::chrono::microseconds wait_pause(bool oversubscribed);

  std::shared_ptr<const collective::Plan> plan_for(const collective::PlanSpec& spec);
  /// The request for the same-host path when it covers the cluster.
  static ShmRequest shm_request(const Request& request);
  /// Throws ConfigError when the request's sizes or root do not fit a cluster (group) of `size` ranks.
  void validate(const Request& request, int size) const;
  /// The topology a collective of `request` runs on, with the order of the ranks: `topology`, or for `automatic` the
  /// one the link model predicts fastest (the same on every rank: it depends on the agreed model and on what was
  /// posted).
  collective::TopologyChoice resolve_topology(Topology topology, const Request& request) const;
  /// How a hierarchical collective of `request` is cut into phases (engine_links.cpp).
  HierarchyPlan hierarchy_plan(const Request& request) const;
  /// Pipelining segment of a plan among `members` (all ranks when empty): config.segment_bytes when set, else chosen
  /// from the slowest link between them (engine_links.cpp).
  std::size_t segment_bytes_for(const std::vector<int>& members) const;
  Work post_hierarchical(const Request& request);

  const PeerConfig config_;
  const ClusterInfo cluster_;
  BufferPool pool_;

  mutable std::mutex mutex_;
  std::condition_variable idle_;  // signalled when a collective finishes
  Topology topology_;
  bool closing_ = false;
  std::unordered_map<CollectiveKey, std::shared_ptr<Collective>, CollectiveKeyHash> active_;
  std::unordered_map<std::string, std::uint64_t> posted_count_;
  PathCounts counts_;  // what path_counts() reports (its shared-memory fields: of the collectives posted here)
  // Hierarchical collectives in flight, by name, and how often each name was posted (for labels).
  std::unordered_map<std::string, std::uint64_t> hierarchical_posted_;
  std::unordered_map<std::string, bool> hierarchical_active_;
  std::unordered_map<MessageKey, ArmedRecv, MessageKeyHash> armed_;
  std::unordered_map<MessageKey, Early, MessageKeyHash> mailbox_;
  std::size_t mailbox_bytes_ = 0;
  std::condition_variable mailbox_space_;
  std::unordered_map<MessageKey, transport::FrameHeader, MessageKeyHash> early_ready_;  // tag unused
  std::unordered_map<CollectiveKey, Tombstone, CollectiveKeyHash> tombstones_;
  std::deque<CollectiveKey> tombstone_order_;
  std::vector<std::string> lost_;         // why each rank is gone; empty while connected
  std::vector<bool> departed_;            // the rank closed its session on purpose (goodbye) rather than failing
  std::vector<std::string> drop_reason_;  // why drop_peer() ended the connection (on_lost says so)

  struct Saved {
    DType dtype;
    std::size_t count;
    std::shared_ptr<std::vector<std::byte>> bytes;
  };
  std::unordered_map<std::string, Saved> saved_;
  std::unordered_map<std::uint64_t, std::shared_ptr<PendingRequest>> requests_;
  std::uint64_t next_request_ = 1;

  std::mutex plans_mutex_;
  struct PlanKey {
    int kind, topology;
    bool recursive_doubling;
    int root;
    std::size_t count, block, segment_elems;
    std::vector<int> members;
    bool slices;
    auto operator<=>(const PlanKey&) const = default;
  };
  std::map<PlanKey, std::shared_ptr<const collective::Plan>> plans_;

  // connections_[p]: the first stream to rank p (control frames, small segments); streams_[p]: all of them.
  std::vector<std::unique_ptr<transport::Connection>> connections_;
  std::vector<std::unique_ptr<transport::Connection>> extra_streams_;
  std::vector<std::vector<transport::Connection*>> streams_;
  std::vector<int> ended_streams_;        // per rank: streams that ended with a goodbye
  std::vector<std::size_t> next_stream_;  // per rank: the stream the next large segment takes
  std::shared_ptr<ShmCollectives> shm_;
  bool shm_covers_cluster_ = false;  // every rank is on this host: shm_ runs whole collectives
  std::vector<int> shm_members_;     // the cluster's ranks of shm_'s ranks (stall queries go to them)
  std::optional<HostLayout> hierarchy_;
  mutable std::mutex links_mutex_;
  collective::LinkModel links_;
  std::shared_ptr<transport::ReceiveGate> gate_;  // null without connections
  std::vector<transport::Connection*> readers_;   // the connections, for drive()
  // More ranks on this host than CPUs its workers share (env::local_cpus(), not this process's affinity: a worker
  // bound to one CPU is not oversubscribed): waiting threads do not spin, and do not read large collectives.
  const bool oversubscribed_;
  const std::chrono::microseconds pause_;  // how long drive() spins with pause instructions
  std::condition_variable watchdog_wake_;
  std::thread watchdog_;
};

}  // namespace aikido::detail
