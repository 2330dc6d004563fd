// aikido-run's metrics exporters: workers publish their training metrics to the job's store
// (aikido::MetricsPublisher); this reads them every interval and serves them in Prometheus text format over HTTP,
// appends them to a file as JSON lines, and prints a summary per worker at the end.
#pragma once

#include <aikido/tls.hpp>

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace aikido {
class Store;
class MembershipStore;
}  // namespace aikido

namespace aikido::run {

class JobEvents;

class MetricsExporter {
 public:
  struct Config {
    std::string store_address;  // "host:port" of aikido-run's store, or a store URL (etcd://...)
    std::string secret;
    std::string job_id;
    int workers = 1;       // ranks that may publish (elastic: --max-np)
    bool elastic = false;  // serve only the ranks of the job's latest cluster version
    double interval_seconds = 1.0;
    std::optional<int> port;          // serve http://127.0.0.1:port/metrics (0: any free port)
    std::optional<std::string> file;  // JSON lines
    /// Called with every record written to the file ({"time", "rank", ...metrics}), file or not (the dashboard).
    std::function<void(const nlohmann::json&)> on_record;
    /// Where the workers' policy decisions (TrainingMetrics::decisions) are recorded as "policy" events, once each.
    JobEvents* events = nullptr;
    TlsOptions tls;  // of aikido-run's store
  };
  /// Binds the port and opens the file (UsageError-style aikido::ConfigError when it cannot), then starts polling.
  explicit MetricsExporter(Config config);
  ~MetricsExporter();
  MetricsExporter(const MetricsExporter&) = delete;
  MetricsExporter& operator=(const MetricsExporter&) = delete;

  /// The port the HTTP endpoint listens on, when there is one.
  int port() const { return port_; }
  /// Reads the store a last time, flushes the file and returns one summary line per worker that published.
  std::vector<std::string> finish();
  /// Appends `record` (one of aikido-run's events) to the file as a JSON line, so that it holds what the dashboard
  /// shows (--replay reads it back). Thread safe.
  void write_record(const nlohmann::json& record);

 private:
  void poll();
  void poll_loop();
  void record(const nlohmann::json& metrics);
  void serve_loop();
  void answer(int fd);

  Config config_;
  std::shared_ptr<Store> store_;
  std::shared_ptr<MembershipStore> membership_;  // elastic jobs
  int highest_served_ = 0;                       // elastic jobs: the largest cluster size seen so far
  int listen_fd_ = -1;
  int port_ = 0;
  int file_fd_ = -1;
  std::mutex mutex_;
  std::vector<std::string> prometheus_;   // per rank, latest
  std::vector<std::string> json_;         // per rank, latest
  std::set<std::string> decisions_seen_;  // policy decisions recorded as events
  std::atomic<bool> stopping_{false};
  std::thread poller_, server_;
};

/// Every worker's Prometheus text as one exposition: each metric family once, with its HELP and TYPE lines, then
/// its samples from every worker. The texts come from workers through the store and are not trusted.
std::string merge_prometheus(const std::vector<std::string>& texts);

/// aikido-run's own metrics of the job, in Prometheus text, from its event log (JobEvents): the latest cluster's
/// version and size (aikido_job_cluster_version, aikido_job_cluster_size), whether the job runs (aikido_job_running)
/// and how many events of each kind it had (aikido_job_events_total{kind=...}: resize, restart, lost, failure,
/// recovery, checkpoint, policy; counters from 0). Dashboards annotate their time axes where these change.
std::string job_prometheus(const std::vector<nlohmann::json>& events);

/// The summary line of one worker's JSON metrics publication (aikido::to_json), or nullopt when the text is not a
/// JSON object. Fields of the wrong type count as absent; never throws on any text.
std::optional<std::string> summarize_metrics(int rank, std::string_view json_text);

}  // namespace aikido::run
