// Handle to an asynchronous operation.
#pragma once

#include <chrono>
#include <exception>
#include <functional>
#include <memory>

namespace aikido {

namespace detail {
struct WorkState;
}

/// Handle to an asynchronous collective. Copies share the same operation. Thread safe.
///
/// The buffers given to the collective must stay alive and untouched until the work is done (done() returns true,
/// or wait() returned or threw). A failed collective is done only once the library no longer touches its buffers.
class Work {
 public:
  /// A handle that is already complete (no operation).
  Work();
  explicit Work(std::shared_ptr<detail::WorkState> state);

  /// Blocks until the operation completes; rethrows its error (TimeoutError, PeerLostError, MismatchError, ...).
  /// The collective's own deadline (AIKIDO_TIMEOUT) bounds the wait: this never blocks forever.
  void wait() const;

  /// Waits at most `timeout`. Returns true when the operation completed (rethrowing its error, if any), false when
  /// it is still running; the operation then continues and may be waited for again.
  bool wait(std::chrono::milliseconds timeout) const;

  /// True once the operation completed, successfully or not. Never throws.
  bool done() const;

  /// The stored error, or nullptr when the operation succeeded or is still running.
  std::exception_ptr error() const;

  /// Calls `callback` once on completion with the error (nullptr on success), from a library thread, or at once
  /// from this thread when already done. The callback must not block on other collectives.
  void on_complete(std::function<void(std::exception_ptr)> callback) const;

 private:
  std::shared_ptr<detail::WorkState> state_;
};

/// Makes the blocking waits of the calling thread interruptible, for language bindings whose users expect a wait to
/// end on a signal (Python's Ctrl-C). While the object lives, Work::wait() on this thread waits in slices of
/// `interval` and calls `check` between them. When `check` throws, that wait ends with its exception; the operation
/// itself goes on (its buffers stay in use until it is done). The interruption is then spent: later waits on this
/// thread run to their end, so that code unwinding from the exception can still wait for its collectives before it
/// frees their buffers (they end within their own deadline). Nested objects: the innermost applies.
class WaitInterruption {
 public:
  WaitInterruption(std::function<void()> check, std::chrono::milliseconds interval);
  ~WaitInterruption();
  WaitInterruption(const WaitInterruption&) = delete;
  WaitInterruption& operator=(const WaitInterruption&) = delete;
  /// True once `check` has thrown.
  bool spent() const { return spent_; }

 private:
  friend class Work;
  std::function<void()> check_;
  std::chrono::milliseconds interval_;
  bool spent_ = false;
  WaitInterruption* outer_;
};

}  // namespace aikido
