// The algorithms: free functions that build a rank's plan for one collective on one topology.
#pragma once

#include <aikido/peer.hpp>
#include <aikido/types.hpp>
#include <cstddef>
#include <vector>

#include "collective/plan.hpp"

namespace aikido::collective {

using detail::CollectiveKind;

/// Everything that determines a plan; equal specs give equal plans (the engine caches plans by spec).
struct PlanSpec {
  CollectiveKind kind = CollectiveKind::allreduce;
  Topology topology = Topology::ring;
  int rank = 0;
  int size = 1;
  int root = 0;
  /// The ranks taking part, in the order the algorithm uses (the ring's order, the tree's heap order with the first
  /// as its root); empty: every rank in rank order. The phases of a hierarchical collective run among groups of
  /// ranks; a topology chosen from measured links may order the ranks (a slow host as a leaf of the tree).
  std::vector<int> members;
  /// Elements in the buffer: allreduce and broadcast: the tensor; allgather, reduce_scatter and gather (root):
  /// members * block; gather on other ranks: block.
  std::size_t count = 0;
  /// Elements per member for allgather, reduce_scatter and gather; member i's block lies at offset i * block.
  std::size_t block = 0;
  /// Allgather and reduce_scatter: member i's block is its even share of `count` instead (block_offset/block_count).
  bool slices = false;
  std::size_t segment_elems = 1;
  /// Host group of each rank (0..hosts-1), used by the hierarchical topology.
  std::vector<int> host_of_rank;
  /// Allreduce on a power-of-two number of members only: recursive doubling, which ignores `topology`. At step s
  /// each member sends its whole buffer to the member whose index differs in bit s and reduces that rank's buffer into
  /// its own: log2(n) hops, the fewest there are, at n log2(n) whole-buffer messages, so it suits small buffers. Both
  /// ranks of a pair reduce the same two values (a + b on one, b + a on the other), so all ranks end bit-equal.
  bool recursive_doubling = false;
};

/// Builds the plan. Allreduce and reduce_scatter leave the reduction in the buffer (the caller divides for mean
/// and copies the block out for reduce_scatter).
Plan build_plan(const PlanSpec& spec);

/// The even split of `count` elements into `parts` blocks: block b starts at block_offset and has block_count.
std::size_t block_offset(std::size_t count, int parts, int b);
std::size_t block_count(std::size_t count, int parts, int b);

}  // namespace aikido::collective
