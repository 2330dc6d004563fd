#include "events.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <aikido/errors.hpp>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "output.hpp"

namespace aikido::run {

double unix_seconds() {
  return double(
             std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch())
                 .count()) /
         1e6;
}

JobEvents::JobEvents(const std::optional<std::string>& jsonl_path) {
  if (!jsonl_path) return;
  fd_ = ::open(jsonl_path->c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    throw ConfigError("cannot write the event log '" + *jsonl_path + "': " + std::strerror(errno) +
                      "; give --log-dir a folder aikido-run may write");
  }
}

JobEvents::~JobEvents() {
  if (fd_ >= 0) ::close(fd_);
}

nlohmann::json JobEvents::emit(nlohmann::json event) {
  if (!event.contains("time")) event["time"] = unix_seconds();
  std::lock_guard<std::mutex> lock(mutex_);
  event["seq"] = events_.size();
  if (fd_ >= 0) {
    // One write per line: a reader following the file never sees half an event.
    const std::string line = event.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
    write_fully(fd_, line.data(), line.size());
  }
  for (const auto& listener : listeners_) listener(event);
  events_.push_back(event);
  return event;
}

nlohmann::json JobEvents::emit(const std::string& kind, nlohmann::json fields) {
  fields["event"] = kind;
  return emit(std::move(fields));
}

std::vector<nlohmann::json> JobEvents::since(std::size_t first) const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (first >= events_.size()) return {};
  return {events_.begin() + std::ptrdiff_t(first), events_.end()};
}

std::size_t JobEvents::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return events_.size();
}

void JobEvents::subscribe(std::function<void(const nlohmann::json&)> listener) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& event : events_) listener(event);
  listeners_.push_back(std::move(listener));
}

}  // namespace aikido::run
