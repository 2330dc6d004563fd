// Real worker processes under aikido-run: collectives across processes, and what the survivors see when a peer
// crashes, hangs, or posts a mismatching collective.
#include <gtest/gtest.h>
#include <signal.h>

#include <regex>
#include <string>
#include <vector>

#include "subprocess.hpp"

namespace aikido::testing {
namespace {

using namespace std::chrono_literals;

const std::string kRun = AIKIDO_RUN_PATH;
const std::string kWorker = PEER_WORKER_PATH;
// Generous: a job takes a second or two, plus AIKIDO_TIMEOUT (5 s) and the launcher's grace period (3 s) in the
// fault cases.
constexpr auto kBound = 90s;

ProcessResult run_job(int np, std::vector<std::string> worker_args, const std::string& timeout = "5") {
  std::vector<std::string> argv = {kRun, "-np", std::to_string(np), "--timeout", timeout, kWorker};
  argv.insert(argv.end(), worker_args.begin(), worker_args.end());
  return run_process(argv, kBound);
}

// "rank 1", "ranks 1" or "rank(s) 1", as error messages name a rank.
bool names_rank_1(const std::string& text) { return std::regex_search(text, std::regex(R"(rank(s|\(s\))? 1\b)")); }

std::string rank_prefix(int rank) { return "[" + std::to_string(rank) + "] rank " + std::to_string(rank) + ": "; }

class PeerProcessTest : public ::testing::TestWithParam<int> {};

TEST_P(PeerProcessTest, Allreduce) {
  const int np = GetParam();
  for (const char* count : {"1", "1000", "300000"}) {
    const auto r = run_job(np, {"allreduce", count});
    ASSERT_TRUE(r.exited && r.exit_code == 0) << "count " << count << "\n" << r.describe();
    for (int rank = 0; rank < np; ++rank) {
      EXPECT_EQ(count_of(r.out, rank_prefix(rank) + "OK\n"), 1) << r.describe();
    }
  }
}

TEST_P(PeerProcessTest, CrashedPeerFailsTheOthers) {
  const int np = GetParam();
  const int crashed = 1;
  const auto r = run_job(np, {"crash", std::to_string(crashed)});
  ASSERT_FALSE(r.timed_out) << r.describe();
  // The crashed rank is the first failure and its status is the job's; the launcher cannot tell the order of
  // deaths apart only when a survivor has already exited before the crashed rank's exit completed.
  EXPECT_TRUE(r.exited && (r.exit_code == 128 + SIGKILL || r.exit_code == 3)) << r.describe();
  EXPECT_NE(r.err.find("aikido-run: rank 1 killed by signal SIGKILL"), std::string::npos) << r.describe();
  for (int rank = 0; rank < np; ++rank) {
    EXPECT_EQ(count_of(r.out, rank_prefix(rank) + "warmup ok\n"), 1) << r.describe();
    if (rank == crashed) continue;
    const auto lines = lines_with_prefix(r.out, rank_prefix(rank));
    ASSERT_EQ(lines.size(), 2u) << "rank " << rank << " did not report an error\n" << r.describe();
    const std::string& report = lines[1];
    EXPECT_TRUE(report.find("PeerLostError: ") != std::string::npos ||
                report.find("TimeoutError: ") != std::string::npos)
        << report;
    EXPECT_TRUE(names_rank_1(report)) << "the error does not name the lost rank: " << report;
  }
}

TEST_P(PeerProcessTest, HungPeerFailsTheOthersWithinTheTimeout) {
  const int np = GetParam();
  const int hung = 1;
  const auto r = run_job(np, {"hang", std::to_string(hung)});
  ASSERT_FALSE(r.timed_out) << r.describe();
  // A survivor is the first to fail, with the status of a caught error.
  EXPECT_TRUE(r.exited && r.exit_code == 3) << r.describe();
  int named = 0;
  for (int rank = 0; rank < np; ++rank) {
    if (rank == hung) continue;
    const auto lines = lines_with_prefix(r.out, rank_prefix(rank));
    ASSERT_EQ(lines.size(), 2u) << "rank " << rank << " did not report an error\n" << r.describe();
    const std::string& report = lines[1];
    EXPECT_TRUE(report.find("TimeoutError: ") != std::string::npos ||
                report.find("PeerLostError: ") != std::string::npos)
        << report;
    named += names_rank_1(report) ? 1 : 0;
  }
  // A survivor that waits for data from another survivor may name that one; the hung rank must be named by someone.
  EXPECT_GE(named, 1) << "no error names the hung rank 1\n" << r.describe();
  EXPECT_LT(r.elapsed, 60s) << r.describe();
}

TEST_P(PeerProcessTest, MismatchIsReportedOnEveryRank) {
  const int np = GetParam();
  const auto r = run_job(np, {"mismatch"});
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  for (int rank = 0; rank < np; ++rank) {
    EXPECT_EQ(count_of(r.out, rank_prefix(rank) + "MismatchError: "), 1) << r.describe();
  }
}

INSTANTIATE_TEST_SUITE_P(Ranks, PeerProcessTest, ::testing::Values(2, 4),
                         [](const ::testing::TestParamInfo<int>& info) { return "np" + std::to_string(info.param); });

}  // namespace
}  // namespace aikido::testing
