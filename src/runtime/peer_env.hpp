// PeerConfig fields read from the environment, shared by Peer::from_env() and ElasticSession::from_env(), and the
// rendezvous key that aikido-run watches.
#pragma once

#include <aikido/peer.hpp>
#include <cstdint>
#include <string>

namespace aikido::detail {

/// Host, secret, job id, topology, transport, timeout, bind address, segment size and TCP congestion control from
/// the AIKIDO_* variables (src/base/env.hpp); rank, size, cluster version and store are left to the caller. Checks
/// every AIKIDO_* setting first (env::check_environment): ConfigError for a bad value, even of one read elsewhere.
void read_peer_env(PeerConfig& config);

/// Store key under which rank `rank` of cluster version `cluster_version` publishes its addresses at rendezvous.
/// aikido-run reads it to tell a worker that joined with a plain Peer from one that opened an ElasticSession (which
/// publishes its status key before it connects).
std::string endpoint_key(const std::string& job_id, std::uint64_t cluster_version, int rank);

}  // namespace aikido::detail
