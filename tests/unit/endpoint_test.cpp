// Addresses of a job that spans hosts: the rendezvous record, the refusal of loopback addresses across networks
// (runtime/endpoint), and the choice of the address a worker listens on (runtime/peer_env).
#include "runtime/endpoint.hpp"

#include <gtest/gtest.h>

#include <aikido/errors.hpp>
#include <map>
#include <string>
#include <vector>

#include "runtime/peer_env.hpp"
#include "transport/interfaces.hpp"

namespace aikido::detail {
namespace {

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

Endpoint endpoint(std::string host, std::string tcp, std::string network, std::string unix_path = "") {
  return {std::move(host), std::move(tcp), std::move(unix_path), std::move(network)};
}

std::string reachability_error(const std::vector<Endpoint>& endpoints, TransportKind transport = TransportKind::tcp,
                               int rank = 0) {
  PeerConfig config;
  config.rank = rank;
  config.size = int(endpoints.size());
  config.transport = transport;
  try {
    check_reachable(config, endpoints);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "no error";
}

TEST(Endpoint, RoundTripAndOlderRecords) {
  const Endpoint e = endpoint("h1", "tcp:10.0.0.1:4000", "boot/4026531992", "unix:@aikido-x");
  const Endpoint back = decode_endpoint(encode_endpoint(e), 3);
  EXPECT_EQ(back.host, "h1");
  EXPECT_EQ(back.tcp, "tcp:10.0.0.1:4000");
  EXPECT_EQ(back.unix_path, "unix:@aikido-x");
  EXPECT_EQ(back.network, "boot/4026531992");
  // A record without a network id (or with lines this version does not know) still reads.
  const Endpoint old = decode_endpoint("host=h2\ntcp=tcp:127.0.0.1:1\nunix=\nfuture=1\n", 1);
  EXPECT_EQ(old.host, "h2");
  EXPECT_TRUE(old.network.empty());
  EXPECT_THROW(decode_endpoint("host=h2\n", 1), ProtocolError);
}

TEST(CheckReachable, LoopbackAcrossNetworksIsRefusedNamingTheSetting) {
  const std::string message = reachability_error(
      {endpoint("hostA", "tcp:127.0.0.1:4000", "boot/1"), endpoint("hostB", "tcp:10.0.0.2:4000", "boot/2")},
      TransportKind::automatic, 1);
  EXPECT_TRUE(contains(message, "rank 1: rank 0 on host 'hostA' listens on the loopback address 127.0.0.1:4000"))
      << message;
  EXPECT_TRUE(contains(message, "rank 1 on host 'hostB' cannot reach")) << message;
  EXPECT_TRUE(contains(message, "AIKIDO_IFACE")) << message;
  EXPECT_TRUE(contains(message, "AIKIDO_BIND_ADDRESS")) << message;
}

TEST(CheckReachable, EveryRankRefusesTheSameCluster) {
  const std::vector<Endpoint> endpoints = {endpoint("a", "tcp:10.0.0.1:1", "n1"),
                                           endpoint("b", "tcp:localhost:2", "n2"),
                                           endpoint("c", "tcp:10.0.0.3:3", "n3")};
  for (int rank = 0; rank < 3; ++rank) {
    const std::string message = reachability_error(endpoints, TransportKind::automatic, rank);
    EXPECT_TRUE(contains(message, "rank 1 on host 'b' listens on the loopback address localhost:2")) << message;
  }
}

TEST(CheckReachable, SameNetworkMayUseLoopback) {
  // Hosts emulated by ranks in one process (the in-process tests), or on one machine.
  EXPECT_EQ(reachability_error({endpoint("a", "tcp:127.0.0.1:1", "n"), endpoint("b", "tcp:127.0.0.1:2", "n")}),
            "no error");
}

TEST(CheckReachable, HostAddressesAreFine) {
  EXPECT_EQ(reachability_error({endpoint("a", "tcp:10.0.0.1:1", "n1"), endpoint("b", "tcp:10.0.0.2:2", "n2")}),
            "no error");
}

TEST(CheckReachable, OnlyConnectionsThatUseTcpCount) {
  // Same host id with a Unix socket: the higher rank connects over the Unix socket.
  EXPECT_EQ(reachability_error({endpoint("a", "tcp:127.0.0.1:1", "n1", "unix:@x"), endpoint("a", "", "n2", "unix:@y")},
                               TransportKind::automatic),
            "no error");
  // Only higher ranks connect to a rank: the last rank's loopback listener is never used.
  EXPECT_EQ(reachability_error({endpoint("a", "tcp:10.0.0.1:1", "n1"), endpoint("b", "tcp:127.0.0.1:2", "n2")}),
            "no error");
}

TEST(CheckReachable, UnknownNetworksCompareHostIds) {
  EXPECT_NE(reachability_error({endpoint("a", "tcp:127.0.0.1:1", ""), endpoint("b", "tcp:10.0.0.2:2", "n2")}),
            "no error");
  EXPECT_EQ(reachability_error({endpoint("a", "tcp:127.0.0.1:1", ""), endpoint("a", "tcp:127.0.0.1:2", "")}),
            "no error");
}

// ---- the address a worker listens on ----

using Vars = std::map<std::string, std::string>;

env::Lookup lookup_of(const Vars& vars) {
  return [vars](const char* name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end() || it->second.empty()) return std::nullopt;
    return it->second;
  };
}

std::string bind_address(const Vars& vars) {
  return choose_bind_address(lookup_of(vars), env::detect_launch(lookup_of(vars)));
}

// The first interface of this host that is up and not loopback, if any.
std::optional<transport::InterfaceAddress> external_interface() {
  for (const auto& i : transport::ipv4_interfaces()) {
    if (i.up && !i.loopback) return i;
  }
  return std::nullopt;
}

const Vars kKubeflow = {{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "23456"}};

TEST(ChooseBindAddress, ExplicitSettings) {
  EXPECT_EQ(bind_address({{"AIKIDO_BIND_ADDRESS", "10.9.8.7"}}), "10.9.8.7");
  std::string lo;
  for (const auto& i : transport::ipv4_interfaces()) {
    if (i.loopback && i.up) lo = i.name;
  }
  EXPECT_EQ(bind_address({{"AIKIDO_IFACE", "=" + lo}}), "127.0.0.1");
  try {
    bind_address({{"AIKIDO_IFACE", "eth0"}, {"AIKIDO_BIND_ADDRESS", "10.0.0.1"}});
    ADD_FAILURE() << "both settings were accepted";
  } catch (const ConfigError& e) {
    EXPECT_TRUE(contains(e.what(), "set only one")) << e.what();
  }
}

TEST(ChooseBindAddress, LoopbackWhenEveryWorkerIsOnThisHost) {
  EXPECT_EQ(bind_address({}), "127.0.0.1");
  EXPECT_EQ(bind_address({{"OMPI_COMM_WORLD_RANK", "0"},
                          {"OMPI_COMM_WORLD_SIZE", "2"},
                          {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"},
                          {"MASTER_ADDR", "192.0.2.1"},
                          {"MASTER_PORT", "1"}}),
            "127.0.0.1");
  // Nothing says where the workers are, but the store is on this host's loopback.
  Vars vars = kKubeflow;
  vars["MASTER_ADDR"] = "localhost";
  EXPECT_EQ(bind_address(vars), "127.0.0.1");
}

TEST(ChooseBindAddress, TheInterfaceThatRoutesToTheStore) {
  const auto external = external_interface();
  if (!external) GTEST_SKIP() << "this host has no interface besides loopback";
  Vars vars = kKubeflow;
  vars["MASTER_ADDR"] = external->address;  // routes through its own interface
  EXPECT_EQ(bind_address(vars), external->address);
  // An etcd store elsewhere, under a launcher that says the job spans hosts.
  EXPECT_EQ(bind_address({{"SLURM_PROCID", "1"},
                          {"SLURM_NTASKS", "2"},
                          {"SLURM_NODEID", "1"},
                          {"SLURM_STEP_NODELIST", "n[1-2]"},
                          {"AIKIDO_STORE", "etcd://" + external->address + ":2379"}}),
            external->address);
}

TEST(ChooseBindAddress, AJobAcrossHostsWithTheStoreOnLoopbackTakesAnExternalInterface) {
  // Rank 0 on a host whose own name maps to 127.0.1.1: the store's host is loopback here, yet other hosts
  // connect; NCCL's default choice applies.
  const Vars vars = {{"SLURM_PROCID", "0"},
                     {"SLURM_NTASKS", "2"},
                     {"SLURM_NODEID", "0"},
                     {"SLURM_STEP_NODELIST", "localhost,n2"},
                     {"SLURM_JOB_ID", "5"}};
  const auto external = transport::select_interface("^lo,docker", transport::ipv4_interfaces());
  if (!external || external->loopback) {
    try {
      bind_address(vars);
      ADD_FAILURE() << "a job across hosts listened on loopback";
    } catch (const ConfigError& e) {
      EXPECT_TRUE(contains(e.what(), "AIKIDO_IFACE")) << e.what();
    }
    return;
  }
  EXPECT_EQ(bind_address(vars), external->address);
}

}  // namespace
}  // namespace aikido::detail
