// One data connection to one peer: a receive thread that parses frames and hands them to a handler, and a send
// thread that writes queued frames in order. Frames of many collectives interleave on one connection; a frame is
// never split.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "transport/frame.hpp"
#include "transport/socket.hpp"

namespace aikido::transport {

class Connection;

/// Receives what arrives on connections. Called from the connection's receive thread.
class FrameHandler {
 public:
  virtual ~FrameHandler() = default;
  /// A frame arrived; the handler must consume exactly header.payload_bytes with read_payload/discard_payload
  /// before returning. Throwing ends the connection (on_lost follows).
  virtual void on_frame(Connection& connection, const FrameHeader& header, const std::string& name) = 0;
  /// The connection ended: closed by the peer, failed, or a protocol violation. Called once.
  virtual void on_lost(Connection& connection, const std::string& reason, bool goodbye) = 0;
};

/// A frame waiting to be written. `payload` must stay valid until `done` is called; `keep_alive` may own it.
struct OutgoingFrame {
  FrameHeader header;  // source, cluster_version and name_bytes are filled in by Connection::send
  std::string name;
  const void* payload = nullptr;
  std::shared_ptr<const void> keep_alive;
  /// Called on the send thread right before writing; returning false drops the frame (its collective failed).
  std::function<bool()> start;
  /// Called after the frame was written (true) or could not be (false). Not called for dropped frames.
  std::function<void(bool written)> done;
  /// Bytes of header, name and payload already written (a frame the sending thread began without blocking).
  std::size_t sent = 0;
  bool started = false;
};

class Connection {
 public:
  /// `self` is this rank: every frame sent here carries it and `cluster_version`.
  Connection(int self, int peer, std::uint64_t cluster_version, Socket socket, FrameHandler& handler);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  int peer() const { return peer_; }
  /// Starts the receive and send threads.
  void start();
  /// Sends a frame: when nothing else is queued, the calling thread writes what the socket takes at once (saving
  /// a thread hand-off); the rest is queued for the send thread. Never blocks on the network. The caller must not
  /// hold locks that `start` or `done` take. Frames queued after the connection failed get done(false).
  void send(OutgoingFrame frame);
  /// Reads payload bytes of the current frame; only from FrameHandler::on_frame.
  void read_payload(void* data, std::size_t size) { socket_.read_exact(data, size); }
  void discard_payload(std::size_t size);
  /// Wakes both threads (the connection fails) without waiting for them.
  void shutdown();
  /// Sends a goodbye after the queued frames (waiting at most `linger` for them to be written), then shuts the
  /// connection down and joins the threads.
  void close(std::chrono::milliseconds linger = std::chrono::milliseconds(2000));

 private:
  void receive_loop();
  void send_loop();
  /// Writes the unsent part of `frame`, blocking (blocking = true) or taking only what fits now. Returns true when
  /// the frame is complete.
  bool write_frame(OutgoingFrame& frame, bool blocking);

  const int self_;
  const int peer_;
  const std::uint64_t cluster_version_;
  Socket socket_;
  FrameHandler& handler_;
  std::thread receive_thread_;
  std::thread send_thread_;
  std::mutex mutex_;
  std::condition_variable queued_;
  std::condition_variable drained_;
  std::deque<OutgoingFrame> queue_;
  bool stopping_ = false;
  bool broken_ = false;
  bool writing_ = false;
};

}  // namespace aikido::transport
