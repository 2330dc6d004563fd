// TLS 1.3 on a job's TCP connections.
#pragma once

#include <string>

namespace aikido {

/// TLS on every TCP connection of a job: the data connections between workers and the connections to the store
/// that aikido-run (or rank 0) serves. etcd has its own TLS (AIKIDO_STORE_CA, ...); same-host paths (shared memory,
/// Unix-domain sockets) never leave the host and stay plain. Inside TLS every connection still proves the job
/// secret. Every worker, aikido-run and aikido-ctl of a job must agree: a TLS side and a plain side refuse each
/// other with an error that says so.
struct TlsOptions {
  bool enabled = false;
  /// With all three empty (the default): every side of the job uses one certificate derived from the job secret
  /// (an Ed25519 key from HMAC-SHA256 of the secret, self-signed) and accepts exactly that certificate from the
  /// other side; knowing the secret is what admits a peer, as in the handshake. Otherwise all three are needed:
  /// this side's certificate (PEM, its chain may follow), its private key (PEM), and the CA certificates (PEM) one
  /// of which must have signed the other side's certificate. Both sides present certificates (mutual TLS); host
  /// names are not checked, since workers connect by address: a certificate the CA signed is a member of the job.
  std::string cert_file;
  std::string key_file;
  std::string ca_file;

  /// AIKIDO_TLS (0 or 1), AIKIDO_TLS_CERT, AIKIDO_TLS_KEY, AIKIDO_TLS_CA; a certificate file given turns TLS on.
  /// Throws ConfigError for a value that is neither 0 nor 1, or some but not all of the three files.
  static TlsOptions from_env();
  /// "off", "on (certificate derived from the job secret)" or "on (certificate FILE, CA FILE)".
  std::string describe() const;
};

}  // namespace aikido
