#include "observers.hpp"

#include <unistd.h>

#include <aikido/errors.hpp>
#include <filesystem>
#include <system_error>

#include "output.hpp"
#include "timeline.hpp"
#include "transport/socket.hpp"

namespace aikido::run {
namespace {

std::optional<std::string> event_log_path(const Options& options) {
  if (options.log_dir.empty()) return std::nullopt;
  std::error_code error;
  std::filesystem::create_directories(options.log_dir, error);
  if (error) {
    throw ConfigError("--log-dir " + options.log_dir + ": cannot create it (" + error.message() +
                      "); give a folder aikido-run may write");
  }
  // The launchers of a job across hosts may share the folder (a shared file system): one event log per host.
  if (options.across_hosts()) {
    return options.log_dir + "/events-" + (options.host_id.empty() ? transport::host_name() : options.host_id) +
           ".jsonl";
  }
  return options.log_dir + "/events.jsonl";
}

}  // namespace

JobObservers::JobObservers(const Options& options)
    : options_(options), events_(std::make_unique<JobEvents>(event_log_path(options))) {
  if (!options.timeline.empty()) prepare_timeline(options.timeline);
  set_report_sink([events = events_.get()](const std::string& text) { events->emit("message", {{"text", text}}); });
}

JobObservers::~JobObservers() {
  exporter_.reset();
  set_report_sink({});
}

void JobObservers::start_metrics(const std::string& store_address, const std::string& secret, const std::string& job_id,
                                 int workers, bool elastic) {
  if (!options_.metrics_port && !options_.metrics_file && !options_.dashboard_port) return;
  exporter_.emplace(MetricsExporter::Config{store_address, secret, job_id, workers, elastic, options_.metrics_interval,
                                            options_.metrics_port, options_.metrics_file});
  if (options_.metrics_port) {
    report("aikido-run: metrics at http://127.0.0.1:" + std::to_string(exporter_->port()) + "/metrics");
  }
}

void JobObservers::configure(Supervisor::Config& config) const {
  config.events = events_.get();
  config.log_dir = options_.log_dir;
  config.console_ranks = options_.console_ranks;
  config.console_tty = ::isatty(STDERR_FILENO) == 1;
}

void JobObservers::finish(int status) {
  if (finished_) return;
  finished_ = true;
  if (exporter_) {
    for (const auto& line : exporter_->finish()) report(line);
  }
  events_->emit("job_finished", {{"state", status == 0 ? "finished" : "failed"}, {"status", status}});
  if (!options_.timeline.empty()) write_timeline(options_.timeline, *events_);
}

}  // namespace aikido::run
