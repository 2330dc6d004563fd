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

class Faults : public ::testing::TestWithParam<Setup> {
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
  /// The collectives each survivor posts after (or while) a rank leaves.
  static std::vector<std::string> collective_names() {
    return {"allreduce/small", "allreduce/large",  "barrier",   "consensus",      "allgather",
            "reduce_scatter",  "broadcast/leaver", "broadcast", "gather/survivor"};
  }
};

// Posts collective `name` (one of collective_names()) for a cluster that rank `leaver` has left; `survivor` is a rank
// that has not. Returns the Work; `check` is set to verify the result should the collective complete.
struct Posted {
  Work work;
  std::function<void()> check;
  bool may_complete = false;  // its result on this rank does not depend on the leaver
};

struct Buffers {
  std::vector<float> small = std::vector<float>(1000, 1.0f);
  std::vector<float> large = std::vector<float>(300'000, 1.0f);
  std::vector<float> block = std::vector<float>(100, 1.0f);
  std::vector<float> gathered;
  std::vector<float> scattered = std::vector<float>(100);
  std::vector<std::int64_t> bcast = std::vector<std::int64_t>(5000);
  std::vector<std::int64_t> bcast_leaver = std::vector<std::int64_t>(5000);
  std::vector<double> part = std::vector<double>(700);
  std::vector<double> parts;
  bool agreed = false;
  std::string value = "same";
};

Posted post_one(Peer& peer, const std::string& name, int leaver, int survivor, Buffers& b, const std::string& prefix) {
  const int n = peer.size(), me = peer.rank();
  const std::string full = prefix + name;
  Posted p;
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
    p.work = peer.broadcast_async(std::span<std::int64_t>(b.bcast_leaver), leaver, full);
  } else if (name == "broadcast") {
    // From a survivor: ranks that receive it along a path without the leaver may complete it.
    for (std::size_t i = 0; i < b.bcast.size(); ++i) b.bcast[i] = me == survivor ? std::int64_t(i) * 3 : -1;
    p.work = peer.broadcast_async(std::span<std::int64_t>(b.bcast), survivor, full);
    p.may_complete = true;
    p.check = [&b] {
      for (std::size_t i = 0; i < b.bcast.size(); ++i) ASSERT_EQ(b.bcast[i], std::int64_t(i) * 3) << i;
    };
  } else if (name == "gather/survivor") {
    // To a survivor: the root needs every rank; a rank whose part reached the root without the leaver is done.
    for (std::size_t i = 0; i < b.part.size(); ++i) b.part[i] = me + double(i);
    b.parts.assign(me == survivor ? b.part.size() * std::size_t(n) : 0, -1.0);
    p.work = peer.gather_async(std::span<const double>(b.part), std::span<double>(b.parts), survivor, full);
    p.may_complete = me != survivor;
  } else {
    ADD_FAILURE() << "unknown collective " << name;
  }
  return p;
}

// The outcome of a collective that needed a rank which left: PeerLostError naming it, or (where this rank's part did
// not depend on it) the right result. Never a timeout.
void expect_lost(Peer& peer, Posted& p, const std::string& name, int leaver) {
  try {
    p.work.wait();
    if (!p.may_complete) {
      ADD_FAILURE() << name << " completed on rank " << peer.rank() << " without rank " << leaver;
    } else if (p.check) {
      p.check();
    }
  } catch (const PeerLostError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("rank " + std::to_string(leaver) + " closed its session"), std::string::npos)
        << name << " on rank " << peer.rank() << ": " << what;
  } catch (const std::exception& e) {
    ADD_FAILURE() << name << " on rank " << peer.rank() << ": " << typeid(e).name() << ": " << e.what();
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
            expect_lost(peer, p, name, leaver);
          }
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
            expect_lost(peer, pending[i], collective_names()[i], leaver);
          }
          survivors_done.arrive_and_wait();
        },
        hosts());
  }
}

INSTANTIATE_TEST_SUITE_P(Setups, Faults, ::testing::ValuesIn(every_setup({3, 4})),
                         [](const auto& info) { return setup_name(info.param); });

}  // namespace
}  // namespace aikido
