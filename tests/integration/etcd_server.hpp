// etcd servers for the tests: one member or a cluster of several, on free ports, in a temporary data directory,
// stopped and removed by the destructor. Members can be killed and restarted on their data directory.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "subprocess.hpp"

namespace aikido::testing {

class EtcdServer {
 public:
  /// True when the etcd binary is installed (Debian's etcd-server); tests skip with a reason otherwise.
  static bool available();

  /// Starts `members` etcd processes that form one cluster, listening on `address`. `wrapper` is put in front of
  /// each command (e.g. {"ip", "netns", "exec", "h0"} to run it on an emulated host). Waits until every member is
  /// healthy (throws std::runtime_error with etcd's log after 20 s).
  explicit EtcdServer(int members = 1, std::string address = "127.0.0.1", std::vector<std::string> wrapper = {});

  /// Client TLS: the servers' certificate and key, and the CA whose client certificates they ask for.
  struct Tls {
    std::string ca_file;
    std::string cert_file;
    std::string key_file;
  };
  /// One member that serves clients over TLS only and requires a client certificate signed by tls.ca_file.
  explicit EtcdServer(Tls tls);
  ~EtcdServer();
  EtcdServer(const EtcdServer&) = delete;
  EtcdServer& operator=(const EtcdServer&) = delete;

  /// "etcd://A:P1,A:P2,..." of every member ("etcds://" with TLS).
  std::string url() const;
  /// "A:P" of member i.
  std::string endpoint(int member) const;
  std::vector<std::string> endpoints() const;
  int members() const { return int(members_.size()); }

  /// SIGKILL to member i (its data stays).
  void kill(int member);
  /// Starts member i again on its data directory and waits until it is healthy.
  void restart(int member);
  /// Waits until member i answers /health with "true"; false after `timeout`.
  bool wait_healthy(int member, std::chrono::milliseconds timeout) const;
  /// etcd's own log of member i.
  std::string log(int member) const;

 private:
  EtcdServer(int members, std::string address, std::vector<std::string> wrapper, Tls tls);

  struct Member {
    std::string name;
    int client_port = 0;
    int peer_port = 0;
    std::string data_dir;
    std::unique_ptr<Subprocess> process;
  };
  void start(int member, bool fresh);
  void start_all();

  std::string address_;
  std::vector<std::string> wrapper_;
  std::string root_;  // temporary directory of the data directories and logs
  Tls tls_;
  std::vector<Member> members_;
};

}  // namespace aikido::testing
