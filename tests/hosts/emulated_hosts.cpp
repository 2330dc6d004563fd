#include "emulated_hosts.hpp"

#include <unistd.h>

#include <chrono>
#include <stdexcept>

namespace aikido::testing {

namespace {

using namespace std::chrono_literals;

const std::string kScript = AIKIDO_SOURCE_DIR "/scripts/hosts.sh";

}  // namespace

void EmulatedHosts::script(std::vector<std::string> args, std::chrono::seconds timeout) {
  args.insert(args.begin(), kScript);
  const ProcessResult r = run_process(args, timeout);
  if (!r.exited || r.exit_code != 0) throw std::runtime_error("scripts/hosts.sh failed: " + r.describe());
}

std::string EmulatedHosts::unavailable_reason() {
  const ProcessResult r = run_process({kScript, "check"}, 30s);
  if (r.exited && r.exit_code == 0) return {};
  return "emulated hosts cannot be made here: " + (r.out.empty() ? r.err : r.out);
}

EmulatedHosts::EmulatedHosts(int n) : n_(n) {
  // Waits while a test from another checkout holds the hosts (scripts/hosts.sh up waits up to 20 minutes).
  script({"up", std::to_string(n), "--owner", std::to_string(::getpid())}, 1260s);
}

EmulatedHosts::~EmulatedHosts() {
  try {
    script({"down", "--owner", std::to_string(::getpid())});
  } catch (const std::exception&) {
  }
}

std::vector<std::string> EmulatedHosts::wrapper(int host) { return {kScript, "exec", name(host)}; }

std::string EmulatedHosts::launch_command() { return kScript + " ssh"; }

std::unique_ptr<Subprocess> EmulatedHosts::start(int host, std::vector<std::string> argv,
                                                 Subprocess::Options options) const {
  std::vector<std::string> full = wrapper(host);
  full.insert(full.end(), argv.begin(), argv.end());
  return std::make_unique<Subprocess>(full, std::move(options));
}

void EmulatedHosts::cut(int host) const { script({"cut", name(host)}); }
void EmulatedHosts::heal(int host) const { script({"heal", name(host)}); }
void EmulatedHosts::shape(int host, const std::string& rate) const { script({"shape", name(host), rate}); }

}  // namespace aikido::testing
