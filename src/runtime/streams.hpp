// Several TCP streams between ranks on different hosts, and the measurement of the link between hosts that chooses
// how many (PeerConfig::streams = 0) and gives the link model its first numbers.
//
// The probe: once every rank's first connections are up, the first rank of the first host (the sender) and the first
// rank of the second host (the measurer) measure their link: the measurer times 5 round trips of 8 bytes over their
// connection (latency: half the median), then a 256 KiB transfer (to size the probe to about 10 ms of the link), then
// a probe of that size over their connection and the same probe split over kProbeStreams connections at once (three
// of them opened for the probe and closed after). The fewest streams that carry within 10% of what kProbeStreams
// carried is the number of streams between every pair of ranks on different hosts; the measurer publishes it with
// the measurements in the store (`<job>/v<version>/link`), where every rank reads it. One link stands for all: the
// hosts of a job are taken to be alike (a measurement per pair would cost seconds on large jobs).
//
// Extra streams: every rank connects streams - 1 more connections to every lower rank on another host (once that
// rank said in the store that its first connections are up) and accepts as many from every higher one.
#pragma once

#include <aikido/peer.hpp>
#include <chrono>
#include <vector>

#include "runtime/endpoint.hpp"
#include "transport/socket.hpp"

namespace aikido::detail {

inline constexpr int kMaxStreams = 8;
inline constexpr int kProbeStreams = 4;

struct LinkProbe {
  int streams = 1;
  double latency_seconds = 0;  // one way
  double one_stream = 0;       // bytes/s over one connection
  double all_streams = 0;      // bytes/s over kProbeStreams connections at once
  bool measured = false;
};

/// How often a rendezvous that waits looks at PeerConfig::cancel.
inline constexpr std::chrono::milliseconds kCancelSlice{100};

/// The error of a rendezvous that a newer cluster version superseded (PeerConfig::cancel said so).
[[noreturn]] void throw_cancelled(const PeerConfig& config);

/// transport::connect, given up (throw_cancelled) within kCancelSlice once PeerConfig::cancel says so: the peer of a
/// superseded version closed its listener and is not coming back, so waiting out the deadline would only stall the
/// change to the newer version.
transport::Socket connect_unless_cancelled(const PeerConfig& config, const transport::Address& address,
                                           std::chrono::steady_clock::time_point deadline);

/// Says in the store that this rank's first connections are up (others then open more streams to it, or probe).
void announce_connected(const PeerConfig& config);

/// Chooses the number of streams between ranks on different hosts: config.streams, or (0) measured as above. Every
/// rank calls it after its first connections are up (`sockets[p]`: the connection to rank p); `tcp` is this rank's
/// listener. Returns 1 without measuring for clusters on one host or without TCP.
LinkProbe choose_streams(const PeerConfig& config, const std::vector<int>& host_of_rank,
                         const std::vector<Endpoint>& endpoints, std::vector<transport::Socket>& sockets,
                         transport::Listener& tcp, std::chrono::steady_clock::time_point deadline);

/// Opens `streams` - 1 more connections to every rank on another host; returns them by rank.
std::vector<std::vector<transport::Socket>> connect_streams(const PeerConfig& config,
                                                            const std::vector<int>& host_of_rank,
                                                            const std::vector<Endpoint>& endpoints, int streams,
                                                            transport::Listener& tcp,
                                                            std::chrono::steady_clock::time_point deadline);

/// The link model's first numbers: the probe's latency and bandwidth on every pair of ranks on different hosts.
LinkMatrix probed_matrix(const LinkProbe& probe, const std::vector<int>& host_of_rank);

}  // namespace aikido::detail
