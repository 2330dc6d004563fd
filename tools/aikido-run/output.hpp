// Output of the workers, relayed line by line with a "[RANK] " prefix ("[RANK|wID] " where rank and id differ).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace aikido::run {

/// Writes all of `data` to `fd`, retrying on EINTR and waiting while the descriptor is full. Returns false when
/// the descriptor is gone (EPIPE, a closed terminal); the output is then dropped.
bool write_fully(int fd, const char* data, std::size_t size);

/// Writes one message line of aikido-run itself to standard error, in one write, and hands it to the report sink.
void report(const std::string& message);
/// Every message report() writes is also given to `sink` (the job's event log); an empty function removes it. Set it
/// before other threads start and remove it after they stopped; report() may be called from any thread meanwhile.
void set_report_sink(std::function<void(const std::string&)> sink);

/// "SIGTERM", or "signal N" for a number without a name.
std::string signal_name(int sig);
/// "killed by signal SIGTERM" ("killed by signal N" without a name).
std::string killed_by(int sig);

/// The label of a worker's output lines: its rank, and its id too where they differ ("2|w3": rank 2, worker 3). In
/// an elastic job ranks change while ids stay; in a static job they are equal.
std::string worker_label(int rank, std::uint64_t id);

/// Splits one stream of one worker into lines and writes each complete line, prefixed with "[LABEL] " (nothing for
/// an empty label), to a descriptor. The lines of one feed() go out in one write, so they never interleave with other
/// streams. Not thread safe; the supervisor's event loop owns it.
class LinePrefixer {
 public:
  /// A line longer than this is cut: its first part goes out as a line of its own.
  static constexpr std::size_t kMaxLineBytes = std::size_t(64) << 10;

  LinePrefixer(const std::string& label, int out_fd);

  /// Lines that end from now on carry this label.
  void set_label(const std::string& label);
  /// Whether lines go to the output descriptor (--ranks-filter); true at first.
  void set_console(bool on) { console_ = on; }
  /// Every complete line also goes to `fd`, without the label (--log-dir's rank-N.log); -1: none.
  void set_log(int fd) { log_fd_ = fd; }
  /// The output descriptor is a terminal: a segment that ends with a carriage return (not followed by a newline;
  /// a progress line updated in place) is written at once as the terminal's current line, labelled, instead of
  /// waiting for a newline. Such segments never reach the log.
  void set_in_place(bool on) { in_place_ = on; }

  /// Consumes bytes read from the worker.
  void feed(const char* data, std::size_t size);
  /// Writes a partial last line, ending it with a newline. Call once the stream has ended.
  void finish();

 private:
  void append_line(std::string& out, const char* begin, std::size_t size) const;

  std::string prefix_;
  int out_fd_;
  int log_fd_ = -1;
  bool console_ = true;
  bool in_place_ = false;
  bool line_open_ = false;  // an in-place line is on the terminal: the next line starts on a fresh one
  std::string pending_;     // the start of a line whose newline has not arrived yet
  bool out_broken_ = false;
};

}  // namespace aikido::run
