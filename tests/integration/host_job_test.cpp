// Launchers of a job across hosts agreeing on the cluster through etcd (src/launch/host_job.hpp), as threads of
// this process against a real etcd server.
#include "launch/host_job.hpp"

#include <gtest/gtest.h>

#include <aikido/errors.hpp>
#include <aikido/etcd.hpp>
#include <chrono>
#include <future>
#include <memory>
#include <thread>
#include <utility>

#include "etcd_server.hpp"

namespace aikido::launch {
namespace {

using namespace std::chrono_literals;
using elastic::EtcdClock;
using testing::EtcdServer;

std::string layout(const ClusterSpec& s) {
  std::string out;
  for (const auto& w : s.workers) out += (out.empty() ? "" : " ") + w.host + ":" + std::to_string(w.id);
  return out;
}

class HostJobTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!EtcdServer::available()) GTEST_SKIP() << "etcd is not installed (apt-get install etcd-server etcd-client)";
    server_ = std::make_unique<EtcdServer>();
  }

  EtcdOptions etcd() const {
    EtcdOptions o = parse_etcd_url(server_->url());
    o.unavailable_timeout = 10s;
    return o;
  }

  std::unique_ptr<HostJob> host(const std::string& id, int min_hosts, int max_hosts,
                                std::chrono::milliseconds join_timeout = 20s) {
    HostJobOptions o;
    o.job_id = "job";
    o.min_hosts = min_hosts;
    o.max_hosts = max_hosts;
    o.slots = 2;
    o.join_timeout = join_timeout;
    o.host_timeout = 1s;
    HostRecord r;
    r.id = id;
    r.address = "198.18.0.1";
    return std::make_unique<HostJob>(o, std::make_shared<elastic::EtcdClient>(etcd()),
                                     make_etcd_membership(etcd(), "job"), r);
  }

  // Hosts a and b of a job that needs both (min 2), joined.
  std::pair<std::unique_ptr<HostJob>, std::unique_ptr<HostJob>> two_joined_hosts() {
    auto a = host("a", 2, 2);
    auto b = host("b", 2, 2);
    auto first = std::async(std::launch::async, [&] { return a->join(); });
    b->join();
    first.get();
    return {std::move(a), std::move(b)};
  }

  std::unique_ptr<EtcdServer> server_;
};

TEST_F(HostJobTest, TheFirstVersionWaitsForTheMinimumAndListsHostsInJoinOrder) {
  auto a = host("a", 2, 2);
  auto b = host("b", 2, 2);
  auto first = std::async(std::launch::async, [&] { return a->join(); });
  EXPECT_EQ(first.wait_for(300ms), std::future_status::timeout);  // one host of two: it waits
  const ClusterSpec seen_by_b = b->join();
  const ClusterSpec seen_by_a = first.get();
  EXPECT_EQ(seen_by_a, seen_by_b);
  EXPECT_EQ(seen_by_a.version, 0u);
  EXPECT_EQ(layout(seen_by_a), "a:0 a:1 b:2 b:3");
  EXPECT_EQ(seen_by_a.min_size, 4);
  EXPECT_EQ(seen_by_a.max_size, 4);
}

TEST_F(HostJobTest, AHostJoinsARunningJobAndALostHostIsRemoved) {
  auto a = host("a", 1, 3);
  EXPECT_EQ(layout(a->join()), "a:0 a:1");
  auto b = host("b", 1, 3);
  const ClusterSpec grown = b->join();
  EXPECT_EQ(grown.version, 1u);
  EXPECT_EQ(grown.reason, "host b joined");
  EXPECT_EQ(layout(grown), "a:0 a:1 b:2 b:3");
  EXPECT_FALSE(a->remove_lost_hosts());  // nothing lost

  b->hosts().abandon();  // b's launcher is killed: its lease expires
  std::optional<ClusterSpec> shrunk;
  const auto deadline = EtcdClock::now() + 10s;
  while (!shrunk && EtcdClock::now() < deadline) {
    a->hosts().wait_for_change(deadline);
    shrunk = a->remove_lost_hosts();
  }
  ASSERT_TRUE(shrunk);
  EXPECT_EQ(shrunk->reason, "host b lost");
  EXPECT_EQ(layout(*shrunk), "a:0 a:1");
  EXPECT_EQ(shrunk->version, 2u);
}

TEST_F(HostJobTest, AHostBeyondTheMaximumWaitsForAPlace) {
  auto a = host("a", 1, 2);
  auto b = host("b", 1, 2);
  a->join();
  b->join();
  auto c = host("c", 1, 2);
  auto joined = std::async(std::launch::async, [&] { return c->join(); });
  EXPECT_EQ(joined.wait_for(500ms), std::future_status::timeout);
  b.reset();  // b leaves (lease revoked); a removes it; c takes its place
  const auto deadline = EtcdClock::now() + 10s;
  while (!a->remove_lost_hosts() && EtcdClock::now() < deadline) a->hosts().wait_for_change(deadline);
  const ClusterSpec spec = joined.get();
  EXPECT_EQ(layout(spec), "a:0 a:1 c:4 c:5");
  EXPECT_EQ(spec.reason, "host c joined");
}

// Host b was lost and the job was resized back to its maximum on host a: b's next launcher joins with the workers
// that fit (none: it waits for a place), never with a cluster beyond the maximum.
TEST_F(HostJobTest, AHostJoiningAJobResizedToItsMaximumTakesTheWorkersThatFit) {
  auto a = host("a", 1, 2);
  auto b = host("b", 1, 2);
  a->join();
  const ClusterSpec both = b->join();
  EXPECT_EQ(both.max_size, 4);
  b->hosts().abandon();
  b.reset();
  const auto deadline = EtcdClock::now() + 10s;
  std::optional<ClusterSpec> alone;
  while (!alone && EtcdClock::now() < deadline) {
    a->hosts().wait_for_change(deadline);
    alone = a->remove_lost_hosts();
  }
  ASSERT_TRUE(alone);
  auto membership = make_etcd_membership(etcd(), "job");
  ClusterSpec three = alone->with_workers_on("a", 1, "resize");  // aikido-ctl resize 3: a third worker on a
  three.version = alone->version + 1;
  ASSERT_TRUE(membership->propose(three));
  auto b2 = host("b", 1, 2);
  const ClusterSpec joined = b2->join();
  EXPECT_EQ(layout(joined), "a:0 a:1 a:4 b:5");
  EXPECT_EQ(joined.reason, "host b joined");

  ClusterSpec four = joined.without({5}, "resize").with_workers_on("a", 1, "resize");  // 4 workers on a: full
  four.version = joined.version + 1;
  ASSERT_TRUE(membership->propose(four));
  b2->hosts().abandon();
  b2.reset();
  auto b3 = host("b", 1, 2);
  auto waiting = std::async(std::launch::async, [&] { return b3->join(); });
  EXPECT_EQ(waiting.wait_for(2500ms), std::future_status::timeout);  // no room: it waits
  ClusterSpec three_again = four.without({four.workers.back().id}, "resize");
  three_again.version = four.version + 1;
  ASSERT_TRUE(membership->propose(three_again));
  const ClusterSpec last = waiting.get();
  EXPECT_EQ(last.size(), 4) << layout(last);
  EXPECT_EQ(last.workers_on("b"), 1) << layout(last);
}

TEST_F(HostJobTest, TooFewHostsIsATimeoutThatSaysWhatToDo) {
  auto a = host("a", 2, 2, 500ms);
  try {
    a->join();
    FAIL() << "joined alone";
  } catch (const TimeoutError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("only 1 of the 2 hosts"), std::string::npos) << what;
    EXPECT_NE(what.find("--join-timeout"), std::string::npos) << what;
    EXPECT_NE(what.find("a (198.18.0.1"), std::string::npos) << what;
    EXPECT_NE(what.find("same --store and --job-id"), std::string::npos) << what;
  }
}

TEST_F(HostJobTest, ARestartedLauncherReplacesTheWorkersOfItsPredecessor) {
  auto a = host("a", 1, 2);
  auto b = host("b", 1, 2);
  a->join();
  b->join();
  b->hosts().abandon();  // killed: its workers die with it, its record stays until the lease expires
  b.reset();
  auto b2 = host("b", 1, 2);
  const ClusterSpec spec = b2->join();
  EXPECT_EQ(spec.reason, "host b restarted");
  EXPECT_EQ(layout(spec), "a:0 a:1 b:4 b:5");
}

TEST_F(HostJobTest, FinishedHostsAreNotLossesAndTheLastOneCleansUp) {
  auto [a, b] = two_joined_hosts();
  b->finish(true);
  EXPECT_TRUE(a->finished("b"));
  EXPECT_FALSE(a->remove_lost_hosts());  // b finished: the job is ending, not shrinking
  a->finish(true);
  elastic::EtcdClient client(etcd());
  EXPECT_TRUE(client.range("job/", true).kvs.empty());
}

// A launcher whose workers were only removed (none of them finished the training) leaves without the finished mark:
// the others must not take the training for over, and its workers are removed from the cluster like a lost host's.
TEST_F(HostJobTest, AHostWhoseWorkersWereOnlyRemovedLeavesUnmarked) {
  auto [a, b] = two_joined_hosts();
  b->finish(false);
  EXPECT_FALSE(a->finished("b"));
  const auto next = a->remove_lost_hosts();
  ASSERT_TRUE(next);
  EXPECT_EQ(next->workers_on("b"), 0);  // which host joined first (and took ids 0 and 1) is left to chance
  EXPECT_EQ(next->workers_on("a"), 2);
  a->finish(true);
}

}  // namespace
}  // namespace aikido::launch
