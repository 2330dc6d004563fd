#include "transport/connection.hpp"

#include <exception>
#include <vector>

#include "base/error.hpp"

namespace aikido::transport {

Connection::Connection(int self, int peer, std::uint64_t cluster_version, Socket socket, FrameHandler& handler)
    : self_(self), peer_(peer), cluster_version_(cluster_version), socket_(std::move(socket)), handler_(handler) {}

Connection::~Connection() {
  shutdown();
  if (receive_thread_.joinable()) receive_thread_.join();
  if (send_thread_.joinable()) send_thread_.join();
}

void Connection::start() {
  receive_thread_ = std::thread([this] { receive_loop(); });
  send_thread_ = std::thread([this] { send_loop(); });
}

void Connection::send(OutgoingFrame frame) {
  frame.header.source = self_;
  frame.header.cluster_version = cluster_version_;
  frame.header.name_bytes = std::uint32_t(frame.name.size());
  std::unique_lock<std::mutex> lock(mutex_);
  if (!queue_.empty() || writing_ || broken_ || stopping_) {
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
  if (blocking) {
    socket_.writev_all(iov + first, 3 - first);
    return true;
  }
  std::size_t total = 0;
  for (int i = first; i < 3; ++i) total += iov[i].iov_len;
  const std::size_t n = socket_.try_writev(iov + first, 3 - first);
  frame.sent += n;
  return n == total;
}

void Connection::discard_payload(std::size_t size) {
  char scratch[16384];
  while (size > 0) {
    const std::size_t n = std::min(size, sizeof scratch);
    socket_.read_exact(scratch, n);
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
  if (send_thread_.joinable()) send_thread_.join();
  if (receive_thread_.joinable()) receive_thread_.join();
}

void Connection::receive_loop() {
  std::string reason;
  bool goodbye = false;
  std::string name;
  try {
    for (;;) {
      FrameHeader header;
      socket_.read_exact(&header, sizeof header);
      validate_header(header, peer_);
      if (header.type == FrameType::goodbye) {
        goodbye = true;
        reason = "it closed its session";
        break;
      }
      name.resize(header.name_bytes);
      if (header.name_bytes > 0) socket_.read_exact(name.data(), name.size());
      handler_.on_frame(*this, header, name);
    }
  } catch (const std::exception& e) {
    reason = e.what();
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    broken_ = true;
  }
  queued_.notify_all();
  handler_.on_lost(*this, reason, goodbye);
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
