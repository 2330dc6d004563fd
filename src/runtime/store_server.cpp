#include "runtime/store_server.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <aikido/store.hpp>
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <system_error>
#include <utility>

#include "base/error.hpp"
#include "base/log.hpp"
#include "runtime/store_protocol.hpp"
#include "transport/handshake.hpp"

namespace aikido::elastic {
namespace {

namespace sp = store_protocol;
using detail::str_cat;
using transport::Clock;

constexpr std::chrono::milliseconds kHandshakeTimeout{10'000};
// How often a blocked wait checks whether its client is still there, and how often the accept loop reaps
// finished connection threads.
constexpr std::chrono::milliseconds kPollInterval{500};

std::string response(sp::Status status) {
  sp::Encoder e;
  e.u8(std::uint8_t(status));
  return e.data();
}

std::string response(sp::Status status, const std::string& value) {
  sp::Encoder e;
  e.u8(std::uint8_t(status));
  e.bytes(value);
  return e.data();
}

// True when the client has closed its end. A client never sends while it waits for a response, so pending data
// is not expected; it is left for the next request to reject.
bool client_closed(const transport::Socket& socket) {
  char byte;
  const ssize_t n = ::recv(socket.fd(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
  if (n > 0) return false;
  if (n == 0) return true;
  return errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
}

}  // namespace

StoreServer::StoreServer(std::string bind_host, int port, std::string secret, const TlsOptions& tls)
    : secret_(std::move(secret)), tls_(transport::TlsContext::shared(tls, secret_)) {
  if (secret_.empty()) throw ConfigError("the rendezvous store needs a non-empty job secret");
  if (port < 0 || port > 65535) throw ConfigError(str_cat("store port ", port, " is not in [0, 65535]"));
  listener_ = transport::Listener::bind_tcp(bind_host, port);
  address_ = str_cat(listener_.address().host, ":", listener_.address().port);
  wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake_fd_ < 0) detail::throw_system("eventfd for the rendezvous store");
  try {
    acceptor_ = std::thread(&StoreServer::accept_loop, this);
  } catch (const std::system_error& e) {
    ::close(wake_fd_);
    throw Error(str_cat("cannot start the rendezvous store thread: ", e.what()));
  }
}

StoreServer::~StoreServer() { stop(); }

// In-process access: the request handlers without the wire.
class StoreServer::Local final : public Store {
 public:
  explicit Local(StoreServer& server) : server_(server) {}

  void set(const std::string& key, const std::string& value) override { server_.handle_set(key, value); }

  std::optional<std::string> get(const std::string& key) override {
    std::lock_guard<std::mutex> lock(server_.values_mutex_);
    auto it = server_.values_.find(key);
    if (it == server_.values_.end()) return std::nullopt;
    return it->second;
  }

  std::string wait(const std::string& key, std::chrono::milliseconds timeout) override {
    const auto deadline = Clock::now() + timeout;
    std::unique_lock<std::mutex> lock(server_.values_mutex_);
    for (;;) {
      if (server_.stopping_) throw Error("the rendezvous store is stopping");
      auto it = server_.values_.find(key);
      if (it != server_.values_.end()) return it->second;
      if (server_.values_changed_.wait_until(lock, deadline) == std::cv_status::timeout &&
          server_.values_.count(key) == 0) {
        throw TimeoutError(str_cat("store key '", key, "' did not appear within ", timeout.count(), " ms"));
      }
    }
  }

  std::optional<std::string> compare_and_set(const std::string& key, const std::optional<std::string>& expected,
                                             const std::string& desired) override {
    const std::string reply = server_.handle_cas(key, expected, desired);
    // handle_cas answers in wire format: status, then the value when there is one.
    if (sp::Status(std::uint8_t(reply[0])) == sp::Status::not_found) return std::nullopt;
    return reply.substr(5);
  }

 private:
  StoreServer& server_;
};

std::shared_ptr<Store> StoreServer::local_store() { return std::make_shared<Local>(*this); }

std::string StoreServer::address() const { return address_; }

void StoreServer::stop() {
  std::lock_guard<std::mutex> stop_lock(stop_mutex_);
  if (stopped_) return;
  stopped_ = true;
  {
    std::lock_guard<std::mutex> lock(values_mutex_);
    stopping_ = true;
  }
  values_changed_.notify_all();
  const std::uint64_t one = 1;
  [[maybe_unused]] const ssize_t n = ::write(wake_fd_, &one, sizeof one);
  if (acceptor_.joinable()) acceptor_.join();
  listener_.close();

  // The acceptor is gone, so the list only shrinks from here. Shut every socket down (which wakes its thread
  // from any read or write) before joining: threads take connections_mutex_ to mark themselves finished.
  std::list<std::unique_ptr<Connection>> connections;
  {
    std::lock_guard<std::mutex> lock(connections_mutex_);
    for (auto& c : connections_) c->socket.shutdown();
    connections.swap(connections_);
  }
  for (auto& c : connections) {
    if (c->thread.joinable()) c->thread.join();
  }
  ::close(wake_fd_);
  wake_fd_ = -1;
}

void StoreServer::accept_loop() {
  for (;;) {
    pollfd fds[2] = {{listener_.fd(), POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    const int r = ::poll(fds, 2, int(kPollInterval.count()));
    if (r < 0 && errno != EINTR) {
      log::warn("rendezvous store: poll failed, no longer accepting connections: ", std::strerror(errno));
      return;
    }
    if (fds[1].revents != 0) return;  // stop()
    reap_finished_connections();
    if (r <= 0) continue;
    if (fds[0].revents & (POLLERR | POLLNVAL)) {
      log::warn("rendezvous store: the listening socket failed, no longer accepting connections");
      return;
    }
    if (!(fds[0].revents & POLLIN)) continue;
    transport::Socket socket;
    try {
      socket = listener_.try_accept(Clock::now() + std::chrono::milliseconds(10));
    } catch (const Error& e) {
      log::warn("rendezvous store: accept failed: ", e.what());
      continue;
    }
    if (!socket.valid()) continue;

    std::lock_guard<std::mutex> lock(connections_mutex_);
    if (connections_.size() >= kMaxConnections) {
      log::warn("rendezvous store: refused a connection: already serving ", kMaxConnections, " connections");
      continue;
    }
    connections_.push_back(std::make_unique<Connection>());
    Connection* connection = connections_.back().get();
    connection->socket = std::move(socket);
    try {
      connection->thread = std::thread([this, connection] { serve(*connection); });
    } catch (const std::system_error& e) {
      log::warn("rendezvous store: refused a connection: cannot start a thread: ", e.what());
      connections_.pop_back();
    }
  }
}

void StoreServer::reap_finished_connections() {
  std::lock_guard<std::mutex> lock(connections_mutex_);
  for (auto it = connections_.begin(); it != connections_.end();) {
    if ((*it)->finished) {
      // The thread set `finished` as its last step under this lock, so the join is immediate.
      (*it)->thread.join();
      it = connections_.erase(it);
    } else {
      ++it;
    }
  }
}

void StoreServer::serve(Connection& connection) {
  try {
    transport::handshake_accept(connection.socket, secret_, transport::Channel::store, 0, -1, kHandshakeTimeout,
                                tls_.get());
    serve_requests(connection.socket);
  } catch (const AuthError& e) {
    log::warn("rendezvous store: refused a connection: ", e.what());
  } catch (const ProtocolError& e) {
    log::warn("rendezvous store: closed a connection: ", e.what());
  } catch (const std::exception& e) {
    // Clients closing their connection, and stop(), end up here.
    log::debug("rendezvous store: connection ended: ", e.what());
  }
  // Only shut down: stop() may be using the descriptor concurrently; it is closed with the Connection.
  connection.socket.shutdown();
  std::lock_guard<std::mutex> lock(connections_mutex_);
  connection.finished = true;
}

void StoreServer::serve_requests(transport::Socket& socket) {
  for (;;) {
    try {
      sp::Request request = sp::read_request(socket);
      std::string reply;
      switch (request.op) {
        case sp::Op::set:
          reply = handle_set(request.key, std::move(request.value));
          break;
        case sp::Op::get:
          reply = handle_get(request.key);
          break;
        case sp::Op::wait:
          reply = handle_wait(socket, request.key, request.timeout_ms);
          break;
        case sp::Op::cas:
          reply = handle_cas(request.key, request.expected, std::move(request.value));
          break;
      }
      socket.write_all(reply.data(), reply.size());
    } catch (const ProtocolError& e) {
      // Tell the client why before closing, best effort and bounded.
      std::string message = e.what();
      message.resize(std::min(message.size(), sp::kMaxMessageBytes));
      const std::string reply = response(sp::Status::error, message);
      try {
        socket.set_timeout(std::chrono::milliseconds(1000));
        socket.write_all(reply.data(), reply.size());
      } catch (const Error&) {
      }
      throw;
    }
  }
}

std::string StoreServer::handle_set(const std::string& key, std::string value) {
  {
    std::lock_guard<std::mutex> lock(values_mutex_);
    auto it = values_.find(key);
    const std::size_t old_bytes = it == values_.end() ? 0 : key.size() + it->second.size();
    const std::size_t new_bytes = stored_bytes_ - old_bytes + key.size() + value.size();
    if (new_bytes > kMaxStoreBytes) {
      throw ProtocolError(str_cat("store is full: setting '", key, "' would make it hold ", new_bytes,
                                  " bytes; the limit is ", kMaxStoreBytes, " bytes"));
    }
    stored_bytes_ = new_bytes;
    if (it == values_.end()) {
      values_.emplace(key, std::move(value));
    } else {
      it->second = std::move(value);
    }
  }
  values_changed_.notify_all();
  return response(sp::Status::ok);
}

std::string StoreServer::handle_get(const std::string& key) {
  std::lock_guard<std::mutex> lock(values_mutex_);
  auto it = values_.find(key);
  if (it == values_.end()) return response(sp::Status::not_found);
  return response(sp::Status::ok, it->second);
}

std::string StoreServer::handle_wait(transport::Socket& socket, const std::string& key, std::uint64_t timeout_ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(std::min(timeout_ms, sp::kMaxWaitMs));
  std::unique_lock<std::mutex> lock(values_mutex_);
  for (;;) {
    if (stopping_) throw Error("the rendezvous store is stopping");
    auto it = values_.find(key);
    if (it != values_.end()) return response(sp::Status::ok, it->second);
    const auto now = Clock::now();
    if (now >= deadline) return response(sp::Status::timeout);
    values_changed_.wait_until(lock, std::min(deadline, now + kPollInterval));
    // A client that went away (a crashed worker) must not hold this thread until its deadline.
    if (client_closed(socket))
      throw PeerLostError(str_cat("client closed its connection while waiting for '", key, "'"));
  }
}

std::string StoreServer::handle_cas(const std::string& key, const std::optional<std::string>& expected,
                                    std::string desired) {
  {
    std::lock_guard<std::mutex> lock(values_mutex_);
    auto it = values_.find(key);
    const bool present = it != values_.end();
    if (present != expected.has_value() || (present && it->second != *expected)) {
      return present ? response(sp::Status::ok, it->second) : response(sp::Status::not_found);
    }
    const std::size_t old_bytes = present ? key.size() + it->second.size() : 0;
    const std::size_t new_bytes = stored_bytes_ - old_bytes + key.size() + desired.size();
    if (new_bytes > kMaxStoreBytes) {
      throw ProtocolError(str_cat("store is full: setting '", key, "' would make it hold ", new_bytes,
                                  " bytes; the limit is ", kMaxStoreBytes, " bytes"));
    }
    stored_bytes_ = new_bytes;
    if (present) {
      it->second = desired;
    } else {
      values_.emplace(key, desired);
    }
  }
  values_changed_.notify_all();
  return response(sp::Status::ok, desired);
}

}  // namespace aikido::elastic

namespace aikido::detail {
namespace {

// The handle serve_store() returns: the in-process store, and the server it belongs to.
class ServedStore final : public Store {
 public:
  ServedStore(const std::string& bind_host, int port, const std::string& secret, const TlsOptions& tls)
      : server_(bind_host, port, secret, tls), local_(server_.local_store()) {}
  ~ServedStore() override { server_.stop(); }

  void set(const std::string& key, const std::string& value) override { local_->set(key, value); }
  std::optional<std::string> get(const std::string& key) override { return local_->get(key); }
  std::string wait(const std::string& key, std::chrono::milliseconds timeout) override {
    return local_->wait(key, timeout);
  }
  std::optional<std::string> compare_and_set(const std::string& key, const std::optional<std::string>& expected,
                                             const std::string& desired) override {
    return local_->compare_and_set(key, expected, desired);
  }

 private:
  elastic::StoreServer server_;
  std::shared_ptr<Store> local_;  // refers to server_
};

}  // namespace

std::shared_ptr<Store> serve_store(const std::string& bind_host, int port, const std::string& secret,
                                   const TlsOptions& tls) {
  return std::make_shared<ServedStore>(bind_host, port, secret, tls);
}

}  // namespace aikido::detail
