// The link model: what the engine knows of its links (measured latency and bandwidth between ranks), and what it
// chooses from it: the topology `automatic` resolves to, segment sizes, how hierarchical collectives are cut.
#include <algorithm>
#include <cmath>

#include "base/error.hpp"
#include "collective/links.hpp"
#include "runtime/engine.hpp"
#include "runtime/engine_hierarchy.hpp"

namespace aikido::detail {

namespace {

/// Inside-host phases cost about this much beyond their data (two synchronisations); an allreduce small enough that
/// sending all of it across hosts from every rank costs less than that runs in two phases instead of three.
constexpr double kPhaseSeconds = 30e-6;
constexpr std::size_t kMinSmallBytes = 4 * 1024;
constexpr std::size_t kMaxSmallBytes = 256 * 1024;

}  // namespace

collective::LinkModel Engine::link_model() const {
  std::lock_guard<std::mutex> lock(links_mutex_);
  return links_;
}

collective::TopologyChoice Engine::resolve_topology(Topology topology, const Request& request) const {
  if (topology != Topology::automatic) return {topology, {}, 0};
  const std::size_t esize = dtype_size(request.dtype);
  std::size_t bytes = request.send_count * esize;
  if (request.kind == CollectiveKind::allgather) bytes = request.recv_count * esize;
  if (request.kind == CollectiveKind::barrier) bytes = 1;
  if (request.kind == CollectiveKind::consensus) bytes = 64;
  return collective::choose_topology(link_model(), request.kind, bytes);
}

std::size_t Engine::segment_bytes_for(const std::vector<int>& members) const {
  if (config_.segment_bytes > 0) return config_.segment_bytes;
  return collective::segment_bytes(link_model(), members);
}

HierarchyPlan Engine::hierarchy_plan(const Request& request) const {
  const collective::LinkModel model = link_model();
  HierarchyPlan plan;
  const HostLayout& layout = *hierarchy_;
  const double across = collective::slowest_across_hosts(model).bandwidth_bytes_per_second;
  // Two phases cost (L - 1) extra copies of the buffer across each host's link; three phases one synchronisation
  // more inside the host.
  const double small = kPhaseSeconds * across / double(std::max(1, layout.per_host - 1));
  plan.small_bytes = std::clamp(std::size_t(small), kMinSmallBytes, kMaxSmallBytes);
  if (request.kind == CollectiveKind::barrier || request.kind == CollectiveKind::consensus) plan.small_bytes = 64;
  plan.chunk_bytes = collective::chunk_bytes(model);
  return plan;
}

}  // namespace aikido::detail
