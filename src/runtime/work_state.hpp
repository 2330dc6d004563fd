// The shared state behind aikido::Work.
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <vector>

namespace aikido::detail {

struct WorkState {
  std::mutex mutex;
  std::condition_variable changed;
  bool done = false;
  std::exception_ptr error;
  std::vector<std::function<void(std::exception_ptr)>> callbacks;

  /// Marks the work done and runs its callbacks on this thread. Call without holding other library locks.
  void complete(std::exception_ptr failure);
};

}  // namespace aikido::detail
