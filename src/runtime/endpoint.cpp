#include "runtime/endpoint.hpp"

#include <sstream>

#include "base/error.hpp"
#include "transport/interfaces.hpp"
#include "transport/socket.hpp"

namespace aikido::detail {

std::string encode_endpoint(const Endpoint& e) {
  return "host=" + e.host + "\ntcp=" + e.tcp + "\nunix=" + e.unix_path + "\nnet=" + e.network + "\n";
}

Endpoint decode_endpoint(const std::string& text, int rank) {
  Endpoint e;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    const auto eq = line.find('=');
    if (eq == std::string::npos) continue;
    const std::string key = line.substr(0, eq), value = line.substr(eq + 1);
    if (key == "host") e.host = value;
    if (key == "tcp") e.tcp = value;
    if (key == "unix") e.unix_path = value;
    if (key == "net") e.network = value;
  }
  if (e.host.empty() || (e.tcp.empty() && e.unix_path.empty())) {
    throw ProtocolError(str_cat("rank ", rank, " published an unreadable address record: '", text, "'"));
  }
  return e;
}

namespace {

// Mirrors connect_engine's choice: a rank connects to a lower rank over TCP unless both are on the same host and a
// Unix socket is there (and the transport allows it).
bool connects_over_tcp(const PeerConfig& config, const Endpoint& from, const Endpoint& to) {
  return !(config.transport != TransportKind::tcp && from.host == to.host && !to.unix_path.empty());
}

bool same_network(const Endpoint& a, const Endpoint& b) {
  if (a.network.empty() || b.network.empty()) return a.host == b.host;
  return a.network == b.network;
}

}  // namespace

void check_reachable(const PeerConfig& config, const std::vector<Endpoint>& endpoints) {
  const int size = int(endpoints.size());
  for (int p = 0; p < size; ++p) {
    const Endpoint& listener = endpoints[std::size_t(p)];
    if (listener.tcp.empty()) continue;
    const transport::Address address = transport::Address::parse(listener.tcp);
    bool loopback = false;  // resolved only when some rank needs it
    bool resolved = false;
    for (int q = p + 1; q < size; ++q) {
      const Endpoint& connector = endpoints[std::size_t(q)];
      if (!connects_over_tcp(config, connector, listener) || same_network(connector, listener)) continue;
      if (!resolved) {
        loopback = transport::is_loopback(address.host);
        resolved = true;
      }
      if (!loopback) break;
      throw ConfigError(str_cat(
          "rank ", config.rank, ": rank ", p, " on host '", listener.host, "' listens on the loopback address ",
          address.host, ":", address.port, ", which rank ", q, " on host '", connector.host,
          "' cannot reach (another host or network namespace); a job that spans hosts needs every worker to listen "
          "on its host's address: on host '",
          listener.host, "' set AIKIDO_IFACE to the interface the other hosts reach (such as eth0) or ",
          "AIKIDO_BIND_ADDRESS to its address (aikido-run: --iface or --host-address)"));
    }
  }
}

}  // namespace aikido::detail
