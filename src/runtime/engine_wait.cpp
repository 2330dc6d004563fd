// Waiting for socket collectives: the thread in Work::wait() reads the connections itself (engine.hpp, "Waiting").
#include <sched.h>

#include <algorithm>

#include "runtime/engine.hpp"
#include "runtime/work_state.hpp"
#include "transport/connection.hpp"

namespace aikido::detail {

namespace {

// A thread driving the connections while it waits spins with pause instructions for kPause after the last frame (a
// loopback round trip is tens of microseconds; none when ranks outnumber the host's CPUs), then yields the core
// between looks until kSpin (other threads and ranks sharing the core run then), then sleeps in poll() for at most
// kMaxSleep at a time.
constexpr std::chrono::microseconds kPause{50};
constexpr std::chrono::microseconds kSpin{1'000};
constexpr std::chrono::microseconds kMaxSleep{20'000};

}  // namespace

std::chrono::microseconds Engine::wait_pause(bool oversubscribed) {
  return oversubscribed ? std::chrono::microseconds(0) : kPause;
}

void Engine::set_drive(WorkState& work, std::size_t bytes) {
  // With more ranks than cores the receive threads do the reading of large collectives: measured with 4 ranks on
  // 2 cores over TCP, waiting threads that read made 4 KiB allreduce faster (about 150 us against 100) and 64 KiB
  // (275 us against 175) but 1 MiB slower (about 1.3x, cause not found).
  if (!gate_ || (oversubscribed_ && bytes > kEagerBytes)) return;
  if (bytes > kEagerBytes && readers_.size() > 1) {
    // Large transfers with several peers are left to the receive threads, one per connection: one thread reading
    // a large payload would hold up the frames of the other connections (a `ready` that lets the next segment go
    // out, data from another peer). Measured: 16 MiB at 4 ranks ran at 0.75x the speed with one reading thread.
    work.drive = [gate = gate_](WorkState&, Clock::time_point) { gate->resume_receivers(); };
    return;
  }
  // The gate outlives the engine: once it is closed (the engine is going away) the hook does nothing.
  work.drive = [gate = gate_, this](WorkState& w, Clock::time_point until) {
    if (gate->try_hold()) {
      drive(w, until);
      gate->release();
    } else {
      // Waiting inside a handler of the thread that drives (a completion callback): let the receive threads read.
      transport::ReceiveGate::release_current();
    }
  };
}

void Engine::drive(WorkState& work, Clock::time_point until) {
  auto done = [&] {
    std::lock_guard<std::mutex> lock(work.mutex);
    return work.done;
  };
  thread_local std::vector<transport::Connection*> watch;
  // Frames read ahead into a connection's buffer are handled before the gate goes back: the receive threads wait on
  // the sockets, which hold nothing more, so such a frame (a request from a peer, say) would wait until the next
  // one arrives. Found as a request that never got its answer under load.
  struct HandleReadAhead {
    Engine& engine;
    ~HandleReadAhead() {
      for (transport::Connection* c : engine.readers_) {
        while (engine.gate_->held_here() && c->try_receive_buffered() == transport::Connection::Received::frame) {
        }
      }
    }
  } handle_read_ahead{*this};
  auto last_frame = Clock::now();
  while (gate_->held_here() && !done()) {
    bool progressed = false;
    watch.clear();
    for (transport::Connection* c : readers_) {
      const auto received = c->try_receive();
      if (received == transport::Connection::Received::frame) progressed = true;
      // A connection another thread reads now is left out of poll(): it would be readable all along.
      if (received != transport::Connection::Received::busy && c->receiving()) watch.push_back(c);
      if (!gate_->held_here()) return;  // a handler gave the gate back before blocking
    }
    const auto now = Clock::now();
    if (progressed) {
      last_frame = now;
      continue;
    }
    if (now >= until) return;
    const auto idle = now - last_frame;
    if (idle < pause_) {
      transport::cpu_relax();
    } else if (idle < kSpin) {
      sched_yield();
    } else {
      const auto left = std::chrono::duration_cast<std::chrono::microseconds>(until - now);
      gate_->wait_for_frames(watch, std::min(kMaxSleep, left), done);
    }
  }
}

}  // namespace aikido::detail
