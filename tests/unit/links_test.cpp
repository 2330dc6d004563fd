// The link model (src/collective/links.hpp): which topology `automatic` picks from measured links and sizes, segment
// sizes, TCP streams; and Peer::set_link_matrix, which installs measurements on every rank at once.
#include "collective/links.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "cluster.hpp"

namespace aikido {
namespace {

using collective::choose_topology;
using collective::LinkModel;
using detail::CollectiveKind;

constexpr double kGbit = 1e9 / 8;

std::vector<int> hosts_of(int hosts, int per_host) {
  std::vector<int> h;
  for (int r = 0; r < hosts * per_host; ++r) h.push_back(r / per_host);
  return h;
}

// Every link between hosts at `rate` (bytes/s) and 100 us, except those of host `slow`, at `slow_rate`.
LinkMatrix measured(const std::vector<int>& host_of_rank, double rate, int slow = -1, double slow_rate = 0) {
  const int n = int(host_of_rank.size());
  LinkMatrix m = LinkMatrix::unmeasured(n);
  for (int a = 0; a < n; ++a) {
    for (int b = 0; b < n; ++b) {
      if (a == b) continue;
      const std::size_t i = std::size_t(a * n + b);
      const bool same = host_of_rank[std::size_t(a)] == host_of_rank[std::size_t(b)];
      m.latency_seconds[i] = same ? 5e-6 : 100e-6;
      const bool touches_slow = host_of_rank[std::size_t(a)] == slow || host_of_rank[std::size_t(b)] == slow;
      m.bandwidth_bytes_per_second[i] = same ? 5e9 : (touches_slow ? slow_rate : rate);
    }
  }
  return m;
}

TEST(LinkModel, UnmeasuredLinksPickRingForLargeBuffersAndTreeForSmallOnes) {
  const LinkModel model(LinkMatrix{}, hosts_of(4, 1));
  EXPECT_EQ(choose_topology(model, CollectiveKind::allreduce, 64 << 20).topology, Topology::ring);
  EXPECT_EQ(choose_topology(model, CollectiveKind::allreduce, 1024).topology, Topology::tree);
  // One host: ring for large buffers too.
  const LinkModel one(LinkMatrix{}, hosts_of(1, 4));
  EXPECT_EQ(choose_topology(one, CollectiveKind::allreduce, 64 << 20).topology, Topology::ring);
}

TEST(LinkModel, SeveralRanksPerHostPickHierarchical) {
  for (double rate : {10 * kGbit, 1 * kGbit, 0.1 * kGbit}) {
    const auto hosts = hosts_of(2, 2);
    const LinkModel model(measured(hosts, rate), hosts);
    EXPECT_EQ(choose_topology(model, CollectiveKind::allreduce, 16 << 20).topology, Topology::hierarchical) << rate;
    // The hierarchical phases carry the buffer once across each host's link, the ring 1.5 times.
    const double ring = collective::predict(model, Topology::ring, {}, CollectiveKind::allreduce, 16 << 20);
    const double hier = collective::predict(model, Topology::hierarchical, {}, CollectiveKind::allreduce, 16 << 20);
    EXPECT_NEAR(ring / hier, 1.5, 0.1) << rate;
  }
}

// A host whose link slows down: the tree with that host as a leaf sends it the buffer once each way, the ring
// 2 (n - 1) / n times; `automatic` moves to the tree once the link is slow enough, and orders the ranks so.
TEST(LinkModel, ASlowHostBecomesALeafOfTheTree) {
  const auto hosts = hosts_of(4, 1);
  const LinkModel even(measured(hosts, 1 * kGbit), hosts);
  EXPECT_EQ(choose_topology(even, CollectiveKind::allreduce, 16 << 20).topology, Topology::ring);
  for (int slow : {0, 1, 3}) {
    const LinkModel model(measured(hosts, 1 * kGbit, slow, 0.1 * kGbit), hosts);
    const auto choice = choose_topology(model, CollectiveKind::allreduce, 16 << 20);
    ASSERT_EQ(choice.topology, Topology::tree) << "slow host " << slow;
    std::vector<int> order = choice.members;  // empty: rank order
    if (order.empty()) order = {0, 1, 2, 3};
    const auto at = std::find(order.begin(), order.end(), slow) - order.begin();
    EXPECT_GE(at, 2) << "the slow rank must be a leaf (heap index >= n/2)";
  }
}

// Two rings in opposite directions win where each pair is slower than the ranks at its ends: here every rank's link
// to its right neighbour is slow, to its left one fast.
TEST(LinkModel, MultiRingWhereEachPairIsLimitedOnItsOwn) {
  const std::vector<int> hosts = {0, 1, 2, 3};
  LinkMatrix m = measured(hosts, 1 * kGbit);
  for (int r = 0; r < 4; ++r) {
    m.bandwidth_bytes_per_second[std::size_t(r * 4 + (r + 1) % 4)] = 0.5 * kGbit;
    m.bandwidth_bytes_per_second[std::size_t(r * 4 + (r + 2) % 4)] = 0.1 * kGbit;  // no detour through the middle
  }
  const LinkModel model(m, hosts);
  EXPECT_EQ(choose_topology(model, CollectiveKind::allreduce, 16 << 20).topology, Topology::multi_ring);
}

TEST(LinkModel, OrdersNeverChangeWhereRanksOwnBlocks) {
  const auto hosts = hosts_of(4, 1);
  const LinkModel model(measured(hosts, 1 * kGbit, 0, 0.1 * kGbit), hosts);
  for (CollectiveKind kind : {CollectiveKind::allgather, CollectiveKind::reduce_scatter}) {
    for (const auto& c : collective::candidates(model, kind, 16 << 20)) EXPECT_TRUE(c.members.empty());
  }
}

TEST(LinkModel, SegmentsFollowTheSlowestLink) {
  const auto hosts = hosts_of(2, 2);
  EXPECT_EQ(collective::segment_bytes(LinkModel(measured(hosts, 10 * kGbit), hosts), {}), 512u * 1024);
  // Below 2 Gbit/s the floor: smaller segments made a 16 MiB ring allreduce across 4 hosts at 1 Gbit/s 15% slower.
  EXPECT_EQ(collective::segment_bytes(LinkModel(measured(hosts, 1 * kGbit), hosts), {}), 256u * 1024);
  EXPECT_EQ(collective::segment_bytes(LinkModel(measured(hosts, 0.1 * kGbit), hosts), {}), 256u * 1024);
  // Among the ranks of one host: the same-host segment.
  EXPECT_EQ(collective::segment_bytes(LinkModel(measured(hosts, 0.1 * kGbit), hosts), {0, 1}), 1u << 20);
  EXPECT_EQ(collective::chunk_bytes(LinkModel(measured(hosts, 10 * kGbit), hosts)), 4u << 20);
  EXPECT_EQ(collective::chunk_bytes(LinkModel(measured(hosts, 0.1 * kGbit), hosts)), 1u << 20);
}

// Fusion buckets: 1 MiB on one host; across hosts the smallest power of two whose allreduce spends at most 10% of its
// predicted time beyond what its bytes take at the rate of large buffers, so faster links take larger buckets; at
// most a quarter of the gradients and 32 MiB.
TEST(LinkModel, FusionBucketsGrowWithTheLinkBetweenHosts) {
  constexpr std::size_t kMiB = std::size_t(1) << 20, kTotal = std::size_t(1) << 30;
  const auto one = hosts_of(1, 4);
  EXPECT_EQ(collective::fusion_bytes(LinkModel(measured(one, 0), one), Topology::automatic, kTotal), kMiB);
  const auto hosts = hosts_of(2, 2);
  std::size_t last = 0;
  std::vector<std::size_t> chosen;
  for (double rate : {0.1 * kGbit, 1 * kGbit, 10 * kGbit, 100 * kGbit}) {
    const LinkModel model(measured(hosts, rate), hosts);
    const std::size_t bytes = collective::fusion_bytes(model, Topology::automatic, kTotal);
    EXPECT_GE(bytes, last) << rate;
    last = bytes;
    chosen.push_back(bytes >> 20);
    auto seconds = [&](std::size_t b) { return choose_topology(model, CollectiveKind::allreduce, b).seconds; };
    const double per_byte = (seconds(64 * kMiB) - seconds(32 * kMiB)) / double(32 * kMiB);
    auto fixed_share = [&](std::size_t b) { return (seconds(b) - double(b) * per_byte) / seconds(b); };
    if (bytes < collective::kMaxFusionBytes) {
      EXPECT_LE(fixed_share(bytes), collective::kFusionOverhead) << rate;
    }
    if (bytes > kMiB) {
      EXPECT_GT(fixed_share(bytes / 2), collective::kFusionOverhead) << rate;
    }
    // A fixed topology is planned for as it is.
    EXPECT_GE(collective::fusion_bytes(model, Topology::ring, kTotal), kMiB);
  }
  // MiB at 0.1, 1, 10 and 100 Gbit/s with 100 us between hosts (2 hosts x 2 ranks, hierarchical).
  EXPECT_EQ(chosen, (std::vector<std::size_t>{1, 1, 8, 32}));
  // At most a quarter of the gradients (never below 1 MiB): buckets exist to overlap the backward pass.
  const LinkModel fast(measured(hosts, 100 * kGbit), hosts);
  EXPECT_EQ(collective::fusion_bytes(fast, Topology::automatic, 8 * kMiB), 2 * kMiB);
  EXPECT_EQ(collective::fusion_bytes(fast, Topology::automatic, 2 * kMiB), kMiB);
}

TEST(LinkModel, StreamsAreTheFewestThatCarryNearlyAll) {
  EXPECT_EQ(collective::choose_streams(100, 105, 4), 1);  // one stream fills the link
  EXPECT_EQ(collective::choose_streams(100, 190, 4), 2);
  EXPECT_EQ(collective::choose_streams(100, 400, 4), 4);  // every stream adds a stream's worth
  EXPECT_EQ(collective::choose_streams(100, 0, 4), 1);    // not measured
}

// set_link_matrix: collective, checked by consensus; `automatic` re-plans from it, and results stay right.
TEST(LinkMatrix, InstalledOnEveryRankAutomaticReplans) {
  PeerConfig c = test::base_config();
  c.topology = Topology::automatic;
  test::run_cluster(
      4, c,
      [](Peer& peer) {
        EXPECT_EQ(peer.planned_topology(16 << 20), Topology::ring);
        std::vector<float> x(1 << 20, float(peer.rank() + 1));
        peer.allreduce(std::span<float>(x), ReduceOp::sum, "before");
        ASSERT_EQ(x[12345], 10.0f);
        std::vector<int> hosts(4);
        for (int r = 0; r < 4; ++r) hosts[std::size_t(r)] = r;
        peer.set_link_matrix(measured(hosts, 1 * kGbit, 1, 0.05 * kGbit));
        EXPECT_EQ(peer.planned_topology(16 << 20), Topology::tree);
        EXPECT_EQ(peer.link_matrix().bandwidth(0, 1), 0.05 * kGbit);
        x.assign(1 << 20, float(peer.rank() + 1));
        peer.allreduce(std::span<float>(x), ReduceOp::sum, "after");
        ASSERT_EQ(x[12345], 10.0f);
        std::vector<std::int64_t> b(1000, peer.rank() == 2 ? 7 : 0);
        peer.broadcast(std::span<std::int64_t>(b), 2, "bcast");
        ASSERT_EQ(b[999], 7);
        // Ranks that install different matrices are told so on every rank.
        EXPECT_THROW(peer.set_link_matrix(measured(hosts, peer.rank() == 0 ? 2 * kGbit : 1 * kGbit)), MismatchError);
        EXPECT_THROW(peer.set_link_matrix(LinkMatrix::unmeasured(3)), ConfigError);
      },
      [](int rank, PeerConfig& config) { config.host = "h" + std::to_string(rank); });
}

}  // namespace
}  // namespace aikido
