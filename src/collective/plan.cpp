#include "collective/plan.hpp"

#include <algorithm>

namespace aikido::collective {
namespace {

bool writes(OpKind kind) { return kind != OpKind::send; }

bool overlap(const Op& a, const Op& b) {
  if (a.count == 0 || b.count == 0) return false;
  return a.offset < b.offset + b.count && b.offset < a.offset + a.count;
}

// How much of [begin, end) the merged intervals cover: none, part or all.
enum class Cover { none, part, all };
Cover coverage(const std::map<std::size_t, std::size_t>& set, std::size_t begin, std::size_t end) {
  auto it = set.upper_bound(begin);
  if (it != set.begin()) {
    auto before = std::prev(it);
    if (before->second > begin) return before->second >= end ? Cover::all : Cover::part;
  }
  return it != set.end() && it->first < end ? Cover::part : Cover::none;
}

void insert(std::map<std::size_t, std::size_t>& set, std::size_t begin, std::size_t end) {
  auto it = set.upper_bound(begin);
  if (it != set.begin() && std::prev(it)->second >= begin) {
    --it;
    begin = it->first;
    end = std::max(end, it->second);
    it = set.erase(it);
  }
  while (it != set.end() && it->first <= end) {
    end = std::max(end, it->second);
    it = set.erase(it);
  }
  set.emplace(begin, end);
}

}  // namespace

void PlanBuilder::send(int peer, std::uint64_t tag, std::size_t offset, std::size_t count) {
  add(OpKind::send, peer, tag, offset, count);
}
void PlanBuilder::recv_copy(int peer, std::uint64_t tag, std::size_t offset, std::size_t count) {
  add(OpKind::recv_copy, peer, tag, offset, count);
}
void PlanBuilder::recv_reduce(int peer, std::uint64_t tag, std::size_t offset, std::size_t count) {
  add(OpKind::recv_reduce, peer, tag, offset, count);
}

void PlanBuilder::add(OpKind kind, int peer, std::uint64_t tag, std::size_t offset, std::size_t count) {
  Op op{kind, peer, tag, offset, count};
  if (count > 0) {
    // Ops on overlapping regions run in the order they were added (each depends on the conflicting ones before
    // it), so "no earlier op wrote any of it" holds at run time too.
    const Cover cover = coverage(written_, offset, offset + count);
    op.from_input = cover == Cover::none;
    if (cover == Cover::part) plan_.mixed_input = true;
    if (writes(kind)) insert(written_, offset, offset + count);
  }
  const auto index = std::uint32_t(plan_.ops.size());
  std::uint32_t deps = 0;
  // Depend on the latest earlier op that conflicts on each overlapping region. Scanning backwards and stopping at
  // a writer that covers this op keeps the graph small; reads never conflict with reads.
  for (std::size_t i = plan_.ops.size(); i-- > 0;) {
    const Op& earlier = plan_.ops[i];
    if (!overlap(op, earlier)) continue;
    if (!writes(kind) && !writes(earlier.kind)) continue;
    plan_.dependents[i].push_back(index);
    ++deps;
    if (writes(earlier.kind) && earlier.offset <= op.offset && earlier.offset + earlier.count >= op.offset + op.count) {
      break;  // that write is ordered after everything before it on this region
    }
  }
  plan_.ops.push_back(op);
  plan_.dependents.emplace_back();
  plan_.dependency_count.push_back(deps);
  auto& peers = kind == OpKind::send ? plan_.targets : plan_.sources;
  if (std::find(peers.begin(), peers.end(), peer) == peers.end()) peers.push_back(peer);
}

Plan PlanBuilder::finish() {
  plan_.ready_to = plan_.sources;
  plan_.ready_from = plan_.targets;
  plan_.written.assign(written_.begin(), written_.end());
  written_.clear();
  return std::move(plan_);
}

}  // namespace aikido::collective
