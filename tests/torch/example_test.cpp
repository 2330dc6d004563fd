// The Fashion-MNIST example under the real aikido-run: accuracy, the keys of its JSON lines, exact sample counts.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "subprocess.hpp"

namespace aikido::testing {
namespace {

using namespace std::chrono_literals;

const std::string kRun = AIKIDO_RUN_PATH;
const std::string kExample = EXAMPLE_PATH;
const std::string kCtl = AIKIDO_CTL_PATH;
constexpr auto kBound = 300s;

// The JSON lines of rank `rank` ("[r] {...}", or "[r|wID] {...}" from an elastic worker whose id differs).
std::vector<nlohmann::json> epochs_of(const std::string& out, int rank) {
  std::vector<nlohmann::json> lines;
  std::istringstream in(out);
  const std::regex prefix("^\\[" + std::to_string(rank) + "(\\|w\\d+)?\\] \\{");
  for (std::string line; std::getline(in, line);) {
    if (std::regex_search(line, prefix)) lines.push_back(nlohmann::json::parse(line.substr(line.find("] {") + 2)));
  }
  return lines;
}

// aikido-run --timeline: a Chrome trace with, per worker, every collective (with its details), the phases of every
// step and the policy's decision, and aikido-run's events.
TEST(FashionMnistExample, TimelineHasTheCollectivesStepPhasesAndEventsOfEveryWorker) {
  const std::string path = ::testing::TempDir() + "aikido-timeline-" + std::to_string(::getpid()) + ".json";
  const auto r = run_process({kRun, "-np", "2", "--timeline", path, kExample, "--epochs", "1", "--max-steps", "12",
                              "--policy", "schedule:lr@step5=0.02", "--output", "json"},
                             kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_NE(r.err.find("aikido-run: timeline of 2 workers written to " + path), std::string::npos) << r.describe();
  std::ifstream in(path);
  const auto trace = nlohmann::json::parse(in);      // throws, failing the test, unless the whole file is JSON
  std::map<int, std::map<std::string, int>> phases;  // worker -> step phase -> spans
  std::map<int, int> begins, ends, decisions;
  std::set<std::string> launcher_events;
  for (const auto& e : trace.at("traceEvents")) {
    const int pid = e.at("pid").get<int>();
    const std::string ph = e.at("ph");
    if (ph == "X" && e.at("cat") == "step") {
      ++phases[pid][e.at("name").get<std::string>()];
      EXPECT_GE(e.at("dur").get<double>(), 0) << e;
    }
    if (ph == "b" && e.at("cat") == "collective") {
      ++begins[pid];
      const auto& args = e.at("args");
      EXPECT_TRUE(args.at("bytes").is_number() && args.at("algorithm").is_string() && args.at("kind").is_string()) << e;
      EXPECT_LE(args.at("posted_us").get<std::int64_t>(), args.at("started_us").get<std::int64_t>()) << e;
      EXPECT_LE(args.at("started_us").get<std::int64_t>(), args.at("finished_us").get<std::int64_t>()) << e;
    }
    if (ph == "e" && e.at("cat") == "collective") ++ends[pid];
    if (ph == "i" && e.at("cat") == "policy") {
      ++decisions[pid];
      EXPECT_EQ(e.at("name"), "schedule: lr") << e;
      EXPECT_EQ(e.at("args").at("to"), "0.02") << e;
      EXPECT_EQ(e.at("args").at("from"), "0.05") << e;
    }
    if (pid == 1'000'000 && ph == "i") launcher_events.insert(e.at("cat").get<std::string>());
  }
  for (int worker = 0; worker < 2; ++worker) {
    for (const char* phase : {"forward+backward", "wait", "optimizer"}) {
      EXPECT_EQ(phases[worker][phase], 12) << "worker " << worker << " phase " << phase;
    }
    EXPECT_GE(begins[worker], 12 * 2) << "worker " << worker;  // a gradient bucket and the metrics each step
    EXPECT_EQ(begins[worker], ends[worker]) << "worker " << worker;
    EXPECT_EQ(decisions[worker], 1) << "worker " << worker;
  }
  for (const char* kind : {"job_started", "worker_started", "worker_exited", "job_finished"}) {
    EXPECT_TRUE(launcher_events.contains(kind)) << kind;
  }
  std::remove(path.c_str());
}

TEST(FashionMnistExample, OutputChoosesJsonLinesOrProgressText) {
  auto r = run_process({kRun, "-np", "2", kExample, "--epochs", "2", "--max-steps", "20", "--output", "text"}, kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_TRUE(epochs_of(r.out, 0).empty()) << r.describe();
  // Not on a terminal: one line per epoch, from rank 0 alone.
  EXPECT_TRUE(std::regex_search(r.err, std::regex(R"(\[0\] epoch 1/2: 20 steps, train loss \d\.\d{4}, test accuracy )"
                                                  R"(0\.\d{4}, \d+ samples/s, \d+\.\d s, 2 workers\n)")))
      << r.describe();
  EXPECT_NE(r.err.find("[0] epoch 2/2: 20 steps"), std::string::npos) << r.describe();
  EXPECT_EQ(r.err.find("[1] epoch"), std::string::npos) << r.describe();
  EXPECT_EQ(r.err.find('\r'), std::string::npos) << r.describe();
  r = run_process({kRun, "-np", "1", kExample, "--epochs", "1", "--max-steps", "20", "--output", "json"}, kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_EQ(epochs_of(r.out, 0).size(), 1u) << r.describe();
  EXPECT_EQ(r.err.find("] epoch 1/1"), std::string::npos) << r.describe();
  // On a terminal: the progress line is rewritten in place ("...\r"), then the epoch's line.
  Subprocess::Options tty;
  tty.set_env = {"AIKIDO_CONSOLE_TTY=1"};
  r = run_process({kExample, "--epochs", "1", "--max-steps", "20", "--output", "both"}, kBound, tty);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_TRUE(std::regex_search(r.err, std::regex(R"(epoch 1/1  step \d+/20  \d+ samples/s  loss \d\.\d{4}  ETA )"
                                                  R"((\d\d:\d\d|--:--)\r)")))
      << r.describe();
  EXPECT_NE(r.err.find("epoch 1/1: 20 steps"), std::string::npos) << r.describe();
  EXPECT_NE(r.out.find("{\"epoch\":0,"), std::string::npos) << r.describe();
}

TEST(FashionMnistExample, TwoWorkersReachTheTargetAccuracy) {
  const auto r = run_process({kRun, "-np", "2", kExample, "--model", "mlp", "--epochs", "3", "--all-ranks"}, kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_NE(r.err.find("[0] train_fashion_mnist: starting: 2 workers, model mlp, strategy synchronous_sgd, 3 epochs "
                       "of 60000 samples, batch 64 per worker (128 in all), lr 0.05"),
            std::string::npos)
      << r.describe();
  for (int rank = 0; rank < 2; ++rank) {
    const auto epochs = epochs_of(r.out, rank);
    ASSERT_EQ(epochs.size(), 3u) << r.describe();
    for (std::size_t e = 0; e < epochs.size(); ++e) {
      const auto& line = epochs[e];
      for (const char* key : {"epoch",
                              "rank",
                              "workers",
                              "samples",
                              "global_samples",
                              "seconds",
                              "train_loss",
                              "test_accuracy",
                              "samples_per_second",
                              "batch_size",
                              "lr",
                              "strategy",
                              "steps",
                              "threads",
                              "model",
                              "cluster_version",
                              "global_samples_per_second",
                              "noise_scale",
                              "gradient_variance",
                              "snr"}) {
        EXPECT_TRUE(line.contains(key)) << key << " missing in " << line.dump();
      }
      EXPECT_EQ(line["epoch"], e);
      EXPECT_EQ(line["rank"], rank);
      EXPECT_EQ(line["workers"], 2);
      EXPECT_EQ(line["samples"], 30000);
      EXPECT_EQ(line["global_samples"], 60000);
      EXPECT_EQ(line["batch_size"], 64);
      EXPECT_EQ(line["strategy"], "synchronous_sgd");
      EXPECT_EQ(line["steps"], 469 * (e + 1));  // 60000 samples in global batches of 128: 469 steps per epoch
      EXPECT_GT(line["samples_per_second"].get<double>(), 0);
    }
    EXPECT_GE(epochs.back()["test_accuracy"].get<double>(), 0.85) << r.describe();
    EXPECT_LT(epochs.back()["train_loss"].get<double>(), epochs.front()["train_loss"].get<double>());
  }
  // One synchronous epoch, one duration: the ranks report the same seconds.
  for (std::size_t e = 0; e < 3; ++e) {
    EXPECT_EQ(epochs_of(r.out, 0)[e]["seconds"], epochs_of(r.out, 1)[e]["seconds"]) << "epoch " << e;
  }
}

// Without --all-ranks only rank 0 prints its epoch lines (the ranks' numbers are the same), and the keys that a
// reader looks for come first.
TEST(FashionMnistExample, RankZeroAlonePrintsEpochLinesByDefault) {
  const auto r = run_process({kRun, "-np", "2", kExample, "--epochs", "1", "--max-steps", "50"}, kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  ASSERT_EQ(epochs_of(r.out, 0).size(), 1u) << r.describe();
  EXPECT_TRUE(epochs_of(r.out, 1).empty()) << r.describe();
  EXPECT_EQ(count_of(r.err, "train_fashion_mnist: starting: "), 1) << r.describe();
  EXPECT_NE(r.out.find("[0] {\"epoch\":0,\"rank\":0,\"workers\":2,\"test_accuracy\":"), std::string::npos)
      << r.describe();
}

TEST(FashionMnistExample, StopsInsideAnEpochOnceTheTargetIsReached) {
  const auto r = run_process(
      {kRun, "-np", "2", kExample, "--epochs", "2", "--target-accuracy", "0.7", "--eval-every", "6000", "--all-ranks"},
      kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  for (int rank = 0; rank < 2; ++rank) {
    const auto epochs = epochs_of(r.out, rank);
    ASSERT_EQ(epochs.size(), 1u) << r.describe();
    EXPECT_GE(epochs[0]["test_accuracy"].get<double>(), 0.7) << r.describe();
    const auto global = epochs[0]["global_samples"].get<std::int64_t>();
    EXPECT_GE(global, 6000) << r.describe();
    EXPECT_LT(global, 60000) << r.describe();  // stopped inside the first epoch
    EXPECT_EQ(epochs[0]["samples"].get<std::int64_t>(), global / 2) << r.describe();
  }
}

TEST(FashionMnistExample, AveragingStrategiesTrain) {
  for (const char* strategy : {"sma", "pair"}) {
    const auto r = run_process({kRun, "-np", "2", kExample, "--strategy", strategy, "--epochs", "1"}, kBound);
    ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
    const auto epochs = epochs_of(r.out, 0);
    ASSERT_EQ(epochs.size(), 1u) << r.describe();
    EXPECT_GE(epochs[0]["test_accuracy"].get<double>(), 0.8) << strategy << "\n" << r.describe();
  }
}

// One HTTP GET on 127.0.0.1:port; the body, or empty when nothing answered.
std::string http_get(int port, const std::string& path) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<std::uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string reply;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
    const std::string request = "GET " + path + " HTTP/1.0\r\n\r\n";
    (void)!::write(fd, request.data(), request.size());
    char buffer[4096];
    for (ssize_t n; (n = ::read(fd, buffer, sizeof buffer)) > 0;) reply.append(buffer, std::size_t(n));
  }
  ::close(fd);
  return reply;
}

// The port aikido-run reports for --metrics-port 0; 0 when it reports none within 30 s.
int metrics_port_of(Subprocess& job) {
  int port = 0;
  job.wait_for_output(
      [&](const std::string&, const std::string& err) {
        std::smatch m;
        if (!std::regex_search(err, m, std::regex(R"(metrics at http://127\.0\.0\.1:(\d+)/metrics)"))) return false;
        port = std::stoi(m[1]);
        return true;
      },
      30s);
  return port;
}

TEST(FashionMnistExample, MetricsAreExportedWhileTraining) {
  const std::string file = ::testing::TempDir() + "/aikido-metrics-" + std::to_string(::getpid()) + ".jsonl";
  Subprocess job({kRun, "-np", "2", "--metrics-port", "0", "--metrics-file", file, "--metrics-interval", "0.2",
                  kExample, "--epochs", "2", "--max-steps", "400", "--policy", "adaptive-batch"});
  const int port = metrics_port_of(job);
  ASSERT_GT(port, 0) << job.wait(kBound).describe();
  // Poll until both workers have published their noise scale.
  std::string body;
  for (int i = 0; i < 200; ++i) {
    body = http_get(port, "/metrics");
    if (body.find("aikido_noise_scale{rank=\"1\"}") != std::string::npos &&
        body.find("aikido_noise_scale{rank=\"0\"}") != std::string::npos) {
      break;
    }
    std::this_thread::sleep_for(100ms);
  }
  EXPECT_EQ(body.rfind("HTTP/1.0 200 OK", 0), 0u) << body;
  EXPECT_NE(body.find("aikido_noise_scale{rank=\"1\"}"), std::string::npos) << body;
  EXPECT_NE(body.find("aikido_samples_per_second{rank=\"0\"}"), std::string::npos) << body;
  EXPECT_NE(http_get(port, "/elsewhere").find("404"), std::string::npos);
  // The exposition format: each family once, HELP and TYPE first, then every worker's samples together.
  EXPECT_EQ(count_of(body, "# TYPE aikido_noise_scale gauge\n"), 1) << body;
  EXPECT_NE(body.find("# HELP aikido_noise_scale "), std::string::npos) << body;
  EXPECT_NE(body.find("aikido_noise_scale{rank=\"0\"} "), std::string::npos) << body;
  EXPECT_TRUE(std::regex_search(
      body, std::regex("\naikido_noise_scale\\{rank=\"0\"\\} [^\n]*\naikido_noise_scale\\{rank=\"1\"\\} ")))
      << body;
  const auto r = job.wait(kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_NE(r.err.find("aikido-run: metrics of rank 0: "), std::string::npos) << r.describe();
  EXPECT_NE(r.err.find("aikido-run: metrics of rank 1: "), std::string::npos) << r.describe();
  // Each worker probed its link to the other (first round at the first step).
  EXPECT_TRUE(std::regex_search(r.err, std::regex(R"(metrics of rank 0: .*, link to rank 1 \d+ us \d+\.\d\d GB/s)")))
      << r.describe();
  // The file holds the workers' metrics and, for replaying the dashboard, the job's events (lines with "event").
  std::ifstream in(file);
  int lines = 0;
  bool finished = false;
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("event")) {
      finished = finished || j["event"] == "job_finished";
      continue;
    }
    ++lines;
    for (const char* key : {"time", "rank", "step", "noise_scale", "gradient_variance", "snr", "samples_per_second",
                            "compute_seconds", "communication_seconds", "wait_seconds", "strategy", "links"}) {
      EXPECT_TRUE(j.contains(key)) << key << " missing in " << line;
    }
  }
  EXPECT_GE(lines, 2);
  EXPECT_TRUE(finished) << "no job_finished event in " << file;
  in.close();
  std::remove(file.c_str());
  // The epoch lines carry the statistics too.
  const auto epochs = epochs_of(r.out, 0);
  ASSERT_EQ(epochs.size(), 2u) << r.describe();
  EXPECT_TRUE(epochs[1]["noise_scale"].is_number()) << epochs[1].dump();
  EXPECT_TRUE(epochs[1]["snr"].is_number()) << epochs[1].dump();
  // The summary counts every step, as the epoch line does (the last step's metrics are not left in flight).
  const std::string steps = std::to_string(epochs[1]["steps"].get<std::int64_t>());
  EXPECT_NE(r.err.find("aikido-run: metrics of rank 0: " + steps + " steps, "), std::string::npos)
      << "the last epoch line says " << steps << " steps\n"
      << r.describe();
}

// A static job of two launchers (--nnodes 2, a tcp:// store; here both on this host): the one given --metrics-file
// records every worker's metrics, those of the other launcher's worker too.
TEST(FashionMnistExample, OneLauncherOfAJobAcrossHostsRecordsEveryWorkersMetrics) {
  const std::string dir = ::testing::TempDir() + "aikido-nodes-" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  const std::string secret = dir + "/secret", file = dir + "/metrics.jsonl";
  {
    std::ofstream(secret) << "0123456789abcdef0123456789abcdef\n";
    std::filesystem::permissions(secret, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  }
  int port = 0;
  {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
    port = ntohs(addr.sin_port);
    ::close(fd);
  }
  std::vector<std::unique_ptr<Subprocess>> nodes;
  for (int node = 0; node < 2; ++node) {
    std::vector<std::string> argv = {kRun,
                                     "--nnodes",
                                     "2",
                                     "--nproc-per-node",
                                     "1",
                                     "--node-rank",
                                     std::to_string(node),
                                     "--store",
                                     "tcp://127.0.0.1:" + std::to_string(port),
                                     "--host-id",
                                     "node" + std::to_string(node),
                                     "--host-address",
                                     "127.0.0.1",
                                     "--job-id",
                                     "nodes-metrics",
                                     "--secret-file",
                                     secret,
                                     "--metrics-interval",
                                     "0.2"};
    if (node == 1) argv.insert(argv.end(), {"--metrics-file", file});
    argv.insert(argv.end(), {kExample, "--model", "mlp", "--epochs", "1", "--max-steps", "30"});
    nodes.push_back(std::make_unique<Subprocess>(argv));
  }
  for (auto& n : nodes) {
    const auto r = n->wait(kBound);
    ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  }
  std::set<int> ranks;
  std::ifstream in(file);
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    if (!j.contains("event")) ranks.insert(j["rank"].get<int>());
  }
  EXPECT_EQ(ranks, (std::set<int>{0, 1})) << "ranks with metrics in " << file;
  std::filesystem::remove_all(dir);
}

// After an elastic job shrinks, the exporter serves and summarises only the ranks of the current cluster: the worker
// that left published under rank 2, and its last values would show a worker that no longer trains.
TEST(FashionMnistExample, MetricsOfAnElasticJobFollowTheCluster) {
  Subprocess job({kRun, "-np", "3", "--elastic", "--metrics-port", "0", "--metrics-interval", "0.1", kExample,
                  "--elastic", "--epochs", "3", "--max-steps", "400", "--policy", "schedule:workers@step100=2"});
  const int port = metrics_port_of(job);
  ASSERT_GT(port, 0) << job.wait(kBound).describe();
  bool saw_three = false, saw_two_alone = false;
  std::string body;
  for (int i = 0; i < 600 && !saw_two_alone; ++i) {
    body = http_get(port, "/metrics");
    if (body.find("aikido_workers{rank=\"2\"} 3") != std::string::npos) saw_three = true;
    saw_two_alone =
        body.find("aikido_workers{rank=\"0\"} 2") != std::string::npos && body.find("{rank=\"2\"") == std::string::npos;
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_TRUE(saw_three) << "rank 2 never published";
  EXPECT_TRUE(saw_two_alone) << "rank 2 still served after the shrink:\n" << body;
  const auto r = job.wait(kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_NE(r.err.find("aikido-run: metrics of rank 1: "), std::string::npos) << r.describe();
  EXPECT_EQ(r.err.find("aikido-run: metrics of rank 2: "), std::string::npos) << r.describe();
}

// Threads per worker follow an elastic job's size when aikido-run chose them: -np 1 on 4 CPUs starts with 4 threads,
// and after growing to 2 workers each runs 2 (4 each would oversubscribe the CPUs: 2.7x slower steps measured with
// 2 x 2 threads on 2 cores). A thread count the user set stays.
TEST(FashionMnistExample, ThreadsPerWorkerFollowTheSizeOfAnElasticJob) {
  const std::vector<std::string> args = {
      kRun,          "-np",    "1",           "--elastic", "--max-np",
      "2",           kExample, "--elastic",   "--epochs",  "2",
      "--max-steps", "60",     "--all-ranks", "--policy",  "schedule:workers@step20=2"};
  const auto r = run_process(args, kBound, Subprocess::Options{{"AIKIDO_LOCAL_CPUS=4"}, ""});
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  for (const auto& rank : {0, 1}) {
    const auto epochs = epochs_of(r.out, rank);
    ASSERT_EQ(epochs.size(), 2u) << r.describe();
    for (const auto& e : epochs) EXPECT_EQ(e["threads"], 2) << "rank " << rank << ": " << e.dump();
  }
  const auto fixed = run_process(args, kBound, Subprocess::Options{{"AIKIDO_LOCAL_CPUS=4", "OMP_NUM_THREADS=3"}, ""});
  ASSERT_TRUE(fixed.exited && fixed.exit_code == 0) << fixed.describe();
  for (const auto& e : epochs_of(fixed.out, 1)) EXPECT_EQ(e["threads"], 3) << e.dump();
}

// The worker processes aikido-run started (its children), by the worker id in their environment.
std::map<std::string, pid_t> workers_of(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/task/" + std::to_string(pid) + "/children");
  std::map<std::string, pid_t> workers;
  for (pid_t child; in >> child;) {
    std::ifstream environ("/proc/" + std::to_string(child) + "/environ");
    for (std::string entry; std::getline(environ, entry, '\0');) {
      if (entry.starts_with("AIKIDO_WORKER_ID=")) workers[entry.substr(entry.find('=') + 1)] = child;
    }
  }
  return workers;
}

std::string ctl(const std::string& control, const std::vector<std::string>& args) {
  std::vector<std::string> argv = {kCtl, "--control-file", control};
  argv.insert(argv.end(), args.begin(), args.end());
  return run_process(argv, 30s).out;
}

// Waits until aikido-ctl status shows `workers` workers all past `step`.
bool wait_for_progress(const std::string& control, int workers, int step) {
  for (int i = 0; i < 600; ++i) {
    const std::string status = ctl(control, {"status"});
    int past = 0;
    std::smatch m;
    for (auto it = status.cbegin(); std::regex_search(it, status.cend(), m, std::regex(R"(step (-?\d+))"));
         it = m.suffix().first) {
      if (std::stoi(m[1]) > step) ++past;
    }
    if (past == workers && status.find(std::to_string(workers) + " workers") != std::string::npos) return true;
    std::this_thread::sleep_for(100ms);
  }
  return false;
}

// The example follows aikido-run --elastic without its own --elastic flag.
TEST(FashionMnistExample, ElasticTrainingSurvivesResizeAndAKilledWorker) {
  const std::string control = ::testing::TempDir() + "/aikido-example-control-" + std::to_string(::getpid());
  Subprocess job({kRun,
                  "-np",
                  "2",
                  "--elastic",
                  "--max-np",
                  "3",
                  "--restart",
                  "--control-file",
                  control,
                  "--timeout",
                  "20",
                  kExample,
                  "--epochs",
                  "2",
                  "--commit-every",
                  "5",
                  "--all-ranks",
                  "--count-samples",
                  "--policy",
                  "adaptive-batch:interval=20,warmup=20,max=256"});
  ASSERT_TRUE(wait_for_progress(control, 2, 20)) << ctl(control, {"status"});
  EXPECT_NE(ctl(control, {"resize", "3"}).find("cluster version 1"), std::string::npos);
  ASSERT_TRUE(wait_for_progress(control, 3, 200)) << ctl(control, {"status"});
  const auto workers = workers_of(job.pid());
  ASSERT_EQ(workers.size(), 3u);
  ASSERT_TRUE(workers.contains("0"));
  const std::string status = ctl(control, {"status"});
  ASSERT_EQ(::kill(workers.at("0"), SIGKILL), 0);  // rank 0's process
  const auto r = job.wait(kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_NE(r.err.find("aikido-run: worker 0 (rank 0) was killed by signal SIGKILL; removing it from the cluster and "
                       "starting a replacement"),
            std::string::npos)
      << "killed pid " << workers.at("0") << " at\n"
      << status << r.describe();
  // Per epoch, as every worker reported it. The replacement received the policy's and the optimizer's state
  // (batch size, learning rate), so every worker reports the same values.
  std::map<std::int64_t, std::set<double>> accuracy, lr;
  std::map<std::int64_t, std::set<std::int64_t>> batch;
  int lines = 0;
  for (int rank = 0; rank < 3; ++rank) {
    for (const auto& line : epochs_of(r.out, rank)) {
      ++lines;
      EXPECT_EQ(line["global_samples"], 60000) << line.dump();
      // Counted step by step and rolled back with the model: every index of the training set trained exactly once.
      EXPECT_EQ(line["trained_samples"], 60000) << line.dump();
      EXPECT_EQ(line["samples_once"], true) << line.dump();
      EXPECT_EQ(line["workers"], 3) << line.dump();
      accuracy[line["epoch"].get<std::int64_t>()].insert(line["test_accuracy"].get<double>());
      lr[line["epoch"].get<std::int64_t>()].insert(line["lr"].get<double>());
      batch[line["epoch"].get<std::int64_t>()].insert(line["batch_size"].get<std::int64_t>());
    }
  }
  EXPECT_GE(lines, 2) << r.describe();
  ASSERT_EQ(accuracy.size(), 2u) << r.describe();
  for (const auto& [epoch, values] : accuracy) {
    EXPECT_EQ(values.size(), 1u) << "workers disagree on the model in epoch " << epoch;
    EXPECT_GT(*values.begin(), 0.8);
    EXPECT_EQ(lr[epoch].size(), 1u) << "workers disagree on the learning rate in epoch " << epoch << "\n" << r.out;
    EXPECT_EQ(batch[epoch].size(), 1u) << "workers disagree on the batch size in epoch " << epoch << "\n" << r.out;
  }
  EXPECT_GT(*batch[1].begin(), 64) << "the policy never grew the batch: the test shows nothing\n" << r.out;
  // Every worker of the final cluster ends with the same parameters.
  std::set<std::string> digests;
  std::set<int> finished;
  const std::regex said(R"(finished: rank (\d+) of 3, .*parameters ([0-9a-f]{16}))");
  for (auto it = std::sregex_iterator(r.err.begin(), r.err.end(), said); it != std::sregex_iterator(); ++it) {
    finished.insert(std::stoi((*it)[1].str()));
    digests.insert((*it)[2].str());
  }
  EXPECT_EQ(finished, (std::set<int>{0, 1, 2})) << r.err;
  EXPECT_EQ(digests.size(), 1u) << r.err;
}

// Edge training: the round strategies with secure aggregation and a label-skewed split, compression and DP-SGD. Over
// TCP (--transport tcp) every collective goes over the wire, so bytes_sent shows what the codecs save.
TEST(FashionMnistExample, EdgeOptionsTrainAndReportBytesAndEpsilon) {
  const auto run = [](std::vector<std::string> flags) {
    std::vector<std::string> argv = {kRun,       "-np", "2",         "--transport", "tcp",         kExample,
                                     "--epochs", "1",   "--monitor", "off",         "--max-steps", "60"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    return run_process(argv, kBound);
  };
  const auto fedavg =
      run({"--strategy", "fedavg", "--local-steps", "4", "--secure-aggregation", "--partition", "label:0.5"});
  ASSERT_TRUE(fedavg.exited && fedavg.exit_code == 0) << fedavg.describe();
  EXPECT_NE(fedavg.err.find("strategy federated_averaging, 1 epoch of 60000 samples"), std::string::npos)
      << fedavg.describe();
  EXPECT_NE(fedavg.err.find("4 local steps per round, secure aggregation, partition label:0.5"), std::string::npos)
      << fedavg.describe();
  auto lines = epochs_of(fedavg.out, 0);
  ASSERT_EQ(lines.size(), 1u) << fedavg.describe();
  EXPECT_EQ(lines[0]["strategy"], "federated_averaging");
  EXPECT_EQ(lines[0]["compression"], "none");
  EXPECT_TRUE(lines[0]["epsilon"].is_null()) << lines[0].dump();
  EXPECT_GT(lines[0]["bytes_sent"].get<std::int64_t>(), 0) << lines[0].dump();
  EXPECT_GT(lines[0]["test_accuracy"].get<double>(), 0.3) << lines[0].dump();

  const auto plain = run({});
  const auto topk = run({"--compression", "topk:0.01"});
  ASSERT_TRUE(plain.exited && plain.exit_code == 0) << plain.describe();
  ASSERT_TRUE(topk.exited && topk.exit_code == 0) << topk.describe();
  const auto plain_line = epochs_of(plain.out, 0).at(0), topk_line = epochs_of(topk.out, 0).at(0);
  EXPECT_EQ(topk_line["compression"], "topk:0.01");
  EXPECT_LT(topk_line["bytes_sent"].get<double>(), plain_line["bytes_sent"].get<double>() / 20)
      << plain_line.dump() << "\n"
      << topk_line.dump();
  // Round strategies communicate once per round: a quarter of the bytes with four local steps, and a little more.
  EXPECT_LT(lines[0]["bytes_sent"].get<double>(), plain_line["bytes_sent"].get<double>() / 3);

  const auto dp = run({"--dp-clip", "1", "--dp-noise", "1.1", "--dp-delta", "1e-6"});
  ASSERT_TRUE(dp.exited && dp.exit_code == 0) << dp.describe();
  EXPECT_NE(dp.err.find("differential privacy (DP-SGD, clip 1, noise 1.1, delta 1e-06)"), std::string::npos)
      << dp.describe();
  lines = epochs_of(dp.out, 0);
  ASSERT_EQ(lines.size(), 1u) << dp.describe();
  ASSERT_TRUE(lines[0]["epsilon"].is_number()) << lines[0].dump();
  // 60 steps at q = 128 / 60000, sigma 1.1: well below 1.
  EXPECT_GT(lines[0]["epsilon"].get<double>(), 0.01) << lines[0].dump();
  EXPECT_LT(lines[0]["epsilon"].get<double>(), 1.0) << lines[0].dump();
}

// Federated averaging with secure aggregation in an elastic job: a worker is killed while the others train (most
// likely inside a round of 5 local steps; the commits fall on round ends). The others roll back to the last round's
// end, redo the round among themselves with fresh masks and finish both epochs with every sample counted.
TEST(FashionMnistExample, FedAvgSurvivesAWorkerLeavingMidRound) {
  const std::string control = ::testing::TempDir() + "/aikido-example-fedavg-" + std::to_string(::getpid());
  Subprocess job({kRun,
                  "-np",
                  "3",
                  "--elastic",
                  "--control-file",
                  control,
                  "--timeout",
                  "20",
                  kExample,
                  "--strategy",
                  "fedavg",
                  "--local-steps",
                  "5",
                  "--secure-aggregation",
                  "--epochs",
                  "2",
                  "--commit-every",
                  "5",
                  "--all-ranks",
                  "--monitor",
                  "off"});
  ASSERT_TRUE(wait_for_progress(control, 3, 22)) << ctl(control, {"status"});
  const auto workers = workers_of(job.pid());
  ASSERT_TRUE(workers.contains("1")) << ctl(control, {"status"});
  ASSERT_EQ(::kill(workers.at("1"), SIGKILL), 0);
  const auto r = job.wait(kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  // The survivors go on in the cluster without it (they learn of it from a failed collective, "recovering after",
  // or, when none was in flight, from the next commit).
  EXPECT_NE(r.err.find("(lost): 2 workers"), std::string::npos) << r.describe();
  std::map<std::int64_t, std::set<double>> accuracy;
  for (int rank = 0; rank < 2; ++rank) {
    for (const auto& line : epochs_of(r.out, rank)) {
      EXPECT_EQ(line["global_samples"], 60000) << line.dump();
      EXPECT_EQ(line["workers"], 2) << line.dump();
      EXPECT_EQ(line["strategy"], "federated_averaging") << line.dump();
      accuracy[line["epoch"].get<std::int64_t>()].insert(line["test_accuracy"].get<double>());
    }
  }
  ASSERT_EQ(accuracy.size(), 2u) << r.describe();
  for (const auto& [epoch, values] : accuracy) {
    EXPECT_EQ(values.size(), 1u) << "the survivors disagree on the model in epoch " << epoch;
    EXPECT_GT(*values.begin(), 0.75) << "epoch " << epoch;
  }
}

// A job stopped with --checkpoint and resumed: rank 0's answer names the step of the commit it wrote (not a warning:
// writing it is what the stop asked for), the resumed job says where it starts, and one already past --epochs says
// so instead of exiting without a word.
TEST(FashionMnistExample, AResumedJobSaysWhereItStarts) {
  const std::string checkpoint = ::testing::TempDir() + "/aikido-example-resume-" + std::to_string(::getpid()) + ".ck";
  ::unlink(checkpoint.c_str());
  Subprocess job(
      {kRun, "-np", "2", "--elastic", "--checkpoint", checkpoint, kExample, "--epochs", "50", "--max-steps", "40"});
  ASSERT_TRUE(job.wait_for_output(
      [](const std::string& out, const std::string&) { return out.find("{\"epoch\":0,") != std::string::npos; },
      kBound))
      << job.wait(1s).describe();
  job.send_signal(SIGTERM);
  const auto stopped = job.wait(kBound);
  EXPECT_TRUE(stopped.exited && stopped.exit_code == 143) << stopped.describe();
  std::smatch m;
  ASSERT_TRUE(
      std::regex_search(stopped.err, m, std::regex("aikido-run: rank 0: wrote the last commit \\(step (\\d+)\\) to ")))
      << stopped.describe();
  const std::string step = m[1];
  EXPECT_EQ(stopped.err.find("[aikido warn]"), std::string::npos) << stopped.describe();

  const auto r =
      run_process({kRun, "-np", "2", "--elastic", "--resume", checkpoint, kExample, "--epochs", "1"}, kBound);
  EXPECT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_TRUE(
      std::regex_search(r.err, std::regex("\\[0\\] train_fashion_mnist: resumed from " + checkpoint +
                                          " at epoch [1-9]\\d* \\(\\d+ of 60000 samples done\\), step " + step + "\n")))
      << "the checkpoint holds step " << step << "\n"
      << r.describe();
  EXPECT_TRUE(std::regex_search(
      r.err, std::regex("\\[0\\] train_fashion_mnist: nothing left to train: the state is at epoch [1-9]\\d* and "
                        "--epochs is 1\n")))
      << r.describe();
  EXPECT_TRUE(epochs_of(r.out, 0).empty()) << r.describe();
  ::unlink(checkpoint.c_str());
}

TEST(FashionMnistExample, BadInputIsAClearError) {
  auto r = run_process({kExample, "--data", "/nonexistent"}, kBound);
  EXPECT_TRUE(r.exited && r.exit_code == 1) << r.describe();
  EXPECT_NE(r.err.find("cannot open /nonexistent/train-images-idx3-ubyte.gz"), std::string::npos) << r.describe();
  r = run_process({kExample, "--model", "transformer"}, kBound);
  EXPECT_TRUE(r.exited && r.exit_code != 0) << r.describe();
  EXPECT_NE(r.err.find("--model"), std::string::npos) << r.describe();
  r = run_process({kExample, "--policy", "adaptive-batch:rule=cubic"}, kBound);
  EXPECT_TRUE(r.exited && r.exit_code == 1) << r.describe();
  EXPECT_NE(r.err.find("rule 'cubic' is not linear, sqrt or adascale"), std::string::npos) << r.describe();
  // Flags say what they accept, not the limits of a double.
  r = run_process({kExample, "--epochs", "0"}, kBound);
  EXPECT_TRUE(r.exited && r.exit_code != 0) << r.describe();
  EXPECT_NE(r.err.find("--epochs: '0' is not a number of epochs (1 or more)"), std::string::npos) << r.describe();
  EXPECT_EQ(r.err.find("179769"), std::string::npos) << r.describe();
  r = run_process({kExample, "--lr", "0"}, kBound);
  EXPECT_NE(r.err.find("--lr: '0' is not a learning rate above 0"), std::string::npos) << r.describe();
  r = run_process({kExample, "--eval-every", "6000"}, kBound);
  EXPECT_TRUE(r.exited && r.exit_code == 1) << r.describe();
  EXPECT_NE(r.err.find("--eval-every needs --target-accuracy"), std::string::npos) << r.describe();
  r = run_process({kExample, "--compression", "zip"}, kBound);
  EXPECT_TRUE(r.exited && r.exit_code != 0) << r.describe();
  EXPECT_NE(r.err.find("unknown compression 'zip': use none, fp16, bf16, int8, topk:FRACTION"), std::string::npos)
      << r.describe();
  r = run_process({kExample, "--partition", "label:x"}, kBound);
  EXPECT_TRUE(r.exited && r.exit_code != 0) << r.describe();
  EXPECT_NE(r.err.find("'label:x' is not iid or label:ALPHA"), std::string::npos) << r.describe();
  r = run_process({kExample, "--dp-noise", "1"}, kBound);
  EXPECT_TRUE(r.exited && r.exit_code == 1) << r.describe();
  EXPECT_NE(r.err.find("--dp-noise and --dp-delta need --dp-clip"), std::string::npos) << r.describe();
  r = run_process({kExample, "--secure-aggregation", "--max-steps", "1"}, kBound);
  EXPECT_TRUE(r.exited && r.exit_code == 1) << r.describe();
  EXPECT_NE(r.err.find("secure aggregation averages the updates of the round strategies"), std::string::npos)
      << r.describe();
  r = run_process({kExample, "--strategy", "sma", "--dp-clip", "1", "--max-steps", "1"}, kBound);
  EXPECT_TRUE(r.exited && r.exit_code == 1) << r.describe();
  EXPECT_NE(r.err.find("differential privacy is supported with synchronous_sgd"), std::string::npos) << r.describe();
  r = run_process({kRun, "-np", "1", "--metrics-port", "70000", kExample}, kBound);
  EXPECT_TRUE(r.exited && r.exit_code == 2) << r.describe();
  EXPECT_NE(r.err.find("--metrics-port '70000' is not a port number"), std::string::npos) << r.describe();
}

}  // namespace
}  // namespace aikido::testing
