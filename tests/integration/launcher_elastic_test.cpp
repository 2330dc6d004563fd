// aikido-run --elastic as a launcher, on launcher_fixture: a program that never opens an aikido::ElasticSession is
// named at once (aikido-run, aikido-ctl status and resize, --checkpoint, --resume), one that does is never taken for
// one that does not, and output lines carry rank and worker id once they differ.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <fstream>
#include <regex>
#include <string>
#include <vector>

#include "subprocess.hpp"

namespace aikido::testing {
namespace {

using namespace std::chrono_literals;

const std::string kRun = AIKIDO_RUN_PATH;
const std::string kCtl = AIKIDO_CTL_PATH;
const std::string kFixture = LAUNCHER_FIXTURE_PATH;
constexpr auto kBound = 60s;
constexpr const char* kPlainPeer = "joined the cluster with a plain aikido::Peer instead of an aikido::ElasticSession";

std::vector<std::string> launch(std::vector<std::string> args) {
  args.insert(args.begin(), kRun);
  return args;
}

std::string temp_path(const std::string& name) {
  const std::string path = ::testing::TempDir() + "/" + name + "-" + std::to_string(::getpid());
  ::unlink(path.c_str());
  return path;
}

bool stderr_has(Subprocess& process, const std::string& text) {
  return process.wait_for_output(
      [&](const std::string&, const std::string& err) { return err.find(text) != std::string::npos; }, kBound);
}

bool stdout_has(Subprocess& process, const std::string& text, int times = 1) {
  return process.wait_for_output(
      [&](const std::string& out, const std::string&) { return count_of(out, text) >= times; }, kBound);
}

ProcessResult ctl(const std::string& control, const std::vector<std::string>& args) {
  std::vector<std::string> argv = {kCtl, "--control-file", control};
  argv.insert(argv.end(), args.begin(), args.end());
  return run_process(argv, kBound);
}

// The README's mistake: a program that opens a plain Peer, run with --elastic. aikido-run says so as soon as the
// workers join, aikido-ctl shows it and refuses to resize (the new worker would wait for members that never join
// it), and a stop with --checkpoint says at once that nothing is written instead of waiting for rank 0.
TEST(LauncherElasticTest, AProgramWithoutAnElasticSessionIsNamedAtOnce) {
  const std::string control = temp_path("aikido-no-session.ctl");
  const std::string checkpoint = temp_path("aikido-no-session.ck");
  Subprocess job(launch({"-np", "2", "--elastic", "--max-np", "3", "--control-file", control, "--checkpoint",
                         checkpoint, kFixture, "peer-hold", "600"}));
  ASSERT_TRUE(stderr_has(job, kPlainPeer)) << job.wait(1s).describe();

  const auto status = ctl(control, {"status"});
  EXPECT_TRUE(status.exited && status.exit_code == 0) << status.describe();
  EXPECT_NE(status.out.find(std::string("note: worker ")), std::string::npos) << status.describe();
  EXPECT_EQ(count_of(status.out, "no elastic session (the program does not use aikido::ElasticSession)"), 2)
      << status.describe();
  const auto resize = ctl(control, {"resize", "3"});
  EXPECT_TRUE(resize.exited && resize.exit_code == 1) << resize.describe();
  EXPECT_NE(resize.err.find(std::string("cannot resize this job: worker ")), std::string::npos) << resize.describe();
  EXPECT_NE(resize.err.find(kPlainPeer), std::string::npos) << resize.describe();
  EXPECT_NE(ctl(control, {"status"}).out.find("cluster version 0 "), std::string::npos) << "the resize went through";

  job.send_signal(SIGINT);
  const auto r = job.wait(kBound);
  EXPECT_TRUE(r.exited && r.exit_code == 130) << r.describe();
  EXPECT_NE(r.err.find("no checkpoint is written to " + checkpoint +
                       ": rank 0 (worker 0) does not use an aikido::ElasticSession, which writes it"),
            std::string::npos)
      << r.describe();
  EXPECT_EQ(r.err.find("asking rank 0 to write"), std::string::npos) << r.describe();
  EXPECT_NE(::access(checkpoint.c_str(), F_OK), 0) << "a checkpoint appeared";
  EXPECT_EQ(count_of(r.err, kPlainPeer), 1) << "said more than once\n" << r.describe();
}

// --resume with such a program would train from its initial state and succeed: the job is stopped instead, with the
// reason, as soon as the workers join.
TEST(LauncherElasticTest, ResumingWithAProgramWithoutASessionStopsTheJob) {
  const std::string checkpoint = temp_path("aikido-no-session-resume.ck");
  std::ofstream(checkpoint) << "AIKIDOCK";
  const auto r =
      run_process(launch({"-np", "2", "--elastic", "--resume", checkpoint, kFixture, "peer-hold", "600"}), kBound);
  ASSERT_FALSE(r.timed_out) << r.describe();
  EXPECT_TRUE(r.exited && r.exit_code == 1) << r.describe();
  EXPECT_NE(r.err.find(kPlainPeer), std::string::npos) << r.describe();
  EXPECT_NE(r.err.find("stopping the job: the checkpoint " + checkpoint +
                       " (--resume) is read by the program's aikido::ElasticSession"),
            std::string::npos)
      << r.describe();
  ::unlink(checkpoint.c_str());
}

// A single worker with a plain Peer never touches the store: when it finishes, the job fails and says that it did
// not resume.
TEST(LauncherElasticTest, ASingleWorkerThatFinishesWithoutASessionDidNotResume) {
  const std::string checkpoint = temp_path("aikido-no-session-single.ck");
  std::ofstream(checkpoint) << "AIKIDOCK";
  const auto r = run_process(launch({"-np", "1", "--elastic", "--resume", checkpoint, kFixture, "peer"}), kBound);
  EXPECT_TRUE(r.exited && r.exit_code == 1) << r.describe();
  EXPECT_NE(r.err.find("worker 0 finished without opening an aikido::ElasticSession, so it did not resume from " +
                       checkpoint),
            std::string::npos)
      << r.describe();
  ::unlink(checkpoint.c_str());
}

// A worker alone never touches the store with a plain Peer: kSessionGrace (10 s) after its start without a session,
// aikido-run and aikido-ctl say it probably has none, and a stop with --checkpoint does not wait for it.
TEST(LauncherElasticTest, AWorkerSilentLongAfterItsStartIsReported) {
  const std::string control = temp_path("aikido-silent.ctl");
  const std::string checkpoint = temp_path("aikido-silent.ck");
  Subprocess job(launch(
      {"-np", "1", "--elastic", "--control-file", control, "--checkpoint", checkpoint, kFixture, "hold", "600"}));
  ASSERT_TRUE(stderr_has(job,
                         "aikido-run: worker 0 (rank 0) has not opened an aikido::ElasticSession 10 s after it "
                         "started; if the program does not use one, run it without --elastic"))
      << job.wait(1s).describe();
  const auto status = ctl(control, {"status"});
  EXPECT_NE(status.out.find("note: worker 0 (rank 0) has not opened"), std::string::npos) << status.describe();
  EXPECT_NE(status.out.find("rank 0: worker 0 on "), std::string::npos) << status.describe();
  EXPECT_NE(status.out.find(", no elastic session yet"), std::string::npos) << status.describe();
  job.send_signal(SIGINT);
  ASSERT_TRUE(stderr_has(job, "aikido-run: no checkpoint is written to " + checkpoint +
                                  ": rank 0 (worker 0) has not opened an aikido::ElasticSession"))
      << job.wait(1s).describe();
  job.send_signal(SIGINT);  // the worker ignores SIGTERM: the second signal kills it
  const auto r = job.wait(kBound);
  EXPECT_TRUE(r.exited && r.exit_code == 130) << r.describe();
  EXPECT_EQ(r.err.find("asking rank 0 to write"), std::string::npos) << r.describe();
}

// Workers that open sessions are never taken for plain Peers (their status key comes before their address), and
// aikido-ctl shows their steps.
TEST(LauncherElasticTest, WorkersWithSessionsAreNotReported) {
  const std::string control = temp_path("aikido-sessions.ctl");
  for (int round = 0; round < 3; ++round) {
    Subprocess job(launch({"-np", "3", "--elastic", "--control-file", control, kFixture, "session", "5"}));
    ASSERT_TRUE(stdout_has(job, "ready pid=", 3)) << job.wait(1s).describe();
    // The status key says "joining" until the heartbeat after the worker connected.
    ProcessResult status;
    for (int i = 0; i < 200 && count_of(status.out, ", at version 0") < 3; ++i) status = ctl(control, {"status"});
    EXPECT_EQ(count_of(status.out, ", at version 0"), 3) << status.describe();
    EXPECT_EQ(status.out.find("note:"), std::string::npos) << status.describe();
    const auto r = job.wait(kBound);
    EXPECT_TRUE(r.exited && r.exit_code == 0) << r.describe();
    EXPECT_EQ(r.err.find("plain aikido::Peer"), std::string::npos) << r.describe();
    EXPECT_EQ(r.err.find("has not opened"), std::string::npos) << r.describe();
  }
}

// After worker 0 is killed, worker 1 is rank 0 and the replacement, worker 2, rank 1: their lines say both.
TEST(LauncherElasticTest, OutputLinesCarryRankAndWorkerIdOnceTheyDiffer) {
  Subprocess job(launch({"-np", "2", "--elastic", "--restart", kFixture, "session", "600"}));
  ASSERT_TRUE(stdout_has(job, "ready pid=", 2)) << job.wait(1s).describe();
  std::string out;
  job.wait_for_output(
      [&](const std::string& o, const std::string&) {
        out = o;
        return true;
      },
      1s);
  std::smatch m;
  ASSERT_TRUE(std::regex_search(out, m, std::regex(R"(\[0\] ready pid=(\d+))"))) << out;
  ASSERT_EQ(::kill(pid_t(std::stol(m[1])), SIGKILL), 0);
  EXPECT_TRUE(stdout_has(job, "[0|w1] changed rank=0 size=2 version=1\n")) << job.wait(1s).describe();
  EXPECT_TRUE(stdout_has(job, "[1|w2] changed rank=1 size=2 version=1\n")) << job.wait(1s).describe();
  job.send_signal(SIGTERM);
  const auto r = job.wait(kBound);
  EXPECT_TRUE(r.exited && r.exit_code == 143) << r.describe();
  EXPECT_NE(r.err.find("aikido-run: worker 0 (rank 0) was killed by signal SIGKILL"), std::string::npos)
      << r.describe();
}

}  // namespace
}  // namespace aikido::testing
