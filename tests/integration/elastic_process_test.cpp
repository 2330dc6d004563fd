// Elastic jobs as real processes under aikido-run --elastic, with elastic_worker: resizes in a row with the
// parameters equal everywhere after each, kill -9 of random workers (rank 0 included) with exact sample counts per
// epoch, a stopped (SIGSTOP) worker found and removed, aikido-ctl, stale workers refused, and the stop below
// --min-np with a checkpoint.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
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
const std::string kCtl = AIKIDO_CTL_PATH;
const std::string kWorker = ELASTIC_WORKER_PATH;
constexpr auto kBound = 120s;

// A file name of this test process's own under the temporary directory.
std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / (name + "-" + std::to_string(::getpid()))).string();
}

// One JSON line of elastic_worker, fields as text.
struct Event {
  std::map<std::string, std::string> fields;
  const std::string& operator[](const std::string& key) const {
    static const std::string none;
    auto it = fields.find(key);
    return it == fields.end() ? none : it->second;
  }
  long long num(const std::string& key) const { return (*this)[key].empty() ? -1 : std::stoll((*this)[key]); }
};

std::vector<Event> events(const std::string& out, const std::string& kind = "") {
  static const std::regex field(R"re("([a-z_]+)":("([^"]*)"|[^,}]*))re");
  std::vector<Event> result;
  std::size_t begin = 0;
  while (begin < out.size()) {
    std::size_t end = out.find('\n', begin);
    if (end == std::string::npos) break;  // an unfinished line
    const std::string line = out.substr(begin, end - begin);
    begin = end + 1;
    const auto brace = line.find("] {\"event\":");
    if (brace == std::string::npos) continue;
    Event e;
    for (std::sregex_iterator it(line.begin() + long(brace), line.end(), field), stop; it != stop; ++it) {
      e.fields[(*it)[1]] = (*it)[3].matched ? (*it)[3].str() : (*it)[2].str();
    }
    if (kind.empty() || e["event"] == kind) result.push_back(std::move(e));
  }
  return result;
}

// Every epoch report says the whole cluster processed each of the 60000 samples exactly once; `epochs` of them
// finished (-1: at least one).
void expect_exact_epochs(const std::string& out, int epochs) {
  std::set<long long> finished;
  for (const auto& e : events(out, "epoch")) {
    EXPECT_EQ(e["global_samples"], "60000") << "worker " << e["worker"] << ", epoch " << e["finished_epoch"];
    EXPECT_EQ(e["index_sum_ok"], "true") << "worker " << e["worker"] << ", epoch " << e["finished_epoch"];
    finished.insert(e.num("finished_epoch"));
  }
  if (epochs >= 0) {
    EXPECT_EQ(int(finished.size()), epochs);
  } else {
    EXPECT_GE(finished.size(), 1u) << "no epoch finished";
  }
}

// After each membership change every member reports the same parameters, and the last version's members all
// finish with the same parameters.
void expect_equal_parameters(const std::string& out) {
  std::map<std::string, std::set<std::string>> params_by_version;
  std::map<std::string, int> members;
  for (const auto& e : events(out)) {
    if (e["event"] != "changed" && e["event"] != "recovered") continue;
    params_by_version[e["cluster_version"]].insert(e["params"]);
    members[e["cluster_version"]] = int(e.num("workers"));
  }
  for (const auto& [version, params] : params_by_version) {
    EXPECT_EQ(params.size(), 1u) << "members of cluster version " << version << " hold different parameters";
  }
  std::set<std::string> done;
  for (const auto& e : events(out, "done")) done.insert(e["params"]);
  EXPECT_LE(done.size(), 1u) << "the workers finished with different parameters";
}

std::vector<std::string> elastic_job(std::vector<std::string> run_flags, std::vector<std::string> worker_flags) {
  std::vector<std::string> argv = {kRun, "--elastic"};
  argv.insert(argv.end(), run_flags.begin(), run_flags.end());
  argv.push_back(kWorker);
  argv.insert(argv.end(), worker_flags.begin(), worker_flags.end());
  return argv;
}

// The newest step line: the current version and its members' pids by rank.
struct Cluster {
  long long version = -1;
  long long step = -1;
  std::map<long long, long long> pid_by_rank;
};

Cluster current_cluster(const std::string& out) {
  Cluster c;
  for (const auto& e : events(out, "step")) {
    const long long v = e.num("cluster_version");
    if (v > c.version) {
      c.version = v;
      c.pid_by_rank.clear();
    }
    if (v == c.version) {
      c.pid_by_rank[e.num("rank")] = e.num("pid");
      c.step = std::max(c.step, e.num("step"));
    }
  }
  return c;
}

TEST(ElasticProcessTest, TwentyResizesInARowKeepTheParametersEqual) {
  // Sizes between 1 and 4, each different from the previous one, at steps 3, 6, ..., 60.
  const int sizes[20] = {4, 1, 3, 2, 4, 2, 1, 4, 3, 1, 2, 3, 4, 1, 2, 4, 1, 3, 2, 4};
  std::string schedule;
  for (int i = 0; i < 20; ++i)
    schedule += (i ? "," : "") + std::to_string(3 * (i + 1)) + ":" + std::to_string(sizes[i]);
  const auto r = run_process(
      elastic_job({"-np", "2", "--max-np", "4", "--timeout", "20"}, {"--epochs", "2", "--schedule", schedule}), kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  std::map<long long, std::set<long long>> members;  // version -> workers that reported the change
  for (const auto& e : events(r.out, "changed")) members[e.num("cluster_version")].insert(e.num("worker"));
  for (int v = 1; v <= 20; ++v) {
    ASSERT_EQ(int(members[v].size()), sizes[v - 1]) << "cluster version " << v << "\n" << r.describe();
  }
  expect_equal_parameters(r.out);
  expect_exact_epochs(r.out, 2);
  EXPECT_EQ(events(r.out, "done").size(), 4u) << r.describe();
}

TEST(ElasticProcessTest, KillNineOfRandomWorkersRankZeroIncluded) {
  std::random_device device;
  const unsigned seed = device();
  std::mt19937 rng(seed);
  SCOPED_TRACE("seed " + std::to_string(seed));
  Subprocess job(elastic_job({"-np", "3", "--max-np", "3", "--restart", "--timeout", "20"},
                             {"--epochs", "3", "--step-ms", "4", "--print-every", "2"}));
  long long version = 0;
  for (int kill = 0; kill < 3; ++kill) {
    const long long at_step = 20 + 60 * kill + std::uniform_int_distribution<int>(0, 20)(rng);
    Cluster cluster;
    ASSERT_TRUE(job.wait_for_output(
        [&](const std::string& out, const std::string&) {
          cluster = current_cluster(out);
          return cluster.version >= version && cluster.step >= at_step && cluster.pid_by_rank.size() == 3;
        },
        60s))
        << "the job did not reach step " << at_step << " with 3 workers";
    const long long rank = kill == 0 ? 0 : std::uniform_int_distribution<int>(0, 2)(rng);
    ASSERT_EQ(::kill(pid_t(cluster.pid_by_rank[rank]), SIGKILL), 0);
    version = cluster.version + 1;
    // The survivors recover and train on with the replacement before the next kill.
    ASSERT_TRUE(job.wait_for_output(
        [&](const std::string& out, const std::string&) {
          const Cluster now = current_cluster(out);
          return now.version >= version && now.pid_by_rank.size() == 3;
        },
        60s))
        << "no recovery after killing rank " << rank << "\n"
        << job.wait(kBound).describe();
  }
  const auto r = job.wait(kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_EQ(count_of(r.err, "was killed by signal SIGKILL; removing it"), 3) << r.describe();
  // Two survivors recover from each kill (in sync() or after a failed collective).
  int recoveries = 0;
  for (const auto& e : events(r.out)) recoveries += e["failure"] == "true" ? 1 : 0;
  EXPECT_GE(recoveries, 6) << r.describe();
  expect_equal_parameters(r.out);
  expect_exact_epochs(r.out, 3);
}

// Waits (up to 60 s) until the job's newest step line shows step `step` or later with `workers` members.
Cluster wait_for_step(Subprocess& job, long long step, std::size_t workers) {
  Cluster cluster;
  job.wait_for_output(
      [&](const std::string& out, const std::string&) {
        cluster = current_cluster(out);
        return cluster.step >= step && cluster.pid_by_rank.size() == workers;
      },
      60s);
  return cluster;
}

// Waits (up to 60 s) until `workers` ranks printed "done"; their pids by rank.
std::map<long long, long long> wait_for_done(Subprocess& job, std::size_t workers) {
  std::map<long long, long long> pid_by_rank;
  job.wait_for_output(
      [&](const std::string& out, const std::string&) {
        for (const auto& e : events(out, "done")) pid_by_rank[e.num("rank")] = e.num("pid");
        return pid_by_rank.size() == workers;
      },
      60s);
  return pid_by_rank;
}

// A stopped worker closes nothing: aikido-run finds its heartbeat missing and kills it, long before the collectives'
// timeout (60 s), so the survivors see a lost peer, not a stall.
TEST(ElasticProcessTest, StoppedWorkerIsDetectedAndRemoved) {
  Subprocess job(elastic_job({"-np", "3", "--heartbeat-timeout", "2", "--timeout", "60"},
                             {"--epochs", "2", "--step-ms", "4", "--print-every", "2"}));
  Cluster cluster = wait_for_step(job, 20, 3);
  ASSERT_TRUE(cluster.step >= 20 && cluster.pid_by_rank.size() == 3u) << job.wait(kBound).describe();
  ASSERT_EQ(::kill(pid_t(cluster.pid_by_rank[1]), SIGSTOP), 0);
  const auto r = job.wait(kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_NE(r.err.find("stopped responding: no heartbeat for 2 s; killing it"), std::string::npos) << r.describe();
  EXPECT_EQ(current_cluster(r.out).pid_by_rank.size(), 2u) << r.describe();
  // Survivors that were waiting (in a training step's collective, or in sync()'s check, which recovers by itself)
  // were freed by the kill: none waited long enough for a stall report (half the timeout).
  EXPECT_EQ(r.err.find("stall report"), std::string::npos) << r.describe();
  for (const auto& e : events(r.out, "lost")) {
    EXPECT_NE(e["error"].find("is lost"), std::string::npos) << "not found through the heartbeat: " << e["error"];
  }
  expect_equal_parameters(r.out);
  expect_exact_epochs(r.out, 2);
}

bool process_gone(long long pid) { return ::kill(pid_t(pid), 0) != 0 && errno == ESRCH; }

TEST(ElasticProcessTest, AWorkerLostAfterTheOthersFinishedIsNotReplaced) {
  Subprocess job(elastic_job({"-np", "3", "--restart", "--timeout", "20"},
                             {"--epochs", "1", "--step-ms", "1", "--print-every", "20", "--linger-rank", "0"}));
  std::map<long long, long long> pid_by_rank = wait_for_done(job, 3);
  ASSERT_EQ(pid_by_rank.size(), 3u) << job.wait(kBound).describe();
  // Ranks 1 and 2 finish and are reaped by aikido-run; rank 0 lingers after its last step, and dies there.
  for (int i = 0; i < 600 && !(process_gone(pid_by_rank[1]) && process_gone(pid_by_rank[2])); ++i) {
    std::this_thread::sleep_for(50ms);
  }
  ASSERT_TRUE(process_gone(pid_by_rank[1]) && process_gone(pid_by_rank[2]));
  ASSERT_EQ(::kill(pid_t(pid_by_rank[0]), SIGKILL), 0);
  const auto r = job.wait(kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_NE(r.err.find("was killed by signal SIGKILL; removing it from the cluster; not replacing it: worker "),
            std::string::npos)
      << r.describe();
  EXPECT_EQ(r.err.find("starting worker 3"), std::string::npos) << r.describe();
  EXPECT_LT(r.elapsed, 50s) << "the job waited for the lingering worker";
}

// A resize that comes after a member finished the training (rank 0 lingers, the others exited) starts no worker: one
// would wait for the finished members in vain until its timeout.
TEST(ElasticProcessTest, AResizeAfterTheTrainingFinishedStartsNoWorker) {
  const std::string control = temp_path("aikido-ctl-finished");
  Subprocess job(elastic_job({"-np", "3", "--max-np", "4", "--restart", "--timeout", "20", "--control-file", control},
                             {"--epochs", "1", "--step-ms", "1", "--print-every", "20", "--linger-rank", "0"}));
  std::map<long long, long long> pid_by_rank = wait_for_done(job, 3);
  ASSERT_EQ(pid_by_rank.size(), 3u) << job.wait(kBound).describe();
  for (int i = 0; i < 600 && !(process_gone(pid_by_rank[1]) && process_gone(pid_by_rank[2])); ++i) {
    std::this_thread::sleep_for(50ms);
  }
  ASSERT_TRUE(process_gone(pid_by_rank[1]) && process_gone(pid_by_rank[2]));
  const auto resize = run_process({kCtl, "--control-file", control, "resize", "4"}, 30s);
  const bool refused = job.wait_for_output(
      [](const std::string&, const std::string& err) { return err.find("not starting worker 3") != std::string::npos; },
      30s);
  ASSERT_EQ(::kill(pid_t(pid_by_rank[0]), SIGKILL), 0);
  const auto r = job.wait(kBound);
  ASSERT_TRUE(refused) << resize.describe() << r.describe();
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_NE(r.err.find("aikido-run: not starting worker 3 of cluster version 1: worker "), std::string::npos)
      << r.describe();
  EXPECT_EQ(r.err.find("starting worker 3 as rank"), std::string::npos) << r.describe();
  EXPECT_LT(r.elapsed, 50s) << "the job waited for a worker that could not join";
}

// A worker that left its session has no heartbeat; one that works on after it (rank 0 here, 8 s) is left alone, but
// one stopped by a signal (SIGSTOP) would keep aikido-run waiting for ever: it is killed a heartbeat timeout later,
// without a replacement, and the job ends with status 0 once the others exit.
TEST(ElasticProcessTest, AWorkerStoppedAfterItLeftItsSessionIsKilled) {
  Subprocess job(elastic_job({"-np", "2", "--restart", "--heartbeat-timeout", "2", "--timeout", "20"},
                             {"--epochs", "1", "--step-ms", "1", "--print-every", "20", "--after-session-ms", "8000"}));
  std::set<long long> closed;
  job.wait_for_output(
      [&](const std::string& out, const std::string&) {
        for (const auto& e : events(out, "closed")) closed.insert(e.num("pid"));
        return closed.size() == 2;
      },
      60s);
  ASSERT_EQ(closed.size(), 2u) << job.wait(kBound).describe();
  const pid_t stopped = pid_t(*closed.begin());
  ASSERT_EQ(::kill(stopped, SIGSTOP), 0);
  const auto r = job.wait(kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_NE(r.err.find("left its session and has been stopped (SIGSTOP) for 2 s (--heartbeat-timeout); killing it"),
            std::string::npos)
      << r.describe();
  EXPECT_EQ(r.err.find("killing it", r.err.find("killing it") + 1), std::string::npos)
      << "only the stopped worker is killed, not the one working after its session" << r.describe();
  EXPECT_EQ(r.err.find("starting a replacement"), std::string::npos) << r.describe();
  EXPECT_TRUE(process_gone(stopped));
  EXPECT_LT(r.elapsed, 40s) << r.describe();
}

// A worker dies after every worker finished its last step but before any exited: aikido-run starts a replacement,
// which would wait for the finished workers until its timeout. Once a member exits (finished at the version before
// the replacement's), aikido-run stops the replacement and the job ends at once.
TEST(ElasticProcessTest, AReplacementThatTheFinishedWorkersNeverJoinIsStopped) {
  // The workers wait after "done" until this file exists: rank 2 is killed there, and the others exit only once
  // aikido-run has started the replacement.
  const std::string go = temp_path("aikido-linger");
  std::filesystem::remove(go);
  Subprocess job(elastic_job({"-np", "3", "--restart", "--timeout", "60"},
                             {"--epochs", "1", "--step-ms", "1", "--print-every", "20", "--linger-until", go}));
  std::map<long long, long long> pid_by_rank = wait_for_done(job, 3);
  ASSERT_EQ(pid_by_rank.size(), 3u) << job.wait(kBound).describe();
  ASSERT_EQ(::kill(pid_t(pid_by_rank[2]), SIGKILL), 0);
  const bool started = job.wait_for_output(
      [](const std::string&, const std::string& err) { return err.find("starting worker 3") != std::string::npos; },
      60s);
  std::ofstream(go).put('\n');
  const auto r = job.wait(kBound);
  std::filesystem::remove(go);
  ASSERT_TRUE(started) << r.describe();
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_NE(r.err.find("aikido-run: stopping worker 3: it was started for cluster version 1, which worker "),
            std::string::npos)
      << r.describe();
  // Stopped by aikido-run, not ended by its own timeout (60 s) waiting for the finished workers.
  EXPECT_TRUE(events(r.out, "error").empty()) << r.describe();
}

// A worker stuck before it opens its session (here it sleeps; a stopped process is the same) has no heartbeat: the
// others would wait for it to join at every version. aikido-run kills it a connect timeout after its start and, with
// --restart, replaces it.
TEST(ElasticProcessTest, AWorkerStuckBeforeItsSessionIsKilledAndReplaced) {
  const auto r =
      run_process(elastic_job({"-np", "3", "--restart", "--timeout", "20", "--connect-timeout", "4"},
                              {"--epochs", "1", "--step-ms", "1", "--print-every", "20", "--hang-before-session", "1"}),
                  kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_NE(r.err.find("aikido-run: worker 1 (rank 1) has not opened its elastic session 4 s after it started"),
            std::string::npos)
      << r.describe();
  EXPECT_NE(r.err.find("was killed by signal SIGKILL; removing it from the cluster and starting a replacement"),
            std::string::npos)
      << r.describe();
  EXPECT_EQ(current_cluster(r.out).pid_by_rank.size(), 3u) << r.describe();
  expect_equal_parameters(r.out);
  expect_exact_epochs(r.out, 1);
}

TEST(ElasticProcessTest, MaxRestartsBoundsTheReplacements) {
  Subprocess job(elastic_job({"-np", "3", "--restart", "--max-restarts", "1", "--timeout", "20"},
                             {"--epochs", "2", "--step-ms", "4", "--print-every", "2"}));
  long long version = 0;
  for (int kill = 0; kill < 2; ++kill) {
    Cluster cluster;
    ASSERT_TRUE(job.wait_for_output(
        [&](const std::string& out, const std::string&) {
          cluster = current_cluster(out);
          return cluster.version >= version && cluster.step >= 20 + 40 * kill && cluster.pid_by_rank.size() == 3;
        },
        60s))
        << job.wait(kBound).describe();
    ASSERT_EQ(::kill(pid_t(cluster.pid_by_rank[1]), SIGKILL), 0);
    version = cluster.version + 1;
  }
  const auto r = job.wait(kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_EQ(count_of(r.err, "and starting a replacement"), 1) << r.describe();
  EXPECT_NE(r.err.find("not replacing it: the job has started 1 replacement (--max-restarts 1)"), std::string::npos)
      << r.describe();
  EXPECT_EQ(current_cluster(r.out).pid_by_rank.size(), 2u) << r.describe();
  expect_equal_parameters(r.out);
  expect_exact_epochs(r.out, 2);
}

TEST(ElasticProcessTest, AWorkerThatAlwaysFailsDoesNotRestartForEver) {
  const auto r = run_process({kRun, "-np", "2", "--elastic", "--restart", "--max-restarts", "3", "/bin/false"}, kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 1) << r.describe();
  EXPECT_EQ(count_of(r.err, "and starting a replacement"), 3) << r.describe();
  EXPECT_NE(r.err.find("not replacing it: the job has started 3 replacements (--max-restarts 3)"), std::string::npos)
      << r.describe();
  EXPECT_NE(r.err.find("aikido-run: no worker is left in the cluster"), std::string::npos) << r.describe();
  EXPECT_TRUE(std::regex_search(r.err, std::regex("aikido-run: worker [0-9]+ exited with status 1"))) << r.describe();
}

TEST(ElasticProcessTest, AikidoCtlShowsAndResizesTheJob) {
  const std::string control = temp_path("aikido-ctl-test");
  // Runs until the test stops it, so that every request meets a running job.
  Subprocess job(elastic_job({"-np", "2", "--max-np", "4", "--control-file", control},
                             {"--epochs", "1000", "--step-ms", "5", "--print-every", "2"}));
  ASSERT_TRUE(job.wait_for_output(
      [&](const std::string& out, const std::string&) { return current_cluster(out).step >= 4; }, 60s));
  struct stat st {};
  ASSERT_EQ(::stat(control.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);

  auto status = run_process({kCtl, "--control-file", control, "status"}, 30s);
  ASSERT_TRUE(status.exited && status.exit_code == 0) << status.describe();
  EXPECT_NE(status.out.find("cluster version 0 (initial): 2 workers, min 1, max 4"), std::string::npos) << status.out;
  EXPECT_NE(status.out.find("rank 1: worker 1"), std::string::npos) << status.out;

  auto too_many = run_process({kCtl, "--control-file", control, "resize", "5"}, 30s);
  EXPECT_TRUE(too_many.exited && too_many.exit_code == 1) << too_many.describe();
  EXPECT_NE(too_many.err.find("the job allows 1 to 4"), std::string::npos) << too_many.describe();
  auto bad = run_process({kCtl, "--control-file", control, "resize", "zero"}, 30s);
  EXPECT_TRUE(bad.exited && bad.exit_code == 2) << bad.describe();

  // A request without the secret is refused.
  const std::string forged = temp_path("aikido-ctl-forged");
  {
    std::ifstream in(control);
    std::ofstream out(forged);
    std::string line;
    while (std::getline(in, line)) out << (line.starts_with("secret=") ? "secret=00112233" : line) << "\n";
  }
  auto refused = run_process({kCtl, "--control-file", forged, "resize", "3"}, 30s);
  std::filesystem::remove(forged);
  EXPECT_TRUE(refused.exited && refused.exit_code == 1) << refused.describe();
  EXPECT_NE(refused.err.find("secret"), std::string::npos) << refused.describe();

  for (int n : {3, 1, 4}) {
    auto resized = run_process({kCtl, "--control-file", control, "resize", std::to_string(n)}, 30s);
    ASSERT_TRUE(resized.exited && resized.exit_code == 0) << resized.describe();
    ASSERT_TRUE(job.wait_for_output(
        [&](const std::string& out, const std::string&) {
          const Cluster c = current_cluster(out);
          return int(c.pid_by_rank.size()) == n && (n != 1 || c.step >= 0);
        },
        60s))
        << "the job did not reach " << n << " workers\n"
        << job.wait(kBound).describe();
    if (n == 1) {
      // A worker removed by the resize cannot come back: its id is not in the current version.
      std::map<std::string, std::string> values;
      std::ifstream in(control);
      std::string line;
      while (std::getline(in, line)) {
        const auto eq = line.find('=');
        if (eq != std::string::npos) values[line.substr(0, eq)] = line.substr(eq + 1);
      }
      Subprocess::Options options;
      options.set_env = {"AIKIDO_ELASTIC=1",
                         "AIKIDO_WORKER_ID=1",
                         "AIKIDO_STORE_ADDR=" + values["store"],
                         "AIKIDO_SECRET=" + values["secret"],
                         "AIKIDO_JOB_ID=" + values["job"],
                         "AIKIDO_TIMEOUT=10"};
      auto stale = run_process({kWorker}, 30s, options);
      EXPECT_TRUE(stale.exited && stale.exit_code == 4) << stale.describe();
      EXPECT_NE(stale.out.find("worker 1 is not a member of cluster version"), std::string::npos) << stale.describe();
    }
  }
  // An epoch at 4 workers, then stop the job.
  ASSERT_TRUE(job.wait_for_output(
      [&](const std::string& out, const std::string&) {
        for (const auto& e : events(out, "epoch")) {
          if (e["workers"] == "4") return true;
        }
        return false;
      },
      60s));
  job.send_signal(SIGINT);
  const auto r = job.wait(kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 128 + SIGINT) << r.describe();
  EXPECT_FALSE(std::filesystem::exists(control)) << "aikido-run leaves its control file behind";
  expect_equal_parameters(r.out);
  expect_exact_epochs(r.out, -1);
}

TEST(ElasticProcessTest, AnElasticJobOverTlsGrowsThroughAikidoCtl) {
  const std::string control = temp_path("aikido-ctl-tls");
  // TCP between the workers, so that data connections and the store all run TLS.
  Subprocess job(elastic_job({"-np", "2", "--max-np", "3", "--tls", "--transport", "tcp", "--control-file", control},
                             {"--epochs", "1000", "--step-ms", "5", "--print-every", "2"}));
  ASSERT_TRUE(job.wait_for_output(
      [&](const std::string& out, const std::string&) { return current_cluster(out).step >= 4; }, 60s));
  std::string text;
  {
    std::ifstream in(control);
    text.assign(std::istreambuf_iterator<char>(in), {});
  }
  EXPECT_NE(text.find("\ntls=1\n"), std::string::npos) << text;
  auto resized = run_process({kCtl, "--control-file", control, "resize", "3"}, 30s);
  ASSERT_TRUE(resized.exited && resized.exit_code == 0) << resized.describe();
  ASSERT_TRUE(job.wait_for_output(
      [&](const std::string& out, const std::string&) {
        for (const auto& e : events(out, "epoch")) {
          if (e["workers"] == "3") return true;
        }
        return false;
      },
      60s))
      << job.wait(kBound).describe();
  // aikido-ctl without TLS is refused with a reason.
  const std::string plain = temp_path("aikido-ctl-plain");
  {
    std::ofstream out(plain);
    std::istringstream in(text);
    std::string line;
    while (std::getline(in, line)) out << (line == "tls=1" ? "tls=0" : line) << "\n";
  }
  auto refused = run_process({kCtl, "--control-file", plain, "status"}, 30s);
  std::filesystem::remove(plain);
  EXPECT_TRUE(refused.exited && refused.exit_code == 1) << refused.describe();
  EXPECT_NE(refused.err.find("requires TLS"), std::string::npos) << refused.describe();
  job.send_signal(SIGINT);
  const auto r = job.wait(kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 128 + SIGINT) << r.describe();
  expect_equal_parameters(r.out);
  expect_exact_epochs(r.out, -1);
}

// A job resumed from `checkpoint` (written by the job whose output is `first_out`, at a commit of step `at_most` or
// before) starts at that commit and ends exactly where an uninterrupted job ends: every epoch's samples once, the
// same parameters at the same step.
void expect_resumes_like_an_uninterrupted_job(const std::string& checkpoint, const std::vector<std::string>& training,
                                              const std::string& first_out, long long at_most) {
  const auto resumed = run_process(elastic_job({"-np", "2", "--resume", checkpoint}, training), kBound);
  ASSERT_TRUE(resumed.exited && resumed.exit_code == 0) << resumed.describe();
  const auto first = events(resumed.out, "changed");
  ASSERT_EQ(first.size(), 2u) << "both workers start from the checkpoint\n" << resumed.describe();
  EXPECT_GE(first[0].num("step"), 8) << "resumed at the last commit, not at step 0";
  EXPECT_LE(first[0].num("step"), at_most);
  expect_exact_epochs(first_out + resumed.out, 2);

  const auto whole = run_process(elastic_job({"-np", "2"}, training), kBound);
  ASSERT_TRUE(whole.exited && whole.exit_code == 0) << whole.describe();
  const auto done = events(resumed.out, "done"), done_whole = events(whole.out, "done");
  ASSERT_EQ(done.size(), 2u) << resumed.describe();
  ASSERT_EQ(done_whole.size(), 2u) << whole.describe();
  EXPECT_EQ(done[0]["params"], done_whole[0]["params"]) << "the resumed job ends elsewhere than an uninterrupted one";
  EXPECT_EQ(done[0]["step"], done_whole[0]["step"]);
}

// Below --min-np the job stops after writing its last commit; a new job started with --resume continues from it and
// ends exactly where a job that was never interrupted ends: every epoch's samples once, the same parameters.
TEST(ElasticProcessTest, BelowTheMinimumTheJobWritesACheckpointThatANewJobResumesFrom) {
  const std::string checkpoint = temp_path("aikido-checkpoint");
  std::filesystem::remove(checkpoint);
  const std::vector<std::string> training = {"--epochs", "2", "--step-ms", "4", "--print-every", "2"};
  Subprocess job(elastic_job({"-np", "2", "--min-np", "2", "--timeout", "2", "--checkpoint", checkpoint}, training));
  Cluster cluster = wait_for_step(job, 10, 2);
  ASSERT_TRUE(cluster.step >= 10 && cluster.pid_by_rank.size() == 2u) << job.wait(kBound).describe();
  ASSERT_EQ(::kill(pid_t(cluster.pid_by_rank[1]), SIGKILL), 0);
  const auto r = job.wait(kBound);
  ASSERT_TRUE(r.exited && r.exit_code != 0) << r.describe();
  EXPECT_NE(r.out.find("(--min-np); no replacement joined within 2 s"), std::string::npos) << r.describe();
  {
    std::ifstream in(checkpoint, std::ios::binary);
    ASSERT_TRUE(in.good()) << "no checkpoint at " << checkpoint << "\n" << r.describe();
    std::string magic(8, '\0');
    in.read(magic.data(), 8);
    EXPECT_EQ(magic, "AIKIDOCK");
  }

  // A program that registers other state is refused on every worker, with the reason.
  auto other = training;
  other.insert(other.end(), {"--dim", "1024"});
  const auto refused = run_process(elastic_job({"-np", "2", "--resume", checkpoint}, other), kBound);
  EXPECT_TRUE(refused.exited && refused.exit_code != 0) << refused.describe();
  EXPECT_NE(refused.out.find("does not fit this program's registered state: 'model' holds 16384 bytes where this "
                             "program registered 4096"),
            std::string::npos)
      << refused.describe();

  // The checkpoint holds a commit of a step that rank 1 took part in: at most the last step it printed plus the
  // steps it may take before its next print (--print-every 2).
  long long last_of_rank_1 = -1;
  for (const auto& e : events(r.out, "step")) {
    if (e.num("pid") == cluster.pid_by_rank[1]) last_of_rank_1 = std::max(last_of_rank_1, e.num("step"));
  }
  expect_resumes_like_an_uninterrupted_job(checkpoint, training, r.out, last_of_rank_1 + 2);
  std::filesystem::remove(checkpoint);
}

// Stopped from outside (Ctrl-C, a scheduler's SIGTERM), aikido-run first has rank 0 write its newest commit to
// --checkpoint; a new job resumes from it.
TEST(ElasticProcessTest, ASignalledJobWritesACheckpointThatANewJobResumesFrom) {
  const std::string checkpoint = temp_path("aikido-checkpoint-signal");
  std::filesystem::remove(checkpoint);
  const std::vector<std::string> training = {"--epochs", "2", "--step-ms", "4", "--print-every", "2"};
  Subprocess job(elastic_job({"-np", "2", "--checkpoint", checkpoint}, training));
  Cluster cluster = wait_for_step(job, 10, 2);
  ASSERT_TRUE(cluster.step >= 10 && cluster.pid_by_rank.size() == 2u) << job.wait(kBound).describe();
  ASSERT_EQ(::kill(job.pid(), SIGTERM), 0);
  const auto r = job.wait(kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 128 + SIGTERM) << r.describe();
  EXPECT_NE(r.err.find("aikido-run: rank 0: wrote the last commit ("), std::string::npos) << r.describe();
  expect_resumes_like_an_uninterrupted_job(checkpoint, training, r.out, current_cluster(r.out).step);
  std::filesystem::remove(checkpoint);
}

}  // namespace
}  // namespace aikido::testing
