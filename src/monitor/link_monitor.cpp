// Link monitoring: latency and bandwidth of this worker's links, probed through the peer-to-peer model store
// (include/aikido/metrics.hpp, LinkMonitor).
#include <aikido/errors.hpp>
#include <aikido/metrics.hpp>
#include <aikido/peer.hpp>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <deque>
#include <limits>

#include "base/log.hpp"

namespace aikido {

namespace {

using Clock = std::chrono::steady_clock;

constexpr const char* kSmallName = "aikido.link/small";
constexpr const char* kProbeName = "aikido.link/probe";
constexpr std::size_t kSmallBytes = 8;
constexpr std::size_t kMaxProbeBytes = std::size_t(1) << 30;
constexpr std::size_t kRoundTripsKept = 16;

double median(std::deque<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

}  // namespace

struct LinkMonitor::State {
  State(Peer& p, Options o) : peer(p), options(o), small(kSmallBytes), probe(o.probe_bytes) {}

  Peer& peer;
  const Options options;
  std::vector<std::uint8_t> small, probe;  // what this rank saves, and (same sizes) where replies land
  std::vector<std::uint8_t> small_in, probe_in;
  // The cluster the measurements belong to.
  std::uint64_t cluster_version = 0;
  int size = 0;
  std::vector<LinkStats> links;                 // index: peer rank
  std::vector<std::deque<double>> round_trips;  // index: peer rank; seconds, newest last
  // The round in progress: request `phase` (0..round_trips-1: small, then the probe) to rank `target`.
  bool round_active = false;
  Clock::time_point next_round{};
  int target = -1;
  int phase = 0;
  // The request in flight; `finished` is its completion time, set by the thread that completes it.
  bool in_flight = false;
  Work work;
  Clock::time_point started;
  std::shared_ptr<std::atomic<Clock::rep>> finished;

  // Saves the probe buffers and forgets the old cluster's measurements when the Peer now belongs to another
  // cluster (or on first use).
  void follow_cluster() {
    if (size == peer.size() && cluster_version == peer.cluster_version()) return;
    size = peer.size();
    cluster_version = peer.cluster_version();
    peer.save(kSmallName, std::span<const std::uint8_t>(small));
    peer.save(kProbeName, std::span<const std::uint8_t>(probe));
    links.assign(std::size_t(size), LinkStats{});
    for (int r = 0; r < size; ++r) links[std::size_t(r)].peer = r;
    round_trips.assign(std::size_t(size), {});
    round_active = false;
    next_round = Clock::time_point{};
  }

  int next_target(int after) const {
    for (int r = after + 1; r < size; ++r) {
      if (r != peer.rank()) return r;
    }
    return -1;
  }

  void start() {
    const bool is_probe = phase == options.round_trips;
    finished = std::make_shared<std::atomic<Clock::rep>>(0);
    started = Clock::now();
    try {
      work = is_probe ? peer.request_async(target, kProbeName, std::span<std::uint8_t>(probe_in))
                      : peer.request_async(target, kSmallName, std::span<std::uint8_t>(small_in));
    } catch (const Error& e) {
      log::debug("link monitor: request to rank ", target, " not started: ", e.what());
      next_peer();
      return;
    }
    work.on_complete([done = finished](std::exception_ptr) { done->store(Clock::now().time_since_epoch().count()); });
    in_flight = true;
  }

  // Waits for the request in flight, takes its time into the link's statistics and moves to the next request of the
  // round.
  void record() {
    in_flight = false;
    try {
      work.wait();
    } catch (const Error& e) {  // no LinkMonitor on that rank yet, or it is gone: skip it this round
      log::debug("link monitor: request to rank ", target, " failed: ", e.what());
      next_peer();
      return;
    }
    // wait() may return before the completion callback ran: then now is the completion time.
    const Clock::rep at = finished->load();
    const Clock::time_point end = at ? Clock::time_point(Clock::duration(at)) : Clock::now();
    const double seconds = std::chrono::duration<double>(end - started).count();
    LinkStats& link = links[std::size_t(target)];
    auto& rtts = round_trips[std::size_t(target)];
    if (phase < options.round_trips) {
      rtts.push_back(seconds);
      if (rtts.size() > kRoundTripsKept) rtts.pop_front();
      link.latency_seconds = median(rtts) / 2;
      ++phase;
      return;
    }
    const double transfer = seconds - 2 * link.latency_seconds;
    link.bandwidth_bytes_per_second = double(options.probe_bytes) / (transfer > 0 ? transfer : seconds);
    ++link.probes;
    next_peer();
  }

  void next_peer() {
    phase = 0;
    target = next_target(target);
    if (target < 0) round_active = false;
  }

  // Starts a round when one is due; returns whether a request should be started now.
  bool due(Clock::time_point now) {
    if (round_active) return true;
    if (size <= 1 || now < next_round) return false;
    target = next_target(-1);
    if (target < 0) return false;
    phase = 0;
    round_active = true;
    next_round = now + options.interval;
    return true;
  }

  void wait_in_flight() {
    if (in_flight) record();
  }
};

LinkMonitor::LinkMonitor(Peer& peer, Options options) {
  if (options.probe_bytes == 0 || options.probe_bytes > kMaxProbeBytes) {
    throw ConfigError("LinkMonitor: probe_bytes must be between 1 and 1 GiB (default 1 MiB)");
  }
  if (options.round_trips < 1) throw ConfigError("LinkMonitor: round_trips must be at least 1 (default 5)");
  if (options.interval.count() < 0) throw ConfigError("LinkMonitor: interval must not be negative (default 5 s)");
  state_ = std::make_unique<State>(peer, options);
  state_->small_in.resize(kSmallBytes);
  state_->probe_in.resize(options.probe_bytes);
  state_->follow_cluster();
}

LinkMonitor::~LinkMonitor() { state_->wait_in_flight(); }

void LinkMonitor::poll() {
  State& s = *state_;
  if (s.in_flight) {
    if (!s.work.done()) return;
    s.record();
  } else {
    s.follow_cluster();
  }
  if (s.due(Clock::now())) s.start();
}

std::vector<LinkStats> LinkMonitor::measure() {
  State& s = *state_;
  s.wait_in_flight();
  s.follow_cluster();
  s.round_active = false;
  s.next_round = Clock::time_point{};
  if (!s.due(Clock::now())) return links();
  while (s.round_active) {
    s.start();
    s.wait_in_flight();
  }
  return links();
}

void LinkMonitor::finish() { state_->wait_in_flight(); }

std::vector<LinkStats> LinkMonitor::links() const {
  std::vector<LinkStats> out;
  for (const LinkStats& link : state_->links) {
    if (link.peer != state_->peer.rank()) out.push_back(link);
  }
  return out;
}

LinkMatrix LinkMonitor::matrix() {
  Peer& peer = state_->peer;
  const int n = peer.size();
  const auto nan = std::numeric_limits<double>::quiet_NaN();
  // This worker's row: n latencies, then n bandwidths.
  std::vector<double> row(2 * std::size_t(n), nan), all(2 * std::size_t(n) * std::size_t(n));
  for (const LinkStats& link : links()) {
    if (link.peer < 0 || link.peer >= n) continue;
    row[std::size_t(link.peer)] = link.latency_seconds;
    row[std::size_t(n + link.peer)] = link.bandwidth_bytes_per_second;
  }
  peer.allgather(std::span<const double>(row), std::span<double>(all), "aikido/links/matrix");
  LinkMatrix m = LinkMatrix::unmeasured(n);
  for (int from = 0; from < n; ++from) {
    for (int to = 0; to < n; ++to) {
      const std::size_t at = std::size_t(from) * std::size_t(n) + std::size_t(to);
      m.latency_seconds[at] = all[std::size_t(from) * 2 * std::size_t(n) + std::size_t(to)];
      m.bandwidth_bytes_per_second[at] = all[std::size_t(from) * 2 * std::size_t(n) + std::size_t(n + to)];
    }
  }
  return m;
}

}  // namespace aikido
