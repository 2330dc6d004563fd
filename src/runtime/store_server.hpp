// The embedded rendezvous store: served by aikido-run to its workers, and by rank 0 of a job that another launcher
// (torchrun, mpirun, srun, Kubernetes) started, which is why it lives in the runtime layer. Client:
// aikido::connect_tcp_store (src/runtime/tcp_store.cpp), or aikido::connect_store with a tcp:// URL.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "transport/socket.hpp"
#include "transport/tls.hpp"

namespace aikido {
class Store;
}

// Declared in aikido::elastic, the namespace its launcher-side users name it by.
namespace aikido::elastic {

/// A key-value store served over TCP with the protocol of runtime/store_protocol.hpp.
///
/// Every connection must first pass the job-secret handshake on Channel::store; connections that fail it are
/// closed and the server goes on serving the others. Each connection is served by its own thread, so a client
/// blocked in wait() holds only its own connection. Every length read from the wire is checked against the caps
/// of store_protocol.hpp before memory is allocated, and the store as a whole holds at most kMaxStoreBytes.
///
/// Thread safe. The constructor starts serving; stop() (or the destructor) closes the listener, wakes blocked
/// waits, closes every connection and joins all threads.
class StoreServer {
 public:
  /// Upper bound on the bytes of all keys and values together; a set beyond it is refused.
  static constexpr std::size_t kMaxStoreBytes = std::size_t(256) << 20;
  /// Upper bound on simultaneous connections; further connections are closed at once.
  static constexpr std::size_t kMaxConnections = 4096;

  /// Binds to `bind_host`:`port` (port 0: any free port). Throws aikido::Error when the address cannot be bound,
  /// ConfigError for TLS options that cannot be used. With `tls` enabled every client must use TLS.
  StoreServer(std::string bind_host, int port, std::string secret, const TlsOptions& tls = {});
  ~StoreServer();
  StoreServer(const StoreServer&) = delete;
  StoreServer& operator=(const StoreServer&) = delete;

  /// "host:port", the value for AIKIDO_STORE_ADDR.
  std::string address() const;

  /// Stops serving and joins every thread. Idempotent.
  void stop();

  /// The same store, used from this process without a connection (aikido-run's own membership watcher). The
  /// server must outlive it; after stop() its wait() throws.
  std::shared_ptr<Store> local_store();

 private:
  class Local;
  struct Connection {
    transport::Socket socket;
    std::thread thread;
    bool finished = false;  // guarded by connections_mutex_
  };

  void accept_loop();
  void reap_finished_connections();
  void serve(Connection& connection);
  void serve_requests(transport::Socket& socket);
  // Each returns the response to send.
  std::string handle_set(const std::string& key, std::string value);
  std::string handle_get(const std::string& key);
  std::string handle_wait(transport::Socket& socket, const std::string& key, std::uint64_t timeout_ms);
  std::string handle_cas(const std::string& key, const std::optional<std::string>& expected, std::string desired);

  const std::string secret_;
  const std::shared_ptr<const transport::TlsContext> tls_;  // null: plain
  transport::Listener listener_;
  std::string address_;  // "host:port", fixed at construction
  int wake_fd_ = -1;     // eventfd that wakes the accept loop on stop()
  std::thread acceptor_;

  std::mutex stop_mutex_;  // serialises stop()
  bool stopped_ = false;   // guarded by stop_mutex_

  std::mutex values_mutex_;
  std::condition_variable values_changed_;
  std::map<std::string, std::string> values_;  // guarded by values_mutex_
  std::size_t stored_bytes_ = 0;               // guarded by values_mutex_
  bool stopping_ = false;                      // guarded by values_mutex_

  std::mutex connections_mutex_;
  std::list<std::unique_ptr<Connection>> connections_;  // guarded by connections_mutex_
};

}  // namespace aikido::elastic

namespace aikido::detail {

/// Serves a store at `bind_host`:`port` (StoreServer) and returns this process's handle on it, which uses it without
/// a connection. The handle owns the server: it serves as long as the handle or a copy of it lives, and stops (closing
/// every client's connection) when the last one goes. Rank 0 of a job started by another launcher keeps its handle in
/// PeerConfig::store, so the store lives as long as rank 0's Peer (and anything else holding its config, such as an
/// ElasticSession); other ranks only need it while they join. Throws aikido::Error when the address cannot be bound.
std::shared_ptr<Store> serve_store(const std::string& bind_host, int port, const std::string& secret,
                                   const TlsOptions& tls = {});

}  // namespace aikido::detail
