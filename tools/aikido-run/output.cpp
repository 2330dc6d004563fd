#include "output.hpp"

#include <poll.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>

namespace aikido::run {

bool write_fully(int fd, const char* data, std::size_t size) {
  while (size > 0) {
    const ssize_t n = ::write(fd, data, size);
    if (n > 0) {
      data += n;
      size -= std::size_t(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      pollfd pfd{fd, POLLOUT, 0};
      ::poll(&pfd, 1, 1000);
      continue;
    }
    return false;
  }
  return true;
}

namespace {
std::mutex sink_mutex;
std::function<void(const std::string&)> report_sink;
}  // namespace

void report(const std::string& message) {
  const std::string line = message + "\n";
  write_fully(STDERR_FILENO, line.data(), line.size());
  std::lock_guard<std::mutex> lock(sink_mutex);
  if (report_sink) report_sink(message);
}

void set_report_sink(std::function<void(const std::string&)> sink) {
  std::lock_guard<std::mutex> lock(sink_mutex);
  report_sink = std::move(sink);
}

std::string signal_name(int sig) {
  const char* abbrev = ::sigabbrev_np(sig);
  if (abbrev == nullptr) return "signal " + std::to_string(sig);
  return std::string("SIG") + abbrev;
}

std::string killed_by(int sig) {
  const std::string name = signal_name(sig);
  return "killed by " + (name.rfind("SIG", 0) == 0 ? "signal " + name : name);
}

std::string worker_label(int rank, std::uint64_t id) {
  if (rank >= 0 && std::uint64_t(rank) == id) return std::to_string(rank);
  return std::to_string(rank) + "|w" + std::to_string(id);
}

LinePrefixer::LinePrefixer(const std::string& label, int out_fd) : out_fd_(out_fd) { set_label(label); }

void LinePrefixer::set_label(const std::string& label) { prefix_ = label.empty() ? "" : "[" + label + "] "; }

void LinePrefixer::append_line(std::string& out, const char* begin, std::size_t size) const {
  out += prefix_;
  out.append(begin, size);
  out += '\n';
}

void LinePrefixer::feed(const char* data, std::size_t size) {
  pending_.append(data, size);
  std::string out, log;
  std::size_t begin = 0;
  for (;;) {
    const std::size_t sep = pending_.find_first_of(in_place_ ? "\r\n" : "\n", begin);
    if (sep == std::string::npos) break;
    const bool crlf = pending_[sep] == '\r' && sep + 1 < pending_.size() && pending_[sep + 1] == '\n';
    if (pending_[sep] == '\r' && !crlf) {
      // "TEXT\r": a progress line, shown at once as the terminal's current line.
      if (sep > begin) {
        out += "\r" + prefix_;
        out.append(pending_.data() + begin, sep - begin);
        out += "\x1b[K";  // erase what a longer earlier update left on the line
        line_open_ = true;
      }
      begin = sep + 1;
      continue;
    }
    if (line_open_) {
      out += "\r\x1b[K";
      line_open_ = false;
    }
    append_line(out, pending_.data() + begin, sep - begin);
    if (log_fd_ >= 0) log.append(pending_.data() + begin, sep - begin).push_back('\n');
    begin = sep + (crlf ? 2 : 1);
  }
  pending_.erase(0, begin);
  while (pending_.size() > kMaxLineBytes) {
    append_line(out, pending_.data(), kMaxLineBytes);
    if (log_fd_ >= 0) log.append(pending_.data(), kMaxLineBytes).push_back('\n');
    pending_.erase(0, kMaxLineBytes);
  }
  if (!log.empty()) write_fully(log_fd_, log.data(), log.size());
  if (console_ && !out.empty() && !out_broken_) out_broken_ = !write_fully(out_fd_, out.data(), out.size());
}

void LinePrefixer::finish() {
  if (pending_.empty()) return;
  std::string out;
  append_line(out, pending_.data(), pending_.size());
  if (log_fd_ >= 0) write_fully(log_fd_, (pending_ + "\n").data(), pending_.size() + 1);
  pending_.clear();
  if (console_ && !out_broken_) out_broken_ = !write_fully(out_fd_, out.data(), out.size());
}

}  // namespace aikido::run
