// Collectives between workers on different (emulated) hosts: TCP between hosts, the same-host path inside each,
// every topology, with the rendezvous store served on the bridge.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "emulated_hosts.hpp"
#include "runtime/store_server.hpp"

namespace aikido::testing {
namespace {

using namespace std::chrono_literals;

const std::string kSecret = "00112233445566778899aabbccddeeff";

class CrossHostPeerTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    const std::string why = EmulatedHosts::unavailable_reason();
    if (!why.empty()) GTEST_SKIP() << why;
  }
};

// 2 hosts x 2 workers run peer_worker `mode` (each worker checks its results against closed forms) on `topology`,
// with `extra` settings.
void run_across_hosts(const std::string& topology, const std::vector<std::string>& mode,
                      const std::vector<std::string>& extra = {}) {
  EmulatedHosts hosts(2);
  TlsOptions tls;  // the store speaks TLS when the workers do
  tls.enabled = std::find(extra.begin(), extra.end(), "AIKIDO_TLS=1") != extra.end();
  elastic::StoreServer store(EmulatedHosts::kBridgeAddress, 0, kSecret, tls);
  std::vector<std::unique_ptr<Subprocess>> workers;
  const int size = 4;
  for (int rank = 0; rank < size; ++rank) {
    const int host = rank / 2;
    Subprocess::Options o;
    o.set_env = {"AIKIDO_RANK=" + std::to_string(rank),
                 "AIKIDO_SIZE=" + std::to_string(size),
                 "AIKIDO_STORE_ADDR=" + store.address(),
                 "AIKIDO_SECRET=" + kSecret,
                 "AIKIDO_JOB_ID=crosshost",
                 "AIKIDO_HOST=" + EmulatedHosts::name(host),
                 "AIKIDO_BIND_ADDRESS=" + EmulatedHosts::address(host),
                 "AIKIDO_TOPOLOGY=" + topology,
                 "AIKIDO_TIMEOUT=30"};
    o.set_env.insert(o.set_env.end(), extra.begin(), extra.end());
    std::vector<std::string> argv = {PEER_WORKER_PATH};
    argv.insert(argv.end(), mode.begin(), mode.end());
    workers.push_back(hosts.start(host, argv, o));
  }
  for (int rank = 0; rank < size; ++rank) {
    const ProcessResult r = workers[std::size_t(rank)]->wait(120s);
    EXPECT_TRUE(r.exited && r.exit_code == 0) << "rank " << rank << ": " << r.describe();
    EXPECT_NE(r.out.find("rank " + std::to_string(rank) + ": OK"), std::string::npos) << r.describe();
  }
}

// Allreduce of a buffer large enough to be pipelined.
TEST_P(CrossHostPeerTest, AllreduceIsCorrectAcrossHosts) { run_across_hosts(GetParam(), {"allreduce", "300000"}); }

// Every other collective and the model store, small (eager) and large (pipelined, with ready handshakes).
TEST_P(CrossHostPeerTest, EveryCollectiveIsCorrectAcrossHosts) {
  run_across_hosts(GetParam(), {"collectives", "7"});
  run_across_hosts(GetParam(), {"collectives", "200000"});
}

// Several TCP streams per pair of ranks on different hosts, and the default (measured at connection setup) on a
// shaped link.
TEST_P(CrossHostPeerTest, EveryCollectiveIsCorrectOnSeveralStreams) {
  run_across_hosts(GetParam(), {"allreduce", "3000000"}, {"AIKIDO_STREAMS=4", "AIKIDO_SEGMENT_BYTES=262144"});
  run_across_hosts(GetParam(), {"collectives", "200000"}, {"AIKIDO_STREAMS=3"});
}

// TLS on every TCP connection (between the hosts, and the store); shared memory inside each host.
TEST_P(CrossHostPeerTest, EveryCollectiveIsCorrectOverTls) {
  run_across_hosts(GetParam(), {"allreduce", "3000000"}, {"AIKIDO_TLS=1", "AIKIDO_STREAMS=2"});
  run_across_hosts(GetParam(), {"collectives", "200000"}, {"AIKIDO_TLS=1"});
}

// A worker killed on one host: the others' next allreduce fails with PeerLostError (all its streams end), not with
// the timeout's TimeoutError.
TEST_P(CrossHostPeerTest, AKilledWorkerFailsTheOthersOnSeveralStreams) {
  EmulatedHosts hosts(2);
  elastic::StoreServer store(EmulatedHosts::kBridgeAddress, 0, kSecret);
  std::vector<std::unique_ptr<Subprocess>> workers;
  for (int rank = 0; rank < 4; ++rank) {
    Subprocess::Options o;
    o.set_env = {"AIKIDO_RANK=" + std::to_string(rank),
                 "AIKIDO_SIZE=4",
                 "AIKIDO_STORE_ADDR=" + store.address(),
                 "AIKIDO_SECRET=" + kSecret,
                 "AIKIDO_JOB_ID=crosshost",
                 "AIKIDO_HOST=" + EmulatedHosts::name(rank / 2),
                 "AIKIDO_BIND_ADDRESS=" + EmulatedHosts::address(rank / 2),
                 "AIKIDO_TOPOLOGY=" + GetParam(),
                 "AIKIDO_STREAMS=3",
                 "AIKIDO_TIMEOUT=60"};
    workers.push_back(hosts.start(rank / 2, {PEER_WORKER_PATH, "crash", "2"}, o));
  }
  for (int rank = 0; rank < 4; ++rank) {
    const ProcessResult r = workers[std::size_t(rank)]->wait(120s);
    if (rank == 2) continue;
    EXPECT_TRUE(r.exited && r.exit_code == 3) << "rank " << rank << ": " << r.describe();
    EXPECT_NE(r.out.find("PeerLostError"), std::string::npos) << "rank " << rank << ": " << r.describe();
  }
}

INSTANTIATE_TEST_SUITE_P(Topologies, CrossHostPeerTest,
                         ::testing::Values("ring", "tree", "star", "hierarchical", "multi-ring", "auto"));

}  // namespace
}  // namespace aikido::testing
