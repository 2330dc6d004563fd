// aikido-run: starts the workers of an Aikido job on this host. See `aikido-run --help` and options.cpp.
#include <fcntl.h>
#include <sched.h>
#include <unistd.h>

#include <aikido/errors.hpp>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <set>
#include <string>
#include <vector>

#include "base/env.hpp"
#include "base/sha256.hpp"
#include "elastic/store_server.hpp"
#include "options.hpp"
#include "output.hpp"
#include "supervisor.hpp"
#include "transport/socket.hpp"

extern char** environ;

namespace aikido::run {
namespace {

constexpr std::chrono::milliseconds kGracePeriod{3000};

std::string random_hex(std::size_t bytes) {
  std::vector<std::uint8_t> buffer(bytes);
  detail::random_bytes(buffer.data(), buffer.size());
  return detail::to_hex(buffer);
}

// What every worker shares: aikido-run's environment with the job's settings applied. Each worker adds its
// AIKIDO_RANK and AIKIDO_LOCAL_RANK.
struct JobEnvironment {
  std::vector<std::string> shared;
};

JobEnvironment job_environment(const Options& options, const std::string& store_address, const std::string& secret,
                               const std::string& job_id) {
  std::vector<std::pair<std::string, std::string>> settings = {
      {env::kSize, std::to_string(options.np)},
      {env::kLocalSize, std::to_string(options.np)},
      {env::kHost, transport::host_name()},
      {env::kStoreAddr, store_address},
      {env::kSecret, secret},
      {env::kJobId, job_id},
      {env::kClusterVersion, "0"},
  };
  if (options.topology) settings.emplace_back(env::kTopology, *options.topology);
  if (options.timeout) settings.emplace_back(env::kTimeout, *options.timeout);
  if (options.transport) settings.emplace_back(env::kTransport, *options.transport);
  if (options.segment_bytes) settings.emplace_back(env::kSegmentBytes, *options.segment_bytes);

  std::set<std::string> replaced = {env::kRank, env::kLocalRank};
  for (const auto& [name, value] : settings) replaced.insert(name);

  JobEnvironment job;
  bool have_omp_threads = false;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry = *e;
    const std::string name = entry.substr(0, entry.find('='));
    if (replaced.count(name) > 0) continue;
    if (name == "OMP_NUM_THREADS") have_omp_threads = true;
    job.shared.push_back(entry);
  }
  // Several workers share this host's cores; one OpenMP thread each unless the user says otherwise.
  if (!have_omp_threads) job.shared.push_back("OMP_NUM_THREADS=1");
  for (const auto& [name, value] : settings) job.shared.push_back(name + "=" + value);
  return job;
}

int run_job(const Options& options) {
  Supervisor::block_signals();  // before the store starts its threads, so that they inherit the mask

  const std::string secret = random_hex(32);
  const std::string job_id = random_hex(6);
  elastic::StoreServer store("127.0.0.1", 0, secret);
  const JobEnvironment job = job_environment(options, store.address(), secret, job_id);

  // Like mpirun's default: with a core each, a waiting worker spins on its own core and the scheduler cannot pile
  // workers that wake each other onto one core.
  std::vector<int> cpus;
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (options.bind_to_core && ::sched_getaffinity(0, sizeof allowed, &allowed) == 0) {
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
      if (CPU_ISSET(cpu, &allowed)) cpus.push_back(cpu);
    }
  }
  const bool bind = options.bind_to_core && options.np <= int(cpus.size());
  std::vector<Supervisor::Worker> workers;
  for (int rank = 0; rank < options.np; ++rank) {
    Supervisor::Worker worker;
    worker.rank = rank;
    if (bind) worker.cpu = cpus[std::size_t(rank)];
    worker.environment = job.shared;
    worker.environment.push_back(std::string(env::kRank) + "=" + std::to_string(rank));
    worker.environment.push_back(std::string(env::kLocalRank) + "=" + std::to_string(rank));
    workers.push_back(std::move(worker));
  }
  Supervisor supervisor(options.program_path, options.argv, kGracePeriod);
  const int status = supervisor.run(workers);
  store.stop();
  return status;
}

}  // namespace
}  // namespace aikido::run

int main(int argc, char** argv) {
  using namespace aikido::run;
  // Descriptors 0-2 must be taken, or the pipes to the workers could land on them and be mixed up in the child.
  for (int fd = 0; fd <= 2; ++fd) {
    if (::fcntl(fd, F_GETFD) == -1 && ::open("/dev/null", O_RDWR) != fd) return 1;
  }
  Options options;
  try {
    options = parse_options(argc, argv);
  } catch (const UsageError& e) {
    report(e.what());
    return 2;
  }
  if (options.help) {
    const std::string text = usage();
    write_fully(STDOUT_FILENO, text.data(), text.size());
    return 0;
  }
  try {
    return run_job(options);
  } catch (const aikido::Error& e) {
    report(std::string("aikido-run: ") + e.what());
  } catch (const std::exception& e) {
    report(std::string("aikido-run: unexpected error: ") + e.what());
  }
  return 1;
}
