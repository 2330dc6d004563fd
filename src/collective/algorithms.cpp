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

// The ranks taking part (PlanSpec::members, or every rank in rank order), in the algorithm's order.
std::vector<int> base_members(const PlanSpec& spec) {
  if (!spec.members.empty()) return spec.members;
  std::vector<int> members(static_cast<std::size_t>(spec.size));
  for (int i = 0; i < spec.size; ++i) members[std::size_t(i)] = i;
  return members;
}

// The ranks taking part, rotated so that `root` (one of them) comes first.
Group rotated(const PlanSpec& spec, int root) {
  std::vector<int> members = base_members(spec);
  const auto at = std::find(members.begin(), members.end(), root);
  AIKIDO_ENFORCE(at != members.end(), "root ", root, " does not take part in the collective");
  std::rotate(members.begin(), at, members.end());
  return make_group(std::move(members), spec.rank);
}

// The same members in the opposite direction, `first` staying first (the second ring of multi_ring).
Group reversed(const Group& g, int rank) {
  std::vector<int> members = g.members;
  if (members.size() > 1) std::reverse(members.begin() + 1, members.end());
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

// Every member's block goes to members[0], which copies each into place (gather into a star). `blocks[i]` is where
// g.members[i]'s block lies in the root's buffer; a non-root sends its own from `own_offset` of its buffer.
void star_gather(PlanBuilder& b, const Group& g, const std::vector<Range>& blocks, unsigned phase, std::size_t seg,
                 std::size_t own_offset) {
  if (g.index == 0) {
    for (int m = 1; m < g.size(); ++m) {
      const int rank = g.members[std::size_t(m)];
      const Range block = blocks[std::size_t(m)];
      for_each_segment(block.offset, block.count, seg, [&](std::size_t o, std::size_t c) {
        b.recv_copy(rank, make_tag(phase, 0, o - block.offset), o, c);
      });
    }
  } else {
    const Range block{own_offset, blocks[std::size_t(g.index)].count};
    for_each_segment(block.offset, block.count, seg, [&](std::size_t o, std::size_t c) {
      b.send(g.members[0], make_tag(phase, 0, o - block.offset), o, c);
    });
  }
}

// Hierarchical groups: the members on this rank's host (first member first), and the first member of every host.
void host_groups(const PlanSpec& spec, Group* local, Group* leaders) {
  AIKIDO_ENFORCE(int(spec.host_of_rank.size()) == spec.size, "host_of_rank has ", spec.host_of_rank.size(),
                 " entries for ", spec.size, " ranks");
  std::vector<int> mine, heads;
  std::vector<bool> seen;
  for (int r : base_members(spec)) {
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

// Recursive doubling over the members (a power of two of them): see PlanSpec::recursive_doubling.
void recursive_doubling(PlanBuilder& b, const Group& g, Range r, unsigned phase, std::size_t seg) {
  const int size = g.size();
  AIKIDO_ENFORCE(size > 0 && (size & (size - 1)) == 0, "recursive doubling needs a power-of-two number of ranks, not ",
                 size);
  for (int step = 0; (1 << step) < size; ++step) {
    const int partner = g.members[std::size_t(g.index ^ (1 << step))];
    for_each_segment(r.offset, r.count, seg, [&](std::size_t o, std::size_t c) {
      b.send(partner, make_tag(phase, unsigned(step), o), o, c);
      b.recv_reduce(partner, make_tag(phase, unsigned(step), o), o, c);
    });
  }
}

// The two halves of a range, for the two rings of multi_ring.
std::pair<Range, Range> halves(Range r) {
  const std::size_t first = r.count / 2 + r.count % 2;
  return {Range{r.offset, first}, Range{r.offset + first, r.count - first}};
}

Plan allreduce_plan(const PlanSpec& spec) {
  PlanBuilder b;
  const std::size_t seg = spec.segment_elems;
  const Range all{0, spec.count};
  const Group everyone = make_group(base_members(spec), spec.rank);
  if (spec.recursive_doubling) {
    recursive_doubling(b, everyone, all, 1, seg);
    return b.finish();
  }
  switch (spec.topology) {
    case Topology::ring:
    case Topology::automatic: {  // the engine resolves automatic before it plans; ring stands in for it here
      const auto blocks = even_blocks(0, spec.count, everyone.size());
      ring_reduce_scatter(b, everyone, blocks, 1, seg);
      ring_allgather(b, everyone, blocks, 2, seg);
      break;
    }
    case Topology::multi_ring: {
      // Two rings in opposite directions, each over half the buffer: every rank sends to both neighbours and
      // receives from both at once, over two connections.
      const auto [first, second] = halves(all);
      const Group backwards = reversed(everyone, spec.rank);
      const auto forward_blocks = even_blocks(first.offset, first.count, everyone.size());
      const auto backward_blocks = even_blocks(second.offset, second.count, everyone.size());
      ring_reduce_scatter(b, everyone, forward_blocks, 1, seg);
      ring_reduce_scatter(b, backwards, backward_blocks, 3, seg);
      ring_allgather(b, everyone, forward_blocks, 2, seg);
      ring_allgather(b, backwards, backward_blocks, 4, seg);
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
  const Group g = rotated(spec, spec.root);
  const Range all{0, spec.count};
  switch (spec.topology) {
    case Topology::ring:
    case Topology::automatic:
      chain_broadcast(b, g, all, 1, spec.segment_elems);
      break;
    case Topology::multi_ring: {
      const auto [first, second] = halves(all);
      chain_broadcast(b, g, first, 1, spec.segment_elems);
      chain_broadcast(b, reversed(g, spec.rank), second, 2, spec.segment_elems);
      break;
    }
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

// Member i's block of `block` elements at offset i * block.
std::vector<Range> member_blocks(int members, std::size_t block) {
  std::vector<Range> blocks(static_cast<std::size_t>(members));
  for (int i = 0; i < members; ++i) blocks[std::size_t(i)] = {std::size_t(i) * block, block};
  return blocks;
}

// The first or second half of every block (multi_ring's two rings), in the order of `g`'s members: `blocks[i]`
// belongs to `base.members[i]`.
std::vector<Range> half_blocks(const std::vector<Range>& blocks, bool second, const Group& base, const Group& g) {
  std::vector<Range> out;
  for (int member : g.members) {
    const auto i = std::size_t(std::find(base.members.begin(), base.members.end(), member) - base.members.begin());
    out.push_back(second ? halves(blocks[i]).second : halves(blocks[i]).first);
  }
  return out;
}

Plan allgather_plan(const PlanSpec& spec) {
  PlanBuilder b;
  const Group everyone = make_group(base_members(spec), spec.rank);
  const auto blocks =
      spec.slices ? even_blocks(0, spec.count, everyone.size()) : member_blocks(everyone.size(), spec.block);
  const std::size_t seg = spec.segment_elems;
  if (spec.topology == Topology::ring || spec.topology == Topology::automatic) {
    ring_allgather(b, everyone, blocks, 1, seg);
  } else if (spec.topology == Topology::multi_ring) {
    const Group backwards = reversed(everyone, spec.rank);
    ring_allgather(b, everyone, half_blocks(blocks, false, everyone, everyone), 1, seg);
    ring_allgather(b, backwards, half_blocks(blocks, true, everyone, backwards), 2, seg);
  } else {
    star_gather(b, everyone, blocks, 1, seg, blocks[std::size_t(everyone.index)].offset);
    const Range all{0, spec.count};
    if (spec.topology == Topology::star) {
      star_broadcast(b, everyone, all, 2, seg);
    } else {
      tree_broadcast(b, everyone, all, 2, seg);
    }
  }
  return b.finish();
}

Plan reduce_scatter_plan(const PlanSpec& spec) {
  PlanBuilder b;
  const Group everyone = make_group(base_members(spec), spec.rank);
  const auto blocks =
      spec.slices ? even_blocks(0, spec.count, everyone.size()) : member_blocks(everyone.size(), spec.block);
  const std::size_t seg = spec.segment_elems;
  if (spec.topology == Topology::ring || spec.topology == Topology::automatic) {
    ring_reduce_scatter(b, everyone, blocks, 1, seg);
    return b.finish();
  }
  if (spec.topology == Topology::multi_ring) {
    const Group backwards = reversed(everyone, spec.rank);
    ring_reduce_scatter(b, everyone, half_blocks(blocks, false, everyone, everyone), 1, seg);
    ring_reduce_scatter(b, backwards, half_blocks(blocks, true, everyone, backwards), 2, seg);
    return b.finish();
  }
  const Range all{0, spec.count};
  if (spec.topology == Topology::star) {
    star_reduce(b, everyone, all, 1, seg);
  } else {
    tree_reduce(b, everyone, all, 1, seg);
  }
  // Scatter: the first member sends block i to member i.
  for (int i = 1; i < everyone.size(); ++i) {
    const Range block = blocks[std::size_t(i)];
    const int member = everyone.members[std::size_t(i)];
    for_each_segment(block.offset, block.count, seg, [&](std::size_t o, std::size_t c) {
      if (everyone.index == 0) b.send(member, make_tag(2, 0, o), o, c);
      if (everyone.index == i) b.recv_copy(everyone.members[0], make_tag(2, 0, o), o, c);
    });
  }
  return b.finish();
}

Plan gather_plan(const PlanSpec& spec) {
  PlanBuilder b;
  const std::vector<int> members = base_members(spec);
  const Group g = rotated(spec, spec.root);
  // The root's buffer holds member i's block at i * block, i in the order of `members`.
  std::vector<Range> blocks;
  for (int rank : g.members) {
    const auto at = std::size_t(std::find(members.begin(), members.end(), rank) - members.begin());
    blocks.push_back({at * spec.block, spec.block});
  }
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
  for (int p : base_members(spec)) {
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
  if (!spec.members.empty()) {
    const bool in = std::find(spec.members.begin(), spec.members.end(), spec.rank) != spec.members.end();
    AIKIDO_ENFORCE(in, "rank ", spec.rank, " plans a collective it does not take part in");
    for (int m : spec.members) AIKIDO_ENFORCE(m >= 0 && m < spec.size, "member ", m, " of ", spec.size, " ranks");
  }
  if (spec.size == 1 || spec.members.size() == 1) return Plan{};
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
