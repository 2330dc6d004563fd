#include "transport/socket.hpp"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>
#include <vector>

#include "base/error.hpp"
#include "transport/tls.hpp"

namespace aikido::transport {

using detail::str_cat;

namespace {

// Drops the first `n` bytes of `iov` (advancing it and `count` past buffers that are done).
void consume(iovec*& iov, int& count, std::size_t n) {
  while (count > 0 && (n > 0 || iov->iov_len == 0)) {
    const std::size_t take = std::min(n, iov->iov_len);
    iov->iov_base = static_cast<char*>(iov->iov_base) + take;
    iov->iov_len -= take;
    n -= take;
    if (iov->iov_len == 0) {
      ++iov;
      --count;
    }
  }
}

// One TLS write of the buffers' first bytes. Small buffers (a frame's header and name) are gathered with what follows
// into one slice, so that they do not each become a record; the same buffers always give the same slice, as a
// repeated write must.
std::size_t write_tls(TlsStream& tls, const iovec* iov, int count, bool wait, std::chrono::milliseconds timeout) {
  if (count == 1 || iov[0].iov_len >= kTlsWriteSlice) return tls.write(iov[0].iov_base, iov[0].iov_len, wait, timeout);
  thread_local std::vector<char> gather(kTlsWriteSlice);
  std::size_t size = 0;
  for (int i = 0; i < count && size < gather.size(); ++i) {
    const std::size_t take = std::min(iov[i].iov_len, gather.size() - size);
    if (take > 0) std::memcpy(gather.data() + size, iov[i].iov_base, take);  // an empty name or payload may be null
    size += take;
  }
  return tls.write(gather.data(), size, wait, timeout);
}

}  // namespace

std::string Address::to_string() const {
  if (kind == Kind::tcp) return str_cat("tcp:", host, ":", port);
  return "unix:" + path;
}

Address Address::parse(const std::string& text) {
  Address a;
  std::string rest = text;
  if (rest.rfind("unix:", 0) == 0) {
    a.kind = Kind::unix_socket;
    a.path = rest.substr(5);
    if (a.path.empty()) throw ConfigError("address '" + text + "' has an empty socket path");
    return a;
  }
  if (rest.rfind("tcp:", 0) == 0) rest = rest.substr(4);
  const auto colon = rest.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    throw ConfigError("address '" + text + "' is not of the form HOST:PORT, tcp:HOST:PORT or unix:PATH");
  }
  a.host = rest.substr(0, colon);
  const std::string port = rest.substr(colon + 1);
  char* end = nullptr;
  const long p = std::strtol(port.c_str(), &end, 10);
  if (port.empty() || *end != '\0' || p < 0 || p > 65535) {
    throw ConfigError("address '" + text + "' has an invalid port '" + port + "'");
  }
  a.port = int(p);
  return a;
}

Socket::Socket() = default;
Socket::Socket(int fd) : fd_(fd) {}
Socket::Socket(Socket&& other) noexcept
    : fd_(other.fd_), tls_(std::move(other.tls_)), timeout_(other.timeout_) {
  other.fd_ = -1;
}

Socket& Socket::operator=(Socket&& other) noexcept {
  if (this != &other) {
    close();
    fd_ = other.fd_;
    other.fd_ = -1;
    tls_ = std::move(other.tls_);
    timeout_ = other.timeout_;
  }
  return *this;
}

Socket::~Socket() { close(); }

void Socket::attach_tls(std::unique_ptr<TlsStream> tls) { tls_ = std::move(tls); }

bool Socket::has_buffered() const { return tls_ != nullptr && tls_->has_buffered(); }

void Socket::close() {
  tls_.reset();
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
}

void Socket::shutdown() {
  if (fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);
}

void Socket::read_exact(void* data, std::size_t size) {
  auto* p = static_cast<char*>(data);
  if (tls_) {
    while (size > 0) {
      const std::size_t n = tls_->read(p, size, true, timeout_);
      p += n;
      size -= n;
    }
    return;
  }
  while (size > 0) {
    const ssize_t n = ::recv(fd_, p, size, 0);
    if (n > 0) {
      p += n;
      size -= std::size_t(n);
      continue;
    }
    if (n == 0) throw PeerLostError("connection closed by the other side");
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) throw TimeoutError("timed out reading from connection");
    throw PeerLostError(str_cat("connection failed while reading: ", std::strerror(errno)));
  }
}

std::size_t Socket::try_read(void* data, std::size_t size) {
  if (tls_) return tls_->read(data, size, false, timeout_);
  for (;;) {
    const ssize_t n = ::recv(fd_, data, size, MSG_DONTWAIT);
    if (n > 0) return std::size_t(n);
    if (n == 0) throw PeerLostError("connection closed by the other side");
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    throw PeerLostError(str_cat("connection failed while reading: ", std::strerror(errno)));
  }
}

std::size_t Socket::read_some(void* data, std::size_t size) {
  if (tls_) return tls_->read(data, size, true, timeout_);
  for (;;) {
    const ssize_t n = ::recv(fd_, data, size, 0);
    if (n > 0) return std::size_t(n);
    if (n == 0) throw PeerLostError("connection closed by the other side");
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) throw TimeoutError("timed out reading from connection");
    throw PeerLostError(str_cat("connection failed while reading: ", std::strerror(errno)));
  }
}

void Socket::write_all(const void* data, std::size_t size) {
  iovec iov{const_cast<void*>(data), size};
  writev_all(&iov, 1);
}

void Socket::writev_all(iovec* iov, int count) {
  if (tls_) {
    while (count > 0) {
      const std::size_t n = write_tls(*tls_, iov, count, true, timeout_);
      consume(iov, count, n);
    }
    return;
  }
  while (count > 0) {
    if (iov->iov_len == 0) {
      ++iov;
      --count;
      continue;
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = std::size_t(count);
    ssize_t n = ::sendmsg(fd_, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) throw TimeoutError("timed out writing to connection");
      throw PeerLostError(str_cat("connection failed while writing: ", std::strerror(errno)));
    }
    consume(iov, count, std::size_t(n));
  }
}

std::size_t Socket::try_writev(iovec* iov, int count) {
  if (tls_) {
    // Slice after slice until the kernel takes no more; `iov` is the caller's, so walk a copy.
    std::vector<iovec> rest(iov, iov + count);
    iovec* p = rest.data();
    int left = count;
    std::size_t total = 0;
    while (left > 0) {
      const std::size_t n = write_tls(*tls_, p, left, false, timeout_);
      if (n == 0) break;
      total += n;
      consume(p, left, n);
    }
    return total;
  }
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = std::size_t(count);
  for (;;) {
    const ssize_t n = ::sendmsg(fd_, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) return std::size_t(n);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    throw PeerLostError(str_cat("connection failed while writing: ", std::strerror(errno)));
  }
}

void Socket::set_timeout(std::chrono::milliseconds timeout) {
  timeout_ = timeout;
  timeval tv{};
  tv.tv_sec = timeout.count() / 1000;
  tv.tv_usec = (timeout.count() % 1000) * 1000;
  ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

namespace {

socklen_t unix_sockaddr(const std::string& name, sockaddr_un* addr) {
  std::memset(addr, 0, sizeof *addr);
  addr->sun_family = AF_UNIX;
  if (name.size() >= sizeof addr->sun_path) {
    throw ConfigError(str_cat("Unix socket name '", name, "' is longer than ", sizeof addr->sun_path - 1, " bytes"));
  }
  std::memcpy(addr->sun_path, name.data(), name.size());
  if (name[0] == '@') addr->sun_path[0] = '\0';  // abstract namespace
  return socklen_t(offsetof(sockaddr_un, sun_path) + name.size());
}

sockaddr_in tcp_sockaddr(const std::string& host, int port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(std::uint16_t(port));
  if (::inet_pton(AF_INET, host.c_str(), &addr.sin_addr) == 1) return addr;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* result = nullptr;
  if (::getaddrinfo(host.c_str(), nullptr, &hints, &result) != 0 || result == nullptr) {
    throw ConfigError(str_cat("cannot resolve host '", host, "'"));
  }
  addr.sin_addr = reinterpret_cast<sockaddr_in*>(result->ai_addr)->sin_addr;
  ::freeaddrinfo(result);
  return addr;
}

void set_nodelay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

}  // namespace

Listener Listener::bind_tcp(const std::string& host, int port) {
  Listener l;
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) detail::throw_system("socket");
  l.socket_ = Socket(fd);
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr = tcp_sockaddr(host, port);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    detail::throw_system(str_cat("cannot bind TCP listener to ", host, ":", port));
  }
  if (::listen(fd, 512) != 0) detail::throw_system("listen");
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  l.address_.kind = Address::Kind::tcp;
  l.address_.host = host == "0.0.0.0" ? host_name() : host;
  l.address_.port = ntohs(addr.sin_port);
  return l;
}

Listener Listener::bind_unix(const std::string& name) {
  Listener l;
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) detail::throw_system("socket");
  l.socket_ = Socket(fd);
  sockaddr_un addr;
  const socklen_t len = unix_sockaddr(name, &addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), len) != 0) {
    detail::throw_system(str_cat("cannot bind Unix socket '", name, "'"));
  }
  if (::listen(fd, 512) != 0) detail::throw_system("listen");
  l.address_.kind = Address::Kind::unix_socket;
  l.address_.path = name;
  return l;
}

Socket Listener::try_accept(Clock::time_point deadline) {
  for (;;) {
    const auto now = Clock::now();
    if (now >= deadline) return Socket();
    const auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count() + 1;
    pollfd pfd{socket_.fd(), POLLIN, 0};
    const int r = ::poll(&pfd, 1, int(std::min<long long>(wait, 1000)));
    if (r < 0 && errno != EINTR) detail::throw_system("poll on listener");
    if (r <= 0) continue;
    if (pfd.revents & (POLLERR | POLLNVAL)) throw Error("listener closed");
    const int fd = ::accept4(socket_.fd(), nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED) continue;
      if (errno == EINVAL || errno == EBADF) throw Error("listener closed");
      detail::throw_system("accept");
    }
    if (address_.kind == Address::Kind::tcp) set_nodelay(fd);
    return Socket(fd);
  }
}

Socket Listener::accept(Clock::time_point deadline) {
  Socket s = try_accept(deadline);
  if (!s.valid()) throw TimeoutError(str_cat("no connection arrived at ", address_.to_string(), " in time"));
  return s;
}

Socket connect(const Address& address, Clock::time_point deadline) {
  auto backoff = std::chrono::milliseconds(1);
  for (;;) {
    const bool tcp = address.kind == Address::Kind::tcp;
    int fd = ::socket(tcp ? AF_INET : AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) detail::throw_system("socket");
    Socket s(fd);
    int r;
    if (tcp) {
      sockaddr_in addr = tcp_sockaddr(address.host, address.port);
      r = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
    } else {
      sockaddr_un addr;
      const socklen_t len = unix_sockaddr(address.path, &addr);
      r = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), len);
    }
    if (r == 0) {
      if (tcp) set_nodelay(fd);
      return s;
    }
    const int err = errno;
    if (err != ECONNREFUSED && err != ENOENT && err != EINTR && err != EAGAIN && err != ETIMEDOUT) {
      throw PeerLostError(str_cat("cannot connect to ", address.to_string(), ": ", std::strerror(err)));
    }
    if (Clock::now() + backoff >= deadline) {
      throw TimeoutError(str_cat("cannot connect to ", address.to_string(), " (", std::strerror(err),
                                 ") before the deadline; is the peer running?"));
    }
    std::this_thread::sleep_for(backoff);
    backoff = std::min(backoff * 2, std::chrono::milliseconds(100));
  }
}

void set_bulk_buffers(Socket& socket) {
  int size = 4 << 20;
  ::setsockopt(socket.fd(), SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
  ::setsockopt(socket.fd(), SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
}

int set_congestion_control(int fd, const std::string& name) {
  if (name.empty()) return 0;
  if (::setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, name.data(), socklen_t(name.size())) == 0) return 0;
  return errno;
}

std::string host_name() {
  char name[256] = {};
  if (::gethostname(name, sizeof name - 1) != 0) return "localhost";
  return name;
}

}  // namespace aikido::transport
