#include "runtime/streams.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <functional>
#include <limits>
#include <sstream>
#include <thread>

#include "base/error.hpp"
#include "base/log.hpp"
#include "collective/links.hpp"
#include "transport/handshake.hpp"

namespace aikido::detail {

namespace {

using Clock = std::chrono::steady_clock;
using transport::Socket;

constexpr int kRoundTrips = 5;
constexpr std::size_t kWarmupBytes = 256 * 1024;
/// The probe lasts about this long at the rate the warm-up saw, within the bounds below.
constexpr double kProbeSeconds = 10e-3;
constexpr std::size_t kMinProbe = 256 * 1024, kMaxProbe = std::size_t(8) << 20;

std::string link_key(const PeerConfig& c) { return str_cat(c.job_id, "/v", c.cluster_version, "/link"); }
std::string connected_key(const PeerConfig& c, int rank) {
  return str_cat(c.job_id, "/v", c.cluster_version, "/connected/", rank);
}

std::chrono::milliseconds left(Clock::time_point deadline) {
  return std::max(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()),
                  std::chrono::milliseconds(1));
}

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

void put_u64(Socket& s, std::uint64_t v) { s.write_all(&v, sizeof v); }
std::uint64_t get_u64(Socket& s) {
  std::uint64_t v = 0;
  s.read_exact(&v, sizeof v);
  return v;
}

// Runs fn(i) for i in [0, n) on n threads; rethrows the first error.
template <class Fn>
void on_threads(int n, Fn fn) {
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      try {
        fn(i);
      } catch (...) {
        errors[std::size_t(i)] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

// The first rank of each host, by host index.
std::vector<int> first_ranks(const std::vector<int>& host_of_rank) {
  std::vector<int> first;
  for (int r = 0; r < int(host_of_rank.size()); ++r) {
    const auto h = std::size_t(host_of_rank[std::size_t(r)]);
    if (first.size() <= h) first.resize(h + 1, -1);
    if (first[h] < 0) first[h] = r;
  }
  return first;
}

Socket connect_to(const PeerConfig& config, const Endpoint& endpoint, int peer, Clock::time_point deadline) {
  Socket s = connect_unless_cancelled(config, transport::Address::parse(endpoint.tcp), deadline);
  const auto result =
      transport::handshake_connect(s, config.secret, transport::Channel::data, config.cluster_version, config.rank,
                                   left(deadline), transport::TlsContext::shared(config.tls, config.secret).get());
  if (result.peer_rank != peer) {
    throw ProtocolError(str_cat("rank ", config.rank, " connected to the address of rank ", peer, " but rank ",
                                result.peer_rank, " answered"));
  }
  transport::set_bulk_buffers(s);
  return s;
}

// Accepts connections until `wanted(peer)` refuses no more and `count` arrived; returns them with their ranks.
std::vector<std::pair<int, Socket>> accept_some(const PeerConfig& config, transport::Listener& tcp, int count,
                                                const std::function<bool(int)>& wanted, Clock::time_point deadline,
                                                const std::atomic<bool>* stop = nullptr) {
  std::vector<std::pair<int, Socket>> out;
  while (int(out.size()) < count) {
    if (stop && stop->load()) return out;
    if (Clock::now() >= deadline) {
      throw TimeoutError(str_cat("rank ", config.rank, ": ", count - int(out.size()),
                                 " more TCP stream(s) did not connect within ", config.timeout.count() / 1000.0,
                                 " s (AIKIDO_TIMEOUT)"));
    }
    Socket s = tcp.try_accept(std::min(deadline, Clock::now() + std::chrono::milliseconds(100)));
    if (!s.valid()) continue;
    try {
      const auto result =
          transport::handshake_accept(s, config.secret, transport::Channel::data, config.cluster_version, config.rank,
                                      left(deadline), transport::TlsContext::shared(config.tls, config.secret).get());
      if (!wanted(result.peer_rank)) {
        log::warn("rank ", config.rank, ": refused a stream claiming rank ", result.peer_rank);
        continue;
      }
      transport::set_bulk_buffers(s);
      out.emplace_back(result.peer_rank, std::move(s));
    } catch (const Error& e) {
      log::warn("rank ", config.rank, ": refused a stream: ", e.what());
    }
  }
  return out;
}

// The sender's side of the probe (see streams.hpp).
void send_probe(const PeerConfig& config, Socket& s, const Endpoint& measurer, int measurer_rank,
                Clock::time_point deadline) {
  for (int i = 0; i < kRoundTrips; ++i) put_u64(s, get_u64(s));
  std::vector<char> data(kMaxProbe);
  s.write_all(data.data(), kWarmupBytes);
  const std::size_t probe = get_u64(s);
  if (probe > kMaxProbe || probe % kProbeStreams != 0) throw ProtocolError("link probe of an unexpected size");
  s.write_all(data.data(), probe);
  get_u64(s);
  std::vector<Socket> more;
  for (int i = 1; i < kProbeStreams; ++i) more.push_back(connect_to(config, measurer, measurer_rank, deadline));
  for (auto& m : more) m.set_timeout(left(deadline));
  get_u64(s);  // go
  on_threads(kProbeStreams, [&](int i) {
    Socket& out = i == 0 ? s : more[std::size_t(i - 1)];
    out.write_all(data.data(), probe / kProbeStreams);
  });
  get_u64(s);  // done
}

// The measurer's side of the probe.
LinkProbe measure_probe(const PeerConfig& config, Socket& s, int sender, transport::Listener& tcp,
                        Clock::time_point deadline) {
  LinkProbe result;
  std::vector<double> trips;
  for (int i = 0; i < kRoundTrips; ++i) {
    const auto t = Clock::now();
    put_u64(s, std::uint64_t(i));
    get_u64(s);
    trips.push_back(seconds_since(t));
  }
  std::sort(trips.begin(), trips.end());
  result.latency_seconds = trips[trips.size() / 2] / 2;
  std::vector<char> data(kMaxProbe);
  auto t = Clock::now();
  s.read_exact(data.data(), kWarmupBytes);
  const double warmup = double(kWarmupBytes) / std::max(1e-6, seconds_since(t));
  const std::size_t unit = kProbeStreams * 4096;
  const std::size_t probe =
      std::clamp(std::size_t(warmup * kProbeSeconds) / unit * unit, kMinProbe / unit * unit, kMaxProbe);
  put_u64(s, probe);
  t = Clock::now();
  s.read_exact(data.data(), probe);
  result.one_stream = double(probe) / std::max(1e-6, seconds_since(t));
  put_u64(s, 1);
  auto more = accept_some(
      config, tcp, kProbeStreams - 1, [&](int p) { return p == sender; }, deadline);
  for (auto& [p, m] : more) m.set_timeout(left(deadline));
  put_u64(s, 2);  // go
  t = Clock::now();
  std::vector<std::vector<char>> buffers(static_cast<std::size_t>(kProbeStreams),
                                         std::vector<char>(probe / kProbeStreams));
  on_threads(kProbeStreams, [&](int i) {
    Socket& in = i == 0 ? s : more[std::size_t(i - 1)].second;
    in.read_exact(buffers[std::size_t(i)].data(), probe / kProbeStreams);
  });
  result.all_streams = double(probe) / std::max(1e-6, seconds_since(t));
  put_u64(s, 3);  // done
  result.streams = collective::choose_streams(result.one_stream, result.all_streams, kProbeStreams);
  result.measured = true;
  return result;
}

}  // namespace

void throw_cancelled(const PeerConfig& config) {
  throw Error(str_cat("rank ", config.rank, ": rendezvous at cluster version ", config.cluster_version,
                      " cancelled: a newer cluster version superseded it"));
}

Socket connect_unless_cancelled(const PeerConfig& config, const transport::Address& address,
                                Clock::time_point deadline) {
  if (!config.cancel) return transport::connect(address, deadline);
  for (;;) {
    const auto slice_end = std::min(deadline, Clock::now() + kCancelSlice);
    try {
      return transport::connect(address, slice_end);
    } catch (const TimeoutError&) {
      if (slice_end >= deadline) throw;
    }
    if (config.cancel()) throw_cancelled(config);
  }
}

LinkProbe choose_streams(const PeerConfig& config, const std::vector<int>& host_of_rank,
                         const std::vector<Endpoint>& endpoints, std::vector<Socket>& sockets, transport::Listener& tcp,
                         Clock::time_point deadline) {
  LinkProbe fixed;
  fixed.streams = std::max(1, config.streams);
  const auto first = first_ranks(host_of_rank);
  if (first.size() < 2 || config.transport == TransportKind::unix_socket || config.streams > 0) return fixed;
  const int sender = first[0], measurer = first[1];
  const std::string key = link_key(config);
  if (config.rank == sender || config.rank == measurer) {
    const int other = config.rank == sender ? measurer : sender;
    Socket& s = sockets[std::size_t(other)];
    s.set_timeout(left(deadline));
    try {
      if (config.rank == sender) {
        config.store->wait(connected_key(config, measurer), left(deadline));
        send_probe(config, s, endpoints[std::size_t(measurer)], measurer, deadline);
      } else {
        const LinkProbe p = measure_probe(config, s, sender, tcp, deadline);
        config.store->set(key, str_cat(p.streams, " ", p.latency_seconds, " ", p.one_stream, " ", p.all_streams));
        log::info("rank ", config.rank, ": link between hosts: latency ", p.latency_seconds * 1e6, " us, ",
                  p.one_stream / 1e6, " MB/s on one stream, ", p.all_streams / 1e6, " MB/s on ", kProbeStreams, ": ",
                  p.streams, " stream(s)");
      }
    } catch (...) {
      s.set_timeout(std::chrono::milliseconds(0));
      throw;
    }
    s.set_timeout(std::chrono::milliseconds(0));
  }
  std::string record;
  try {
    record = config.store->wait(key, left(deadline));
  } catch (const TimeoutError&) {
    throw TimeoutError(str_cat("rank ", config.rank, ": ranks ", sender, " and ", measurer,
                               " did not measure the link between their hosts within ", config.timeout.count() / 1000.0,
                               " s (AIKIDO_TIMEOUT)"));
  }
  LinkProbe p;
  std::istringstream in(record);
  if (!(in >> p.streams >> p.latency_seconds >> p.one_stream >> p.all_streams) || p.streams < 1 ||
      p.streams > kMaxStreams) {
    throw ProtocolError(str_cat("rank ", config.rank, ": unreadable link measurement '", record, "' in the store"));
  }
  p.measured = true;
  return p;
}

std::vector<std::vector<Socket>> connect_streams(const PeerConfig& config, const std::vector<int>& host_of_rank,
                                                 const std::vector<Endpoint>& endpoints, int streams,
                                                 transport::Listener& tcp, Clock::time_point deadline) {
  std::vector<std::vector<Socket>> out(static_cast<std::size_t>(config.size));
  if (streams < 2) return out;
  const int me = config.rank;
  auto elsewhere = [&](int p) { return host_of_rank[std::size_t(p)] != host_of_rank[std::size_t(me)]; };
  int expected = 0;
  for (int p = me + 1; p < config.size; ++p) expected += elsewhere(p) ? streams - 1 : 0;
  std::vector<int> accepted(std::size_t(config.size), 0);
  std::exception_ptr accept_error;
  std::atomic<bool> stop{false};
  std::thread acceptor([&] {
    try {
      auto got = accept_some(
          config, tcp, expected,
          [&](int p) { return p > me && p < config.size && elsewhere(p) && ++accepted[std::size_t(p)] <= streams - 1; },
          deadline, &stop);
      for (auto& [p, s] : got) out[std::size_t(p)].push_back(std::move(s));
    } catch (...) {
      accept_error = std::current_exception();
    }
  });
  std::exception_ptr connect_error;
  try {
    for (int q = 0; q < me; ++q) {
      if (!elsewhere(q)) continue;
      config.store->wait(connected_key(config, q), left(deadline));
      for (int i = 1; i < streams; ++i) {
        out[std::size_t(q)].push_back(connect_to(config, endpoints[std::size_t(q)], q, deadline));
      }
    }
  } catch (...) {
    connect_error = std::current_exception();
  }
  if (connect_error) stop = true;  // the acceptor gives up within its next look
  acceptor.join();
  if (connect_error) std::rethrow_exception(connect_error);
  if (accept_error) std::rethrow_exception(accept_error);
  return out;
}

LinkMatrix probed_matrix(const LinkProbe& probe, const std::vector<int>& host_of_rank) {
  const int n = int(host_of_rank.size());
  LinkMatrix m = LinkMatrix::unmeasured(n);
  if (!probe.measured) return m;
  const double bandwidth = std::max(probe.one_stream, probe.streams > 1 ? probe.all_streams : 0.0);
  for (int a = 0; a < n; ++a) {
    for (int b = 0; b < n; ++b) {
      if (host_of_rank[std::size_t(a)] == host_of_rank[std::size_t(b)]) continue;
      m.latency_seconds[std::size_t(a * n + b)] = probe.latency_seconds;
      m.bandwidth_bytes_per_second[std::size_t(a * n + b)] = bandwidth;
    }
  }
  return m;
}

void announce_connected(const PeerConfig& config) { config.store->set(connected_key(config, config.rank), "1"); }

}  // namespace aikido::detail
