// Runs the real aikido-run binary on launcher_fixture and checks what it promises: environment, prefixed output,
// exit statuses, stopping workers, flag validation.
#include <gtest/gtest.h>
#include <sched.h>
#include <signal.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "subprocess.hpp"

namespace aikido::testing {
namespace {

using namespace std::chrono_literals;

const std::string kRun = AIKIDO_RUN_PATH;
const std::string kFixture = LAUNCHER_FIXTURE_PATH;
// Bound of every launcher run; the runs themselves take well under a second unless they must wait for a grace
// period (3 s).
constexpr auto kBound = 60s;

int cores() {
  cpu_set_t cpus;
  CPU_ZERO(&cpus);
  return ::sched_getaffinity(0, sizeof(cpus), &cpus) == 0 ? CPU_COUNT(&cpus) : 1;
}

// What aikido-run sets for `np` workers when the environment sets nothing: the fixture's "omp= blas= malloc=".
std::string default_threads(int np) {
  const std::string threads = std::to_string(std::max(1, cores() / np));
  return "omp=" + threads + " blas=1" +
         " malloc=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296";
}

std::vector<std::string> launch(std::vector<std::string> args) {
  args.insert(args.begin(), kRun);
  return args;
}

TEST(LauncherTest, HelpPrintsUsage) {
  const auto r = run_process(launch({"--help"}), kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_NE(r.out.find("usage: aikido-run -np N"), std::string::npos) << r.describe();
  EXPECT_NE(r.out.find("OPENBLAS_NUM_THREADS=1"), std::string::npos) << r.describe();
  EXPECT_NE(r.out.find("GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432"), std::string::npos) << r.describe();
}

struct BadCommandLine {
  std::vector<std::string> args;
  std::string message;
};

TEST(LauncherTest, BadCommandLinesExitWithStatus2) {
  const std::vector<BadCommandLine> cases = {
      {{}, "missing -np"},
      {{kFixture, "env"}, "missing -np"},
      {{"-np"}, "-np needs a value"},
      {{"-np", "0", kFixture}, "'0' is not a positive integer"},
      {{"-np", "-3", kFixture}, "'-3' is not a positive integer"},
      {{"-np", "two", kFixture}, "'two' is not a positive integer"},
      {{"-np", "2x", kFixture}, "'2x' is not a positive integer"},
      {{"-np", "2", "--bogus", kFixture}, "unknown option '--bogus'"},
      {{"-np", "2", "--topology", "mesh", kFixture}, "unknown topology 'mesh'"},
      {{"-np", "2", "--transport=carrier-pigeon", kFixture}, "unknown transport 'carrier-pigeon'"},
      {{"-np", "2", "--timeout", "-1", kFixture}, "--timeout '-1' is not a positive number"},
      {{"-np", "2", "--segment-bytes", "lots", kFixture}, "--segment-bytes 'lots'"},
      {{"-np", "2", "--segment-bytes", "4", kFixture}, "--segment-bytes '4' is not a number of bytes from 8"},
      {{"-np", "2", "--streams", "9", kFixture}, "--streams '9' is not a number of TCP streams from 1 to 8"},
      {{"-np", "2", "--tls-cert", "/etc/hostname", kFixture}, "needs all of --tls-cert, --tls-key and --tls-ca"},
      {{"-np", "2", "--tls=1", kFixture}, "option --tls takes no value"},
      {{"-np", "2"}, "missing PROGRAM"},
      {{"-np", "2", "aikido-no-such-program"}, "program 'aikido-no-such-program' not found in PATH"},
      {{"-np", "2", "./aikido-no-such-program"}, "program './aikido-no-such-program' does not exist"},
      {{"-np", "2", "/dev/null"}, "program '/dev/null' is not an executable file"},
      {{"-np", "2", "--elastic", "--min-np", "3", kFixture}, "--min-np 3 is above -np 2"},
      {{"-np", "2", "--elastic", "--max-np", "1", kFixture}, "--max-np 1 is below -np 2"},
      {{"-np", "2", "--elastic", "--min-np", "0", kFixture}, "--min-np '0' is not a positive integer"},
      {{"-np", "2", "--restart", kFixture}, "--restart needs --elastic"},
      {{"-np", "2", "--max-np", "4", kFixture}, "--max-np needs --elastic"},
      {{"-np", "2", "--control-file", "f", kFixture}, "--control-file needs --elastic"},
      {{"-np", "2", "--elastic=yes", kFixture}, "--elastic takes no value"},
      {{"-np", "2", "--elastic", "--heartbeat-timeout", "0", kFixture}, "--heartbeat-timeout '0' is not a positive"},
      {{"-np", "2", "--elastic", "--max-restarts", "3", kFixture}, "--max-restarts needs --restart"},
      {{"-np", "2", "--max-restarts", "3", kFixture}, "--max-restarts needs --elastic"},
      {{"-np", "2", "--elastic", "--restart", "--max-restarts", "-1", kFixture},
       "--max-restarts '-1' is not a number of replacements"},
      {{"-np", "2", "--elastic", "--resume", "/nonexistent/aikido.ck", kFixture},
       "--resume /nonexistent/aikido.ck: cannot read it"},
      {{"-np", "2", "--resume", "/dev/null", kFixture}, "--resume needs --elastic"},
      // The timeout hierarchy: heartbeat and host lease below the collective timeout, store requests within it.
      {{"-np", "2", "--elastic", "--heartbeat-timeout", "10", "--timeout", "5", kFixture},
       "--heartbeat-timeout 10 s is not shorter than the collective timeout (5 s)"},
      {{"-np", "2", "--elastic", "--heartbeat-timeout", "0.2", kFixture}, "shorter than two heartbeats"},
      {{"-np", "2", "--elastic", "--timeout", "0.6", kFixture}, "shorter than two heartbeats"},
      {{"-np", "2", "--store-timeout", "10", "--timeout", "5", kFixture},
       "the store timeout (10 s) is longer than the collective timeout (5 s)"},
      {{"-np", "2", "--connect-timeout", "soon", kFixture}, "--connect-timeout 'soon' is not a positive number"},
      {{"--nnodes", "2", "--store", "etcd://127.0.0.1:2379", "--job-id", "j", "--host-timeout", "90", kFixture},
       "--host-timeout 90 s is not shorter than the collective timeout (60 s)"},
      {{"-np", "2", "--ranks-filter", "x", kFixture}, "--ranks-filter 'x' is not a list of ranks"},
      {{"-np", "2", "--ranks-filter", "3-1", kFixture}, "--ranks-filter '3-1' is not a list of ranks"},
      {{"-np", "2", "--ranks-filter", "0", "--quiet-ranks", "1", kFixture}, "give --ranks-filter or --quiet-ranks"},
      {{"-np", "2", "--log-dir", "", kFixture}, "--log-dir needs a folder"},
  };
  for (const auto& c : cases) {
    const auto r = run_process(launch(c.args), kBound);
    EXPECT_TRUE(r.exited && r.exit_code == 2) << "args: " << ::testing::PrintToString(c.args) << "\n" << r.describe();
    EXPECT_NE(r.err.find("aikido-run: "), std::string::npos) << r.describe();
    EXPECT_NE(r.err.find(c.message), std::string::npos)
        << "expected '" << c.message << "' for " << ::testing::PrintToString(c.args) << "\n"
        << r.describe();
    EXPECT_TRUE(r.out.empty()) << r.describe();
  }
}

// Settings that workers would inherit are checked like the flags, before any worker starts: a worker that met them
// would fail (or, for AIKIDO_LOG_LEVEL, ignore them) on its own.
TEST(LauncherTest, BadSettingsInTheEnvironmentExitWithStatus2) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"AIKIDO_TIMEOUT=abc", "AIKIDO_TIMEOUT='abc' is not a positive number of seconds"},
      {"AIKIDO_LOG_LEVEL=verbose", "AIKIDO_LOG_LEVEL='verbose' is not error, warn, info or debug"},
      {"AIKIDO_SEGMENT_BYTES=4", "AIKIDO_SEGMENT_BYTES='4' is not an integer in [8, "},
      {"AIKIDO_TRANSPORT=pigeon", "AIKIDO_TRANSPORT='pigeon': unknown transport 'pigeon'"},
      {"AIKIDO_METRICS_INTERVAL=often", "AIKIDO_METRICS_INTERVAL='often' is not a positive number of seconds"},
      {"AIKIDO_LOCAL_CPUS=all", "AIKIDO_LOCAL_CPUS='all' is not an integer"},
      {"AIKIDO_CONNECT_TIMEOUT=soon", "AIKIDO_CONNECT_TIMEOUT='soon' is not a positive number of seconds"},
      {"AIKIDO_STORE_TIMEOUT=-2", "AIKIDO_STORE_TIMEOUT='-2' is not a positive number of seconds"},
  };
  for (const auto& [setting, message] : cases) {
    const auto r = run_process(launch({"-np", "2", kFixture, "env"}), kBound, Subprocess::Options{{setting}, ""});
    EXPECT_TRUE(r.exited && r.exit_code == 2) << setting << "\n" << r.describe();
    EXPECT_NE(r.err.find("aikido-run: " + message), std::string::npos) << setting << "\n" << r.describe();
    EXPECT_TRUE(r.out.empty()) << "a worker started despite " << setting << "\n" << r.describe();
  }
  // A flag replaces the setting it overrides, and settings only aikido-run gives are not inherited: no error.
  const auto r = run_process(launch({"-np", "1", "--timeout", "5", kFixture, "env"}), kBound,
                             Subprocess::Options{{"AIKIDO_TIMEOUT=abc", "AIKIDO_ELASTIC=yes"}, ""});
  EXPECT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_NE(r.out.find("timeout=5 "), std::string::npos) << r.describe();
}

// Started by other means (mpirun, by hand), a worker refuses bad settings itself, when it creates its Peer, with the
// same message.
TEST(LauncherTest, AWorkerRefusesBadSettingsWhenItCreatesItsPeer) {
  auto r = run_process({kFixture, "peer"}, kBound, Subprocess::Options{{"AIKIDO_LOG_LEVEL=verbose"}, ""});
  EXPECT_TRUE(r.exited && r.exit_code == 70) << r.describe();
  EXPECT_NE(r.err.find("AIKIDO_LOG_LEVEL='verbose' is not error, warn, info or debug; fix or unset it"),
            std::string::npos)
      << r.describe();
  r = run_process({kFixture, "peer"}, kBound, Subprocess::Options{{"AIKIDO_LOG_LEVEL=debug"}, ""});
  EXPECT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_EQ(r.out, "peer of 1 ranks\n") << r.describe();
}

TEST(LauncherTest, SetsTheEnvironmentAndPrefixesLines) {
  const auto r = run_process(launch({"-np", "3", "--topology", "tree", "--timeout", "7.5", "--transport", "tcp",
                                     "--segment-bytes", "4096", "--streams", "3", kFixture, "env"}),
                             kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  std::string store, job;
  for (int rank = 0; rank < 3; ++rank) {
    const std::string p = "[" + std::to_string(rank) + "] ";
    const auto lines = lines_with_prefix(r.out, p);
    ASSERT_EQ(lines.size(), 3u) << r.describe();
    EXPECT_EQ(lines[0],
              p + "rank=" + std::to_string(rank) + " size=3 local_rank=" + std::to_string(rank) +
                  " local_size=3 local_cpus=" + std::to_string(cores()));  // the launcher's CPUs, not a bound worker's
    std::smatch m;
    ASSERT_TRUE(std::regex_match(
        lines[1], m, std::regex(R"(\[\d\] host=\S+ store=(127\.0\.0\.1:\d+) secret_bytes=64 job=(\w+) version=0)")))
        << lines[1];
    // Every rank of the job shares the store and the job id.
    if (rank == 0) {
      store = m[1];
      job = m[2];
    }
    EXPECT_EQ(m[1], store);
    EXPECT_EQ(m[2], job);
    EXPECT_EQ(lines[2], p + "topology=tree timeout=7.5 transport=tcp segment=4096 streams=3 " + default_threads(3));
    EXPECT_EQ(lines_with_prefix(r.err, p), std::vector<std::string>{p + "stderr of rank " + std::to_string(rank)})
        << r.describe();
  }
}

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// The "event" values of events.jsonl, in order (each line one JSON object; the key is looked up textually).
std::vector<std::string> event_kinds(const std::string& jsonl) {
  std::vector<std::string> kinds;
  const std::regex kind(R"re("event":"(\w+)")re");
  std::istringstream in(jsonl);
  for (std::string line; std::getline(in, line);) {
    std::smatch m;
    if (std::regex_search(line, m, kind)) kinds.push_back(m[1]);
  }
  return kinds;
}

TEST(LauncherTest, LogDirGetsEachRanksLinesAndTheJobsEvents) {
  const auto dir = std::filesystem::temp_directory_path() / ("aikido-logdir-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  const auto r = run_process(launch({"-np", "2", "--log-dir", (dir / "logs").string(), kFixture, "env"}), kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_EQ(lines_with_prefix(r.out, "[1] ").size(), 3u) << r.describe();  // the console still gets everything
  for (int rank = 0; rank < 2; ++rank) {
    const std::string log = read_file(dir / "logs" / ("rank-" + std::to_string(rank) + ".log"));
    EXPECT_EQ(log.find("rank=" + std::to_string(rank) + " size=2 "), 0u) << log;  // unlabelled
    EXPECT_NE(log.find("\nstderr of rank " + std::to_string(rank) + "\n"), std::string::npos) << log;
    EXPECT_EQ(log.find("["), std::string::npos) << log;
  }
  const auto kinds = event_kinds(read_file(dir / "logs" / "events.jsonl"));
  ASSERT_GE(kinds.size(), 6u);
  EXPECT_EQ(kinds.front(), "job_started");
  EXPECT_EQ(std::count(kinds.begin(), kinds.end(), "worker_started"), 2);
  EXPECT_EQ(std::count(kinds.begin(), kinds.end(), "worker_exited"), 2);
  EXPECT_EQ(kinds.back(), "job_finished");
  std::filesystem::remove_all(dir);
}

TEST(LauncherTest, EventsRecordAFailureAndAikidoRunsMessages) {
  const auto dir = std::filesystem::temp_directory_path() / ("aikido-logdir-f-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  const auto r = run_process(launch({"-np", "2", "--log-dir", dir.string(), kFixture, "exit", "1", "3"}), kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 3) << r.describe();
  const std::string events = read_file(dir / "events.jsonl");
  EXPECT_NE(events.find(R"("event":"message")"), std::string::npos) << events;
  EXPECT_NE(events.find("aikido-run: rank 1 exited with status 3"), std::string::npos) << events;
  EXPECT_TRUE(std::regex_search(events, std::regex(R"re("event":"job_finished".*"state":"failed".*"status":3)re")))
      << events;
  std::filesystem::remove_all(dir);
}

TEST(LauncherTest, RanksFilterShowsOnlyThoseRanksOnTheConsole) {
  const auto dir = std::filesystem::temp_directory_path() / ("aikido-filter-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  auto r = run_process(launch({"-np", "3", "--ranks-filter", "1", "--log-dir", dir.string(), kFixture, "env"}), kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_EQ(lines_with_prefix(r.out, "[1] ").size(), 3u) << r.describe();
  EXPECT_TRUE(lines_with_prefix(r.out, "[0] ").empty()) << r.describe();
  EXPECT_TRUE(lines_with_prefix(r.err, "[2] ").empty()) << r.describe();
  EXPECT_NE(read_file(dir / "rank-0.log").find("rank=0 "), std::string::npos);  // the log keeps every rank
  r = run_process(launch({"-np", "3", "--quiet-ranks", "0-1", kFixture, "env"}), kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_EQ(lines_with_prefix(r.out, "[2] ").size(), 3u) << r.describe();
  EXPECT_TRUE(lines_with_prefix(r.out, "[0] ").empty() && lines_with_prefix(r.out, "[1] ").empty()) << r.describe();
  std::filesystem::remove_all(dir);
}

TEST(LauncherTest, InheritsSettingsThatNoFlagOverrides) {
  Subprocess::Options options;
  options.set_env = {"AIKIDO_TOPOLOGY=star",    "AIKIDO_TIMEOUT=9",  "AIKIDO_RANK=17",
                     "AIKIDO_SECRET=guessable", "OMP_NUM_THREADS=4", "GLIBC_TUNABLES=glibc.malloc.arena_max=2"};
  const auto r = run_process(launch({"-np", "2", "--timeout", "3", kFixture, "env"}), kBound, options);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  for (int rank = 0; rank < 2; ++rank) {
    const std::string p = "[" + std::to_string(rank) + "] ";
    const auto lines = lines_with_prefix(r.out, p);
    ASSERT_EQ(lines.size(), 3u) << r.describe();
    EXPECT_EQ(lines[0].find(p + "rank=" + std::to_string(rank) + " "), 0u) << lines[0];
    EXPECT_NE(lines[1].find("secret_bytes=64 "), std::string::npos) << lines[1];
    const std::string blas = "blas=1";
    EXPECT_EQ(lines[2], p + "topology=star timeout=3 transport=unset segment=unset streams=unset omp=4 " + blas +
                            " malloc=glibc.malloc.arena_max=2");
  }
}

TEST(LauncherTest, PassesArgumentsThrough) {
  const auto r = run_process(launch({"-np", "1", kFixture, "args", "-np", "--help", "two words", ""}), kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_EQ(r.out, "[0] arg 1: -np\n[0] arg 2: --help\n[0] arg 3: two words\n[0] arg 4: \n") << r.describe();
}

TEST(LauncherTest, FindsProgramsInPathAndByRelativePath) {
  const std::filesystem::path fixture(kFixture);
  Subprocess::Options in_path;
  in_path.set_env = {"PATH=/nonexistent-dir:" + fixture.parent_path().string()};
  auto r = run_process(launch({"-np", "2", fixture.filename().string(), "args", "x"}), kBound, in_path);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_EQ(count_of(r.out, "arg 1: x\n"), 2) << r.describe();

  Subprocess::Options relative;
  relative.cwd = fixture.parent_path().string();
  r = run_process(launch({"-np", "2", "./" + fixture.filename().string(), "args", "y"}), kBound, relative);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_EQ(count_of(r.out, "arg 1: y\n"), 2) << r.describe();
}

TEST(LauncherTest, FlushesAPartialLastLine) {
  const auto r = run_process(launch({"-np", "2", kFixture, "partial"}), kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_EQ(count_of(r.out, "[0] no newline\n"), 1) << r.describe();
  EXPECT_EQ(count_of(r.out, "[1] no newline\n"), 1) << r.describe();
}

TEST(LauncherTest, KeepsLinesWholeUnderLoad) {
  constexpr int kRanks = 4;
  constexpr int kLines = 5000;
  const auto r =
      run_process(launch({"-np", std::to_string(kRanks), kFixture, "lines", std::to_string(kLines)}), kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.err;
  std::vector<int> next(kRanks, 0);
  const std::regex line(R"(\[(\d)\] line (\d) (\d+))");
  std::istringstream in(r.out);
  for (std::string text; std::getline(in, text);) {
    std::smatch m;
    ASSERT_TRUE(std::regex_match(text, m, line)) << "mangled line: '" << text << "'";
    const int rank = std::stoi(m[1]);
    ASSERT_EQ(rank, std::stoi(m[2])) << text;
    ASSERT_EQ(std::stoi(m[3]), next[rank]) << "lines of rank " << rank << " out of order: " << text;
    ++next[rank];
  }
  for (int rank = 0; rank < kRanks; ++rank) EXPECT_EQ(next[rank], kLines) << "rank " << rank;
}

TEST(LauncherTest, WorkersRendezvousThroughTheStore) {
  const auto r = run_process(launch({"-np", "4", kFixture, "store"}), kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  for (int rank = 0; rank < 4; ++rank) {
    EXPECT_EQ(count_of(r.out, "[" + std::to_string(rank) + "] store ok\n"), 1) << r.describe();
  }
}

TEST(LauncherTest, WorkersConnectOverTls) {
  // TCP between the workers, so that every connection (data and store) goes through TLS.
  const auto r = run_process(launch({"-np", "3", "--tls", "--transport", "tcp", kFixture, "allreduce"}), kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  for (int rank = 0; rank < 3; ++rank) {
    EXPECT_EQ(count_of(r.out, "[" + std::to_string(rank) + "] allreduce ok\n"), 1) << r.describe();
  }
  // A worker without TLS cannot reach the job's TLS store: it says why.
  const auto plain = run_process(launch({"-np", "2", "--tls", kFixture, "env-store-plain"}), kBound);
  EXPECT_FALSE(plain.exited && plain.exit_code == 0) << plain.describe();
  EXPECT_NE(plain.out.find("requires TLS"), std::string::npos) << plain.describe();
}

TEST(LauncherTest, SucceedsWhenEveryWorkerSucceeds) {
  const auto r = run_process(launch({"-np", "3", "true"}), kBound);
  EXPECT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_TRUE(r.err.empty()) << r.describe();
}

TEST(LauncherTest, FirstFailingStatusPropagatesAndStopsTheOthers) {
  // Ranks 0 and 2 sleep for two minutes: the launcher returning early proves it stopped them.
  const auto r = run_process(launch({"-np", "3", kFixture, "exit", "1", "7"}), kBound);
  ASSERT_FALSE(r.timed_out) << r.describe();
  EXPECT_TRUE(r.exited && r.exit_code == 7) << r.describe();
  EXPECT_NE(r.err.find("aikido-run: rank 1 exited with status 7"), std::string::npos) << r.describe();
  EXPECT_EQ(count_of(r.out, "ready pid="), 3) << r.describe();
  EXPECT_LT(r.elapsed, 30s) << r.describe();
}

TEST(LauncherTest, WorkerKilledBySignalGives128PlusSignal) {
  const auto r = run_process(launch({"-np", "3", kFixture, "signal", "2", std::to_string(SIGKILL)}), kBound);
  ASSERT_FALSE(r.timed_out) << r.describe();
  EXPECT_TRUE(r.exited && r.exit_code == 128 + SIGKILL) << r.describe();
  EXPECT_NE(r.err.find("aikido-run: rank 2 killed by signal SIGKILL"), std::string::npos) << r.describe();
  EXPECT_LT(r.elapsed, 30s) << r.describe();
}

TEST(LauncherTest, KillsWorkersThatIgnoreSigterm) {
  const auto r = run_process(launch({"-np", "2", kFixture, "exit-ignore", "0", "5"}), kBound);
  ASSERT_FALSE(r.timed_out) << r.describe();
  EXPECT_TRUE(r.exited && r.exit_code == 5) << r.describe();
  EXPECT_NE(r.err.find("SIGKILL"), std::string::npos) << r.describe();
  EXPECT_LT(r.elapsed, 30s) << r.describe();
}

// Starts `ranks` sleeping workers, sends `sig` to the launcher once all are running, and checks the outcome.
void expect_signal_stops_everything(int sig, int expected_status) {
  Subprocess launcher(launch({"-np", "3", kFixture, "sleep", "120"}));
  ASSERT_TRUE(launcher.wait_for_output(
      [](const std::string& out, const std::string&) { return count_of(out, "ready pid=") == 3; }, kBound))
      << "the workers did not start";
  launcher.send_signal(sig);
  const auto r = launcher.wait(kBound);
  ASSERT_FALSE(r.timed_out) << r.describe();
  EXPECT_TRUE(r.exited && r.exit_code == expected_status) << r.describe();
  EXPECT_NE(r.err.find("aikido-run: received"), std::string::npos) << r.describe();
  EXPECT_LT(r.elapsed, 30s) << r.describe();
  // The launcher waits for its workers before it exits: none of them may be left running.
  std::smatch m;
  std::string rest = r.out;
  const std::regex pid_pattern(R"(ready pid=(\d+))");
  while (std::regex_search(rest, m, pid_pattern)) {
    const pid_t pid = pid_t(std::stol(m[1]));
    EXPECT_NE(::kill(pid, 0), 0) << "worker " << pid << " still runs";
    rest = m.suffix();
  }
}

// A worker's lines reach aikido-run's output while the worker runs: its standard output is a terminal, which C stdio
// flushes line by line. Into a pipe, printf's line would wait in the buffer until the worker exits (and a worker
// killed by SIGTERM, as here, would lose it).
TEST(LauncherTest, AWorkersLinesArriveWhileItRuns) {
  Subprocess launcher(launch({"-np", "2", kFixture, "tick"}));
  const bool arrived = launcher.wait_for_output(
      [](const std::string& out, const std::string&) { return count_of(out, "] tick\n") == 2; }, 30s);
  launcher.send_signal(SIGTERM);
  const auto r = launcher.wait(kBound);
  ASSERT_TRUE(arrived) << "the workers' lines did not arrive while they ran\n" << r.describe();
  // Bytes unchanged (no "\r\n" from the terminal); the two workers' lines come in either order.
  EXPECT_TRUE(r.out == "[0] tick\n[1] tick\n" || r.out == "[1] tick\n[0] tick\n") << r.describe();
  EXPECT_TRUE(r.exited && r.exit_code == 143) << r.describe();
}

// --stdout pipe gives workers a pipe instead: the lines still arrive, whole, when the workers exit.
TEST(LauncherTest, StdoutPipeGivesWorkersAPipe) {
  const auto r = run_process(launch({"-np", "2", "--stdout", "pipe", kFixture, "partial"}), kBound);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_EQ(count_of(r.out, "[0] no newline\n"), 1) << r.describe();
  EXPECT_EQ(count_of(r.out, "[1] no newline\n"), 1) << r.describe();
  const auto bad = run_process(launch({"-np", "2", "--stdout", "file", kFixture, "partial"}), kBound);
  EXPECT_TRUE(bad.exited && bad.exit_code == 2) << bad.describe();
  EXPECT_NE(bad.err.find("--stdout expects tty or pipe"), std::string::npos) << bad.describe();
}

// The CPUs this test may run on, which aikido-run inherits.
std::vector<int> allowed_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int> cpus;
  if (::sched_getaffinity(0, sizeof set, &set) != 0) return cpus;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &set)) cpus.push_back(cpu);
  }
  return cpus;
}

std::string cpu_list(std::vector<int>::const_iterator begin, std::vector<int>::const_iterator end) {
  std::string text;
  for (auto it = begin; it != end; ++it) text += (text.empty() ? "" : ",") + std::to_string(*it);
  return text;
}

// What each worker of `args` (ending in the fixture's affinity mode) says it may run on, by output label.
std::map<std::string, std::string> worker_cpus(const std::vector<std::string>& args) {
  const auto r = run_process(launch(args), kBound);
  EXPECT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  std::map<std::string, std::string> cpus;
  const std::regex line(R"(\[([^\]]+)\] cpus=([0-9,]+))");
  for (auto it = std::sregex_iterator(r.out.begin(), r.out.end(), line); it != std::sregex_iterator(); ++it) {
    cpus[(*it)[1]] = (*it)[2];
  }
  return cpus;
}

// --bind-to core (the default): with no more workers than CPUs, worker r runs on the r-th block of aikido-run's
// CPUs (CPUs / N each), as the worker itself sees it.
TEST(LauncherTest, BindToCoreGivesEachWorkerItsOwnBlockOfCpus) {
  const std::vector<int> cpus = allowed_cpus();
  ASSERT_FALSE(cpus.empty());
  const int np = std::min<int>(int(cpus.size()), 4);
  const std::size_t share = cpus.size() / std::size_t(np);
  for (const auto& flags : {std::vector<std::string>{}, std::vector<std::string>{"--bind-to", "core"}}) {
    std::vector<std::string> args = {"-np", std::to_string(np)};
    args.insert(args.end(), flags.begin(), flags.end());
    args.insert(args.end(), {kFixture, "affinity"});
    const auto seen = worker_cpus(args);
    ASSERT_EQ(seen.size(), std::size_t(np)) << ::testing::PrintToString(args);
    for (int rank = 0; rank < np; ++rank) {
      const auto begin = cpus.begin() + long(std::size_t(rank) * share);
      EXPECT_EQ(seen.at(std::to_string(rank)), cpu_list(begin, begin + long(share)))
          << "rank " << rank << " of " << np << " on CPUs " << cpu_list(cpus.begin(), cpus.end());
    }
  }
}

// --bind-to none, more workers than CPUs, and elastic jobs: every worker may run on all of aikido-run's CPUs.
TEST(LauncherTest, WorkersAreNotBoundWithBindToNoneOrMoreWorkersThanCpus) {
  const std::vector<int> cpus = allowed_cpus();
  ASSERT_FALSE(cpus.empty());
  const std::string all = cpu_list(cpus.begin(), cpus.end());
  const std::string np = std::to_string(std::min<int>(int(cpus.size()), 4));
  const std::string more = std::to_string(cpus.size() + 1);
  for (const auto& args : {std::vector<std::string>{"-np", np, "--bind-to", "none", kFixture, "affinity"},
                           std::vector<std::string>{"-np", more, kFixture, "affinity"},
                           std::vector<std::string>{"-np", np, "--elastic", kFixture, "affinity"}}) {
    const auto seen = worker_cpus(args);
    EXPECT_EQ(seen.size(), std::size_t(std::stoi(args[1]))) << ::testing::PrintToString(args);
    for (const auto& [label, list] : seen) {
      EXPECT_EQ(list, all) << "worker " << label << " of " << ::testing::PrintToString(args);
    }
  }
}

// Process ids of the workers' "ready pid=N" lines.
std::vector<pid_t> ready_pids(const std::string& out) {
  std::vector<pid_t> pids;
  const std::regex pattern(R"(ready pid=(\d+))");
  for (auto it = std::sregex_iterator(out.begin(), out.end(), pattern); it != std::sregex_iterator(); ++it) {
    pids.push_back(pid_t(std::stol((*it)[1])));
  }
  return pids;
}

bool stderr_has(Subprocess& process, const std::string& text) {
  return process.wait_for_output(
      [&](const std::string&, const std::string& err) { return err.find(text) != std::string::npos; }, kBound);
}

// The first SIGINT asks the workers to stop (SIGTERM); these ignore it, and the grace period before SIGKILL is
// longer than the test's bound: only a second SIGINT that kills at once ends the job in time.
TEST(LauncherTest, ASecondSigintKillsTheWorkersAtOnce) {
  Subprocess launcher(launch({"-np", "2", "--grace-period", "600", kFixture, "hold", "600"}));
  ASSERT_TRUE(launcher.wait_for_output(
      [](const std::string& out, const std::string&) { return count_of(out, "ready pid=") == 2; }, kBound))
      << launcher.wait(1s).describe();
  launcher.send_signal(SIGINT);
  ASSERT_TRUE(stderr_has(launcher, "aikido-run: stopping 2 running workers")) << launcher.wait(1s).describe();
  launcher.send_signal(SIGINT);
  const auto r = launcher.wait(kBound);
  ASSERT_FALSE(r.timed_out) << r.describe();
  EXPECT_TRUE(r.exited && r.exit_code == 130) << r.describe();
  EXPECT_NE(r.err.find("aikido-run: received SIGINT again; killing the workers (SIGKILL)"), std::string::npos)
      << r.describe();
  for (const pid_t pid : ready_pids(r.out)) EXPECT_NE(::kill(pid, 0), 0) << "worker " << pid << " still runs";
}

// An elastic job with --checkpoint: the first SIGINT asks rank 0 for a checkpoint (rank 0 is stopped here, so it
// cannot answer), the second stops the workers (SIGTERM, which they ignore; the grace period outlasts the test), the
// third kills them.
TEST(LauncherTest, AnElasticJobStopsAtTheSecondSigintAndIsKilledAtTheThird) {
  const std::string checkpoint = ::testing::TempDir() + "/aikido-launcher-signals.ck";
  ::unlink(checkpoint.c_str());
  Subprocess launcher(launch({"-np", "1", "--elastic", "--checkpoint", checkpoint, "--heartbeat-timeout", "600",
                              "--timeout", "1200", "--grace-period", "600", kFixture, "session", "600", "hold"}));
  ASSERT_TRUE(launcher.wait_for_output(
      [](const std::string& out, const std::string&) { return count_of(out, "ready pid=") == 1; }, kBound))
      << launcher.wait(1s).describe();
  std::string out;
  launcher.wait_for_output(
      [&](const std::string& o, const std::string&) {
        out = o;
        return true;
      },
      1s);
  const auto pids = ready_pids(out);
  ASSERT_EQ(pids.size(), 1u) << out;
  ASSERT_EQ(::kill(pids[0], SIGSTOP), 0);
  launcher.send_signal(SIGINT);
  ASSERT_TRUE(stderr_has(launcher, "asking rank 0 to write the last commit")) << launcher.wait(1s).describe();
  launcher.send_signal(SIGINT);
  ASSERT_TRUE(stderr_has(launcher, "received SIGINT again; stopping the workers now")) << launcher.wait(1s).describe();
  ASSERT_TRUE(stderr_has(
      launcher, "no checkpoint was written to " + checkpoint + ": rank 0 had not written it before the second signal"))
      << launcher.wait(1s).describe();
  launcher.send_signal(SIGINT);
  const auto r = launcher.wait(kBound);
  ASSERT_FALSE(r.timed_out) << r.describe();
  EXPECT_TRUE(r.exited && r.exit_code == 130) << r.describe();
  EXPECT_NE(r.err.find("received SIGINT again; killing the workers (SIGKILL)"), std::string::npos) << r.describe();
  EXPECT_NE(::kill(pids[0], 0), 0) << "the worker still runs";
  ::unlink(checkpoint.c_str());
}

TEST(LauncherTest, SigintStopsEveryWorker) { expect_signal_stops_everything(SIGINT, 130); }

TEST(LauncherTest, SigtermStopsEveryWorker) { expect_signal_stops_everything(SIGTERM, 143); }

}  // namespace
}  // namespace aikido::testing
