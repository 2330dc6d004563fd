#include "etcd_server.hpp"

#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "elastic/etcd_client.hpp"
#include "transport/socket.hpp"

namespace aikido::testing {

namespace {

using namespace std::chrono_literals;

int free_port(const std::string& address) {
  if (address.rfind("127.", 0) == 0) {
    auto listener = transport::Listener::bind_tcp(address, 0);
    return listener.address().port;
  }
  // An emulated host has a port space of its own.
  static std::mt19937 random(std::random_device{}());
  return std::uniform_int_distribution<int>(30000, 50000)(random);
}

}  // namespace

bool EtcdServer::available() { return ::access("/usr/bin/etcd", X_OK) == 0; }

EtcdServer::EtcdServer(int members, std::string address, std::vector<std::string> wrapper)
    : EtcdServer(members, std::move(address), std::move(wrapper), Tls{}) {}

EtcdServer::EtcdServer(Tls tls) : EtcdServer(1, "127.0.0.1", {}, std::move(tls)) {}

EtcdServer::EtcdServer(int members, std::string address, std::vector<std::string> wrapper, Tls tls)
    : address_(std::move(address)), wrapper_(std::move(wrapper)), tls_(std::move(tls)) {
  char pattern[] = "/tmp/aikido-etcd-XXXXXX";
  if (::mkdtemp(pattern) == nullptr) throw std::runtime_error("mkdtemp failed");
  root_ = pattern;
  for (int i = 0; i < members; ++i) {
    Member m;
    m.name = "n" + std::to_string(i);
    m.client_port = free_port(address_);
    do {
      m.peer_port = free_port(address_);
    } while (m.peer_port == m.client_port);
    m.data_dir = root_ + "/" + m.name;
    members_.push_back(std::move(m));
  }
  start_all();
}

void EtcdServer::start_all() {
  const int members = int(members_.size());
  for (int i = 0; i < members; ++i) start(i, true);
  for (int i = 0; i < members; ++i) {
    if (!wait_healthy(i, 20s)) {
      const std::string text = log(i);
      throw std::runtime_error("etcd member " + std::to_string(i) + " did not become healthy; its log:\n" +
                               text.substr(text.size() > 4000 ? text.size() - 4000 : 0));
    }
  }
}

EtcdServer::~EtcdServer() {
  for (auto& m : members_) {
    if (m.process) {
      m.process->send_signal(SIGKILL);
      m.process->wait(5s);
    }
  }
  std::error_code ignored;
  std::filesystem::remove_all(root_, ignored);
}

void EtcdServer::start(int member, bool fresh) {
  Member& m = members_[std::size_t(member)];
  std::string cluster;
  for (const auto& other : members_) {
    cluster +=
        (cluster.empty() ? "" : ",") + other.name + "=http://" + address_ + ":" + std::to_string(other.peer_port);
  }
  const std::string client =
      (tls_.cert_file.empty() ? "http://" : "https://") + address_ + ":" + std::to_string(m.client_port);
  const std::string peer = "http://" + address_ + ":" + std::to_string(m.peer_port);
  std::ostringstream command;
  command << "exec /usr/bin/etcd --name " << m.name << " --data-dir " << m.data_dir << " --listen-client-urls "
          << client << " --advertise-client-urls " << client << " --listen-peer-urls " << peer
          << " --initial-advertise-peer-urls " << peer << " --initial-cluster " << cluster
          << " --initial-cluster-state " << (fresh ? "new" : "existing")
          << " --heartbeat-interval 10 --election-timeout 100";
  if (!tls_.cert_file.empty()) {
    command << " --cert-file " << tls_.cert_file << " --key-file " << tls_.key_file << " --trusted-ca-file "
            << tls_.ca_file << " --client-cert-auth";
  }
  command << " >>" << root_ << "/" << m.name << ".log 2>&1";
  std::vector<std::string> argv = wrapper_;
  for (const char* part : {"/bin/sh", "-c"}) argv.emplace_back(part);
  argv.push_back(command.str());
  m.process = std::make_unique<Subprocess>(argv);
}

std::string EtcdServer::endpoint(int member) const {
  return address_ + ":" + std::to_string(members_[std::size_t(member)].client_port);
}

std::vector<std::string> EtcdServer::endpoints() const {
  std::vector<std::string> out;
  for (int i = 0; i < members(); ++i) out.push_back(endpoint(i));
  return out;
}

std::string EtcdServer::url() const {
  std::string out = tls_.cert_file.empty() ? "etcd://" : "etcds://";
  for (int i = 0; i < members(); ++i) out += (i ? "," : "") + endpoint(i);
  return out;
}

void EtcdServer::kill(int member) {
  Member& m = members_[std::size_t(member)];
  if (!m.process) return;
  m.process->send_signal(SIGKILL);
  m.process->wait(5s);
  m.process.reset();
}

void EtcdServer::restart(int member) {
  kill(member);
  start(member, false);
  if (!wait_healthy(member, 20s))
    throw std::runtime_error("restarted etcd member did not become healthy:\n" + log(member));
}

bool EtcdServer::wait_healthy(int member, std::chrono::milliseconds timeout) const {
  EtcdOptions options;
  options.endpoints = {(tls_.cert_file.empty() ? "http://" : "https://") + endpoint(member)};
  options.ca_file = tls_.ca_file;
  options.cert_file = tls_.cert_file;  // the servers' certificate is a client certificate of the same CA too
  options.key_file = tls_.key_file;
  options.request_timeout = 500ms;
  options.unavailable_timeout = timeout;
  try {
    elastic::EtcdClient client(options);
    client.range("health-probe");
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

std::string EtcdServer::log(int member) const {
  std::ifstream in(root_ + "/" + members_[std::size_t(member)].name + ".log");
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace aikido::testing
