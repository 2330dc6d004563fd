// Hierarchical collectives on clusters of several (emulated) hosts with the same number of ranks on each: phases inside
// each host through its shared-memory segment, across hosts over the connections. Ranks are threads; the host of a
// rank is its PeerConfig::host, so each host has its own segment. Results are checked against closed forms, and the
// path counts prove which path each phase took.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <latch>
#include <string>
#include <vector>

#include "cluster.hpp"
#include "runtime/shm_collectives.hpp"

namespace aikido {
namespace {

using test::base_config;
using test::run_cluster;

struct Shape {
  int hosts;
  int per_host;
};

// Rank r on host r / per_host, or interleaved (rank r on host r % hosts) so that a host's ranks are not neighbours.
std::function<void(int, PeerConfig&)> on_hosts(Shape shape, bool interleaved = false) {
  return [shape, interleaved](int rank, PeerConfig& c) {
    c.host = "host" + std::to_string(interleaved ? rank % shape.hosts : rank / shape.per_host);
  };
}

PeerConfig hierarchical(std::size_t segment_bytes = 0) {
  PeerConfig c = base_config();
  c.topology = Topology::hierarchical;
  c.segment_bytes = segment_bytes;
  return c;
}

// x[i] = (rank + 1) * (i % 7 + 1): small integers, exact in every type; the sum over n ranks is
// (i % 7 + 1) * n (n + 1) / 2.
template <class T>
std::vector<T> input(int rank, std::size_t count) {
  std::vector<T> x(count);
  for (std::size_t i = 0; i < count; ++i) x[i] = T(float((rank + 1) * int(i % 7 + 1)));
  return x;
}

template <class T>
void expect_sum(const std::vector<T>& y, int n, const std::string& what) {
  for (std::size_t i = 0; i < y.size(); ++i) {
    ASSERT_EQ(float(y[i]), float(int(i % 7 + 1) * n * (n + 1) / 2)) << what << " element " << i;
  }
}

void expect_phases_through_shared_memory(const Peer& peer) {
  const PathCounts paths = peer.path_counts();
  EXPECT_GT(paths.hierarchical, 0u) << "rank " << peer.rank();
  EXPECT_GT(paths.host_phases_shared_memory, 0u) << "rank " << peer.rank();
  EXPECT_EQ(paths.host_phases_sockets, 0u) << "rank " << peer.rank();
  EXPECT_EQ(paths.shared_memory, 0u) << "rank " << peer.rank();
}

class Hierarchy : public ::testing::TestWithParam<std::tuple<Shape, bool>> {
 protected:
  Shape shape() const { return std::get<0>(GetParam()); }
  int size() const { return shape().hosts * shape().per_host; }
  std::function<void(int, PeerConfig&)> hosts() const { return on_hosts(shape(), std::get<1>(GetParam())); }
};

// Small (two phases) and large (three phases, several chunks) allreduces of every element type, in and out of
// place, sum and mean; counts that do not divide among a host's ranks.
TEST_P(Hierarchy, AllreduceEveryTypeAndSize) {
  run_cluster(
      size(), hierarchical(64 * 1024),
      [](Peer& peer) {
        const int n = peer.size();
        for (std::size_t count : {std::size_t(0), std::size_t(1), std::size_t(1001), std::size_t(3'000'001)}) {
          auto x = input<float>(peer.rank(), count);
          std::vector<float> y(count, -1.0f);
          peer.allreduce(std::span<const float>(x), std::span<float>(y), ReduceOp::sum, "f32");
          expect_sum(y, n, "f32 " + std::to_string(count));
          peer.allreduce(std::span<float>(x), ReduceOp::sum, "f32/in-place");
          expect_sum(x, n, "f32 in place " + std::to_string(count));
        }
        auto b = input<bfloat16>(peer.rank(), 70'000);
        peer.allreduce(std::span<bfloat16>(b), ReduceOp::sum, "bf16");
        expect_sum(b, n, "bf16");
        auto d = input<double>(peer.rank(), 300'000);
        peer.allreduce(std::span<double>(d), ReduceOp::max, "f64 max");
        for (std::size_t i = 0; i < d.size(); ++i) ASSERT_EQ(d[i], double(n * int(i % 7 + 1))) << "max " << i;
        // Mean of integers: the sum divided by n, integer division.
        std::vector<std::int64_t> m(500'000);
        for (std::size_t i = 0; i < m.size(); ++i) m[i] = std::int64_t(peer.rank() + int(i % 5));
        peer.allreduce(std::span<std::int64_t>(m), ReduceOp::mean, "i64 mean");
        for (std::size_t i = 0; i < m.size(); ++i) {
          ASSERT_EQ(m[i], std::int64_t((n * (n - 1) / 2 + n * int(i % 5)) / n)) << "mean " << i;
        }
        expect_phases_through_shared_memory(peer);
      },
      hosts());
}

TEST_P(Hierarchy, ReduceScatterAllgatherBroadcastBarrierConsensus) {
  run_cluster(
      size(), hierarchical(64 * 1024),
      [](Peer& peer) {
        const int n = peer.size(), me = peer.rank();
        for (std::size_t k : {std::size_t(0), std::size_t(1), std::size_t(333), std::size_t(100'003)}) {
          std::vector<float> send(k), all(k * std::size_t(n), -1.0f);
          for (std::size_t i = 0; i < k; ++i) send[i] = float(me * 1000 + int(i % 1000));
          peer.allgather(std::span<const float>(send), std::span<float>(all), "ag");
          for (int r = 0; r < n; ++r) {
            for (std::size_t i = 0; i < k; ++i) {
              ASSERT_EQ(all[std::size_t(r) * k + i], float(r * 1000 + int(i % 1000))) << "allgather k=" << k;
            }
          }
          std::vector<std::int32_t> full(k * std::size_t(n)), mine(k, -1);
          for (std::size_t i = 0; i < full.size(); ++i) full[i] = std::int32_t((me + 1) * int(i % 97));
          peer.reduce_scatter(std::span<const std::int32_t>(full), std::span<std::int32_t>(mine), ReduceOp::sum, "rs");
          for (std::size_t i = 0; i < k; ++i) {
            ASSERT_EQ(mine[i], std::int32_t(n * (n + 1) / 2 * int((std::size_t(me) * k + i) % 97))) << "rs k=" << k;
          }
          for (int root : {0, n - 1, n / 2}) {
            std::vector<std::int64_t> buf(k * 3, -1);
            if (me == root) {
              for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = std::int64_t(i * 31 + std::size_t(root));
            }
            peer.broadcast(std::span<std::int64_t>(buf), root, "bcast");
            for (std::size_t i = 0; i < buf.size(); ++i) {
              ASSERT_EQ(buf[i], std::int64_t(i * 31 + std::size_t(root))) << "broadcast from " << root << " k=" << k;
            }
          }
        }
        peer.barrier("barrier");
        const std::string same = "same value";
        EXPECT_TRUE(peer.consensus(std::as_bytes(std::span<const char>(same.data(), same.size())), "c1"));
        // One rank differs: every rank sees the disagreement, whether the odd rank's host agrees inside or not.
        const std::string mine = me == n - 1 ? "odd" : "even";
        EXPECT_FALSE(peer.consensus(std::as_bytes(std::span<const char>(mine.data(), mine.size())), "c2"));
        // Every host agrees inside, but the hosts differ.
        const std::string host = peer.config().host;
        EXPECT_FALSE(peer.consensus(std::as_bytes(std::span<const char>(host.data(), host.size())), "c3"));
        expect_phases_through_shared_memory(peer);
      },
      hosts());
}

INSTANTIATE_TEST_SUITE_P(Shapes, Hierarchy,
                         ::testing::Combine(::testing::Values(Shape{2, 2}, Shape{3, 2}, Shape{2, 3}),
                                            ::testing::Bool()),
                         [](const auto& info) {
                           const Shape s = std::get<0>(info.param);
                           return std::to_string(s.hosts) + "x" + std::to_string(s.per_host) +
                                  (std::get<1>(info.param) ? "_interleaved" : "");
                         });

// Under another transport there is no shared memory: the phases inside a host run over the connections, with the
// same results.
TEST(HierarchyPaths, WithoutSharedMemoryThePhasesInsideAHostTakeTheConnections) {
  PeerConfig c = hierarchical();
  c.transport = TransportKind::tcp;
  run_cluster(
      4, c,
      [](Peer& peer) {
        auto x = input<float>(peer.rank(), 2'000'000);
        peer.allreduce(std::span<float>(x), ReduceOp::sum, "x");
        expect_sum(x, 4, "tcp");
        const PathCounts paths = peer.path_counts();
        EXPECT_EQ(paths.hierarchical, 1u);
        EXPECT_EQ(paths.host_phases_shared_memory, 0u);
        EXPECT_GT(paths.host_phases_sockets, 0u);
      },
      on_hosts({2, 2}));
}

// On other topologies, and on hosts with different numbers of ranks, collectives run whole over the connections.
TEST(HierarchyPaths, OtherTopologiesAndUnevenHostsRunWhole) {
  run_cluster(
      5, hierarchical(),
      [](Peer& peer) {
        auto x = input<float>(peer.rank(), 100'000);
        peer.allreduce(std::span<float>(x), ReduceOp::sum, "x");
        expect_sum(x, 5, "uneven");
        EXPECT_EQ(peer.path_counts().hierarchical, 0u);
        EXPECT_EQ(peer.path_counts().sockets, 1u);
      },
      on_hosts({3, 2}));  // hosts of 2, 2 and 1 rank
  PeerConfig ring = hierarchical();
  ring.topology = Topology::ring;
  run_cluster(
      4, ring,
      [](Peer& peer) {
        auto x = input<float>(peer.rank(), 100'000);
        peer.allreduce(std::span<float>(x), ReduceOp::sum, "x");
        expect_sum(x, 4, "ring");
        EXPECT_EQ(peer.path_counts().hierarchical, 0u);
        // Switched at run time, on every rank at once.
        peer.set_topology(Topology::hierarchical);
        x = input<float>(peer.rank(), 100'000);
        peer.allreduce(std::span<float>(x), ReduceOp::sum, "x");
        expect_sum(x, 4, "switched");
        EXPECT_EQ(peer.path_counts().hierarchical, 1u);
        EXPECT_GT(peer.path_counts().host_phases_shared_memory, 0u);
      },
      on_hosts({2, 2}));
}

// Many names in flight at once, posted in different orders on every rank, waited in reverse: phases match by name.
TEST(HierarchyMatching, OrderFreeConcurrentCollectives) {
  run_cluster(
      4, hierarchical(32 * 1024),
      [](Peer& peer) {
        constexpr int kCount = 40;
        auto size_of = [](int j) { return std::size_t((j * 7919) % 600'000); };
        std::vector<std::vector<float>> data(kCount);
        std::vector<int> order(kCount);
        for (int j = 0; j < kCount; ++j) order[std::size_t(j)] = j;
        std::rotate(order.begin(), order.begin() + peer.rank() * 7, order.end());
        std::vector<Work> works;
        for (int j : order) {
          data[std::size_t(j)] = input<float>(peer.rank(), size_of(j));
          works.push_back(
              peer.allreduce_async(std::span<float>(data[std::size_t(j)]), ReduceOp::sum, "many/" + std::to_string(j)));
        }
        for (auto it = works.rbegin(); it != works.rend(); ++it) it->wait();
        for (int j = 0; j < kCount; ++j) expect_sum(data[std::size_t(j)], 4, "name " + std::to_string(j));
        // The same name again while it is in flight (the others post it only after the barrier): refused.
        std::vector<float> a(1000), b(1000);
        Work first;
        if (peer.rank() == 0) {
          first = peer.allreduce_async(std::span<float>(a), ReduceOp::sum, "twice");
          EXPECT_THROW(peer.allreduce_async(std::span<float>(b), ReduceOp::sum, "twice"), ConfigError);
        }
        peer.barrier("posted");
        if (peer.rank() != 0) first = peer.allreduce_async(std::span<float>(a), ReduceOp::sum, "twice");
        first.wait();
      },
      on_hosts({2, 2}));
}

// A full table of names on a host's segment sends the phases inside that host to the connections; results stay
// right.
TEST(HierarchyPaths, AFullNameTableSendsPhasesToTheConnections) {
  run_cluster(
      4, hierarchical(),
      [](Peer& peer) {
        const int names = int(detail::kShmEntries) + 20;
        for (int j = 0; j < names; ++j) {
          std::vector<std::int32_t> x(4, peer.rank() + j);
          peer.allreduce(std::span<std::int32_t>(x), ReduceOp::sum, "n" + std::to_string(j));
          ASSERT_EQ(x[3], 4 * j + 6) << "name " << j;
        }
        const PathCounts paths = peer.path_counts();
        EXPECT_EQ(paths.hierarchical, std::uint64_t(names));
        EXPECT_EQ(paths.host_phases_shared_memory, std::uint64_t(detail::kShmEntries));
        EXPECT_EQ(paths.host_phases_sockets, 20u);
      },
      on_hosts({2, 2}));
}

// Ranks that post a collective differently fail it on every rank with MismatchError naming it, whether the
// difference meets them inside their host (shared memory) or across hosts.
TEST(HierarchyFailures, MismatchesRaiseOnEveryRank) {
  std::atomic<int> caught{0};
  constexpr int kCases = 6;
  run_cluster(
      4, hierarchical(64 * 1024),
      [&](Peer& peer) {
        const bool odd = peer.rank() == 3;
        auto expect_mismatch = [&](const std::string& name, const std::function<void()>& post) {
          try {
            post();
            ADD_FAILURE() << name << ": rank " << peer.rank() << " completed a mismatched collective";
          } catch (const MismatchError& e) {
            EXPECT_NE(std::string(e.what()).find("'" + name + "'"), std::string::npos) << e.what();
            EXPECT_NE(std::string(e.what()).find("differently"), std::string::npos) << e.what();
            ++caught;
          } catch (const std::exception& e) {
            ADD_FAILURE() << name << " on rank " << peer.rank() << ": " << typeid(e).name() << ": " << e.what();
          }
        };
        // The large sizes cut into the same first chunks: only the whole count tells them apart.
        std::vector<float> f(odd ? 20 : 10, 1.0f), big(std::size_t(odd ? 3 : 2) << 20, 1.0f), g(8, 1.0f);
        expect_mismatch("size", [&] { peer.allreduce(std::span<float>(f), ReduceOp::sum, "size"); });
        expect_mismatch("large size", [&] { peer.allreduce(std::span<float>(big), ReduceOp::sum, "large size"); });
        expect_mismatch("op", [&] { peer.allreduce(std::span<float>(g), odd ? ReduceOp::max : ReduceOp::sum, "op"); });
        expect_mismatch("root", [&] { peer.broadcast(std::span<float>(g), odd ? 1 : 0, "root"); });
        expect_mismatch(
            "kind", [&] { odd ? peer.barrier("kind") : peer.allreduce(std::span<float>(g), ReduceOp::sum, "kind"); });
        std::vector<float> all(8 * 4);
        expect_mismatch("allgather", [&] {
          const std::size_t k = odd ? 4 : 8;
          peer.allgather(std::span<const float>(g).first(k), std::span<float>(all).first(k * 4), "allgather");
        });
        std::vector<float> ok(5, 1.0f);
        peer.allreduce(std::span<float>(ok), ReduceOp::sum, "size");
        EXPECT_EQ(ok[4], 4.0f);
        peer.barrier("end");
      },
      on_hosts({2, 2}));
  EXPECT_EQ(caught.load(), kCases * 4);
}

// A rank that leaves: every later collective of every kind fails at once on every survivor, naming it, also on
// survivors on the other host that need it only through others.
TEST(HierarchyFailures, ALeaverFailsEveryLaterCollectiveOnEverySurvivor) {
  for (int leaver : {1, 3}) {
    std::latch survivors_done(3);
    run_cluster(
        4, hierarchical(64 * 1024),
        [&](Peer& peer) {
          std::vector<float> warm(1000, 1.0f);
          peer.allreduce(std::span<float>(warm), ReduceOp::sum, "warmup");
          if (peer.rank() == leaver) {
            Peer gone = std::move(peer);
            return;
          }
          std::vector<float> small(100, 1.0f), large(1'000'000, 1.0f), all(400), part(100, 1.0f), mine(100);
          std::vector<std::int64_t> bcast(5000);
          bool agreed = false;
          const std::string value = "v";
          const std::vector<std::pair<std::string, std::function<Work()>>> posts = {
              {"small", [&] { return peer.allreduce_async(std::span<float>(small), ReduceOp::sum, "small"); }},
              {"large", [&] { return peer.allreduce_async(std::span<float>(large), ReduceOp::sum, "large"); }},
              {"barrier", [&] { return peer.barrier_async("barrier"); }},
              {"consensus",
               [&] {
                 return peer.consensus_async(std::as_bytes(std::span<const char>(value.data(), 1)), agreed,
                                             "consensus");
               }},
              {"allgather",
               [&] { return peer.allgather_async(std::span<const float>(part), std::span<float>(all), "ag"); }},
              {"reduce_scatter",
               [&] {
                 return peer.reduce_scatter_async(std::span<const float>(all), std::span<float>(mine), ReduceOp::sum,
                                                  "rs");
               }},
              {"broadcast", [&] { return peer.broadcast_async(std::span<std::int64_t>(bcast), 0, "bcast"); }},
          };
          for (const auto& [name, post] : posts) {
            try {
              post().wait();
              ADD_FAILURE() << name << " completed on rank " << peer.rank() << " without rank " << leaver;
            } catch (const PeerLostError& e) {
              EXPECT_NE(std::string(e.what()).find("rank " + std::to_string(leaver) + " closed its session"),
                        std::string::npos)
                  << name << " on rank " << peer.rank() << ": " << e.what();
            } catch (const std::exception& e) {
              ADD_FAILURE() << name << " on rank " << peer.rank() << ": " << typeid(e).name() << ": " << e.what();
            }
          }
          survivors_done.arrive_and_wait();
        },
        on_hosts({2, 2}));
  }
}

}  // namespace
}  // namespace aikido
