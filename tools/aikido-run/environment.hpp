// The environment aikido-run gives its workers: its own, with the job's settings applied.
#pragma once

#include <string>
#include <vector>

#include "options.hpp"

namespace aikido::run {

/// What every worker of the job shares, "NAME=value" entries. Each worker adds its AIKIDO_RANK and
/// AIKIDO_LOCAL_RANK (and, in an elastic job, its id, size and cluster version).
struct JobEnvironment {
  std::vector<std::string> shared;
};

/// aikido-run's environment, less the variables aikido-run sets itself (AIKIDO_RANK, AIKIDO_SIZE, the store, the
/// secret, ... and those only --elastic sets), plus the settings of `options` (AIKIDO_TOPOLOGY for --topology, ...)
/// and the defaults for the workers' numeric libraries (worker_defaults) unless the environment sets them.
JobEnvironment job_environment(const Options& options, const std::string& store_address, const std::string& secret,
                               const std::string& job_id);

/// The folder where workers write their parts of the timeline F (AIKIDO_TIMELINE): "F.parts".
inline std::string timeline_parts_dir(const std::string& timeline) { return timeline + ".parts"; }

/// aikido-run's own environment, "NAME=value" entries (for the launchers it starts on other hosts).
std::vector<std::string> inherited_environment();

/// Problems with the AIKIDO_* settings that workers would inherit from aikido-run's environment (a bad
/// AIKIDO_TIMEOUT, an unknown AIKIDO_LOG_LEVEL, ...), each a message for the user; empty when all are valid. A
/// setting that a flag or aikido-run itself replaces is not checked.
std::vector<std::string> inherited_setting_problems(const Options& options);

}  // namespace aikido::run
