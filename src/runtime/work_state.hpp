// The shared state behind aikido::Work.
#pragma once

#include <aikido/work.hpp>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "transport/frame.hpp"

namespace aikido::detail {

struct WorkState {
  std::mutex mutex;
  std::condition_variable changed;
  bool done = false;
  std::exception_ptr error;
  std::vector<std::function<void(std::exception_ptr)>> callbacks;
  /// Set for work that a waiting thread can drive to completion itself (the same-host path): Work::wait() calls it
  /// first; it returns once the work is done, `until` passed, or the library is closing. Set before the Work handle
  /// is handed out, never changed afterwards.
  std::function<void(WorkState&, std::chrono::steady_clock::time_point until)> drive;
  /// Set for the phases of hierarchical collectives: fails the work with `error` (telling the other ranks, so they
  /// fail it too) unless it is done already. Set before the Work handle is handed out, never changed afterwards.
  std::function<void(std::exception_ptr error)> cancel;
  /// A thread is in Work::wait() on this work: what a stall report says a rank is waiting in. A plain flag rather
  /// than a count (a read-modify-write per wait cost about 1.5% of a 4 KiB shared-memory allreduce): set when a
  /// wait begins, cleared when a timed wait gives up; a blocking wait ends only with the work.
  std::atomic<bool> waited{false};

  /// Marks the work done and runs its callbacks on this thread. Call without holding other library locks.
  void complete(std::exception_ptr failure);
};

/// The exception a failure of this kind raises on ranks that hear of it from another rank.
std::exception_ptr error_for(transport::WireError kind, const std::string& text);
/// The kind of a failure, as told to other ranks.
transport::WireError wire_error_of(std::exception_ptr error);
/// The text of a failure.
std::string error_text(std::exception_ptr error);

/// The state behind a Work, for the library's own use.
struct WorkAccess {
  static const std::shared_ptr<WorkState>& state(const Work& work) { return work.state_; }
};

/// The part of a stall report about ranks that did not answer the stall query: "; rank 1 has not answered ...".
std::string silent_ranks(const std::vector<int>& ranks);

/// A collective in flight, as a stall report describes what a rank is waiting in.
struct InFlight {
  std::chrono::steady_clock::time_point start;
  std::string label;    // "allreduce 'grad/fc1' (seq 3)"
  bool waited = false;  // a thread is in Work::wait() on it
};

}  // namespace aikido::detail
