// Handle to an asynchronous operation.
#pragma once

#include <chrono>
#include <exception>
#include <functional>
#include <memory>

namespace aikido {

namespace detail {
struct WorkState;
struct WorkAccess;
}  // namespace detail

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
  friend struct detail::WorkAccess;
  std::shared_ptr<detail::WorkState> state_;
};

}  // namespace aikido
