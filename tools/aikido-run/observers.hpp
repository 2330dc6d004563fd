// What aikido-run records and shows about a job besides the workers' own output: the event log (--log-dir), the
// metrics exporters (--metrics-port, --metrics-file), the live dashboard (--dashboard) and the timeline (--timeline).
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "events.hpp"
#include "metrics_exporter.hpp"
#include "options.hpp"
#include "supervisor.hpp"

namespace aikido::run {

class Dashboard;

/// Owned by the code that runs a job (one per aikido-run); the supervisor, the controller and the exporter report
/// to its JobEvents. Construction creates --log-dir and events.jsonl, starts the dashboard's server and prints its
/// URL, and routes aikido-run's messages (report()) into the event log; destruction stops all of it.
class JobObservers {
 public:
  explicit JobObservers(const Options& options);
  ~JobObservers();
  JobObservers(const JobObservers&) = delete;
  JobObservers& operator=(const JobObservers&) = delete;

  JobEvents& events() { return *events_; }
  /// Starts the metrics exporter when --metrics-port, --metrics-file or --dashboard asked for metrics. `workers`:
  /// ranks that may publish; `elastic`: only the ranks of the latest cluster version count.
  void start_metrics(const std::string& store_address, const std::string& secret, const std::string& job_id,
                     int workers, bool elastic);
  /// Fills the supervisor's share: the event log, --log-dir, --ranks-filter, whether the console is a terminal.
  void configure(Supervisor::Config& config) const;
  /// The job ended with `status`: records it, prints the metrics summary and writes the timeline (--timeline).
  void finish(int status);

  /// aikido-run --dashboard PORT --replay F: shows the run recorded in F until SIGINT or SIGTERM. Returns the exit
  /// status (0; 1 when F holds no record).
  static int replay(const Options& options);

 private:
  const Options& options_;
  std::unique_ptr<JobEvents> events_;
  std::optional<MetricsExporter> exporter_;
  std::unique_ptr<Dashboard> dashboard_;
  bool finished_ = false;
};

}  // namespace aikido::run
