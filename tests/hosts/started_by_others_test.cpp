// Workers started across emulated hosts by other launchers, without aikido-run: OpenMPI's mpirun (its rsh agent
// enters each host's namespace), and the environments that torchrun and Slurm give their processes, set here by the
// test. Rank 0 serves the store at MASTER_ADDR; workers pick the address through which they reach it.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "emulated_hosts.hpp"

namespace aikido::testing {
namespace {

using namespace std::chrono_literals;

class StartedByOthersTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string why = EmulatedHosts::unavailable_reason();
    if (!why.empty()) GTEST_SKIP() << why;
    hosts_ = std::make_unique<EmulatedHosts>(2);
    secret_ = ::testing::TempDir() + "aikido-others-secret-" + std::to_string(::getpid());
    std::ofstream(secret_) << "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
  }

  // 4 processes, 2 per host, each with the environment `env_of(rank)` gives; every one must print "rank R: OK".
  void run_four(const std::function<std::vector<std::string>(int rank)>& env_of) {
    std::vector<std::unique_ptr<Subprocess>> workers;
    for (int rank = 0; rank < 4; ++rank) {
      Subprocess::Options o;
      o.set_env = env_of(rank);
      o.set_env.push_back("AIKIDO_SECRET_FILE=" + secret_);
      o.set_env.push_back("AIKIDO_TIMEOUT=30");
      workers.push_back(hosts_->start(rank / 2, {PEER_WORKER_PATH, "allreduce", "300000"}, o));
    }
    for (int rank = 0; rank < 4; ++rank) {
      const ProcessResult r = workers[std::size_t(rank)]->wait(120s);
      EXPECT_TRUE(r.exited && r.exit_code == 0) << "rank " << rank << ": " << r.describe();
      EXPECT_NE(r.out.find("rank " + std::to_string(rank) + ": OK"), std::string::npos) << r.describe();
    }
  }

  std::unique_ptr<EmulatedHosts> hosts_;
  std::string secret_;
};

TEST_F(StartedByOthersTest, OpenMpisMpirunAcrossHosts) {
  if (::access("/usr/bin/mpirun", X_OK) != 0) GTEST_SKIP() << "OpenMPI is not installed (apt-get install openmpi-bin)";
  const ProcessResult r = run_process({"/usr/bin/mpirun",
                                       "--allow-run-as-root",
                                       "-np",
                                       "4",
                                       "-H",
                                       "h0:2,h1:2",
                                       "--mca",
                                       "plm_rsh_agent",
                                       EmulatedHosts::launch_command(),
                                       "--mca",
                                       "oob_tcp_if_include",
                                       "198.18.0.0/24",
                                       "--mca",
                                       "btl_tcp_if_include",
                                       "198.18.0.0/24",
                                       "-x",
                                       "AIKIDO_SECRET_FILE=" + secret_,
                                       "-x",
                                       "MASTER_ADDR=" + EmulatedHosts::address(0),
                                       "-x",
                                       "MASTER_PORT=29511",
                                       PEER_WORKER_PATH,
                                       "allreduce",
                                       "300000"},
                                      120s);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  for (int rank = 0; rank < 4; ++rank) {
    EXPECT_NE(r.out.find("rank " + std::to_string(rank) + ": OK"), std::string::npos) << r.describe();
  }
}

TEST_F(StartedByOthersTest, TorchrunsEnvironmentAcrossHosts) {
  run_four([](int rank) -> std::vector<std::string> {
    return {"TORCHELASTIC_RUN_ID=job1",
            "RANK=" + std::to_string(rank),
            "WORLD_SIZE=4",
            "LOCAL_RANK=" + std::to_string(rank % 2),
            "LOCAL_WORLD_SIZE=2",
            "GROUP_RANK=" + std::to_string(rank / 2),
            "MASTER_ADDR=" + EmulatedHosts::address(0),
            "MASTER_PORT=29512"};
  });
}

TEST_F(StartedByOthersTest, SlurmsEnvironmentAcrossHosts) {
  run_four([](int rank) -> std::vector<std::string> {
    return {"SLURM_JOB_ID=4711", "SLURM_PROCID=" + std::to_string(rank), "SLURM_NTASKS=4",
            "SLURM_LOCALID=" + std::to_string(rank % 2), "SLURM_NODEID=" + std::to_string(rank / 2),
            "SLURM_STEP_NODELIST=h[0-1]", "SLURM_STEP_TASKS_PER_NODE=2(x2)",
            // The node list's names resolve on a real cluster; the emulated hosts have no names in DNS.
            "MASTER_ADDR=" + EmulatedHosts::address(0)};
  });
}

}  // namespace
}  // namespace aikido::testing
