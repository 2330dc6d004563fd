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
// Files: engine.cpp posts, runs and finishes collectives; engine_wait.cpp is the waiting above; engine_failures.cpp
// fails collectives, handles lost peers and runs the watchdog (timeouts, descriptions of stalled collectives). The
// Collective record they share is in engine_collective.hpp.
#pragma once

#include <aikido/peer.hpp>
#include <aikido/work.hpp>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "collective/algorithms.hpp"
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
  /// Takes ownership of one connected, authenticated socket per other rank (index = rank; the own slot is empty).
  /// `shm`, when given, runs allreduce, barrier and consensus through shared memory (every rank is on this host).
  Engine(PeerConfig config, ClusterInfo cluster, std::vector<transport::Socket> sockets,
         std::shared_ptr<ShmCollectives> shm = nullptr);
  ~Engine() override;

  const PeerConfig& config() const { return config_; }
  const ClusterInfo& cluster() const { return cluster_; }
  Topology topology() const;
  void set_topology(Topology topology);

  Work post(const Request& request);
  void save(std::string_view name, DType dtype, const void* data, std::size_t count);
  Work request(int target, std::string_view name, DType dtype, void* out, std::size_t count);

  /// Waits until no collective is in flight (used before switching topology).
  void drain();
  /// Ranks whose connection ended, in increasing order.
  std::vector<int> lost_ranks() const;
  /// Ends the connection to rank `p` as if it had been lost, naming `why` (Peer::mark_lost).
  void drop_peer(int p, const std::string& why);
  PathCounts path_counts() const;

  void on_frame(transport::Connection& connection, const transport::FrameHeader& header,
                const std::string& name) override;
  void on_lost(transport::Connection& connection, const std::string& reason, bool goodbye) override;

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
    std::vector<std::pair<int, transport::OutgoingFrame>> sends;
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
                           const std::string& payload, int except, std::uint64_t tag = 0);
  /// Answers a stall_query: whether this rank posted (name, seq) on the path the query names, and waiting_in().
  void answer_stall_query(const transport::FrameHeader& header, const std::string& name);
  void receive_stall_reply(transport::Connection& connection, const transport::FrameHeader& header,
                           const std::string& name);
  /// What this rank is waiting in, as the end of a sentence that begins "rank R ": "is waiting in allreduce 'x'
  /// (seq 3)", "is in no collective", ...
  std::string waiting_in() const;
  void send_ready(const Collective& c, int peer);
  void on_ready(const std::shared_ptr<Collective>& c, const transport::FrameHeader& header, Progress& progress);
  /// True when `c` still needs something from `peer` that has not arrived yet.
  bool needs_peer(const Collective& c, int peer) const;

  // Runs deferred copies and completions; takes and releases `lock` as needed; returns with it released.
  void run(std::unique_lock<std::mutex>& lock, Progress& progress);
  void finish_collective(Collective& c);

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

  const PeerConfig config_;
  const ClusterInfo cluster_;
  BufferPool pool_;

  mutable std::mutex mutex_;
  std::condition_variable idle_;  // signalled when a collective finishes
  Topology topology_;
  bool closing_ = false;
  std::unordered_map<CollectiveKey, std::shared_ptr<Collective>, CollectiveKeyHash> active_;
  std::unordered_map<std::string, std::uint64_t> posted_count_;
  std::uint64_t socket_posts_ = 0;  // collectives posted on the message path
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
  std::map<std::tuple<int, int, bool, int, std::size_t, std::size_t, std::size_t>,
           std::shared_ptr<const collective::Plan>>
      plans_;

  std::vector<std::unique_ptr<transport::Connection>> connections_;
  std::shared_ptr<ShmCollectives> shm_;
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
