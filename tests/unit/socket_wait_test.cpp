// A thread waiting for a socket collective reads the connections itself (src/runtime/engine.hpp, "Waiting"): lost
// peers, many collectives in flight, collectives nobody waits for, wait timeouts and completion callbacks must all
// behave as with the receive threads alone. Mostly 2 ranks: with more ranks than cores (as 3 ranks on a 2-core
// machine) the receive threads do all the reading.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <set>
#include <string>
#include <thread>
#include <typeinfo>
#include <vector>

#include "cluster.hpp"

namespace aikido {
namespace {

using test::base_config;
using test::run_cluster;

class SocketWait : public ::testing::TestWithParam<TransportKind> {
 protected:
  PeerConfig config() const {
    PeerConfig c = base_config();
    c.transport = GetParam();
    return c;
  }
};

TEST_P(SocketWait, LostPeerFailsTheWaitingThreadBeforeTheTimeout) {
  PeerConfig c = config();
  c.timeout = std::chrono::milliseconds(120'000);  // a loss must be reported at once, never found by the deadline
  std::promise<void> waiting;
  std::shared_future<void> rank0_waits = waiting.get_future().share();
  run_cluster(2, c, [&](Peer& peer) {
    std::vector<float> x(1000, 1.0f);
    peer.allreduce(std::span<float>(x), ReduceOp::sum, "warmup");
    if (peer.rank() == 1) {
      rank0_waits.wait();
      // Long enough for rank 0 to have spun and gone to sleep on the sockets.
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      Peer gone = std::move(peer);  // rank 1 leaves without posting "never"
      return;
    }
    Work w = peer.allreduce_async(std::span<float>(x), ReduceOp::sum, "never");
    waiting.set_value();
    try {
      w.wait();
      ADD_FAILURE() << "completed without rank 1";
    } catch (const PeerLostError& e) {
      EXPECT_NE(std::string(e.what()).find("rank 1"), std::string::npos) << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "unexpected " << typeid(e).name() << ": " << e.what();
    }
  });
}

TEST_P(SocketWait, ManyAsyncCollectivesWithOneWaiter) {
  constexpr int kCount = 40;
  for (int size : {2, 3}) {
    run_cluster(size, config(), [&](Peer& peer) {
      // Sizes below and above the eager limit; every rank posts in its own order and waits for one collective only.
      std::vector<std::vector<float>> buffers(kCount);
      std::vector<Work> works(kCount);
      for (int k = 0; k < kCount; ++k) {
        const int step = peer.rank() == 0 ? 1 : peer.rank() == 1 ? 3 : 7;  // coprime with kCount
        const int i = (k * step + 5 * peer.rank()) % kCount;               // a permutation of 0..kCount-1 per rank
        buffers[std::size_t(i)].assign(std::size_t(i % 4 == 0 ? 100'000 : 10 + i), float(peer.rank() + i));
        works[std::size_t(i)] = peer.allreduce_async(std::span<float>(buffers[std::size_t(i)]), ReduceOp::sum,
                                                     "async." + std::to_string(i));
      }
      works[std::size_t(kCount - 1)].wait();
      for (int i = 0; i < kCount; ++i) {
        works[std::size_t(i)].wait();
        const float expected = float(size * (size - 1) / 2 + size * i);
        EXPECT_EQ(buffers[std::size_t(i)].front(), expected) << i;
        EXPECT_EQ(buffers[std::size_t(i)].back(), expected) << i;
      }
    });
  }
}

TEST_P(SocketWait, CollectivesNobodyWaitsForComplete) {
  run_cluster(2, config(), [](Peer& peer) {
    std::vector<float> x(5000, 1.0f);
    for (int step = 0; step < 20; ++step) {
      // Rank 0 waits for "a" (it reads the sockets), then only polls "b"; rank 1 waits for both.
      peer.allreduce(std::span<float>(x), ReduceOp::max, "a");
      Work b = peer.allreduce_async(std::span<float>(x), ReduceOp::sum, "b");
      if (peer.rank() == 0) {
        while (!b.done()) std::this_thread::sleep_for(std::chrono::microseconds(100));
        EXPECT_EQ(b.error(), nullptr);
      } else {
        b.wait();
      }
      ASSERT_EQ(x[4999], 2.0f);
      std::fill(x.begin(), x.end(), 1.0f);
    }
  });
}

TEST_P(SocketWait, TimedWaitReturnsAndALaterWaitCompletes) {
  std::promise<void> timed_out;
  std::shared_future<void> may_post = timed_out.get_future().share();
  run_cluster(2, config(), [&](Peer& peer) {
    std::vector<float> x(100, 1.0f);
    if (peer.rank() == 0) {
      Work w = peer.allreduce_async(std::span<float>(x), ReduceOp::sum, "late");
      EXPECT_FALSE(w.wait(std::chrono::milliseconds(30)));  // spins, sleeps on the sockets, gives up
      timed_out.set_value();
      EXPECT_TRUE(w.wait(std::chrono::milliseconds(20'000)));
      EXPECT_EQ(x[99], 2.0f);
    } else {
      may_post.wait();
      peer.allreduce(std::span<float>(x), ReduceOp::sum, "late");
    }
  });
}

TEST_P(SocketWait, CallbacksMayWaitForOtherCollectives) {
  run_cluster(2, config(), [](Peer& peer) {
    std::vector<float> x(1000, 1.0f), y(1000, 1.0f);
    Work second = peer.allreduce_async(std::span<float>(y), ReduceOp::sum, "second");
    std::promise<bool> inner;
    Work first = peer.allreduce_async(std::span<float>(x), ReduceOp::sum, "first");
    // The callback runs on whichever thread finished "first": possibly the one waiting below while it reads the
    // sockets. Waiting there must let the other frames flow.
    first.on_complete([&](std::exception_ptr) {
      try {
        inner.set_value(second.wait(std::chrono::milliseconds(20'000)));
      } catch (...) {
        inner.set_value(false);
      }
    });
    first.wait();
    EXPECT_TRUE(inner.get_future().get());
    EXPECT_EQ(x[0], 2.0f);
    EXPECT_EQ(y[999], 2.0f);
  });
}

TEST_P(SocketWait, RequestsAreAnsweredWhileTheirWaiterReadsTheSockets) {
  run_cluster(2, config(), [](Peer& peer) {
    std::vector<double> model(70'000, double(peer.rank()));  // over the eager limit
    peer.save("model", std::span<const double>(model));
    peer.barrier("saved");
    const int target = (peer.rank() + 1) % peer.size();
    std::vector<double> got(model.size());
    for (int i = 0; i < 10; ++i) {
      std::fill(got.begin(), got.end(), -1.0);
      peer.request(target, "model", std::span<double>(got));
      ASSERT_EQ(got.back(), double(target));
    }
    EXPECT_THROW(peer.request(target, "missing", std::span<double>(got)), ConfigError);
    peer.barrier("done");
  });
}

// Rank 1 sends the data of a collective rank 0 waits for and, right behind it, a request. Rank 0's waiting thread
// reads both from the socket in one go, handles the data, and its wait is over; rank 0 then reads nothing and sends
// nothing until the request is answered. The request it read ahead must be answered all the same (it used to wait
// for the next frame on that socket, which here never comes: the request would time out).
TEST_P(SocketWait, ARequestReadAheadByAWaiterIsAnswered) {
  constexpr int kRounds = 10;
  std::vector<std::promise<void>> posted(kRounds), answered(kRounds);
  run_cluster(2, config(), [&](Peer& peer) {
    std::vector<float> small(16, 1.0f);
    peer.save("small", std::span<const float>(small));
    peer.barrier("saved");
    std::vector<float> x(256, 1.0f);
    for (int round = 0; round < kRounds; ++round) {
      const std::string name = "pair " + std::to_string(round);
      if (peer.rank() == 0) {
        Work sum = peer.allreduce_async(std::span<float>(x), ReduceOp::sum, name);
        posted[std::size_t(round)].set_value();
        sum.wait();                                        // reads the socket itself
        answered[std::size_t(round)].get_future().wait();  // reads and sends nothing meanwhile
      } else {
        posted[std::size_t(round)].get_future().wait();
        // Only makes it likelier that rank 0 is inside wait() when the frames come; nothing depends on it.
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
        Work sum = peer.allreduce_async(std::span<float>(x), ReduceOp::sum, name);
        std::vector<float> got(small.size());
        peer.request(0, "small", std::span<float>(got));
        EXPECT_EQ(got[15], 1.0f);
        answered[std::size_t(round)].set_value();
        sum.wait();
      }
      peer.barrier(name + " done");
    }
  });
}

// The library's threads carry names (top -H, perf, gdb): a connection's receive and send threads name their peer.
TEST_P(SocketWait, ConnectionThreadsAreNamed) {
  auto thread_names = [] {
    std::set<std::string> names;
    for (const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
      std::ifstream comm(task.path() / "comm");
      std::string name;
      std::getline(comm, name);
      names.insert(name);
    }
    return names;
  };
  std::atomic<int> checked{0};
  run_cluster(2, config(), [&](Peer& peer) {
    peer.barrier("named");
    const auto names = thread_names();
    const std::string other = std::to_string(1 - peer.rank());
    EXPECT_TRUE(names.count("aikido-recv-" + other)) << "no receive thread for rank " << other;
    EXPECT_TRUE(names.count("aikido-send-" + other)) << "no send thread for rank " << other;
    EXPECT_TRUE(names.count("aikido-watchdog"));
    ++checked;
    peer.barrier("named done");
  });
  EXPECT_EQ(checked.load(), 2);
}

INSTANTIATE_TEST_SUITE_P(Transports, SocketWait, ::testing::Values(TransportKind::tcp, TransportKind::unix_socket),
                         [](const auto& info) { return std::string(transport_name(info.param)); });

}  // namespace
}  // namespace aikido
