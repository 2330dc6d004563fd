#include "transport/connection.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>
#include <vector>

#include "base/error.hpp"
#include "base/thread.hpp"

namespace aikido::transport {

namespace {

// The gate this thread holds, if any.
thread_local ReceiveGate* held_by_this_thread = nullptr;
// How long after the gate was released its receive threads resume reading (unless it is held again by then).
constexpr std::chrono::microseconds kResumeAfter{200};
// Longest a receive thread waits on its socket before it looks at its read-ahead buffer again.
constexpr std::chrono::milliseconds kLookAgain{20};
// Size of a connection's read-ahead buffer; larger reads go straight to their destination.
constexpr std::size_t kReadAheadBytes = 64 * 1024;
// Connections this thread reads a frame from now, holding their read lock (a completion callback run by a handler
// may wait for a collective).
thread_local int frames_in_progress = 0;

void signal(int fd) {
  const std::uint64_t one = 1;
  while (::write(fd, &one, sizeof one) < 0 && errno == EINTR) {
  }
}

void drain(int fd) {
  std::uint64_t value;
  while (::read(fd, &value, sizeof value) < 0 && errno == EINTR) {
  }
}

}  // namespace

ReceiveGate::ReceiveGate() {
  held_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (held_fd_ < 0) detail::throw_system("eventfd");
  wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake_fd_ < 0) {
    ::close(held_fd_);
    detail::throw_system("eventfd");
  }
}

ReceiveGate::~ReceiveGate() {
  ::close(held_fd_);
  ::close(wake_fd_);
}

bool ReceiveGate::try_hold() {
  // One gate per thread, and none for a thread inside a handler: it holds a connection's read lock already.
  if (held_by_this_thread != nullptr || frames_in_progress > 0) return false;
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_ || held_) return false;
  held_ = true;
  held_since_ = Clock::now();
  held_by_this_thread = this;
  if (pollers_ > 0 && !signalled_) {
    signal(held_fd_);  // moves receive threads waiting on their sockets to park()
    signalled_ = true;
  }
  return true;
}

bool ReceiveGate::held_here() const { return held_by_this_thread == this; }

void ReceiveGate::release(bool hand_over) {
  if (held_by_this_thread != this) return;
  held_by_this_thread = nullptr;
  bool notify;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (signalled_) {
      drain(held_fd_);
      signalled_ = false;
    }
    held_ = false;
    released_at_ = Clock::now();
    notify = closed_ || hand_over || released_at_ - held_since_ >= kResumeAfter;
    if (hand_over) released_at_ -= kResumeAfter;  // the receive threads resume at once
  }
  // After a short hold the receive threads are not woken: they resume by themselves after kResumeAfter unless a
  // thread holds the gate again by then, as a thread waiting for one collective after another does.
  if (notify) free_.notify_all();
}

void ReceiveGate::resume_receivers() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (held_ || released_at_ <= Clock::now() - kResumeAfter) return;  // held, or they read already
    released_at_ = Clock::now() - kResumeAfter;
  }
  free_.notify_all();
}

void ReceiveGate::release_current() {
  if (held_by_this_thread != nullptr) held_by_this_thread->release(true);
}

void ReceiveGate::close() {
  std::unique_lock<std::mutex> lock(mutex_);
  closed_ = true;
  if (signalled_) {
    drain(held_fd_);  // receive threads wait on their sockets again (they may read beside a holder, under the lock)
    signalled_ = false;
  }
  free_.notify_all();
  free_.wait(lock, [&] { return !held_; });
}

void ReceiveGate::park(const std::atomic<bool>& stop) {
  std::unique_lock<std::mutex> lock(mutex_);
  bool timer = false;  // this thread keeps the time for all parked threads
  auto leave = [&] {
    if (timer) {
      timer_taken_ = false;
      free_.notify_all();  // the others resume too, or one of them takes over the timer
    }
  };
  for (;;) {
    if (closed_ || stop.load()) return leave();
    if (!held_ && Clock::now() >= released_at_ + kResumeAfter) return leave();
    if (!timer && timer_taken_) {
      // Another parked thread looks at the clock; it (or a release after a long hold) wakes this one. With one
      // thread timing the look-agains, back-to-back short holds wake one receive thread per process, not all.
      free_.wait(lock);
      continue;
    }
    timer = timer_taken_ = true;
    if (held_) {
      // A short hold ends without a wake-up: look again after kResumeAfter. A longer one wakes us when it ends.
      const auto look = held_since_ + kResumeAfter;
      if (Clock::now() < look) {
        free_.wait_until(lock, look);
      } else {
        free_.wait(lock);
      }
      continue;
    }
    free_.wait_until(lock, released_at_ + kResumeAfter);
  }
}

bool ReceiveGate::begin_poll() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (held_ && !closed_) return false;
  ++pollers_;
  return true;
}

void ReceiveGate::end_poll() {
  std::lock_guard<std::mutex> lock(mutex_);
  --pollers_;
}

void ReceiveGate::unpark_all() {
  { std::lock_guard<std::mutex> lock(mutex_); }  // a receive thread between its check and its wait sees `stop`
  free_.notify_all();
}

void ReceiveGate::wake_holder() {
  if (holder_asleep_.load(std::memory_order_seq_cst)) signal(wake_fd_);
}

void ReceiveGate::wait_for_frames(const std::vector<Connection*>& connections, std::chrono::microseconds timeout,
                                  const std::function<bool()>& stop) {
  std::vector<pollfd> fds;
  fds.reserve(connections.size() + 1);
  for (Connection* c : connections) {
    if (c->has_buffered()) return;  // TLS holds decrypted bytes the descriptor does not show
    fds.push_back(pollfd{c->fd(), POLLIN, 0});
  }
  fds.push_back(pollfd{wake_fd_, POLLIN, 0});
  holder_asleep_.store(true, std::memory_order_seq_cst);
  if (!stop()) {
    const int ms = int(std::max<std::int64_t>(1, (timeout.count() + 999) / 1000));
    ::poll(fds.data(), fds.size(), ms);
  }
  holder_asleep_.store(false, std::memory_order_seq_cst);
  if (fds.back().revents != 0) drain(wake_fd_);
}

Connection::Connection(int self, int peer, std::uint64_t cluster_version, Socket socket, FrameHandler& handler,
                       std::shared_ptr<ReceiveGate> gate)
    : self_(self),
      peer_(peer),
      cluster_version_(cluster_version),
      socket_(std::move(socket)),
      handler_(handler),
      gate_(std::move(gate)),
      read_buffer_(kReadAheadBytes) {}

Connection::~Connection() {
  shutdown();
  if (receive_thread_.joinable()) receive_thread_.join();
  if (send_thread_.joinable()) send_thread_.join();
}

void Connection::start() {
  receive_thread_ = std::thread([this] { receive_loop(); });
  detail::name_thread(receive_thread_, detail::str_cat("aikido-recv-", peer_));
  send_thread_ = std::thread([this] { send_loop(); });
  detail::name_thread(send_thread_, detail::str_cat("aikido-send-", peer_));
}

void Connection::send(OutgoingFrame frame) {
  frame.header.source = self_;
  frame.header.cluster_version = cluster_version_;
  frame.header.name_bytes = std::uint32_t(frame.name.size());
  std::unique_lock<std::mutex> lock(mutex_);
  if (stopping_) {
    // The goodbye is queued: it is the last frame (the peer stops reading there, and the send thread ends).
    lock.unlock();
    if (frame.done) frame.done(false);
    return;
  }
  if (!queue_.empty() || writing_ || broken_) {
    queue_.push_back(std::move(frame));
    lock.unlock();
    queued_.notify_one();
    return;
  }
  writing_ = true;  // this thread owns the socket's write side until it sets writing_ back
  lock.unlock();
  bool complete = false, failed = false;
  if (frame.start && !frame.start()) {
    complete = true;  // dropped
    frame.done = nullptr;
  } else {
    frame.started = true;
    try {
      complete = write_frame(frame, false);
    } catch (const std::exception&) {
      failed = true;
    }
  }
  if (failed) {
    shutdown();
    if (frame.done) frame.done(false);
  } else if (complete && frame.done) {
    frame.done(true);
  }
  lock.lock();
  if (!complete && !failed) queue_.push_front(std::move(frame));  // the send thread finishes it
  writing_ = false;
  // Wake the send thread only when it has something to do: a needless wake-up costs a context switch per frame.
  const bool wake = !queue_.empty() || broken_ || stopping_;
  lock.unlock();
  if (wake) queued_.notify_one();
  drained_.notify_all();
}

bool Connection::write_frame(OutgoingFrame& frame, bool blocking) {
  iovec iov[3];
  iov[0] = {&frame.header, sizeof frame.header};
  iov[1] = {frame.name.data(), frame.name.size()};
  iov[2] = {const_cast<void*>(frame.payload), std::size_t(frame.header.payload_bytes)};
  int first = 0;
  std::size_t skip = frame.sent;
  while (first < 3 && skip >= iov[first].iov_len) skip -= iov[first++].iov_len;
  if (first == 3) return true;
  iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + skip;
  iov[first].iov_len -= skip;
  std::size_t total = 0;
  for (int i = first; i < 3; ++i) total += iov[i].iov_len;
  if (blocking) {
    socket_.writev_all(iov + first, 3 - first);
    bytes_written_.fetch_add(total, std::memory_order_relaxed);
    return true;
  }
  const std::size_t n = socket_.try_writev(iov + first, 3 - first);
  bytes_written_.fetch_add(n, std::memory_order_relaxed);
  frame.sent += n;
  return n == total;
}

void Connection::discard_payload(std::size_t size) {
  char scratch[16384];
  while (size > 0) {
    const std::size_t n = std::min(size, sizeof scratch);
    read_bytes(scratch, n);
    size -= n;
  }
}

void Connection::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    broken_ = true;
  }
  socket_.shutdown();
  queued_.notify_all();
  stop_receiving_.store(true);
  if (gate_) gate_->unpark_all();
}

void Connection::close(std::chrono::milliseconds linger) {
  {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!broken_) {
      OutgoingFrame bye;
      bye.header.type = FrameType::goodbye;
      bye.header.source = self_;
      bye.header.cluster_version = cluster_version_;
      queue_.push_back(std::move(bye));
    }
    stopping_ = true;
    queued_.notify_all();
    // A peer that stopped reading must not hold us here forever.
    drained_.wait_for(lock, linger, [&] { return (queue_.empty() && !writing_) || broken_; });
  }
  socket_.shutdown();
  stop_receiving_.store(true);
  if (gate_) gate_->unpark_all();
  if (send_thread_.joinable()) send_thread_.join();
  if (receive_thread_.joinable()) receive_thread_.join();
}

Connection::Received Connection::try_receive() {
  if (reading_ended_.load(std::memory_order_acquire)) return Received::nothing;
  std::unique_lock<std::mutex> lock(read_mutex_, std::try_to_lock);
  if (!lock) return Received::busy;
  return receive_one(false) ? Received::frame : Received::nothing;
}

Connection::Received Connection::try_receive_buffered() {
  if (reading_ended_.load(std::memory_order_acquire)) return Received::nothing;
  std::unique_lock<std::mutex> lock(read_mutex_, std::try_to_lock);
  if (!lock) return Received::busy;
  if (read_begin_ == read_end_) return Received::nothing;
  return receive_one(false) ? Received::frame : Received::nothing;
}

bool Connection::receive_one(bool wait) {
  if (reading_ended_.load(std::memory_order_acquire)) return false;
  // Code run from here (handlers, on_lost, completion callbacks) must not take the gate: this thread holds the
  // read lock, which the holder's reading would take again.
  struct Reading {
    Reading() { ++frames_in_progress; }
    ~Reading() { --frames_in_progress; }
  } reading;
  try {
    if (!wait && read_begin_ == read_end_) {
      read_begin_ = 0;
      read_end_ = socket_.try_read(read_buffer_.data(), read_buffer_.size());
      if (read_end_ == 0) return false;
    }
    // The rest of a begun frame follows at once: the sender writes frames whole.
    FrameHeader header;
    read_bytes(&header, sizeof header);
    validate_header(header, peer_);
    if (header.type == FrameType::goodbye) {
      end_reading("it closed its session", true);
      return true;
    }
    frame_name_.resize(header.name_bytes);
    if (header.name_bytes > 0) read_bytes(frame_name_.data(), frame_name_.size());
    handler_.on_frame(*this, header, frame_name_);
  } catch (const ProtocolError& e) {
    end_reading(e.what(), false, true);
  } catch (const std::exception& e) {
    end_reading(e.what(), false);
  }
  return true;
}

void Connection::read_bytes(void* data, std::size_t size) {
  auto* out = static_cast<char*>(data);
  const std::size_t take = std::min(size, read_end_ - read_begin_);
  if (take > 0) std::memcpy(out, read_buffer_.data() + read_begin_, take);
  read_begin_ += take;
  out += take;
  size -= take;
  if (size == 0) return;
  if (size >= read_buffer_.size() / 2) {  // a large payload: no detour through the buffer
    socket_.read_exact(out, size);
    return;
  }
  read_begin_ = 0;
  read_end_ = 0;
  while (read_end_ < size)
    read_end_ += socket_.read_some(read_buffer_.data() + read_end_, read_buffer_.size() - read_end_);
  std::memcpy(out, read_buffer_.data(), size);
  read_begin_ = size;
}

void Connection::end_reading(const std::string& reason, bool goodbye, bool broke_protocol) {
  if (reading_ended_.exchange(true)) return;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    broken_ = true;
  }
  queued_.notify_all();
  stop_receiving_.store(true);
  if (gate_) gate_->unpark_all();  // the receive thread ends
  handler_.on_lost(*this, reason, goodbye, broke_protocol);
}

void Connection::receive_loop() {
  if (!gate_) {
    while (!reading_ended_.load(std::memory_order_acquire)) {
      std::lock_guard<std::mutex> lock(read_mutex_);
      receive_one(true);
    }
    return;
  }
  while (!reading_ended_.load(std::memory_order_acquire)) {
    gate_->park(stop_receiving_);
    {
      std::lock_guard<std::mutex> lock(read_mutex_);
      if (receive_one(false)) continue;
    }
    if (reading_ended_.load(std::memory_order_acquire)) break;
    // Wait for a frame, or for a thread taking the gate (then park: frames arriving for it must not wake us). The
    // wait is bounded: a holder that handed the gate back from inside a handler may leave frames it read ahead in
    // read_buffer_, and the socket then stays quiet (look again at least every kLookAgain).
    if (socket_.has_buffered()) continue;  // TLS holds decrypted bytes the descriptor does not show
    if (!gate_->begin_poll()) continue;
    pollfd fds[2] = {{socket_.fd(), POLLIN, 0}, {gate_->held_fd(), POLLIN, 0}};
    ::poll(fds, 2, int(kLookAgain.count()));
    gate_->end_poll();
  }
}

void Connection::send_loop() {
  for (;;) {
    OutgoingFrame frame;
    bool broken;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      // writing_ is set while a sending thread writes a frame itself; the socket has one writer at a time.
      queued_.wait(lock, [&] { return !writing_ && (!queue_.empty() || stopping_ || broken_); });
      if (queue_.empty()) {  // stopping with nothing left to write
        drained_.notify_all();
        return;
      }
      frame = std::move(queue_.front());
      queue_.pop_front();
      broken = broken_;
      writing_ = true;
    }
    if (!frame.started && frame.start && !frame.start()) {
      std::lock_guard<std::mutex> lock(mutex_);
      writing_ = false;
      drained_.notify_all();
      continue;
    }
    bool written = false;
    if (!broken) {
      try {
        written = write_frame(frame, true);
      } catch (const std::exception&) {
        shutdown();
      }
    }
    if (frame.done) frame.done(written);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      writing_ = false;
    }
    drained_.notify_all();
  }
}

}  // namespace aikido::transport
