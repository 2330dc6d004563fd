#include "collective/links.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <map>

#include "base/error.hpp"

namespace aikido::collective {

namespace {

/// A segment should take about this long on the slowest link of its plan: long enough that the per-message cost
/// (tens of microseconds here) stays small, short enough that a ring's pipeline fills quickly (every hop waits for
/// one segment). Never below 256 KiB across hosts: with 64 KiB segments a 16 MiB ring allreduce across 4 hosts on
/// 1 Gbit/s links took 242 ms against 211 ms with 256 KiB (bench/multihost_allreduce.py), Gloo's 212 ms.
constexpr double kSegmentSeconds = 0.5e-3;
constexpr std::size_t kMinSegment = 256 * 1024, kMaxSegment = std::size_t(4) << 20;
constexpr std::size_t kSameHostSegment = std::size_t(1) << 20;
/// A chunk of a hierarchical collective should take about this long across hosts.
constexpr double kChunkSeconds = 4e-3;
constexpr std::size_t kMinChunk = std::size_t(1) << 20, kMaxChunk = std::size_t(8) << 20;
/// What the engine does with small allreduces on the ring topology of 2 ranks (engine.cpp): recursive doubling.
constexpr std::size_t kRecursiveDoublingBytes = std::size_t(1) << 20;

bool known(double v) { return std::isfinite(v) && v > 0; }

std::size_t floor_pow2(double v) { return std::size_t(1) << int(std::floor(std::log2(std::max(1.0, v)))); }

struct Flow {
  int from, to;
  double bytes;
};

struct Schedule {
  std::vector<Flow> flows;
  int hops = 0;
};

// A rank sends (receives) at most as fast as its fastest link: several flows of one rank share that.
double rank_capacity(const LinkModel& m, int rank, bool out) {
  double best = 0;
  for (int q = 0; q < m.size(); ++q) {
    if (q != rank) best = std::max(best, (out ? m.link(rank, q) : m.link(q, rank)).bandwidth_bytes_per_second);
  }
  return best;
}

double time_of(const LinkModel& m, const Schedule& s) {
  double latency = 0, bottleneck = 0;
  std::map<int, double> host_out, host_in, rank_out, rank_in;  // bytes over each host's link, each rank's
  for (const Flow& f : s.flows) {
    const Link link = m.link(f.from, f.to);
    latency = std::max(latency, link.latency_seconds);
    bottleneck = std::max(bottleneck, f.bytes / link.bandwidth_bytes_per_second);
    rank_out[f.from] += f.bytes;
    rank_in[f.to] += f.bytes;
    if (!m.same_host(f.from, f.to)) {
      host_out[m.host_of_rank()[std::size_t(f.from)]] += f.bytes;
      host_in[m.host_of_rank()[std::size_t(f.to)]] += f.bytes;
    }
  }
  for (const auto& [h, bytes] : host_out) bottleneck = std::max(bottleneck, bytes / m.host_capacity(h, true));
  for (const auto& [h, bytes] : host_in) bottleneck = std::max(bottleneck, bytes / m.host_capacity(h, false));
  for (const auto& [r, bytes] : rank_out) bottleneck = std::max(bottleneck, bytes / rank_capacity(m, r, true));
  for (const auto& [r, bytes] : rank_in) bottleneck = std::max(bottleneck, bytes / rank_capacity(m, r, false));
  return s.hops * latency + bottleneck;
}

int depth_of(int n) {  // levels below the root of a binary heap of n nodes
  int d = 0;
  while ((std::size_t(1) << (d + 1)) - 1 < std::size_t(n)) ++d;
  return d;
}

void ring_flows(Schedule& s, const std::vector<int>& o, double bytes, bool backwards) {
  const int n = int(o.size());
  for (int i = 0; i < n; ++i) {
    const int a = o[std::size_t(i)], b = o[std::size_t((i + 1) % n)];
    s.flows.push_back(backwards ? Flow{b, a, bytes} : Flow{a, b, bytes});
  }
}

void tree_flows(Schedule& s, const std::vector<int>& o, double up, double down) {
  for (std::size_t i = 1; i < o.size(); ++i) {
    const int parent = o[(i - 1) / 2];
    if (up > 0) s.flows.push_back({o[i], parent, up});
    if (down > 0) s.flows.push_back({parent, o[i], down});
  }
}

// The ranks by host (hosts in the order of their lowest rank), and whether every host has the same number of them.
std::vector<std::vector<int>> by_host(const LinkModel& m) {
  std::map<int, std::vector<int>> hosts;
  std::vector<int> order;
  for (int r = 0; r < m.size(); ++r) {
    const int h = m.host_of_rank()[std::size_t(r)];
    if (!hosts.count(h)) order.push_back(h);
    hosts[h].push_back(r);
  }
  std::vector<std::vector<int>> out;
  for (int h : order) out.push_back(hosts[h]);
  return out;
}

Schedule schedule(const LinkModel& m, Topology t, std::vector<int> o, CollectiveKind kind, std::size_t bytes) {
  const int n = m.size();
  if (o.empty()) {
    for (int r = 0; r < n; ++r) o.push_back(r);
  }
  const double S = double(bytes);
  Schedule s;
  const bool gathers = kind == CollectiveKind::allgather || kind == CollectiveKind::reduce_scatter;
  const bool broadcast = kind == CollectiveKind::broadcast;
  const double share = double(n - 1) / n;
  if (t == Topology::ring && !gathers && !broadcast && bytes <= kRecursiveDoublingBytes && n == 2) {
    s.flows = {{o[0], o[1], S}, {o[1], o[0], S}};
    s.hops = 1;
    return s;
  }
  switch (t) {
    case Topology::ring:
    case Topology::automatic:
      if (broadcast) {
        for (int i = 0; i + 1 < n; ++i) s.flows.push_back({o[std::size_t(i)], o[std::size_t(i + 1)], S});
        s.hops = n - 1;
      } else {
        ring_flows(s, o, (gathers ? 1 : 2) * share * S, false);
        s.hops = (gathers ? 1 : 2) * (n - 1);
      }
      return s;
    case Topology::multi_ring:
      if (broadcast) {  // two chains from the first rank, in opposite directions, each on half
        std::vector<int> back{o[0]};
        back.insert(back.end(), o.rbegin(), o.rend() - 1);
        for (int i = 0; i + 1 < n; ++i) {
          s.flows.push_back({o[std::size_t(i)], o[std::size_t(i + 1)], S / 2});
          s.flows.push_back({back[std::size_t(i)], back[std::size_t(i + 1)], S / 2});
        }
        s.hops = n - 1;
      } else {
        ring_flows(s, o, (gathers ? 1 : 2) * share * S / 2, false);
        ring_flows(s, o, (gathers ? 1 : 2) * share * S / 2, true);
        s.hops = (gathers ? 1 : 2) * (n - 1);
      }
      return s;
    case Topology::tree:
      if (broadcast) {
        tree_flows(s, o, 0, S);
        s.hops = depth_of(n);
      } else if (gathers) {  // gather to the first rank, then broadcast (reduce_scatter: reduce, then scatter)
        tree_flows(s, o, S / n, S);
        s.hops = 2 * depth_of(n);
      } else {
        tree_flows(s, o, S, S);
        s.hops = 2 * depth_of(n);
      }
      return s;
    case Topology::star:
      for (std::size_t i = 1; i < o.size(); ++i) {
        if (!broadcast) s.flows.push_back({o[i], o[0], gathers ? S / n : S});
        s.flows.push_back({o[0], o[i], S});
      }
      s.hops = broadcast ? 1 : 2;
      return s;
    case Topology::hierarchical: {
      const auto hosts = by_host(m);
      const int H = int(hosts.size());
      const int L = int(hosts.front().size());
      bool uniform = H > 1 && L > 1;
      for (const auto& h : hosts) uniform = uniform && int(h.size()) == L;
      if (uniform) {
        // Across: every group l a ring among the hosts on its slice; inside: reduce-scatter and allgather.
        const double across = (gathers ? 1 : 2) * double(H - 1) / H * S / L;
        for (int l = 0; l < L; ++l) {
          std::vector<int> group;
          for (const auto& h : hosts) group.push_back(h[std::size_t(l)]);
          if (broadcast) {
            for (int j = 0; j + 1 < H; ++j)
              s.flows.push_back({group[std::size_t(j)], group[std::size_t(j + 1)], S / L});
          } else {
            ring_flows(s, group, across, false);
          }
          for (const auto& h : hosts) {
            for (int q = 0; q < L; ++q) {
              if (q != l) s.flows.push_back({h[std::size_t(q)], h[std::size_t(l)], 2 * S / L});
            }
          }
        }
        s.hops = (broadcast ? H - 1 : (gathers ? 1 : 2) * (H - 1)) + 2;
      } else {
        // A tree inside each host to its first rank, a ring among those, a tree back.
        std::vector<int> leaders;
        int depth = 0;
        for (const auto& h : hosts) {
          leaders.push_back(h.front());
          tree_flows(s, h, broadcast ? 0 : S, S);
          depth = std::max(depth, depth_of(int(h.size())));
        }
        if (H > 1) ring_flows(s, leaders, (broadcast ? 1 : 2) * double(H - 1) / H * S, false);
        s.hops = 2 * depth + 2 * (H - 1);
      }
      return s;
    }
  }
  return s;
}

}  // namespace

LinkModel::LinkModel(LinkMatrix measured, std::vector<int> host_of_rank)
    : measured_(std::move(measured)), host_of_rank_(std::move(host_of_rank)) {
  const int n = size();
  AIKIDO_ENFORCE(measured_.size == 0 || measured_.size == n, "a link matrix of ", measured_.size, " ranks for ", n);
  if (measured_.size == 0) measured_ = LinkMatrix::unmeasured(n);
}

Link LinkModel::link(int from, int to) const {
  const Link fallback = same_host(from, to) ? kUnmeasuredSameHost : kUnmeasuredAcrossHosts;
  const double latency = measured_.latency(from, to), bandwidth = measured_.bandwidth(from, to);
  return {known(latency) ? latency : fallback.latency_seconds,
          known(bandwidth) ? bandwidth : fallback.bandwidth_bytes_per_second};
}

double LinkModel::host_capacity(int host, bool out) const {
  double best = 0;
  for (int a = 0; a < size(); ++a) {
    for (int b = 0; b < size(); ++b) {
      if (same_host(a, b)) continue;
      const int mine = out ? a : b;
      if (host_of_rank_[std::size_t(mine)] != host) continue;
      best = std::max(best, link(a, b).bandwidth_bytes_per_second);
    }
  }
  return best > 0 ? best : kUnmeasuredAcrossHosts.bandwidth_bytes_per_second;
}

double predict(const LinkModel& model, Topology topology, const std::vector<int>& members, CollectiveKind kind,
               std::size_t bytes) {
  if (model.size() < 2) return 0;
  return time_of(model, schedule(model, topology, members, kind, bytes));
}

std::vector<TopologyChoice> candidates(const LinkModel& model, CollectiveKind kind, std::size_t bytes) {
  std::vector<TopologyChoice> out;
  const int n = model.size();
  // Orders may change only where the result does not depend on a rank's place (not allgather, reduce_scatter).
  const bool reorder =
      kind != CollectiveKind::allgather && kind != CollectiveKind::reduce_scatter && kind != CollectiveKind::gather;
  std::vector<int> by_host_order, tree_order;
  if (reorder) {
    // Ring: the ranks of each host together, so that one ring edge per host crosses its link each way.
    for (const auto& h : by_host(model)) by_host_order.insert(by_host_order.end(), h.begin(), h.end());
    // Tree: ranks of hosts with the fastest links nearest the root, so that a slow host is a leaf.
    tree_order = by_host_order;
    std::stable_sort(tree_order.begin(), tree_order.end(), [&](int a, int b) {
      const int ha = model.host_of_rank()[std::size_t(a)], hb = model.host_of_rank()[std::size_t(b)];
      const double ca = std::min(model.host_capacity(ha, true), model.host_capacity(ha, false));
      const double cb = std::min(model.host_capacity(hb, true), model.host_capacity(hb, false));
      return ca > cb * 1.05;
    });
    auto identity = [&](const std::vector<int>& o) {
      for (int i = 0; i < n; ++i) {
        if (o[std::size_t(i)] != i) return false;
      }
      return true;
    };
    if (identity(by_host_order)) by_host_order.clear();
    if (identity(tree_order)) tree_order.clear();
  }
  for (Topology t : {Topology::ring, Topology::hierarchical, Topology::tree, Topology::multi_ring}) {
    TopologyChoice c;
    c.topology = t;
    if (t == Topology::tree) {
      c.members = tree_order;
    } else if (t != Topology::hierarchical) {
      c.members = by_host_order;
    }
    c.seconds = predict(model, t, c.members, kind, bytes);
    out.push_back(std::move(c));
  }
  return out;
}

TopologyChoice choose_topology(const LinkModel& model, CollectiveKind kind, std::size_t bytes) {
  const auto all = candidates(model, kind, bytes);
  const TopologyChoice* best = &all.front();
  for (const auto& c : all) {
    if (c.seconds < best->seconds * 0.98) best = &c;
  }
  return *best;
}

Link slowest_across_hosts(const LinkModel& model) {
  Link slowest{0, 0};
  bool any = false;
  for (int a = 0; a < model.size(); ++a) {
    for (int b = 0; b < model.size(); ++b) {
      if (model.same_host(a, b)) continue;
      const Link l = model.link(a, b);
      if (!any || l.bandwidth_bytes_per_second < slowest.bandwidth_bytes_per_second) {
        slowest.bandwidth_bytes_per_second = l.bandwidth_bytes_per_second;
      }
      slowest.latency_seconds = std::max(slowest.latency_seconds, l.latency_seconds);
      any = true;
    }
  }
  return any ? slowest : kUnmeasuredAcrossHosts;
}

std::size_t segment_bytes(const LinkModel& model, const std::vector<int>& members) {
  std::vector<int> ranks = members;
  if (ranks.empty()) {
    for (int r = 0; r < model.size(); ++r) ranks.push_back(r);
  }
  double slowest = 0;
  for (int a : ranks) {
    for (int b : ranks) {
      if (a == b || model.same_host(a, b)) continue;
      const double bw = model.link(a, b).bandwidth_bytes_per_second;
      if (slowest == 0 || bw < slowest) slowest = bw;
    }
  }
  if (slowest == 0) return kSameHostSegment;
  return std::clamp(floor_pow2(slowest * kSegmentSeconds), kMinSegment, kMaxSegment);
}

std::size_t chunk_bytes(const LinkModel& model) {
  const double bw = slowest_across_hosts(model).bandwidth_bytes_per_second;
  return std::clamp(floor_pow2(bw * kChunkSeconds), kMinChunk, kMaxChunk);
}

std::size_t fusion_bytes(const LinkModel& model, Topology topology, std::size_t total_bytes) {
  bool across = false;
  for (int r = 1; r < model.size() && !across; ++r) across = !model.same_host(0, r);
  if (!across) return kFusionBytes;
  const std::size_t most = std::min(kMaxFusionBytes, std::max(kFusionBytes, floor_pow2(double(total_bytes) / 4)));
  const auto seconds = [&](std::size_t b) {
    return topology == Topology::automatic ? choose_topology(model, CollectiveKind::allreduce, b).seconds
                                           : predict(model, topology, {}, CollectiveKind::allreduce, b);
  };
  // Seconds per byte where the bytes dominate (the plans of large buffers); what a buffer's time exceeds b times
  // that is the part that does not shrink with fusing (small buffers may take other plans, with other latencies).
  const double per_byte = (seconds(2 * kMaxFusionBytes) - seconds(kMaxFusionBytes)) / double(kMaxFusionBytes);
  std::size_t bytes = kFusionBytes;
  for (; bytes < most; bytes *= 2) {
    const double t = seconds(bytes);
    if (t - double(bytes) * per_byte <= kFusionOverhead * t) break;
  }
  return bytes;
}

int choose_streams(double one, double several, int streams) {
  if (!(one > 0) || !(several > 0) || streams <= 1) return 1;
  // Throughput grows at most linearly with streams; take the fewest that reach within 10% of what all reached.
  for (int k = 1; k < streams; ++k) {
    if (one * k >= 0.9 * several) return k;
  }
  return streams;
}

std::string describe(const std::vector<TopologyChoice>& choices, const TopologyChoice& chosen) {
  std::string out;
  for (const auto& c : choices) {
    out += detail::str_cat(out.empty() ? "" : ", ", topology_name(c.topology), " ", c.seconds * 1e3, " ms");
  }
  return detail::str_cat(out, " -> ", topology_name(chosen.topology));
}

}  // namespace aikido::collective
