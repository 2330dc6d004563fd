#include "subprocess.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>
#include <sstream>
#include <stdexcept>

extern char** environ;

namespace aikido::testing {
namespace {

using Clock = std::chrono::steady_clock;

bool inherited(const std::string& entry) {
  return entry.rfind("AIKIDO_", 0) != 0 && entry.rfind("OMP_NUM_THREADS=", 0) != 0 &&
         entry.rfind("OPENBLAS_NUM_THREADS=", 0) != 0 && entry.rfind("GLIBC_TUNABLES=", 0) != 0;
}

void close_fd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

}  // namespace

std::string ProcessResult::describe() const {
  std::ostringstream s;
  if (timed_out) s << "TIMED OUT (killed by the test) ";
  if (exited) {
    s << "exit code " << exit_code;
  } else {
    s << "killed by signal " << term_signal;
  }
  s << " after " << elapsed.count() << " ms\n--- stdout ---\n" << out << "--- stderr ---\n" << err << "---";
  return s.str();
}

Subprocess::Subprocess(std::vector<std::string> argv, Options options) : start_(Clock::now()) {
  std::vector<std::string> environment;
  auto name_of = [](const std::string& entry) { return entry.substr(0, entry.find('=')); };
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry = *e;
    const bool overridden = std::any_of(options.set_env.begin(), options.set_env.end(),
                                        [&](const std::string& s) { return name_of(s) == name_of(entry); });
    if (inherited(entry) && !overridden) environment.push_back(entry);
  }
  for (auto& e : options.set_env) environment.push_back(e);
  std::vector<char*> c_argv, c_envp;
  for (auto& a : argv) c_argv.push_back(a.data());
  c_argv.push_back(nullptr);
  for (auto& e : environment) c_envp.push_back(e.data());
  c_envp.push_back(nullptr);

  int out_pipe[2], err_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0 || ::pipe2(err_pipe, O_CLOEXEC) != 0) throw std::runtime_error("pipe2");
  const int dev_null = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  const pid_t parent = ::getpid();
  pid_ = ::fork();
  if (pid_ < 0) throw std::runtime_error("fork");
  if (pid_ == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    ::dup2(dev_null, 0);
    ::dup2(out_pipe[1], 1);
    ::dup2(err_pipe[1], 2);
    if (!options.cwd.empty() && ::chdir(options.cwd.c_str()) != 0) ::_exit(126);
    ::execve(c_argv[0], c_argv.data(), c_envp.data());
    ::_exit(127);
  }
  ::close(dev_null);
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  out_fd_ = out_pipe[0];
  err_fd_ = err_pipe[0];
}

Subprocess::~Subprocess() {
  if (!reaped_) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, &status_, 0);
  }
  close_fd(out_fd_);
  close_fd(err_fd_);
}

void Subprocess::send_signal(int sig) {
  if (!reaped_) ::kill(pid_, sig);
}

void Subprocess::pump(std::chrono::milliseconds max_wait) {
  pollfd fds[2];
  int n = 0;
  int* owners[2];
  std::string* sinks[2];
  if (out_fd_ >= 0) {
    fds[n] = {out_fd_, POLLIN, 0};
    owners[n] = &out_fd_;
    sinks[n++] = &result_.out;
  }
  if (err_fd_ >= 0) {
    fds[n] = {err_fd_, POLLIN, 0};
    owners[n] = &err_fd_;
    sinks[n++] = &result_.err;
  }
  // Poll in short steps so that the child's exit is noticed even while it holds no pipe.
  const int wait_ms = int(std::min<long long>(max_wait.count(), 50));
  if (n > 0) {
    if (::poll(fds, nfds_t(n), wait_ms) > 0) {
      for (int i = 0; i < n; ++i) {
        if (fds[i].revents == 0) continue;
        char buffer[65536];
        const ssize_t got = ::read(fds[i].fd, buffer, sizeof buffer);
        if (got > 0) {
          sinks[i]->append(buffer, std::size_t(got));
        } else if (got == 0 || errno != EINTR) {
          close_fd(*owners[i]);
        }
      }
    }
  } else if (!reaped_) {
    ::usleep(useconds_t(wait_ms) * 1000);
  }
  if (!reaped_ && ::waitpid(pid_, &status_, WNOHANG) == pid_) reaped_ = true;
}

bool Subprocess::wait_for_output(const std::function<bool(const std::string&, const std::string&)>& done,
                                 std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    if (done(result_.out, result_.err)) return true;
    if (Clock::now() >= deadline) return false;
    if (reaped_ && out_fd_ < 0 && err_fd_ < 0) return false;  // nothing more will come
    pump(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()));
  }
}

ProcessResult Subprocess::wait(std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  std::optional<Clock::time_point> drain_deadline;
  while (!reaped_ || out_fd_ >= 0 || err_fd_ >= 0) {
    const auto now = Clock::now();
    if (!reaped_ && now >= deadline) {
      result_.timed_out = true;
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, &status_, 0);
      reaped_ = true;
    }
    // A process the child left behind may hold the pipes; do not wait for it for long.
    if (reaped_ && !drain_deadline) drain_deadline = Clock::now() + std::chrono::seconds(5);
    if (drain_deadline && Clock::now() >= *drain_deadline) break;
    pump(std::chrono::milliseconds(50));
  }
  close_fd(out_fd_);
  close_fd(err_fd_);
  result_.elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start_);
  result_.exited = WIFEXITED(status_);
  result_.exit_code = WIFEXITED(status_) ? WEXITSTATUS(status_) : -1;
  result_.term_signal = WIFSIGNALED(status_) ? WTERMSIG(status_) : 0;
  return result_;
}

ProcessResult run_process(std::vector<std::string> argv, std::chrono::milliseconds timeout,
                          Subprocess::Options options) {
  Subprocess process(std::move(argv), std::move(options));
  return process.wait(timeout);
}

int count_of(const std::string& text, const std::string& needle) {
  int count = 0;
  for (auto pos = text.find(needle); pos != std::string::npos; pos = text.find(needle, pos + needle.size())) ++count;
  return count;
}

std::vector<std::string> lines_with_prefix(const std::string& text, const std::string& prefix) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(prefix, 0) == 0) lines.push_back(line);
  }
  return lines;
}

}  // namespace aikido::testing
