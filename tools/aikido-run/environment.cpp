#include "environment.hpp"

#include <unistd.h>

#include <algorithm>
#include <set>
#include <utility>

#include "base/env.hpp"
#include "transport/socket.hpp"

extern char** environ;

namespace aikido::run {
namespace {

// Settings of the workers' numeric libraries, each applied only when aikido-run's own environment does not set it.
// Workers share this host's cores: each gets an equal share of threads (at least one) for OpenMP (LibTorch's
// intra-op threads), and OpenBLAS one thread. glibc's malloc by default gives blocks over 128 KiB fresh pages of their
// own and hands freed memory back to the kernel, so that every step of a training loop pays page faults for its
// large, short-lived tensors (a CNN at batch 256 ran 4x faster without them); kMallocTunables keeps them in the heap.
std::vector<std::pair<std::string, std::string>> worker_defaults(int np, int cores) {
  const std::string threads = std::to_string(std::max(1, cores / std::max(1, np)));
  // OpenBLAS runs inside LibTorch's intra-op threads: threads of its own would oversubscribe the cores (measured: an
  // MLP step 3x slower with 2 + 2 threads on 2 cores than with 2 + 1).
  return {{"OMP_NUM_THREADS", threads}, {"OPENBLAS_NUM_THREADS", "1"}, {"GLIBC_TUNABLES", kMallocTunables}};
}

// The AIKIDO_* variables aikido-run sets itself, whatever its environment says: per worker, per job, and those
// of an elastic job (which a static job must not inherit: a worker would take itself for elastic).
std::set<std::string> set_by_launcher() {
  return {env::kRank,       env::kLocalRank,  env::kSize,           env::kLocalSize,   env::kLocalCpus,
          env::kHost,       env::kStoreAddr,  env::kStore,          env::kStorePort,   env::kSecret,
          env::kSecretFile, env::kJobId,      env::kClusterVersion, env::kAutoThreads, env::kElastic,
          env::kWorkerId,   env::kCheckpoint, env::kResume,         env::kConsoleTty,  env::kTimeline};
}

// The settings of the command line, as AIKIDO_* values.
std::vector<std::pair<std::string, std::string>> flag_settings(const Options& options) {
  std::vector<std::pair<std::string, std::string>> settings;
  if (options.topology) settings.emplace_back(env::kTopology, *options.topology);
  if (options.timeout) settings.emplace_back(env::kTimeout, *options.timeout);
  if (options.connect_timeout) settings.emplace_back(env::kConnectTimeout, *options.connect_timeout);
  if (options.store_timeout) settings.emplace_back(env::kStoreTimeout, *options.store_timeout);
  if (options.transport) settings.emplace_back(env::kTransport, *options.transport);
  if (options.segment_bytes) settings.emplace_back(env::kSegmentBytes, *options.segment_bytes);
  if (options.streams) settings.emplace_back(env::kStreams, *options.streams);
  // TLS as aikido-run resolved it (flags over its environment): always set, so that workers agree with the store.
  settings.emplace_back(env::kTls, options.tls.enabled ? "1" : "0");
  if (!options.tls.cert_file.empty()) {
    settings.emplace_back(env::kTlsCert, options.tls.cert_file);
    settings.emplace_back(env::kTlsKey, options.tls.key_file);
    settings.emplace_back(env::kTlsCa, options.tls.ca_file);
  }
  // Across hosts every worker publishes: the aikido-run of any host (the one given --dashboard, say) shows them all.
  if (options.metrics_port || options.metrics_file || options.dashboard_port || options.across_hosts()) {
    settings.emplace_back(env::kMetricsInterval, std::to_string(options.metrics_interval));
  }
  return settings;
}

std::set<std::string> replaced_settings(const Options& options) {
  std::set<std::string> replaced = set_by_launcher();
  for (const auto& [name, value] : flag_settings(options)) replaced.insert(name);
  replaced.insert({env::kTlsCert, env::kTlsKey, env::kTlsCa});
  return replaced;
}

}  // namespace

JobEnvironment job_environment(const Options& options, const std::string& store_address, const std::string& secret,
                               const std::string& job_id) {
  const int cpus = env::local_cpus();  // this host's CPUs, shared by its workers
  std::vector<std::pair<std::string, std::string>> settings = {
      {env::kSize, std::to_string(options.np)},
      {env::kLocalSize, std::to_string(options.np)},
      {env::kLocalCpus, std::to_string(cpus)},  // workers bound to one CPU each still see them all
      {env::kHost, transport::host_name()},
      {env::kStoreAddr, store_address},
      {env::kSecret, secret},
      {env::kJobId, job_id},
      {env::kClusterVersion, "0"},
      {env::kConsoleTty, ::isatty(STDERR_FILENO) ? "1" : "0"},
  };
  if (!options.timeline.empty()) settings.emplace_back(env::kTimeline, timeline_parts_dir(options.timeline));
  for (auto& setting : flag_settings(options)) settings.push_back(std::move(setting));
  const std::set<std::string> replaced = replaced_settings(options);

  JobEnvironment job;
  std::set<std::string> inherited;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry = *e;
    const std::string name = entry.substr(0, entry.find('='));
    if (replaced.count(name) > 0) continue;
    inherited.insert(name);
    job.shared.push_back(entry);
  }
  for (const auto& [name, value] : worker_defaults(options.np, cpus)) {
    if (inherited.count(name) > 0) continue;
    job.shared.push_back(name + "=" + value);
    // An elastic job's size changes: the LibTorch integration then keeps threads x workers at the CPUs.
    if (name == "OMP_NUM_THREADS") job.shared.push_back(std::string(env::kAutoThreads) + "=1");
  }
  for (const auto& [name, value] : settings) job.shared.push_back(name + "=" + value);
  return job;
}

std::vector<std::string> inherited_environment() {
  std::vector<std::string> out;
  for (char** e = environ; *e != nullptr; ++e) out.emplace_back(*e);
  return out;
}

std::vector<std::string> inherited_setting_problems(const Options& options) {
  const std::set<std::string> replaced = replaced_settings(options);
  std::vector<std::string> problems;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry = *e;
    const auto eq = entry.find('=');
    if (!entry.starts_with("AIKIDO_") || eq == std::string::npos) continue;
    const std::string name = entry.substr(0, eq);
    // aikido-run reads AIKIDO_LOCAL_CPUS itself (the CPUs its workers share) before it replaces it.
    if (replaced.count(name) > 0 && name != env::kLocalCpus) continue;
    if (auto problem = env::check_setting(name, entry.substr(eq + 1))) problems.push_back(*problem);
  }
  return problems;
}

}  // namespace aikido::run
