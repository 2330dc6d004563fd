// Plans: what one rank does in one collective, as a graph of operations built once and run many times.
//
// Terms, used everywhere in src/collective and src/runtime:
//   buffer   the memory a plan works on: the receive buffer, or a pooled workspace; offsets index into it.
//   element  one value of the collective's type; offsets and counts are in elements, never bytes.
//   block    the 1/n share of the buffer that one ring step moves (block b spans block_range(b)).
//   segment  a piece of at most `segment_elems` elements: the unit of one message. Blocks (or the whole buffer,
//            in tree and star plans) are cut into segments so that consecutive segments pipeline.
//   op       one send or receive of one segment with one peer. A receive either copies the segment into the
//            buffer or reduces it into what the buffer holds.
//   tag      names one message of a plan between two ranks: (phase, step, offset of its segment). Receivers match on
//            (collective name, occurrence, tag, source rank), never on arrival order.
//   input    where the buffer's initial values come from when they live elsewhere (an out-of-place allreduce's
//            send buffer). An op marked `from_input` touches a region no earlier op has written: a send reads it
//            from the input, a reduction combines the input with what arrives (no copy of the input up front).
//
// Dependencies between ops are inferred from the regions they touch (read after write, write after read, write
// after write), so ops on different segments run concurrently and a plan is correct by construction.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <utility>
#include <vector>

namespace aikido::collective {

enum class OpKind : std::uint8_t { send, recv_copy, recv_reduce };

struct Op {
  OpKind kind;
  int peer;
  std::uint64_t tag;
  std::size_t offset;       // elements into the buffer
  std::size_t count;        // elements
  bool from_input = false;  // no earlier op wrote this region: its values are still the input's
};

/// Phase in the top 8 bits, step in the next 16, segment offset in the low 40 (offsets are below 2^40 elements).
inline std::uint64_t make_tag(unsigned phase, unsigned step, std::size_t offset) {
  return (std::uint64_t(phase) << 56) | (std::uint64_t(step & 0xffffu) << 40) |
         (std::uint64_t(offset) & ((std::uint64_t(1) << 40) - 1));
}

struct Plan {
  std::vector<Op> ops;
  /// dependents[i]: ops that may start once op i completed.
  std::vector<std::vector<std::uint32_t>> dependents;
  /// dependency_count[i]: how many ops must complete before op i may start.
  std::vector<std::uint32_t> dependency_count;
  /// Ranks this rank receives from / sends to, each once.
  std::vector<int> sources;
  std::vector<int> targets;
  /// The signature check (engine.hpp, "Agreement"): ranks this rank sends its `ready` to, and ranks whose `ready`
  /// it needs before it completes, or whose data frames (signed alike) stand for their `ready` (ready_in_data).
  /// Sources and targets, unless the result of some rank does not depend on every other rank (broadcast, gather):
  /// then every other rank, so that a rank that posted differently is seen by all, not only by its neighbours. A
  /// rank's data then tells its targets its signature, so it sends them no `ready` unless they also send it data
  /// (which waits for that `ready`).
  std::vector<int> ready_to;
  std::vector<int> ready_from;
  std::vector<int> ready_in_data;
  /// The regions some op writes, sorted and merged ([begin, end) in elements). Any other element of the buffer
  /// keeps its input value: a caller with a separate input copies those elements in.
  std::vector<std::pair<std::size_t, std::size_t>> written;
  /// True when an op touches a region that earlier ops wrote only in part: such a plan cannot read its input in
  /// place, and the caller copies the whole input into the buffer first (no plan built here does this).
  bool mixed_input = false;
};

/// Builds a plan op by op, inferring dependencies from overlapping regions.
class PlanBuilder {
 public:
  void send(int peer, std::uint64_t tag, std::size_t offset, std::size_t count);
  void recv_copy(int peer, std::uint64_t tag, std::size_t offset, std::size_t count);
  void recv_reduce(int peer, std::uint64_t tag, std::size_t offset, std::size_t count);
  Plan finish();

 private:
  void add(OpKind kind, int peer, std::uint64_t tag, std::size_t offset, std::size_t count);
  Plan plan_;
  std::map<std::size_t, std::size_t> written_;  // begin -> end, merged
};

/// Splits [offset, offset + count) into segments of at most `segment_elems` elements and calls fn(offset, count)
/// for each. An empty range yields one empty segment, so that every planned message is sent even when there is
/// nothing to carry (this keeps mismatch detection and completion uniform).
template <class Fn>
void for_each_segment(std::size_t offset, std::size_t count, std::size_t segment_elems, Fn&& fn) {
  if (count == 0) {
    fn(offset, std::size_t(0));
    return;
  }
  for (std::size_t done = 0; done < count; done += segment_elems) {
    fn(offset + done, std::min(segment_elems, count - done));
  }
}

}  // namespace aikido::collective
