// The rendezvous store: StoreServer and connect_tcp_store in one process, over loopback.
#include <gtest/gtest.h>

#include <aikido/errors.hpp>
#include <aikido/store.hpp>
#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "runtime/store_server.hpp"
#include "runtime/store_protocol.hpp"
#include "transport/handshake.hpp"
#include "transport/socket.hpp"

namespace aikido {
namespace {

using namespace std::chrono_literals;
namespace sp = store_protocol;

constexpr auto kTimeout = 10s;
const std::string kSecret = "0123456789abcdef0123456789abcdef";

class StoreTest : public ::testing::Test {
 protected:
  elastic::StoreServer server_{"127.0.0.1", 0, kSecret};

  std::shared_ptr<Store> connect(const std::string& secret = kSecret) {
    return connect_tcp_store(server_.address(), secret, kTimeout);
  }

  // A raw connection that has passed the handshake, for sending hand-made requests.
  transport::Socket raw_connection() {
    auto socket = transport::connect(transport::Address::parse(server_.address()), transport::Clock::now() + kTimeout);
    transport::handshake_connect(socket, kSecret, transport::Channel::store, 0, -1, kTimeout);
    socket.set_timeout(kTimeout);
    return socket;
  }

  // Reads until the server closes the connection; returns the bytes read. Fails on a read timeout.
  static std::string read_until_closed(transport::Socket& socket) {
    std::string bytes;
    for (;;) {
      char c;
      try {
        socket.read_exact(&c, 1);
      } catch (const PeerLostError&) {
        return bytes;
      }
      bytes.push_back(c);
    }
  }
};

TEST_F(StoreTest, AddressIsHostAndPort) {
  const std::string address = server_.address();
  EXPECT_EQ(address.rfind("127.0.0.1:", 0), 0u) << address;
  EXPECT_GT(std::stoi(address.substr(10)), 0);
}

TEST_F(StoreTest, SetGetOverwrite) {
  auto store = connect();
  EXPECT_EQ(store->get("missing"), std::nullopt);
  store->set("a", "1");
  EXPECT_EQ(store->get("a"), "1");
  store->set("a", "22");
  EXPECT_EQ(store->get("a"), "22");
  store->set("empty", "");
  EXPECT_EQ(store->get("empty"), "");
  // Values are bytes, not C strings.
  const std::string binary("x\0y\xff", 4);
  store->set("binary", binary);
  EXPECT_EQ(store->get("binary"), binary);
  // Another client sees the same store.
  EXPECT_EQ(connect()->get("a"), "22");
}

TEST_F(StoreTest, LargeValueRoundTrips) {
  auto store = connect();
  std::string value(sp::kMaxValueBytes, '\0');
  for (std::size_t i = 0; i < value.size(); ++i) value[i] = char(i * 7);
  store->set("large", value);
  EXPECT_EQ(store->get("large"), value);
}

TEST_F(StoreTest, OversizedKeysAndValuesAreRefusedByTheClient) {
  auto store = connect();
  EXPECT_THROW(store->set(std::string(sp::kMaxKeyBytes + 1, 'k'), "v"), ConfigError);
  EXPECT_THROW(store->set("k", std::string(sp::kMaxValueBytes + 1, 'v')), ConfigError);
  store->set("k", "still works");
  EXPECT_EQ(store->get("k"), "still works");
}

TEST_F(StoreTest, WaitReturnsAValueSetLater) {
  auto waiter = connect();
  auto setter = connect();
  std::thread thread([&] {
    std::this_thread::sleep_for(50ms);
    setter->set("late", "here");
  });
  EXPECT_EQ(waiter->wait("late", kTimeout), "here");
  thread.join();
  // A key that exists already returns at once.
  EXPECT_EQ(waiter->wait("late", 1ms), "here");
}

TEST_F(StoreTest, WaitTimesOutNamingTheKey) {
  auto store = connect();
  try {
    store->wait("never/set", 100ms);
    FAIL() << "wait returned";
  } catch (const TimeoutError& e) {
    EXPECT_NE(std::string(e.what()).find("'never/set'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(server_.address()), std::string::npos) << e.what();
  }
  // The connection is still usable.
  store->set("after", "timeout");
  EXPECT_EQ(store->get("after"), "timeout");
}

TEST_F(StoreTest, ManyClientsWaitConcurrently) {
  constexpr int kClients = 16;
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      auto store = connect();
      store->set("rank/" + std::to_string(i), std::to_string(i));
      for (int j = 0; j < kClients; ++j) {
        if (store->wait("rank/" + std::to_string(j), kTimeout) == std::to_string(j)) ++ok;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), kClients * kClients);
}

TEST_F(StoreTest, CompareAndSet) {
  auto store = connect();
  // Absent key, expected absent: set.
  EXPECT_EQ(store->compare_and_set("leader", std::nullopt, "rank0"), "rank0");
  // Expected absent, but present: no change, the current value comes back.
  EXPECT_EQ(store->compare_and_set("leader", std::nullopt, "rank1"), "rank0");
  // Wrong expected value: no change.
  EXPECT_EQ(store->compare_and_set("leader", "rank9", "rank1"), "rank0");
  // Right expected value: swapped.
  EXPECT_EQ(store->compare_and_set("leader", "rank0", "rank1"), "rank1");
  EXPECT_EQ(store->get("leader"), "rank1");
  // Expected a value, key absent: nothing set, absent comes back.
  EXPECT_EQ(store->compare_and_set("nobody", "x", "y"), std::nullopt);
  EXPECT_EQ(store->get("nobody"), std::nullopt);
}

TEST_F(StoreTest, CompareAndSetElectsExactlyOneWinner) {
  constexpr int kClients = 8;
  std::vector<std::thread> threads;
  std::atomic<int> winners{0};
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      auto store = connect();
      if (store->compare_and_set("version", std::nullopt, std::to_string(i)) == std::to_string(i)) ++winners;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(winners.load(), 1);
}

TEST_F(StoreTest, WaitWakesUpOnCompareAndSet) {
  auto waiter = connect();
  auto setter = connect();
  std::thread thread([&] {
    std::this_thread::sleep_for(50ms);
    setter->compare_and_set("cas-key", std::nullopt, "v");
  });
  EXPECT_EQ(waiter->wait("cas-key", kTimeout), "v");
  thread.join();
}

TEST_F(StoreTest, WrongSecretIsRefusedAndOthersAreStillServed) {
  auto good = connect();
  good->set("k", "v");
  try {
    connect("not the secret");
    FAIL() << "a client with the wrong secret connected";
  } catch (const AuthError& e) {
    EXPECT_NE(std::string(e.what()).find(server_.address()), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("AIKIDO_SECRET"), std::string::npos) << e.what();
  }
  EXPECT_EQ(good->get("k"), "v");
  EXPECT_EQ(connect()->get("k"), "v");
}

TEST_F(StoreTest, ClientWithoutHandshakeIsRefused) {
  auto socket = transport::connect(transport::Address::parse(server_.address()), transport::Clock::now() + kTimeout);
  socket.set_timeout(kTimeout);
  // A request where the handshake's hello belongs: the server must close the connection without answering.
  sp::Encoder request;
  request.u8(std::uint8_t(sp::Op::get));
  request.bytes("k");
  const std::string garbage = request.data() + std::string(128, 'x');
  socket.write_all(garbage.data(), garbage.size());
  EXPECT_EQ(read_until_closed(socket), "");
  auto store = connect();
  store->set("k", "v");
  EXPECT_EQ(store->get("k"), "v");
}

TEST_F(StoreTest, OversizedLengthFromTheWireIsRefused) {
  struct Case {
    std::string name;
    std::string request;
  };
  std::vector<Case> cases;
  {
    sp::Encoder e;  // a key of 4 GiB
    e.u8(std::uint8_t(sp::Op::set));
    e.u32(0xffffffffu);
    cases.push_back({"huge key", e.data()});
  }
  {
    sp::Encoder e;  // a value one byte over the cap
    e.u8(std::uint8_t(sp::Op::set));
    e.bytes("k");
    e.u32(std::uint32_t(sp::kMaxValueBytes + 1));
    cases.push_back({"value over the cap", e.data()});
  }
  {
    sp::Encoder e;  // a compare_and_set whose expected value is too long
    e.u8(std::uint8_t(sp::Op::cas));
    e.bytes("k");
    e.u8(1);
    e.u32(0x80000000u);
    cases.push_back({"expected value over the cap", e.data()});
  }
  {
    sp::Encoder e;  // an operation that does not exist
    e.u8(0x7f);
    cases.push_back({"unknown op", e.data()});
  }
  for (const auto& c : cases) {
    auto socket = raw_connection();
    socket.write_all(c.request.data(), c.request.size());
    const std::string reply = read_until_closed(socket);
    // An error response (status, then a message) and then the end of the connection.
    ASSERT_GE(reply.size(), 5u) << c.name;
    EXPECT_EQ(std::uint8_t(reply[0]), std::uint8_t(sp::Status::error)) << c.name;
    EXPECT_TRUE(reply.find("limit") != std::string::npos || reply.find("unknown") != std::string::npos)
        << c.name << ": " << reply.substr(5);
  }
  auto store = connect();
  store->set("k", "v");
  EXPECT_EQ(store->get("k"), "v");
}

TEST_F(StoreTest, ClientOfAStoppedServerGetsAnError) {
  auto store = connect();
  store->set("k", "v");
  // A client of a stopped server gets an error, not a hang.
  server_.stop();
  EXPECT_THROW(store->get("k"), Error);
}

TEST_F(StoreTest, StopWakesBlockedWaiters) {
  auto store = connect();
  std::atomic<bool> threw{false};
  std::thread thread([&] {
    try {
      store->wait("never", 60s);
    } catch (const Error&) {
      threw = true;
    }
  });
  std::this_thread::sleep_for(100ms);
  const auto start = std::chrono::steady_clock::now();
  server_.stop();
  thread.join();
  EXPECT_TRUE(threw.load());
  EXPECT_LT(std::chrono::steady_clock::now() - start, 10s);
}

TEST(StoreConnectTest, UnreachableStoreTimesOut) {
  // Bind and close a listener to get a port that nobody serves.
  std::string address;
  {
    auto listener = transport::Listener::bind_tcp("127.0.0.1", 0);
    address = "127.0.0.1:" + std::to_string(listener.address().port);
  }
  try {
    connect_tcp_store(address, kSecret, 200ms);
    FAIL() << "connected to nobody";
  } catch (const TimeoutError& e) {
    EXPECT_NE(std::string(e.what()).find(address), std::string::npos) << e.what();
  }
}

TEST(StoreConnectTest, BadAddressIsAConfigError) {
  EXPECT_THROW(connect_tcp_store("no-port-here", kSecret, 200ms), ConfigError);
}

}  // namespace
}  // namespace aikido
