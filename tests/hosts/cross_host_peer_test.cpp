// Collectives between workers on different (emulated) hosts: TCP between hosts, the same-host path inside each,
// every topology, with the rendezvous store served on the bridge.
#include <gtest/gtest.h>

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

// 2 hosts x 2 workers run peer_worker `mode` (each worker checks its results against closed forms) on `topology`.
void run_across_hosts(const std::string& topology, const std::vector<std::string>& mode) {
  EmulatedHosts hosts(2);
  elastic::StoreServer store(EmulatedHosts::kBridgeAddress, 0, kSecret);
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

INSTANTIATE_TEST_SUITE_P(Topologies, CrossHostPeerTest, ::testing::Values("ring", "tree", "star", "hierarchical"));

}  // namespace
}  // namespace aikido::testing
