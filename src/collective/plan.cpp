#include "collective/plan.hpp"

#include <algorithm>

namespace aikido::collective {
namespace {

bool writes(OpKind kind) { return kind != OpKind::send; }

bool overlap(const Op& a, const Op& b) {
  if (a.count == 0 || b.count == 0) return false;
  return a.offset < b.offset + b.count && b.offset < a.offset + a.count;
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
  const Op op{kind, peer, tag, offset, count};
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

Plan PlanBuilder::finish() { return std::move(plan_); }

}  // namespace aikido::collective
