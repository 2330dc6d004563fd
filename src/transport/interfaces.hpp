// This host's addresses: which one TCP listeners use when a job spans hosts.
//
// Workers of a job that spans hosts must listen on an address the other hosts reach, never on loopback. The
// address comes from an interface given by name (AIKIDO_IFACE, in the forms of NCCL_SOCKET_IFNAME) or from the
// interface the kernel routes to a given host through (the store's host: whatever reaches the store is likely to
// reach the other workers). Only IPv4: the transport's TCP addresses are IPv4.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace aikido::transport {

/// One IPv4 address of a network interface.
struct InterfaceAddress {
  std::string name;     // "eth0"
  std::string address;  // "192.0.2.7"
  bool up = false;      // IFF_UP
  bool loopback = false;
};

/// The IPv4 addresses of this host's interfaces, in the kernel's order (getifaddrs). Throws aikido::Error when
/// the kernel refuses the list.
std::vector<InterfaceAddress> ipv4_interfaces();

/// Which interfaces a name specification selects, in NCCL_SOCKET_IFNAME's forms: a comma-separated list of name
/// prefixes ("eth", "eth0,ib"); with a leading '=' exact names ("=eth0"); with a leading '^' every interface but
/// those ("^lo,docker", "^=docker0"). Throws ConfigError naming `variable` when `spec` is empty or has an empty entry.
class InterfaceFilter {
 public:
  explicit InterfaceFilter(std::string_view spec, std::string_view variable = "AIKIDO_IFACE");
  bool matches(std::string_view interface_name) const;

 private:
  std::vector<std::string> names_;
  bool exclude_ = false;
  bool exact_ = false;
};

/// The first address in `interfaces` (in order) of an interface that is up and matches `spec`; nullopt when none.
std::optional<InterfaceAddress> select_interface(std::string_view spec,
                                                 const std::vector<InterfaceAddress>& interfaces);

/// The first IPv4 address of an interface of this host that matches `spec`. Throws ConfigError naming `variable`
/// and listing this host's interfaces when none matches (or the ones that match are down).
std::string interface_address(std::string_view spec, std::string_view variable = "AIKIDO_IFACE");

/// The first IPv4 address `host` (a name or a dotted quad) resolves to; nullopt when it does not resolve.
std::optional<std::string> resolve_ipv4(const std::string& host);

/// The address of this host's interface that the kernel routes to `host` through (a UDP socket connected to it
/// and getsockname: no packet is sent); nullopt when `host` does not resolve or no route leads there. A host that
/// resolves to one of this host's own addresses gives that address.
std::optional<std::string> route_address(const std::string& host);

/// True for a dotted quad in 127.0.0.0/8 and for "localhost"; names are not resolved.
bool is_loopback_literal(std::string_view host);
/// True when `host` is a loopback literal or resolves to a loopback address (a host name that /etc/hosts maps to
/// 127.0.1.1, as Debian does, is one).
bool is_loopback(const std::string& host);

/// Identifies the network this process sees: the kernel's boot id and the inode of its network namespace. Processes
/// with equal ids reach each other's loopback addresses; network namespaces used as emulated hosts (and containers
/// with their own network) have different ids on one machine. Empty when /proc does not tell.
std::string network_id();

}  // namespace aikido::transport
