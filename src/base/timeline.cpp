#include "base/timeline.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include "base/env.hpp"
#include "base/log.hpp"

namespace aikido::detail {
namespace {

constexpr std::size_t kFlushBytes = std::size_t(64) << 10;

// steady_clock -> Unix time, taken once: the trace's spans are measured with the steady clock and placed on the
// shared wall-clock axis (hosts' clocks are as close as NTP keeps them).
const std::int64_t kSteadyToUnixUs = [] {
  const auto steady = std::chrono::steady_clock::now();
  const auto system = std::chrono::system_clock::now();
  return std::chrono::duration_cast<std::chrono::microseconds>(system.time_since_epoch()).count() -
         std::chrono::duration_cast<std::chrono::microseconds>(steady.time_since_epoch()).count();
}();

}  // namespace

Timeline* Timeline::get() {
  static Timeline* const timeline = []() -> Timeline* {
    const auto folder = env::get(env::kTimeline);
    if (!folder) return nullptr;
    const std::string id = env::get(env::kWorkerId).value_or(env::get(env::kRank).value_or("0"));
    const std::string path = *folder + "/worker-" + id + ".jsonl";
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) {
      log::warn("timeline: cannot write ", path, "; this worker records no timeline");
      return nullptr;
    }
    // Destroyed at exit, after main() returned: writes what is left.
    static Timeline instance(fd, std::strtoull(id.c_str(), nullptr, 10));
    return &instance;
  }();
  return timeline;
}

double Timeline::unix_us(std::chrono::steady_clock::time_point t) {
  return double(std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count()) / 1e3 +
         double(kSteadyToUnixUs);
}

Timeline::Timeline(int fd, std::uint64_t worker) : fd_(fd), worker_(worker) {}

Timeline::~Timeline() {
  flush();
  ::close(fd_);
}

std::string Timeline::escape(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (const char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char code[8];
      std::snprintf(code, sizeof code, "\\u%04x", unsigned(c));
      out += code;
    } else {
      out += c;
    }
  }
  return out;
}

int Timeline::track_id(std::string_view track) {
  for (int i = 0; i < track_count_; ++i) {
    if (tracks_[i] == track) return i;
  }
  if (track_count_ == int(std::size(tracks_))) return track_count_ - 1;
  tracks_[track_count_] = std::string(track);
  // The track's name, as a thread name, once.
  buffer_ += "{\"ph\":\"M\",\"name\":\"thread_name\",\"pid\":" + std::to_string(worker_) +
             ",\"tid\":" + std::to_string(track_count_) + ",\"args\":{\"name\":\"" + escape(track) + "\"}}\n";
  return track_count_++;
}

void Timeline::span(std::string_view track, std::string_view category, std::string_view name,
                    std::chrono::steady_clock::time_point begin, std::chrono::steady_clock::time_point end,
                    std::string_view args_json) {
  char head[160];
  const double ts = unix_us(begin);
  const double dur = double(std::chrono::duration_cast<std::chrono::nanoseconds>(end - begin).count()) / 1e3;
  std::lock_guard<std::mutex> lock(mutex_);
  const int tid = track_id(track);
  std::snprintf(head, sizeof head, "{\"ph\":\"X\",\"pid\":%llu,\"tid\":%d,\"ts\":%.3f,\"dur\":%.3f,",
                static_cast<unsigned long long>(worker_), tid, ts, dur);
  std::string line = head;
  line += "\"cat\":\"" + escape(category) + "\",\"name\":\"" + escape(name) + "\",\"args\":{";
  line.append(args_json);
  line += "}}\n";
  append(line);
}

void Timeline::async_span(std::string_view track, std::string_view category, std::string_view name,
                          std::chrono::steady_clock::time_point begin, std::chrono::steady_clock::time_point end,
                          std::string_view args_json) {
  char head[192];
  std::lock_guard<std::mutex> lock(mutex_);
  const int tid = track_id(track);
  const std::uint64_t id = next_async_id_++;
  const std::string tail = "\"cat\":\"" + escape(category) + "\",\"name\":\"" + escape(name) + "\"";
  std::snprintf(head, sizeof head, "{\"ph\":\"b\",\"pid\":%llu,\"tid\":%d,\"id\":\"0x%llx\",\"ts\":%.3f,",
                static_cast<unsigned long long>(worker_), tid, static_cast<unsigned long long>(id), unix_us(begin));
  std::string lines = head + tail + ",\"args\":{";
  lines.append(args_json);
  lines += "}}\n";
  std::snprintf(head, sizeof head, "{\"ph\":\"e\",\"pid\":%llu,\"tid\":%d,\"id\":\"0x%llx\",\"ts\":%.3f,",
                static_cast<unsigned long long>(worker_), tid, static_cast<unsigned long long>(id), unix_us(end));
  lines += head + tail + "}\n";
  append(lines);
}

void Timeline::instant(std::string_view track, std::string_view category, std::string_view name,
                       std::chrono::steady_clock::time_point at, std::string_view args_json) {
  char head[160];
  std::lock_guard<std::mutex> lock(mutex_);
  const int tid = track_id(track);
  std::snprintf(head, sizeof head, "{\"ph\":\"i\",\"s\":\"p\",\"pid\":%llu,\"tid\":%d,\"ts\":%.3f,",
                static_cast<unsigned long long>(worker_), tid, unix_us(at));
  std::string line = head;
  line += "\"cat\":\"" + escape(category) + "\",\"name\":\"" + escape(name) + "\",\"args\":{";
  line.append(args_json);
  line += "}}\n";
  append(line);
}

void Timeline::append(const std::string& line) {
  buffer_ += line;
  if (buffer_.size() < kFlushBytes) return;
  // Whole lines in one write: a reader never sees half an event.
  [[maybe_unused]] const ssize_t n = ::write(fd_, buffer_.data(), buffer_.size());
  buffer_.clear();
}

void Timeline::flush() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (buffer_.empty()) return;
  [[maybe_unused]] const ssize_t n = ::write(fd_, buffer_.data(), buffer_.size());
  buffer_.clear();
}

}  // namespace aikido::detail
