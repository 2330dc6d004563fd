// PeerConfig fields read from the environment, shared by Peer::from_env() and ElasticSession::from_env().
#pragma once

#include <aikido/peer.hpp>

namespace aikido::detail {

/// Host, secret, job id, topology, transport, timeout, bind address, segment size and TCP congestion control from
/// the AIKIDO_* variables (src/base/env.hpp); rank, size, cluster version and store are left to the caller. Checks
/// every AIKIDO_* setting first (env::check_environment): ConfigError for a bad value, even of one read elsewhere.
void read_peer_env(PeerConfig& config);

}  // namespace aikido::detail
