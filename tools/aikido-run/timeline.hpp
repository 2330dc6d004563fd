// aikido-run --timeline F: the job's Chrome trace, from the workers' parts (AIKIDO_TIMELINE) and aikido-run's events.
#pragma once

#include <string>

#include "events.hpp"

namespace aikido::run {

/// The trace's process id of aikido-run's own events (workers are their worker ids).
inline constexpr int kLauncherTracePid = 1'000'000;

/// Creates the folder the workers write their parts to (timeline_parts_dir(path)), empty. ConfigError when it
/// cannot.
void prepare_timeline(const std::string& path);

/// Writes the trace to `path` ({"traceEvents": [...]}, Chrome's JSON object format, which Perfetto and
/// chrome://tracing load): every worker's events, named "worker ID", and aikido-run's events as instant events
/// (cluster versions, failures, recoveries, checkpoints, workers started and exited) on a process of their own, then
/// removes the parts. Returns false, after reporting why, when it cannot.
bool write_timeline(const std::string& path, const JobEvents& events);

}  // namespace aikido::run
