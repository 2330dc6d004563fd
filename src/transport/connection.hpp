// One data connection to one peer: a receive thread that parses frames and hands them to a handler, and a send
// thread that writes queued frames in order. Frames of many collectives interleave on one connection; a frame is
// never split.
//
// Reading can also be done by another thread: a thread waiting for a collective takes the connections' shared
// ReceiveGate and reads frames itself with try_receive(), which saves the wake-up of a receive thread per frame
// and of the waiting thread per completion. While the gate is held the receive threads park (they do not wait on
// their sockets, so arriving frames do not wake them); they resume reading 200 us after it was released unless a
// thread holds it again by then (a thread waiting for collective after collective keeps them parked without a
// wake-up per wait). One parked thread keeps that time and wakes the others when they resume: measured with 4
// ranks on 2 cores, every parked thread looking at the clock itself made 60k context switches a second. One frame is
// read and handled by one thread at a time (a per-connection read lock), so frames are handled in order either way.
// Reads go through a per-connection read-ahead buffer, which may hold frames the socket no longer shows: a holder
// handles those (try_receive_buffered) before it gives the gate back, and a receive thread waiting on its socket
// looks at its buffer again at least every 20 ms (for a holder that had to hand the gate over mid-frame).
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "transport/frame.hpp"
#include "transport/socket.hpp"

namespace aikido::transport {

class Connection;

/// Lets one thread at a time take over reading from a set of connections; their receive threads park while it is
/// held. Thread-safe. Holding it is an optimisation only: a receive thread may still read (under the connection's
/// read lock) when the gate is closed or its connection is shutting down.
class ReceiveGate {
 public:
  ReceiveGate();
  ~ReceiveGate();
  ReceiveGate(const ReceiveGate&) = delete;
  ReceiveGate& operator=(const ReceiveGate&) = delete;

  /// Takes the gate for the calling thread; false when another thread holds it, the gate is closed, or this thread
  /// holds a gate already or is handling a frame.
  bool try_hold();
  /// True when the calling thread holds the gate.
  bool held_here() const;
  /// Gives the gate back (no-op when the calling thread does not hold it). The receive threads resume shortly
  /// after (see the top of this file), or at once with `hand_over`: for a holder about to do something that may
  /// block for long, so that frames keep flowing.
  void release(bool hand_over = false);
  /// Receive threads parked after a release resume now (for a thread about to wait without holding the gate).
  void resume_receivers();
  /// Hands over the gate the calling thread holds, if any: called before running code that may block (completion
  /// callbacks).
  static void release_current();
  /// No thread takes the gate after this; waits until the current holder released it.
  void close();

  /// Wakes the holder when it sleeps in wait_for_frames (called when something it may wait for happened).
  void wake_holder();
  /// The holder sleeps until one of `connections` may have a frame, wake_holder is called, or `timeout` passes.
  /// `stop` is checked after the holder counts as asleep, so a wake_holder() after it cannot be missed.
  void wait_for_frames(const std::vector<Connection*>& connections, std::chrono::microseconds timeout,
                       const std::function<bool()>& stop);

 private:
  friend class Connection;
  /// A receive thread waits here while another thread holds the gate and for a moment after it was released (see
  /// kResumeAfter), or until `stop` is set.
  void park(const std::atomic<bool>& stop);
  /// A receive thread is about to wait on its socket and held_fd(); false when the gate is held (park instead).
  bool begin_poll();
  void end_poll();
  /// Wakes parked receive threads (their connection is shutting down).
  void unpark_all();
  /// Readable while the gate is held: receive threads wait on their socket and this, so taking the gate moves
  /// them off their sockets.
  int held_fd() const { return held_fd_; }

  mutable std::mutex mutex_;
  std::condition_variable free_;
  bool held_ = false;
  Clock::time_point held_since_{};
  Clock::time_point released_at_{};
  int pollers_ = 0;           // receive threads waiting on their sockets
  bool signalled_ = false;    // held_fd_ is readable
  bool timer_taken_ = false;  // a parked receive thread keeps the time (see park())
  bool closed_ = false;
  int held_fd_ = -1;  // eventfd: nonzero while held
  int wake_fd_ = -1;  // eventfd: wakes the holder
  std::atomic<bool> holder_asleep_{false};
};

/// Receives what arrives on connections. Called from the connection's receive thread, or from the thread that
/// holds the connection's ReceiveGate; one frame at a time per connection.
class FrameHandler {
 public:
  virtual ~FrameHandler() = default;
  /// A frame arrived; the handler must consume exactly header.payload_bytes with read_payload/discard_payload
  /// before returning. Throwing ends the connection (on_lost follows).
  virtual void on_frame(Connection& connection, const FrameHeader& header, const std::string& name) = 0;
  /// The connection ended: closed by the peer (`goodbye`: on purpose), failed, or a protocol violation
  /// (`broke_protocol`: a frame failed validation, or on_frame threw ProtocolError; `reason` says what the peer sent).
  /// Called once.
  virtual void on_lost(Connection& connection, const std::string& reason, bool goodbye, bool broke_protocol) = 0;
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
  /// `gate`, when given, lets a thread that holds it read frames with try_receive() while the receive thread parks.
  Connection(int self, int peer, std::uint64_t cluster_version, Socket socket, FrameHandler& handler,
             std::shared_ptr<ReceiveGate> gate = nullptr);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  int peer() const { return peer_; }
  /// Starts the receive and send threads.
  void start();
  /// Sends a frame: when nothing else is queued, the calling thread writes what the socket takes at once (saving
  /// a thread hand-off); the rest is queued for the send thread. Never blocks on the network. The caller must not
  /// hold locks that `start` or `done` take. Frames queued after the connection failed, or sent once close() has
  /// queued the goodbye, get done(false).
  void send(OutgoingFrame frame);
  enum class Received { nothing, frame, busy };
  /// Reads and handles one frame if one has arrived, without waiting for one (the rest of a begun frame is waited
  /// for). `busy`: another thread is reading from this connection now. When reading ends (the peer closed, failed
  /// or broke the protocol) on_lost is called here. For the thread holding the gate.
  Received try_receive();
  /// Like try_receive, but handles only a frame already in the read-ahead buffer, never reading the socket. A holder
  /// calls it until it returns `nothing` before it gives the gate back: frames it read ahead would otherwise wait
  /// unseen, since the receive threads wait on the socket, which the read-ahead emptied.
  Received try_receive_buffered();
  /// Bytes written to the socket so far (frame headers, names and payloads). Any thread.
  std::uint64_t bytes_written() const { return bytes_written_.load(std::memory_order_relaxed); }
  /// False once the connection's reading ended (on_lost was called or is being called).
  bool receiving() const { return !reading_ended_.load(std::memory_order_acquire); }
  int fd() const { return socket_.fd(); }
  /// Received bytes wait inside TLS, where polling fd() does not show them.
  bool has_buffered() const { return socket_.has_buffered(); }
  /// Reads payload bytes of the current frame; only from FrameHandler::on_frame.
  void read_payload(void* data, std::size_t size) { read_bytes(data, size); }
  void discard_payload(std::size_t size);
  /// Wakes both threads (the connection fails) without waiting for them.
  void shutdown();
  /// Sends a goodbye after the queued frames (waiting at most `linger` for them to be written), then shuts the
  /// connection down and joins the threads.
  void close(std::chrono::milliseconds linger = std::chrono::milliseconds(2000));

 private:
  void receive_loop();
  /// With read_mutex_ held: reads one frame if one has arrived (or waits for one: `wait`) and handles it. Returns
  /// false when nothing had arrived. Ends reading on failure.
  bool receive_one(bool wait);
  /// With read_mutex_ held: reads exactly `size` bytes of the stream, first from the read-ahead buffer.
  void read_bytes(void* data, std::size_t size);
  /// Reading ended: marks the connection broken and tells the handler (once).
  void end_reading(const std::string& reason, bool goodbye, bool broke_protocol = false);
  void send_loop();
  /// Writes the unsent part of `frame`, blocking (blocking = true) or taking only what fits now. Returns true when
  /// the frame is complete.
  bool write_frame(OutgoingFrame& frame, bool blocking);

  const int self_;
  const int peer_;
  const std::uint64_t cluster_version_;
  Socket socket_;
  FrameHandler& handler_;
  const std::shared_ptr<ReceiveGate> gate_;
  std::mutex read_mutex_;  // held while one thread reads and handles a frame
  std::atomic<bool> reading_ended_{false};
  std::atomic<std::uint64_t> bytes_written_{0};
  std::atomic<bool> stop_receiving_{false};  // shut down: the receive thread must not park
  std::string frame_name_;                   // guarded by read_mutex_
  // Read-ahead: one system call takes a whole small frame (header, name, payload) and whatever followed it.
  // Guarded by read_mutex_; [read_begin_, read_end_) is unread.
  std::vector<char> read_buffer_;
  std::size_t read_begin_ = 0;
  std::size_t read_end_ = 0;
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
