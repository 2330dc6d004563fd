// Emulated hosts for tests of jobs that span hosts: network namespaces made by scripts/hosts.sh, removed by the
// destructor (and by the script's watchdog if the test process is killed).
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "subprocess.hpp"

namespace aikido::testing {

class EmulatedHosts {
 public:
  /// Empty when hosts can be made here; otherwise why not (tests skip with it: not root, no namespaces...).
  static std::string unavailable_reason();

  /// Makes hosts 0..n-1 (host i: namespace aikido-hI, address 198.18.0.(10+i), host name hI). The bridge, at
  /// 198.18.0.1, is reachable from every host: servers the hosts share (etcd) listen there.
  explicit EmulatedHosts(int n);
  ~EmulatedHosts();
  EmulatedHosts(const EmulatedHosts&) = delete;
  EmulatedHosts& operator=(const EmulatedHosts&) = delete;

  int size() const { return n_; }
  static std::string address(int host) { return "198.18.0." + std::to_string(10 + host); }
  static constexpr const char* kBridgeAddress = "198.18.0.1";
  /// "hI": the host's name (and its host id in a job).
  static std::string name(int host) { return "h" + std::to_string(host); }
  /// What to put in front of a command to run it on host i.
  static std::vector<std::string> wrapper(int host);
  /// The --launch-command that starts launchers on these hosts the way ssh would.
  static std::string launch_command();

  /// Runs `argv` on host i.
  std::unique_ptr<Subprocess> start(int host, std::vector<std::string> argv, Subprocess::Options options = {}) const;

  /// Host i's link: down (a partition), up again, or shaped to `rate` (tc units) both ways.
  void cut(int host) const;
  void heal(int host) const;
  void shape(int host, const std::string& rate) const;

 private:
  static void script(std::vector<std::string> args, std::chrono::seconds timeout = std::chrono::seconds(60));
  int n_;
};

}  // namespace aikido::testing
