// The same-host path: collectives among the ranks of one host through one shared-memory segment per host
// (AIKIDO_TRANSPORT=auto). When every rank of the cluster runs on this host, allreduce, reduce_scatter, allgather,
// broadcast, barrier and consensus take it directly; when the cluster spans hosts, the inside-host phases of
// hierarchical collectives take it (engine_hierarchy.cpp). Other collectives use the message path (engine.hpp).
// Ranks here are the host's ranks, 0..size-1 in rank order (`members` maps them to the cluster's ranks, which
// messages name).
//
// Segment layout (ShmLayout computes it from the number of ranks; every process computes the same):
//   header     magic, layout version, ranks, sizes
//   doorbells  one per rank (transport/shm_segment.hpp): ring it after changing something that rank may wait for
//   names      a table of kShmEntries collective names, filled on first use and never emptied. A name is claimed
//              by whichever rank posts it first (compare-and-set on the record's state); every rank finds the same
//              record by probing from the name's hash, so records need no agreement beyond the table itself.
//              When the table is full a new name never gets a record, on any rank: such collectives take the
//              message path, consistently everywhere.
//   entries    one per name record, two halves by the parity of the occurrence. A half holds, per rank, the
//              arrival (occurrence + 1 with flag bits, and the signature: kind, type, op, count) and an inline
//              area for small inputs, plus the bay assigned to the occurrence for large ones. A rank writes the
//              half of occurrence k + 2 only after its occurrence k + 1 completed, which needed every rank to
//              arrive at k + 1, which each did only after finishing k: so no one still reads what is overwritten.
//   bays       kShmBays work areas for large collectives: an owner word, per-rank progress counters and per-rank
//              slots of two pieces each. A bay is claimed (compare-and-set of the owner) by the first rank that
//              sees every rank arrived, published in the entry half, and released when every rank has left it.
//
// Slices: rank q's slice of a buffer of `count` elements is its even share (collective::block_offset/block_count of
// count into size parts). Reduce-scatter leaves rank q the reduction of slice q, allgather gives every rank every
// rank's slice; allreduce reduces each slice on its owner and gathers them.
//
// Small collectives (what a rank contributes fits its inline area): each rank copies its contribution (its input;
// for allgather its slice; for broadcast the root's buffer) into its inline area and arrives; once all have arrived
// each rank combines the areas into its output: all areas in rank order (allreduce), its slice of each
// (reduce_scatter), each rank's slice (allgather), the root's area (broadcast); bitwise the same result on every rank.
// One synchronisation; the posting or waiting thread does all of it, no other thread wakes. A reader checks
// afterwards that no arrival word changed meanwhile (a seqlock), so a rank that gave up and moved on can cause an
// error, never a wrong result.
//
// Large collectives go through a bay, piece by piece (piece j: the j-th sub-range of every slice, at most
// piece_bytes in all; share q of piece j: slice q's part of it). Per piece each rank copies into its slot what the
// others need from it (copied): the others' shares of its input (allreduce, reduce_scatter), its own share
// (allgather), everything (the broadcast's root); reduces its own share from its input and the others' slots into
// its output, and for allreduce into its slot too (reduced); and copies the shares it lacks out of their owners'
// slots (done). Two slots per rank let piece j + 1 be copied while piece j is reduced. Memory traffic per rank is
// about 4x the buffer for an allreduce on 2 ranks.
//
// Matching keeps the library's rules: collectives meet by (name, occurrence), in any order, many in flight; the
// signature of every rank is visible to all, so a mismatch raises MismatchError on every rank before any data is
// combined. Failures: a lost peer (its sockets close; the engine calls peer_lost) fails everything in flight;
// every wait has the collective's deadline; a rank that gives up marks its arrival abandoned so the others stop too.
// Stall reports: at half the deadline the engine's watchdog asks the other ranks over the connections what they are
// waiting in (watch(), stall_reply()), so the report and the TimeoutError say it as on the socket path.
//
// Waiting: a thread in Work::wait() drives the collectives itself (spins briefly on its doorbell, then sleeps on it
// with a futex); a progress thread drives them only while no thread waits, so asynchronous work still completes.
#pragma once

#include <aikido/peer.hpp>
#include <aikido/work.hpp>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include "runtime/work_state.hpp"
#include "transport/frame.hpp"
#include "transport/shm_segment.hpp"

namespace aikido::detail {

inline constexpr std::uint32_t kShmEntries = 512;
inline constexpr std::uint32_t kShmBays = 4;

/// Offsets and sizes of the segment for `ranks` ranks.
struct ShmLayout {
  int ranks = 0;
  std::size_t inline_bytes = 0;  // per rank and half of an entry
  std::size_t piece_bytes = 0;   // per slot of a bay
  std::size_t bells = 0;
  std::size_t names = 0;
  std::size_t entries = 0;
  std::size_t entry_bytes = 0;
  std::size_t bays = 0;
  std::size_t bay_bytes = 0;
  std::size_t total = 0;
  static ShmLayout for_ranks(int ranks);
};

/// One collective on this path. Counts in elements of `dtype`; "my slice" is this rank's share of `count`:
///   allreduce       recv[count] = op over ranks of send[count] (send may be recv)
///   reduce_scatter  recv[length of my slice] = op over ranks of their send[my slice] (send holds count)
///   allgather       send[length of my slice] is this rank's slice; recv[count] receives every rank's slice, each at
///                   its place (send may be recv at my slice's place)
///   broadcast       recv[count] receives the root's recv; `root` is an index among this path's ranks
///   barrier         buffers unused
///   consensus       send[count] are the bytes compared; *agreed is set before the work completes
/// `signature_count` and `signature_root` are what every rank must have posted alike beside kind, type and op: the
/// count and root of the collective a phase belongs to (a rank that posted another size or root fails every phase
/// alike), or `count` and `root`.
struct ShmRequest {
  CollectiveKind kind{};
  DType dtype = DType::u8;
  ReduceOp op = ReduceOp::sum;
  int root = 0;
  const void* send = nullptr;
  void* recv = nullptr;
  std::size_t count = 0;
  std::uint64_t signature_count = 0;
  int signature_root = 0;
  bool* agreed = nullptr;
};

struct ShmOp;

class ShmCollectives : public std::enable_shared_from_this<ShmCollectives> {
 public:
  /// Writes the header of a freshly created segment (the creating rank, before the others map it).
  static void format(transport::SharedSegment& segment, int ranks);
  /// Throws Error unless `segment` was formatted for `ranks` ranks with this layout.
  static void check(const transport::SharedSegment& segment, int ranks);

  /// `rank` and `size`: this rank's index among the segment's ranks and their number; `members[i]`: the cluster's
  /// rank of the segment's rank i (for messages and Peer losses).
  ShmCollectives(transport::SharedSegment segment, int rank, int size, std::vector<int> members,
                 std::uint64_t cluster_version, std::chrono::milliseconds timeout);
  ~ShmCollectives();
  ShmCollectives(const ShmCollectives&) = delete;
  ShmCollectives& operator=(const ShmCollectives&) = delete;

  /// True for the kinds this path runs (every kind but gather).
  static bool handles(CollectiveKind kind) { return kind != CollectiveKind::gather; }
  /// Posts a collective of a kind handles() accepts. nullopt when its name has no record (the table is full):
  /// the caller runs it on the message path, as every other rank of this segment does. Throws ConfigError on
  /// misuse.
  std::optional<Work> post(const ShmRequest& request, std::string_view name);
  /// What a rank that will not post the next occurrence of `name` (a later phase of a hierarchical collective that
  /// failed here) does instead: it arrives with the signature `request` would have had and gives it up at once,
  /// leaving `kind` and `text` (cut to the inline area) for the others, who fail it with that error (MismatchError
  /// for a mismatch...) rather than wait for it. False when the name has no record (the table is full): the others
  /// run it on the message path, where the caller abandons it.
  bool abandon(const ShmRequest& request, std::string_view name, transport::WireError kind, const std::string& text);
  /// Cluster rank `peer` is gone (`departed`: it closed its session rather than failing). When it is one of this
  /// segment's ranks, what in flight still needs it fails, and so does every later post; a rank of another host
  /// changes nothing here.
  void peer_lost(int peer, const std::string& why, bool departed);
  /// Waits until nothing is in flight; false when `deadline` passed first.
  bool drain(std::chrono::steady_clock::time_point deadline);

  // Stall reports: the engine asks the other ranks about collectives of this path that have waited half the timeout
  // (stall_query frames over the connections) and hands their answers here.
  struct Stalled {
    std::string name;
    std::uint64_t occurrence;
  };
  /// For the engine's watchdog: returns the collectives in flight for half the timeout that nobody asked about yet
  /// (and marks them asked); logs the stall report of those that waited three quarters of it without every answer.
  std::vector<Stalled> watch(std::chrono::steady_clock::time_point now);
  /// True when this rank posted occurrence `occurrence` of `name` on this path.
  bool posted(std::string_view name, std::uint64_t occurrence);
  /// The cluster's ranks of this segment's ranks (those a stall query goes to).
  const std::vector<int>& members() const { return members_; }
  /// Cluster rank `source` answered about a stalled collective: whether it posted it, and what it is waiting in (the
  /// end of a sentence about that rank, Engine::waiting_in). Once every other rank answered, logs the stall report.
  void stall_reply(std::string_view name, std::uint64_t occurrence, int source, bool posted, std::string waiting_in);
  /// Adds this path's collectives in flight to `out`.
  void in_flight(std::vector<InFlight>& out);
  /// Fails what is in flight and stops the progress thread. Idempotent.
  void close();

 private:
  using Clock = std::chrono::steady_clock;
  struct Finished {
    std::shared_ptr<WorkState> work;
    std::exception_ptr error;
  };

  void drive(WorkState& work, Clock::time_point until);
  void progress_loop();
  // These run with mutex_ held.
  /// The name's record in the segment (-1: none, the table is full), with the cached copy of the name.
  const std::pair<const std::string, int>& entry_for(std::string_view name);
  bool advance(ShmOp& op, Clock::time_point now);
  bool advance_all(std::vector<Finished>& finished, Clock::time_point now);  // true when anything moved
  bool advance_large(ShmOp& op);
  bool join_bay(ShmOp& op);
  /// Claims the next occurrence of `name` and writes this rank's arrival (with `flags`; abandoned: with `kind` and
  /// `text` in its inline area); fills op's entry fields. Returns false when the name has no record.
  bool arrive(ShmOp& op, std::string_view name, std::uint64_t flags,
              transport::WireError kind = transport::WireError::lost, const std::string& text = {});
  /// Fails `op` (in flight) with `error`, telling the others (WorkState::cancel).
  void cancel(ShmOp& op, std::exception_ptr error);
  /// The error of rank q, which gave `op` up: the one it left in its arrival (for this occurrence or a later one
  /// on the same half), else a PeerLostError that says so (`when` ends it instead of a pointer to its own error).
  std::exception_ptr given_up(const ShmOp& op, int q, std::string_view when = {}) const;
  /// Rank q's arrival word once a copy it is making into its arrival (its error, a small input) is published.
  std::uint64_t settled_word(const ShmOp& op, int q) const;
  void combine_small(ShmOp& op);
  void leave_bay(int bay, int rank, std::uint64_t token);
  void fail(ShmOp& op, std::exception_ptr error);
  void finish(ShmOp& op);
  void collect(std::vector<Finished>& finished);
  std::string describe_wait(const ShmOp& op) const;
  // Without mutex_.
  void complete(std::vector<Finished>& finished);
  void ring_others();

  const transport::SharedSegment segment_;
  const ShmLayout layout_;
  const int rank_;
  const int size_;
  const std::vector<int> members_;
  const std::uint64_t cluster_version_;
  const std::chrono::milliseconds timeout_;
  /// A waiting thread spins on the doorbell with pause instructions for `pause_`, then yielding the core until
  /// `spin_`, then sleeps (see kPause and kSpin).
  const std::chrono::microseconds spin_;
  const std::chrono::microseconds pause_;

  std::mutex mutex_;
  std::condition_variable wake_progress_;
  std::condition_variable idle_;
  bool closing_ = false;
  int drivers_ = 0;               // threads in drive(); the progress thread stays out of the way while any are
  bool progress_asleep_ = false;  // the progress thread waits for a post to wake it (it does not poll)
  std::string lost_;              // why the cluster cannot run collectives here any more; empty while it can
  std::vector<std::shared_ptr<ShmOp>> ops_;
  struct NameHash {
    using is_transparent = void;
    std::size_t operator()(std::string_view name) const { return std::hash<std::string_view>()(name); }
  };
  // -1: no record (the table was full). Never erased: ops point at the keys.
  std::unordered_map<std::string, int, NameHash, std::equal_to<>> entry_of_name_;
  std::vector<std::uint64_t> posted_;  // occurrences posted, per entry
  std::vector<bool> busy_;             // an occurrence of the entry is in flight
  std::thread progress_;
};

}  // namespace aikido::detail
