#include "observers.hpp"

#include <unistd.h>

#include <aikido/errors.hpp>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <system_error>

#include "dashboard.hpp"
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
  if (options.dashboard_port) {
    dashboard_ = std::make_unique<Dashboard>(options.dashboard_address, *options.dashboard_port);
    events_->subscribe([dashboard = dashboard_.get()](const nlohmann::json& e) { dashboard->add(e); });
    report("aikido-run: dashboard at " + dashboard_->url());
  }
  set_report_sink([events = events_.get()](const std::string& text) { events->emit("message", {{"text", text}}); });
}

JobObservers::~JobObservers() {
  exporter_.reset();
  set_report_sink({});
  dashboard_.reset();
}

void JobObservers::start_metrics(const std::string& store_address, const std::string& secret, const std::string& job_id,
                                 int workers, bool elastic) {
  if (!options_.metrics_port && !options_.metrics_file && !options_.dashboard_port) return;
  MetricsExporter::Config config{
      store_address,        secret, job_id, workers, elastic, options_.metrics_interval, options_.metrics_port,
      options_.metrics_file};
  config.events = events_.get();
  config.tls = options_.tls;
  if (dashboard_) config.on_record = [dashboard = dashboard_.get()](const nlohmann::json& r) { dashboard->add(r); };
  exporter_.emplace(std::move(config));
  // The file holds the job's events too, those before it was opened first: everything the dashboard shows.
  if (options_.metrics_file) {
    events_->subscribe([exporter = &*exporter_](const nlohmann::json& e) { exporter->write_record(e); });
  }
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

int JobObservers::replay(const Options& options) {
  Dashboard dashboard(options.dashboard_address, *options.dashboard_port);
  std::ifstream in(options.replay);
  std::size_t records = 0, skipped = 0;
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    try {
      auto record = nlohmann::json::parse(line);
      if (!record.is_object() || !record.contains("time")) throw std::runtime_error("no time");
      dashboard.add(record);
      ++records;
    } catch (const std::exception&) {
      ++skipped;
    }
  }
  if (records == 0) {
    report("aikido-run: --replay " + options.replay + ": no records; give a file that --metrics-file wrote");
    return 1;
  }
  dashboard.add({{"time", unix_seconds()}, {"event", "replay"}, {"file", options.replay}});
  report("aikido-run: dashboard at " + dashboard.url() + " shows " + std::to_string(records) + " records of " +
         options.replay + (skipped ? " (" + std::to_string(skipped) + " lines that are not records skipped)" : "") +
         "; Ctrl-C stops it");
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGHUP);
  ::pthread_sigmask(SIG_BLOCK, &set, nullptr);  // already blocked in every thread (main); sigwait takes them
  int sig = 0;
  ::sigwait(&set, &sig);
  return 0;
}

}  // namespace aikido::run
