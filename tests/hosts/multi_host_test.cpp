// Jobs across emulated hosts with aikido-run on every host (--nnodes, etcd) or started from one (-H): training
// together, a host joining, hosts lost by a crash or a partition, etcd restarted or one member of three lost, and bad
// input. Workers are tests/integration/elastic_worker (60000 samples per epoch, global-position sharding, a hash of
// its parameters at the end), so every test checks that each epoch had exactly its 60000 samples and that all
// workers ended with equal parameters.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "elastic/etcd_client.hpp"
#include "emulated_hosts.hpp"
#include "etcd_server.hpp"

namespace aikido::testing {
namespace {

using namespace std::chrono_literals;
using json = nlohmann::json;

const std::string kRun = AIKIDO_RUN_PATH;
const std::string kWorker = ELASTIC_WORKER_PATH;

// The JSON events of workers' lines ("[label] {...}") in `out`.
std::vector<json> events_of(const std::string& out) {
  std::vector<json> events;
  std::istringstream in(out);
  std::string line;
  while (std::getline(in, line)) {
    const auto brace = line.find('{');
    if (line.empty() || line[0] != '[' || brace == std::string::npos) continue;
    json e = json::parse(line.substr(brace), nullptr, false);
    if (e.is_object() && e.contains("event")) events.push_back(std::move(e));
  }
  return events;
}

class MultiHostTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string why = EmulatedHosts::unavailable_reason();
    if (!why.empty()) GTEST_SKIP() << why;
    if (!EtcdServer::available()) GTEST_SKIP() << "etcd is not installed (apt-get install etcd-server etcd-client)";
    hosts_ = std::make_unique<EmulatedHosts>(3);
    secret_ = ::testing::TempDir() + "aikido-secret-" + std::to_string(::getpid());
    std::ofstream(secret_) << "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
  }
  void TearDown() override {
    launchers_.clear();
    etcd_.reset();
    hosts_.reset();
  }

  void start_etcd(int members = 1) { etcd_ = std::make_unique<EtcdServer>(members, EmulatedHosts::kBridgeAddress); }

  // aikido-run on host `host` joining job `job`; `flags` go before the program, `worker` after it.
  Subprocess& launch(int host, const std::string& nnodes, int per_host, std::vector<std::string> flags,
                     std::vector<std::string> worker, const std::string& job = "job") {
    std::vector<std::string> argv = {kRun,
                                     "--nnodes",
                                     nnodes,
                                     "--nproc-per-node",
                                     std::to_string(per_host),
                                     "--store",
                                     etcd_->url(),
                                     "--job-id",
                                     job,
                                     "--secret-file",
                                     secret_,
                                     "--host-timeout",
                                     "2"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    argv.push_back(kWorker);
    argv.insert(argv.end(), worker.begin(), worker.end());
    launchers_[host] = hosts_->start(host, argv);
    return *launchers_[host];
  }

  // Starts launchers on hosts 0..hosts-1 one after the other, each once the one before it is in the cluster, so
  // that host h gets rank h.
  void launch_in_order(int hosts, const std::string& nnodes, const std::vector<std::string>& worker) {
    for (int h = 0; h < hosts; ++h) {
      Subprocess& launcher = launch(h, nnodes, 1, {}, worker);
      ASSERT_TRUE(launcher.wait_for_output(
          [](const std::string&, const std::string& err) {
            return err.find("aikido-run: cluster") != std::string::npos;
          },
          60s));
    }
  }

  // Waits until the launcher on `host` printed every one of `needles` on its standard output.
  bool wait_for_out(int host, std::vector<std::string> needles, std::chrono::milliseconds bound = 60s) {
    return launchers_.at(host)->wait_for_output(
        [&](const std::string& out, const std::string&) {
          for (const auto& n : needles) {
            if (out.find(n) == std::string::npos) return false;
          }
          return true;
        },
        bound);
  }

  // Waits for every launcher; returns their results by host.
  std::map<int, ProcessResult> wait_all(std::chrono::milliseconds bound = 120s) {
    std::map<int, ProcessResult> results;
    for (auto& [host, p] : launchers_) results[host] = p->wait(bound);
    return results;
  }

  // Every epoch the job finished had exactly 60000 samples, each once; every worker that finished holds the same
  // parameters; at least `finishers` workers finished.
  static void expect_exact_training(const std::vector<json>& events, std::size_t finishers, int epochs,
                                    const std::string& context) {
    std::set<std::string> params;
    std::set<int> epochs_seen;
    std::size_t done = 0;
    for (const auto& e : events) {
      if (e["event"] == "epoch") {
        EXPECT_EQ(e["global_samples"], 60000) << e.dump() << context;
        EXPECT_EQ(e["index_sum_ok"], true) << e.dump() << context;
        epochs_seen.insert(e["finished_epoch"].get<int>());
      } else if (e["event"] == "done") {
        params.insert(e["params"].get<std::string>());
        ++done;
      }
    }
    EXPECT_GE(done, finishers) << context;
    EXPECT_EQ(params.size(), 1u) << "workers ended with different parameters" << context;
    EXPECT_EQ(int(epochs_seen.size()), epochs) << context;
  }

  static std::string describe(const std::map<int, ProcessResult>& results) {
    std::string out;
    for (const auto& [host, r] : results) out += "\n=== host " + std::to_string(host) + "\n" + r.describe();
    return out;
  }

  static std::vector<json> all_events(const std::map<int, ProcessResult>& results) {
    std::vector<json> events;
    for (const auto& [host, r] : results) {
      auto e = events_of(r.out);
      events.insert(events.end(), e.begin(), e.end());
    }
    return events;
  }

  // SIGKILL to every process of host `host`: its launcher and its workers, as when the machine dies.
  void crash(int host) {
    const ProcessResult r = run_process(
        {"/bin/sh", "-c", "for p in $(ip netns pids aikido-h" + std::to_string(host) + "); do kill -9 $p; done"}, 10s);
    ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  }

  bool etcd_has_job_keys(const std::string& job) {
    EtcdOptions o = parse_etcd_url(etcd_->url());
    return !elastic::EtcdClient(o).range(job + "/", true).kvs.empty();
  }

  std::unique_ptr<EmulatedHosts> hosts_;
  std::unique_ptr<EtcdServer> etcd_;
  std::string secret_;
  std::map<int, std::unique_ptr<Subprocess>> launchers_;
};

TEST_F(MultiHostTest, TwoHostsOfTwoWorkersTrainTogether) {
  start_etcd();
  for (int h = 0; h < 2; ++h) launch(h, "2", 2, {}, {"--epochs", "2", "--print-every", "1000"});
  const auto results = wait_all();
  for (const auto& [host, r] : results) ASSERT_TRUE(r.exited && r.exit_code == 0) << describe(results);
  const auto events = all_events(results);
  expect_exact_training(events, 4, 2, describe(results));
  // Ranks are global and each host's workers are contiguous.
  std::map<int, std::set<int>> ranks_by_host;
  for (const auto& [host, r] : results) {
    for (const auto& e : events_of(r.out)) ranks_by_host[host].insert(e["rank"].get<int>());
  }
  for (const auto& [host, ranks] : ranks_by_host) {
    ASSERT_EQ(ranks.size(), 2u) << describe(results);
    EXPECT_EQ(*ranks.rbegin() - *ranks.begin(), 1) << describe(results);
  }
  EXPECT_FALSE(etcd_has_job_keys("job")) << "the last launcher leaves no key of the job behind";
}

TEST_F(MultiHostTest, AThirdHostJoinsARunningJob) {
  start_etcd();
  const std::vector<std::string> worker = {"--epochs", "4", "--step-ms", "20", "--print-every", "10"};
  launch(0, "1:3", 1, {}, worker);
  Subprocess& first = launch(1, "1:3", 1, {}, worker);
  ASSERT_TRUE(first.wait_for_output(
      [](const std::string& out, const std::string&) { return out.find("\"event\":\"step\"") != std::string::npos; },
      60s));
  launch(2, "1:3", 1, {}, worker);
  const auto results = wait_all();
  for (const auto& [host, r] : results) ASSERT_TRUE(r.exited && r.exit_code == 0) << describe(results);
  const auto events = all_events(results);
  expect_exact_training(events, 3, 4, describe(results));
  bool joined = false;
  for (const auto& e : events_of(results.at(2).out)) joined |= e["event"] == "changed" && e["workers"] == 3;
  EXPECT_TRUE(joined) << "the third host's worker received the state of the running job" << describe(results);
  EXPECT_NE(results.at(2).err.find("(host h2 joined)"), std::string::npos) << describe(results);
}

class HostCrashTest : public MultiHostTest, public ::testing::WithParamInterface<bool> {};

// A host dies (its launcher and workers killed at once): the others go on without it. With the parameter, it is
// the host of rank 0.
TEST_P(HostCrashTest, TheOthersGoOnWithoutALostHost) {
  start_etcd();
  const std::vector<std::string> worker = {"--epochs", "6", "--step-ms", "20", "--print-every", "10"};
  ASSERT_NO_FATAL_FAILURE(launch_in_order(3, "1:3", worker));
  const int victim = GetParam() ? 0 : 1;
  ASSERT_TRUE(wait_for_out(2, {"\"workers\":3", "\"event\":\"step\""}));
  crash(victim);
  const auto results = wait_all();
  std::map<int, ProcessResult> survivors = results;
  survivors.erase(victim);
  for (const auto& [host, r] : survivors) ASSERT_TRUE(r.exited && r.exit_code == 0) << describe(results);
  const auto events = all_events(survivors);
  expect_exact_training(events, 2, 6, describe(results));
  bool removed = false;
  for (const auto& [host, r] : survivors) removed |= r.err.find("lost") != std::string::npos;
  EXPECT_TRUE(removed) << describe(results);
}

INSTANTIATE_TEST_SUITE_P(Victims, HostCrashTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "rank0s_host" : "another_host"; });

// A host's link is cut: the others remove it once its lease expires and go on; when the link comes back, the
// cut-off host learns that it was removed and stops its workers, whose connections are refused (old version).
TEST_F(MultiHostTest, APartitionedHostIsRemovedAndStopsWhenItsLinkReturns) {
  start_etcd();
  const std::vector<std::string> worker = {"--epochs", "6", "--step-ms", "20", "--print-every", "10"};
  ASSERT_NO_FATAL_FAILURE(launch_in_order(3, "1:3", worker));
  ASSERT_TRUE(wait_for_out(2, {"\"workers\":3", "\"event\":\"step\""}));
  hosts_->cut(2);
  ASSERT_TRUE(launchers_.at(0)->wait_for_output(
      [](const std::string&, const std::string& err) { return err.find("(host h2 lost)") != std::string::npos; }, 30s));
  hosts_->heal(2);
  const auto results = wait_all();
  std::map<int, ProcessResult> survivors = results;
  survivors.erase(2);
  for (const auto& [host, r] : survivors) ASSERT_TRUE(r.exited && r.exit_code == 0) << describe(results);
  expect_exact_training(all_events(survivors), 2, 6, describe(results));
  const ProcessResult& cut = results.at(2);
  EXPECT_TRUE(cut.exited && cut.exit_code != 0) << describe(results);
  EXPECT_NE(cut.err.find("lost its place"), std::string::npos) << describe(results);
  for (const auto& e : events_of(cut.out)) EXPECT_NE(e["event"], "done") << "the cut-off worker went on alone";
}

TEST_F(MultiHostTest, TrainingGoesOnWhileEtcdRestarts) {
  start_etcd();
  const std::vector<std::string> worker = {"--epochs", "5", "--step-ms", "20", "--print-every", "10"};
  for (int h = 0; h < 2; ++h) launch(h, "2", 1, {}, worker);
  ASSERT_TRUE(wait_for_out(0, {"\"event\":\"step\""}));
  etcd_->kill(0);
  std::this_thread::sleep_for(3s);  // longer than --host-timeout: leases must survive etcd's restart
  etcd_->restart(0);
  const auto results = wait_all();
  for (const auto& [host, r] : results) ASSERT_TRUE(r.exited && r.exit_code == 0) << describe(results);
  expect_exact_training(all_events(results), 2, 5, describe(results));
}

TEST_F(MultiHostTest, OneMemberOfAThreeMemberEtcdClusterIsLost) {
  start_etcd(3);
  const std::vector<std::string> worker = {"--epochs", "4", "--step-ms", "20", "--print-every", "10"};
  for (int h = 0; h < 2; ++h) launch(h, "1:2", 1, {}, worker);
  ASSERT_TRUE(wait_for_out(0, {"\"workers\":2"}));
  etcd_->kill(0);
  const auto results = wait_all();
  for (const auto& [host, r] : results) ASSERT_TRUE(r.exited && r.exit_code == 0) << describe(results);
  expect_exact_training(all_events(results), 2, 4, describe(results));
}

TEST_F(MultiHostTest, AikidoCtlShowsAndResizesAJobAcrossHosts) {
  start_etcd();
  const std::vector<std::string> worker = {"--epochs", "4", "--step-ms", "20", "--print-every", "10"};
  ASSERT_NO_FATAL_FAILURE(launch_in_order(2, "1:3", worker));
  const std::vector<std::string> job = {"--store", etcd_->url(), "--job-id", "job", "--secret-file", secret_};
  auto ctl = [&](std::vector<std::string> args) {
    args.insert(args.begin(), job.begin(), job.end());
    args.insert(args.begin(), AIKIDO_CTL_PATH);
    return run_process(args, 30s);
  };
  ASSERT_TRUE(wait_for_out(1, {"\"workers\":2"}));
  const ProcessResult shown = ctl({"status"});
  ASSERT_TRUE(shown.exited && shown.exit_code == 0) << shown.describe();
  EXPECT_NE(shown.out.find("2 workers"), std::string::npos) << shown.describe();
  EXPECT_NE(shown.out.find("on h0"), std::string::npos) << shown.describe();
  EXPECT_NE(shown.out.find("on h1"), std::string::npos) << shown.describe();
  const ProcessResult grown = ctl({"resize", "3"});
  ASSERT_TRUE(grown.exited && grown.exit_code == 0) << grown.describe();
  // The new worker goes to the first host (both have one): its launcher starts it.
  ASSERT_TRUE(wait_for_out(0, {"\"workers\":3"}));
  const std::string other = secret_ + "-ctl";
  std::ofstream(other) << "0000000000000000000000000000000000000000000000000000000000000000\n";
  const ProcessResult refused = run_process(
      {AIKIDO_CTL_PATH, "--store", etcd_->url(), "--job-id", "job", "--secret-file", other, "resize", "1"}, 30s);
  EXPECT_TRUE(refused.exited && refused.exit_code == 1) << refused.describe();
  EXPECT_NE(refused.err.find("secret differs"), std::string::npos) << refused.describe();
  const auto results = wait_all();
  for (const auto& [host, r] : results) ASSERT_TRUE(r.exited && r.exit_code == 0) << describe(results);
  expect_exact_training(all_events(results), 3, 4, describe(results));
}

// A host that joins just as the others finish the training (its launcher rejoined after a cut, say): its workers
// are started for a version the finished workers never join, and would wait for them until their timeout, fail
// and, with --restart, be replaced for ever. Once the other host's launcher marks it finished, this host's launcher
// stops them and ends with status 0, starting no replacement.
TEST_F(MultiHostTest, AHostThatJoinsAsTheTrainingFinishesStopsItsWorkers) {
  start_etcd();
  const std::string go = ::testing::TempDir() + "aikido-finish-" + std::to_string(::getpid());
  std::filesystem::remove(go);
  Subprocess& first =
      launch(0, "1:2", 1, {"--timeout", "30"}, {"--epochs", "1", "--print-every", "1000", "--linger-until", go});
  ASSERT_TRUE(first.wait_for_output(
      [](const std::string& out, const std::string&) { return out.find("\"event\":\"done\"") != std::string::npos; },
      60s));
  Subprocess& late = launch(1, "1:2", 1, {"--restart", "--timeout", "20"}, {"--epochs", "1", "--print-every", "1000"});
  ASSERT_TRUE(late.wait_for_output(
      [](const std::string&, const std::string& err) {
        return err.find("aikido-run: cluster version 1 (host h1 joined)") != std::string::npos;
      },
      60s));
  std::this_thread::sleep_for(1s);  // its worker waits for rank 0, which lingers after "done"
  const auto finish = std::chrono::steady_clock::now();
  std::ofstream(go).put('\n');
  const auto results = wait_all();
  std::filesystem::remove(go);
  for (const auto& [host, r] : results) ASSERT_TRUE(r.exited && r.exit_code == 0) << describe(results);
  const std::string& err = results.at(1).err;
  EXPECT_NE(err.find("aikido-run: host h0 has finished the training (worker 0)"), std::string::npos)
      << describe(results);
  EXPECT_NE(err.find("which worker 0 never joined before it finished the training"), std::string::npos)
      << describe(results);
  EXPECT_EQ(err.find("starting a replacement"), std::string::npos) << describe(results);
  EXPECT_LT(std::chrono::steady_clock::now() - finish, 15s) << "the late host's worker waited out its timeout";
  expect_exact_training(events_of(results.at(0).out), 1, 1, describe(results));
}

TEST_F(MultiHostTest, StartedFromOneHostWithTheLaunchCommand) {
  // -H without --store: this aikido-run (outside the hosts, on the bridge) serves the store; ssh's stand-in enters
  // each host's namespace.
  const ProcessResult r = run_process(
      {kRun, "-np", "3", "-H", "h0:2,h1:2", "--launch-command", EmulatedHosts::launch_command(), "--secret-file",
       secret_, "--host-address", EmulatedHosts::kBridgeAddress, kWorker, "--epochs", "2", "--print-every", "1000"},
      120s);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  const auto events = events_of(r.out);
  expect_exact_training(events, 3, 2, r.describe());
  std::set<int> ranks;
  for (const auto& e : events) ranks.insert(e["rank"].get<int>());
  EXPECT_EQ(ranks, (std::set<int>{0, 1, 2})) << r.describe();
}

TEST_F(MultiHostTest, BadInputIsAClearErrorThatDisturbsNoOtherJob) {
  start_etcd();
  // A running job that the mistakes below must leave alone.
  const std::vector<std::string> worker = {"--epochs", "3", "--step-ms", "20", "--print-every", "1000"};
  launch(0, "1:2", 1, {"--host-id", "shared"}, worker, "good");
  ASSERT_TRUE(launchers_.at(0)->wait_for_output(
      [](const std::string&, const std::string& err) { return err.find("aikido-run: cluster") != std::string::npos; },
      60s));

  auto run_on = [&](int host, std::vector<std::string> argv) {
    argv.insert(argv.begin(), kRun);
    std::vector<std::string> full = EmulatedHosts::wrapper(host);
    full.insert(full.end(), argv.begin(), argv.end());
    return run_process(full, 60s);
  };
  const std::string other_secret = secret_ + "-other";
  std::ofstream(other_secret) << "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100\n";
  const std::vector<std::string> job = {"--nproc-per-node", "1", "--store", etcd_->url(), "--job-id", "good"};
  auto with = [](std::vector<std::string> a, const std::vector<std::string>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  struct Case {
    std::vector<std::string> argv;
    int status;
    std::string says;
  };
  const std::vector<Case> cases = {
      {with({"--nnodes", "1:2", "--secret-file", other_secret}, with(job, {kWorker})), 1, "secret differs"},
      {with({"--nnodes", "1:2", "--secret-file", secret_, "--host-id", "shared", "--host-timeout", "1"},
            with(job, {kWorker})),
       1, "'shared' is already taken"},
      {with({"--nnodes", "3:2", "--secret-file", secret_}, with(job, {kWorker})), 2,
       "minimum 3 is above the maximum 2"},
      {with({"--nnodes", "1:2", "--secret-file", secret_, "--host-address", "127.0.0.1"}, with(job, {kWorker})), 1,
       "--host-address"},
      {{"--nnodes", "2", "--nproc-per-node", "1", "--store", "etcd://198.18.0.1:1", "--job-id", "x", "--secret-file",
        secret_, kWorker},
       1,
       "198.18.0.1:1"},
      {{"--nnodes", "1:2", "--nproc-per-node", "1", "--store", "tcp://198.18.0.1:5000", "--node-rank", "0",
        "--secret-file", secret_, kWorker},
       2,
       "needs etcd"},
      {with({"--nnodes", "2"}, with(job, {kWorker})), 1, "--secret-file"},
  };
  for (const auto& c : cases) {
    const ProcessResult r = run_on(1, c.argv);
    EXPECT_TRUE(r.exited && r.exit_code == c.status) << r.describe();
    EXPECT_NE(r.err.find(c.says), std::string::npos) << "expected '" << c.says << "'\n" << r.describe();
  }
  const auto results = wait_all();
  ASSERT_TRUE(results.at(0).exited && results.at(0).exit_code == 0) << describe(results);
  expect_exact_training(all_events(results), 1, 3, describe(results));
}

}  // namespace
}  // namespace aikido::testing
