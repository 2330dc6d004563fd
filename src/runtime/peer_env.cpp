#include "runtime/peer_env.hpp"

#include <aikido/store.hpp>
#include <algorithm>
#include <chrono>

#include "base/env.hpp"
#include "base/error.hpp"
#include "base/log.hpp"
#include "runtime/store_server.hpp"
#include "transport/interfaces.hpp"

namespace aikido::detail {

namespace {

constexpr const char* kLoopback = "127.0.0.1";
// NCCL's default interface choice: anything but loopback and docker bridges.
constexpr const char* kExternalInterfaces = "^lo,docker";

std::string describe_job(const env::LaunchInfo& launch) {
  return str_cat(env::launcher_name(launch.launcher), " job of ", launch.size, " workers");
}

// The host a worker's traffic to the store goes to.
std::string store_host(const env::LaunchInfo& launch) {
  return launch.rank0_serves_store ? launch.master_addr : env::store_url_host(launch.store_url);
}

// Where rank 0's store listens: on the master address's loopback when the job may be on this host alone (the
// address every worker connects to), on every interface otherwise, since MASTER_ADDR may name a service or a name
// that resolves differently here than on the other hosts (Debian maps its own host name to 127.0.1.1).
std::string store_bind_host(const env::LaunchInfo& launch) {
  const auto resolved = transport::resolve_ipv4(launch.master_addr);
  const auto one_host = launch.one_host();
  if (resolved && (one_host == true || (one_host != false && transport::is_loopback_literal(*resolved)))) {
    return *resolved;
  }
  return "0.0.0.0";
}

std::string missing_secret_message(const env::LaunchInfo& launch) {
  return str_cat("this ", describe_job(launch), " has no job secret: every worker needs the same ", env::kSecret,
                 " or ", env::kSecretFile,
                 "; make one with 'openssl rand -hex 32 > FILE' where every host can read it (or as a Kubernetes "
                 "Secret) and export ",
                 env::kSecretFile, "=FILE to every worker (mpirun: -x ", env::kSecretFile, ")");
}

}  // namespace

void read_peer_env(PeerConfig& config) {
  env::check_environment();  // every AIKIDO_* setting, also those read later or elsewhere (log level, metrics)
  if (auto host = env::get(env::kHost)) config.host = *host;
  config.secret = env::job_secret(env::process_lookup());
  config.tls = TlsOptions::from_env();
  if (auto job = env::get(env::kJobId)) config.job_id = *job;
  if (auto t = env::get(env::kTopology)) config.topology = parse_topology(*t);
  if (auto t = env::get(env::kTransport)) config.transport = parse_transport(*t);
  config.timeout = env::get_seconds(env::kTimeout, env::kDefaultTimeout);
  config.connect_timeout = env::get_seconds(env::kConnectTimeout, std::chrono::milliseconds(0));
  if (auto a = env::get(env::kBindAddress)) config.bind_address = *a;
  config.segment_bytes =
      std::size_t(env::get_int(env::kSegmentBytes, std::int64_t(config.segment_bytes), 0, std::int64_t(1) << 40));
  config.streams = int(env::get_int(env::kStreams, config.streams, 0, 8));
  if (auto cc = env::get(env::kTcpCongestion)) config.tcp_congestion = *cc == "system" ? "" : *cc;
}

std::string choose_bind_address(const env::Lookup& lookup, const env::LaunchInfo& launch) {
  const auto bind = lookup(env::kBindAddress);
  const auto iface = lookup(env::kIface);
  if (bind && iface) {
    throw ConfigError(
        str_cat(env::kBindAddress, "='", *bind, "' and ", env::kIface, "='", *iface, "' are both set; set only one"));
  }
  if (bind) return *bind;
  if (iface) return transport::interface_address(*iface, env::kIface);
  const auto one_host = launch.one_host();
  if (launch.size <= 1 || one_host == true) return kLoopback;

  const std::string host = store_host(launch);
  const bool store_elsewhere = !host.empty() && !transport::is_loopback(host);
  if (store_elsewhere) {
    if (auto route = transport::route_address(host); route && !transport::is_loopback_literal(*route)) {
      log::debug("rank ", launch.rank, ": listening on ", *route, ", the address that routes to the store's host ",
                 host);
      return *route;
    }
  }
  if (!store_elsewhere && one_host != false) return kLoopback;
  if (auto i = transport::select_interface(kExternalInterfaces, transport::ipv4_interfaces()); i && !i->loopback) {
    log::info("rank ", launch.rank, ": listening on ", i->address, " (interface ", i->name,
              "): no route to the store's host '", host, "' leaves through another interface; set ", env::kIface,
              " or ", env::kBindAddress, " to choose");
    return i->address;
  }
  if (one_host == false) {
    throw ConfigError(str_cat("rank ", launch.rank, " of this ", describe_job(launch),
                              " that spans hosts finds no address the other hosts can reach (no interface that is up "
                              "besides loopback and docker); set ",
                              env::kIface, " to the interface they reach, or ", env::kBindAddress));
  }
  return kLoopback;
}

PeerConfig peer_config_from_env(env::LaunchInfo& launch) {
  const env::Lookup lookup = env::process_lookup();
  launch = env::detect_launch(lookup);
  PeerConfig config;
  config.rank = launch.rank;
  config.size = launch.size;
  config.cluster_version = std::uint64_t(env::get_int(env::kClusterVersion, 0, 0, INT64_MAX));
  read_peer_env(config);
  if (!env::get(env::kJobId) && !launch.job_id.empty()) config.job_id = launch.job_id;
  if (config.size == 1) return config;
  if (config.secret.empty()) throw ConfigError(missing_secret_message(launch));
  config.bind_address = choose_bind_address(lookup, launch);
  log::info("rank ", launch.rank, " of ", launch.size, " started by ", env::launcher_name(launch.launcher), "; store ",
            launch.store_url, launch.rank0_serves_store ? " (served by rank 0)" : "", "; listening on ",
            config.bind_address);
  if (launch.rank0_serves_store && launch.rank == 0) {
    const std::string bind_host = store_bind_host(launch);
    try {
      config.store = serve_store(bind_host, launch.master_port, config.secret, config.tls);
    } catch (const Error& e) {
      throw ConfigError(str_cat("rank 0 cannot serve the job's store on ", bind_host, ":", launch.master_port, " (",
                                launch.store_url, "): ", e.what(),
                                "; MASTER_ADDR must name rank 0's host, and a port in use needs another ",
                                env::kStorePort, " (or MASTER_PORT), the same for every worker"));
    }
  } else {
    config.store = connect_store(launch.store_url, config.secret, env::get_seconds(env::kStoreTimeout, config.timeout),
                                 config.tls);
  }
  return config;
}

void leave_failed_rendezvous(const PeerConfig& config) {
  if (!config.store) return;
  const auto key = [&](int rank) { return str_cat(config.job_id, "/v", config.cluster_version, "/failed/", rank); };
  try {
    if (config.rank != 0) {
      config.store->set(key(config.rank), "1");
      return;
    }
    const auto deadline = std::chrono::steady_clock::now() + std::min(config.timeout, kFailedRendezvousLinger);
    for (int p = 1; p < config.size; ++p) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return;
      config.store->wait(key(p), left);
    }
  } catch (const Error& e) {
    log::debug("rank ", config.rank, ": after a failed rendezvous: ", e.what());
  }
}

}  // namespace aikido::detail
