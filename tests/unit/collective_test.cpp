// Every collective on every topology, world sizes 1 to 8, element counts (0, 1, odd, several segments), every
// element type and operation. Inputs depend on rank and index so that results are known exactly.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <random>

#include "cluster.hpp"

namespace aikido {
namespace {

using test::run_cluster;

template <class T>
double as_double(T v) {
  return double(float(v));
}
template <>
double as_double<double>(double v) {
  return v;
}
template <>
double as_double<std::int64_t>(std::int64_t v) {
  return double(v);
}
template <>
double as_double<std::int32_t>(std::int32_t v) {
  return double(v);
}
template <>
double as_double<std::uint8_t>(std::uint8_t v) {
  return double(v);
}

template <class T>
T from_double(double v) {
  if constexpr (std::is_same_v<T, float16> || std::is_same_v<T, bfloat16>) {
    return T(float(v));
  } else {
    return T(v);
  }
}

double input(int rank, std::size_t i, ReduceOp op) {
  switch (op) {
    case ReduceOp::sum:
    case ReduceOp::mean:
      return double((rank + 1) * int(i % 7 + 1));
    case ReduceOp::prod:
      return (i + std::size_t(rank)) % 3 == 0 ? 2.0 : 1.0;
    case ReduceOp::min:
    case ReduceOp::max:
      return double((i * 3 + std::size_t(rank) * 5) % 11);
  }
  return 0;
}

template <class T>
double expected(int size, std::size_t i, ReduceOp op) {
  double acc = input(0, i, op);
  for (int r = 1; r < size; ++r) {
    const double x = input(r, i, op);
    switch (op) {
      case ReduceOp::sum:
      case ReduceOp::mean:
        acc += x;
        break;
      case ReduceOp::prod:
        acc *= x;
        break;
      case ReduceOp::min:
        acc = std::min(acc, x);
        break;
      case ReduceOp::max:
        acc = std::max(acc, x);
        break;
    }
  }
  if (op == ReduceOp::mean) {
    if constexpr (std::is_integral_v<T>) {
      return double(std::int64_t(acc) / size);
    } else if constexpr (std::is_same_v<T, float16> || std::is_same_v<T, bfloat16>) {
      return double(float(T(float(acc) / float(size))));
    } else {
      return double(T(acc) / T(size));
    }
  }
  return acc;
}

const std::vector<std::size_t> kCounts = {0, 1, 1001, 20000};

template <class T>
void check_allreduce(Peer& peer, ReduceOp op, std::size_t n, bool in_place) {
  std::vector<T> x(n), y(n);
  for (std::size_t i = 0; i < n; ++i) x[i] = from_double<T>(input(peer.rank(), i, op));
  const std::string name = std::string("ar/") + dtype_name(dtype_of<T>) + "/" + reduce_op_name(op);
  if (in_place) {
    peer.allreduce(std::span<T>(x), op, name);
    y = x;
  } else {
    peer.allreduce(std::span<const T>(x), std::span<T>(y), op, name);
  }
  for (std::size_t i = 0; i < n; ++i) {
    ASSERT_EQ(as_double(y[i]), expected<T>(peer.size(), i, op))
        << name << " n=" << n << " i=" << i << " rank " << peer.rank() << " of " << peer.size();
  }
}

template <class T>
void check_all_ops(Peer& peer) {
  for (ReduceOp op : {ReduceOp::sum, ReduceOp::min, ReduceOp::max, ReduceOp::prod, ReduceOp::mean}) {
    for (std::size_t n : kCounts) check_allreduce<T>(peer, op, n, n == 1001);
  }
}

class Collectives : public ::testing::TestWithParam<std::tuple<int, Topology>> {
 protected:
  PeerConfig config() const {
    PeerConfig c = test::base_config();
    c.topology = std::get<1>(GetParam());
    c.segment_bytes = 4096;  // several segments per block at the larger counts
    return c;
  }
  int size() const { return std::get<0>(GetParam()); }
  // Two ranks per host, so that the hierarchical topology has several hosts and several ranks per host.
  static void two_per_host(int rank, PeerConfig& c) { c.host = "host" + std::to_string(rank / 2); }
};

TEST_P(Collectives, AllreduceEveryTypeAndOp) {
  run_cluster(
      size(), config(),
      [](Peer& peer) {
        check_all_ops<float>(peer);
        check_all_ops<double>(peer);
        check_all_ops<std::int32_t>(peer);
        check_all_ops<std::int64_t>(peer);
        check_all_ops<std::uint8_t>(peer);
        check_all_ops<float16>(peer);
        check_all_ops<bfloat16>(peer);
      },
      two_per_host);
}

TEST_P(Collectives, Broadcast) {
  run_cluster(
      size(), config(),
      [](Peer& peer) {
        for (int root : {0, peer.size() - 1}) {
          for (std::size_t n : kCounts) {
            std::vector<std::int64_t> buf(n, -1);
            if (peer.rank() == root) {
              for (std::size_t i = 0; i < n; ++i) buf[i] = std::int64_t(i * 31 + std::size_t(root));
            }
            peer.broadcast(std::span<std::int64_t>(buf), root, "bcast");
            for (std::size_t i = 0; i < n; ++i) ASSERT_EQ(buf[i], std::int64_t(i * 31 + std::size_t(root)));
          }
        }
      },
      two_per_host);
}

TEST_P(Collectives, AllgatherReduceScatterGather) {
  run_cluster(
      size(), config(),
      [](Peer& peer) {
        const int n = peer.size(), me = peer.rank();
        for (std::size_t k : {std::size_t(0), std::size_t(1), std::size_t(333), std::size_t(3000)}) {
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
          const int ranks_sum = n * (n + 1) / 2;
          for (std::size_t i = 0; i < k; ++i) {
            ASSERT_EQ(mine[i], std::int32_t(ranks_sum * int((std::size_t(me) * k + i) % 97))) << "reduce_scatter";
          }

          const int root = n - 1;
          std::vector<double> gathered(me == root ? k * std::size_t(n) : 0, -1.0);
          std::vector<double> part(k);
          for (std::size_t i = 0; i < k; ++i) part[i] = me + double(i) / 4;
          peer.gather(std::span<const double>(part), std::span<double>(gathered), root, "gather");
          if (me == root) {
            for (int r = 0; r < n; ++r) {
              for (std::size_t i = 0; i < k; ++i) ASSERT_EQ(gathered[std::size_t(r) * k + i], r + double(i) / 4);
            }
          }
        }
      },
      two_per_host);
}

TEST_P(Collectives, BarrierAndConsensus) {
  run_cluster(size(), config(), [](Peer& peer) {
    peer.barrier();
    const std::string same = "same value";
    EXPECT_TRUE(peer.consensus(std::as_bytes(std::span<const char>(same.data(), same.size())), "c1"));
    const std::string mine = "value of rank " + std::to_string(peer.rank());
    EXPECT_EQ(peer.consensus(std::as_bytes(std::span<const char>(mine.data(), mine.size())), "c2"), peer.size() == 1);
    // Same prefix, different lengths.
    const std::string prefix(std::size_t(peer.rank() == 0 ? 4 : 5), 'x');
    EXPECT_EQ(peer.consensus(std::as_bytes(std::span<const char>(prefix.data(), prefix.size())), "c3"),
              peer.size() == 1);
    peer.barrier("end");
  });
}

INSTANTIATE_TEST_SUITE_P(SizesAndTopologies, Collectives,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4, 5, 8),
                                            ::testing::Values(Topology::ring, Topology::tree, Topology::star,
                                                              Topology::hierarchical, Topology::multi_ring,
                                                              Topology::automatic)),
                         [](const auto& info) {
                           std::string name = topology_name(std::get<1>(info.param));
                           std::replace(name.begin(), name.end(), '-', '_');
                           return "n" + std::to_string(std::get<0>(info.param)) + "_" + name;
                         });

// Segments larger than the eager limit wait for the receiver's `ready`; this exercises that path.
TEST(LargeBuffers, RingAndTreeWithMegabyteSegments) {
  for (Topology t : {Topology::ring, Topology::tree}) {
    PeerConfig c = test::base_config();
    c.topology = t;
    run_cluster(3, c, [](Peer& peer) {
      const std::size_t n = 3 * (1 << 20) + 5;
      std::vector<float> x(n, float(peer.rank() + 1)), y(n);
      for (int step = 0; step < 3; ++step) {
        peer.allreduce(std::span<const float>(x), std::span<float>(y), ReduceOp::sum, "big");
        for (std::size_t i = 0; i < n; i += 997) ASSERT_EQ(y[i], 6.0f);
        ASSERT_EQ(y[n - 1], 6.0f);
      }
    });
  }
}

// 200 named allreduces of mixed sizes and types, posted in a different order on every rank and waited in reverse.
TEST(Matching, OrderFreeConcurrentCollectives) {
  for (Topology t : {Topology::ring, Topology::tree}) {
    PeerConfig c = test::base_config();
    c.topology = t;
    c.segment_bytes = 32 * 1024;
    run_cluster(4, c, [](Peer& peer) {
      constexpr int kCount = 200;
      auto size_of = [](int j) { return std::size_t((j * 7919) % 50000); };
      std::vector<std::vector<float>> f(kCount);
      std::vector<std::vector<std::int64_t>> l(kCount);
      for (int step = 0; step < 2; ++step) {
        std::vector<int> order(kCount);
        for (int j = 0; j < kCount; ++j) order[std::size_t(j)] = j;
        std::mt19937 rng(unsigned(peer.rank() * 100 + step));
        std::shuffle(order.begin(), order.end(), rng);
        std::vector<Work> works;
        for (int j : order) {
          const std::size_t n = size_of(j);
          const std::string name = "tensor/" + std::to_string(j);
          if (j % 2 == 0) {
            f[std::size_t(j)].assign(n, float(peer.rank() + j + step));
            works.push_back(peer.allreduce_async(std::span<float>(f[std::size_t(j)]), ReduceOp::sum, name));
          } else {
            l[std::size_t(j)].assign(n, std::int64_t(peer.rank()) * j + step);
            works.push_back(peer.allreduce_async(std::span<std::int64_t>(l[std::size_t(j)]), ReduceOp::max, name));
          }
        }
        for (auto it = works.rbegin(); it != works.rend(); ++it) it->wait();
        for (int j = 0; j < kCount; ++j) {
          const std::size_t n = size_of(j);
          for (std::size_t i = 0; i < n; i += 101) {
            if (j % 2 == 0) {
              ASSERT_EQ(f[std::size_t(j)][i], float(0 + 1 + 2 + 3 + 4 * (j + step))) << "tensor " << j;
            } else {
              ASSERT_EQ(l[std::size_t(j)][i], std::int64_t(3) * j + step) << "tensor " << j;
            }
          }
        }
      }
    });
  }
}

}  // namespace
}  // namespace aikido
