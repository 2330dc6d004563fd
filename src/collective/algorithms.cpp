#include "collective/algorithms.hpp"

#include <algorithm>

#include "base/error.hpp"

namespace aikido::collective {
namespace {

// A group of ranks taking part in one phase, in the order the algorithm uses (members[0] is the root of trees
// and stars), and this rank's index in it.
struct Group {
  std::vector<int> members;
  int index = -1;
  int size() const { return int(members.size()); }
};

Group make_group(std::vector<int> members, int rank) {
  Group g;
  g.members = std::move(members);
  for (int i = 0; i < g.size(); ++i) {
    if (g.members[std::size_t(i)] == rank) g.index = i;
  }
  return g;
}

// All ranks, rotated so that `root` comes first.
Group rotated(int size, int root, int rank) {
  std::vector<int> members(static_cast<std::size_t>(size));
  for (int i = 0; i < size; ++i) members[std::size_t(i)] = (root + i) % size;
  return make_group(std::move(members), rank);
}

struct Range {
  std::size_t offset;
  std::size_t count;
};

std::vector<Range> even_blocks(std::size_t offset, std::size_t count, int parts) {
  std::vector<Range> blocks(static_cast<std::size_t>(parts));
  for (int b = 0; b < parts; ++b) {
    blocks[std::size_t(b)] = {offset + block_offset(count, parts, b), block_count(count, parts, b)};
  }
  return blocks;
}

int mod(int a, int n) { return ((a % n) + n) % n; }

// Ring reduce-scatter: after it, member i holds the full reduction of blocks[i].
// Step s: send block (i - s - 1) to the right, reduce block (i - s - 2) from the left.
void ring_reduce_scatter(PlanBuilder& b, const Group& g, const std::vector<Range>& blocks, unsigned phase,
                         std::size_t seg) {
  const int n = g.size(), i = g.index;
  if (n < 2) return;
  const int right = g.members[std::size_t(mod(i + 1, n))], left = g.members[std::size_t(mod(i - 1, n))];
  for (int s = 0; s < n - 1; ++s) {
    const Range out = blocks[std::size_t(mod(i - s - 1, n))];
    const Range in = blocks[std::size_t(mod(i - s - 2, n))];
    for_each_segment(out.offset, out.count, seg,
                     [&](std::size_t o, std::size_t c) { b.send(right, make_tag(phase, unsigned(s), o), o, c); });
    for_each_segment(in.offset, in.count, seg,
                     [&](std::size_t o, std::size_t c) { b.recv_reduce(left, make_tag(phase, unsigned(s), o), o, c); });
  }
}

// Ring allgather: member i starts with blocks[i] and ends with all of them.
// Step s: send block (i - s) to the right, receive block (i - s - 1) from the left.
void ring_allgather(PlanBuilder& b, const Group& g, const std::vector<Range>& blocks, unsigned phase, std::size_t seg) {
  const int n = g.size(), i = g.index;
  if (n < 2) return;
  const int right = g.members[std::size_t(mod(i + 1, n))], left = g.members[std::size_t(mod(i - 1, n))];
  for (int s = 0; s < n - 1; ++s) {
    const Range out = blocks[std::size_t(mod(i - s, n))];
    const Range in = blocks[std::size_t(mod(i - s - 1, n))];
    for_each_segment(out.offset, out.count, seg,
                     [&](std::size_t o, std::size_t c) { b.send(right, make_tag(phase, unsigned(s), o), o, c); });
    for_each_segment(in.offset, in.count, seg,
                     [&](std::size_t o, std::size_t c) { b.recv_copy(left, make_tag(phase, unsigned(s), o), o, c); });
  }
}

// Binary tree over group indices: parent (i - 1) / 2, children 2i + 1 and 2i + 2.
void tree_reduce(PlanBuilder& b, const Group& g, Range r, unsigned phase, std::size_t seg) {
  const int n = g.size(), i = g.index;
  for_each_segment(r.offset, r.count, seg, [&](std::size_t o, std::size_t c) {
    for (int child : {2 * i + 1, 2 * i + 2}) {
      if (child < n) b.recv_reduce(g.members[std::size_t(child)], make_tag(phase, 0, o), o, c);
    }
    if (i > 0) b.send(g.members[std::size_t((i - 1) / 2)], make_tag(phase, 0, o), o, c);
  });
}

void tree_broadcast(PlanBuilder& b, const Group& g, Range r, unsigned phase, std::size_t seg) {
  const int n = g.size(), i = g.index;
  for_each_segment(r.offset, r.count, seg, [&](std::size_t o, std::size_t c) {
    if (i > 0) b.recv_copy(g.members[std::size_t((i - 1) / 2)], make_tag(phase, 0, o), o, c);
    for (int child : {2 * i + 1, 2 * i + 2}) {
      if (child < n) b.send(g.members[std::size_t(child)], make_tag(phase, 0, o), o, c);
    }
  });
}

void star_reduce(PlanBuilder& b, const Group& g, Range r, unsigned phase, std::size_t seg) {
  const int n = g.size();
  if (g.index == 0) {
    for (int m = 1; m < n; ++m) {
      for_each_segment(r.offset, r.count, seg, [&](std::size_t o, std::size_t c) {
        b.recv_reduce(g.members[std::size_t(m)], make_tag(phase, 0, o), o, c);
      });
    }
  } else {
    for_each_segment(r.offset, r.count, seg,
                     [&](std::size_t o, std::size_t c) { b.send(g.members[0], make_tag(phase, 0, o), o, c); });
  }
}

void star_broadcast(PlanBuilder& b, const Group& g, Range r, unsigned phase, std::size_t seg) {
  const int n = g.size();
  for_each_segment(r.offset, r.count, seg, [&](std::size_t o, std::size_t c) {
    if (g.index == 0) {
      for (int m = 1; m < n; ++m) b.send(g.members[std::size_t(m)], make_tag(phase, 0, o), o, c);
    } else {
      b.recv_copy(g.members[0], make_tag(phase, 0, o), o, c);
    }
  });
}

// Chain broadcast (the ring topology's broadcast): each member forwards each segment to the next one.
void chain_broadcast(PlanBuilder& b, const Group& g, Range r, unsigned phase, std::size_t seg) {
  const int n = g.size(), i = g.index;
  for_each_segment(r.offset, r.count, seg, [&](std::size_t o, std::size_t c) {
    if (i > 0) b.recv_copy(g.members[std::size_t(i - 1)], make_tag(phase, 0, o), o, c);
    if (i + 1 < n) b.send(g.members[std::size_t(i + 1)], make_tag(phase, 0, o), o, c);
  });
}

// Rank i's block goes to members[0]; the root copies each into place (gather into a star).
void star_gather(PlanBuilder& b, const Group& g, const std::vector<Range>& blocks, unsigned phase, std::size_t seg,
                 std::size_t own_offset) {
  if (g.index == 0) {
    for (int m = 1; m < g.size(); ++m) {
      const int rank = g.members[std::size_t(m)];
      const Range block = blocks[std::size_t(rank)];
      for_each_segment(block.offset, block.count, seg, [&](std::size_t o, std::size_t c) {
        b.recv_copy(rank, make_tag(phase, 0, o - block.offset), o, c);
      });
    }
  } else {
    const Range block{own_offset, blocks[std::size_t(g.members[std::size_t(g.index)])].count};
    for_each_segment(block.offset, block.count, seg, [&](std::size_t o, std::size_t c) {
      b.send(g.members[0], make_tag(phase, 0, o - block.offset), o, c);
    });
  }
}

// Hierarchical groups: the ranks of this rank's host (leader first), and the leaders of all hosts.
void host_groups(const PlanSpec& spec, Group* local, Group* leaders) {
  AIKIDO_ENFORCE(int(spec.host_of_rank.size()) == spec.size, "host_of_rank has ", spec.host_of_rank.size(),
                 " entries for ", spec.size, " ranks");
  std::vector<int> mine, heads;
  std::vector<bool> seen;
  for (int r = 0; r < spec.size; ++r) {
    const int h = spec.host_of_rank[std::size_t(r)];
    if (std::size_t(h) >= seen.size()) seen.resize(std::size_t(h) + 1, false);
    if (!seen[std::size_t(h)]) {
      seen[std::size_t(h)] = true;
      heads.push_back(r);
    }
    if (h == spec.host_of_rank[std::size_t(spec.rank)]) mine.push_back(r);
  }
  *local = make_group(std::move(mine), spec.rank);
  *leaders = make_group(std::move(heads), spec.rank);
}

// Recursive doubling over all ranks (a power of two of them): see PlanSpec::recursive_doubling.
void recursive_doubling(PlanBuilder& b, int size, int rank, Range r, unsigned phase, std::size_t seg) {
  AIKIDO_ENFORCE(size > 0 && (size & (size - 1)) == 0, "recursive doubling needs a power-of-two number of ranks, not ",
                 size);
  for (int step = 0; (1 << step) < size; ++step) {
    const int partner = rank ^ (1 << step);
    for_each_segment(r.offset, r.count, seg, [&](std::size_t o, std::size_t c) {
      b.send(partner, make_tag(phase, unsigned(step), o), o, c);
      b.recv_reduce(partner, make_tag(phase, unsigned(step), o), o, c);
    });
  }
}

Plan allreduce_plan(const PlanSpec& spec) {
  PlanBuilder b;
  const std::size_t seg = spec.segment_elems;
  const Range all{0, spec.count};
  const Group everyone = rotated(spec.size, 0, spec.rank);
  if (spec.recursive_doubling) {
    recursive_doubling(b, spec.size, spec.rank, all, 1, seg);
    return b.finish();
  }
  switch (spec.topology) {
    case Topology::ring: {
      const auto blocks = even_blocks(0, spec.count, spec.size);
      ring_reduce_scatter(b, everyone, blocks, 1, seg);
      ring_allgather(b, everyone, blocks, 2, seg);
      break;
    }
    case Topology::tree:
      tree_reduce(b, everyone, all, 1, seg);
      tree_broadcast(b, everyone, all, 2, seg);
      break;
    case Topology::star:
      star_reduce(b, everyone, all, 1, seg);
      star_broadcast(b, everyone, all, 2, seg);
      break;
    case Topology::hierarchical: {
      Group local, leaders;
      host_groups(spec, &local, &leaders);
      tree_reduce(b, local, all, 1, seg);
      if (leaders.index >= 0) {
        const auto blocks = even_blocks(0, spec.count, leaders.size());
        ring_reduce_scatter(b, leaders, blocks, 2, seg);
        ring_allgather(b, leaders, blocks, 3, seg);
      }
      tree_broadcast(b, local, all, 4, seg);
      break;
    }
  }
  return b.finish();
}

Plan broadcast_plan(const PlanSpec& spec) {
  PlanBuilder b;
  const Group g = rotated(spec.size, spec.root, spec.rank);
  const Range all{0, spec.count};
  switch (spec.topology) {
    case Topology::ring:
      chain_broadcast(b, g, all, 1, spec.segment_elems);
      break;
    case Topology::star:
      star_broadcast(b, g, all, 1, spec.segment_elems);
      break;
    case Topology::tree:
    case Topology::hierarchical:
      tree_broadcast(b, g, all, 1, spec.segment_elems);
      break;
  }
  return b.finish();
}

std::vector<Range> rank_blocks(int size, std::size_t block) {
  std::vector<Range> blocks(static_cast<std::size_t>(size));
  for (int r = 0; r < size; ++r) blocks[std::size_t(r)] = {std::size_t(r) * block, block};
  return blocks;
}

Plan allgather_plan(const PlanSpec& spec) {
  PlanBuilder b;
  const auto blocks = rank_blocks(spec.size, spec.block);
  const Group everyone = rotated(spec.size, 0, spec.rank);
  if (spec.topology == Topology::ring) {
    ring_allgather(b, everyone, blocks, 1, spec.segment_elems);
  } else {
    star_gather(b, everyone, blocks, 1, spec.segment_elems, blocks[std::size_t(spec.rank)].offset);
    const Range all{0, spec.count};
    if (spec.topology == Topology::star) {
      star_broadcast(b, everyone, all, 2, spec.segment_elems);
    } else {
      tree_broadcast(b, everyone, all, 2, spec.segment_elems);
    }
  }
  return b.finish();
}

Plan reduce_scatter_plan(const PlanSpec& spec) {
  PlanBuilder b;
  const auto blocks = rank_blocks(spec.size, spec.block);
  const Group everyone = rotated(spec.size, 0, spec.rank);
  if (spec.topology == Topology::ring) {
    ring_reduce_scatter(b, everyone, blocks, 1, spec.segment_elems);
    return b.finish();
  }
  const Range all{0, spec.count};
  if (spec.topology == Topology::star) {
    star_reduce(b, everyone, all, 1, spec.segment_elems);
  } else {
    tree_reduce(b, everyone, all, 1, spec.segment_elems);
  }
  // Scatter: the root sends block r to rank r.
  for (int r = 1; r < spec.size; ++r) {
    const Range block = blocks[std::size_t(r)];
    for_each_segment(block.offset, block.count, spec.segment_elems, [&](std::size_t o, std::size_t c) {
      if (spec.rank == 0) b.send(r, make_tag(2, 0, o), o, c);
      if (spec.rank == r) b.recv_copy(0, make_tag(2, 0, o), o, c);
    });
  }
  return b.finish();
}

Plan gather_plan(const PlanSpec& spec) {
  PlanBuilder b;
  const auto blocks = rank_blocks(spec.size, spec.block);
  const Group g = rotated(spec.size, spec.root, spec.rank);
  star_gather(b, g, blocks, 1, spec.segment_elems, 0);
  return b.finish();
}

}  // namespace

std::size_t block_offset(std::size_t count, int parts, int b) {
  const std::size_t base = count / std::size_t(parts), extra = count % std::size_t(parts);
  return std::size_t(b) * base + std::min<std::size_t>(std::size_t(b), extra);
}

std::size_t block_count(std::size_t count, int parts, int b) {
  const std::size_t base = count / std::size_t(parts), extra = count % std::size_t(parts);
  return base + (std::size_t(b) < extra ? 1 : 0);
}

namespace {

// Every other rank checks this rank's signature and this rank checks theirs (see Plan::ready_from).
Plan checked_by_everyone(Plan plan, const PlanSpec& spec) {
  auto has = [](const std::vector<int>& ranks, int p) {
    return std::find(ranks.begin(), ranks.end(), p) != ranks.end();
  };
  plan.ready_to.clear();
  plan.ready_from.clear();
  for (int p = 0; p < spec.size; ++p) {
    if (p == spec.rank) continue;
    plan.ready_from.push_back(p);
    const bool source = has(plan.sources, p), target = has(plan.targets, p);
    if (source || !target) plan.ready_to.push_back(p);
    // A source this rank sends nothing to sends it no `ready` (see above): its data is its signature.
    if (source && !target) plan.ready_in_data.push_back(p);
  }
  return plan;
}

}  // namespace

Plan build_plan(const PlanSpec& spec) {
  AIKIDO_ENFORCE(spec.size >= 1 && spec.rank >= 0 && spec.rank < spec.size, "rank ", spec.rank, " of ", spec.size);
  AIKIDO_ENFORCE(spec.segment_elems >= 1, "segment of ", spec.segment_elems, " elements");
  if (spec.size == 1) return Plan{};
  switch (spec.kind) {
    case CollectiveKind::allreduce:
    case CollectiveKind::barrier:
    case CollectiveKind::consensus:
      return allreduce_plan(spec);
    case CollectiveKind::broadcast:
      return checked_by_everyone(broadcast_plan(spec), spec);
    case CollectiveKind::allgather:
      return allgather_plan(spec);
    case CollectiveKind::reduce_scatter:
      return reduce_scatter_plan(spec);
    case CollectiveKind::gather:
      return checked_by_everyone(gather_plan(spec), spec);
  }
  throw Error(detail::str_cat("no plan for collective kind ", int(spec.kind)));
}

}  // namespace aikido::collective
