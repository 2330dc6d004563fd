// Detection of the launcher that started a worker (src/base/launcher_env): known answers for every launcher,
// the order of detection, hostlists and tasks per node, the store and the secret, and malformed input.
#include "base/launcher_env.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <aikido/errors.hpp>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace aikido::env {
namespace {

using Vars = std::map<std::string, std::string>;
using Strings = std::vector<std::string>;

Lookup lookup_of(const Vars& vars) {
  return [vars](const char* name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end() || it->second.empty()) return std::nullopt;
    return it->second;
  };
}

LaunchInfo detect(const Vars& vars) { return detect_launch(lookup_of(vars)); }

Vars merged(Vars a, const Vars& b) {
  for (const auto& [k, v] : b) a[k] = v;
  return a;
}

// The ConfigError message of `f`, or "no error".
template <class F>
std::string config_error(F&& f) {
  try {
    f();
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "no error";
}

std::string detect_error(const Vars& vars) {
  return config_error([&] { detect(vars); });
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

const Vars kTorchrun = {{"TORCHELASTIC_RUN_ID", "job7"},
                        {"TORCHELASTIC_RESTART_COUNT", "2"},
                        {"TORCHELASTIC_USE_AGENT_STORE", "True"},
                        {"RANK", "5"},
                        {"WORLD_SIZE", "8"},
                        {"LOCAL_RANK", "1"},
                        {"LOCAL_WORLD_SIZE", "4"},
                        {"GROUP_RANK", "1"},
                        {"GROUP_WORLD_SIZE", "2"},
                        {"MASTER_ADDR", "10.1.0.1"},
                        {"MASTER_PORT", "29500"}};

const Vars kOpenMpi = {{"OMPI_COMM_WORLD_RANK", "1"},
                       {"OMPI_COMM_WORLD_SIZE", "2"},
                       {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                       {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"},
                       {"OMPI_COMM_WORLD_NODE_RANK", "1"},
                       {"OMPI_MCA_orte_num_nodes", "1"},
                       {"OMPI_MCA_ess_base_jobid", "545062913"},
                       {"PMIX_RANK", "1"},
                       {"PMIX_NAMESPACE", "545062913"}};

// Rank 3 of 4, on the second of two nodes with two tasks each.
const Vars kSlurm = {{"SLURM_PROCID", "3"},
                     {"SLURM_NTASKS", "4"},
                     {"SLURM_LOCALID", "1"},
                     {"SLURM_NODEID", "1"},
                     {"SLURM_STEP_NODELIST", "node[01-02]"},
                     {"SLURM_STEP_TASKS_PER_NODE", "2(x2)"},
                     {"SLURM_JOB_NODELIST", "node[01-04]"},
                     {"SLURM_TASKS_PER_NODE", "2(x4)"},
                     {"SLURM_JOB_ID", "123456"},
                     {"SLURM_STEP_ID", "0"}};

const Vars kKubeflow = {{"RANK", "1"}, {"WORLD_SIZE", "3"}, {"MASTER_ADDR", "job-master-0"}, {"MASTER_PORT", "23456"}};

// ---- hostlists and tasks per node ----

TEST(Hostlist, ExpandsKnownAnswers) {
  EXPECT_EQ(expand_hostlist("node[01-04,07]"), (Strings{"node01", "node02", "node03", "node04", "node07"}));
  EXPECT_EQ(expand_hostlist("a[1-2]-b[01-02]"), (Strings{"a1-b01", "a1-b02", "a2-b01", "a2-b02"}));
  EXPECT_EQ(expand_hostlist("x[8-10]"), (Strings{"x8", "x9", "x10"}));
  EXPECT_EQ(expand_hostlist("x[08-10]"), (Strings{"x08", "x09", "x10"}));
  EXPECT_EQ(expand_hostlist("login"), (Strings{"login"}));
  EXPECT_EQ(expand_hostlist("n1,n2,gpu[3-4]"), (Strings{"n1", "n2", "gpu3", "gpu4"}));
  EXPECT_EQ(expand_hostlist("rack[1,3]n[7]"), (Strings{"rack1n7", "rack3n7"}));
  EXPECT_EQ(expand_hostlist("cn[001-002,010],big.mem[5]"), (Strings{"cn001", "cn002", "cn010", "big.mem5"}));
}

TEST(Hostlist, RejectsMalformedListsNamingTheVariable) {
  for (const char* bad : {"", "node[01-04", "node01]", "node[]", "node[a-b]", "node[4-1]", "a,,b", "a,", ",a",
                          "n[1-2[3]]", "n[1-]", "n[-3]", "n[1,,2]", "n[0-2000000]"}) {
    const std::string message = config_error([&] { expand_hostlist(bad, "SLURM_STEP_NODELIST"); });
    EXPECT_TRUE(contains(message, "SLURM_STEP_NODELIST='")) << "'" << bad << "': " << message;
  }
}

TEST(TasksPerNode, ExpandsKnownAnswers) {
  EXPECT_EQ(expand_tasks_per_node("2(x3),1"), (std::vector<int>{2, 2, 2, 1}));
  EXPECT_EQ(expand_tasks_per_node("4"), (std::vector<int>{4}));
  EXPECT_EQ(expand_tasks_per_node("1(x2),3,2(x1)"), (std::vector<int>{1, 1, 3, 2}));
}

TEST(TasksPerNode, RejectsMalformedInputNamingTheVariable) {
  for (const char* bad : {"", "2(x)", "2(3)", "x", "0", "2(x0)", "2,", "2(x3", "(x2)", "2(x3)1", "-1"}) {
    const std::string message = config_error([&] { expand_tasks_per_node(bad, "SLURM_STEP_TASKS_PER_NODE"); });
    EXPECT_TRUE(contains(message, "SLURM_STEP_TASKS_PER_NODE='")) << "'" << bad << "': " << message;
  }
}

TEST(PortFromJobId, KnownAnswers) {
  EXPECT_EQ(port_from_job_id("123456"), 23456);
  EXPECT_EQ(port_from_job_id("7"), 20007);
  const int hashed = port_from_job_id("prterun-host-1234@1");
  EXPECT_GE(hashed, 20000);
  EXPECT_LT(hashed, 30000);
  EXPECT_EQ(hashed, port_from_job_id("prterun-host-1234@1"));
}

// ---- every launcher ----

TEST(DetectLaunch, NothingSetIsOneWorker) {
  const LaunchInfo info = detect({});
  EXPECT_EQ(info.launcher, Launcher::none);
  EXPECT_EQ(info.rank, 0);
  EXPECT_EQ(info.size, 1);
  EXPECT_TRUE(info.store_url.empty());
  EXPECT_FALSE(info.rank0_serves_store);
  EXPECT_EQ(info.one_host(), true);
}

TEST(DetectLaunch, AikidoRun) {
  const LaunchInfo info = detect({{"AIKIDO_RANK", "2"},
                                  {"AIKIDO_SIZE", "3"},
                                  {"AIKIDO_LOCAL_RANK", "2"},
                                  {"AIKIDO_LOCAL_SIZE", "3"},
                                  {"AIKIDO_STORE_ADDR", "127.0.0.1:4000"}});
  EXPECT_EQ(info.launcher, Launcher::aikido);
  EXPECT_EQ(info.rank, 2);
  EXPECT_EQ(info.size, 3);
  EXPECT_EQ(info.local_rank, 2);
  EXPECT_EQ(info.local_size, 3);
  EXPECT_EQ(info.store_url, "tcp://127.0.0.1:4000");
  EXPECT_FALSE(info.rank0_serves_store);
  EXPECT_EQ(info.one_host(), true);
}

TEST(DetectLaunch, AikidoStoreUrlTakesPrecedence) {
  const LaunchInfo info = detect({{"AIKIDO_RANK", "0"},
                                  {"AIKIDO_SIZE", "2"},
                                  {"AIKIDO_STORE", "etcd://10.0.0.1:2379,10.0.0.2:2379"},
                                  {"AIKIDO_STORE_ADDR", "127.0.0.1:4000"}});
  EXPECT_EQ(info.store_url, "etcd://10.0.0.1:2379,10.0.0.2:2379");
  EXPECT_FALSE(info.rank0_serves_store);
}

TEST(DetectLaunch, AikidoWithoutStoreSaysToUseAikidoRun) {
  const std::string message = detect_error({{"AIKIDO_RANK", "1"}, {"AIKIDO_SIZE", "2"}});
  EXPECT_TRUE(contains(message, "aikido-run")) << message;
  EXPECT_TRUE(contains(message, "AIKIDO_STORE")) << message;
}

TEST(DetectLaunch, AikidoSizeWithoutRank) {
  const std::string message = detect_error({{"AIKIDO_SIZE", "2"}, {"AIKIDO_STORE_ADDR", "127.0.0.1:4000"}});
  EXPECT_TRUE(contains(message, "AIKIDO_RANK is not set")) << message;
  // An elastic job's ranks come from its membership.
  EXPECT_EQ(detect({{"AIKIDO_SIZE", "2"}, {"AIKIDO_ELASTIC", "1"}, {"AIKIDO_STORE_ADDR", "127.0.0.1:4000"}}).size, 2);
}

TEST(DetectLaunch, Torchrun) {
  const LaunchInfo info = detect(kTorchrun);
  EXPECT_EQ(info.launcher, Launcher::torchrun);
  EXPECT_EQ(info.rank, 5);
  EXPECT_EQ(info.size, 8);
  EXPECT_EQ(info.local_rank, 1);
  EXPECT_EQ(info.local_size, 4);
  EXPECT_EQ(info.node_rank, 1);
  EXPECT_EQ(info.node_count, 2);
  EXPECT_EQ(info.one_host(), false);
  EXPECT_EQ(info.job_id, "job7-2");
  EXPECT_TRUE(info.rank0_serves_store);
  EXPECT_EQ(info.master_addr, "10.1.0.1");
  // torchrun's agent serves its own store on MASTER_PORT.
  EXPECT_EQ(info.master_port, 29501);
  EXPECT_EQ(info.store_url, "tcp://10.1.0.1:29501");
}

TEST(DetectLaunch, TorchrunWithoutAgentStoreUsesMasterPort) {
  const LaunchInfo info =
      detect(merged(kTorchrun, {{"TORCHELASTIC_USE_AGENT_STORE", "False"}, {"TORCHELASTIC_RUN_ID", "none"}}));
  EXPECT_EQ(info.master_port, 29500);
  EXPECT_EQ(info.job_id, "");  // "none" is every job's default run id
}

TEST(DetectLaunch, StorePortOverridesMasterPort) {
  EXPECT_EQ(detect(merged(kTorchrun, {{"AIKIDO_STORE_PORT", "31000"}})).master_port, 31000);
  EXPECT_EQ(detect(merged(kKubeflow, {{"AIKIDO_STORE_PORT", "31000"}})).master_port, 31000);
  EXPECT_EQ(detect(merged(kSlurm, {{"AIKIDO_STORE_PORT", "31000"}})).master_port, 31000);
}

TEST(DetectLaunch, TorchrunMissingRank) {
  Vars vars = kTorchrun;
  vars.erase("RANK");
  const std::string message = detect_error(vars);
  EXPECT_TRUE(contains(message, "RANK is not set")) << message;
}

TEST(DetectLaunch, TorchrunAgentStoreOnTheLastPort) {
  const std::string message = detect_error(merged(kTorchrun, {{"MASTER_PORT", "65535"}}));
  EXPECT_TRUE(contains(message, "AIKIDO_STORE_PORT")) << message;
}

TEST(DetectLaunch, OpenMpiOnOneHost) {
  const LaunchInfo info = detect(kOpenMpi);
  EXPECT_EQ(info.launcher, Launcher::openmpi);
  EXPECT_EQ(info.rank, 1);
  EXPECT_EQ(info.size, 2);
  EXPECT_EQ(info.local_rank, 1);
  EXPECT_EQ(info.local_size, 2);
  EXPECT_FALSE(info.node_rank);  // OMPI_COMM_WORLD_NODE_RANK is a rank within the node, not the node's index
  EXPECT_EQ(info.node_count, 1);
  EXPECT_EQ(info.job_id, "545062913");
  EXPECT_EQ(info.one_host(), true);
  EXPECT_TRUE(info.rank0_serves_store);
  EXPECT_EQ(info.master_addr, "127.0.0.1");
  EXPECT_EQ(info.master_port, 22913);  // 20000 + job id mod 10000
}

TEST(DetectLaunch, OpenMpiAcrossHostsNeedsMasterAddr) {
  Vars vars = merged(kOpenMpi, {{"OMPI_COMM_WORLD_SIZE", "4"}, {"OMPI_MCA_orte_num_nodes", "2"}});
  const std::string message = detect_error(vars);
  EXPECT_TRUE(contains(message, "MASTER_ADDR")) << message;
  EXPECT_TRUE(contains(message, "mpirun -x MASTER_ADDR")) << message;

  vars["MASTER_ADDR"] = "host1";
  vars["MASTER_PORT"] = "29400";
  const LaunchInfo info = detect(vars);
  EXPECT_EQ(info.store_url, "tcp://host1:29400");
  EXPECT_EQ(info.one_host(), false);
}

TEST(DetectLaunch, OpenMpiWithoutNodeCountUsesLocalSize) {
  Vars vars = merged(kOpenMpi, {{"OMPI_COMM_WORLD_SIZE", "4"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}});
  vars.erase("OMPI_MCA_orte_num_nodes");
  EXPECT_EQ(detect(vars).one_host(), false);
}

TEST(DetectLaunch, PmixInsideSlurmTakesTheRestFromSlurm) {
  const LaunchInfo info = detect(merged(kSlurm, {{"PMIX_RANK", "3"}, {"PMIX_NAMESPACE", "slurm.pmix.123456.0"}}));
  EXPECT_EQ(info.launcher, Launcher::pmix);
  EXPECT_EQ(info.rank, 3);
  EXPECT_EQ(info.size, 4);
  EXPECT_EQ(info.hosts, (Strings{"node01", "node02"}));
  EXPECT_EQ(info.master_addr, "node01");
  EXPECT_EQ(info.master_port, 23456);
}

TEST(DetectLaunch, PmixAndSlurmDisagreeOnTheRank) {
  const std::string message = detect_error(merged(kSlurm, {{"PMIX_RANK", "2"}}));
  EXPECT_TRUE(contains(message, "PMIX_RANK=2 but SLURM_PROCID=3")) << message;
}

TEST(DetectLaunch, PmixAloneHasNoSize) {
  const std::string message = detect_error({{"PMIX_RANK", "0"}, {"PMIX_NAMESPACE", "ns"}});
  EXPECT_TRUE(contains(message, "PMI_SIZE")) << message;
}

TEST(DetectLaunch, PmiOfHydra) {
  const LaunchInfo info = detect({{"PMI_RANK", "2"},
                                  {"PMI_SIZE", "4"},
                                  {"MPI_LOCALRANKID", "0"},
                                  {"MPI_LOCALNRANKS", "2"},
                                  {"MASTER_ADDR", "head"},
                                  {"MASTER_PORT", "29400"}});
  EXPECT_EQ(info.launcher, Launcher::pmi);
  EXPECT_EQ(info.rank, 2);
  EXPECT_EQ(info.size, 4);
  EXPECT_EQ(info.local_rank, 0);
  EXPECT_EQ(info.local_size, 2);
  EXPECT_EQ(info.one_host(), false);
  EXPECT_EQ(info.store_url, "tcp://head:29400");
}

TEST(DetectLaunch, PmiWithoutSize) {
  const std::string message = detect_error({{"PMI_RANK", "2"}});
  EXPECT_TRUE(contains(message, "PMI_SIZE is not set")) << message;
}

TEST(DetectLaunch, Slurm) {
  const LaunchInfo info = detect(kSlurm);
  EXPECT_EQ(info.launcher, Launcher::slurm);
  EXPECT_EQ(info.rank, 3);
  EXPECT_EQ(info.size, 4);
  EXPECT_EQ(info.local_rank, 1);
  EXPECT_EQ(info.local_size, 2);
  EXPECT_EQ(info.node_rank, 1);
  EXPECT_EQ(info.node_count, 2);
  // The step's nodes, not the job's.
  EXPECT_EQ(info.hosts, (Strings{"node01", "node02"}));
  EXPECT_EQ(info.one_host(), false);
  EXPECT_EQ(info.job_id, "123456.0");
  EXPECT_TRUE(info.rank0_serves_store);
  EXPECT_EQ(info.master_addr, "node01");
  EXPECT_EQ(info.master_port, 23456);  // 20000 + SLURM_JOB_ID mod 10000
  EXPECT_EQ(info.store_url, "tcp://node01:23456");
}

TEST(DetectLaunch, SlurmUnevenTasksPerNode) {
  const LaunchInfo info = detect({{"SLURM_PROCID", "6"},
                                  {"SLURM_NTASKS", "7"},
                                  {"SLURM_LOCALID", "0"},
                                  {"SLURM_NODEID", "3"},
                                  {"SLURM_STEP_NODELIST", "a[1-2]-b[01-02]"},
                                  {"SLURM_STEP_TASKS_PER_NODE", "2(x3),1"},
                                  {"SLURM_JOB_ID", "42"}});
  EXPECT_EQ(info.local_size, 1);
  EXPECT_EQ(info.node_count, 4);
  EXPECT_EQ(info.master_addr, "a1-b01");
  EXPECT_EQ(info.master_port, 20042);
}

TEST(DetectLaunch, SlurmJobVariablesWithoutAStep) {
  const LaunchInfo info = detect({{"SLURM_PROCID", "0"},
                                  {"SLURM_NTASKS", "2"},
                                  {"SLURM_NODEID", "0"},
                                  {"SLURM_JOB_NODELIST", "gpu[7-8]"},
                                  {"SLURM_TASKS_PER_NODE", "1(x2)"},
                                  {"SLURM_JOB_ID", "99"}});
  EXPECT_EQ(info.hosts, (Strings{"gpu7", "gpu8"}));
  EXPECT_EQ(info.local_size, 1);
  EXPECT_EQ(info.job_id, "99");
}

TEST(DetectLaunch, SlurmMasterAddrOverridesTheFirstNode) {
  const LaunchInfo info = detect(merged(kSlurm, {{"MASTER_ADDR", "node02"}, {"MASTER_PORT", "29500"}}));
  EXPECT_EQ(info.store_url, "tcp://node02:29500");
}

TEST(DetectLaunch, SlurmInconsistentValues) {
  EXPECT_TRUE(contains(detect_error(merged(kSlurm, {{"SLURM_STEP_TASKS_PER_NODE", "2,3"}})),
                       "SLURM_STEP_TASKS_PER_NODE='2,3' adds up to 5 task(s) but SLURM_NTASKS=4"));
  EXPECT_TRUE(contains(detect_error(merged(kSlurm, {{"SLURM_STEP_TASKS_PER_NODE", "1(x4)"}})),
                       "gives tasks for 4 node(s) but SLURM_STEP_NODELIST lists 2"));
  EXPECT_TRUE(contains(detect_error(merged(kSlurm, {{"SLURM_NODEID", "2"}})),
                       "SLURM_NODEID=2 is not below 2 (the hosts in SLURM_STEP_NODELIST)"));
  EXPECT_TRUE(contains(detect_error(merged(kSlurm, {{"SLURM_LOCALID", "2"}})),
                       "SLURM_LOCALID=2 is not below 2 (the tasks of node 1 in SLURM_STEP_TASKS_PER_NODE)"));
  EXPECT_TRUE(
      contains(detect_error(merged(kSlurm, {{"SLURM_PROCID", "4"}})), "SLURM_PROCID=4 is not below SLURM_NTASKS=4"));
  EXPECT_TRUE(contains(detect_error(merged(kSlurm, {{"SLURM_STEP_NODELIST", "node[02-01]"}})),
                       "SLURM_STEP_NODELIST='node[02-01]' is malformed"));
}

TEST(DetectLaunch, SlurmRankZeroNotOnTheFirstNode) {
  const std::string message =
      detect_error(merged(kSlurm, {{"SLURM_PROCID", "0"}, {"SLURM_LOCALID", "0"}, {"SLURM_NODEID", "1"}}));
  EXPECT_TRUE(contains(message, "rank 0 runs on node 1")) << message;
  EXPECT_TRUE(contains(message, "MASTER_ADDR")) << message;
}

TEST(DetectLaunch, SlurmWithoutTaskCount) {
  const std::string message = detect_error({{"SLURM_PROCID", "0"}});
  EXPECT_TRUE(contains(message, "srun")) << message;
}

TEST(DetectLaunch, KubeflowPyTorchJob) {
  const LaunchInfo info = detect(kKubeflow);
  EXPECT_EQ(info.launcher, Launcher::plain);
  EXPECT_EQ(info.rank, 1);
  EXPECT_EQ(info.size, 3);
  EXPECT_FALSE(info.one_host());  // one worker per pod, but nothing says so
  EXPECT_EQ(info.store_url, "tcp://job-master-0:23456");
  EXPECT_TRUE(info.rank0_serves_store);
}

TEST(DetectLaunch, PlainNeedsBothRankAndWorldSize) {
  EXPECT_TRUE(contains(detect_error({{"RANK", "1"}}), "WORLD_SIZE is not set"));
  EXPECT_TRUE(contains(detect_error({{"WORLD_SIZE", "2"}}), "RANK is not set"));
}

TEST(DetectLaunch, MissingMasterPort) {
  Vars vars = kKubeflow;
  vars.erase("MASTER_PORT");
  const std::string message = detect_error(vars);
  EXPECT_TRUE(contains(message, "MASTER_PORT")) << message;
  EXPECT_TRUE(contains(message, "AIKIDO_STORE_PORT")) << message;
}

TEST(DetectLaunch, OneWorkerNeedsNoStore) {
  const LaunchInfo info = detect({{"RANK", "0"}, {"WORLD_SIZE", "1"}});
  EXPECT_EQ(info.launcher, Launcher::plain);
  EXPECT_TRUE(info.store_url.empty());
}

// ---- order of detection ----

TEST(DetectLaunch, Precedence) {
  const Vars aikido = {{"AIKIDO_RANK", "0"}, {"AIKIDO_SIZE", "2"}, {"AIKIDO_STORE_ADDR", "127.0.0.1:4000"}};
  const Vars pmi = {{"PMI_RANK", "3"}, {"PMI_SIZE", "4"}};
  EXPECT_EQ(detect(merged(kTorchrun, aikido)).launcher, Launcher::aikido);
  EXPECT_EQ(detect(merged(kOpenMpi, kTorchrun)).launcher, Launcher::torchrun);
  // mpirun inside a Slurm allocation: its children inherit Slurm's variables.
  EXPECT_EQ(detect(merged(kSlurm, kOpenMpi)).launcher, Launcher::openmpi);
  EXPECT_EQ(detect(merged(kSlurm, kOpenMpi)).rank, 1);
  EXPECT_EQ(detect(merged(kSlurm, pmi)).launcher, Launcher::pmi);
  EXPECT_EQ(detect(merged(kKubeflow, kSlurm)).launcher, Launcher::slurm);
  EXPECT_EQ(detect(merged(kKubeflow, pmi)).launcher, Launcher::pmi);
}

// ---- malformed values ----

TEST(DetectLaunch, MalformedIntegersNameTheVariable) {
  for (const auto& [name, value] : std::vector<std::pair<std::string, std::string>>{
           {"RANK", "one"}, {"RANK", "-1"}, {"WORLD_SIZE", "0"}, {"WORLD_SIZE", "1.5"}, {"LOCAL_RANK", "x"}}) {
    const std::string message = detect_error(merged(kKubeflow, {{name, value}}));
    EXPECT_TRUE(contains(message, name + "='" + value + "' is not an integer")) << message;
  }
  EXPECT_TRUE(contains(detect_error(merged(kKubeflow, {{"MASTER_PORT", "70000"}})), "MASTER_PORT='70000'"));
  EXPECT_TRUE(contains(detect_error(merged(kKubeflow, {{"AIKIDO_STORE_PORT", "0"}})), "AIKIDO_STORE_PORT='0'"));
}

TEST(DetectLaunch, InconsistentRanksNameBothVariables) {
  EXPECT_TRUE(contains(detect_error(merged(kKubeflow, {{"RANK", "3"}})), "RANK=3 is not below WORLD_SIZE=3"));
  EXPECT_TRUE(
      contains(detect_error(merged(kTorchrun, {{"LOCAL_RANK", "4"}})), "LOCAL_RANK=4 is not below LOCAL_WORLD_SIZE=4"));
  EXPECT_TRUE(contains(detect_error(merged(kTorchrun, {{"LOCAL_WORLD_SIZE", "9"}})),
                       "LOCAL_WORLD_SIZE=9 is more than WORLD_SIZE=8"));
  EXPECT_TRUE(
      contains(detect_error(merged(kTorchrun, {{"GROUP_RANK", "2"}})), "GROUP_RANK=2 is not below GROUP_WORLD_SIZE=2"));
  EXPECT_TRUE(contains(detect_error(merged(kOpenMpi, {{"OMPI_COMM_WORLD_LOCAL_RANK", "2"}})),
                       "OMPI_COMM_WORLD_LOCAL_RANK=2 is not below OMPI_COMM_WORLD_LOCAL_SIZE=2"));
}

TEST(DetectLaunch, MalformedStoreSettings) {
  const Vars base = {{"AIKIDO_RANK", "0"}, {"AIKIDO_SIZE", "2"}};
  EXPECT_TRUE(contains(detect_error(merged(base, {{"AIKIDO_STORE", "10.0.0.1:2379"}})), "AIKIDO_STORE='10.0.0.1"));
  EXPECT_TRUE(contains(detect_error(merged(base, {{"AIKIDO_STORE", "etcd://"}})), "AIKIDO_STORE='etcd://'"));
  EXPECT_TRUE(contains(detect_error(merged(base, {{"AIKIDO_STORE_ADDR", "nohost"}})), "AIKIDO_STORE_ADDR='nohost'"));
  EXPECT_TRUE(contains(detect_error(merged(base, {{"AIKIDO_STORE_ADDR", "h:port"}})), "AIKIDO_STORE_ADDR='h:port'"));
}

// ---- the secret ----

class SecretFile : public ::testing::Test {
 protected:
  void write(const std::string& text) {
    std::ofstream out(path_, std::ios::binary | std::ios::trunc);
    out << text;
  }
  void TearDown() override { std::remove(path_.c_str()); }
  std::string path_ = "/tmp/aikido-secret-test-" + std::to_string(::getpid());
};

TEST_F(SecretFile, FirstLineWithoutTrailingSpace) {
  write("0123abcd \r\nsecond line\n");
  EXPECT_EQ(job_secret(lookup_of({{"AIKIDO_SECRET_FILE", path_}})), "0123abcd");
  write("no newline");
  EXPECT_EQ(job_secret(lookup_of({{"AIKIDO_SECRET_FILE", path_}})), "no newline");
}

TEST_F(SecretFile, SecretVariableTakesPrecedence) {
  write("from-file\n");
  EXPECT_EQ(job_secret(lookup_of({{"AIKIDO_SECRET", "direct"}, {"AIKIDO_SECRET_FILE", path_}})), "direct");
  EXPECT_EQ(job_secret(lookup_of({})), "");
}

TEST_F(SecretFile, EmptyOrMissingFileIsAnError) {
  write("\nsecret on the second line\n");
  const std::string empty = config_error([&] { job_secret(lookup_of({{"AIKIDO_SECRET_FILE", path_}})); });
  EXPECT_TRUE(contains(empty, "empty first line")) << empty;
  EXPECT_TRUE(contains(empty, "openssl rand -hex 32")) << empty;
  const std::string missing = config_error([&] {
    job_secret(lookup_of({{"AIKIDO_SECRET_FILE", path_ + "-does-not-exist"}}));
  });
  EXPECT_TRUE(contains(missing, "AIKIDO_SECRET_FILE='" + path_ + "-does-not-exist' cannot be read")) << missing;
}

TEST(StoreUrlHost, FirstEndpoint) {
  EXPECT_EQ(store_url_host("tcp://node01:23456"), "node01");
  EXPECT_EQ(store_url_host("etcd://10.0.0.1:2379,10.0.0.2:2379"), "10.0.0.1");
  EXPECT_EQ(store_url_host("etcd://h/prefix"), "h");
  EXPECT_EQ(store_url_host(""), "");
}

}  // namespace
}  // namespace aikido::env
