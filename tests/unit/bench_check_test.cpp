// aikido-bench --check (tools/aikido-bench/bench_common.hpp): the closed form matches what real allreduces compute
// for every element type and operation, and a wrong element, a collective that writes nothing or one that writes only
// part of its output is caught and named.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <functional>

#include "bench_common.hpp"
#include "cluster.hpp"

namespace aikido {
namespace {

using bench::CheckOp;
using bench::CheckPattern;
using bench::ResultCheck;

CheckOp check_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum:
      return CheckOp::sum;
    case ReduceOp::min:
      return CheckOp::min;
    case ReduceOp::max:
      return CheckOp::max;
    case ReduceOp::prod:
      return CheckOp::prod;
    case ReduceOp::mean:
      return CheckOp::mean;
  }
  return CheckOp::sum;
}

// What a test does to the result after the real allreduce of one iteration (on this rank).
using Tamper = std::function<void(int rank, std::span<std::byte> output)>;

// Runs the benchmark's loop (time_iterations with its --check) over a real allreduce of `count` elements of T;
// returns this rank's failure message, if any.
// `real_calls` >= 0: only that many iterations run the allreduce, the later ones write nothing.
template <class T>
std::optional<std::string> run_checked(Peer& peer, ReduceOp op, std::size_t count, const Tamper& tamper = {},
                                       int real_calls = -1) {
  const CheckPattern<T> pattern(check_op(op), peer.size());
  std::vector<T> send(count), recv(count);
  pattern.fill_input(send, peer.rank());
  const int warmup = 2;
  ResultCheck<T> check(
      pattern, {"aikido-bench", dtype_name(dtype_of<T>), reduce_op_name(op), count * sizeof(T), peer.rank(), warmup});
  check.start(recv);
  bench::time_iterations(
      warmup, 5, [&] { peer.barrier("bench.barrier"); },
      [&] {
        if (real_calls >= 0 && real_calls-- == 0) {
          ++real_calls;
          return;
        }
        peer.allreduce(std::span<const T>(send), std::span<T>(recv), op, "bench.allreduce");
        if (tamper) tamper(peer.rank(), std::as_writable_bytes(std::span<T>(recv)));
      },
      [&](int iteration) { check.after(recv, iteration); });
  return check.failure();
}

template <class T>
void expect_every_op_passes(Peer& peer) {
  for (ReduceOp op : {ReduceOp::sum, ReduceOp::min, ReduceOp::max, ReduceOp::prod, ReduceOp::mean}) {
    for (std::size_t count : {std::size_t(1), std::size_t(1000), std::size_t(70'001)}) {
      const auto failure = run_checked<T>(peer, op, count);
      EXPECT_FALSE(failure) << dtype_name(dtype_of<T>) << " " << reduce_op_name(op) << " " << count << ": " << *failure;
    }
  }
}

// The closed form agrees with real allreduces on both paths, for every element type and operation.
TEST(BenchCheck, PassesForEveryTypeAndOperation) {
  for (TransportKind transport : {TransportKind::automatic, TransportKind::tcp}) {
    PeerConfig c = test::base_config();
    c.transport = transport;
    test::run_cluster(3, c, [](Peer& peer) {
      expect_every_op_passes<float>(peer);
      expect_every_op_passes<double>(peer);
      expect_every_op_passes<float16>(peer);
      expect_every_op_passes<bfloat16>(peer);
      expect_every_op_passes<std::int32_t>(peer);
      expect_every_op_passes<std::int64_t>(peer);
      expect_every_op_passes<std::uint8_t>(peer);
    });
  }
}

// One wrong element on one rank in one timed iteration: that rank reports it with its place and both values; the
// others see nothing wrong.
TEST(BenchCheck, AWrongElementIsNamed) {
  std::atomic<int> reported{0};
  test::run_cluster(3, test::base_config(), [&](Peer& peer) {
    int calls = 0;
    const Tamper tamper = [&](int rank, std::span<std::byte> output) {
      // Call 5 is timed iteration 3 (after 2 warmup iterations): element 17 of rank 2 becomes 9.
      if (rank == 2 && calls++ == 5) reinterpret_cast<float*>(output.data())[17] = 9.0f;
    };
    const auto failure = run_checked<float>(peer, ReduceOp::sum, 1024, tamper);
    if (peer.rank() != 2) {
      EXPECT_FALSE(failure) << *failure;
      return;
    }
    ASSERT_TRUE(failure);
    // Element 17 has residue 3: ranks contribute 4, 5 and 6.
    EXPECT_EQ(*failure,
              "aikido-bench: check failed: allreduce of 4K (4096 bytes, f32 sum) on rank 2, iteration 3, element 17: "
              "expected 15, got 9");
    ++reported;
  });
  EXPECT_EQ(reported.load(), 1);
}

// A collective that leaves the output alone (the poisoned bytes stay), writes only its first half, or stops writing.
TEST(BenchCheck, AnUnwrittenOutputIsCaught) {
  test::run_cluster(2, test::base_config(), [&](Peer& peer) {
    // The real result is replaced by the poison the check wrote before: as if nothing had been written.
    const Tamper nothing = [](int, std::span<std::byte> output) { std::memset(output.data(), 0xff, output.size()); };
    for (ReduceOp op : {ReduceOp::sum, ReduceOp::max}) {
      auto failure = run_checked<std::uint8_t>(peer, op, 100, nothing);
      ASSERT_TRUE(failure);
      EXPECT_NE(failure->find("warmup iteration 0, element 0:"), std::string::npos) << *failure;
      failure = run_checked<float>(peer, op, 100, nothing);
      ASSERT_TRUE(failure);
      // Not std::regex: its construction races on libstdc++'s locale cache when ranks (threads) build one at once.
      EXPECT_TRUE(failure->find("element 0: expected ") != std::string::npos &&
                  (failure->find(", got nan") != std::string::npos || failure->find(", got -nan") != std::string::npos))
          << *failure;
    }
    const Tamper half = [](int, std::span<std::byte> output) {
      std::memset(output.data() + output.size() / 2, 0xff, output.size() - output.size() / 2);
    };
    auto failure = run_checked<std::int32_t>(peer, ReduceOp::sum, 1000, half);
    ASSERT_TRUE(failure);
    EXPECT_NE(failure->find("element 500:"), std::string::npos) << *failure;
    // Right once, then nothing: the right values of the first iteration must not pass for the second's.
    failure = run_checked<float>(peer, ReduceOp::sum, 1000, {}, 1);
    ASSERT_TRUE(failure);
    EXPECT_NE(failure->find("warmup iteration 1, element 0:"), std::string::npos) << *failure;
  });
}

}  // namespace
}  // namespace aikido
