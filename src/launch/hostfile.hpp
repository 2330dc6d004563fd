// The hosts of a job started from one host (Horovod's spellings): `-H h1:2,h2:2` or a hostfile of lines
// `host slots=N` (mpirun's form; `#` starts a comment).
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace aikido::launch {

struct HostSlots {
  std::string host;  // as given: what the launch command (ssh) is given, and the host's id in the job
  int slots = 1;     // workers on it
  friend bool operator==(const HostSlots&, const HostSlots&) = default;
};

/// Parses "h1:2,h2:2" (a host without ":N" has 1 slot). Throws ConfigError naming the bad entry and the form.
std::vector<HostSlots> parse_host_list(std::string_view text);
/// Parses hostfile text: one host per line, "host", "host slots=N" or "host:N"; blank lines and "# ..." ignored.
/// Throws ConfigError naming the line.
std::vector<HostSlots> parse_hostfile(std::string_view text, std::string_view file_name);
/// Reads and parses a hostfile; ConfigError when it cannot be read or names no host.
std::vector<HostSlots> read_hostfile(const std::string& path);

/// Takes `np` workers from the hosts in order, each host at most its slots (the last used host may get fewer);
/// hosts left without workers are dropped. ConfigError when the slots do not add up to `np`.
std::vector<HostSlots> place_workers(std::vector<HostSlots> hosts, int np);

/// The command that starts a launcher on `host`, as ssh takes it: `launch_command` split on spaces (empty: "ssh"),
/// the host, and one command line for the remote shell: "cd DIR && " (when `directory` is not empty) and `remote`,
/// each word quoted for a POSIX shell. Any other launch command must take the same two arguments (a host and a
/// command line that it runs with `sh -c`), as `scripts/hosts.sh ssh` does for emulated hosts.
std::vector<std::string> launch_argv(const std::string& launch_command, const std::string& host,
                                     const std::string& directory, const std::vector<std::string>& remote);

/// `text` quoted for a POSIX shell ('...' with embedded quotes escaped); plain words stay as they are.
std::string shell_quote(std::string_view text);

}  // namespace aikido::launch
