// The Fashion-MNIST example on 2 emulated hosts x 2 workers, launched by aikido-run on each host through etcd, with
// every strategy on every topology: every run trains (the test accuracy rises well above chance) and counts every
// worker's samples.
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

TEST_P(ExampleAcrossHostsTest, TwoHostsOfTwoWorkersTrain) {
  const auto& [strategy, topology] = GetParam();
  static int run = 0;
  const std::string job = "example" + std::to_string(run++);
  std::vector<std::unique_ptr<Subprocess>> launchers;
  for (int h = 0; h < 2; ++h) {
    launchers.push_back(hosts_->start(h, {AIKIDO_RUN_PATH,
                                          "--nnodes",
                                          "2",
                                          "--nproc-per-node",
                                          "2",
                                          "--store",
                                          etcd_->url(),
                                          "--job-id",
                                          job,
                                          "--secret-file",
                                          secret_,
                                          "--topology",
                                          topology,
                                          EXAMPLE_PATH,
                                          "--model",
                                          "mlp",
                                          "--epochs",
                                          "1",
                                          "--max-steps",
                                          "30",
                                          "--strategy",
                                          strategy}));
  }
  std::string lines;
  for (auto& l : launchers) {
    const ProcessResult r = l->wait(180s);
    ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
    lines += r.out;
  }
  std::istringstream in(lines);
  std::string line;
  int epochs = 0;
  while (std::getline(in, line)) {
    const auto brace = line.find('{');
    if (brace == std::string::npos || line.rfind("[0]", 0) != 0) continue;
    const auto e = nlohmann::json::parse(line.substr(brace));
    ++epochs;
    EXPECT_EQ(e["workers"], 4) << line;
    EXPECT_EQ(e["global_samples"], 30 * 64 * 4) << line;
    EXPECT_GT(e["test_accuracy"].get<double>(), 0.5) << line;
  }
  EXPECT_EQ(epochs, 1) << lines;
}

INSTANTIATE_TEST_SUITE_P(StrategiesAndTopologies, ExampleAcrossHostsTest,
                         ::testing::Combine(::testing::Values("ssgd", "sma", "pair"),
                                            ::testing::Values("ring", "tree", "star", "hierarchical")),
                         [](const auto& info) { return std::get<0>(info.param) + "_" + std::get<1>(info.param); });

}  // namespace
}  // namespace aikido::testing
