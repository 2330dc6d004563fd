// Peer API semantics: misuse, the model store, topology switches, transports and the handshake. Failures over every
// transport and topology are in fault_test.cpp.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <latch>
#include <set>
#include <thread>
#include <typeinfo>

#include "cluster.hpp"
#include "runtime/endpoint.hpp"
#include "runtime/peer_env.hpp"
#include "transport/handshake.hpp"
#include "transport/socket.hpp"

namespace aikido {
namespace {

using test::base_config;
using test::run_cluster;

PeerConfig short_timeout(std::chrono::milliseconds t) {
  PeerConfig c = base_config();
  c.timeout = t;
  return c;
}

TEST(Peer, SingleRankWithoutStore) {
  Peer peer = Peer::create(PeerConfig{});
  EXPECT_EQ(peer.rank(), 0);
  EXPECT_EQ(peer.size(), 1);
  EXPECT_EQ(peer.local_size(), 1);
  std::vector<float> x{1, 2, 3}, y(3);
  peer.allreduce(std::span<const float>(x), std::span<float>(y), ReduceOp::sum, "x");
  EXPECT_EQ(y, x);
  peer.barrier();
  EXPECT_TRUE(peer.consensus(std::as_bytes(std::span<const float>(x)), "c"));
}

// Joining has its own deadline (AIKIDO_CONNECT_TIMEOUT), apart from the collectives' (here a minute).
TEST(Peer, JoiningGivesUpAfterTheConnectTimeout) {
  PeerConfig config = base_config();
  config.timeout = std::chrono::milliseconds(60'000);
  config.connect_timeout = std::chrono::milliseconds(300);
  config.rank = 0;
  config.size = 2;
  config.store = make_memory_store();
  config.job_id = "connect-timeout";
  try {
    Peer::create(config);  // rank 1 never comes
    ADD_FAILURE() << "joined without rank 1";
  } catch (const TimeoutError& e) {
    EXPECT_NE(
        std::string(e.what()).find("rank 1 did not join the cluster version 0 within 0.3 s (AIKIDO_CONNECT_TIMEOUT)"),
        std::string::npos)
        << e.what();
  }
}

// A rank whose lower peer published its address and then left (it moved on to a newer cluster version and closed
// its listener) stops connecting as soon as `cancel` says the version was superseded, not at the join deadline.
TEST(Peer, ConnectingToAPeerThatLeftStopsWhenCancelled) {
  PeerConfig config = base_config();
  config.timeout = std::chrono::milliseconds(60'000);
  config.rank = 1;
  config.size = 2;
  config.cluster_version = 1;
  config.store = make_memory_store();
  config.job_id = "cancelled-connect";
  config.host = "here";
  {
    // Rank 0's record, with listeners that are closed again at once: connecting is refused.
    auto tcp = transport::Listener::bind_tcp("127.0.0.1", 0);
    auto unix_listener = transport::Listener::bind_unix("@aikido-test-cancelled-connect-" + std::to_string(::getpid()));
    detail::Endpoint gone{config.host, tcp.address().to_string(), unix_listener.address().to_string()};
    config.store->set(detail::endpoint_key(config.job_id, 1, 0), detail::encode_endpoint(gone));
  }
  const auto start = std::chrono::steady_clock::now();
  config.cancel = [&] { return std::chrono::steady_clock::now() - start > std::chrono::milliseconds(300); };
  try {
    Peer::create(config);
    ADD_FAILURE() << "joined a rank that left";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rendezvous at cluster version 1 cancelled"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
}

TEST(Peer, LocalRanksFollowHosts) {
  run_cluster(
      4, base_config(),
      [](Peer& peer) {
        EXPECT_EQ(peer.local_size(), 2);
        EXPECT_EQ(peer.local_rank(), peer.rank() % 2);
      },
      [](int rank, PeerConfig& c) { c.host = rank < 2 ? "a" : "b"; });
}

// Over sockets a small allreduce on the ring topology runs on the tree: sizes on both sides of that limit must still
// meet as a mismatch on every rank, and both kinds must give exact results.
// Ranks posting a small allreduce (all data eager, no `ready` frames between ranks that exchange data) against one
// posting a large one: every rank reports the mismatch, also those that only hear of it from another rank while a
// rank that found it leaves at once (the failure is passed on before the goodbye). Repeated: the order of arrival
// differs from run to run.
TEST(Peer, SmallAndLargeRingAllreducesOverSockets) {
  for (int run = 0; run < 10; ++run) {
    PeerConfig config = base_config();
    config.transport = TransportKind::tcp;
    std::atomic<int> caught{0};
    run_cluster(4, config, [&](Peer& peer) {
      for (std::size_t count : {std::size_t(1000), std::size_t(16384), std::size_t(16385), std::size_t(100000)}) {
        std::vector<float> x(count, float(peer.rank() + 1));
        peer.allreduce(std::span<float>(x), ReduceOp::sum, "sized");
        EXPECT_EQ(x.front(), 10.0f) << count;
        EXPECT_EQ(x.back(), 10.0f) << count;
      }
      std::vector<float> x(peer.rank() == 1 ? 100000 : 1000, 1.0f);  // 400 KB on the ring against 4 KB on the tree
      try {
        peer.allreduce(std::span<float>(x), ReduceOp::sum, "straddle");
        ADD_FAILURE() << "rank " << peer.rank() << " completed a mismatched allreduce";
      } catch (const MismatchError& e) {
        EXPECT_NE(std::string(e.what()).find("straddle"), std::string::npos) << e.what();
        ++caught;
      }
    });
    EXPECT_EQ(caught.load(), 4) << "run " << run;
  }
}

// A rank that posts nothing at all: the timeout says so (fault_test.cpp has one that waits elsewhere).
TEST(Peer, TimeoutNamesTheRankThatDidNotPostAndThatItIsInNoCollective) {
  std::latch all_done(3);  // keeps every session open until all ranks have seen the outcome
  run_cluster(3, short_timeout(std::chrono::milliseconds(3000)), [&](Peer& peer) {
    if (peer.rank() == 2) {  // never posts "late"
      all_done.arrive_and_wait();
      return;
    }
    std::vector<float> x(100, 1.0f);
    try {
      peer.allreduce(std::span<float>(x), ReduceOp::sum, "late");
      ADD_FAILURE() << "completed without rank 2";
    } catch (const TimeoutError& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("'late'"), std::string::npos) << what;
      EXPECT_NE(what.find("rank 2 has not posted it; rank 2 is in no collective"), std::string::npos) << what;
    }
    all_done.arrive_and_wait();
  });
}

TEST(Peer, MisuseIsRejectedClearly) {
  std::promise<void> tried;  // rank 1 posts 'dup' only once rank 0 has tried it twice: rank 0's is then in flight
  std::shared_future<void> may_post = tried.get_future().share();
  run_cluster(2, base_config(), [&](Peer& peer) {
    std::vector<float> a(10), b(11), big(20), small(3);
    EXPECT_THROW(peer.allreduce(std::span<const float>(a), std::span<float>(b), ReduceOp::sum, "x"), ConfigError);
    EXPECT_THROW(peer.allgather(std::span<const float>(a), std::span<float>(b), "x"), ConfigError);
    EXPECT_THROW(peer.reduce_scatter(std::span<const float>(big), std::span<float>(small), ReduceOp::sum, "x"),
                 ConfigError);
    EXPECT_THROW(peer.broadcast(std::span<float>(a), 5, "x"), ConfigError);
    EXPECT_THROW(peer.allreduce(std::span<float>(a), ReduceOp::sum, ""), ConfigError);
    // The same name posted twice at once.
    if (peer.rank() == 1) may_post.wait();
    Work first = peer.allreduce_async(std::span<float>(a), ReduceOp::sum, "dup");
    if (peer.rank() == 0) {
      try {
        peer.allreduce_async(std::span<float>(b), ReduceOp::sum, "dup");
        ADD_FAILURE() << "a second 'dup' in flight was accepted";
      } catch (const ConfigError& e) {
        EXPECT_NE(std::string(e.what()).find("'dup'"), std::string::npos);
      }
      tried.set_value();
    }
    first.wait();
  });
}

TEST(Peer, WorkHandle) {
  std::promise<void> checked;  // rank 1 posts only after rank 0 has seen its work still pending
  std::shared_future<void> may_post = checked.get_future().share();
  run_cluster(2, base_config(), [&](Peer& peer) {
    std::vector<float> x(10, 1.0f);
    if (peer.rank() == 0) {
      Work w = peer.allreduce_async(std::span<float>(x), ReduceOp::sum, "w");
      EXPECT_FALSE(w.wait(std::chrono::milliseconds(50)));
      EXPECT_FALSE(w.done());
      std::promise<bool> called;
      w.on_complete([&](std::exception_ptr e) { called.set_value(e == nullptr); });
      checked.set_value();
      EXPECT_TRUE(w.wait(std::chrono::milliseconds(10'000)));
      EXPECT_TRUE(w.done());
      EXPECT_TRUE(called.get_future().get());
      EXPECT_EQ(x[0], 2.0f);
    } else {
      may_post.wait();
      peer.allreduce(std::span<float>(x), ReduceOp::sum, "w");
    }
  });
}

TEST(Peer, ModelStoreSaveAndRequest) {
  run_cluster(3, base_config(), [](Peer& peer) {
    const int n = peer.size();
    std::vector<double> model(1000, double(peer.rank()));
    peer.save("model", std::span<const double>(model));
    peer.barrier("saved");
    const int target = (peer.rank() + 1) % n;
    std::vector<double> got(1000, -1);
    peer.request(target, "model", std::span<double>(got));
    EXPECT_EQ(got[0], double(target));
    EXPECT_EQ(got[999], double(target));
    std::vector<double> own(1000);
    peer.request(peer.rank(), "model", std::span<double>(own));
    EXPECT_EQ(own[5], double(peer.rank()));
    std::vector<double> wrong(10);
    EXPECT_THROW(peer.request(target, "model", std::span<double>(wrong)), ConfigError);
    EXPECT_THROW(peer.request(target, "missing", std::span<double>(got)), ConfigError);
    peer.barrier("done");
  });
}

TEST(Peer, SetTopologySwitchesEverywhere) {
  run_cluster(4, base_config(), [](Peer& peer) {
    std::vector<float> x(1001, 1.0f);
    for (Topology t : {Topology::tree, Topology::star, Topology::hierarchical, Topology::ring}) {
      peer.set_topology(t);
      EXPECT_EQ(peer.topology(), t);
      std::fill(x.begin(), x.end(), 1.0f);
      peer.allreduce(std::span<float>(x), ReduceOp::sum, "x");
      ASSERT_EQ(x[1000], 4.0f);
    }
    EXPECT_THROW(peer.set_topology(peer.rank() == 0 ? Topology::tree : Topology::star), MismatchError);
  });
}

TEST(Peer, Transports) {
  for (TransportKind kind : {TransportKind::tcp, TransportKind::unix_socket, TransportKind::automatic}) {
    PeerConfig c = base_config();
    c.transport = kind;
    run_cluster(3, c, [](Peer& peer) {
      std::vector<std::int32_t> x(100000, peer.rank());
      peer.allreduce(std::span<std::int32_t>(x), ReduceOp::sum, "t");
      EXPECT_EQ(x[99999], 3);
    });
  }
}

// Data connections over TCP use the configured congestion control (reno: built into every kernel, and no
// system's default, so the test sees the setting rather than the default).
TEST(Peer, TcpCongestionControlIsSetOnDataConnections) {
  auto congestion_controls = [] {
    std::multiset<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
      const int fd = std::atoi(entry.path().filename().c_str());
      char name[32] = {};
      socklen_t len = sizeof name;
      if (::getsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, name, &len) == 0) names.insert(name);
    }
    return names;
  };
  PeerConfig c = base_config();
  c.transport = TransportKind::tcp;
  c.tcp_congestion = "reno";
  std::atomic<int> checked{0};
  run_cluster(3, c, [&](Peer& peer) {
    peer.barrier("cc");
    // Three ranks in this process: 3 connections, each seen from both ends.
    EXPECT_GE(congestion_controls().count("reno"), 6u);
    ++checked;
    peer.barrier("cc done");
  });
  EXPECT_EQ(checked.load(), 3);
}

TEST(Peer, RefusedTcpCongestionControlIsAConfigError) {
  PeerConfig c = base_config();
  c.transport = TransportKind::tcp;
  c.tcp_congestion = "no-such-algorithm";
  c.size = 2;
  c.store = make_memory_store();
  try {
    Peer peer = Peer::create(c);
    ADD_FAILURE() << "created a peer with an unknown congestion control";
  } catch (const ConfigError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("'no-such-algorithm' (AIKIDO_TCP_CONGESTION)"), std::string::npos) << what;
    EXPECT_NE(what.find("may choose"), std::string::npos) << what;
  }
}

TEST(Peer, WrongSecretIsRefused) {
  std::atomic<int> refused{0};
  auto store = make_memory_store();
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      PeerConfig c = short_timeout(std::chrono::milliseconds(1000));
      c.rank = r;
      c.size = 2;
      c.store = store;
      c.job_id = "wrong-secret";
      c.secret = r == 0 ? "right" : "wrong";
      try {
        Peer peer = Peer::create(c);
      } catch (const AuthError&) {
        ++refused;  // the connector learns it does not know the secret
      } catch (const TimeoutError&) {
        ++refused;  // the acceptor never gets an authenticated connection
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(refused.load(), 2);
}

TEST(Handshake, RefusesWrongSecretVersionAndChannel) {
  using namespace transport;
  auto listener = Listener::bind_tcp("127.0.0.1", 0);
  struct Case {
    std::string secret;
    std::uint64_t version;
    Channel channel;
  };
  for (const Case& c : {Case{"s", 0, Channel::data}, Case{"bad", 0, Channel::data}, Case{"s", 7, Channel::data},
                        Case{"s", 0, Channel::store}}) {
    auto accepted = std::async(std::launch::async, [&] {
      Socket s = listener.accept(Clock::now() + std::chrono::seconds(5));
      return handshake_accept(s, "s", Channel::data, 0, 0, std::chrono::milliseconds(2000));
    });
    Socket s = connect(listener.address(), Clock::now() + std::chrono::seconds(5));
    const bool good = c.secret == "s" && c.version == 0 && c.channel == Channel::data;
    if (good) {
      EXPECT_EQ(handshake_connect(s, c.secret, c.channel, c.version, 3, std::chrono::milliseconds(2000)).peer_rank, 0);
      EXPECT_EQ(accepted.get().peer_rank, 3);
    } else {
      EXPECT_THROW(handshake_connect(s, c.secret, c.channel, c.version, 3, std::chrono::milliseconds(2000)), Error);
      EXPECT_THROW(accepted.get(), Error);
    }
  }
}

TEST(Handshake, GarbageIsRefusedBeforeParsing) {
  using namespace transport;
  auto listener = Listener::bind_tcp("127.0.0.1", 0);
  auto accepted = std::async(std::launch::async, [&] {
    Socket s = listener.accept(Clock::now() + std::chrono::seconds(5));
    return handshake_accept(s, "s", Channel::data, 0, 0, std::chrono::milliseconds(2000));
  });
  Socket s = connect(listener.address(), Clock::now() + std::chrono::seconds(5));
  std::string junk(60, 'G');
  s.write_all(junk.data(), junk.size());
  EXPECT_THROW(accepted.get(), ProtocolError);
}

}  // namespace
}  // namespace aikido
