// The link model: latency and bandwidth between ranks, and what is chosen from it (the topology `automatic` resolves
// to, pipelining segments, the chunks of hierarchical collectives, TCP streams). Pure functions of their inputs, so
// that every rank that holds the same model chooses alike.
//
// Prediction. A candidate topology is a set of flows (bytes a rank sends another, all at once, pipelined) and a
// number of hops (messages one after the other). Its predicted time is hops x the largest latency among its flows,
// plus its bottleneck: the largest of (a) a flow's bytes over its pair's bandwidth, (b) for every host, the bytes its
// flows send to (receive from) other hosts over the host's link, whose capacity is the largest bandwidth measured
// from (to) it (ranks of one host share its link), and (c) for every rank, the bytes it sends (receives) over the
// capacity of its fastest link (flows of one rank share the rank). So two rings in opposite directions beat one only
// where a rank's links to its two neighbours are limited each on its own (a pair slower than the rank and its host). A
// slow host's link thus limits every topology, least those that send it the fewest bytes: a tree with it as a leaf
// sends it the buffer once each way where a ring sends it 2(n-1)/n times.
#pragma once

#include <aikido/peer.hpp>
#include <aikido/types.hpp>
#include <cstddef>
#include <string>
#include <vector>

namespace aikido::collective {

using detail::CollectiveKind;

struct Link {
  double latency_seconds;
  double bandwidth_bytes_per_second;
};

/// What the model assumes of links nobody measured: shared memory (or Unix sockets) inside a host, and a 10 Gbit/s
/// network between hosts.
inline constexpr Link kUnmeasuredSameHost{5e-6, 5e9};
inline constexpr Link kUnmeasuredAcrossHosts{50e-6, 1.25e9};

/// Measured links of a cluster (LinkMatrix) with the defaults above where an entry is unknown.
class LinkModel {
 public:
  LinkModel() = default;
  /// `host_of_rank` decides which default stands in for an unknown pair.
  LinkModel(LinkMatrix measured, std::vector<int> host_of_rank);
  int size() const { return int(host_of_rank_.size()); }
  const std::vector<int>& host_of_rank() const { return host_of_rank_; }
  const LinkMatrix& measured() const { return measured_; }
  bool same_host(int a, int b) const { return host_of_rank_[std::size_t(a)] == host_of_rank_[std::size_t(b)]; }
  /// The link from rank `from` to rank `to`: measured where known.
  Link link(int from, int to) const;
  /// The capacity of host h's link to (out) or from (in) other hosts: the largest bandwidth measured over it.
  double host_capacity(int host, bool out) const;

 private:
  LinkMatrix measured_;
  std::vector<int> host_of_rank_;
};

/// A candidate and its predicted time.
struct TopologyChoice {
  Topology topology = Topology::ring;
  /// The ranks in the order the plan uses (ring order, tree heap order); empty: rank order.
  std::vector<int> members;
  double seconds = 0;
};

/// Predicted time of a collective of `kind` on `bytes` bytes on `topology` (members: its order; empty: rank order).
double predict(const LinkModel& model, Topology topology, const std::vector<int>& members, CollectiveKind kind,
               std::size_t bytes);
/// Every candidate `automatic` considers (ring, tree, hierarchical, multi_ring), with its order and predicted time.
std::vector<TopologyChoice> candidates(const LinkModel& model, CollectiveKind kind, std::size_t bytes);
/// The fastest candidate (ties within 2% go to the earlier of ring, hierarchical, tree, multi_ring).
TopologyChoice choose_topology(const LinkModel& model, CollectiveKind kind, std::size_t bytes);

/// The slowest link between two ranks on different hosts (the unmeasured default when there is none).
Link slowest_across_hosts(const LinkModel& model);
/// Pipelining segment of a plan among `members` (all ranks when empty): 1 MiB when they are all on one host; else
/// what the slowest link between them carries in kSegmentSeconds, a power of two between 64 KiB and 4 MiB.
std::size_t segment_bytes(const LinkModel& model, const std::vector<int>& members);
/// Bytes of a chunk of a large hierarchical collective: what the slowest link between hosts carries in a few
/// milliseconds, between 1 MiB and 8 MiB.
std::size_t chunk_bytes(const LinkModel& model);
/// Bytes of a fusion bucket: many tensors' allreduces (a model's gradients, `total_bytes` of them) fused into buckets
/// of about this size, each reduced while the next fills. kFusionBytes when every rank is on one host (shared memory
/// has no latency worth amortising); across hosts the smallest power of two from kFusionBytes up whose predicted
/// allreduce (on `topology`; for Topology::automatic on what it picks for each size) spends at most kFusionOverhead
/// of its time beyond what its bytes take at the rate of large buffers (the latencies of the plan's hops), so that
/// fusing more would gain little. At most a quarter of `total_bytes` (buckets are what lets communication overlap the
/// backward pass) and kMaxFusionBytes.
inline constexpr std::size_t kFusionBytes = std::size_t(1) << 20;
inline constexpr std::size_t kMaxFusionBytes = std::size_t(32) << 20;
inline constexpr double kFusionOverhead = 0.1;
std::size_t fusion_bytes(const LinkModel& model, Topology topology, std::size_t total_bytes);

/// TCP connections between two ranks of hosts joined by `link`, measured with one connection (`one`) and with
/// `streams` connections at once (`several`): the fewest that carry within 10% of the most.
int choose_streams(double one, double several, int streams);

/// One line per candidate ("ring 1.234 ms, tree ... -> tree"), for logs and errors.
std::string describe(const std::vector<TopologyChoice>& choices, const TopologyChoice& chosen);

}  // namespace aikido::collective
