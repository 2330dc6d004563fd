// Who started this worker: the one place that reads the variables of other launchers (torchrun, OpenMPI, PMIx,
// PMI, Slurm, Kubeflow's PyTorchJob) besides Aikido's own (src/base/env.hpp).
//
// Detection order, first match wins:
//   aikido    AIKIDO_RANK or AIKIDO_SIZE (aikido-run sets them)
//   torchrun  TORCHELASTIC_RUN_ID; then RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK,
//             GROUP_WORLD_SIZE, MASTER_ADDR, MASTER_PORT
//   openmpi   OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE (and OMPI_MCA_orte_num_nodes, the number of
//             hosts, where OpenMPI 4 sets it). OMPI_COMM_WORLD_NODE_RANK is the rank among all processes of this
//             node, not the node's index, so it is not read. OpenMPI comes before Slurm: mpirun's children inherit
//             the Slurm variables of the allocation mpirun runs in.
//   pmix      PMIX_RANK; the size from PMI_SIZE or, under srun, SLURM_NTASKS (PMIx itself does not export it)
//   pmi       PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS (MPICH's Hydra, Intel MPI)
//   slurm     SLURM_PROCID, SLURM_NTASKS (SLURM_STEP_NUM_TASKS when set), SLURM_LOCALID, SLURM_NODEID,
//             SLURM_STEP_NODELIST or SLURM_JOB_NODELIST (hostlists such as "node[01-04,07]"),
//             SLURM_STEP_TASKS_PER_NODE or SLURM_TASKS_PER_NODE (such as "2(x3),1"), SLURM_JOB_ID, SLURM_STEP_ID
//   plain     RANK and WORLD_SIZE without TORCHELASTIC_RUN_ID (Kubeflow's PyTorchJob), LOCAL_RANK and
//             LOCAL_WORLD_SIZE where set
//   none      none of these: a job of one worker
//
// The store. AIKIDO_STORE (a URL: tcp://HOST:PORT, or a scheme registered with aikido::register_store_scheme,
// such as etcd://H1:P1,H2:P2) when set; else AIKIDO_STORE_ADDR (HOST:PORT, set by aikido-run); else, for a job of
// several workers, rank 0 serves the embedded store at the master address:
//   host  MASTER_ADDR; under Slurm (and PMIx or PMI inside a Slurm step) the first host of the node list; when the
//         launcher says that every worker is on this host, 127.0.0.1; otherwise a ConfigError names MASTER_ADDR.
//   port  AIKIDO_STORE_PORT; else MASTER_PORT (plus one under torchrun's static rendezvous, whose agent already
//         listens on MASTER_PORT: TORCHELASTIC_USE_AGENT_STORE=True); else 20000 + (the launcher's job id mod
//         10000) (Slurm's SLURM_JOB_ID, OpenMPI's job id, a hash of the PMIx namespace); otherwise a ConfigError
//         names MASTER_PORT and AIKIDO_STORE_PORT.
//
// Everything here reads variables through a Lookup, so tests pass a map instead of changing the environment.
// Inconsistent or malformed values are a ConfigError that names the variable and what is wrong.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace aikido::env {

/// Reads one variable: its value, or nullopt when it is unset or empty.
using Lookup = std::function<std::optional<std::string>(const char* name)>;
/// The process environment (env::get).
Lookup process_lookup();

enum class Launcher : std::uint8_t { none, aikido, torchrun, openmpi, pmix, pmi, slurm, plain };
/// "none", "aikido", "torchrun", "openmpi", "pmix", "pmi", "slurm", "plain".
const char* launcher_name(Launcher launcher);

/// What the launcher says about this worker and its job. A plain value.
struct LaunchInfo {
  Launcher launcher = Launcher::none;
  int rank = 0;
  int size = 1;
  /// Rank among the workers of this host and their number, where the launcher says.
  std::optional<int> local_rank;
  std::optional<int> local_size;
  /// Index of this host among the job's hosts and their number, where the launcher says.
  std::optional<int> node_rank;
  std::optional<int> node_count;
  /// The job's hosts in node order, where the launcher lists them (Slurm; PMIx and PMI inside a Slurm step).
  std::vector<std::string> hosts;
  /// The launcher's identifier of this job (Slurm "JOB.STEP", OpenMPI's job id, the PMIx namespace, torchrun's
  /// "RUN_ID-RESTART"); empty when it gives none.
  std::string job_id;
  /// Where the store is: "tcp://HOST:PORT" or another scheme's URL. Empty for a job of one worker with no store.
  std::string store_url;
  /// True when no launcher serves the store: rank 0 serves it at master_addr:master_port (store_url names them).
  bool rank0_serves_store = false;
  std::string master_addr;
  int master_port = 0;

  /// True or false when the launcher tells whether every worker runs on this host; nullopt when it does not.
  std::optional<bool> one_host() const;
};

/// Detects the launcher from `lookup` (see the top of this file). Throws ConfigError naming the variable when a
/// value is malformed or contradicts another, and when several workers have no way to find a store.
LaunchInfo detect_launch(const Lookup& lookup);

/// Expands a Slurm hostlist: comma-separated names, each with any number of bracketed ranges that keep the
/// zero padding of their lower bound: "node[01-03,07]" gives node01 node02 node03 node07, "a[1-2]-b[01-02]" gives
/// a1-b01 a1-b02 a2-b01 a2-b02 (the leftmost range varies slowest). Throws ConfigError naming `variable` when the
/// list is malformed or expands to more than 1,000,000 names.
std::vector<std::string> expand_hostlist(std::string_view list, std::string_view variable = "hostlist");

/// Expands Slurm's tasks per node: "2(x3),1" gives 2 2 2 1. Throws ConfigError naming `variable` when malformed.
std::vector<int> expand_tasks_per_node(std::string_view text, std::string_view variable = "tasks per node");

/// The port derived from a launcher's job id: 20000 + id mod 10000 for a decimal id, else from a hash of it.
int port_from_job_id(std::string_view job_id);

/// The job secret: AIKIDO_SECRET when set; else the first line of the file AIKIDO_SECRET_FILE names (trailing
/// spaces and carriage return removed; a ConfigError when the file cannot be read or its first line is empty);
/// else empty.
std::string job_secret(const Lookup& lookup);

/// The host of a store URL's first endpoint: "tcp://h:1" and "etcd://h:1,g:2/x" give "h". Empty when none.
std::string store_url_host(std::string_view url);

}  // namespace aikido::env
