// Several TCP streams between ranks on different hosts (PeerConfig::streams): large segments take turns on all of
// them, every collective stays correct, a rank that leaves is seen once every stream ended, and the default measures
// the link between the first two hosts at connection setup (number of streams, and the link model's first numbers).
// Ranks are threads; the host of a rank is its PeerConfig::host.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <latch>
#include <string>
#include <vector>

#include "cluster.hpp"

namespace aikido {
namespace {

using test::base_config;
using test::run_cluster;

std::function<void(int, PeerConfig&)> on_hosts(int per_host) {
  return [per_host](int rank, PeerConfig& c) { c.host = "host" + std::to_string(rank / per_host); };
}

PeerConfig with_streams(int streams, Topology topology) {
  PeerConfig c = base_config();
  c.streams = streams;
  c.topology = topology;
  c.segment_bytes = 256 * 1024;  // over kEagerBytes (those keep to the first stream), several per collective
  return c;
}

// Every collective kind, large enough to be pipelined, checked against closed forms.
void every_collective(Peer& peer) {
  const int n = peer.size(), r = peer.rank();
  std::vector<float> x(1'500'001);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = float((r + 1) * int(i % 5 + 1));
  peer.allreduce(std::span<float>(x), ReduceOp::sum, "allreduce");
  for (std::size_t i = 0; i < x.size(); ++i) {
    ASSERT_EQ(x[i], float(int(i % 5 + 1) * n * (n + 1) / 2)) << "allreduce element " << i << " on rank " << r;
  }
  const std::size_t block = 300'000;
  std::vector<float> mine(block, float(r)), all(block * std::size_t(n));
  peer.allgather(std::span<const float>(mine), std::span<float>(all), "allgather");
  for (std::size_t i = 0; i < all.size(); i += 997) ASSERT_EQ(all[i], float(i / block)) << "allgather element " << i;
  std::vector<float> scattered(block);
  std::vector<float> whole(block * std::size_t(n), 1.0f);
  peer.reduce_scatter(std::span<const float>(whole), std::span<float>(scattered), ReduceOp::sum, "reduce_scatter");
  for (std::size_t i = 0; i < block; i += 991) ASSERT_EQ(scattered[i], float(n)) << "reduce_scatter element " << i;
  std::vector<std::int64_t> b(700'000, r == n - 1 ? 42 : -1);
  peer.broadcast(std::span<std::int64_t>(b), n - 1, "broadcast");
  for (std::size_t i = 0; i < b.size(); i += 1009) ASSERT_EQ(b[i], 42) << "broadcast element " << i;
  peer.barrier("barrier");
}

class FixedStreams : public ::testing::TestWithParam<std::tuple<Topology, int>> {};

// With 3 streams, large segments go out on the extra streams too (from the ranks that send across hosts: in a ring
// of 2 hosts x 2, two of them), and every collective is right.
TEST_P(FixedStreams, LargeSegmentsTakeTurnsOnEveryStream) {
  const auto [topology, per_host] = GetParam();
  std::atomic<std::uint64_t> on_extra{0};
  run_cluster(
      4, with_streams(3, topology),
      [&](Peer& peer) {
        every_collective(peer);
        const PathCounts paths = peer.path_counts();
        EXPECT_EQ(paths.streams_across_hosts, 3u) << "rank " << peer.rank();
        on_extra += paths.segments_on_extra_streams;
      },
      on_hosts(per_host));
  EXPECT_GT(on_extra.load(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Topologies, FixedStreams,
                         ::testing::Values(std::tuple{Topology::hierarchical, 2}, std::tuple{Topology::ring, 2},
                                           std::tuple{Topology::ring, 1}, std::tuple{Topology::tree, 1},
                                           std::tuple{Topology::multi_ring, 2}));

// One stream: nothing goes on another.
TEST(Streams, OneStreamCarriesEverything) {
  run_cluster(
      4, with_streams(1, Topology::ring),
      [](Peer& peer) {
        every_collective(peer);
        EXPECT_EQ(peer.path_counts().streams_across_hosts, 1u);
        EXPECT_EQ(peer.path_counts().segments_on_extra_streams, 0u);
      },
      on_hosts(2));
}

// By default the link between the first two hosts is measured: the number of streams (1 to 4) is the same on every
// rank, and the link model starts from the measurement on every pair of ranks on different hosts (NaN inside a host).
TEST(Streams, ChosenByMeasuringTheLinkByDefault) {
  std::vector<std::uint64_t> chosen(4);
  run_cluster(
      4, with_streams(0, Topology::automatic),
      [&](Peer& peer) {
        every_collective(peer);
        chosen[std::size_t(peer.rank())] = peer.path_counts().streams_across_hosts;
        const LinkMatrix m = peer.link_matrix();
        ASSERT_EQ(m.size, 4);
        for (int a = 0; a < 4; ++a) {
          for (int b = 0; b < 4; ++b) {
            const auto i = std::size_t(a * 4 + b);
            if (a / 2 == b / 2) {
              EXPECT_TRUE(std::isnan(m.bandwidth_bytes_per_second[i])) << a << "->" << b;
            } else {
              EXPECT_GT(m.bandwidth_bytes_per_second[i], 0.0) << a << "->" << b;
              EXPECT_GT(m.latency_seconds[i], 0.0) << a << "->" << b;
            }
          }
        }
      },
      on_hosts(2));
  EXPECT_GE(chosen[0], 1u);
  EXPECT_LE(chosen[0], 4u);
  for (auto c : chosen) EXPECT_EQ(c, chosen[0]);
}

// Ranks of one host have no streams across hosts, and nothing is measured.
TEST(Streams, NoneOnOneHost) {
  run_cluster(
      3, with_streams(0, Topology::ring),
      [](Peer& peer) {
        std::vector<float> x(100'000, 1.0f);
        peer.allreduce(std::span<float>(x), ReduceOp::sum, "x");
        EXPECT_EQ(x[99'999], 3.0f);
        EXPECT_EQ(peer.path_counts().streams_across_hosts, 0u);
        EXPECT_TRUE(std::isnan(peer.link_matrix().bandwidth_bytes_per_second[1]));
      },
      on_hosts(3));
}

// A rank that leaves after a large collective (segments on every stream) is seen as having closed its session once
// all its streams ended; the survivors' later collectives fail naming it.
TEST(Streams, ALeaverIsSeenOnceEveryStreamEnded) {
  std::latch survivors_done(3);
  run_cluster(
      4, with_streams(3, Topology::ring),
      [&](Peer& peer) {
        std::vector<float> warm(2'000'000, 1.0f);
        peer.allreduce(std::span<float>(warm), ReduceOp::sum, "warmup");
        ASSERT_EQ(warm[1'999'999], 4.0f);
        if (peer.rank() == 2) {
          Peer gone = std::move(peer);
          return;
        }
        std::vector<float> large(1'000'000, 1.0f);
        try {
          peer.allreduce(std::span<float>(large), ReduceOp::sum, "after");
          ADD_FAILURE() << "an allreduce completed on rank " << peer.rank() << " without rank 2";
        } catch (const PeerLostError& e) {
          EXPECT_NE(std::string(e.what()).find("rank 2 closed its session"), std::string::npos) << e.what();
        }
        survivors_done.arrive_and_wait();
      },
      on_hosts(2));
}

TEST(Streams, OutOfRangeIsAConfigError) {
  PeerConfig c = base_config();
  c.size = 2;
  c.store = make_memory_store();
  c.streams = 9;
  try {
    Peer::create(c);
    FAIL() << "streams 9 accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("AIKIDO_STREAMS"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace aikido
