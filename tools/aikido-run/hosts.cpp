#include "hosts.hpp"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <unistd.h>

#include <aikido/errors.hpp>
#include <aikido/etcd.hpp>
#include <aikido/store.hpp>
#include <cmath>
#include <filesystem>
#include <optional>
#include <set>
#include <sstream>

#include "base/env.hpp"
#include "base/error.hpp"
#include "base/launcher_env.hpp"
#include "elastic.hpp"
#include "elastic/etcd_client.hpp"
#include "environment.hpp"
#include "launch/host_job.hpp"
#include "launch/hostfile.hpp"
#include "observers.hpp"
#include "output.hpp"
#include "runtime/store_server.hpp"
#include "supervisor.hpp"
#include "transport/interfaces.hpp"
#include "transport/socket.hpp"

namespace aikido::run {
namespace {

using detail::str_cat;

// The launcher's patience with etcd: it waits this long for an answer before it gives up on a call (and tries the
// call again later), so that its supervision of the workers never stalls for longer while etcd is away.
constexpr std::chrono::seconds kLauncherStorePatience{5};

std::chrono::milliseconds seconds_of(double s) { return std::chrono::milliseconds(std::int64_t(s * 1000)); }

std::chrono::milliseconds collective_timeout(const Options& options) {
  if (options.timeout) return seconds_of(std::stod(*options.timeout));
  return env::get_seconds(env::kTimeout, env::kDefaultTimeout);
}

bool is_etcd(const std::string& url) { return url.starts_with("etcd://") || url.starts_with("etcds://"); }

// The secret every host shares: --secret-file, else AIKIDO_SECRET_FILE or AIKIDO_SECRET.
std::string shared_secret(const Options& options) {
  env::Lookup lookup = env::process_lookup();
  if (!options.secret_file.empty()) {
    lookup = [file = options.secret_file](const char* name) -> std::optional<std::string> {
      if (std::string_view(name) == env::kSecretFile) return file;
      return std::nullopt;
    };
  }
  std::string secret = env::job_secret(lookup);
  if (secret.empty()) {
    throw ConfigError(str_cat(
        "a job across hosts needs a secret that every host shares, for every connection proves it: --secret-file F "
        "(the same file on every host; make one with 'openssl rand -hex 32 > F; chmod 600 F') or ",
        env::kSecretFile));
  }
  return secret;
}

// The store's TLS files and credentials reach this process's etcd clients and the workers through the
// environment (etcd_options_from_env).
void export_store_options(const Options& options) {
  const std::pair<const char*, const std::string*> settings[] = {{env::kStoreCa, &options.store_ca},
                                                                 {env::kStoreCert, &options.store_cert},
                                                                 {env::kStoreKey, &options.store_key},
                                                                 {env::kStoreCredentials, &options.store_credentials}};
  for (const auto& [name, value] : settings) {
    if (!value->empty()) ::setenv(name, value->c_str(), 1);
  }
}

// The address this host's workers listen on: --host-address, --iface, else the interface that routes to `toward`
// (the store's host), else the first interface that is neither loopback nor docker.
std::string this_host_address(const Options& options, const std::string& toward) {
  if (!options.host_address.empty()) return options.host_address;
  if (!options.iface.empty()) return transport::interface_address(options.iface, "--iface");
  if (!toward.empty()) {
    if (auto routed = transport::route_address(toward); routed && !transport::is_loopback_literal(*routed)) {
      return *routed;
    }
  }
  return transport::interface_address("^lo,docker", "--iface");
}

// Workers that listen on loopback cannot be reached from another host. Allowed only when the store is on loopback
// too, that is when every "host" of the job runs on this machine.
void refuse_loopback(const std::string& address, const std::string& store_host) {
  if (!transport::is_loopback_literal(address) || transport::is_loopback(store_host)) return;
  throw ConfigError(str_cat("this host's workers would listen on ", address,
                            ", a loopback address that the other hosts cannot reach; give --host-address ADDRESS or "
                            "--iface NAME (an interface the other hosts reach this host through)"));
}

void set_entry(std::vector<std::string>& environment, const char* name, const std::string& value) {
  const std::string prefix = std::string(name) + "=";
  std::erase_if(environment, [&](const std::string& e) { return e.starts_with(prefix); });
  environment.push_back(prefix + value);
}

Supervisor::Config supervisor_config(const Options& options, const JobObservers& observers) {
  Supervisor::Config config;
  observers.configure(config);
  config.program_path = options.program_path;
  config.argv = options.argv;
  config.grace = seconds_of(options.grace_period_s);
  config.stdout_tty = options.stdout_tty;
  return config;
}

std::string host_id_of(const Options& options) {
  return options.host_id.empty() ? transport::host_name() : options.host_id;
}

int run_etcd_host_job(const Options& options, const std::string& secret, const std::string& address,
                      JobObservers& observers) {
  const std::string host = host_id_of(options);
  EtcdOptions etcd = etcd_options_from_env(options.store, kLauncherStorePatience);
  auto client = std::make_shared<elastic::EtcdClient>(etcd);
  launch::check_job_secret(*client, options.job_id, secret);

  JobEnvironment job = job_environment(options, "", secret, options.job_id);
  std::erase_if(job.shared, [](const std::string& e) { return e.starts_with(std::string(env::kStoreAddr) + "="); });
  set_entry(job.shared, env::kStore, options.store);
  set_entry(job.shared, env::kBindAddress, address);

  launch::HostJobOptions host_options;
  host_options.job_id = options.job_id;
  host_options.min_hosts = options.nnodes->first;
  host_options.max_hosts = options.nnodes->second;
  host_options.slots = options.nproc_per_node;
  host_options.join_timeout = seconds_of(options.join_timeout_s);
  host_options.host_timeout = std::chrono::seconds(std::max<std::int64_t>(1, std::llround(options.host_timeout_s)));
  launch::HostRecord self;
  self.id = host;
  self.address = address;
  self.pid = ::getpid();
  self.host_name = transport::host_name();
  launch::HostJob host_job(host_options, client, make_etcd_membership(etcd, options.job_id), self);
  report(str_cat("aikido-run: host ", host, " (", address, ") joins job ", options.job_id, " at ", options.store,
                 "; it starts once ", host_options.min_hosts, host_options.min_hosts == 1 ? " host has" : " hosts have",
                 " joined"));
  const ClusterSpec spec = host_job.join();
  report("aikido-run: cluster " + spec.describe());

  observers.start_metrics(options.store, secret, options.job_id, spec.max_size, true);

  ElasticSetup setup;
  setup.store = connect_etcd_store(etcd);
  setup.membership = make_etcd_membership(etcd, options.job_id);
  setup.watch_membership = make_etcd_membership(etcd, options.job_id);
  setup.host = host;
  setup.hosts = &host_job;
  setup.store_check_interval = std::chrono::milliseconds(250);
  setup.events = &observers.events();
  int status = 0;
  bool trained = false;
  {
    ElasticController controller(options, std::move(setup), options.job_id, job.shared);
    Supervisor supervisor(supervisor_config(options, observers));
    supervisor.set_controller(&controller);
    status = supervisor.run(controller.initial_workers());
    trained = controller.member_finished_here();
  }
  observers.finish(status);
  if (status == 0 && host_job.hosts().lease_lost()) {
    // Its workers left because the job removed them (they were cut off with it), not because training ended.
    report("aikido-run: host " + host + " lost its place in job " + options.job_id +
           ": its lease in etcd expired (it was cut off for more than --host-timeout), and the other hosts went on "
           "without it");
    return 1;
  }
  if (status == 0) host_job.finish(trained);
  return status;
}

// A fixed set of hosts around a tcp:// store that node 0 serves: each launcher publishes how many workers it runs;
// ranks follow the node ranks.
int run_static_host_job(const Options& options, const std::string& secret, const std::string& address,
                        JobObservers& observers) {
  const int hosts = options.nnodes->first;
  const std::string store_host = env::store_url_host(options.store);
  const std::string host_port = options.store.substr(std::string("tcp://").size());
  std::optional<elastic::StoreServer> server;
  if (options.node_rank == 0 && (store_host == address || transport::route_address(store_host) == address)) {
    const auto port = transport::Address::parse(host_port).port;
    server.emplace(address, port, secret, options.tls);
  }
  const auto patience = seconds_of(options.join_timeout_s);
  auto store = connect_store(options.store, secret, patience, options.tls);
  const std::string host = host_id_of(options);
  const std::string prefix = options.job_id + "/hosts/";
  store->set(prefix + std::to_string(options.node_rank), str_cat(options.nproc_per_node, " ", host));
  report(str_cat("aikido-run: host ", host, " (", address, ") is node ", options.node_rank, " of ", hosts, " of job ",
                 options.job_id, "; waiting for the others at ", options.store));
  int offset = 0, size = 0;
  for (int node = 0; node < hosts; ++node) {
    std::string record;
    try {
      record = store->wait(prefix + std::to_string(node), patience);
    } catch (const TimeoutError&) {
      throw TimeoutError(str_cat("node ", node, " of job ", options.job_id, " did not join within ",
                                 detail::seconds(patience), " (--join-timeout); start aikido-run --node-rank ", node,
                                 " on that host with the same --store and --job-id"));
    }
    std::istringstream in(record);
    int slots = 0;
    std::string other;
    if (!(in >> slots >> other) || slots < 1)
      throw ProtocolError("node " + std::to_string(node) + " published '" + record + "'");
    if (node != options.node_rank && other == host) {
      throw ConfigError(str_cat("nodes ", node, " and ", options.node_rank, " both call themselves host '", host,
                                "'; give each host its own --host-id"));
    }
    if (node < options.node_rank) offset += slots;
    size += slots;
  }
  JobEnvironment job = job_environment(options, host_port, secret, options.job_id);
  for (const char* name : {env::kSize, env::kLocalSize})
    std::erase_if(job.shared, [&](const std::string& e) { return e.starts_with(std::string(name) + "="); });
  set_entry(job.shared, env::kBindAddress, address);
  set_entry(job.shared, env::kHost, host);
  set_entry(job.shared, env::kSize, std::to_string(size));
  set_entry(job.shared, env::kLocalSize, std::to_string(options.nproc_per_node));
  std::vector<Supervisor::Worker> workers;
  for (int local = 0; local < options.nproc_per_node; ++local) {
    Supervisor::Worker w;
    w.rank = offset + local;
    w.id = std::uint64_t(w.rank);
    w.environment = job.shared;
    w.environment.push_back(str_cat(env::kRank, "=", w.rank));
    w.environment.push_back(str_cat(env::kLocalRank, "=", local));
    workers.push_back(std::move(w));
  }
  // Every host's aikido-run reads the whole job's metrics from the store: any of them serves the dashboard.
  observers.start_metrics(options.store, secret, options.job_id, size, false);
  Supervisor supervisor(supervisor_config(options, observers));
  const int status = supervisor.run(workers);
  observers.finish(status);
  return status;
}

std::string absolute(const std::string& path) {
  char resolved[PATH_MAX];
  return ::realpath(path.c_str(), resolved) != nullptr ? std::string(resolved) : path;
}

// A path that need not exist yet, made absolute against the current folder (the launchers start there too).
std::string absolute_or_relative(const std::string& path) {
  return std::filesystem::absolute(path).lexically_normal().string();
}

std::string rank_list(const std::set<int>& ranks) {
  std::string list;
  for (int r : ranks) list += (list.empty() ? "" : ",") + std::to_string(r);
  return list;
}

std::string self_path() {
  char buffer[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", buffer, sizeof buffer - 1);
  if (n <= 0) throw Error("cannot find aikido-run's own path (/proc/self/exe)");
  return std::string(buffer, std::size_t(n));
}

// The flags a launcher started on another host passes on unchanged.
std::vector<std::string> passed_on_flags(const Options& options) {
  std::vector<std::string> flags;
  auto add = [&](const char* flag, const std::string& value) {
    flags.push_back(flag);
    flags.push_back(value);
  };
  if (options.topology) add("--topology", *options.topology);
  if (options.timeout) add("--timeout", *options.timeout);
  if (options.transport) add("--transport", *options.transport);
  if (options.segment_bytes) add("--segment-bytes", *options.segment_bytes);
  add("--stdout", options.stdout_tty ? "tty" : "pipe");
  add("--grace-period", std::to_string(options.grace_period_s));
  add("--join-timeout", std::to_string(options.join_timeout_s));
  add("--host-timeout", std::to_string(options.host_timeout_s));
  if (!options.bind_to_core) add("--bind-to", "none");
  for (const auto& [flag, value] : {std::pair<const char*, const std::string*>{"--store-ca", &options.store_ca},
                                    {"--store-cert", &options.store_cert},
                                    {"--store-key", &options.store_key},
                                    {"--store-credentials", &options.store_credentials}}) {
    if (!value->empty()) add(flag, absolute(*value));
  }
  if (options.tls.enabled) flags.push_back("--tls");
  if (!options.tls.cert_file.empty()) {
    add("--tls-cert", options.tls.cert_file);
    add("--tls-key", options.tls.key_file);
    add("--tls-ca", options.tls.ca_file);
  }
  if (options.restart) flags.push_back("--restart");
  if (options.restart) add("--max-restarts", std::to_string(options.max_restarts));
  if (options.elastic) add("--heartbeat-timeout", std::to_string(options.heartbeat_timeout_s));
  if (!options.checkpoint.empty()) add("--checkpoint", options.checkpoint);
  if (!options.resume.empty()) add("--resume", absolute(options.resume));
  if (!options.log_dir.empty()) add("--log-dir", absolute_or_relative(options.log_dir));
  if (!options.timeline.empty()) add("--timeline", absolute_or_relative(options.timeline));
  if (!options.console_ranks.empty()) add("--ranks-filter", rank_list(options.console_ranks));
  return flags;
}

}  // namespace

int run_host_job(const Options& options) {
  Supervisor::block_signals();
  export_store_options(options);
  const std::string secret = shared_secret(options);
  const std::string store_host = env::store_url_host(options.store);
  const std::string address = this_host_address(options, store_host);
  refuse_loopback(address, store_host);
  if (!options.timeout) collective_timeout(options);  // checks AIKIDO_TIMEOUT
  JobObservers observers(options);
  observers.events().emit("job_started", {{"job", options.job_id},
                                          {"host", host_id_of(options)},
                                          {"workers", options.nproc_per_node},
                                          {"elastic", options.elastic},
                                          {"min_workers", options.min_np},
                                          {"max_workers", options.max_np},
                                          {"program", options.program}});
  return is_etcd(options.store) ? run_etcd_host_job(options, secret, address, observers)
                                : run_static_host_job(options, secret, address, observers);
}

int run_from_one_host(const Options& options) {
  Supervisor::block_signals();
  export_store_options(options);
  std::vector<launch::HostSlots> hosts = launch::place_workers(
      options.host_list.empty() ? launch::read_hostfile(options.hostfile) : launch::parse_host_list(options.host_list),
      options.np);
  std::string secret_file = options.secret_file;
  if (secret_file.empty()) secret_file = env::get(env::kSecretFile).value_or("");
  if (secret_file.empty()) {
    throw ConfigError(
        "-H and --hostfile need --secret-file F, a file that every host can read at that path (its first line is "
        "the job secret; make one with 'openssl rand -hex 32 > F; chmod 600 F')");
  }
  secret_file = absolute(secret_file);
  Options with_file = options;
  with_file.secret_file = secret_file;
  const std::string secret = shared_secret(with_file);
  const std::string job_id =
      options.job_id.empty() ? transport::host_name() + "-" + std::to_string(::getpid()) : options.job_id;
  std::optional<elastic::StoreServer> server;
  std::string store = options.store;
  if (store.empty()) {
    // This aikido-run serves the job's store, on the address through which it reaches the first host.
    const std::string address = this_host_address(options, hosts.front().host);
    refuse_loopback(address, hosts.front().host);
    server.emplace(address, 0, secret, options.tls);
    store = "tcp://" + server->address();
    report("aikido-run: job " + job_id + ": store at " + store);
  }
  char cwd[PATH_MAX];
  const std::string directory = ::getcwd(cwd, sizeof cwd) != nullptr ? cwd : "";
  const std::string self = self_path();
  const std::vector<std::string> flags = passed_on_flags(options);
  const int n = int(hosts.size());
  std::vector<Supervisor::Worker> launchers;
  for (int i = 0; i < n; ++i) {
    std::vector<std::string> remote = {self, "--nnodes", std::to_string(n)};
    if (!is_etcd(store)) {
      remote.push_back("--node-rank");
      remote.push_back(std::to_string(i));
    }
    for (const std::string& word :
         {std::string("--nproc-per-node"), std::to_string(hosts[std::size_t(i)].slots), std::string("--store"), store,
          std::string("--job-id"), job_id, std::string("--host-id"), hosts[std::size_t(i)].host,
          std::string("--secret-file"), secret_file}) {
      remote.push_back(word);
    }
    remote.insert(remote.end(), flags.begin(), flags.end());
    remote.push_back("--");
    remote.push_back(absolute(options.program_path));
    remote.insert(remote.end(), options.argv.begin() + 1, options.argv.end());
    Supervisor::Worker launcher;
    launcher.rank = i;
    launcher.id = std::uint64_t(i);
    launcher.argv = launch::launch_argv(options.launch_command, hosts[std::size_t(i)].host, directory, remote);
    launcher.program_path = find_program(launcher.argv.front());
    launcher.environment = inherited_environment();
    launchers.push_back(std::move(launcher));
  }
  // The launchers label, filter and log their workers' lines themselves (the flags are passed on).
  Options here = options;
  here.log_dir.clear();
  here.console_ranks.clear();
  here.timeline.clear();
  JobObservers observers(here);
  Supervisor::Config config = supervisor_config(here, observers);
  config.label_lines = false;
  Supervisor supervisor(config);
  const int status = supervisor.run(launchers);
  observers.finish(status);
  return status;
}

}  // namespace aikido::run
