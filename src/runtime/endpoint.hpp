// What each rank publishes at rendezvous, and the check that every rank can reach the addresses the others publish.
#pragma once

#include <aikido/peer.hpp>
#include <string>
#include <vector>

namespace aikido::detail {

/// A rank's rendezvous record: "host=H\ntcp=ADDR\nunix=ADDR\nnet=ID\n". Readers ignore lines they do not know.
struct Endpoint {
  std::string host;       // PeerConfig::host: ranks with equal host ids use the same-host paths
  std::string tcp;        // "tcp:HOST:PORT", or empty (AIKIDO_TRANSPORT=unix)
  std::string unix_path;  // "unix:@NAME", or empty (AIKIDO_TRANSPORT=tcp)
  std::string network;    // transport::network_id(): ranks with equal ids reach each other's loopback addresses
};

std::string encode_endpoint(const Endpoint& endpoint);
/// Throws ProtocolError naming `rank` when the record has no host or no address.
Endpoint decode_endpoint(const std::string& text, int rank);

/// Refuses a cluster in which a rank would have to connect to another rank's loopback address from another host or
/// network namespace (where that address is not the other rank's): a ConfigError on every rank that names the rank
/// listening on loopback and the setting to change on its host (AIKIDO_IFACE or AIKIDO_BIND_ADDRESS), instead of
/// connections that time out. Ranks whose network ids are equal reach each other's loopback (ranks emulating hosts
/// in one process or on one machine); when either id is unknown, a different host id counts as another network.
void check_reachable(const PeerConfig& config, const std::vector<Endpoint>& endpoints);

}  // namespace aikido::detail
