// Runs a program as a child process for the integration tests, capturing its output, with every wait bounded.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <string>
#include <vector>

namespace aikido::testing {

struct ProcessResult {
  bool exited = false;  // exited normally; exit_code is valid
  int exit_code = -1;
  int term_signal = 0;     // signal that killed it, when it did not exit normally
  bool timed_out = false;  // killed by the test because it outlived its bound
  std::string out;
  std::string err;
  std::chrono::milliseconds elapsed{0};

  /// Everything above, for assertion messages.
  std::string describe() const;
};

/// A child process running `argv` with stdin from /dev/null and stdout/stderr captured.
///
/// The child gets the test's environment minus every AIKIDO_*, OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and GLIBC_TUNABLES
/// variable, with `set_env`
/// ("NAME=value") added or replacing. It dies with the test (PR_SET_PDEATHSIG), and the destructor kills it if it still
/// runs.
class Subprocess {
 public:
  struct Options {
    std::vector<std::string> set_env;
    std::string cwd;  // empty: the test's working directory
  };

  explicit Subprocess(std::vector<std::string> argv) : Subprocess(std::move(argv), Options{}) {}
  Subprocess(std::vector<std::string> argv, Options options);
  ~Subprocess();
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;

  pid_t pid() const { return pid_; }
  void send_signal(int sig);

  /// Collects output until `done(out, err)` holds (true) or `timeout` passes (false).
  bool wait_for_output(const std::function<bool(const std::string& out, const std::string& err)>& done,
                       std::chrono::milliseconds timeout);

  /// Waits until the process has exited and closed its output; past `timeout` it is killed (timed_out set).
  ProcessResult wait(std::chrono::milliseconds timeout);

 private:
  // Reads what is available, waiting at most `max_wait`; reaps the child when it exits.
  void pump(std::chrono::milliseconds max_wait);

  pid_t pid_ = -1;
  int out_fd_ = -1;
  int err_fd_ = -1;
  bool reaped_ = false;
  int status_ = 0;
  ProcessResult result_;
  std::chrono::steady_clock::time_point start_;
};

/// Runs `argv` to completion, killing it after `timeout`.
ProcessResult run_process(std::vector<std::string> argv, std::chrono::milliseconds timeout,
                          Subprocess::Options options = {});

/// Number of non-overlapping occurrences of `needle` in `text`.
int count_of(const std::string& text, const std::string& needle);

/// The lines of `text` that start with `prefix`.
std::vector<std::string> lines_with_prefix(const std::string& text, const std::string& prefix);

}  // namespace aikido::testing
