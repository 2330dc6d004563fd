#include <aikido/work.hpp>

#include "base/error.hpp"
#include "runtime/work_state.hpp"
#include "transport/connection.hpp"

namespace aikido {
namespace detail {

void WorkState::complete(std::exception_ptr failure) {
  std::vector<std::function<void(std::exception_ptr)>> run;
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (done) return;
    done = true;
    error = failure;
    run.swap(callbacks);
  }
  changed.notify_all();
  // A thread reading for its connections' receive threads must not block them while it runs a callback (which may
  // wait for other collectives): they take over.
  if (!run.empty()) transport::ReceiveGate::release_current();
  for (auto& callback : run) callback(failure);
}

transport::WireError wire_error_of(std::exception_ptr error) {
  try {
    std::rethrow_exception(error);
  } catch (const MismatchError&) {
    return transport::WireError::mismatch;
  } catch (const TimeoutError&) {
    return transport::WireError::timeout;
  } catch (const PeerLostError&) {
    return transport::WireError::lost;
  } catch (const ConfigError&) {
    return transport::WireError::config;
  } catch (...) {
    return transport::WireError::other;
  }
}

std::exception_ptr error_for(transport::WireError kind, const std::string& text) {
  switch (kind) {
    case transport::WireError::mismatch:
      return std::make_exception_ptr(MismatchError(text));
    case transport::WireError::timeout:
      return std::make_exception_ptr(TimeoutError(text));
    case transport::WireError::config:
      return std::make_exception_ptr(ConfigError(text));
    default:
      return std::make_exception_ptr(PeerLostError(text));
  }
}

std::string error_text(std::exception_ptr error) {
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "unknown error";
  }
}

std::string silent_ranks(const std::vector<int>& ranks) {
  return str_cat("; rank", ranks.size() > 1 ? "s " : " ", rank_list(ranks), ranks.size() > 1 ? " have" : " has",
                 " not answered whether", ranks.size() > 1 ? " they" : " it",
                 " posted it (stopped, or its library threads are blocked)");
}

}  // namespace detail

Work::Work() : state_(std::make_shared<detail::WorkState>()) { state_->done = true; }

Work::Work(std::shared_ptr<detail::WorkState> state) : state_(std::move(state)) {}

void Work::wait() const {
  state_->waited.store(true, std::memory_order_relaxed);
  if (state_->drive) state_->drive(*state_, std::chrono::steady_clock::time_point::max());
  std::unique_lock<std::mutex> lock(state_->mutex);
  state_->changed.wait(lock, [&] { return state_->done; });
  if (state_->error) std::rethrow_exception(state_->error);
}

bool Work::wait(std::chrono::milliseconds timeout) const {
  const auto until = std::chrono::steady_clock::now() + timeout;
  state_->waited.store(true, std::memory_order_relaxed);
  if (state_->drive) state_->drive(*state_, until);
  std::unique_lock<std::mutex> lock(state_->mutex);
  if (!state_->changed.wait_until(lock, until, [&] { return state_->done; })) {
    state_->waited.store(false, std::memory_order_relaxed);
    return false;
  }
  if (state_->error) std::rethrow_exception(state_->error);
  return true;
}

bool Work::done() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->done;
}

std::exception_ptr Work::error() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->error;
}

void Work::on_complete(std::function<void(std::exception_ptr)> callback) const {
  std::exception_ptr error;
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    if (!state_->done) {
      state_->callbacks.push_back(std::move(callback));
      return;
    }
    error = state_->error;
  }
  callback(error);
}

}  // namespace aikido
