// etcd as the store: the client of etcd's JSON gateway, the Store and the MembershipStore over it, against real
// etcd servers (one member, or three), including restarts, a lost member, compaction and authentication.
#include <gtest/gtest.h>
#include <unistd.h>

#include <aikido/errors.hpp>
#include <aikido/etcd.hpp>
#include <aikido/peer.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <fstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "elastic/etcd_client.hpp"
#include "etcd_server.hpp"
#include "subprocess.hpp"

namespace aikido {
namespace {

using namespace std::chrono_literals;
using elastic::EtcdClient;
using elastic::EtcdClock;
using elastic::EtcdWatch;
using testing::EtcdServer;

EtcdOptions options_for(const EtcdServer& server, std::chrono::milliseconds unavailable = 10s) {
  EtcdOptions o = parse_etcd_url(server.url());
  o.unavailable_timeout = unavailable;
  o.request_timeout = 1s;
  o.prefix = "/aikido-test/";
  return o;
}

ClusterSpec spec_with(std::uint64_t version, int workers) {
  ClusterSpec s;
  s.version = version;
  s.min_size = 1;
  s.max_size = 8;
  for (int i = 0; i < workers; ++i) s.workers.push_back({std::uint64_t(i), "h" + std::to_string(i / 2)});
  s.next_id = std::uint64_t(workers);
  return s;
}

void etcdctl(const EtcdServer& server, std::vector<std::string> args) {
  std::vector<std::string> argv = {"/usr/bin/etcdctl", "--endpoints=" + server.endpoint(0)};
  argv.insert(argv.end(), args.begin(), args.end());
  auto result = testing::run_process(argv, 20s, {{"ETCDCTL_API=3"}});
  ASSERT_TRUE(result.exited && result.exit_code == 0) << result.describe();
}

class EtcdTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!EtcdServer::available()) GTEST_SKIP() << "etcd is not installed (apt-get install etcd-server etcd-client)";
    server_ = std::make_unique<EtcdServer>();
  }
  std::unique_ptr<EtcdServer> server_;
};

TEST(EtcdUrl, ParsesEndpointsAndRefusesOtherForms) {
  const EtcdOptions o = parse_etcd_url("etcd://10.0.0.1:2379,etcd-1.svc:2380");
  EXPECT_EQ(o.endpoints, (std::vector<std::string>{"http://10.0.0.1:2379", "http://etcd-1.svc:2380"}));
  EXPECT_EQ(parse_etcd_url("etcds://h:1").endpoints, (std::vector<std::string>{"https://h:1"}));
  for (const char* bad : {"http://h:1", "etcd://", "etcd://h", "etcd://h:", "etcd://h:x1", "etcd://:1", "h:1"}) {
    try {
      parse_etcd_url(bad);
      ADD_FAILURE() << bad << " was accepted";
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("etcd://HOST:PORT"), std::string::npos) << e.what();
    }
  }
}

TEST(EtcdBase64, RoundTripsEveryLengthAndRefusesBadText) {
  std::string bytes;
  for (int n = 0; n < 70; ++n) {
    EXPECT_EQ(elastic::base64_decode(elastic::base64_encode(bytes)), bytes) << n;
    bytes += char(n * 37 + 5);
  }
  EXPECT_EQ(elastic::base64_encode("foobar"), "Zm9vYmFy");
  EXPECT_EQ(elastic::base64_encode("fo"), "Zm8=");
  for (const char* bad : {"Zm9", "Zm=v", "Z!9v", "=m9v"})
    EXPECT_THROW(elastic::base64_decode(bad), ProtocolError) << bad;
}

TEST(EtcdWatchAnswer, ParsesEventsCompactionAndErrors) {
  std::vector<elastic::EtcdEvent> events;
  EXPECT_FALSE(elastic::parse_watch_line(R"({"result":{"header":{"revision":"2"},"created":true}})", "/p/", events));
  EXPECT_TRUE(elastic::parse_watch_line(
      R"({"result":{"header":{"revision":"4"},"events":[{"kv":{"key":"L3Avaw==","mod_revision":"3","value":"dg=="}},)"
      R"({"type":"DELETE","kv":{"key":"L3Avaw==","mod_revision":"4"}}]}})",
      "/p/", events));
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].kv.key, "k");
  EXPECT_EQ(events[0].kv.value, "v");
  EXPECT_FALSE(events[0].deleted);
  EXPECT_TRUE(events[1].deleted);
  EXPECT_EQ(events[1].kv.mod_revision, 4);
  EXPECT_THROW(elastic::parse_watch_line(R"({"result":{"compact_revision":"9","canceled":true}})", "/p/", events),
               elastic::EtcdCompacted);
  EXPECT_THROW(elastic::parse_watch_line(R"({"error":{"grpc_code":14,"message":"no leader"}})", "/p/", events),
               ProtocolError);
  EXPECT_THROW(elastic::parse_watch_line("not json", "/p/", events), ProtocolError);
  // A key outside the prefix is refused, not handed on.
  EXPECT_THROW(elastic::parse_watch_line(R"({"result":{"events":[{"kv":{"key":"L3Evaw=="}}]}})", "/p/", events),
               ProtocolError);
}

TEST_F(EtcdTest, KeysTransactionsAndPrefixes) {
  EtcdClient client(options_for(*server_));
  EXPECT_TRUE(client.range("a/1").kvs.empty());
  const auto r1 = client.put("a/1", std::string("x\0y", 3));
  client.put("a/2", "two");
  client.put("b", "other");
  auto one = client.range("a/1");
  ASSERT_EQ(one.kvs.size(), 1u);
  EXPECT_EQ(one.kvs[0].value, std::string("x\0y", 3));
  EXPECT_EQ(one.kvs[0].mod_revision, r1);
  auto all = client.range("a/", true);
  ASSERT_EQ(all.kvs.size(), 2u);
  EXPECT_EQ(all.kvs[1].key, "a/2");

  EtcdClient::Compare unchanged{
      "a/1", EtcdClient::Compare::Target::mod_revision, EtcdClient::Compare::Result::equal, r1, {}};
  auto t = client.txn({unchanged}, {{EtcdClient::Operation::Kind::put, "a/1", "new"}},
                      {{EtcdClient::Operation::Kind::range, "a/1"}});
  EXPECT_TRUE(t.succeeded);
  t = client.txn({unchanged}, {{EtcdClient::Operation::Kind::put, "a/1", "newer"}},
                 {{EtcdClient::Operation::Kind::range, "a/1"}});
  EXPECT_FALSE(t.succeeded);
  ASSERT_EQ(t.ranges.size(), 1u);
  EXPECT_EQ(t.ranges[0].kvs.at(0).value, "new");

  EXPECT_EQ(client.erase("a/", true), 2);
  EXPECT_TRUE(client.range("a/", true).kvs.empty());
  EXPECT_EQ(client.range("b").kvs.size(), 1u);
}

TEST_F(EtcdTest, StoreWaitIsWokenByAPutAndTimesOutNamingTheKey) {
  auto store = connect_etcd_store(options_for(*server_));
  auto writer = connect_etcd_store(options_for(*server_));
  std::thread later([&] {
    std::this_thread::sleep_for(100ms);
    writer->set("late", "value");
  });
  EXPECT_EQ(store->wait("late", 10s), "value");
  later.join();
  try {
    store->wait("never", 300ms);
    FAIL() << "no timeout";
  } catch (const TimeoutError& e) {
    EXPECT_NE(std::string(e.what()).find("'never'"), std::string::npos) << e.what();
  }
  EXPECT_EQ(store->compare_and_set("cas", std::nullopt, "a"), std::optional<std::string>("a"));
  EXPECT_EQ(store->compare_and_set("cas", std::nullopt, "b"), std::optional<std::string>("a"));
  EXPECT_EQ(store->compare_and_set("cas", "a", "c"), std::optional<std::string>("c"));
  EXPECT_EQ(store->compare_and_set("cas", "a", "d"), std::optional<std::string>("c"));
  EXPECT_EQ(store->compare_and_set("absent", "a", "d"), std::nullopt);
  EXPECT_EQ(store->get("absent"), std::nullopt);
}

TEST_F(EtcdTest, LeasedKeysVanishWhenTheLeaseEndsAndTheWatchSeesIt) {
  EtcdClient client(options_for(*server_));
  const auto lease = client.grant_lease(1s);
  const auto revision = client.put("host/a", "alive", lease);
  EXPECT_GT(client.keep_alive(lease), 0);
  EtcdWatch watch(client, "host/", true, revision + 1);
  // No more keep-alives: etcd deletes the key within about the TTL.
  const auto deadline = EtcdClock::now() + 10s;
  bool deleted = false;
  while (!deleted && EtcdClock::now() < deadline) {
    for (const auto& e : watch.next(deadline)) deleted |= e.deleted && e.kv.key == "host/a";
  }
  EXPECT_TRUE(deleted);
  EXPECT_EQ(client.keep_alive(lease), 0);
  EXPECT_TRUE(client.range("host/a").kvs.empty());
  const auto second = client.grant_lease(30s);
  client.put("host/b", "alive", second);
  client.revoke_lease(second);
  EXPECT_TRUE(client.range("host/b").kvs.empty());
  client.revoke_lease(second);  // gone already: not an error
}

TEST_F(EtcdTest, AWatchDeliversEveryChangeInOrderAndCanBeInterrupted) {
  EtcdClient client(options_for(*server_));
  const auto start = client.range("w").revision + 1;
  EtcdWatch watch(client, "w/", true, start);
  std::thread writer([&] {
    EtcdClient other(options_for(*server_));
    for (int i = 0; i < 20; ++i) other.put("w/" + std::to_string(i % 3), std::to_string(i));
  });
  std::vector<std::string> seen;
  const auto deadline = EtcdClock::now() + 10s;
  while (seen.size() < 20 && EtcdClock::now() < deadline) {
    for (const auto& e : watch.next(deadline)) seen.push_back(e.kv.value);
  }
  writer.join();
  ASSERT_EQ(seen.size(), 20u);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(seen[std::size_t(i)], std::to_string(i));

  std::thread interrupter([&] {
    std::this_thread::sleep_for(100ms);
    watch.interrupt();
  });
  const auto before = EtcdClock::now();
  EXPECT_TRUE(watch.next(EtcdClock::now() + 20s).empty());
  EXPECT_LT(EtcdClock::now() - before, 10s);
  interrupter.join();
}

TEST_F(EtcdTest, AWatchResumesAcrossARestartOfEtcdWithoutLosingChanges) {
  EtcdClient client(options_for(*server_, 20s));
  client.put("r/0", "before");
  EtcdWatch watch(client, "r/", true, client.range("r").revision + 1);
  server_->restart(0);
  client.put("r/1", "after");  // waits for the restarted server if need be
  const auto deadline = EtcdClock::now() + 20s;
  std::vector<std::string> seen;
  while (seen.empty() && EtcdClock::now() < deadline) {
    for (const auto& e : watch.next(deadline)) seen.push_back(e.kv.key + "=" + e.kv.value);
  }
  EXPECT_EQ(seen, std::vector<std::string>{"r/1=after"});
}

TEST_F(EtcdTest, ACompactedWatchIsReportedAndTheMembershipWatchRecovers) {
  EtcdClient client(options_for(*server_));
  const auto first = client.put("c", "0");
  std::int64_t last = first;
  for (int i = 1; i < 5; ++i) last = client.put("c", std::to_string(i));
  etcdctl(*server_, {"compact", std::to_string(last)});
  EtcdWatch watch(client, "c", false, first + 1);
  EXPECT_THROW(watch.next(EtcdClock::now() + 10s), elastic::EtcdCompacted);

  auto membership = make_etcd_membership(options_for(*server_), "job");
  ASSERT_TRUE(membership->propose(spec_with(0, 2)));
  EXPECT_FALSE(membership->watch(0, 50ms));  // opens the stream at the current revision
  ASSERT_TRUE(membership->propose(spec_with(1, 3)));
  auto seen = membership->watch(0, 10s);
  ASSERT_TRUE(seen);
  EXPECT_EQ(seen->version, 1u);
  etcdctl(*server_, {"compact", std::to_string(client.range("x").revision)});
  ASSERT_TRUE(membership->propose(spec_with(2, 4)));
  seen = membership->watch(1, 10s);
  ASSERT_TRUE(seen);
  EXPECT_EQ(seen->version, 2u);
}

TEST_F(EtcdTest, ExactlyOneOfManyProposalsForAVersionWins) {
  auto setup = make_etcd_membership(options_for(*server_), "job");
  EXPECT_FALSE(setup->latest());
  ASSERT_TRUE(setup->propose(spec_with(0, 2)));
  EXPECT_FALSE(setup->propose(spec_with(0, 3)));  // version 0 exists
  EXPECT_FALSE(setup->propose(spec_with(2, 3)));  // not based on the latest
  std::atomic<int> wins{0};
  std::vector<std::thread> proposers;
  for (int t = 0; t < 6; ++t) {
    proposers.emplace_back([&, t] {
      auto membership = make_etcd_membership(options_for(*server_), "job");
      ClusterSpec next = spec_with(1, 1 + t % 4);
      next.reason = "proposer " + std::to_string(t);
      if (membership->propose(next)) ++wins;
    });
  }
  for (auto& p : proposers) p.join();
  EXPECT_EQ(wins.load(), 1);
  auto latest = setup->latest();
  ASSERT_TRUE(latest);
  EXPECT_EQ(latest->version, 1u);
  EXPECT_EQ(setup->get(1), latest);
  EXPECT_EQ(setup->get(0)->size(), 2);
  EXPECT_FALSE(setup->get(2));
}

TEST_F(EtcdTest, NoEndpointAnsweringIsATimeoutThatNamesThem) {
  EtcdOptions o = options_for(*server_, 700ms);
  o.endpoints = {"127.0.0.1:1", "127.0.0.1:2"};
  EtcdClient client(o);
  const auto start = EtcdClock::now();
  try {
    client.range("x");
    FAIL() << "no error";
  } catch (const TimeoutError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("127.0.0.1:1, 127.0.0.1:2"), std::string::npos) << what;
    EXPECT_NE(what.find("0.7 s"), std::string::npos) << what;
  }
  EXPECT_LT(EtcdClock::now() - start, 5s);
  // A dead endpoint in front of a live one costs a refused connection, nothing more.
  o.endpoints = {"127.0.0.1:1", server_->endpoint(0)};
  EtcdClient failover(o);
  failover.put("k", "v");
  EXPECT_EQ(failover.range("k").kvs.at(0).value, "v");
}

TEST_F(EtcdTest, AuthenticationWithUserAndPassword) {
  etcdctl(*server_, {"user", "add", "root:rootpw"});
  etcdctl(*server_, {"user", "add", "trainer:s3cret"});
  etcdctl(*server_, {"role", "add", "aikido"});
  etcdctl(*server_, {"role", "grant-permission", "aikido", "--prefix=true", "readwrite", "/aikido-test/"});
  etcdctl(*server_, {"user", "grant-role", "trainer", "aikido"});
  etcdctl(*server_, {"auth", "enable"});

  const std::string file = ::testing::TempDir() + "etcd-credentials";
  std::ofstream(file) << "user=trainer\npassword=s3cret\n";
  EtcdOptions o = options_for(*server_);
  read_etcd_credentials(file, o);
  auto store = connect_etcd_store(o);
  store->set("k", "v");
  EXPECT_EQ(store->wait("k", 5s), "v");

  EtcdOptions anonymous = options_for(*server_);
  EXPECT_THROW(connect_etcd_store(anonymous)->set("k", "w"), AuthError);
  EtcdOptions wrong = o;
  wrong.password = "guess";
  EXPECT_THROW(connect_etcd_store(wrong)->get("k"), ConfigError);
  EtcdOptions outside = o;
  outside.prefix = "/elsewhere/";
  try {
    connect_etcd_store(outside)->set("k", "v");
    FAIL() << "a key outside the granted prefix was written";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("grant the user"), std::string::npos) << e.what();
  }
  std::ofstream(file) << "user=trainer\n";
  EXPECT_THROW(read_etcd_credentials(file, o), ConfigError);
}

TEST_F(EtcdTest, PeersMeetThroughAnEtcdUrl) {
  // connect_store knows etcd:// once the library is loaded: ranks rendezvous through etcd like through aikido-run's
  // store, and the job's keys stay under the prefix.
  const auto schemes = store_schemes();
  EXPECT_NE(std::find(schemes.begin(), schemes.end(), "etcd"), schemes.end());
  constexpr int kRanks = 3;
  std::vector<std::thread> ranks;
  std::vector<float> sums(kRanks, -1);
  for (int r = 0; r < kRanks; ++r) {
    ranks.emplace_back([&, r] {
      PeerConfig c;
      c.rank = r;
      c.size = kRanks;
      c.secret = "00112233445566778899aabbccddeeff";
      c.job_id = "etcd-peers";
      c.timeout = 20s;
      c.store = connect_store(server_->url(), c.secret, c.timeout);
      Peer peer = Peer::create(c);
      std::vector<float> x(1000, float(r + 1));
      peer.allreduce(std::span<float>(x), ReduceOp::sum, "x");
      sums[std::size_t(r)] = x[999];
    });
  }
  for (auto& t : ranks) t.join();
  EXPECT_EQ(sums, std::vector<float>(kRanks, 6.0f));
  EtcdOptions o = parse_etcd_url(server_->url());
  EXPECT_FALSE(elastic::EtcdClient(o).range("etcd-peers/", true).kvs.empty());
}

// etcd serving clients over TLS with client certificates: etcds:// URLs and the TLS files given as options (or as
// AIKIDO_STORE_CA, _CERT, _KEY for workers and aikido-run) reach it; a client without a certificate does not.
TEST(EtcdTls, ClientsWithTheCaAndACertificateReachIt) {
  if (!EtcdServer::available()) GTEST_SKIP() << "etcd is not installed";
  if (::access("/usr/bin/openssl", X_OK) != 0) GTEST_SKIP() << "openssl is not installed";
  const std::string dir = ::testing::TempDir() + "aikido-etcd-tls-" + std::to_string(::getpid());
  const std::string script =
      "set -e; mkdir -p " + dir + "; cd " + dir +
      "; openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 1 -subj /CN=aikido-test-ca"
      " 2>/dev/null; openssl req -newkey rsa:2048 -nodes -keyout node.key -out node.csr -subj /CN=127.0.0.1"
      " 2>/dev/null; printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth,clientAuth\\n' > ext;"
      " openssl x509 -req -in node.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out node.crt -days 1 -extfile ext"
      " 2>/dev/null";
  const auto made = testing::run_process({"/bin/sh", "-c", script}, 60s);
  ASSERT_TRUE(made.exited && made.exit_code == 0) << made.describe();
  EtcdServer server(EtcdServer::Tls{dir + "/ca.crt", dir + "/node.crt", dir + "/node.key"});
  EXPECT_TRUE(server.url().starts_with("etcds://")) << server.url();
  EtcdOptions o = parse_etcd_url(server.url());
  o.ca_file = dir + "/ca.crt";
  o.cert_file = dir + "/node.crt";
  o.key_file = dir + "/node.key";
  o.unavailable_timeout = 10s;
  auto store = connect_etcd_store(o);
  store->set("k", "over TLS");
  EXPECT_EQ(store->wait("k", 5s), "over TLS");
  EtcdOptions no_certificate = o;
  no_certificate.cert_file.clear();
  no_certificate.key_file.clear();
  no_certificate.unavailable_timeout = 500ms;
  EXPECT_THROW(connect_etcd_store(no_certificate)->get("k"), TimeoutError);
  EtcdOptions half = o;
  half.key_file.clear();
  EXPECT_THROW(elastic::EtcdClient{half}, ConfigError);
  testing::run_process({"/bin/rm", "-rf", dir}, 10s);
}

TEST(EtcdCluster, OneMemberOfThreeDownChangesNothingForClients) {
  if (!EtcdServer::available()) GTEST_SKIP() << "etcd is not installed";
  EtcdServer cluster(3);
  auto membership = make_etcd_membership(options_for(cluster), "job");
  ASSERT_TRUE(membership->propose(spec_with(0, 2)));
  EXPECT_FALSE(membership->watch(0, 50ms));
  for (int down = 0; down < 3; ++down) {
    cluster.kill(down);
    const std::uint64_t v = std::uint64_t(down) + 1;
    ASSERT_TRUE(membership->propose(spec_with(v, 2 + down)));
    auto seen = membership->watch(v - 1, 20s);
    ASSERT_TRUE(seen) << "member " << down << " down";
    EXPECT_EQ(seen->version, v);
    cluster.restart(down);
  }
}

}  // namespace
}  // namespace aikido
