// The same-host path: allreduce, barrier and consensus through one shared-memory segment when every rank of the
// cluster runs on this host (AIKIDO_TRANSPORT=auto). Other collectives, and clusters that span hosts, use the
// message path (engine.hpp).
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
// Small collectives (input up to inline_bytes): each rank copies its input into its inline area and arrives;
// once all have arrived each rank reduces all areas in rank order into its output (bitwise the same result on every
// rank). One synchronisation; the posting or waiting thread does all of it, no other thread wakes. A reader checks
// afterwards that no arrival word changed meanwhile (a seqlock), so a rank that gave up and moved on can cause an
// error, never a wrong result.
//
// Large collectives go through a bay, piece by piece (piece: at most piece_bytes of the buffer; share: the 1/n of a
// piece that one rank reduces). Per piece each rank copies the other ranks' shares of its input into its slot
// (copied), reduces its own share from its input and the others' slots into its output and its slot (reduced), and
// copies the other shares of the result out of their owners' slots (done). Two slots per rank let piece j + 1 be
// copied while piece j is reduced. Memory traffic per rank is about 4x the buffer for 2 ranks.
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

struct ShmOp;

class ShmCollectives : public std::enable_shared_from_this<ShmCollectives> {
 public:
  /// Writes the header of a freshly created segment (the creating rank, before the others map it).
  static void format(transport::SharedSegment& segment, int ranks);
  /// Throws Error unless `segment` was formatted for `ranks` ranks with this layout.
  static void check(const transport::SharedSegment& segment, int ranks);

  ShmCollectives(transport::SharedSegment segment, int rank, int size, std::uint64_t cluster_version,
                 std::chrono::milliseconds timeout);
  ~ShmCollectives();
  ShmCollectives(const ShmCollectives&) = delete;
  ShmCollectives& operator=(const ShmCollectives&) = delete;

  /// True for the kinds this path runs.
  static bool handles(CollectiveKind kind) {
    return kind == CollectiveKind::allreduce || kind == CollectiveKind::barrier || kind == CollectiveKind::consensus;
  }
  /// Posts a collective of a kind handles() accepts. nullopt when its name has no record (the table is full):
  /// the caller runs it on the message path, as every other rank does. Throws ConfigError on misuse.
  std::optional<Work> post(const Request& request, std::string_view name);
  /// Rank `peer` is gone (`departed`: it closed its session rather than failing): what in flight still needs it
  /// fails, and so does every later post.
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
  /// Rank `source` answered about a stalled collective: whether it posted it, and what it is waiting in (the end of
  /// a sentence about that rank, Engine::waiting_in). Once every other rank answered, logs the stall report.
  void stall_reply(std::string_view name, std::uint64_t occurrence, int source, bool posted, std::string waiting_in);
  /// Adds this path's collectives in flight to `out`.
  void in_flight(std::vector<InFlight>& out);
  /// Collectives posted here, and those that found the table of names full (they took the message path).
  std::pair<std::uint64_t, std::uint64_t> post_counts();
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
  std::vector<std::uint64_t> posted_;   // occurrences posted, per entry
  std::vector<bool> busy_;              // an occurrence of the entry is in flight
  std::uint64_t posts_ = 0;             // collectives posted on this path
  std::uint64_t table_full_posts_ = 0;  // collectives whose name found no record
  std::thread progress_;
};

}  // namespace aikido::detail
