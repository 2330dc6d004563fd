// aikido-run: starts the workers of an Aikido job on this host. See `aikido-run --help` and options.cpp.
#include <fcntl.h>
#include <sched.h>
#include <sys/stat.h>
#include <unistd.h>

#include <aikido/errors.hpp>
#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "base/env.hpp"
#include "base/crypto.hpp"
#include "elastic.hpp"
#include "environment.hpp"
#include "hosts.hpp"
#include "observers.hpp"
#include "options.hpp"
#include "output.hpp"
#include "runtime/store_server.hpp"
#include "supervisor.hpp"
#include "transport/socket.hpp"

namespace aikido::run {
namespace {

std::string random_hex(std::size_t bytes) {
  std::vector<std::uint8_t> buffer(bytes);
  detail::random_bytes(buffer.data(), buffer.size());
  return detail::to_hex(buffer);
}

Supervisor::Config supervisor_config(const Options& options, const JobObservers& observers) {
  Supervisor::Config config;
  observers.configure(config);
  config.program_path = options.program_path;
  config.argv = options.argv;
  config.grace = std::chrono::milliseconds(std::int64_t(options.grace_period_s * 1000));
  config.stdout_tty = options.stdout_tty;
  return config;
}

// The control file tells aikido-ctl where the job's store is and proves it may talk to it: owner-only (0600).
void write_control_file(const std::string& path, const std::string& address, const std::string& secret,
                        const std::string& job_id, const TlsOptions& tls) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0 || ::fchmod(fd, 0600) != 0) {
    if (fd >= 0) ::close(fd);
    throw ConfigError("cannot write the control file '" + path + "': " + std::strerror(errno));
  }
  const std::string text = "# aikido-run control endpoint; keep it secret\nstore=" + address + "\nsecret=" + secret +
                           "\njob=" + job_id + "\npid=" + std::to_string(::getpid()) + "\ntls=" +
                           (tls.enabled ? "1" : "0") + "\n" +
                           (tls.cert_file.empty() ? std::string()
                                                  : "tls_cert=" + tls.cert_file + "\ntls_key=" + tls.key_file +
                                                        "\ntls_ca=" + tls.ca_file + "\n");
  const bool ok = write_fully(fd, text.data(), text.size());
  ::close(fd);
  if (!ok) throw ConfigError("cannot write the control file '" + path + "'");
}

int run_elastic_job(const Options& options, elastic::StoreServer& store, const std::string& secret,
                    const std::string& job_id, const JobEnvironment& job, JobObservers& observers) {
  ElasticSetup setup;
  setup.store = store.local_store();
  setup.membership = make_membership_store(setup.store, job_id);
  setup.host = transport::host_name();
  ElasticController::publish_first_version(options, *setup.membership, setup.host);
  setup.events = &observers.events();
  ElasticController controller(options, std::move(setup), job_id, job.shared);
  if (!options.control_file.empty()) write_control_file(options.control_file, store.address(), secret, job_id, options.tls);
  Supervisor supervisor(supervisor_config(options, observers));
  supervisor.set_controller(&controller);
  const int status = supervisor.run(controller.initial_workers());
  if (!options.control_file.empty()) ::unlink(options.control_file.c_str());
  return status;
}

int run_static_job(const Options& options, const JobEnvironment& job, const JobObservers& observers) {
  // Like mpirun's default: when there are no more workers than CPUs, worker i gets its own block of CPUs (as many as
  // its share of threads), so that a waiting worker spins on its own core and the scheduler cannot pile workers
  // that wake each other onto one core.
  std::vector<int> cpus;
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (options.bind_to_core && ::sched_getaffinity(0, sizeof allowed, &allowed) == 0) {
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
      if (CPU_ISSET(cpu, &allowed)) cpus.push_back(cpu);
    }
  }
  const bool bind = options.bind_to_core && options.np <= int(cpus.size());
  const std::size_t share = bind ? cpus.size() / std::size_t(options.np) : 0;
  std::vector<Supervisor::Worker> workers;
  for (int rank = 0; rank < options.np; ++rank) {
    Supervisor::Worker worker;
    worker.rank = rank;
    for (std::size_t i = 0; i < share; ++i) worker.cpus.push_back(cpus[std::size_t(rank) * share + i]);
    worker.id = std::uint64_t(rank);
    worker.environment = job.shared;
    worker.environment.push_back(std::string(env::kRank) + "=" + std::to_string(rank));
    worker.environment.push_back(std::string(env::kLocalRank) + "=" + std::to_string(rank));
    workers.push_back(std::move(worker));
  }
  Supervisor supervisor(supervisor_config(options, observers));
  return supervisor.run(workers);
}

int run_job(const Options& options) {
  Supervisor::block_signals();  // before the store starts its threads, so that they inherit the mask

  const std::string secret = random_hex(32);
  const std::string job_id = random_hex(6);
  elastic::StoreServer store("127.0.0.1", 0, secret, options.tls);
  const JobEnvironment job = job_environment(options, store.address(), secret, job_id);
  JobObservers observers(options);
  observers.events().emit("job_started", {{"job", job_id},
                                          {"workers", options.np},
                                          {"elastic", options.elastic},
                                          {"min_workers", options.min_np},
                                          {"max_workers", options.max_np},
                                          {"program", options.program}});
  observers.start_metrics(store.address(), secret, job_id, std::max(options.np, options.max_np), options.elastic);
  const int status = options.elastic ? run_elastic_job(options, store, secret, job_id, job, observers)
                                     : run_static_job(options, job, observers);
  observers.finish(status);
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
  // Settings the workers would inherit are checked like the flags: a bad one stops the job before any worker runs.
  if (const auto problems = inherited_setting_problems(options); !problems.empty()) {
    for (const auto& problem : problems) report("aikido-run: " + problem);
    return 2;
  }
  try {
    if (!options.replay.empty()) {
      Supervisor::block_signals();  // before the server's threads start: sigwait() takes the signals
      return JobObservers::replay(options);
    }
    if (options.across_hosts()) return run_host_job(options);
    if (options.starts_hosts()) return run_from_one_host(options);
    return run_job(options);
  } catch (const aikido::Error& e) {
    report(std::string("aikido-run: ") + e.what());
  } catch (const std::exception& e) {
    report(std::string("aikido-run: unexpected error: ") + e.what());
  }
  return 1;
}
