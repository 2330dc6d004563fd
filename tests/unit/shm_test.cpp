// The same-host shared-memory path (runtime/shm_collectives.hpp): every rank of these clusters is on one host and
// the transport is `auto`, so allreduce, barrier and consensus run through shared memory. Sizes around the inline
// limit and across several pieces of a bay, every element type, mismatches, many names in different orders, more
// names than the table holds, ranks that leave, and asynchronous completion without a waiting thread.
#include <gtest/gtest.h>

#include <atomic>
#include <future>
#include <latch>
#include <random>
#include <typeinfo>

#include "cluster.hpp"
#include "runtime/shm_collectives.hpp"

namespace aikido {
namespace {

using test::base_config;
using test::run_cluster;

// Rank- and index-dependent inputs whose reductions are exact in every element type.
double input(int rank, std::size_t i, ReduceOp op) {
  switch (op) {
    case ReduceOp::sum:
    case ReduceOp::mean:
      return double((rank + 1) * int(i % 5 + 1));
    case ReduceOp::prod:
      return (i + std::size_t(rank)) % 4 == 0 ? 2.0 : 1.0;
    case ReduceOp::min:
    case ReduceOp::max:
      return double((i * 3 + std::size_t(rank) * 5) % 13);
  }
  return 0;
}

template <class T>
T to(double v) {
  if constexpr (std::is_same_v<T, float16> || std::is_same_v<T, bfloat16>) {
    return T(float(v));
  } else {
    return T(v);
  }
}

template <class T>
double back(T v) {
  if constexpr (std::is_same_v<T, float16> || std::is_same_v<T, bfloat16>) {
    return double(float(v));
  } else {
    return double(v);
  }
}

template <class T>
double expected(int size, std::size_t i, ReduceOp op) {
  double acc = input(0, i, op);
  for (int r = 1; r < size; ++r) {
    const double x = input(r, i, op);
    if (op == ReduceOp::sum || op == ReduceOp::mean) acc += x;
    if (op == ReduceOp::prod) acc *= x;
    if (op == ReduceOp::min) acc = std::min(acc, x);
    if (op == ReduceOp::max) acc = std::max(acc, x);
  }
  if (op == ReduceOp::mean) {
    if constexpr (std::is_integral_v<T>) {
      return double(std::int64_t(acc) / size);
    } else if constexpr (std::is_same_v<T, float16> || std::is_same_v<T, bfloat16>) {
      return back(T(float(T(float(acc))) / float(size)));
    } else {
      return double(T(acc) / T(size));
    }
  }
  return acc;
}

template <class T>
void check(Peer& peer, ReduceOp op, std::size_t n, bool in_place, const std::string& name) {
  std::vector<T> x(n), y(n, to<T>(-1));
  for (std::size_t i = 0; i < n; ++i) x[i] = to<T>(input(peer.rank(), i, op));
  if (in_place) {
    peer.allreduce(std::span<T>(x), op, name);
    y.swap(x);
  } else {
    peer.allreduce(std::span<const T>(x), std::span<T>(y), op, name);
  }
  for (std::size_t i = 0; i < n; ++i) {
    if (back(y[i]) != expected<T>(peer.size(), i, op)) {
      FAIL() << name << " " << dtype_name(dtype_of<T>) << " " << reduce_op_name(op) << " n=" << n << " i=" << i
             << ": got " << back(y[i]) << ", expected " << expected<T>(peer.size(), i, op) << " on rank " << peer.rank()
             << " of " << peer.size();
    }
  }
}

// Element counts for T: empty, one, odd, around the inline limit, and several pieces of a bay (odd too).
template <class T>
std::vector<std::size_t> counts(int ranks) {
  const auto layout = detail::ShmLayout::for_ranks(ranks);
  const std::size_t inline_elems = layout.inline_bytes / sizeof(T), piece_elems = layout.piece_bytes / sizeof(T);
  return {0, 1, 7, inline_elems - 1, inline_elems, inline_elems + 1, 3 * piece_elems + 13};
}

template <class T>
void check_type(Peer& peer, std::initializer_list<ReduceOp> ops) {
  int k = 0;
  for (ReduceOp op : ops) {
    for (std::size_t n : counts<T>(peer.size())) {
      check<T>(peer, op, n, ++k % 2 == 0, "x");
      if (::testing::Test::HasFatalFailure() || ::testing::Test::HasFailure()) return;
    }
  }
}

// Every one of the `posted` collectives of this session took the shared-memory path.
void expect_shared_memory(const Peer& peer, std::uint64_t posted) {
  const PathCounts paths = peer.path_counts();
  EXPECT_EQ(paths.shared_memory, posted) << "rank " << peer.rank();
  EXPECT_EQ(paths.sockets, 0u) << "rank " << peer.rank();
  EXPECT_EQ(paths.shared_memory_table_full, 0u) << "rank " << peer.rank();
}

class SharedMemory : public ::testing::TestWithParam<int> {};

TEST_P(SharedMemory, EveryTypeOpAndSize) {
  run_cluster(GetParam(), base_config(), [](Peer& peer) {
    const auto all = {ReduceOp::sum, ReduceOp::min, ReduceOp::max, ReduceOp::prod, ReduceOp::mean};
    check_type<float>(peer, all);
    check_type<double>(peer, {ReduceOp::sum, ReduceOp::mean, ReduceOp::min});
    check_type<bfloat16>(peer, {ReduceOp::sum, ReduceOp::max, ReduceOp::mean});
    check_type<float16>(peer, {ReduceOp::sum, ReduceOp::prod});
    check_type<std::int32_t>(peer, {ReduceOp::sum, ReduceOp::mean});
    check_type<std::int64_t>(peer, {ReduceOp::max, ReduceOp::prod});
    check_type<std::uint8_t>(peer, {ReduceOp::sum, ReduceOp::min});
    // 7 sizes for each of 5 + 3 + 3 + 2 + 2 + 2 + 2 operations.
    expect_shared_memory(peer, 7 * 19);
  });
}

// Different sizes, types, operations and kinds under one name: MismatchError on every rank, before any data is
// combined; the next occurrence of the name lines up again. Sizes on both sides of the inline limit.
TEST_P(SharedMemory, MismatchesRaiseOnEveryRank) {
  const int ranks = GetParam();
  const std::size_t inline_floats = detail::ShmLayout::for_ranks(ranks).inline_bytes / sizeof(float);
  std::atomic<int> caught{0};
  run_cluster(ranks, base_config(), [&](Peer& peer) {
    const bool odd = peer.rank() == peer.size() - 1;
    std::vector<float> f(odd ? 10 : 20, 1.0f), big(odd ? 10 : 4 * inline_floats, 1.0f);
    std::vector<std::int32_t> i(20, 1);
    auto expect_mismatch = [&](const std::function<void()>& post, const char* what) {
      try {
        post();
        ADD_FAILURE() << what << ": rank " << peer.rank() << " completed a mismatched collective";
      } catch (const MismatchError& e) {
        EXPECT_NE(std::string(e.what()).find("differently"), std::string::npos) << e.what();
        ++caught;
      } catch (const std::exception& e) {
        ADD_FAILURE() << what << ": unexpected " << typeid(e).name() << ": " << e.what();
      }
    };
    expect_mismatch([&] { peer.allreduce(std::span<float>(f), ReduceOp::sum, "size"); }, "size");
    expect_mismatch([&] { peer.allreduce(std::span<float>(big), ReduceOp::sum, "large"); }, "size across paths");
    expect_mismatch(
        [&] {
          odd ? peer.allreduce(std::span<std::int32_t>(i), ReduceOp::sum, "type")
              : peer.allreduce(std::span<float>(f).first(20), ReduceOp::sum, "type");
        },
        "type");
    std::vector<float> g(20, 1.0f);
    expect_mismatch([&] { peer.allreduce(std::span<float>(g), odd ? ReduceOp::max : ReduceOp::sum, "op"); }, "op");
    expect_mismatch([&] { odd ? peer.barrier("kind") : peer.allreduce(std::span<float>(g), ReduceOp::sum, "kind"); },
                    "kind");
    std::vector<float> ok(5, 1.0f);
    peer.allreduce(std::span<float>(ok), ReduceOp::sum, "size");
    EXPECT_EQ(ok[4], float(peer.size()));
    expect_shared_memory(peer, 6);
    peer.barrier("end");
  });
  EXPECT_EQ(caught.load(), 5 * ranks);
}

// Many names of mixed sizes (small, and large ones that outnumber the bays), posted in a different order on every
// rank, several steps, waited in another order.
TEST_P(SharedMemory, ManyNamesInDifferentOrders) {
  run_cluster(GetParam(), base_config(), [](Peer& peer) {
    constexpr int kNames = 60;
    auto size_of = [](int j) { return j % 5 == 0 ? std::size_t(100'000 + j) : std::size_t((j * 7919) % 3000); };
    std::vector<std::vector<float>> data(kNames);
    for (int step = 0; step < 3; ++step) {
      std::vector<int> order(kNames);
      for (int j = 0; j < kNames; ++j) order[std::size_t(j)] = j;
      std::mt19937 rng(unsigned(peer.rank() * 1000 + step));
      std::shuffle(order.begin(), order.end(), rng);
      std::vector<Work> works(kNames);
      for (int j : order) {
        data[std::size_t(j)].assign(size_of(j), float(peer.rank() + j + step));
        works[std::size_t(j)] =
            peer.allreduce_async(std::span<float>(data[std::size_t(j)]), ReduceOp::sum, "t/" + std::to_string(j));
      }
      std::shuffle(order.begin(), order.end(), rng);
      for (int j : order) works[std::size_t(j)].wait();
      const int n = peer.size();
      for (int j = 0; j < kNames; ++j) {
        const float want = float(n * (n - 1) / 2 + n * (j + step));
        for (std::size_t i = 0; i < data[std::size_t(j)].size(); i += 37) {
          ASSERT_EQ(data[std::size_t(j)][i], want) << "name " << j << " step " << step;
        }
      }
    }
    expect_shared_memory(peer, 3 * kNames);
  });
}

// Asynchronous collectives complete without any thread waiting for them (the progress thread drives them).
TEST_P(SharedMemory, CompletesWithoutWaiting) {
  run_cluster(GetParam(), base_config(), [](Peer& peer) {
    std::vector<float> small(100, 1.0f), large(400'000, 1.0f);
    std::promise<bool> called;
    Work a = peer.allreduce_async(std::span<float>(small), ReduceOp::sum, "small");
    Work b = peer.allreduce_async(std::span<float>(large), ReduceOp::sum, "large");
    b.on_complete([&](std::exception_ptr e) { called.set_value(e == nullptr); });
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!(a.done() && b.done()) && std::chrono::steady_clock::now() < give_up) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ASSERT_TRUE(a.done() && b.done());
    EXPECT_TRUE(called.get_future().get());
    EXPECT_EQ(small[99], float(peer.size()));
    EXPECT_EQ(large[399'999], float(peer.size()));
    expect_shared_memory(peer, 2);
  });
}

INSTANTIATE_TEST_SUITE_P(Ranks, SharedMemory, ::testing::Values(2, 3, 4),
                         [](const auto& info) { return "n" + std::to_string(info.param); });

// More names than the shared table holds: the names without a record take the socket path, on every rank alike.
TEST(SharedMemoryTable, FullTableFallsBackToSockets) {
  run_cluster(3, base_config(), [](Peer& peer) {
    const int names = int(detail::kShmEntries) + 100;
    for (int step = 0; step < 2; ++step) {
      std::vector<std::vector<std::int32_t>> data(std::size_t(names), std::vector<std::int32_t>(3));
      std::vector<Work> works;
      for (int k = 0; k < names; ++k) {
        const int j = peer.rank() % 2 == 0 ? k : names - 1 - k;  // different orders, so records go to any name
        std::fill(data[std::size_t(j)].begin(), data[std::size_t(j)].end(), j + peer.rank());
        works.push_back(peer.allreduce_async(std::span<std::int32_t>(data[std::size_t(j)]), ReduceOp::sum,
                                             "n" + std::to_string(j)));
      }
      for (auto& w : works) w.wait();
      for (int j = 0; j < names; ++j) ASSERT_EQ(data[std::size_t(j)][2], 3 * j + 3) << "name " << j;
    }
    // The table holds kShmEntries names, whichever rank claimed them; the other 100 took the sockets, each step.
    const PathCounts paths = peer.path_counts();
    EXPECT_EQ(paths.shared_memory, 2 * std::uint64_t(detail::kShmEntries));
    EXPECT_EQ(paths.shared_memory_table_full, 2 * 100u);
    EXPECT_EQ(paths.sockets, 2 * 100u);
  });
}

// A rank that leaves: collectives that still need it fail with PeerLostError naming it (small and large ones,
// pending and posted later); what it finished before leaving stays valid for the others.
TEST(SharedMemoryFailures, RankThatLeavesFailsTheOthers) {
  std::latch survivors_done(3);
  run_cluster(4, base_config(), [&](Peer& peer) {
    std::vector<float> small(100, 1.0f), large(300'000, 1.0f);
    peer.allreduce(std::span<float>(large), ReduceOp::sum, "warmup");
    EXPECT_EQ(large[0], 4.0f);
    if (peer.rank() == 2) {
      Peer gone = std::move(peer);
      return;
    }
    Work pending_small = peer.allreduce_async(std::span<float>(small), ReduceOp::sum, "after/small");
    Work pending_large = peer.allreduce_async(std::span<float>(large), ReduceOp::sum, "after/large");
    for (Work* w : {&pending_small, &pending_large}) {
      try {
        w->wait();
        ADD_FAILURE() << "completed without rank 2";
      } catch (const PeerLostError& e) {
        EXPECT_NE(std::string(e.what()).find("rank 2"), std::string::npos) << e.what();
      } catch (const std::exception& e) {
        ADD_FAILURE() << "unexpected " << typeid(e).name() << ": " << e.what();
      }
    }
    EXPECT_THROW(peer.barrier("later"), PeerLostError);
    expect_shared_memory(peer, 4);
    survivors_done.arrive_and_wait();
  });
}

// A rank that never posts: the others fail with TimeoutError naming it, within the deadline, on both paths.
TEST(SharedMemoryFailures, TimeoutNamesTheRankThatDidNotPost) {
  PeerConfig c = base_config();
  c.timeout = std::chrono::milliseconds(1500);
  std::latch all_done(3);
  run_cluster(3, c, [&](Peer& peer) {
    if (peer.rank() == 1) {
      all_done.arrive_and_wait();
      return;
    }
    std::vector<float> small(10, 1.0f), large(300'000, 1.0f);
    for (auto* x : {&small, &large}) {
      const auto start = std::chrono::steady_clock::now();
      try {
        peer.allreduce(std::span<float>(*x), ReduceOp::sum, x == &small ? "late/small" : "late/large");
        ADD_FAILURE() << "completed without rank 1";
      } catch (const TimeoutError& e) {
        EXPECT_NE(std::string(e.what()).find("rank 1 has not posted it"), std::string::npos) << e.what();
      }
      EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
    }
    expect_shared_memory(peer, 2);
    all_done.arrive_and_wait();
  });
}

// AIKIDO_TRANSPORT=unix and tcp keep sockets; results agree with the shared-memory path.
TEST(SharedMemoryTransports, SocketTransportsGiveTheSameResults) {
  for (TransportKind kind : {TransportKind::automatic, TransportKind::unix_socket, TransportKind::tcp}) {
    PeerConfig c = base_config();
    c.transport = kind;
    run_cluster(3, c, [kind](Peer& peer) {
      check<float>(peer, ReduceOp::sum, 200'001, false, "t");
      check<double>(peer, ReduceOp::mean, 33, true, "u");
      if (kind == TransportKind::automatic) {
        expect_shared_memory(peer, 2);
      } else {
        EXPECT_EQ(peer.path_counts().shared_memory, 0u);
        EXPECT_EQ(peer.path_counts().sockets, 2u);
      }
    });
  }
}

}  // namespace
}  // namespace aikido
