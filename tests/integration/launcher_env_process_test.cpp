// Workers started by other launchers, without aikido-run, on this host: OpenMPI's mpirun and torchrun for real, and
// the environments of torchrun, Slurm's srun and Kubeflow's PyTorchJob set by the test for each process. Each job
// checks its collectives' results (peer_worker: allreduce against the closed form; elastic_worker: an epoch of
// exactly 60000 samples and equal parameters on every worker).
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>
#include <memory>
#include <random>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "subprocess.hpp"

extern char** environ;

namespace aikido::testing {
namespace {

using namespace std::chrono_literals;

const std::string kPeerWorker = PEER_WORKER_PATH;
const std::string kElasticWorker = ELASTIC_WORKER_PATH;
const std::string kMpirun = "/usr/bin/mpirun";
const std::string kTorchrun = "/usr/bin/torchrun";
const std::string kSecret = "5e11f0c2a7d94b1e8c3f6a2d9b0e7c41";
// Generous: a job takes a second or two; torchrun first imports LibTorch.
constexpr auto kBound = 120s;

bool executable(const std::string& path) { return ::access(path.c_str(), X_OK) == 0; }

// Variables of launchers this test may itself run under (a CI job inside Slurm, say): removed from the workers'
// environment, so that each test sees only the launcher it emulates.
bool launcher_variable(const std::string& name) {
  static const std::set<std::string> names = {"RANK",       "WORLD_SIZE",       "LOCAL_RANK",      "LOCAL_WORLD_SIZE",
                                              "GROUP_RANK", "GROUP_WORLD_SIZE", "MASTER_ADDR",     "MASTER_PORT",
                                              "ROLE_RANK",  "ROLE_WORLD_SIZE",  "MPI_LOCALRANKID", "MPI_LOCALNRANKS"};
  for (const char* prefix : {"SLURM_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_"}) {
    if (name.rfind(prefix, 0) == 0) return true;
  }
  return names.count(name) > 0;
}

// `argv` run through env(1) without any inherited launcher variable.
std::vector<std::string> clean(std::vector<std::string> argv) {
  std::vector<std::string> wrapped = {"/usr/bin/env"};
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry = *e;
    const std::string name = entry.substr(0, entry.find('='));
    if (launcher_variable(name)) wrapped.insert(wrapped.end(), {"-u", name});
  }
  wrapped.insert(wrapped.end(), argv.begin(), argv.end());
  return wrapped;
}

// Binds a TCP listener on 127.0.0.1:`port` (0: any); -1 when the port is taken. The caller closes it.
int listen_on(int port, int* bound_port = nullptr) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(std::uint16_t(port));
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(fd, 16) != 0) {
    ::close(fd);
    return -1;
  }
  socklen_t length = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &length);
  if (bound_port != nullptr) *bound_port = ntohs(addr.sin_port);
  return fd;
}

int unused_port() {
  int port = 0;
  ::close(listen_on(0, &port));
  return port;
}

// A Slurm job id whose derived store port (20000 + id mod 10000) is free now.
int slurm_job_id_with_free_port() {
  std::mt19937 random(std::random_device{}());
  for (int attempt = 0; attempt < 100; ++attempt) {
    const int offset = int(random() % 10000);
    const int fd = listen_on(20000 + offset);
    if (fd < 0) continue;
    ::close(fd);
    return 1'000'000 + offset;
  }
  ADD_FAILURE() << "no free port in 20000-29999";
  return 0;
}

class SecretFile {
 public:
  SecretFile() { std::ofstream(path_) << kSecret << "\n"; }
  ~SecretFile() { std::remove(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_ = "/tmp/aikido-launcher-env-test-secret-" + std::to_string(::getpid());
};

// Starts one process per rank with `environment_of(rank)` and waits for all.
std::vector<ProcessResult> run_ranks(int size, const std::vector<std::string>& argv,
                                     const std::function<std::vector<std::string>(int rank)>& environment_of) {
  std::vector<std::unique_ptr<Subprocess>> processes;
  for (int rank = 0; rank < size; ++rank) {
    Subprocess::Options options;
    options.set_env = environment_of(rank);
    processes.push_back(std::make_unique<Subprocess>(clean(argv), options));
  }
  std::vector<ProcessResult> results;
  for (auto& p : processes) results.push_back(p->wait(kBound));
  return results;
}

void expect_allreduce_ok(const std::vector<ProcessResult>& results) {
  for (std::size_t rank = 0; rank < results.size(); ++rank) {
    const ProcessResult& r = results[rank];
    EXPECT_TRUE(r.exited && r.exit_code == 0) << "rank " << rank << ": " << r.describe();
    EXPECT_EQ(count_of(r.out, "rank " + std::to_string(rank) + ": OK\n"), 1) << r.describe();
  }
}

std::vector<std::string> with(std::vector<std::string> env, const std::vector<std::string>& more) {
  env.insert(env.end(), more.begin(), more.end());
  return env;
}

// ---- OpenMPI's mpirun ----

class Mpirun : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!executable(kMpirun)) GTEST_SKIP() << kMpirun << " is not installed (Debian package openmpi-bin)";
  }
  static std::vector<std::string> mpirun(int np, std::vector<std::string> program) {
    std::vector<std::string> argv = {kMpirun, "-np", std::to_string(np), "--oversubscribe", "--allow-run-as-root"};
    argv.insert(argv.end(), program.begin(), program.end());
    return clean(argv);
  }
};

TEST_F(Mpirun, TwoWorkersAllreduce) {
  for (const char* count : {"1000", "300000"}) {
    Subprocess::Options options;
    options.set_env = {"AIKIDO_SECRET=" + kSecret};
    const auto r = run_process(mpirun(2, {kPeerWorker, "allreduce", count}), kBound, options);
    ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
    EXPECT_EQ(count_of(r.out, "rank 0: OK\n"), 1) << r.describe();
    EXPECT_EQ(count_of(r.out, "rank 1: OK\n"), 1) << r.describe();
  }
}

TEST_F(Mpirun, ElasticSessionWithASecretFile) {
  SecretFile secret;
  Subprocess::Options options;
  options.set_env = {"AIKIDO_SECRET_FILE=" + secret.path()};
  const auto r = run_process(mpirun(3, {kElasticWorker, "--epochs", "1", "--dim", "256", "--print-every", "1000"}),
                             kBound, options);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  const std::regex done(R"re(\{"event":"done","worker":\d,"rank":(\d),"workers":3,.*"params":"([0-9a-f]+)"\})re");
  std::set<std::string> ranks, params;
  for (std::sregex_iterator it(r.out.begin(), r.out.end(), done), end; it != end; ++it) {
    ranks.insert((*it)[1]);
    params.insert((*it)[2]);
  }
  EXPECT_EQ(ranks, (std::set<std::string>{"0", "1", "2"})) << r.describe();
  EXPECT_EQ(params.size(), 1u) << "the workers ended with different parameters\n" << r.describe();
  EXPECT_EQ(count_of(r.out, R"("global_samples":60000,"index_sum_ok":true)"), 3) << r.describe();
}

TEST_F(Mpirun, WithoutASecretSaysHowToMakeOne) {
  const auto r = run_process(mpirun(2, {kPeerWorker, "allreduce", "10"}), kBound);
  ASSERT_FALSE(r.timed_out) << r.describe();
  EXPECT_FALSE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_NE(r.out.find("openmpi job of 2 workers has no job secret"), std::string::npos) << r.describe();
  EXPECT_NE(r.out.find("openssl rand -hex 32"), std::string::npos) << r.describe();
  EXPECT_NE(r.out.find("AIKIDO_SECRET_FILE"), std::string::npos) << r.describe();
}

// ---- torchrun ----

std::vector<std::string> torchrun_environment(int rank, int size, int master_port, bool agent_store = true) {
  return {"TORCHELASTIC_RUN_ID=launcher-env-test",
          "TORCHELASTIC_RESTART_COUNT=0",
          std::string("TORCHELASTIC_USE_AGENT_STORE=") + (agent_store ? "True" : "False"),
          "RANK=" + std::to_string(rank),
          "WORLD_SIZE=" + std::to_string(size),
          "LOCAL_RANK=" + std::to_string(rank),
          "LOCAL_WORLD_SIZE=" + std::to_string(size),
          "GROUP_RANK=0",
          "GROUP_WORLD_SIZE=1",
          "MASTER_ADDR=127.0.0.1",
          "MASTER_PORT=" + std::to_string(master_port),
          "AIKIDO_SECRET=" + kSecret};
}

TEST(TorchrunEnvironment, ThreeWorkersAllreduce) {
  // torchrun's agent serves its own store on MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE=True): hold that port, as
  // the agent would, so that the workers must use the next one.
  int master_port = 0;
  const int agent_store = listen_on(0, &master_port);
  ASSERT_GE(agent_store, 0);
  const auto results = run_ranks(3, {kPeerWorker, "allreduce", "100000"},
                                 [&](int rank) { return torchrun_environment(rank, 3, master_port); });
  ::close(agent_store);
  expect_allreduce_ok(results);
}

TEST(TorchrunEnvironment, AWorkerWhoseRankZeroNeverStartsNamesTheStore) {
  const int port = unused_port();
  const auto results = run_ranks(1, {kPeerWorker, "allreduce", "10"}, [&](int) {
    return with(torchrun_environment(1, 2, port, false), {"AIKIDO_TIMEOUT=1"});
  });
  const ProcessResult& r = results[0];
  EXPECT_TRUE(r.exited && r.exit_code == 4) << r.describe();
  EXPECT_NE(r.out.find("127.0.0.1:" + std::to_string(port)), std::string::npos) << r.describe();
  EXPECT_NE(r.out.find("MASTER_ADDR and MASTER_PORT"), std::string::npos) << r.describe();
}

TEST(TorchrunEnvironment, RankZeroOnAPortInUseNamesTheSetting) {
  int port = 0;
  const int taken = listen_on(0, &port);
  ASSERT_GE(taken, 0);
  const auto results = run_ranks(1, {kPeerWorker, "allreduce", "10"}, [&](int) {
    return with(torchrun_environment(0, 2, 1), {"AIKIDO_STORE_PORT=" + std::to_string(port)});
  });
  ::close(taken);
  const ProcessResult& r = results[0];
  EXPECT_TRUE(r.exited && r.exit_code == 4) << r.describe();
  EXPECT_NE(r.out.find("rank 0 cannot serve the job's store"), std::string::npos) << r.describe();
  EXPECT_NE(r.out.find("AIKIDO_STORE_PORT"), std::string::npos) << r.describe();
}

TEST(Torchrun, TwoWorkersAllreduce) {
  if (!executable(kTorchrun)) GTEST_SKIP() << kTorchrun << " is not installed (LibTorch's Python package)";
  // torch 1.13 on Python 3.11 fails in its argument parsing without --redirects and --tee.
  const std::vector<std::string> argv = {kTorchrun,
                                         "--nproc_per_node",
                                         "2",
                                         "--master_port",
                                         std::to_string(unused_port()),
                                         "--redirects",
                                         "1",
                                         "--tee",
                                         "1",
                                         "--no_python",
                                         kPeerWorker,
                                         "allreduce",
                                         "1000"};
  Subprocess::Options options;
  options.set_env = {"AIKIDO_SECRET=" + kSecret};
  const auto r = run_process(clean(argv), kBound, options);
  ASSERT_TRUE(r.exited && r.exit_code == 0) << r.describe();
  EXPECT_EQ(count_of(r.out, "rank 0: OK\n"), 1) << r.describe();
  EXPECT_EQ(count_of(r.out, "rank 1: OK\n"), 1) << r.describe();
}

// ---- Slurm's srun ----

TEST(SlurmEnvironment, ThreeWorkersAllreduce) {
  // One node named "localhost"; no port given: the store is on 20000 + SLURM_JOB_ID mod 10000.
  const int job_id = slurm_job_id_with_free_port();
  const auto results = run_ranks(3, {kPeerWorker, "allreduce", "100000"}, [&](int rank) {
    return std::vector<std::string>{"SLURM_PROCID=" + std::to_string(rank),
                                    "SLURM_NTASKS=3",
                                    "SLURM_LOCALID=" + std::to_string(rank),
                                    "SLURM_NODEID=0",
                                    "SLURM_STEP_NODELIST=localhost",
                                    "SLURM_STEP_TASKS_PER_NODE=3",
                                    "SLURM_JOB_NODELIST=localhost",
                                    "SLURM_JOB_ID=" + std::to_string(job_id),
                                    "SLURM_STEP_ID=0",
                                    "AIKIDO_SECRET=" + kSecret};
  });
  expect_allreduce_ok(results);
}

// ---- Kubeflow's PyTorchJob ----

TEST(KubeflowEnvironment, TwoWorkersWithASecretFile) {
  SecretFile secret;
  const int port = unused_port();
  const auto results = run_ranks(2, {kPeerWorker, "allreduce", "1000"}, [&](int rank) {
    return std::vector<std::string>{"RANK=" + std::to_string(rank), "WORLD_SIZE=2", "MASTER_ADDR=localhost",
                                    "MASTER_PORT=" + std::to_string(port), "AIKIDO_SECRET_FILE=" + secret.path()};
  });
  expect_allreduce_ok(results);
}

}  // namespace
}  // namespace aikido::testing
