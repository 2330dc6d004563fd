// TLS on TCP connections: sockets, handshakes, the store and collectives.
#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/socket.h>
#include <unistd.h>

#include <aikido/aikido.hpp>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <numeric>
#include <random>
#include <thread>

#include "cluster.hpp"
#include "runtime/store_server.hpp"
#include "transport/handshake.hpp"
#include "transport/tls.hpp"

namespace aikido {
namespace {

using namespace std::chrono_literals;
using transport::Channel;
using transport::Clock;
using transport::Socket;

constexpr auto kTimeout = std::chrono::milliseconds(5000);

TlsOptions derived() {
  TlsOptions o;
  o.enabled = true;
  return o;
}

// A connected pair of TCP sockets on loopback: {connector's, acceptor's}.
std::pair<Socket, Socket> tcp_pair() {
  auto listener = transport::Listener::bind_tcp("127.0.0.1", 0);
  Socket client = transport::connect(listener.address(), Clock::now() + kTimeout);
  Socket server = listener.accept(Clock::now() + kTimeout);
  return {std::move(client), std::move(server)};
}

// Both handshakes at once (they wait for each other); returns the acceptor's error, if any, and rethrows the
// connector's.
struct Outcome {
  std::exception_ptr connect_error;
  std::exception_ptr accept_error;
};

Outcome handshake_pair(Socket& client, Socket& server, const std::string& client_secret,
                       const std::string& server_secret, const transport::TlsContext* client_tls,
                       const transport::TlsContext* server_tls) {
  Outcome out;
  std::thread acceptor([&] {
    try {
      transport::handshake_accept(server, server_secret, Channel::data, 0, 0, kTimeout, server_tls);
    } catch (...) {
      out.accept_error = std::current_exception();
      server.shutdown();
    }
  });
  try {
    transport::handshake_connect(client, client_secret, Channel::data, 0, 1, kTimeout, client_tls);
  } catch (...) {
    out.connect_error = std::current_exception();
    client.shutdown();
  }
  acceptor.join();
  return out;
}

std::string message_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  }
  return "";
}

template <class E>
bool is(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const E&) {
    return true;
  } catch (...) {
    return false;
  }
}

std::vector<std::uint8_t> random_bytes(std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::vector<std::uint8_t> v(n);
  for (auto& b : v) b = std::uint8_t(gen());
  return v;
}

TEST(Tls, BothDirectionsAtOnceCarryEveryByte) {
  auto tls = transport::TlsContext::shared(derived(), "job-secret");
  auto sockets = tcp_pair();
  Socket& client = sockets.first;  // named references: the threads below capture them
  Socket& server = sockets.second;
  const Outcome o = handshake_pair(client, server, "job-secret", "job-secret", tls.get(), tls.get());
  ASSERT_FALSE(o.connect_error) << message_of(o.connect_error);
  ASSERT_FALSE(o.accept_error) << message_of(o.accept_error);
  ASSERT_NE(client.tls(), nullptr);
  ASSERT_NE(server.tls(), nullptr);

  // Each side writes 6 MiB (vectored, blocking and non-blocking) while its other thread reads what the other side
  // writes: one reader and one writer per socket at the same time, as a Connection has.
  constexpr std::size_t n = 6 << 20;
  const auto a_to_b = random_bytes(n, 1), b_to_a = random_bytes(n, 2);
  std::vector<std::uint8_t> at_b(n), at_a(n);
  auto writer = [](Socket& s, const std::vector<std::uint8_t>& data) {
    std::size_t sent = 0;
    std::uint32_t header = 7;
    while (sent < n) {
      const std::size_t chunk = std::min<std::size_t>(n - sent, 300'000);
      iovec iov[2] = {{&header, 0}, {const_cast<std::uint8_t*>(data.data()) + sent, chunk}};
      if ((sent / 300'000) % 2 == 0) {
        s.writev_all(iov, 2);
        sent += chunk;
      } else {
        sent += s.try_writev(iov, 2);  // takes what fits; the rest goes next time round
      }
    }
  };
  auto reader = [](Socket& s, std::vector<std::uint8_t>& out) {
    std::size_t got = 0;
    while (got < n) {
      if (got % 3 == 0) {
        const std::size_t k = std::min<std::size_t>(n - got, 100'000);
        s.read_exact(out.data() + got, k);
        got += k;
      } else {
        got += s.read_some(out.data() + got, std::min<std::size_t>(n - got, 50'000));
      }
    }
  };
  std::thread t1([&] { writer(client, a_to_b); });
  std::thread t2([&] { reader(client, at_a); });
  std::thread t3([&] { writer(server, b_to_a); });
  reader(server, at_b);
  t1.join();
  t2.join();
  t3.join();
  EXPECT_TRUE(at_b == a_to_b);
  EXPECT_TRUE(at_a == b_to_a);
}

// A relay between two sockets that keeps a copy of everything the connector sends.
class Tap {
 public:
  Tap() : listener_(transport::Listener::bind_tcp("127.0.0.1", 0)), target_(transport::Listener::bind_tcp("127.0.0.1", 0)) {}
  const transport::Address& address() const { return listener_.address(); }
  // Accepts the connector, connects onwards and relays both ways until either side closes.
  void run_once(Socket& server_side) {
    relay_ = std::thread([this] {
      Socket in = listener_.accept(Clock::now() + kTimeout);
      Socket out = transport::connect(target_.address(), Clock::now() + kTimeout);
      std::thread back([&] {
        char buffer[65536];
        try {
          for (;;) {
            const std::size_t n = out.read_some(buffer, sizeof buffer);
            in.write_all(buffer, n);
          }
        } catch (const Error&) {
          in.shutdown();
        }
      });
      char buffer[65536];
      try {
        for (;;) {
          const std::size_t n = in.read_some(buffer, sizeof buffer);
          {
            std::lock_guard<std::mutex> lock(mutex_);
            seen_.append(buffer, n);
          }
          out.write_all(buffer, n);
        }
      } catch (const Error&) {
        out.shutdown();
      }
      back.join();
    });
    server_side = target_.accept(Clock::now() + kTimeout);
  }
  void join() { relay_.join(); }
  std::string seen() {
    std::lock_guard<std::mutex> lock(mutex_);
    return seen_;
  }

 private:
  transport::Listener listener_;
  transport::Listener target_;
  std::thread relay_;
  std::mutex mutex_;
  std::string seen_;
};

// Sends a recognisable text from connector to acceptor through a tap; returns what the tap saw.
std::string wire_bytes(bool use_tls) {
  auto tls = use_tls ? transport::TlsContext::shared(derived(), "job-secret") : nullptr;
  Tap tap;
  Socket client, server;
  std::thread connector([&] { client = transport::connect(tap.address(), Clock::now() + kTimeout); });
  tap.run_once(server);
  connector.join();
  const Outcome o = handshake_pair(client, server, "job-secret", "job-secret", tls.get(), tls.get());
  EXPECT_FALSE(o.connect_error) << message_of(o.connect_error);
  EXPECT_FALSE(o.accept_error) << message_of(o.accept_error);
  std::string text;
  for (int i = 0; i < 1000; ++i) text += "gradient-plaintext-marker ";
  client.write_all(text.data(), text.size());
  std::string received(text.size(), '\0');
  server.read_exact(received.data(), received.size());
  EXPECT_EQ(received, text);
  client.close();
  server.close();
  tap.join();
  return tap.seen();
}

TEST(Tls, NothingOfThePayloadIsReadableOnTheWire) {
  EXPECT_NE(wire_bytes(false).find("gradient-plaintext-marker"), std::string::npos);  // the tap does see plain data
  const std::string seen = wire_bytes(true);
  EXPECT_GT(seen.size(), 26'000u);
  EXPECT_EQ(seen.find("gradient-plaintext-marker"), std::string::npos);
  EXPECT_EQ(seen.find("job-secret"), std::string::npos);
}

TEST(Tls, ADifferentJobSecretIsRefusedByTheCertificate) {
  auto mine = transport::TlsContext::shared(derived(), "job-secret");
  auto theirs = transport::TlsContext::shared(derived(), "other-secret");
  auto [client, server] = tcp_pair();
  const Outcome o = handshake_pair(client, server, "job-secret", "other-secret", mine.get(), theirs.get());
  ASSERT_TRUE(o.connect_error);
  ASSERT_TRUE(o.accept_error);
  EXPECT_TRUE(is<AuthError>(o.connect_error)) << message_of(o.connect_error);
  EXPECT_NE(message_of(o.connect_error).find("certificate"), std::string::npos) << message_of(o.connect_error);
}

TEST(Tls, APlainSideAndATlsSideSayWhyTheyRefuseEachOther) {
  auto tls = transport::TlsContext::shared(derived(), "job-secret");
  {
    auto [client, server] = tcp_pair();  // plain connector, TLS acceptor
    const Outcome o = handshake_pair(client, server, "job-secret", "job-secret", nullptr, tls.get());
    ASSERT_TRUE(o.connect_error);
    ASSERT_TRUE(o.accept_error);
    EXPECT_TRUE(is<ProtocolError>(o.connect_error));
    EXPECT_NE(message_of(o.connect_error).find("requires TLS"), std::string::npos) << message_of(o.connect_error);
    EXPECT_NE(message_of(o.accept_error).find("without TLS"), std::string::npos) << message_of(o.accept_error);
  }
  {
    auto [client, server] = tcp_pair();  // TLS connector, plain acceptor
    const Outcome o = handshake_pair(client, server, "job-secret", "job-secret", tls.get(), nullptr);
    ASSERT_TRUE(o.connect_error);
    ASSERT_TRUE(o.accept_error);
    EXPECT_NE(message_of(o.accept_error).find("speaks TLS"), std::string::npos) << message_of(o.accept_error);
    EXPECT_NE(message_of(o.connect_error).find("TLS"), std::string::npos) << message_of(o.connect_error);
  }
}

TEST(Tls, UnixSocketsStayPlain) {
  auto tls = transport::TlsContext::shared(derived(), "job-secret");
  const std::string name = "@aikido-tls-test-" + std::to_string(::getpid());
  auto listener = transport::Listener::bind_unix(name);
  Socket client = transport::connect(listener.address(), Clock::now() + kTimeout);
  Socket server = listener.accept(Clock::now() + kTimeout);
  const Outcome o = handshake_pair(client, server, "job-secret", "job-secret", tls.get(), tls.get());
  ASSERT_FALSE(o.connect_error) << message_of(o.connect_error);
  ASSERT_FALSE(o.accept_error) << message_of(o.accept_error);
  EXPECT_EQ(client.tls(), nullptr);
  EXPECT_EQ(server.tls(), nullptr);
}

// Certificates of a small PKI, written as PEM files into a temporary folder: a CA, two leaves it signed, and a leaf
// of another CA.
class Pki {
 public:
  Pki() {
    dir_ = std::filesystem::temp_directory_path() / ("aikido-tls-" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
    EVP_PKEY* ca_key = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256");
    X509* ca = make_cert(ca_key, ca_key, nullptr, "test CA", true);
    write_cert("ca.pem", ca);
    for (const char* name : {"a", "b"}) {
      EVP_PKEY* key = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256");
      X509* cert = make_cert(key, ca_key, ca, name, false);
      write_cert(std::string(name) + ".pem", cert);
      write_key(std::string(name) + "-key.pem", key);
      X509_free(cert);
      EVP_PKEY_free(key);
    }
    EVP_PKEY* other_ca_key = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256");
    X509* other_ca = make_cert(other_ca_key, other_ca_key, nullptr, "other CA", true);
    EVP_PKEY* key = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256");
    X509* cert = make_cert(key, other_ca_key, other_ca, "stranger", false);
    write_cert("stranger.pem", cert);
    write_key("stranger-key.pem", key);
    X509_free(cert);
    EVP_PKEY_free(key);
    X509_free(other_ca);
    EVP_PKEY_free(other_ca_key);
    X509_free(ca);
    EVP_PKEY_free(ca_key);
  }
  ~Pki() { std::filesystem::remove_all(dir_); }

  TlsOptions options(const std::string& leaf) const {
    TlsOptions o;
    o.enabled = true;
    o.cert_file = path(leaf + ".pem");
    o.key_file = path(leaf + "-key.pem");
    o.ca_file = path("ca.pem");
    return o;
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

 private:
  static X509* make_cert(EVP_PKEY* key, EVP_PKEY* signer, X509* issuer, const char* cn, bool ca) {
    X509* x = X509_new();
    X509_set_version(x, 2);
    static long serial = 1;
    ASN1_INTEGER_set(X509_get_serialNumber(x), serial++);
    X509_gmtime_adj(X509_getm_notBefore(x), -3600);
    X509_gmtime_adj(X509_getm_notAfter(x), 3600L * 24 * 365);
    X509_NAME* name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(cn), -1, -1, 0);
    X509_set_issuer_name(x, issuer ? X509_get_subject_name(issuer) : name);
    X509_set_pubkey(x, key);
    X509V3_CTX ctx;
    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, issuer ? issuer : x, x, nullptr, nullptr, 0);
    X509_EXTENSION* ext =
        X509V3_EXT_conf_nid(nullptr, &ctx, NID_basic_constraints, ca ? "critical,CA:TRUE" : "critical,CA:FALSE");
    X509_add_ext(x, ext, -1);
    X509_EXTENSION_free(ext);
    X509_sign(x, signer, EVP_sha256());
    return x;
  }
  void write_cert(const std::string& name, X509* x) const {
    FILE* f = std::fopen(path(name).c_str(), "w");
    PEM_write_X509(f, x);
    std::fclose(f);
  }
  void write_key(const std::string& name, EVP_PKEY* key) const {
    FILE* f = std::fopen(path(name).c_str(), "w");
    PEM_write_PrivateKey(f, key, nullptr, nullptr, 0, nullptr, nullptr);
    std::fclose(f);
  }
  std::filesystem::path dir_;
};

TEST(Tls, CertificatesOfTheJobsCaAreAcceptedAndOthersRefused) {
  Pki pki;
  auto a = transport::TlsContext::create(pki.options("a"), "job-secret");
  auto b = transport::TlsContext::create(pki.options("b"), "job-secret");
  {
    auto [client, server] = tcp_pair();
    const Outcome o = handshake_pair(client, server, "job-secret", "job-secret", a.get(), b.get());
    EXPECT_FALSE(o.connect_error) << message_of(o.connect_error);
    EXPECT_FALSE(o.accept_error) << message_of(o.accept_error);
    EXPECT_NE(client.tls(), nullptr);
  }
  TlsOptions stranger = pki.options("stranger");
  auto s = transport::TlsContext::create(stranger, "job-secret");
  {
    auto [client, server] = tcp_pair();  // the stranger connects: the acceptor refuses its certificate
    const Outcome o = handshake_pair(client, server, "job-secret", "job-secret", s.get(), b.get());
    ASSERT_TRUE(o.accept_error);
    EXPECT_TRUE(is<AuthError>(o.accept_error)) << message_of(o.accept_error);
    EXPECT_TRUE(o.connect_error);
  }
  {
    auto [client, server] = tcp_pair();  // the stranger accepts: the connector refuses its certificate
    const Outcome o = handshake_pair(client, server, "job-secret", "job-secret", a.get(), s.get());
    ASSERT_TRUE(o.connect_error);
    EXPECT_TRUE(is<AuthError>(o.connect_error)) << message_of(o.connect_error);
  }
}

TEST(Tls, UnusableFilesAreConfigErrorsNamingTheSetting) {
  Pki pki;
  TlsOptions o = pki.options("a");
  o.cert_file = pki.path("missing.pem");
  try {
    transport::TlsContext::create(o, "s");
    FAIL() << "a missing certificate was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("--tls-cert"), std::string::npos) << e.what();
  }
  o = pki.options("a");
  o.key_file = pki.path("b-key.pem");
  try {
    transport::TlsContext::create(o, "s");
    FAIL() << "a key of another certificate was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("does not belong"), std::string::npos) << e.what();
  }
  o = pki.options("a");
  o.ca_file.clear();
  EXPECT_THROW(transport::TlsContext::create(o, "s"), ConfigError);
  EXPECT_THROW(transport::TlsContext::create(derived(), ""), ConfigError);  // nothing to derive from
}

TEST(Tls, TheStoreServesTlsClientsAndRefusesPlainOnes) {
  elastic::StoreServer server("127.0.0.1", 0, "job-secret", derived());
  auto store = connect_tcp_store(server.address(), "job-secret", kTimeout, derived());
  store->set("k", "v");
  EXPECT_EQ(store->get("k"), std::optional<std::string>("v"));
  std::thread setter([&] {
    std::this_thread::sleep_for(50ms);
    connect_tcp_store(server.address(), "job-secret", kTimeout, derived())->set("later", "x");
  });
  EXPECT_EQ(store->wait("later", kTimeout), "x");
  setter.join();
  try {
    connect_tcp_store(server.address(), "job-secret", kTimeout);
    FAIL() << "a plain client reached a TLS store";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("requires TLS"), std::string::npos) << e.what();
  }
  // connect_store passes TLS on to tcp:// URLs.
  auto by_url = connect_store("tcp://" + server.address(), "job-secret", kTimeout, derived());
  EXPECT_EQ(by_url->get("k"), std::optional<std::string>("v"));
}

// Every collective over TLS connections, large buffers (many records, pipelined segments) and small ones.
TEST(Tls, CollectivesOverTlsGiveTheSameResults) {
  PeerConfig base = test::base_config();
  base.transport = TransportKind::tcp;
  base.tls = derived();
  for (Topology topology : {Topology::ring, Topology::tree}) {
    base.topology = topology;
    test::run_cluster(3, base, [](Peer& peer) {
      for (std::size_t n : {std::size_t(1), std::size_t(1000), std::size_t(3) << 20}) {
        std::vector<float> data(n);
        std::iota(data.begin(), data.end(), float(peer.rank()));
        std::vector<float> out(n);
        peer.allreduce(std::span<const float>(data), std::span<float>(out), ReduceOp::sum, "sum" + std::to_string(n));
        for (std::size_t i = 0; i < n; i += 997) ASSERT_EQ(out[i], 3.0f * float(i) + 3.0f) << i;
        std::vector<float> all(n * 3);
        peer.allgather(std::span<const float>(data), std::span<float>(all), "gather" + std::to_string(n));
        for (int r = 0; r < 3; ++r) ASSERT_EQ(all[std::size_t(r) * n + n - 1], float(n - 1 + std::size_t(r)));
        std::vector<float> b(n, peer.rank() == 1 ? 5.0f : 0.0f);
        peer.broadcast(std::span<float>(b), 1, "bcast" + std::to_string(n));
        ASSERT_EQ(b[n - 1], 5.0f);
      }
      peer.barrier("end");
      EXPECT_GT(peer.bytes_sent(), std::uint64_t(3) << 20);
    });
  }
}

TEST(Tls, OptionsFromTheEnvironment) {
  ::setenv("AIKIDO_TLS", "1", 1);
  EXPECT_TRUE(TlsOptions::from_env().enabled);
  ::setenv("AIKIDO_TLS", "yes", 1);
  EXPECT_THROW(TlsOptions::from_env(), ConfigError);
  ::unsetenv("AIKIDO_TLS");
  ::setenv("AIKIDO_TLS_CERT", "/x.pem", 1);
  try {
    TlsOptions::from_env();
    FAIL() << "a certificate without key and CA was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("AIKIDO_TLS_KEY"), std::string::npos) << e.what();
  }
  ::setenv("AIKIDO_TLS_KEY", "/k.pem", 1);
  ::setenv("AIKIDO_TLS_CA", "/ca.pem", 1);
  const TlsOptions o = TlsOptions::from_env();
  EXPECT_TRUE(o.enabled);  // files turn it on
  EXPECT_EQ(o.ca_file, "/ca.pem");
  for (const char* name : {"AIKIDO_TLS_CERT", "AIKIDO_TLS_KEY", "AIKIDO_TLS_CA"}) ::unsetenv(name);
  EXPECT_FALSE(TlsOptions::from_env().enabled);
}

}  // namespace
}  // namespace aikido
