#include "output.hpp"

#include <poll.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

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

void report(const std::string& message) {
  const std::string line = message + "\n";
  write_fully(STDERR_FILENO, line.data(), line.size());
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
  std::string out;
  std::size_t begin = 0;
  for (;;) {
    const std::size_t newline = pending_.find('\n', begin);
    if (newline == std::string::npos) break;
    append_line(out, pending_.data() + begin, newline - begin);
    begin = newline + 1;
  }
  pending_.erase(0, begin);
  while (pending_.size() > kMaxLineBytes) {
    append_line(out, pending_.data(), kMaxLineBytes);
    pending_.erase(0, kMaxLineBytes);
  }
  if (!out.empty() && !out_broken_) out_broken_ = !write_fully(out_fd_, out.data(), out.size());
}

void LinePrefixer::finish() {
  if (pending_.empty()) return;
  std::string out;
  append_line(out, pending_.data(), pending_.size());
  pending_.clear();
  if (!out_broken_) out_broken_ = !write_fully(out_fd_, out.data(), out.size());
}

}  // namespace aikido::run
