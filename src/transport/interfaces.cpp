#include "transport/interfaces.hpp"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>

#include "base/error.hpp"

namespace aikido::transport {

using detail::str_cat;

namespace {

std::string dotted(const in_addr& a) {
  char text[INET_ADDRSTRLEN] = {};
  ::inet_ntop(AF_INET, &a, text, sizeof text);
  return text;
}

std::optional<in_addr> resolve(const std::string& host) {
  in_addr a{};
  if (::inet_pton(AF_INET, host.c_str(), &a) == 1) return a;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* result = nullptr;
  if (::getaddrinfo(host.c_str(), nullptr, &hints, &result) != 0 || result == nullptr) return std::nullopt;
  a = reinterpret_cast<sockaddr_in*>(result->ai_addr)->sin_addr;
  ::freeaddrinfo(result);
  return a;
}

std::string describe(const std::vector<InterfaceAddress>& interfaces) {
  std::string list;
  for (const auto& i : interfaces) {
    list += str_cat(list.empty() ? "" : ", ", i.name, " ", i.address, i.up ? "" : " (down)");
  }
  return list.empty() ? "none with an IPv4 address" : list;
}

}  // namespace

std::vector<InterfaceAddress> ipv4_interfaces() {
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) detail::throw_system("getifaddrs: cannot list this host's network interfaces");
  std::vector<InterfaceAddress> result;
  for (const ifaddrs* i = list; i != nullptr; i = i->ifa_next) {
    if (i->ifa_addr == nullptr || i->ifa_addr->sa_family != AF_INET) continue;
    InterfaceAddress a;
    a.name = i->ifa_name;
    a.address = dotted(reinterpret_cast<const sockaddr_in*>(i->ifa_addr)->sin_addr);
    a.up = (i->ifa_flags & IFF_UP) != 0;
    a.loopback = (i->ifa_flags & IFF_LOOPBACK) != 0;
    result.push_back(std::move(a));
  }
  ::freeifaddrs(list);
  return result;
}

InterfaceFilter::InterfaceFilter(std::string_view spec, std::string_view variable) {
  std::string_view rest = spec;
  if (!rest.empty() && rest.front() == '^') {
    exclude_ = true;
    rest.remove_prefix(1);
  }
  if (!rest.empty() && rest.front() == '=') {
    exact_ = true;
    rest.remove_prefix(1);
  }
  std::size_t pos = 0;
  while (pos <= rest.size()) {
    const std::size_t end = std::min(rest.find(',', pos), rest.size());
    const std::string_view name = rest.substr(pos, end - pos);
    if (name.empty()) {
      throw ConfigError(str_cat(variable, "='", spec,
                                "' has an empty interface name; give names or prefixes separated by commas, "
                                "such as eth0, =eth0 (exact) or ^lo,docker (all but these)"));
    }
    names_.emplace_back(name);
    pos = end + 1;
  }
}

bool InterfaceFilter::matches(std::string_view interface_name) const {
  bool listed = false;
  for (const auto& n : names_) {
    if (exact_ ? interface_name == n : interface_name.starts_with(n)) {
      listed = true;
      break;
    }
  }
  return listed != exclude_;
}

std::optional<InterfaceAddress> select_interface(std::string_view spec,
                                                 const std::vector<InterfaceAddress>& interfaces) {
  const InterfaceFilter filter(spec);
  for (const auto& i : interfaces) {
    if (i.up && filter.matches(i.name)) return i;
  }
  return std::nullopt;
}

std::string interface_address(std::string_view spec, std::string_view variable) {
  const InterfaceFilter filter(spec, variable);
  const auto interfaces = ipv4_interfaces();
  for (const auto& i : interfaces) {
    if (i.up && filter.matches(i.name)) return i.address;
  }
  throw ConfigError(str_cat(variable, "='", spec, "' matches no interface that is up and has an IPv4 address; ",
                            "this host has: ", describe(interfaces)));
}

std::optional<std::string> resolve_ipv4(const std::string& host) {
  auto a = resolve(host);
  if (!a) return std::nullopt;
  return dotted(*a);
}

std::optional<std::string> route_address(const std::string& host) {
  const auto target = resolve(host);
  if (!target) return std::nullopt;
  const int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return std::nullopt;
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_addr = *target;
  to.sin_port = htons(9);  // any port: connecting a UDP socket only picks the route
  sockaddr_in local{};
  socklen_t length = sizeof local;
  const bool ok = ::connect(fd, reinterpret_cast<const sockaddr*>(&to), sizeof to) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &length) == 0;
  ::close(fd);
  if (!ok || local.sin_addr.s_addr == htonl(INADDR_ANY)) return std::nullopt;
  return dotted(local.sin_addr);
}

bool is_loopback_literal(std::string_view host) {
  if (host == "localhost") return true;
  in_addr a{};
  const std::string text(host);
  return ::inet_pton(AF_INET, text.c_str(), &a) == 1 && (ntohl(a.s_addr) >> 24) == 127;
}

bool is_loopback(const std::string& host) {
  if (is_loopback_literal(host)) return true;
  in_addr a{};
  if (::inet_pton(AF_INET, host.c_str(), &a) == 1) return false;
  const auto resolved = resolve(host);
  return resolved && (ntohl(resolved->s_addr) >> 24) == 127;
}

std::string network_id() {
  std::ifstream boot("/proc/sys/kernel/random/boot_id");
  std::string boot_id;
  struct stat ns {};
  if (!std::getline(boot, boot_id) || boot_id.empty() || ::stat("/proc/self/ns/net", &ns) != 0) return "";
  return str_cat(boot_id, "/", ns.st_ino);
}

}  // namespace aikido::transport
