// The Fashion-MNIST example under the real aikido-run: accuracy, the keys of its JSON lines, exact sample counts.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "subprocess.hpp"

namespace aikido::testing {
namespace {

using namespace std::chrono_literals;

const std::string kRun = AIKIDO_RUN_PATH;
const std::string kExample = EXAMPLE_PATH;
constexpr auto kBound = 300s;

// The JSON lines of rank `rank` ("[r] {...}").
std::vector<nlohmann::json> epochs_of(const std::string& out, int rank) {
  std::vector<nlohmann::json> lines;
  std::istringstream in(out);
  const std::string prefix = "[" + std::to_string(rank) + "] {";
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(prefix, 0) == 0) lines.push_back(nlohmann::json::parse(line.substr(prefix.size() - 1)));
  }
  return lines;
}

TEST(FashionMnistExample, TwoWorkersReachTheTargetAccuracy) {
  const auto r = run_process({kRun, "-np", "2", kExample, "--model", "mlp", "--epochs", "3"}, kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  for (int rank = 0; rank < 2; ++rank) {
    const auto epochs = epochs_of(r.out, rank);
    ASSERT_EQ(epochs.size(), 3u) << r.describe();
    for (std::size_t e = 0; e < epochs.size(); ++e) {
      const auto& line = epochs[e];
      for (const char* key : {"epoch", "rank", "workers", "samples", "global_samples", "seconds", "train_loss",
                              "test_accuracy", "samples_per_second", "batch_size", "lr", "strategy"}) {
        EXPECT_TRUE(line.contains(key)) << key << " missing in " << line.dump();
      }
      EXPECT_EQ(line["epoch"], e);
      EXPECT_EQ(line["rank"], rank);
      EXPECT_EQ(line["workers"], 2);
      EXPECT_EQ(line["samples"], 30000);
      EXPECT_EQ(line["global_samples"], 60000);
      EXPECT_EQ(line["batch_size"], 64);
      EXPECT_EQ(line["strategy"], "synchronous_sgd");
      EXPECT_GT(line["samples_per_second"].get<double>(), 0);
    }
    EXPECT_GE(epochs.back()["test_accuracy"].get<double>(), 0.85) << r.describe();
    EXPECT_LT(epochs.back()["train_loss"].get<double>(), epochs.front()["train_loss"].get<double>());
  }
}

TEST(FashionMnistExample, AveragingStrategiesTrain) {
  for (const char* strategy : {"sma", "pair"}) {
    const auto r = run_process({kRun, "-np", "2", kExample, "--strategy", strategy, "--epochs", "1"}, kBound);
    ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
    const auto epochs = epochs_of(r.out, 1);
    ASSERT_EQ(epochs.size(), 1u) << r.describe();
    EXPECT_GE(epochs[0]["test_accuracy"].get<double>(), 0.8) << strategy << "\n" << r.describe();
  }
}

TEST(FashionMnistExample, BadInputIsAClearError) {
  auto r = run_process({kExample, "--data", "/nonexistent"}, kBound);
  EXPECT_TRUE(r.exited && r.exit_code == 1) << r.describe();
  EXPECT_NE(r.err.find("cannot open /nonexistent/train-images-idx3-ubyte.gz"), std::string::npos) << r.describe();
  r = run_process({kExample, "--model", "transformer"}, kBound);
  EXPECT_TRUE(r.exited && r.exit_code != 0) << r.describe();
  EXPECT_NE(r.err.find("--model"), std::string::npos) << r.describe();
}

}  // namespace
}  // namespace aikido::testing
