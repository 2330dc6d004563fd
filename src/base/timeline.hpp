// The worker's side of aikido-run --timeline: trace events (Chrome's trace event format) of collectives, training
// step phases and policy decisions, appended to AIKIDO_TIMELINE/worker-ID.jsonl, one JSON object per line; aikido-run
// merges the files of all workers with its own events into one trace.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>

namespace aikido::detail {

/// One process's timeline file. Events are formatted into a buffer under a lock (about a microsecond each) and
/// written when 64 KiB have gathered, by flush(), and when the process exits normally; a worker that is killed loses
/// what it had not written. Thread safe.
class Timeline {
 public:
  /// The process's timeline when AIKIDO_TIMELINE names a folder, else null. The file is FOLDER/worker-ID.jsonl with
  /// ID from AIKIDO_WORKER_ID (AIKIDO_RANK when not elastic). One per process: the file is the process's, like its
  /// standard error; created at the first call, never destroyed before exit.
  static Timeline* get();

  /// Microseconds since the Unix epoch of a steady_clock time (the trace's time axis, shared across processes).
  static double unix_us(std::chrono::steady_clock::time_point t);

  /// A span on track `track` ("step", "collectives", ...): Chrome's complete event ("ph":"X"). `args_json`: the
  /// members of the "args" object without braces ("\"bytes\":4096"), or empty.
  void span(std::string_view track, std::string_view category, std::string_view name,
            std::chrono::steady_clock::time_point begin, std::chrono::steady_clock::time_point end,
            std::string_view args_json = {});
  /// A span that may overlap others of its track (collectives in flight together): a pair of Chrome's nestable
  /// async events ("ph":"b" and "e") with an id of the timeline's own, on track `track`.
  void async_span(std::string_view track, std::string_view category, std::string_view name,
                  std::chrono::steady_clock::time_point begin, std::chrono::steady_clock::time_point end,
                  std::string_view args_json = {});
  /// A point in time (an instant event, "ph":"i") on track `track`.
  void instant(std::string_view track, std::string_view category, std::string_view name,
               std::chrono::steady_clock::time_point at, std::string_view args_json = {});
  void flush();
  ~Timeline();

  /// `text` as the inside of a JSON string (quotes, backslashes and control characters escaped).
  static std::string escape(std::string_view text);

 private:
  explicit Timeline(int fd, std::uint64_t worker);
  void append(const std::string& line);
  int track_id(std::string_view track);

  std::mutex mutex_;
  int fd_;
  std::uint64_t worker_;
  std::string buffer_;
  std::string tracks_[8];  // track names in the order first used; their index is the trace's thread id
  int track_count_ = 0;
  std::uint64_t next_async_id_ = 0;
};

}  // namespace aikido::detail
