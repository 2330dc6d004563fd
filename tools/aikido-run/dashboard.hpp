// aikido-run --dashboard PORT: the live page of a job (web/ in the install prefix, Chart.js from Debian's
// libjs-chart.js), fed by one server-sent-event stream of the job's records.
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

namespace httplib {
class Server;
}

namespace aikido::run {

/// Serves GET / (the page), /app.js, /style.css, /chart.js and GET /events: a text/event-stream of the job's
/// records, each one JSON object in one `data:` line, the same objects --metrics-file writes: a worker's metrics
/// ({"time", "rank", ...TrainingMetrics}) or one of aikido-run's events ({"time", "event", ...}; JobEvents), with
/// its index as the event's `id:`. A new client first gets every record so far (a reconnecting one, every record
/// after its Last-Event-ID), then each new one as it comes (at most a metrics interval behind the workers). When the
/// dashboard stops, every stream gets the records it has not had and ends. Thread safe.
class Dashboard {
 public:
  /// Listens on `address`:`port` (0: a free port); ConfigError when it cannot, or when the page's files are missing.
  Dashboard(const std::string& address, int port);
  ~Dashboard();
  Dashboard(const Dashboard&) = delete;
  Dashboard& operator=(const Dashboard&) = delete;

  int port() const { return port_; }
  /// "http://ADDRESS:PORT/".
  std::string url() const;
  /// Appends a record and sends it to every client.
  void add(const nlohmann::json& record);

 private:
  std::string address_;
  int port_ = 0;
  std::string web_dir_;
  std::string chart_js_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  mutable std::mutex mutex_;
  std::condition_variable added_;
  std::condition_variable streams_closed_;
  int open_streams_ = 0;              // /events responses not yet finished
  std::vector<std::string> records_;  // serialised, in order
  bool stopping_ = false;
};

/// The folder of the page's files: next to the binary (../share/aikido/web), the install prefix, or the source tree.
std::string dashboard_web_dir();

}  // namespace aikido::run
