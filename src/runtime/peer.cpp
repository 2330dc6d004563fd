#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <aikido/peer.hpp>
#include <cstring>
#include <fstream>
#include <future>
#include <limits>
#include <map>
#include <optional>
#include <sstream>

#include "base/crypto.hpp"
#include "base/env.hpp"
#include "base/error.hpp"
#include "base/log.hpp"
#include "base/parse_name.hpp"
#include "collective/links.hpp"
#include "runtime/endpoint.hpp"
#include "runtime/engine.hpp"
#include "runtime/peer_env.hpp"
#include "runtime/shm_collectives.hpp"
#include "runtime/streams.hpp"
#include "transport/handshake.hpp"
#include "transport/interfaces.hpp"
#include "transport/shm_segment.hpp"

namespace aikido {

using detail::Endpoint;
using detail::str_cat;
using transport::Address;
using transport::Clock;

const char* transport_name(TransportKind kind) {
  switch (kind) {
    case TransportKind::automatic:
      return "auto";
    case TransportKind::tcp:
      return "tcp";
    case TransportKind::unix_socket:
      return "unix";
  }
  return "unknown";
}

TransportKind parse_transport(std::string_view name) {
  return detail::parse_name(name, {TransportKind::automatic, TransportKind::tcp, TransportKind::unix_socket},
                            transport_name, "transport");
}

LinkMatrix LinkMatrix::unmeasured(int size) {
  LinkMatrix m;
  m.size = size;
  const std::size_t n = std::size_t(std::max(0, size)) * std::size_t(std::max(0, size));
  m.latency_seconds.assign(n, std::numeric_limits<double>::quiet_NaN());
  m.bandwidth_bytes_per_second.assign(n, std::numeric_limits<double>::quiet_NaN());
  return m;
}

namespace {

void validate(const PeerConfig& c) {
  if (c.size < 1) throw ConfigError(str_cat("cluster size ", c.size, " must be at least 1 (AIKIDO_SIZE)"));
  if (c.rank < 0 || c.rank >= c.size) {
    throw ConfigError(str_cat("rank ", c.rank, " is not in 0..", c.size - 1, " (AIKIDO_RANK, AIKIDO_SIZE)"));
  }
  if (c.timeout.count() <= 0) throw ConfigError("the timeout must be positive (AIKIDO_TIMEOUT)");
  if (c.streams < 0 || c.streams > detail::kMaxStreams) {
    throw ConfigError(str_cat("streams ", c.streams, " must be between 1 and ", detail::kMaxStreams,
                              ", or 0 to choose by measuring the link (", env::kStreams, ")"));
  }
  if (c.segment_bytes != 0 && c.segment_bytes < 8) {
    throw ConfigError(str_cat("segment_bytes ", c.segment_bytes, " must be at least 8, or 0 to choose it per link"));
  }
  if (c.size > 1 && !c.store) throw ConfigError("a cluster of several ranks needs a rendezvous store");
  if (c.size > 1 && c.secret.empty()) {
    throw ConfigError("a cluster of several ranks needs a job secret (AIKIDO_SECRET; aikido-run sets it)");
  }
}

// Checks config.tcp_congestion on a throwaway socket before any connection is made: a name the kernel refuses is a
// ConfigError, except the built-in default, which quietly gives way to the system's (a kernel without cubic).
void choose_congestion_control(PeerConfig& config) {
  if (config.size == 1 || config.tcp_congestion.empty() || config.transport == TransportKind::unix_socket) return;
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return;  // the connections will fail with a clearer error
  const int err = transport::set_congestion_control(fd, config.tcp_congestion);
  ::close(fd);
  if (err == 0) return;
  if (config.tcp_congestion == kDefaultTcpCongestion) {
    log::debug("TCP congestion control ", config.tcp_congestion, " refused (", std::strerror(err),
               "): data connections keep the system's default");
    config.tcp_congestion.clear();
    return;
  }
  std::ifstream allowed_file("/proc/sys/net/ipv4/tcp_allowed_congestion_control");
  std::string allowed;
  std::getline(allowed_file, allowed);
  throw ConfigError(str_cat("TCP congestion control '", config.tcp_congestion, "' (", env::kTcpCongestion,
                            ") is refused by the kernel: ", std::strerror(err), "; this process may choose: ",
                            allowed.empty() ? "unknown" : allowed, ", or 'system' for the kernel's default"));
}

// Kernel buffers and congestion control of a data connection.
void tune_data_socket(transport::Socket& socket, const PeerConfig& config) {
  transport::set_bulk_buffers(socket);
  int domain = 0;
  socklen_t len = sizeof domain;
  if (::getsockopt(socket.fd(), SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0 || domain == AF_UNIX) return;
  if (const int err = transport::set_congestion_control(socket.fd(), config.tcp_congestion)) {
    log::warn("cannot set TCP congestion control ", config.tcp_congestion, ": ", std::strerror(err));
  }
}

// Accepts connections from every higher rank on either listener until all arrived or the deadline.
void accept_all(const PeerConfig& config, std::vector<transport::Listener*> listeners,
                std::vector<transport::Socket>& sockets, Clock::time_point deadline) {
  int expected = config.size - 1 - config.rank;
  const auto tls = transport::TlsContext::shared(config.tls, config.secret);
  while (expected > 0) {
    if (config.cancel && config.cancel()) detail::throw_cancelled(config);
    if (Clock::now() >= deadline) {
      std::vector<int> missing;
      for (int p = config.rank + 1; p < config.size; ++p) {
        if (!sockets[std::size_t(p)].valid()) missing.push_back(p);
      }
      std::string list;
      for (int p : missing) list += (list.empty() ? "" : ", ") + std::to_string(p);
      throw TimeoutError(str_cat("rank ", config.rank, ": rank(s) ", list, " did not connect within ",
                                 config.timeout.count() / 1000.0, " s"));
    }
    std::vector<pollfd> fds;
    for (auto* l : listeners) fds.push_back({l->fd(), POLLIN, 0});
    const int r = ::poll(fds.data(), nfds_t(fds.size()), 100);
    if (r <= 0) continue;
    for (std::size_t i = 0; i < fds.size(); ++i) {
      if (!(fds[i].revents & POLLIN)) continue;
      transport::Socket s = listeners[i]->try_accept(Clock::now() + std::chrono::milliseconds(10));
      if (!s.valid()) continue;
      try {
        const auto remaining = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
        auto result =
            transport::handshake_accept(s, config.secret, transport::Channel::data, config.cluster_version, config.rank,
                                        std::max(remaining, std::chrono::milliseconds(1)), tls.get());
        const int p = result.peer_rank;
        if (p <= config.rank || p >= config.size || sockets[std::size_t(p)].valid()) {
          log::warn("rank ", config.rank, ": refused a connection claiming rank ", p);
          continue;
        }
        tune_data_socket(s, config);
        sockets[std::size_t(p)] = std::move(s);
        --expected;
      } catch (const Error& e) {
        log::warn("rank ", config.rank, ": refused a connection: ", e.what());
      }
    }
  }
}

// The same-host path: when the transport is `auto` and this host has several ranks, the host's first rank creates a
// shared segment and announces it through the store under the job, cluster version and host id (emulated hosts share
// one store and /dev/shm); every rank of the host maps it and says whether that worked; the host's ranks use it only
// when all of them could (otherwise all use sockets: the choice must be the same on the whole host).
std::shared_ptr<detail::ShmCollectives> setup_shared_memory(const PeerConfig& config, const detail::ClusterInfo& info,
                                                            const std::vector<Endpoint>& endpoints,
                                                            Clock::time_point deadline) {
  if (config.transport != TransportKind::automatic || info.local_size < 2) return nullptr;
  std::vector<int> members;  // the cluster's ranks of this host, in rank order
  for (int p = 0; p < config.size; ++p) {
    if (endpoints[std::size_t(p)].host == config.host) members.push_back(p);
  }
  const int local_size = int(members.size()), local_rank = info.local_rank;
  const std::string prefix = str_cat(config.job_id, "/v", config.cluster_version, "/shm/", config.host);
  const detail::ShmLayout layout = detail::ShmLayout::for_ranks(local_size);
  auto remaining = [&] {
    return std::max(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()),
                    std::chrono::milliseconds(1));
  };
  transport::SharedSegment segment;
  std::string why;
  if (local_rank == 0) {
    try {
      segment = transport::SharedSegment::create(
          str_cat("aikido-", config.job_id.substr(0, 32), "-", config.host.substr(0, 32)), layout.total);
      detail::ShmCollectives::format(segment, local_size);
      config.store->set(prefix, str_cat(::getpid(), " ", segment.fd(), " ", layout.total));
    } catch (const Error& e) {
      why = e.what();
      config.store->set(prefix, "none");
    }
  } else {
    std::string record;
    try {
      record = config.store->wait(prefix, remaining());
    } catch (const TimeoutError&) {
      throw TimeoutError(str_cat("rank ", config.rank, ": rank ", members.front(), ", the first of host '", config.host,
                                 "', did not announce its shared segment within ", config.timeout.count() / 1000.0,
                                 " s (AIKIDO_TIMEOUT)"));
    }
    int pid = 0, fd = -1;
    std::size_t bytes = 0;
    std::istringstream in(record);
    if (record == "none") {
      why = str_cat("rank ", members.front(), " could not create it");
    } else if (!(in >> pid >> fd >> bytes) || bytes != layout.total) {
      why = str_cat("unreadable announcement '", record, "'");
    } else {
      try {
        segment = transport::SharedSegment::open(pid, fd, bytes);
        detail::ShmCollectives::check(segment, local_size);
      } catch (const Error& e) {
        why = e.what();
      }
    }
  }
  config.store->set(str_cat(prefix, "/mapped/", local_rank), why.empty() ? "ok" : why);
  std::string failures;
  for (int q = 0; q < local_size; ++q) {
    std::string answer;
    try {
      answer = config.store->wait(str_cat(prefix, "/mapped/", q), remaining());
    } catch (const TimeoutError&) {
      throw TimeoutError(str_cat("rank ", config.rank, ": rank ", members[std::size_t(q)],
                                 " did not map the shared segment of host '", config.host, "' within ",
                                 config.timeout.count() / 1000.0, " s (AIKIDO_TIMEOUT)"));
    }
    if (answer != "ok")
      failures += str_cat(failures.empty() ? "" : "; ", "rank ", members[std::size_t(q)], ": ", answer);
  }
  segment.close_fd();  // every rank has mapped it (or given up): the memory lives as long as the mappings
  if (!failures.empty()) {
    log::warn("rank ", config.rank, ": same-host shared memory is off on host '", config.host,
              "', collectives among its ranks use Unix sockets (", failures, ")");
    return nullptr;
  }
  return std::make_shared<detail::ShmCollectives>(std::move(segment), local_rank, local_size, std::move(members),
                                                  config.cluster_version, config.timeout);
}

}  // namespace

Peer::Peer(std::unique_ptr<detail::Engine> engine) : engine_(std::move(engine)) {}
Peer::Peer(Peer&&) noexcept = default;
Peer& Peer::operator=(Peer&&) noexcept = default;
Peer::~Peer() = default;

namespace {

std::unique_ptr<detail::Engine> connect_engine(const PeerConfig& input) {
  PeerConfig config = input;
  if (config.host.empty()) config.host = transport::host_name();
  validate(config);
  choose_congestion_control(config);
  detail::ClusterInfo info;
  if (config.size == 1) {
    info.host_of_rank = {0};
    return std::make_unique<detail::Engine>(config, info, std::vector<std::vector<transport::Socket>>{});
  }
  const auto join_timeout = config.connect_timeout.count() > 0 ? config.connect_timeout : config.timeout;
  const auto deadline = Clock::now() + join_timeout;

  std::uint8_t nonce[8];
  detail::random_bytes(nonce, sizeof nonce);
  transport::Listener tcp, unix_listener;
  std::vector<transport::Listener*> listeners;
  Endpoint mine;
  mine.host = config.host;
  mine.network = transport::network_id();
  if (config.transport != TransportKind::unix_socket) {
    tcp = transport::Listener::bind_tcp(config.bind_address, 0);
    mine.tcp = tcp.address().to_string();
    listeners.push_back(&tcp);
  }
  if (config.transport != TransportKind::tcp) {
    unix_listener =
        transport::Listener::bind_unix(str_cat("@aikido-", config.job_id.substr(0, 32), "-v", config.cluster_version,
                                               "-r", config.rank, "-", ::getpid(), "-", detail::to_hex(nonce)));
    mine.unix_path = unix_listener.address().to_string();
    listeners.push_back(&unix_listener);
  }
  config.store->set(detail::endpoint_key(config.job_id, config.cluster_version, config.rank),
                    detail::encode_endpoint(mine));

  std::vector<Endpoint> endpoints(std::size_t(config.size));
  for (int p = 0; p < config.size; ++p) {
    if (p == config.rank) {
      endpoints[std::size_t(p)] = mine;
      continue;
    }
    std::string record;
    for (;;) {
      const auto remaining = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      // With a cancel check, wait in slices so that a superseded rendezvous is abandoned quickly.
      const auto slice = config.cancel ? std::min(remaining, detail::kCancelSlice) : remaining;
      try {
        record = config.store->wait(detail::endpoint_key(config.job_id, config.cluster_version, p),
                                    std::max(slice, std::chrono::milliseconds(1)));
        break;
      } catch (const TimeoutError&) {
        if (slice < remaining) {
          if (config.cancel()) detail::throw_cancelled(config);
          continue;
        }
        throw TimeoutError(
            str_cat("rank ", config.rank, ": rank ", p, " did not join the cluster version ", config.cluster_version,
                    " within ", join_timeout.count() / 1000.0,
                    config.connect_timeout.count() > 0 ? " s (AIKIDO_CONNECT_TIMEOUT)" : " s (AIKIDO_TIMEOUT)",
                    "; is it running?"));
      }
    }
    endpoints[std::size_t(p)] = detail::decode_endpoint(record, p);
  }
  detail::check_reachable(config, endpoints);

  std::map<std::string, int> host_index;
  info.host_of_rank.resize(std::size_t(config.size));
  for (int p = 0; p < config.size; ++p) {
    auto [it, inserted] = host_index.emplace(endpoints[std::size_t(p)].host, int(host_index.size()));
    info.host_of_rank[std::size_t(p)] = it->second;
    if (endpoints[std::size_t(p)].host == config.host) {
      if (p < config.rank) ++info.local_rank;
    }
  }
  info.local_size =
      int(std::count(info.host_of_rank.begin(), info.host_of_rank.end(), info.host_of_rank[std::size_t(config.rank)]));

  std::vector<transport::Socket> sockets(std::size_t(config.size));
  const auto tls = transport::TlsContext::shared(config.tls, config.secret);
  auto acceptor = std::async(std::launch::async, [&] { accept_all(config, listeners, sockets, deadline); });
  std::exception_ptr connect_error;
  try {
    for (int p = 0; p < config.rank; ++p) {
      const Endpoint& e = endpoints[std::size_t(p)];
      const bool same_host = e.host == config.host;
      const bool use_unix = config.transport != TransportKind::tcp && same_host && !e.unix_path.empty();
      if (!use_unix && e.tcp.empty()) {
        throw ConfigError(str_cat("rank ", p, " is on host '", e.host, "' and listens only on a Unix socket; use ",
                                  "AIKIDO_TRANSPORT=auto or tcp for clusters that span hosts"));
      }
      transport::Socket s =
          detail::connect_unless_cancelled(config, Address::parse(use_unix ? e.unix_path : e.tcp), deadline);
      const auto remaining = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      auto result =
          transport::handshake_connect(s, config.secret, transport::Channel::data, config.cluster_version, config.rank,
                                       std::max(remaining, std::chrono::milliseconds(1)), tls.get());
      if (result.peer_rank != p) {
        throw ProtocolError(str_cat("rank ", config.rank, " connected to the address of rank ", p, " but rank ",
                                    result.peer_rank, " answered"));
      }
      tune_data_socket(s, config);
      sockets[std::size_t(p)] = std::move(s);
    }
  } catch (...) {
    connect_error = std::current_exception();
  }
  if (connect_error) {
    for (auto* l : listeners) l->close();
    try {
      acceptor.get();
    } catch (...) {
    }
    std::rethrow_exception(connect_error);
  }
  acceptor.get();
  // More TCP streams between ranks on different hosts, as many as the measured link needs (or as configured).
  detail::announce_connected(config);
  const detail::LinkProbe probe = detail::choose_streams(config, info.host_of_rank, endpoints, sockets, tcp, deadline);
  auto extra = detail::connect_streams(config, info.host_of_rank, endpoints, probe.streams, tcp, deadline);
  std::vector<std::vector<transport::Socket>> streams(std::size_t(config.size));
  for (int p = 0; p < config.size; ++p) {
    if (p == config.rank) continue;
    streams[std::size_t(p)].push_back(std::move(sockets[std::size_t(p)]));
    for (auto& s : extra[std::size_t(p)]) {
      tune_data_socket(s, config);
      streams[std::size_t(p)].push_back(std::move(s));
    }
  }
  auto shm = setup_shared_memory(config, info, endpoints, deadline);
  return std::make_unique<detail::Engine>(config, info, std::move(streams), std::move(shm),
                                          detail::probed_matrix(probe, info.host_of_rank));
}

}  // namespace

namespace detail {

std::string endpoint_key(const std::string& job_id, std::uint64_t cluster_version, int rank) {
  return str_cat(job_id, "/v", cluster_version, "/endpoint/", rank);
}

}  // namespace detail

Peer Peer::create(const PeerConfig& input) { return Peer(connect_engine(input)); }

Peer Peer::from_env() {
  env::LaunchInfo launch;
  const PeerConfig config = detail::peer_config_from_env(launch);
  const bool store_of_rank0 = launch.rank0_serves_store && config.size > 1;
  std::optional<Peer> joined;
  try {
    joined.emplace(create(config));
  } catch (const Error&) {
    if (store_of_rank0) detail::leave_failed_rendezvous(config);
    throw;
  }
  Peer& peer = *joined;
  // Rank 0's store goes with its Peer. Other ranks read it until their create() returns (the shared-memory setup
  // waits for every rank's answer), so no rank leaves here before all have joined.
  if (store_of_rank0) peer.barrier("aikido/from_env/joined");
  if (launch.local_size && *launch.local_size != peer.local_size()) {
    log::warn("rank ", peer.rank(), ": ", env::launcher_name(launch.launcher), " places ", *launch.local_size,
              " workers on this host, but ", peer.local_size(), " rank(s) gave the host id '", peer.config().host,
              "'; same-host paths follow the host id: set ", env::kHost, " where host names do not tell hosts apart");
  }
  return std::move(peer);
}

int Peer::rank() const { return engine_->config().rank; }
int Peer::size() const { return engine_->config().size; }
int Peer::local_rank() const { return engine_->cluster().local_rank; }
int Peer::local_size() const { return engine_->cluster().local_size; }
std::uint64_t Peer::cluster_version() const { return engine_->config().cluster_version; }
std::chrono::milliseconds Peer::timeout() const { return engine_->config().timeout; }
Topology Peer::topology() const { return engine_->topology(); }
const PeerConfig& Peer::config() const { return engine_->config(); }
std::vector<int> Peer::lost_ranks() const { return engine_->lost_ranks(); }
void Peer::mark_lost(int rank, const std::string& why) { engine_->drop_peer(rank, why); }
PathCounts Peer::path_counts() const { return engine_->path_counts(); }
std::uint64_t Peer::bytes_sent() const { return bytes_sent_before_ + engine_->bytes_sent(); }
void Peer::set_link_matrix(const LinkMatrix& links) { engine_->set_link_matrix(links); }
LinkMatrix Peer::link_matrix() const { return engine_->link_matrix(); }

std::size_t Peer::fusion_bytes(std::size_t total_bytes) const {
  return collective::fusion_bytes(engine_->link_model(), topology(), total_bytes);
}

Topology Peer::planned_topology(std::size_t bytes) const {
  const Topology t = topology();
  if (t != Topology::automatic) return t;
  return collective::choose_topology(engine_->link_model(), detail::CollectiveKind::allreduce, bytes).topology;
}

void Peer::reconnect(const PeerConfig& config) {
  bytes_sent_before_ += engine_->bytes_sent();
  engine_.reset();  // closes the old version's connections before the new ones open
  try {
    engine_ = connect_engine(config);
  } catch (...) {
    PeerConfig alone = config;
    alone.rank = 0;
    alone.size = 1;
    alone.cancel = nullptr;
    engine_ = connect_engine(alone);
    throw;
  }
}

void Peer::resize(int n) {
  if (!resize_handler_) {
    throw ConfigError(str_cat("resize(", n, ") needs an elastic job: run under aikido-run --elastic and use the ",
                              "Peer of an aikido::ElasticSession"));
  }
  resize_handler_(n);
}

void Peer::set_resize_handler(std::function<void(int)> handler) { resize_handler_ = std::move(handler); }
void Peer::set_topology(Topology topology) { engine_->set_topology(topology); }

Work Peer::post(const detail::Request& request) { return engine_->post(request); }

Work Peer::barrier_async(std::string_view name) {
  return post({detail::CollectiveKind::barrier, DType::u8, ReduceOp::max, 0, nullptr, nullptr, 0, 0, name});
}

Work Peer::consensus_async(std::span<const std::byte> value, bool& agreed, std::string_view name) {
  return post({detail::CollectiveKind::consensus, DType::u8, ReduceOp::max, 0, value.data(), nullptr, value.size(), 0,
               name, &agreed});
}

bool Peer::consensus(std::span<const std::byte> value, std::string_view name) {
  bool agreed = false;
  consensus_async(value, agreed, name).wait();
  return agreed;
}

void Peer::save_bytes(std::string_view name, DType dtype, const void* data, std::size_t count) {
  engine_->save(name, dtype, data, count);
}

Work Peer::request_bytes(int target, std::string_view name, DType dtype, void* out, std::size_t count) {
  return engine_->request(target, name, dtype, out, count);
}

}  // namespace aikido
