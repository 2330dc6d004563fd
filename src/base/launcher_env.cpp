#include "base/launcher_env.hpp"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <numeric>

#include "base/env.hpp"
#include "base/error.hpp"

namespace aikido::env {

using detail::str_cat;

namespace {

constexpr int kMaxRanks = 1 << 20;
constexpr std::size_t kMaxHosts = 1'000'000;
constexpr std::size_t kMaxSecretBytes = 64 << 10;
// Ports derived from a job id: below Linux's default ephemeral range (32768-60999), so that outgoing connections
// never hold them.
constexpr int kDerivedPortBase = 20000;
constexpr int kDerivedPortSpan = 10000;

[[noreturn]] void malformed(std::string_view variable, std::string_view value, const std::string& problem) {
  throw ConfigError(str_cat(variable, "='", value, "' is malformed: ", problem));
}

// Decimal digits only, no sign, at most `max`.
std::optional<std::int64_t> parse_decimal(std::string_view text, std::int64_t max) {
  if (text.empty() || text.size() > 18) return std::nullopt;
  std::int64_t value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
    value = value * 10 + (c - '0');
  }
  if (value > max) return std::nullopt;
  return value;
}

// Reads variables through the Lookup, with the checks every launcher needs.
class Reader {
 public:
  explicit Reader(const Lookup& lookup) : lookup_(lookup) {}

  std::optional<std::string> get(const char* name) const { return lookup_(name); }
  bool has(const char* name) const { return get(name).has_value(); }

  std::optional<int> opt_int(const char* name, int min, int max) const {
    auto text = get(name);
    if (!text) return std::nullopt;
    auto value = parse_decimal(*text, max);
    if (!value || *value < min) {
      throw ConfigError(str_cat(name, "='", *text, "' is not an integer in [", min, ", ", max, "]"));
    }
    return int(*value);
  }

  int req_int(const char* name, int min, int max, std::string_view context) const {
    auto value = opt_int(name, min, max);
    if (!value) throw ConfigError(str_cat(name, " is not set, but ", context));
    return *value;
  }

  // The first variable of `names` that is set, or nullptr.
  const char* first_set(std::initializer_list<const char*> names) const {
    for (const char* name : names) {
      if (has(name)) return name;
    }
    return nullptr;
  }

 private:
  const Lookup& lookup_;
};

// Names of the variables a launcher gave each field in, for error messages.
struct Sources {
  std::string rank, size, local_rank, local_size, node_rank, node_count;
};

struct Detected {
  LaunchInfo info;
  Sources from;
  // Set when the store, if rank 0 serves it, is at MASTER_PORT + 1 (torchrun's agent listens on MASTER_PORT).
  bool master_port_taken = false;
  // Under Slurm: the variable the node list came from.
  std::string hosts_from;
  // The job id a store port is derived from when none is given (Slurm's job id without the step).
  std::string port_key;
};

void detect_aikido(const Reader& r, Detected& d) {
  auto& info = d.info;
  info.launcher = Launcher::aikido;
  info.size = r.opt_int(kSize, 1, kMaxRanks).value_or(1);
  // An elastic job's ranks come from its membership, not from the environment.
  const bool elastic = r.get(kElastic).value_or("0") == "1";
  if (info.size > 1 && !elastic) {
    info.rank = r.req_int(kRank, 0, kMaxRanks, str_cat(kSize, "=", info.size, " says this is one of several workers"));
  } else {
    info.rank = r.opt_int(kRank, 0, kMaxRanks).value_or(0);
  }
  info.local_rank = r.opt_int(kLocalRank, 0, kMaxRanks);
  info.local_size = r.opt_int(kLocalSize, 1, kMaxRanks);
  d.from = {kRank, kSize, kLocalRank, kLocalSize, "", ""};
}

void detect_torchrun(const Reader& r, Detected& d) {
  auto& info = d.info;
  info.launcher = Launcher::torchrun;
  const std::string context = "TORCHELASTIC_RUN_ID is set (a worker of torchrun), and torchrun sets it";
  info.rank = r.req_int("RANK", 0, kMaxRanks, context);
  info.size = r.req_int("WORLD_SIZE", 1, kMaxRanks, context);
  info.local_rank = r.opt_int("LOCAL_RANK", 0, kMaxRanks);
  info.local_size = r.opt_int("LOCAL_WORLD_SIZE", 1, kMaxRanks);
  info.node_rank = r.opt_int("GROUP_RANK", 0, kMaxRanks);
  info.node_count = r.opt_int("GROUP_WORLD_SIZE", 1, kMaxRanks);
  d.from = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE"};
  const std::string run_id = r.get("TORCHELASTIC_RUN_ID").value_or("none");
  // "none" is torchrun's default for every job; each restart is a new set of workers.
  if (run_id != "none") info.job_id = str_cat(run_id, "-", r.get("TORCHELASTIC_RESTART_COUNT").value_or("0"));
  const std::string agent_store = r.get("TORCHELASTIC_USE_AGENT_STORE").value_or("");
  d.master_port_taken = agent_store == "True" || agent_store == "true" || agent_store == "1";
}

void detect_openmpi(const Reader& r, Detected& d) {
  auto& info = d.info;
  info.launcher = Launcher::openmpi;
  info.rank = *r.opt_int("OMPI_COMM_WORLD_RANK", 0, kMaxRanks);  // set: it is how OpenMPI was detected
  info.size = r.req_int("OMPI_COMM_WORLD_SIZE", 1, kMaxRanks, "OMPI_COMM_WORLD_RANK is set (a process of mpirun)");
  info.local_rank = r.opt_int("OMPI_COMM_WORLD_LOCAL_RANK", 0, kMaxRanks);
  info.local_size = r.opt_int("OMPI_COMM_WORLD_LOCAL_SIZE", 1, kMaxRanks);
  info.node_count = r.opt_int("OMPI_MCA_orte_num_nodes", 1, kMaxRanks);
  d.from = {
      "OMPI_COMM_WORLD_RANK",   "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "",
      "OMPI_MCA_orte_num_nodes"};
  info.job_id = r.get("OMPI_MCA_ess_base_jobid").value_or(r.get("PMIX_NAMESPACE").value_or(""));
  d.port_key = info.job_id;
}

void detect_slurm(const Reader& r, Detected& d) {
  auto& info = d.info;
  info.launcher = Launcher::slurm;
  info.rank = *r.opt_int("SLURM_PROCID", 0, kMaxRanks);  // set: it is how Slurm was detected
  const char* size_var = r.first_set({"SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"});
  if (size_var == nullptr) {
    throw ConfigError(
        "SLURM_PROCID is set but SLURM_NTASKS is not: start the workers with srun (srun -n N or --ntasks-per-node), "
        "which sets both");
  }
  info.size = *r.opt_int(size_var, 1, kMaxRanks);
  info.local_rank = r.opt_int("SLURM_LOCALID", 0, kMaxRanks);
  info.node_rank = r.opt_int("SLURM_NODEID", 0, kMaxRanks);
  d.from = {"SLURM_PROCID", size_var, "SLURM_LOCALID", "", "SLURM_NODEID", ""};

  // The step's node list and tasks per node when srun started this process, the job's otherwise; never mixed.
  const bool step = r.has("SLURM_STEP_NODELIST");
  const char* list_var = step ? "SLURM_STEP_NODELIST" : r.first_set({"SLURM_JOB_NODELIST", "SLURM_NODELIST"});
  const char* tasks_var = step ? "SLURM_STEP_TASKS_PER_NODE" : "SLURM_TASKS_PER_NODE";
  if (list_var != nullptr) {
    info.hosts = expand_hostlist(*r.get(list_var), list_var);
    info.node_count = int(info.hosts.size());
    d.hosts_from = list_var;
    d.from.node_count = str_cat("the hosts in ", list_var);
  }
  if (auto tasks_text = r.get(tasks_var)) {
    const std::vector<int> tasks = expand_tasks_per_node(*tasks_text, tasks_var);
    if (!info.hosts.empty() && tasks.size() != info.hosts.size()) {
      throw ConfigError(str_cat(tasks_var, "='", *tasks_text, "' gives tasks for ", tasks.size(), " node(s) but ",
                                list_var, " lists ", info.hosts.size()));
    }
    const long total = std::accumulate(tasks.begin(), tasks.end(), 0L);
    if (total != info.size) {
      throw ConfigError(
          str_cat(tasks_var, "='", *tasks_text, "' adds up to ", total, " task(s) but ", size_var, "=", info.size));
    }
    if (!info.node_count) {
      info.node_count = int(tasks.size());
      d.from.node_count = str_cat("the nodes in ", tasks_var);
    }
    if (info.node_rank && *info.node_rank < int(tasks.size())) {
      info.local_size = tasks[std::size_t(*info.node_rank)];
      d.from.local_size = str_cat("the tasks of node ", *info.node_rank, " in ", tasks_var);
    }
  }
  if (auto job = r.get("SLURM_JOB_ID").value_or(r.get("SLURM_JOBID").value_or("")); !job.empty()) {
    const std::string step_id = r.get("SLURM_STEP_ID").value_or(r.get("SLURM_STEPID").value_or(""));
    info.job_id = step_id.empty() ? job : str_cat(job, ".", step_id);
    d.port_key = job;  // the documented rule users can compute: 20000 + SLURM_JOB_ID mod 10000
  }
}

// PMIx and PMI give the rank (and PMI the size); inside a Slurm step (srun --mpi=pmix or pmi2) Slurm's variables
// describe the same task and give the rest.
void detect_pmi(const Reader& r, Detected& d, bool pmix) {
  const char* rank_var = pmix ? "PMIX_RANK" : "PMI_RANK";
  const int rank = *r.opt_int(rank_var, 0, kMaxRanks);  // set: it is how PMIx or PMI was detected
  const std::string namespace_id = r.get("PMIX_NAMESPACE").value_or("");
  if (r.has("SLURM_PROCID")) {
    detect_slurm(r, d);
    if (d.info.rank != rank) {
      throw ConfigError(str_cat(rank_var, "=", rank, " but SLURM_PROCID=", d.info.rank,
                                ": the process manager and Slurm disagree on this worker's rank"));
    }
    if (auto size = r.opt_int("PMI_SIZE", 1, kMaxRanks); size && *size != d.info.size) {
      throw ConfigError(str_cat("PMI_SIZE=", *size, " but ", d.from.size, "=", d.info.size,
                                ": the process manager and Slurm disagree on the number of workers"));
    }
    d.info.launcher = pmix ? Launcher::pmix : Launcher::pmi;
    d.from.rank = rank_var;
    return;
  }
  auto& info = d.info;
  info.launcher = pmix ? Launcher::pmix : Launcher::pmi;
  info.rank = rank;
  if (pmix && !r.has("PMI_SIZE")) {
    throw ConfigError(str_cat("PMIX_RANK=", rank,
                              " is set, but neither PMI_SIZE nor SLURM_NTASKS gives the number of workers (PMIx does "
                              "not export it); start the workers with mpirun or srun, or set ",
                              kRank, " and ", kSize, " for each worker"));
  }
  info.size = r.req_int("PMI_SIZE", 1, kMaxRanks, str_cat(rank_var, " is set (a process of an MPI launcher)"));
  info.local_rank = r.opt_int("MPI_LOCALRANKID", 0, kMaxRanks);
  info.local_size = r.opt_int("MPI_LOCALNRANKS", 1, kMaxRanks);
  d.from = {rank_var, "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "", ""};
  info.job_id = pmix ? namespace_id : r.get("PMI_JOBID").value_or("");
  d.port_key = info.job_id;
}

void detect_plain(const Reader& r, Detected& d) {
  auto& info = d.info;
  info.launcher = Launcher::plain;
  info.rank = r.req_int("RANK", 0, kMaxRanks, "WORLD_SIZE is set; set both (or neither)");
  info.size = r.req_int("WORLD_SIZE", 1, kMaxRanks, "RANK is set; set both (or neither)");
  info.local_rank = r.opt_int("LOCAL_RANK", 0, kMaxRanks);
  info.local_size = r.opt_int("LOCAL_WORLD_SIZE", 1, kMaxRanks);
  d.from = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "", ""};
}

// "NAME=value" for a variable, "value (description)" for a value derived from one.
std::string named(const std::string& source, int value) {
  const bool variable = std::all_of(source.begin(), source.end(), [](char c) { return std::isupper(c) || c == '_'; });
  return variable ? str_cat(source, "=", value) : str_cat(value, " (", source, ")");
}

void check_consistent(const Detected& d) {
  const LaunchInfo& info = d.info;
  const Sources& from = d.from;
  if (info.rank >= info.size) {
    throw ConfigError(str_cat(named(from.rank, info.rank), " is not below ", named(from.size, info.size)));
  }
  if (info.local_size && *info.local_size > info.size) {
    throw ConfigError(str_cat(named(from.local_size, *info.local_size), " is more than ", named(from.size, info.size)));
  }
  if (info.local_rank && info.local_size && *info.local_rank >= *info.local_size) {
    throw ConfigError(
        str_cat(named(from.local_rank, *info.local_rank), " is not below ", named(from.local_size, *info.local_size)));
  }
  if (info.node_rank && info.node_count && *info.node_rank >= *info.node_count) {
    throw ConfigError(
        str_cat(named(from.node_rank, *info.node_rank), " is not below ", named(from.node_count, *info.node_count)));
  }
  if (info.node_count && *info.node_count > info.size) {
    throw ConfigError(str_cat("more hosts (", named(from.node_count, *info.node_count), ") than workers (",
                              named(from.size, info.size), ")"));
  }
}

// What to set when rank 0's store has no address.
std::string master_hint(Launcher launcher) {
  switch (launcher) {
    case Launcher::openmpi:
      return "mpirun does not say where rank 0 runs when the job spans hosts: set MASTER_ADDR to rank 0's host "
             "and MASTER_PORT to a free port there (mpirun -x MASTER_ADDR=HOST -x MASTER_PORT=PORT ...), or "
             "AIKIDO_STORE=etcd://HOST:PORT";
    case Launcher::aikido:
      return "start the workers with aikido-run, or set AIKIDO_STORE (a store URL), or MASTER_ADDR and MASTER_PORT "
             "(rank 0 then serves the store there)";
    default:
      return "set MASTER_ADDR to rank 0's host and MASTER_PORT to a free port there (rank 0 serves the store), or "
             "AIKIDO_STORE to a store URL such as etcd://HOST:PORT";
  }
}

void choose_master(const Reader& r, Detected& d) {
  LaunchInfo& info = d.info;
  const std::string job = str_cat(launcher_name(info.launcher), " job of ", info.size, " workers");
  if (auto addr = r.get("MASTER_ADDR")) {
    info.master_addr = *addr;
  } else if (!info.hosts.empty()) {
    info.master_addr = info.hosts.front();
    if (info.rank == 0 && info.node_rank && *info.node_rank != 0) {
      throw ConfigError(str_cat("rank 0 runs on node ", *info.node_rank, " of ", d.hosts_from,
                                ", not on its first host '", info.hosts.front(),
                                "' where the other workers look for its store (a task distribution that does not "
                                "start on the first node); set MASTER_ADDR to rank 0's host, or AIKIDO_STORE"));
    }
  } else if (info.one_host() == true) {
    info.master_addr = "127.0.0.1";
  } else {
    throw ConfigError(str_cat("this ", job, " has no store: MASTER_ADDR is not set; ", master_hint(info.launcher)));
  }

  if (auto port = r.opt_int(kStorePort, 1, 65535)) {
    info.master_port = *port;
  } else if (auto master_port = r.opt_int("MASTER_PORT", 1, 65535)) {
    info.master_port = *master_port + (d.master_port_taken ? 1 : 0);
    if (info.master_port > 65535) {
      throw ConfigError(str_cat("MASTER_PORT=", *master_port,
                                " is torchrun's own store, and the next port, where Aikido's would go, does not exist; "
                                "set ",
                                kStorePort));
    }
  } else if (!d.port_key.empty()) {
    info.master_port = port_from_job_id(d.port_key);
  } else {
    throw ConfigError(str_cat("this ", job, " has no store port: set MASTER_PORT (or ", kStorePort,
                              ") to a free TCP port on rank 0's host ", info.master_addr));
  }
  info.rank0_serves_store = true;
  info.store_url = str_cat("tcp://", info.master_addr, ":", info.master_port);
}

void choose_store(const Reader& r, Detected& d) {
  LaunchInfo& info = d.info;
  if (auto url = r.get(kStore)) {
    const auto sep = url->find("://");
    if (sep == std::string::npos || sep == 0 || sep + 3 == url->size()) {
      malformed(kStore, *url, "a store URL is SCHEME://ADDRESS, such as tcp://HOST:PORT or etcd://HOST:PORT");
    }
    info.store_url = *url;
  } else if (auto address = r.get(kStoreAddr)) {
    const auto colon = address->rfind(':');
    if (colon == std::string::npos || colon == 0 || !parse_decimal(address->substr(colon + 1), 65535)) {
      malformed(kStoreAddr, *address, "expected HOST:PORT");
    }
    info.store_url = "tcp://" + *address;
  } else if (info.size > 1) {
    choose_master(r, d);
  }
}

}  // namespace

Lookup process_lookup() {
  return [](const char* name) { return get(name); };
}

const char* launcher_name(Launcher launcher) {
  switch (launcher) {
    case Launcher::none:
      return "none";
    case Launcher::aikido:
      return "aikido";
    case Launcher::torchrun:
      return "torchrun";
    case Launcher::openmpi:
      return "openmpi";
    case Launcher::pmix:
      return "pmix";
    case Launcher::pmi:
      return "pmi";
    case Launcher::slurm:
      return "slurm";
    case Launcher::plain:
      return "plain";
  }
  return "unknown";
}

std::optional<bool> LaunchInfo::one_host() const {
  if (size == 1) return true;
  if (node_count) return *node_count == 1;
  if (!hosts.empty()) return hosts.size() == 1;
  if (local_size) return *local_size == size;
  return std::nullopt;
}

LaunchInfo detect_launch(const Lookup& lookup) {
  const Reader r(lookup);
  Detected d;
  if (r.has(kRank) || r.has(kSize)) {
    detect_aikido(r, d);
  } else if (r.has("TORCHELASTIC_RUN_ID")) {
    detect_torchrun(r, d);
  } else if (r.has("OMPI_COMM_WORLD_RANK")) {
    detect_openmpi(r, d);
  } else if (r.has("PMIX_RANK")) {
    detect_pmi(r, d, true);
  } else if (r.has("PMI_RANK")) {
    detect_pmi(r, d, false);
  } else if (r.has("SLURM_PROCID")) {
    detect_slurm(r, d);
  } else if (r.has("RANK") || r.has("WORLD_SIZE")) {
    detect_plain(r, d);
  }
  check_consistent(d);
  choose_store(r, d);
  return d.info;
}

std::vector<std::string> expand_hostlist(std::string_view list, std::string_view variable) {
  std::vector<std::string> hosts;
  // One comma-separated item at a time; commas inside brackets separate ranges.
  std::size_t pos = 0;
  while (pos <= list.size()) {
    std::size_t end = pos;
    int depth = 0;
    while (end < list.size() && (depth > 0 || list[end] != ',')) {
      if (list[end] == '[') {
        if (++depth > 1) malformed(variable, list, "nested '['");
      } else if (list[end] == ']') {
        if (--depth < 0) malformed(variable, list, "']' without '['");
      }
      ++end;
    }
    if (depth != 0) malformed(variable, list, "'[' without ']'");
    const std::string_view item = list.substr(pos, end - pos);
    if (item.empty()) malformed(variable, list, "an empty host name");

    // Expand the item: a cartesian product of its bracketed ranges, the leftmost varying slowest.
    std::vector<std::string> names = {""};
    std::size_t i = 0;
    while (i < item.size()) {
      if (item[i] != '[') {
        const std::size_t next = std::min(item.find('[', i), item.size());
        for (auto& n : names) n.append(item.substr(i, next - i));
        i = next;
        continue;
      }
      const std::size_t close = item.find(']', i);
      const std::string_view ranges = item.substr(i + 1, close - i - 1);
      std::vector<std::string> values;
      std::size_t r = 0;
      while (r <= ranges.size()) {
        const std::size_t comma = std::min(ranges.find(',', r), ranges.size());
        const std::string_view range = ranges.substr(r, comma - r);
        const std::size_t dash = range.find('-');
        const std::string_view low = range.substr(0, dash);
        const std::string_view high = dash == std::string_view::npos ? low : range.substr(dash + 1);
        const auto lo = parse_decimal(low, 999'999'999), hi = parse_decimal(high, 999'999'999);
        if (!lo || !hi) malformed(variable, list, str_cat("'", range, "' is not a number or a range A-B"));
        if (*lo > *hi) malformed(variable, list, str_cat("the range '", range, "' runs backwards"));
        if (std::uint64_t(*hi - *lo) + values.size() >= kMaxHosts) {
          malformed(variable, list, str_cat("it names more than ", kMaxHosts, " hosts"));
        }
        for (std::int64_t v = *lo; v <= *hi; ++v) {
          std::string digits = std::to_string(v);
          if (digits.size() < low.size()) digits.insert(0, low.size() - digits.size(), '0');
          values.push_back(std::move(digits));
        }
        r = comma + 1;
      }
      if (names.size() * values.size() + hosts.size() > kMaxHosts) {
        malformed(variable, list, str_cat("it names more than ", kMaxHosts, " hosts"));
      }
      std::vector<std::string> product;
      product.reserve(names.size() * values.size());
      for (const auto& n : names) {
        for (const auto& v : values) product.push_back(n + v);
      }
      names = std::move(product);
      i = close + 1;
    }
    hosts.insert(hosts.end(), names.begin(), names.end());
    pos = end + 1;
  }
  return hosts;
}

std::vector<int> expand_tasks_per_node(std::string_view text, std::string_view variable) {
  std::vector<int> tasks;
  std::size_t pos = 0;
  while (pos <= text.size()) {
    const std::size_t end = std::min(text.find(',', pos), text.size());
    const std::string_view item = text.substr(pos, end - pos);
    const std::size_t paren = item.find('(');
    const auto count = parse_decimal(item.substr(0, paren), kMaxRanks);
    if (!count || *count < 1) malformed(variable, text, str_cat("'", item, "' is not a task count N or N(xM)"));
    std::int64_t repeat = 1;
    if (paren != std::string_view::npos) {
      const std::string_view times = item.substr(paren);
      const auto m = times.size() > 3 && times.substr(0, 2) == "(x" && times.back() == ')'
                         ? parse_decimal(times.substr(2, times.size() - 3), kMaxRanks)
                         : std::nullopt;
      if (!m || *m < 1) malformed(variable, text, str_cat("'", item, "' is not a task count N or N(xM)"));
      repeat = *m;
    }
    if (tasks.size() + std::size_t(repeat) > kMaxHosts) {
      malformed(variable, text, str_cat("it names more than ", kMaxHosts, " nodes"));
    }
    tasks.insert(tasks.end(), std::size_t(repeat), int(*count));
    pos = end + 1;
  }
  return tasks;
}

int port_from_job_id(std::string_view job_id) {
  std::uint64_t n = 0;
  if (auto decimal = parse_decimal(job_id, INT64_MAX / 10)) {
    n = std::uint64_t(*decimal);
  } else {
    n = 14695981039346656037ull;  // FNV-1a
    for (unsigned char c : job_id) n = (n ^ c) * 1099511628211ull;
  }
  return kDerivedPortBase + int(n % kDerivedPortSpan);
}

std::string job_secret(const Lookup& lookup) {
  if (auto secret = lookup(kSecret)) return *secret;
  auto path = lookup(kSecretFile);
  if (!path) return "";
  std::ifstream file(*path, std::ios::binary);
  if (!file) {
    throw ConfigError(str_cat(kSecretFile, "='", *path, "' cannot be read: ", std::strerror(errno),
                              "; every worker needs to read the job's secret file"));
  }
  std::string line;
  char c;
  while (line.size() < kMaxSecretBytes && file.get(c) && c != '\n') line.push_back(c);
  if (file.bad()) throw ConfigError(str_cat(kSecretFile, "='", *path, "' cannot be read: ", std::strerror(errno)));
  while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.pop_back();
  if (line.empty()) {
    throw ConfigError(str_cat(kSecretFile, "='", *path,
                              "' has an empty first line; write the secret there, e.g. openssl rand -hex 32 > ",
                              *path));
  }
  return line;
}

std::string store_url_host(std::string_view url) {
  const auto sep = url.find("://");
  std::string_view rest = sep == std::string_view::npos ? url : url.substr(sep + 3);
  rest = rest.substr(0, std::min(rest.find_first_of(",/"), rest.size()));
  const auto colon = rest.rfind(':');
  return std::string(colon == std::string_view::npos ? rest : rest.substr(0, colon));
}

}  // namespace aikido::env
