// Elastic membership and the resize/recovery protocol, with workers as threads of this process: ClusterSpec
// values, the versioned membership store, resizes with state transfer, recovery with rollback, and refusal of
// connections from another cluster version.
#include <gtest/gtest.h>

#include <aikido/aikido.hpp>
#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <numeric>
#include <set>
#include <thread>

#include "cluster.hpp"
#include "thread_job.hpp"
#include "transport/handshake.hpp"
#include "transport/socket.hpp"

namespace aikido {
namespace {

using test::spec_of;
using test::ThreadJob;

using namespace std::chrono_literals;

TEST(ClusterSpec, EncodeDecodeRoundTrip) {
  ClusterSpec s = spec_of(3, 2, 5);
  s.version = 7;
  s.reason = "resize";
  s.proposed_unix_ms = 1234;
  EXPECT_EQ(ClusterSpec::decode(s.encode()), s);
  EXPECT_NE(s.describe().find("version 7"), std::string::npos);
}

TEST(ClusterSpec, ValidationNamesTheProblem) {
  ClusterSpec s = spec_of(2);
  s.workers.push_back({0, "h"});
  s.next_id = 5;
  try {
    s.validate();
    FAIL() << "duplicate id accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("worker id 0 appears twice"), std::string::npos) << e.what();
  }
  EXPECT_THROW(spec_of(0).validate(), ConfigError);
  EXPECT_THROW(spec_of(3, 4, 2).validate(), ConfigError);
  EXPECT_THROW(spec_of(9, 1, 8).validate(), ConfigError);
  EXPECT_THROW(ClusterSpec::decode("version=1\nworker=x h\n"), ProtocolError);
  EXPECT_THROW(ClusterSpec::decode("min=1\n"), ProtocolError);
  EXPECT_THROW(ClusterSpec::decode("version=1\nbogus=2\n"), ProtocolError);
  EXPECT_THROW(ClusterSpec::decode("version=1\nnext_id=1\nworker=3 h\n"), ConfigError);  // id >= next_id
}

TEST(ClusterSpec, ResizeAndRemoveKeepRanksDense) {
  const ClusterSpec s = spec_of(3, 1, 4);
  const ClusterSpec up = s.resized(4, "h");
  EXPECT_EQ(up.version, 1u);
  ASSERT_EQ(up.size(), 4);
  EXPECT_EQ(up.workers[3].id, 3u);
  EXPECT_EQ(up.next_id, 4u);
  const ClusterSpec down = up.resized(2, "h");
  EXPECT_EQ(down.size(), 2);
  EXPECT_EQ(down.rank_of(1), 1);
  EXPECT_EQ(down.rank_of(2), -1);
  const auto d = up.diff(down);
  EXPECT_EQ(d.removed, (std::vector<std::uint64_t>{2, 3}));
  EXPECT_TRUE(d.added.empty());
  const ClusterSpec lost = up.without({0});
  EXPECT_EQ(lost.rank_of(1), 0);  // ranks move down, rank 0 is replaceable
  EXPECT_THROW(s.resized(5, "h"), ConfigError);
  EXPECT_THROW(s.resized(0, "h"), ConfigError);
}

TEST(Membership, ProposeIsCompareAndSetOnTheNextVersion) {
  auto m = make_membership_store(make_memory_store(), "job");
  EXPECT_FALSE(m->latest().has_value());
  ClusterSpec v0 = spec_of(2);
  EXPECT_FALSE(m->propose(v0.resized(3, "h")));  // version 1 without a version 0
  ASSERT_TRUE(m->propose(v0));
  EXPECT_FALSE(m->propose(v0));  // version 0 exists
  const ClusterSpec a = v0.resized(3, "h"), b = v0.resized(1, "h");
  EXPECT_TRUE(m->propose(a));
  EXPECT_FALSE(m->propose(b));  // lost the race for version 1
  EXPECT_EQ(*m->latest(), a);
  EXPECT_EQ(*m->get(0), v0);
  EXPECT_FALSE(m->get(2).has_value());
}

TEST(Membership, WatchWakesOnTheNextVersion) {
  auto m = make_membership_store(make_memory_store(), "job");
  ASSERT_TRUE(m->propose(spec_of(2)));
  EXPECT_FALSE(m->watch(0, 20ms).has_value());
  std::thread t([&] { EXPECT_TRUE(m->propose(spec_of(2).resized(4, "h"))); });
  auto seen = m->watch(0, 10s);
  t.join();
  ASSERT_TRUE(seen.has_value());
  EXPECT_EQ(seen->version, 1u);
  EXPECT_EQ(seen->size(), 4);
}

constexpr std::int64_t kSteps = 24;
constexpr std::size_t kDim = 1000;

// Every rank's gradient at step s is (s + 1) * (i % 3 + 1), averaged over the current size: after kSteps steps
// w[i] = (i % 3 + 1) * kSteps * (kSteps + 1) / 2 whatever the resizes and rollbacks, if state moved correctly.
float expected_weight(std::size_t i) { return float((i % 3 + 1) * kSteps * (kSteps + 1) / 2); }

struct Trainer {
  std::vector<float> w = std::vector<float>(kDim, 0.0f);
  std::int64_t step = 0;
  // State whose size changes (like optimizer state created lazily): the steps this model has seen, in order.
  std::vector<std::int64_t> history;
  void attach(ElasticSession& s) {
    s.register_span("w", std::span<float>(w));
    s.register_value("step", step);
    s.register_state(
        "history",
        [this] {
          const auto bytes = std::as_bytes(std::span<const std::int64_t>(history));
          return std::vector<std::byte>(bytes.begin(), bytes.end());
        },
        [this](std::span<const std::byte> bytes) {
          history.resize(bytes.size() / sizeof(std::int64_t));
          if (!bytes.empty()) std::memcpy(history.data(), bytes.data(), bytes.size());
        });
  }
  // Every step exactly once, in order, whatever resizes and rollbacks happened.
  void check_history() const {
    ASSERT_EQ(history.size(), std::size_t(kSteps));
    for (std::int64_t i = 0; i < kSteps; ++i) ASSERT_EQ(history[std::size_t(i)], i);
  }
  void train_step(ElasticSession& s) {
    std::vector<float> g(kDim);
    for (std::size_t i = 0; i < kDim; ++i) g[i] = float((step + 1) * std::int64_t(i % 3 + 1));
    s.peer().allreduce(std::span<float>(g), ReduceOp::sum, "grad");
    for (std::size_t i = 0; i < kDim; ++i) w[i] += g[i] / float(s.size());
    history.push_back(step);
    ++step;
  }
  void check_equal_everywhere(ElasticSession& s) {
    EXPECT_TRUE(s.peer().consensus(std::as_bytes(std::span<const float>(w)), "check/w"))
        << "parameters differ at version " << s.cluster_version();
  }
};

TEST(ElasticSession, ResizesInARowMoveStateToNewWorkers) {
  // size after step s (all ranks call resize at the same step)
  const std::map<std::int64_t, int> schedule = {{3, 4}, {6, 1}, {9, 3}, {12, 2}, {15, 4}, {18, 2}};
  std::atomic<int> changes{0};
  ThreadJob job(2, 4, [&](ElasticSession& s) {
    Trainer t;
    t.attach(s);
    while (t.step < kSteps) {
      const SyncResult r = s.sync(t.step);
      if (r == SyncResult::removed) return;
      if (r == SyncResult::changed) t.check_equal_everywhere(s);
      auto it = schedule.find(t.step);
      if (it != schedule.end() && s.size() != it->second) {
        if (s.resize(it->second) == SyncResult::removed) return;
        EXPECT_EQ(s.size(), it->second) << "step " << t.step << " worker " << s.worker_id() << " version "
                                        << s.cluster_version();
        if (s.rank() == 0) ++changes;
        t.check_equal_everywhere(s);
      }
      t.train_step(s);
      if (t.step % 2 == 0) s.commit();
    }
    for (std::size_t i = 0; i < kDim; ++i) ASSERT_EQ(t.w[i], expected_weight(i)) << "element " << i;
    t.check_history();
    EXPECT_EQ(s.size(), 2);
  });
  job.run();
  EXPECT_EQ(changes.load(), 6);
  EXPECT_EQ(job.membership()->latest()->version, 6u);
}

// Over every transport (on one host the default runs allreduce through shared memory; across hosts every collective
// takes the sockets), with 3 and 4 workers.
class ElasticFaults : public ::testing::TestWithParam<std::tuple<TransportKind, int>> {};

TEST_P(ElasticFaults, SurvivorsRollBackAfterALostWorker) {
  const auto [transport, workers] = GetParam();
  std::atomic<int> recoveries{0};
  ThreadJob job(
      workers, 4,
      [&](ElasticSession& s) {
        Trainer t;
        t.attach(s);
        const std::uint64_t id = s.worker_id();
        while (t.step < kSteps) {
          if (s.sync(t.step) == SyncResult::removed) return;
          // Worker 1 leaves abruptly in the middle of step 10 (after the commit of step 9 elsewhere).
          if (id == 1 && t.step == 10) return;
          try {
            t.train_step(s);
            if (t.step % 3 == 0) s.commit();
          } catch (const PeerLostError&) {
            const std::int64_t failed_at = t.step;
            ASSERT_EQ(s.recover(), SyncResult::changed);
            EXPECT_EQ(s.size(), workers - 1);
            EXPECT_LE(t.step, failed_at);  // rolled back to the commit
            EXPECT_EQ(t.step % 3, 0);
            if (s.rank() == 0) ++recoveries;
            t.check_equal_everywhere(s);
          }
        }
        for (std::size_t i = 0; i < kDim; ++i) ASSERT_EQ(t.w[i], expected_weight(i)) << "element " << i;
        t.check_history();
      },
      [transport = transport](ElasticConfig& c) { c.peer.transport = transport; });
  job.run();
  EXPECT_EQ(recoveries.load(), 1);
}

INSTANTIATE_TEST_SUITE_P(Transports, ElasticFaults,
                         ::testing::Combine(::testing::Values(TransportKind::automatic, TransportKind::tcp,
                                                              TransportKind::unix_socket),
                                            ::testing::Values(3, 4)),
                         [](const auto& info) {
                           return std::string(transport_name(std::get<0>(info.param))) + "_n" +
                                  std::to_string(std::get<1>(info.param));
                         });

// A topology switched during training belongs to the cluster: a worker that joins adopts it, and a recovery keeps
// it. Over TCP, where every frame carries its topology, a worker on another topology fails the collectives.
TEST(ElasticSession, TheTopologyChosenDuringTrainingSurvivesChangesAndReachesNewWorkers) {
  std::atomic<int> checked_changes{0};
  ThreadJob job(
      2, 4,
      [&](ElasticSession& s) {
        Trainer t;
        t.attach(s);
        const std::uint64_t id = s.worker_id();
        auto expect_tree = [&](const char* when) {
          EXPECT_STREQ(topology_name(s.peer().topology()), "tree")
              << when << ": worker " << id << " at version " << s.cluster_version() << ", step " << t.step;
          ++checked_changes;
        };
        while (t.step < kSteps) {
          const SyncResult r = s.sync(t.step);
          if (r == SyncResult::removed) return;
          if (r == SyncResult::changed) {
            expect_tree("after a change");
            t.check_equal_everywhere(s);
          }
          if (t.step == 3) s.peer().set_topology(Topology::tree);  // workers 0 and 1, at version 0
          if (t.step == 6 && s.size() == 2) {
            ASSERT_EQ(s.resize(3), SyncResult::changed);
            expect_tree("after the resize");
            t.check_equal_everywhere(s);
          }
          if (id == 1 && t.step == 10) return;  // leaves abruptly after the commit of step 9
          try {
            t.train_step(s);
            if (t.step % 3 == 0) s.commit();
          } catch (const PeerLostError&) {
            ASSERT_EQ(s.recover(), SyncResult::changed);
            EXPECT_EQ(s.size(), 2);
            expect_tree("after the recovery");
            t.check_equal_everywhere(s);
          }
        }
        for (std::size_t i = 0; i < kDim; ++i) ASSERT_EQ(t.w[i], expected_weight(i)) << "element " << i;
        t.check_history();
        EXPECT_STREQ(topology_name(s.peer().topology()), "tree");
      },
      [](ElasticConfig& c) { c.peer.transport = TransportKind::tcp; });
  job.run();
  // Version 1: workers 0 and 1 after resize(), worker 2 after its first sync(); version 2: workers 0 and 2 after
  // recover().
  EXPECT_EQ(checked_changes.load(), 5);
  EXPECT_EQ(job.membership()->latest()->version, 2u);
}

// A version whose new worker never comes up is superseded while the others wait for it: they abandon its
// rendezvous, move on to the newer version and roll back to their last commit.
TEST(ElasticSession, SupersededVersionIsAbandonedWhileConnecting) {
  std::atomic<int> stuck_at_version_1{0};
  ThreadJob* self = nullptr;
  ThreadJob job(2, 4, [&](ElasticSession& s) {
    Trainer t;
    t.attach(s);
    while (t.step < kSteps) {
      const SyncResult r = s.sync(t.step);
      ASSERT_NE(r, SyncResult::removed);
      if (r == SyncResult::changed) {
        EXPECT_EQ(s.cluster_version(), 2u);
        EXPECT_EQ(s.size(), 2);
        EXPECT_TRUE(s.last_change().failure) << "an abandoned change rolls back";
        t.check_equal_everywhere(s);
      }
      if (t.step == 5 && s.rank() == 0 && s.cluster_version() == 0) s.request_resize(3);
      t.train_step(s);
      if (t.step % 2 == 0) s.commit();
    }
    for (std::size_t i = 0; i < kDim; ++i) ASSERT_EQ(t.w[i], expected_weight(i)) << "element " << i;
    t.check_history();
  });
  self = &job;
  job.never_start(2);
  std::thread supersede([&] {
    // Once a worker waits in the rendezvous of version 1 (which waits for worker 2 forever), drop worker 2.
    self->store()->wait(self->job_id() + "/v1/endpoint/0", 20s);
    ++stuck_at_version_1;
    ClusterSpec v1 = *self->membership()->get(1);
    ClusterSpec v2 = v1.without({2}, "resize");
    EXPECT_TRUE(self->membership()->propose(v2));
  });
  job.run();
  supersede.join();
  EXPECT_EQ(stuck_at_version_1.load(), 1);
  EXPECT_EQ(job.membership()->latest()->version, 2u);
}

TEST(ElasticSession, ResizeOutsideTheLimitsIsAConfigError) {
  ThreadJob job(2, 3, [&](ElasticSession& s) {
    s.sync();
    EXPECT_THROW(s.resize(4), ConfigError);
    EXPECT_THROW(s.peer().resize(0), ConfigError);
    s.peer().barrier("end");
  });
  job.run();
}

// A static session (no membership store) commits and, on recover() after a failure, rolls back to the newest
// commit and rethrows the failure: the cluster cannot change.
TEST(ElasticSession, StaticSessionCommitsAndRollsBackLocally) {
  PeerConfig c;
  ElasticConfig ec;
  ec.peer = c;
  ElasticSession s(ec);
  std::int64_t step = 0;
  std::vector<float> weights(3, 0.0f);
  s.register_value("step", step);
  s.register_span("weights", std::span<float>(weights));
  EXPECT_EQ(s.sync(), SyncResult::unchanged);
  EXPECT_FALSE(s.elastic());
  step = 4;
  s.commit();
  step = 5;
  weights = {1, 2, 3};
  s.commit();
  step = 9;
  weights = {7, 7, 7};
  EXPECT_THROW(s.recover(), ConfigError);  // no failure to rethrow: nothing changes
  EXPECT_EQ(step, 9);
  try {
    throw PeerLostError("rank 1 is lost");
  } catch (const PeerLostError&) {
    try {
      s.recover();
      ADD_FAILURE() << "a static session recovered";
    } catch (const PeerLostError& e) {
      EXPECT_EQ(std::string(e.what()), "rank 1 is lost");
    }
  }
  EXPECT_EQ(step, 5);
  EXPECT_EQ(weights, (std::vector<float>{1, 2, 3}));
  EXPECT_THROW(s.resize(2), ConfigError);
  EXPECT_THROW(s.peer().resize(2), ConfigError);
}

// A connection that claims an older cluster version is refused; the rendezvous of the current version goes on.
TEST(ElasticSession, ConnectionOfAnOldVersionIsRefused) {
  auto store = make_memory_store();
  PeerConfig base = test::base_config();
  base.store = store;
  base.job_id = "versions";
  base.transport = TransportKind::tcp;
  base.size = 2;
  base.cluster_version = 5;
  std::thread first([&] {
    PeerConfig c = base;
    c.rank = 0;
    Peer peer = Peer::create(c);
    std::vector<float> x(4, 1.0f);
    peer.allreduce(std::span<float>(x), ReduceOp::sum, "x");
    EXPECT_EQ(x[0], 2.0f);
  });
  const std::string record = store->wait("versions/v5/endpoint/0", 10s);
  const auto at = record.find("tcp=") + 4;
  const std::string address = record.substr(at, record.find('\n', at) - at);
  // Rank 0 accepts once every rank has published its address, so the stale rank knocks (first in the listen
  // queue) while rank 1 joins.
  transport::Socket stale = transport::connect(transport::Address::parse(address), transport::Clock::now() + 5s);
  std::thread stale_rank([&] {
    try {
      transport::handshake_connect(stale, base.secret, transport::Channel::data, 4, 1, 10s);
      ADD_FAILURE() << "a rank of cluster version 4 was accepted at version 5";
    } catch (const ProtocolError& e) {
      EXPECT_NE(std::string(e.what()).find("cluster version 4, the other side at 5"), std::string::npos) << e.what();
    }
  });
  PeerConfig c = base;
  c.rank = 1;
  Peer peer = Peer::create(c);
  std::vector<float> x(4, 1.0f);
  peer.allreduce(std::span<float>(x), ReduceOp::sum, "x");
  EXPECT_EQ(x[0], 2.0f);
  stale_rank.join();
  first.join();
}

// Each epoch has its own order, the same on every worker (a function of the seed and the epoch only), and a rollback
// of the state to an earlier epoch gives that epoch's order again.
TEST(ElasticSampler, ReshufflesByEpochTheSameOnEveryWorker) {
  auto order = [](ElasticSampler& s) {
    std::vector<std::uint64_t> o;
    for (std::uint64_t p = 0; p < s.dataset_size(); ++p) o.push_back(s.index(p));
    return o;
  };
  ElasticSampler a(500, 3), b(500, 3), other_seed(500, 4), plain(500, 3, false);
  const auto epoch0 = order(a);
  std::vector<std::uint64_t> identity(500);
  std::iota(identity.begin(), identity.end(), 0u);
  EXPECT_NE(epoch0, identity);
  EXPECT_EQ(order(b), epoch0);
  EXPECT_NE(order(other_seed), epoch0);
  EXPECT_EQ(order(plain), identity);
  while (!a.advance(2, 50)) {
  }
  ASSERT_EQ(a.epoch(), 1u);
  const auto epoch1 = order(a);
  EXPECT_NE(epoch1, epoch0);
  EXPECT_TRUE(std::is_permutation(epoch1.begin(), epoch1.end(), identity.begin()));
  b.state() = a.state();  // what a new worker receives
  EXPECT_EQ(order(b), epoch1);
  a.state() = ElasticSampler::State{0, 100};  // a rollback into epoch 0
  EXPECT_EQ(order(a), epoch0);
}

TEST(ElasticSampler, GlobalPositionCoversTheEpochOnceAcrossResizes) {
  ElasticSampler sampler(1000, 7);
  std::vector<int> seen(1000, 0);
  const int sizes[] = {1, 3, 4, 2, 4, 1};
  int change = 0;
  std::uint64_t steps = 0;
  while (sampler.epoch() == 0) {
    const int size = sizes[change++ % 6];  // a different size every step
    for (int r = 0; r < size; ++r) {
      const auto range = sampler.shard(r, size, 37);
      for (auto p = range.begin; p < range.end; ++p) ++seen[sampler.index(p)];
    }
    sampler.advance(size, 37);
    ++steps;
  }
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(seen[std::size_t(i)], 1) << "sample " << i;
  EXPECT_EQ(sampler.position(), 0u);
  EXPECT_GT(steps, 5u);
}

}  // namespace
}  // namespace aikido
