// Host membership of jobs that span hosts (src/launch/host_membership.hpp) against a real etcd server.
#include "launch/host_membership.hpp"

#include <gtest/gtest.h>

#include <aikido/errors.hpp>
#include <aikido/etcd.hpp>
#include <chrono>
#include <memory>
#include <thread>

#include "etcd_server.hpp"

namespace aikido::launch {
namespace {

using namespace std::chrono_literals;
using elastic::EtcdClock;
using testing::EtcdServer;

class HostMembershipTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!EtcdServer::available()) GTEST_SKIP() << "etcd is not installed (apt-get install etcd-server etcd-client)";
    server_ = std::make_unique<EtcdServer>();
  }

  std::shared_ptr<elastic::EtcdClient> client() {
    EtcdOptions o = parse_etcd_url(server_->url());
    o.unavailable_timeout = 10s;
    return std::make_shared<elastic::EtcdClient>(o);
  }

  std::unique_ptr<HostMembership> host(const std::string& id, std::chrono::seconds timeout = 2s) {
    HostRecord r;
    r.id = id;
    r.address = "198.18.0.1" + id.substr(1);
    r.slots = 2;
    r.pid = 100;
    return std::make_unique<HostMembership>(client(), "job", r, timeout);
  }

  static std::vector<std::string> ids(const std::vector<HostRecord>& hosts) {
    std::vector<std::string> out;
    for (const auto& h : hosts) out.push_back(h.id);
    return out;
  }

  std::unique_ptr<EtcdServer> server_;
};

TEST(HostRecordText, RoundTripsAndRefusesGarbage) {
  HostRecord r{"h1", "198.18.0.11", 4, 77, "node-a", 0};
  const HostRecord back = HostRecord::decode("h1", r.encode());
  EXPECT_EQ(back.address, "198.18.0.11");
  EXPECT_EQ(back.slots, 4);
  EXPECT_EQ(back.pid, 77);
  EXPECT_EQ(back.host_name, "node-a");
  EXPECT_EQ(r.describe(), "h1 (198.18.0.11, 4 workers, launcher pid 77 on node-a)");
  for (const char* bad : {"", "address=", "address=a slots=0", "address=a slots=x", "slots=2"}) {
    EXPECT_THROW(HostRecord::decode("h", bad), ProtocolError) << bad;
  }
}

TEST_F(HostMembershipTest, HostsAreListedInTheOrderTheyJoinedAndLeaveAtOnce) {
  auto a = host("h0");
  auto b = host("h1");
  auto c = host("h2");
  b->join();
  a->join();
  c->join();
  EXPECT_EQ(ids(a->hosts()), (std::vector<std::string>{"h1", "h0", "h2"}));
  b.reset();  // a launcher that exits revokes its lease: its host is gone at once
  const auto deadline = EtcdClock::now() + 10s;
  auto now = a->hosts();
  while (now.size() != 2 && EtcdClock::now() < deadline) now = a->wait_for_change(deadline);
  EXPECT_EQ(ids(now), (std::vector<std::string>{"h0", "h2"}));
}

TEST_F(HostMembershipTest, AKilledLaunchersHostExpiresAndItLearnsThatItWasRemoved) {
  auto a = host("h0");
  auto b = host("h1", 1s);
  a->join();
  b->join();
  ASSERT_EQ(a->hosts().size(), 2u);
  b->abandon();  // stops renewing, like a killed or cut-off launcher
  const auto deadline = EtcdClock::now() + 15s;
  auto now = a->hosts();
  while (now.size() != 1 && EtcdClock::now() < deadline) now = a->wait_for_change(deadline);
  EXPECT_EQ(ids(now), std::vector<std::string>{"h0"});
  EXPECT_FALSE(a->lease_lost());
  EXPECT_LT(a->since_renewal(), 5s);

  // A launcher whose lease is gone hears so at its next renewal.
  auto c = host("h2", 1s);
  c->join();
  client()->revoke_lease(c->lease());
  const auto until = EtcdClock::now() + 10s;
  while (!c->lease_lost() && EtcdClock::now() < until) std::this_thread::sleep_for(20ms);
  EXPECT_TRUE(c->lease_lost());
}

TEST_F(HostMembershipTest, TwoLaunchersCannotClaimOneHostId) {
  auto a = host("h0");
  a->join();
  auto twin = host("h0", 1s);
  try {
    twin->join();
    FAIL() << "a second launcher claimed h0";
  } catch (const ConfigError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("'h0' is already taken"), std::string::npos) << what;
    EXPECT_NE(what.find("--host-id"), std::string::npos) << what;
  }
  EXPECT_EQ(a->hosts().size(), 1u);
  // The holder goes: a launcher restarted on that host takes the id over.
  a.reset();
  auto again = host("h0");
  again->join();
  EXPECT_EQ(ids(again->hosts()), std::vector<std::string>{"h0"});
}

TEST_F(HostMembershipTest, ARecordLeftByAKilledLauncherIsWaitedFor) {
  auto old = host("h0", 1s);
  old->join();
  old->abandon();
  auto restarted = host("h0", 1s);
  restarted->join();  // within the old lease's TTL + 1 s
  EXPECT_EQ(ids(restarted->hosts()), std::vector<std::string>{"h0"});
}

}  // namespace
}  // namespace aikido::launch
