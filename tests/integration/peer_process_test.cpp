// Real worker processes under aikido-run: collectives across processes, and what the survivors see when a peer
// crashes, hangs, or posts a mismatching collective.
#include <gtest/gtest.h>
#include <signal.h>

#include <regex>
#include <string>
#include <tuple>
#include <vector>

#include "subprocess.hpp"

namespace aikido::testing {
namespace {

using namespace std::chrono_literals;

const std::string kRun = AIKIDO_RUN_PATH;
const std::string kWorker = PEER_WORKER_PATH;
const std::string kBench = AIKIDO_BENCH_PATH;
// Generous: a job takes a second or two, plus AIKIDO_TIMEOUT (5 s) and the launcher's grace period (3 s) in the
// fault cases.
constexpr auto kBound = 90s;

ProcessResult run_job(int np, const std::string& transport, std::vector<std::string> worker_args,
                      const std::string& timeout = "5") {
  std::vector<std::string> argv = {kRun,    "-np",  std::to_string(np), "--transport", transport, "--timeout",
                                   timeout, kWorker};
  argv.insert(argv.end(), worker_args.begin(), worker_args.end());
  return run_process(argv, kBound);
}

// "rank 1", "ranks 1" or "rank(s) 1", as error messages name a rank.
bool names_rank_1(const std::string& text) { return std::regex_search(text, std::regex(R"(rank(s|\(s\))? 1\b)")); }

std::string rank_prefix(int rank) { return "[" + std::to_string(rank) + "] rank " + std::to_string(rank) + ": "; }

// Every case runs over each transport: `auto` (shared memory for allreduce and barrier, Unix sockets for the rest),
// and `tcp` and `unix`, where every collective takes the socket path that jobs across hosts use.
class PeerProcessTest : public ::testing::TestWithParam<std::tuple<std::string, int>> {
 protected:
  const std::string& transport() const { return std::get<0>(GetParam()); }
  int np() const { return std::get<1>(GetParam()); }
};
// Faults at 3 and 4 ranks, where some survivor needs the faulty rank only through other survivors.
class PeerFaultTest : public PeerProcessTest {};

TEST_P(PeerProcessTest, Allreduce) {
  for (const char* count : {"1", "1000", "300000"}) {
    const auto r = run_job(np(), transport(), {"allreduce", count});
    ASSERT_TRUE(r.exited && r.exit_code == 0) << "count " << count << "\n" << r.describe();
    for (int rank = 0; rank < np(); ++rank) {
      EXPECT_EQ(count_of(r.out, rank_prefix(rank) + "OK\n"), 1) << r.describe();
    }
  }
}

TEST_P(PeerProcessTest, HungPeerFailsTheOthersWithinTheTimeout) {
  const int hung = 1;
  const auto r = run_job(np(), transport(), {"hang", std::to_string(hung)});
  ASSERT_FALSE(r.timed_out) << r.describe();
  // A survivor is the first to fail, with the status of a caught error.
  EXPECT_TRUE(r.exited && r.exit_code == 3) << r.describe();
  for (int rank = 0; rank < np(); ++rank) {
    if (rank == hung) continue;
    const auto lines = lines_with_prefix(r.out, rank_prefix(rank));
    ASSERT_EQ(lines.size(), 2u) << "rank " << rank << " did not report an error\n" << r.describe();
    const std::string& report = lines[1];
    EXPECT_NE(report.find("TimeoutError: "), std::string::npos) << report;
    // Whoever timed out first told the others: every report names the stopped rank as the one that did not answer
    // the stall query.
    EXPECT_NE(report.find("rank 1 has not answered whether it posted it"), std::string::npos) << report;
  }
  EXPECT_LT(r.elapsed, 60s) << r.describe();
}

// aikido-bench --check on real processes: every result right, for a float and an integer type and sizes on both
// sides of the shared-memory inline limit (its logic is tested with wrong results in tests/unit/bench_check_test.cpp).
TEST_P(PeerProcessTest, BenchmarkCheckPasses) {
  for (const char* dtype : {"bf16", "i32"}) {
    const auto r = run_process({kRun, "-np", std::to_string(np()), "--transport", transport(), kBench, "allreduce",
                                "--check", "--dtype", dtype, "--op", "mean", "--sizes", "4K,1M", "--iters", "3"},
                               kBound);
    ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
    EXPECT_NE(r.out.find("check on"), std::string::npos) << r.describe();
    EXPECT_EQ(r.err.find("check failed"), std::string::npos) << r.describe();
  }
}

// A rank that runs no collective: half the timeout in, every other rank prints a stall report naming it and saying it
// is in no collective; at the timeout they fail with TimeoutError saying the same. On every transport.
TEST_P(PeerProcessTest, AStallReportComesBeforeTheTimeout) {
  const int absent = 1;
  const auto r = run_job(np(), transport(), {"absent", std::to_string(absent)}, "4");
  ASSERT_FALSE(r.timed_out) << r.describe();
  EXPECT_TRUE(r.exited && r.exit_code == 3) << r.describe();
  const std::string detail = "rank 1 has not posted it; rank 1 is in no collective";
  for (int rank = 0; rank < np(); ++rank) {
    if (rank == absent) continue;
    const std::string prefix = "[" + std::to_string(rank) + "] ";
    const auto reports = lines_with_prefix(r.err, prefix + "[aikido warn] stall report: allreduce 'after-absent'");
    ASSERT_EQ(reports.size(), 1u) << "rank " << rank << " printed no stall report\n" << r.describe();
    EXPECT_NE(reports[0].find(detail), std::string::npos) << reports[0];
    const auto errors = lines_with_prefix(r.out, rank_prefix(rank) + "TimeoutError: ");
    ASSERT_EQ(errors.size(), 1u) << r.describe();
    EXPECT_NE(errors[0].find(detail), std::string::npos) << errors[0];
  }
}

TEST_P(PeerFaultTest, CrashedPeerFailsTheOthers) {
  const int crashed = 1;
  const auto r = run_job(np(), transport(), {"crash", std::to_string(crashed)});
  ASSERT_FALSE(r.timed_out) << r.describe();
  // The crashed rank is the first failure and its status is the job's; the launcher cannot tell the order of
  // deaths apart only when a survivor has already exited before the crashed rank's exit completed.
  EXPECT_TRUE(r.exited && (r.exit_code == 128 + SIGKILL || r.exit_code == 3)) << r.describe();
  EXPECT_NE(r.err.find("aikido-run: rank 1 killed by signal SIGKILL"), std::string::npos) << r.describe();
  for (int rank = 0; rank < np(); ++rank) {
    EXPECT_EQ(count_of(r.out, rank_prefix(rank) + "warmup ok\n"), 1) << r.describe();
    if (rank == crashed) continue;
    const auto lines = lines_with_prefix(r.out, rank_prefix(rank));
    ASSERT_EQ(lines.size(), 2u) << "rank " << rank << " did not report an error\n" << r.describe();
    const std::string& report = lines[1];
    EXPECT_NE(report.find("PeerLostError: "), std::string::npos) << report;
    EXPECT_TRUE(names_rank_1(report)) << "the error does not name the lost rank: " << report;
  }
}

// A rank closes its session cleanly (exit 0) after a warm-up; every survivor's next allreduce and barrier fail at
// once with PeerLostError naming it. (Survivors hold their sessions after their errors: one that waited for another
// survivor instead would fail only when that one leaves, naming it.)
TEST_P(PeerFaultTest, ARankThatLeavesFailsTheOthersAtOnce) {
  const int leaver = 1;
  const auto r = run_job(np(), transport(), {"leave", std::to_string(leaver)}, "60");
  ASSERT_FALSE(r.timed_out) << r.describe();
  EXPECT_TRUE(r.exited && r.exit_code == 3) << r.describe();
  for (int rank = 0; rank < np(); ++rank) {
    EXPECT_EQ(count_of(r.out, rank_prefix(rank) + "warmup ok\n"), 1) << r.describe();
    if (rank == leaver) continue;
    for (const char* what : {"allreduce", "barrier"}) {
      const auto lines = lines_with_prefix(r.out, rank_prefix(rank) + what + " ");
      ASSERT_EQ(lines.size(), 1u) << "rank " << rank << " did not report its " << what << "\n" << r.describe();
      EXPECT_NE(lines[0].find(std::string(what) + " PeerLostError: "), std::string::npos) << lines[0];
      EXPECT_NE(lines[0].find("rank 1 closed its session"), std::string::npos) << lines[0];
    }
  }
  EXPECT_LT(r.elapsed, 60s) << "a survivor waited for its timeout\n" << r.describe();
}

TEST_P(PeerFaultTest, MismatchIsReportedOnEveryRank) {
  const auto r = run_job(np(), transport(), {"mismatch"});
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  for (int rank = 0; rank < np(); ++rank) {
    EXPECT_EQ(count_of(r.out, rank_prefix(rank) + "MismatchError: "), 1) << r.describe();
  }
}

std::string param_name(const ::testing::TestParamInfo<std::tuple<std::string, int>>& info) {
  return std::get<0>(info.param) + "_np" + std::to_string(std::get<1>(info.param));
}

INSTANTIATE_TEST_SUITE_P(Ranks, PeerProcessTest,
                         ::testing::Combine(::testing::Values("auto", "tcp", "unix"), ::testing::Values(2, 4)),
                         param_name);
INSTANTIATE_TEST_SUITE_P(Ranks, PeerFaultTest,
                         ::testing::Combine(::testing::Values("auto", "tcp", "unix"), ::testing::Values(3, 4)),
                         param_name);

}  // namespace
}  // namespace aikido::testing
