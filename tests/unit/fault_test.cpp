// Failures over every transport, cluster size and topology: a rank that leaves, a rank that does not post, ranks
// that post differently. On one host the default transport runs allreduce, barrier and consensus through shared
// memory; across hosts every collective takes the socket path, so each case runs over tcp and unix too, where a
// survivor that needs the missing rank only through other survivors must hear of the failure from them.
#include <gtest/gtest.h>

#include <atomic>
#include <functional>
#include <latch>
#include <regex>
#include <string>
#include <typeinfo>
#include <vector>

#include "cluster.hpp"

namespace aikido {
namespace {

using test::base_config;
using test::run_cluster;

struct Setup {
  TransportKind transport;
  int size;
  Topology topology;
};

std::string setup_name(const Setup& s) {
  return std::string(transport_name(s.transport)) + "_n" + std::to_string(s.size) + "_" + topology_name(s.topology);
}

std::vector<Setup> every_setup(std::initializer_list<int> sizes) {
  std::vector<Setup> all;
  for (TransportKind t : {TransportKind::automatic, TransportKind::tcp, TransportKind::unix_socket}) {
    for (int n : sizes) {
      for (Topology topology : {Topology::ring, Topology::tree, Topology::star, Topology::hierarchical}) {
        all.push_back({t, n, topology});
      }
    }
  }
  return all;
}

class SetupTest : public ::testing::TestWithParam<Setup> {
 protected:
  PeerConfig config(std::chrono::milliseconds timeout = std::chrono::milliseconds(20'000)) const {
    PeerConfig c = base_config();
    c.transport = GetParam().transport;
    c.topology = GetParam().topology;
    c.timeout = timeout;
    return c;
  }
  int size() const { return GetParam().size; }
  // Over TCP two ranks per host, so that the hierarchical topology spans hosts; Unix sockets and shared memory need
  // every rank on one host.
  std::function<void(int, PeerConfig&)> hosts() const {
    if (GetParam().transport != TransportKind::tcp) return {};
    return [](int rank, PeerConfig& c) { c.host = "host" + std::to_string(rank / 2); };
  }
  /// The path every collective took on this rank: shared memory under the default transport (every rank on one
  /// host); over TCP the connections, in phases by host on the hierarchical topology (two hosts), with the phases
  /// inside each host over the connections too.
  void expect_paths(const Peer& peer) const {
    const PathCounts paths = peer.path_counts();
    EXPECT_EQ(paths.shared_memory_table_full, 0u);
    if (GetParam().transport == TransportKind::automatic) {
      EXPECT_GT(paths.shared_memory, 0u) << "rank " << peer.rank();
    } else if (GetParam().transport == TransportKind::tcp && GetParam().topology == Topology::hierarchical &&
               peer.size() % 2 == 0) {
      EXPECT_EQ(paths.shared_memory, 0u) << "rank " << peer.rank();
      EXPECT_GT(paths.hierarchical, 0u) << "rank " << peer.rank();
      EXPECT_GT(paths.host_phases_sockets, 0u) << "rank " << peer.rank();
      EXPECT_EQ(paths.host_phases_shared_memory, 0u) << "rank " << peer.rank();
    } else {
      EXPECT_EQ(paths.shared_memory, 0u) << "rank " << peer.rank();
      EXPECT_EQ(paths.hierarchical, 0u) << "rank " << peer.rank();
      EXPECT_GT(paths.sockets, 0u) << "rank " << peer.rank();
    }
  }
};

class Faults : public SetupTest {
 protected:
  /// The collectives each survivor posts after (or while) a rank leaves.
  static std::vector<std::string> collective_names() {
    return {"allreduce/small", "allreduce/large",  "barrier",   "consensus", "allgather",
            "reduce_scatter",  "broadcast/leaver", "broadcast", "gather"};
  }
};
class Mismatches : public SetupTest {};
class Timeouts : public SetupTest {};

// A collective posted by a survivor.
struct Posted {
  std::string name;
  Work work;
};

struct Buffers {
  std::vector<float> small = std::vector<float>(1000, 1.0f);
  std::vector<float> large = std::vector<float>(300'000, 1.0f);
  std::vector<float> block = std::vector<float>(100, 1.0f);
  std::vector<float> gathered;
  std::vector<float> scattered = std::vector<float>(100);
  std::vector<std::int64_t> bcast = std::vector<std::int64_t>(5000);
  std::vector<double> part = std::vector<double>(700);
  std::vector<double> parts;
  bool agreed = false;
  std::string value = "same";
};

// Posts collective `name` (one of Faults::collective_names()) on a survivor of a cluster that rank `leaver` left:
// `survivor` is the root of the broadcast and the gather.
Posted post_one(Peer& peer, const std::string& name, int leaver, int survivor, Buffers& b, const std::string& prefix) {
  const int n = peer.size();
  const std::string full = prefix + name;
  Posted p{name, {}};
  if (name == "allreduce/small") {
    p.work = peer.allreduce_async(std::span<float>(b.small), ReduceOp::sum, full);
  } else if (name == "allreduce/large") {
    p.work = peer.allreduce_async(std::span<float>(b.large), ReduceOp::sum, full);
  } else if (name == "barrier") {
    p.work = peer.barrier_async(full);
  } else if (name == "consensus") {
    p.work = peer.consensus_async(std::as_bytes(std::span<const char>(b.value.data(), b.value.size())), b.agreed, full);
  } else if (name == "allgather") {
    b.gathered.assign(b.block.size() * std::size_t(n), 0.0f);
    p.work = peer.allgather_async(std::span<const float>(b.block), std::span<float>(b.gathered), full);
  } else if (name == "reduce_scatter") {
    b.gathered.assign(b.block.size() * std::size_t(n), 1.0f);
    p.work = peer.reduce_scatter_async(std::span<const float>(b.gathered), std::span<float>(b.scattered), ReduceOp::sum,
                                       full);
  } else if (name == "broadcast/leaver") {
    p.work = peer.broadcast_async(std::span<std::int64_t>(b.bcast), leaver, full);
  } else if (name == "broadcast") {
    // From a survivor: also ranks that receive it along a path without the leaver must fail (every rank checks
    // every other rank's `ready` in a broadcast).
    p.work = peer.broadcast_async(std::span<std::int64_t>(b.bcast), survivor, full);
  } else if (name == "gather") {
    b.parts.assign(peer.rank() == survivor ? b.part.size() * std::size_t(n) : 0, -1.0);
    p.work = peer.gather_async(std::span<const double>(b.part), std::span<double>(b.parts), survivor, full);
  } else {
    ADD_FAILURE() << "unknown collective " << name;
  }
  return p;
}

// A collective that needed a rank that left fails with PeerLostError naming it, at once: never a timeout, and
// never success (every rank's collective depends on every other rank having posted it).
void expect_lost(Peer& peer, Posted& p, int leaver) {
  try {
    p.work.wait();
    ADD_FAILURE() << p.name << " completed on rank " << peer.rank() << " without rank " << leaver;
  } catch (const PeerLostError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("rank " + std::to_string(leaver) + " closed its session"), std::string::npos)
        << p.name << " on rank " << peer.rank() << ": " << what;
  } catch (const std::exception& e) {
    ADD_FAILURE() << p.name << " on rank " << peer.rank() << ": " << typeid(e).name() << ": " << e.what();
  }
}

void warm_up(Peer& peer) {
  std::vector<float> x(1000, 1.0f);
  peer.allreduce(std::span<float>(x), ReduceOp::sum, "warmup");
  ASSERT_EQ(x[999], float(peer.size()));
  std::vector<std::int64_t> y(100, peer.rank());
  peer.broadcast(std::span<std::int64_t>(y), peer.size() - 1, "warmup/broadcast");
  peer.barrier("warmup/barrier");
}

// A rank leaves cleanly (its session ends) after a warm-up; each survivor then posts every kind of collective, one
// after the other. Each must fail at once with PeerLostError naming the leaver, also on survivors that need the
// leaver only through other survivors (they hear of it from those): none may wait for its timeout.
TEST_P(Faults, ALeaverFailsEveryLaterCollectiveOnEverySurvivor) {
  for (int leaver : {1, size() - 1}) {
    std::latch survivors_done(size() - 1);  // survivors keep their sessions until every one has seen every failure
    run_cluster(
        size(), config(),
        [&](Peer& peer) {
          warm_up(peer);
          if (peer.rank() == leaver) {
            Peer gone = std::move(peer);
            return;
          }
          const int survivor = leaver == 0 ? 1 : 0;
          Buffers b;
          for (const std::string& name : collective_names()) {
            Posted p = post_one(peer, name, leaver, survivor, b, "after/");
            expect_lost(peer, p, leaver);
          }
          expect_paths(peer);
          survivors_done.arrive_and_wait();
        },
        hosts());
  }
}

// Every kind of collective is in flight on the survivors when a rank leaves without having posted them.
TEST_P(Faults, ALeaverFailsThePendingCollectivesOfEverySurvivor) {
  for (int leaver : {1, size() - 1}) {
    std::latch posted(size() - 1);
    std::latch survivors_done(size() - 1);
    run_cluster(
        size(), config(),
        [&](Peer& peer) {
          warm_up(peer);
          if (peer.rank() == leaver) {
            posted.wait();
            Peer gone = std::move(peer);
            return;
          }
          const int survivor = leaver == 0 ? 1 : 0;
          std::vector<Buffers> buffers(collective_names().size());
          std::vector<Posted> pending;
          for (std::size_t i = 0; i < collective_names().size(); ++i) {
            pending.push_back(post_one(peer, collective_names()[i], leaver, survivor, buffers[i], "pending/"));
          }
          posted.count_down();
          for (std::size_t i = 0; i < pending.size(); ++i) {
            expect_lost(peer, pending[i], leaver);
          }
          survivors_done.arrive_and_wait();
        },
        hosts());
  }
}

// Ranks that post one name with different sizes, types, operations, roots or kinds: MismatchError on every rank,
// for small collectives (every segment sent at once: the data frames carry the signature) and large ones (a `ready`
// first); the next occurrence of a name lines up again.
TEST_P(Mismatches, RaiseOnEveryRank) {
  std::atomic<int> caught{0};
  constexpr int kCases = 8;
  run_cluster(
      size(), config(),
      [&](Peer& peer) {
        const bool odd = peer.rank() == peer.size() - 1;  // the rank that posts differently
        auto expect_mismatch = [&](const std::string& name, const std::function<void()>& post) {
          try {
            post();
            ADD_FAILURE() << name << ": rank " << peer.rank() << " completed a mismatched collective";
          } catch (const MismatchError& e) {
            const std::string what = e.what();
            EXPECT_NE(what.find("'" + name + "'"), std::string::npos) << what;
            EXPECT_NE(what.find("differently"), std::string::npos) << what;
            // Whoever found it compared its signature with another rank's: one of the two is the odd rank.
            EXPECT_NE(what.find("rank " + std::to_string(peer.size() - 1) + " posted"), std::string::npos) << what;
            ++caught;
          } catch (const std::exception& e) {
            ADD_FAILURE() << name << " on rank " << peer.rank() << ": " << typeid(e).name() << ": " << e.what();
          }
        };
        std::vector<float> f(odd ? 20 : 10, 1.0f), big(odd ? 200'000 : 100'000, 1.0f), large(100'000, 1.0f);
        std::vector<float> g(8, 1.0f), gathered(8 * std::size_t(peer.size()));
        std::vector<std::int32_t> i(8, 1);
        expect_mismatch("size", [&] { peer.allreduce(std::span<float>(f), ReduceOp::sum, "size"); });
        expect_mismatch("large size", [&] { peer.allreduce(std::span<float>(big), ReduceOp::sum, "large size"); });
        // Equal byte sizes: only the element type tells them apart.
        expect_mismatch("type", [&] {
          odd ? peer.allreduce(std::span<std::int32_t>(i), ReduceOp::sum, "type")
              : peer.allreduce(std::span<float>(g), ReduceOp::sum, "type");
        });
        expect_mismatch("op", [&] { peer.allreduce(std::span<float>(g), odd ? ReduceOp::max : ReduceOp::sum, "op"); });
        expect_mismatch("large op", [&] {
          peer.allreduce(std::span<float>(large), odd ? ReduceOp::min : ReduceOp::sum, "large op");
        });
        expect_mismatch("root", [&] { peer.broadcast(std::span<float>(g), odd ? 1 : 0, "root"); });
        expect_mismatch(
            "kind", [&] { odd ? peer.barrier("kind") : peer.allreduce(std::span<float>(g), ReduceOp::sum, "kind"); });
        expect_mismatch("allgather", [&] {
          const std::size_t k = odd ? 4 : 8;
          peer.allgather(std::span<const float>(g).first(k), std::span<float>(gathered).first(k * peer.size()),
                         "allgather");
        });
        std::vector<float> ok(5, 1.0f);
        peer.allreduce(std::span<float>(ok), ReduceOp::sum, "size");
        EXPECT_EQ(ok[4], float(peer.size()));
        expect_paths(peer);
        peer.barrier("end");  // a rank that found a mismatch early must not leave before the others heard of it
      },
      hosts());
  EXPECT_EQ(caught.load(), kCases * size());
}

// Rank 1 never posts 'late/*' and waits in a barrier of its own instead. Half the timeout in, every waiting rank
// prints a stall report; at the timeout each fails with TimeoutError. Both name rank 1 and what it is waiting in, on
// every transport, for a small and a large collective.
//
// When rank 1 posts them at last, after the others gave up, they fail at once: the others told it, so it does not
// wait out a timeout of its own (whose message would be about rank 1 itself).
TEST_P(Timeouts, NameTheRankThatDidNotPostAndWhatItWaitsIn) {
  constexpr int kLate = 1;
  std::latch elsewhere_posted(1);
  std::latch others_failed(size() - 1);
  std::latch all_done(size());  // keeps every session open until all ranks have seen the outcome
  ::testing::internal::CaptureStderr();
  run_cluster(
      size(), config(std::chrono::milliseconds(3000)),
      [&](Peer& peer) {
        if (peer.rank() == kLate) {
          Work elsewhere = peer.barrier_async("elsewhere");
          elsewhere_posted.count_down();
          EXPECT_THROW(elsewhere.wait(), TimeoutError);
          others_failed.wait();
          std::vector<float> small(10, 1.0f), large(300'000, 1.0f);
          for (auto* x : {&small, &large}) {
            const char* name = x == &small ? "late/small" : "late/large";
            try {
              peer.allreduce(std::span<float>(*x), ReduceOp::sum, name);
              ADD_FAILURE() << name << " completed on rank 1 alone";
            } catch (const TimeoutError& e) {  // the socket path passes on the first rank's description
              const std::string what = e.what();
              EXPECT_NE(what.find("rank 1 has not posted it"), std::string::npos) << what;
            } catch (const PeerLostError&) {
              // Shared memory: the others' arrivals are marked abandoned. Sockets: a rank that timed out in the middle
              // of a transfer closed that connection.
            }
          }
          all_done.arrive_and_wait();
          return;
        }
        elsewhere_posted.wait();  // so that rank 1 waits in it when asked
        std::vector<float> small(10, 1.0f), large(300'000, 1.0f);
        Work a = peer.allreduce_async(std::span<float>(small), ReduceOp::sum, "late/small");
        Work b = peer.allreduce_async(std::span<float>(large), ReduceOp::sum, "late/large");
        for (auto [work, name] : {std::pair{&a, "'late/small'"}, std::pair{&b, "'late/large'"}}) {
          try {
            work->wait();
            ADD_FAILURE() << name << " completed without rank 1";
          } catch (const TimeoutError& e) {
            const std::string what = e.what();
            EXPECT_NE(what.find(name), std::string::npos) << what;
            EXPECT_NE(what.find("rank 1 has not posted it"), std::string::npos) << what;
            EXPECT_NE(what.find("rank 1 is waiting in barrier 'elsewhere' (seq 0)"), std::string::npos) << what;
          } catch (const std::exception& e) {
            ADD_FAILURE() << name << " on rank " << peer.rank() << ": " << typeid(e).name() << ": " << e.what();
          }
        }
        expect_paths(peer);
        others_failed.count_down();
        all_done.arrive_and_wait();
      },
      hosts());
  const std::string err = ::testing::internal::GetCapturedStderr();
  for (int rank = 0; rank < size(); ++rank) {
    if (rank == kLate) continue;
    for (const std::string name : {"late/small", "late/large"}) {
      const std::regex report("stall report: allreduce '" + name + "' \\(seq 0\\) on rank " + std::to_string(rank) +
                              " [^\n]*rank 1 has not posted it; rank 1 is waiting in barrier 'elsewhere' \\(seq 0\\)");
      EXPECT_TRUE(std::regex_search(err, report)) << "no stall report of " << name << " on rank " << rank << ":\n"
                                                  << err;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Setups, Faults, ::testing::ValuesIn(every_setup({3, 4})),
                         [](const auto& info) { return setup_name(info.param); });
INSTANTIATE_TEST_SUITE_P(Setups, Mismatches, ::testing::ValuesIn(every_setup({3, 4})),
                         [](const auto& info) { return setup_name(info.param); });
INSTANTIATE_TEST_SUITE_P(Setups, Timeouts, ::testing::ValuesIn(every_setup({3})),
                         [](const auto& info) { return setup_name(info.param); });

}  // namespace
}  // namespace aikido
