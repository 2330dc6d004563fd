// aikido-run's own events (workers started and exited, cluster versions, failures, recoveries, checkpoints, policy
// decisions, its messages): one record each, kept for the dashboard and the timeline and appended to
// --log-dir's events.jsonl.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace aikido::run {

/// Seconds since the Unix epoch, with microseconds: the time axis shared by events, metrics and the timeline.
double unix_seconds();

/// The job's event log. Every event is a JSON object with at least "time" (unix_seconds()), "seq" (0, 1, ... in the
/// order of emit()) and "event" (its kind: "job_started", "worker_started", "worker_exited", "cluster", "failure",
/// "recovery", "checkpoint", "policy", "job_finished", "message"). Thread safe: the supervisor's thread, the
/// exporter's poller and the dashboard's server call it.
class JobEvents {
 public:
  /// With a path, every event is also appended to that file as one line (JSON lines); ConfigError when it cannot
  /// be opened.
  explicit JobEvents(const std::optional<std::string>& jsonl_path = std::nullopt);
  ~JobEvents();
  JobEvents(const JobEvents&) = delete;
  JobEvents& operator=(const JobEvents&) = delete;

  /// Records `event` (an object with "event"), adding "time" unless it has one, and "seq". Returns the record.
  nlohmann::json emit(nlohmann::json event);
  /// Shorthand: an event of kind `kind` with the fields of `fields`.
  nlohmann::json emit(const std::string& kind, nlohmann::json fields = nlohmann::json::object());
  /// Every event whose seq is `first` or later, in order.
  std::vector<nlohmann::json> since(std::size_t first) const;
  /// Number of events so far (the next seq).
  std::size_t size() const;
  /// `listener` is called, under the log's lock and in order, with every event so far and every event emitted from
  /// now on. It must be quick and must not call back into the log.
  void subscribe(std::function<void(const nlohmann::json&)> listener);

 private:
  mutable std::mutex mutex_;
  std::vector<nlohmann::json> events_;
  std::vector<std::function<void(const nlohmann::json&)>> listeners_;
  int fd_ = -1;
};

}  // namespace aikido::run
