// The Fashion-MNIST example on 2 emulated hosts x 2 workers, launched by aikido-run on each host through etcd, with
// every strategy on every topology: every run trains (the test accuracy rises well above chance) and counts every
// worker's samples. Edge training (round strategies, compression, secure aggregation, privacy) on shaped links.
#include <gtest/gtest.h>

#include <chrono>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "emulated_hosts.hpp"
#include "etcd_server.hpp"

namespace aikido::testing {
namespace {

using namespace std::chrono_literals;

class ExampleAcrossHostsTest : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {
 protected:
  static void SetUpTestSuite() {
    if (!EmulatedHosts::unavailable_reason().empty() || !EtcdServer::available()) return;
    hosts_ = new EmulatedHosts(2);
    etcd_ = new EtcdServer(1, EmulatedHosts::kBridgeAddress);
    secret_ = ::testing::TempDir() + "aikido-example-secret-" + std::to_string(::getpid());
    std::ofstream(secret_) << "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
  }
  static void TearDownTestSuite() {
    delete etcd_;
    delete hosts_;
    etcd_ = nullptr;
    hosts_ = nullptr;
  }
  void SetUp() override {
    const std::string why = EmulatedHosts::unavailable_reason();
    if (!why.empty()) GTEST_SKIP() << why;
    if (!EtcdServer::available()) GTEST_SKIP() << "etcd is not installed (apt-get install etcd-server etcd-client)";
  }

  static EmulatedHosts* hosts_;
  static EtcdServer* etcd_;
  static std::string secret_;
};

EmulatedHosts* ExampleAcrossHostsTest::hosts_ = nullptr;
EtcdServer* ExampleAcrossHostsTest::etcd_ = nullptr;
std::string ExampleAcrossHostsTest::secret_;

// Runs the example (MLP, 30 steps of 64 samples per worker) on both hosts with `flags`; rank 0's epoch lines.
std::vector<nlohmann::json> run_example(EmulatedHosts& hosts, EtcdServer& etcd, const std::string& secret,
                                        const std::string& topology, const std::vector<std::string>& flags,
                                        const std::vector<std::string>& run_flags = {}) {
  static int run = 0;
  const std::string job = "example" + std::to_string(run++);
  std::vector<std::unique_ptr<Subprocess>> launchers;
  for (int h = 0; h < 2; ++h) {
    std::vector<std::string> argv = {AIKIDO_RUN_PATH,
                                     "--nnodes",
                                     "2",
                                     "--nproc-per-node",
                                     "2",
                                     "--store",
                                     etcd.url(),
                                     "--job-id",
                                     job,
                                     "--secret-file",
                                     secret,
                                     "--topology",
                                     topology};
    argv.insert(argv.end(), run_flags.begin(), run_flags.end());
    argv.insert(argv.end(), {EXAMPLE_PATH, "--model", "mlp", "--epochs", "1", "--max-steps", "30"});
    argv.insert(argv.end(), flags.begin(), flags.end());
    launchers.push_back(hosts.start(h, argv));
  }
  std::string lines;
  for (auto& l : launchers) {
    const ProcessResult r = l->wait(180s);
    EXPECT_TRUE(r.exited && r.exit_code == 0) << r.describe();
    lines += r.out;
  }
  std::istringstream in(lines);
  std::string line;
  std::vector<nlohmann::json> epochs;
  while (std::getline(in, line)) {
    const auto brace = line.find('{');
    if (brace == std::string::npos || line.rfind("[0]", 0) != 0) continue;
    epochs.push_back(nlohmann::json::parse(line.substr(brace)));
    const auto& e = epochs.back();
    EXPECT_EQ(e["workers"], 4) << line;
    EXPECT_EQ(e["global_samples"], 30 * 64 * 4) << line;
    EXPECT_GT(e["test_accuracy"].get<double>(), 0.5) << line;
  }
  EXPECT_EQ(epochs.size(), 1u) << lines;
  return epochs;
}

TEST_P(ExampleAcrossHostsTest, TwoHostsOfTwoWorkersTrain) {
  const auto& [strategy, topology] = GetParam();
  run_example(*hosts_, *etcd_, secret_, topology, {"--strategy", strategy});
}

// The launchers of both hosts given --tls: every worker's data connections run TLS (etcd is the store here).
TEST_F(ExampleAcrossHostsTest, TwoHostsTrainOverTls) {
  run_example(*hosts_, *etcd_, secret_, "hierarchical", {"--strategy", "ssgd"}, {"--tls"});
}

// Edge training across hosts whose links are shaped to 100 Mbit/s: the round strategies with compression, secure
// aggregation and client-level privacy train, and a round strategy puts far fewer bytes on the wire than
// synchronous SGD in the same steps.
TEST_F(ExampleAcrossHostsTest, EdgeTrainingOnShapedLinks) {
  struct Shaped {
    EmulatedHosts& hosts;
    explicit Shaped(EmulatedHosts& h) : hosts(h) {
      for (int i = 0; i < 2; ++i) hosts.shape(i, "100mbit");
    }
    ~Shaped() {
      for (int i = 0; i < 2; ++i) hosts.unshape(i);
    }
  } shaped(*hosts_);
  const auto ssgd = run_example(*hosts_, *etcd_, secret_, "hierarchical", {"--strategy", "ssgd"});
  const auto fedavg = run_example(*hosts_, *etcd_, secret_, "hierarchical",
                                  {"--strategy", "fedavg", "--local-steps", "6", "--compression", "fp16"});
  const auto secure = run_example(
      *hosts_, *etcd_, secret_, "ring",
      {"--strategy", "diloco", "--local-steps", "5", "--secure-aggregation", "--dp-clip", "10", "--dp-noise", "0.01"});
  ASSERT_FALSE(ssgd.empty() || fedavg.empty() || secure.empty());
  // 30 gradient allreduces against 5 update allreduces in half the bytes: about 12x fewer, less the link probes and
  // the metrics' allreduces that both send.
  const double ssgd_bytes = ssgd[0]["bytes_sent"].get<double>();
  const double fedavg_bytes = fedavg[0]["bytes_sent"].get<double>();
  EXPECT_LT(fedavg_bytes * 4, ssgd_bytes) << fedavg[0] << "\n" << ssgd[0];
  EXPECT_EQ(fedavg[0]["compression"], "fp16");
  // Client-level DP: one Gaussian round per 5 steps, 6 rounds.
  EXPECT_TRUE(secure[0]["epsilon"].is_number()) << secure[0];
  EXPECT_GT(secure[0]["epsilon"].get<double>(), 0) << secure[0];
}

INSTANTIATE_TEST_SUITE_P(StrategiesAndTopologies, ExampleAcrossHostsTest,
                         ::testing::Combine(::testing::Values("ssgd", "sma", "pair"),
                                            ::testing::Values("ring", "tree", "star", "hierarchical")),
                         [](const auto& info) { return std::get<0>(info.param) + "_" + std::get<1>(info.param); });

}  // namespace
}  // namespace aikido::testing
