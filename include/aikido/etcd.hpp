// etcd as Aikido's store: the rendezvous store and the membership of jobs that span hosts.
//
// Aikido talks to etcd 3.4 or later through its v3 JSON gateway (the /v3/kv, /v3/lease and /v3/watch endpoints that
// every etcd server serves beside gRPC). Nothing Aikido writes to etcd contains the job secret: the store holds
// addresses, cluster specs and status lines, and every connection between workers still proves the secret.
#pragma once

#include <aikido/elastic.hpp>
#include <aikido/store.hpp>
#include <chrono>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace aikido {

/// How to reach an etcd cluster.
struct EtcdOptions {
  /// Client endpoints, "host:port" or "http://host:port" / "https://host:port". Requests go to the endpoint that
  /// answered last and move on to the next when it does not answer.
  std::vector<std::string> endpoints;
  /// TLS: the CA that signed the servers' certificates, and a client certificate and key when the servers ask
  /// for one (etcd's --client-cert-auth). With any of them set, "host:port" endpoints use https.
  std::string ca_file;
  std::string cert_file;
  std::string key_file;
  /// etcd's own authentication (etcdctl auth enable): empty user means none.
  std::string user;
  std::string password;
  /// Longest wait for one answer of one endpoint.
  std::chrono::milliseconds request_timeout{2000};
  /// How long a call keeps trying every endpoint (with back-off) before it gives up with TimeoutError: a restart
  /// of etcd or a leader election shorter than this is invisible to callers.
  std::chrono::milliseconds unavailable_timeout{60'000};
  /// Every key Aikido reads or writes starts with this.
  std::string prefix = "/aikido/";
};

/// Parses "etcd://H1:P1[,H2:P2,...]" ("etcds://" for TLS). Throws ConfigError with the accepted form otherwise.
EtcdOptions parse_etcd_url(std::string_view url);

/// Reads user and password for EtcdOptions from a file of "user=NAME" and "password=SECRET" lines (mode 0600
/// advised). Throws ConfigError when the file cannot be read or lacks a line.
void read_etcd_credentials(const std::string& path, EtcdOptions& options);

/// An aikido::Store kept in etcd under options.prefix: set is a put, compare_and_set a transaction on the value,
/// and wait() a watch of the key (no polling). Thread safe; every call may block up to options.unavailable_timeout
/// while etcd is away.
std::shared_ptr<Store> connect_etcd_store(const EtcdOptions& options);

/// The membership of job `job_id` in etcd: the newest ClusterSpec is one key, "<prefix><job_id>/cluster", replaced
/// by a transaction that compares its mod_revision (so of two proposals for one version exactly one wins), and each
/// version is also kept under "<prefix><job_id>/cluster/v<N>" for get(). watch() follows the key with one etcd
/// watch stream that it keeps open between calls and resumes after a lost stream or a compaction.
std::shared_ptr<MembershipStore> make_etcd_membership(const EtcdOptions& options, std::string job_id);

}  // namespace aikido
