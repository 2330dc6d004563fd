// Stores by URL (aikido::connect_store and its table of schemes) and the store rank 0 serves (detail::serve_store):
// waiting for a store that comes up later, and the server's lifetime.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <aikido/errors.hpp>
#include <aikido/store.hpp>
#include <algorithm>
#include <chrono>
#include <future>
#include <string>

#include "runtime/store_server.hpp"

namespace aikido {
namespace {

using namespace std::chrono_literals;

const std::string kSecret = "00112233445566778899aabbccddeeff";

// A TCP port that nothing listens on right now (the kernel's choice, released again).
int unused_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof addr;
  EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &length);
  ::close(fd);
  return ntohs(addr.sin_port);
}

std::string url_of(int port) { return "tcp://127.0.0.1:" + std::to_string(port); }

TEST(ConnectStore, MalformedUrlsAndUnknownSchemes) {
  for (const char* bad : {"127.0.0.1:4000", "://x", "tcp://", "TCP://h:1", "tcp:/h:1"}) {
    EXPECT_THROW(connect_store(bad, kSecret, 100ms), ConfigError) << bad;
  }
  try {
    connect_store("unknown-scheme://h:1", kSecret, 100ms);
    ADD_FAILURE() << "an unknown scheme was accepted";
  } catch (const ConfigError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("scheme 'unknown-scheme'"), std::string::npos) << message;
    EXPECT_NE(message.find("tcp://"), std::string::npos) << "lists the known schemes: " << message;
  }
  EXPECT_THROW(connect_store("tcp://127.0.0.1:0", kSecret, 100ms), ConfigError);
  EXPECT_THROW(connect_store("tcp://127.0.0.1:1", kSecret, 0ms), ConfigError);
}

TEST(ConnectStore, RegisteredSchemesGetTheWholeUrl) {
  auto memory = make_memory_store();
  std::string seen_url, seen_secret;
  register_store_scheme(
      "test-memory",
      [&](const std::string& url, const std::string& secret, std::chrono::milliseconds) -> std::shared_ptr<Store> {
        seen_url = url;
        seen_secret = secret;
        return memory;
      });
  EXPECT_EQ(connect_store("test-memory://a:1,b:2/prefix", kSecret, 1s), memory);
  EXPECT_EQ(seen_url, "test-memory://a:1,b:2/prefix");
  EXPECT_EQ(seen_secret, kSecret);
  const auto schemes = store_schemes();
  EXPECT_NE(std::find(schemes.begin(), schemes.end(), "tcp"), schemes.end());
  EXPECT_NE(std::find(schemes.begin(), schemes.end(), "test-memory"), schemes.end());
  EXPECT_THROW(register_store_scheme("Bad Scheme", nullptr), ConfigError);
  EXPECT_THROW(register_store_scheme("empty", nullptr), ConfigError);
}

TEST(ServeStore, ClientsAndTheServingProcessShareIt) {
  const int port = unused_port();
  auto served = detail::serve_store("127.0.0.1", port, kSecret);
  auto client = connect_store(url_of(port), kSecret, 5s);
  served->set("from-rank-0", "a");
  EXPECT_EQ(client->get("from-rank-0"), "a");
  client->set("from-rank-1", "b");
  EXPECT_EQ(served->wait("from-rank-1", 5s), "b");
  EXPECT_EQ(served->compare_and_set("k", std::nullopt, "1"), "1");
  EXPECT_EQ(client->compare_and_set("k", "0", "2"), "1");
}

TEST(ServeStore, ClientsWaitUntilRankZerosStoreIsUp) {
  const int port = unused_port();
  auto client = std::async(std::launch::async, [&] { return connect_store(url_of(port), kSecret, 30s); });
  // Nothing listens yet: the client cannot have succeeded (and must not have given up).
  ASSERT_EQ(client.wait_for(50ms), std::future_status::timeout);
  auto served = detail::serve_store("127.0.0.1", port, kSecret);
  served->set("ready", "yes");
  EXPECT_EQ(client.get()->get("ready"), "yes");
}

TEST(ServeStore, AWrongSecretFailsAtOnce) {
  const int port = unused_port();
  auto served = detail::serve_store("127.0.0.1", port, kSecret);
  EXPECT_THROW(connect_store(url_of(port), "another-secret", 30s), AuthError);
}

TEST(ServeStore, LivesAsLongAsItsLastHandle) {
  const int port = unused_port();
  auto served = detail::serve_store("127.0.0.1", port, kSecret);
  auto copy = served;  // a PeerConfig copied into an engine or a session
  auto client = connect_store(url_of(port), kSecret, 2s);
  served.reset();
  client->set("still", "there");
  EXPECT_EQ(copy->get("still"), "there");
  copy.reset();  // the server stops; the client's connection is closed
  EXPECT_THROW(client->get("still"), Error);
}

TEST(ServeStore, APortInUseIsAnError) {
  const int port = unused_port();
  auto served = detail::serve_store("127.0.0.1", port, kSecret);
  EXPECT_THROW(detail::serve_store("127.0.0.1", port, kSecret), Error);
}

TEST(ConnectStore, AHostThatNeverResolvesTimesOutNamingIt) {
  try {
    connect_store("tcp://no-such-host.invalid:4000", kSecret, 300ms);
    ADD_FAILURE() << "connected to a host that does not exist";
  } catch (const TimeoutError& e) {
    EXPECT_NE(std::string(e.what()).find("'no-such-host.invalid' does not resolve"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace aikido
