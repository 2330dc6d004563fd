// This host's addresses (src/transport/interfaces): NCCL-style interface names, routes, loopback, network ids.
#include "transport/interfaces.hpp"

#include <gtest/gtest.h>

#include <aikido/errors.hpp>
#include <string>
#include <vector>

namespace aikido::transport {
namespace {

bool matches(const char* spec, const char* name) { return InterfaceFilter(spec).matches(name); }

TEST(InterfaceFilter, PrefixesExactNamesAndExclusion) {
  EXPECT_TRUE(matches("eth", "eth0"));
  EXPECT_TRUE(matches("eth", "eth1"));
  EXPECT_FALSE(matches("eth", "ens3"));
  EXPECT_TRUE(matches("eth0", "eth0"));
  EXPECT_TRUE(matches("eth0", "eth01"));  // a prefix, as in NCCL
  EXPECT_TRUE(matches("=eth0", "eth0"));
  EXPECT_FALSE(matches("=eth0", "eth01"));
  EXPECT_TRUE(matches("eth0,ib", "ib0"));
  EXPECT_FALSE(matches("eth0,ib", "lo"));
  EXPECT_FALSE(matches("^lo,docker0", "lo"));
  EXPECT_FALSE(matches("^lo,docker0", "docker0"));
  EXPECT_TRUE(matches("^lo,docker0", "eth0"));
  EXPECT_FALSE(matches("^docker", "docker1"));
  EXPECT_FALSE(matches("^=docker0", "docker0"));
  EXPECT_TRUE(matches("^=docker0", "docker01"));
}

TEST(InterfaceFilter, EmptyEntriesAreConfigErrorsNamingTheVariable) {
  for (const char* bad : {"", "^", "=", "^=", "eth0,", ",eth0", "eth0,,ib"}) {
    try {
      InterfaceFilter filter(bad, "AIKIDO_IFACE");
      ADD_FAILURE() << "'" << bad << "' was accepted";
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("AIKIDO_IFACE='"), std::string::npos) << e.what();
    }
  }
}

TEST(SelectInterface, FirstMatchThatIsUpInTheKernelsOrder) {
  const std::vector<InterfaceAddress> interfaces = {
      {"lo", "127.0.0.1", true, true},   {"docker0", "172.17.0.1", true, false}, {"eth0", "10.0.0.5", false, false},
      {"eth1", "10.1.0.5", true, false}, {"eth1", "10.1.0.6", true, false},      {"ib0", "10.2.0.5", true, false}};
  EXPECT_EQ(select_interface("eth", interfaces)->address, "10.1.0.5");  // eth0 is down
  EXPECT_EQ(select_interface("^lo,docker", interfaces)->address, "10.1.0.5");
  EXPECT_EQ(select_interface("ib,eth", interfaces)->address, "10.1.0.5");  // the kernel's order, not the list's
  EXPECT_EQ(select_interface("=ib0", interfaces)->address, "10.2.0.5");
  EXPECT_EQ(select_interface("^eth", interfaces)->name, "lo");  // like NCCL: exclusion does not drop loopback
  EXPECT_FALSE(select_interface("=eth0", interfaces));
  EXPECT_FALSE(select_interface("wlan", interfaces));
}

TEST(Interfaces, LoopbackIsListed) {
  bool found = false;
  for (const auto& i : ipv4_interfaces()) {
    if (i.address == "127.0.0.1") {
      found = true;
      EXPECT_TRUE(i.loopback) << i.name;
    }
  }
  EXPECT_TRUE(found);
}

TEST(Interfaces, InterfaceAddressOfLoopbackAndAnUnknownName) {
  // This host's loopback interface, by its exact name.
  std::string lo_name;
  for (const auto& i : ipv4_interfaces()) {
    if (i.loopback && i.up) lo_name = i.name;
  }
  ASSERT_FALSE(lo_name.empty());
  EXPECT_EQ(interface_address("=" + lo_name), "127.0.0.1");
  try {
    interface_address("=no-such-interface0");
    ADD_FAILURE() << "an unknown interface was accepted";
  } catch (const ConfigError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("AIKIDO_IFACE='=no-such-interface0' matches no interface"), std::string::npos) << message;
    EXPECT_NE(message.find(lo_name + " 127.0.0.1"), std::string::npos) << "lists the interfaces: " << message;
  }
}

TEST(RouteAddress, LoopbackAndOwnAddresses) {
  EXPECT_EQ(route_address("127.0.0.1"), "127.0.0.1");
  EXPECT_TRUE(is_loopback_literal(route_address("127.0.0.2").value_or("none")));
  // A host that resolves to one of this host's addresses routes through that address.
  for (const auto& i : ipv4_interfaces()) {
    if (i.up && !i.loopback) {
      EXPECT_EQ(route_address(i.address), i.address) << i.name;
    }
  }
  EXPECT_FALSE(route_address("no-such-host.invalid"));
}

TEST(Loopback, LiteralsAndNames) {
  EXPECT_TRUE(is_loopback_literal("127.0.0.1"));
  EXPECT_TRUE(is_loopback_literal("127.1.2.3"));
  EXPECT_TRUE(is_loopback_literal("localhost"));
  EXPECT_FALSE(is_loopback_literal("10.0.0.1"));
  EXPECT_FALSE(is_loopback_literal("128.0.0.1"));
  EXPECT_FALSE(is_loopback_literal("node01"));
  EXPECT_TRUE(is_loopback("localhost"));
  EXPECT_TRUE(is_loopback("127.0.0.1"));
  EXPECT_FALSE(is_loopback("192.0.2.1"));
  EXPECT_FALSE(is_loopback("no-such-host.invalid"));
}

TEST(Resolve, DottedQuadsAndNames) {
  EXPECT_EQ(resolve_ipv4("192.0.2.1"), "192.0.2.1");
  EXPECT_EQ(resolve_ipv4("localhost"), "127.0.0.1");
  EXPECT_FALSE(resolve_ipv4("no-such-host.invalid"));
}

TEST(NetworkId, StableWithinAProcess) {
  const std::string id = network_id();
  EXPECT_FALSE(id.empty());
  EXPECT_EQ(id, network_id());
}

}  // namespace
}  // namespace aikido::transport
