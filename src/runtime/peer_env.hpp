// PeerConfig read from the environment, shared by Peer::from_env() and ElasticSession::from_env(), and the
// rendezvous key that aikido-run watches.
#pragma once

#include <aikido/peer.hpp>
#include <cstdint>
#include <string>

#include "base/launcher_env.hpp"

namespace aikido::detail {

/// Host, secret (AIKIDO_SECRET or AIKIDO_SECRET_FILE), job id, topology, transport, timeout, bind address, segment
/// size and TCP congestion control from the AIKIDO_* variables (src/base/env.hpp); rank, size, cluster version and
/// store are left to the caller. Checks every AIKIDO_* setting first (env::check_environment): ConfigError for a bad
/// value, even of one read elsewhere.
void read_peer_env(PeerConfig& config);

/// Store key under which rank `rank` of cluster version `cluster_version` publishes its addresses at rendezvous.
/// aikido-run reads it to tell a worker that joined with a plain Peer from one that opened an ElasticSession (which
/// publishes its status key before it connects).
std::string endpoint_key(const std::string& job_id, std::uint64_t cluster_version, int rank);

/// The address this worker's TCP listeners bind to and publish, for a worker that `launch` describes:
///   - AIKIDO_BIND_ADDRESS, or the first IPv4 address of the interfaces AIKIDO_IFACE selects (at most one of both);
///   - 127.0.0.1 for a job of one worker, or when the launcher says every worker is on this host;
///   - else the address of the interface that routes to the store's host (the master address when rank 0 serves
///     the store), when that is not loopback;
///   - else, when the store's host is not loopback here or the job is known to span hosts, the first interface that
///     is up and is neither loopback nor docker (NCCL's default, "^lo,docker"); a job known to span hosts with no
///     such interface is a ConfigError naming AIKIDO_IFACE;
///   - else 127.0.0.1 (every worker reaches the store on loopback: they share this host).
/// A loopback address that still reaches another host is refused at rendezvous (runtime/endpoint.hpp).
std::string choose_bind_address(const env::Lookup& lookup, const env::LaunchInfo& launch);

/// The whole PeerConfig of Peer::from_env(): rank and size from the launcher (src/base/launcher_env.hpp), the
/// AIKIDO_* settings, the launcher's job id unless AIKIDO_JOB_ID is set, the bind address, and for several workers
/// the store: served here when this is rank 0 of a job whose launcher serves none (its handle, kept in
/// PeerConfig::store, owns the server: see detail::serve_store), connected otherwise (retrying until rank 0's is up,
/// within the timeout). Several workers without a secret are a ConfigError that says how to make one.
/// Reads the process environment; `launch` receives what was detected.
PeerConfig peer_config_from_env(env::LaunchInfo& launch);

/// After a failed create() in a job whose rank 0 serves the store: every rank marks in the store that it has left,
/// and rank 0 keeps its store up until all others have (at most kFailedRendezvousLinger), so that each of them
/// reports the failure it found itself (such as a loopback address across hosts, which every rank detects) rather
/// than a store that went away under it. Best effort: errors of the store itself are ignored.
inline constexpr std::chrono::milliseconds kFailedRendezvousLinger{5'000};
void leave_failed_rendezvous(const PeerConfig& config);

}  // namespace aikido::detail
