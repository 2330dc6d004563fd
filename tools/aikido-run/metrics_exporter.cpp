#include "metrics_exporter.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <aikido/elastic.hpp>
#include <aikido/errors.hpp>
#include <aikido/etcd.hpp>
#include <aikido/metrics.hpp>
#include <aikido/store.hpp>
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "events.hpp"

namespace aikido::run {

namespace {

void write_all(int fd, const std::string& text) {
  std::size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    done += std::size_t(n);
  }
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string format(const char* fmt, double v) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, fmt, v);
  return buffer;
}

}  // namespace

// Every worker's Prometheus text as one exposition: each metric family once, with its HELP and TYPE lines, then its
// samples from every worker (the format wants a family's lines together).
std::string merge_prometheus(const std::vector<std::string>& texts) {
  std::vector<std::string> order;
  std::map<std::string, std::pair<std::string, std::string>> families;  // name -> (HELP and TYPE lines, samples)
  for (const auto& text : texts) {
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) {
      if (line.empty()) continue;
      const bool comment = line.rfind("# HELP ", 0) == 0 || line.rfind("# TYPE ", 0) == 0;
      if (line[0] == '#' && !comment) continue;
      const std::size_t name_at = comment ? 7 : 0;
      const std::string name = line.substr(name_at, line.find_first_of("{ ", name_at) - name_at);
      auto [it, fresh] = families.try_emplace(name);
      if (fresh) order.push_back(name);
      if (!comment) {
        it->second.second += line + "\n";
      } else if (it->second.first.find(line.substr(0, 7)) == std::string::npos) {
        it->second.first += line + "\n";
      }
    }
  }
  std::string out;
  for (const auto& name : order) out += families[name].first + families[name].second;
  return out;
}

std::string job_prometheus(const std::vector<nlohmann::json>& events) {
  double version = 0, size = 0;
  bool running = false;
  // Every kind is served from the start, at 0: a counter that appears only at its first event hides that event from
  // increase() and changes().
  std::map<std::string, int> counts = {{"resize", 0},   {"restart", 0},    {"lost", 0},  {"failure", 0},
                                       {"recovery", 0}, {"checkpoint", 0}, {"policy", 0}};
  for (const auto& e : events) {
    const std::string kind = e.value("event", "");
    if (kind == "job_started") {
      running = true;
      size = e.value("workers", 0.0);
    } else if (kind == "job_finished") {
      running = false;
    } else if (kind == "cluster") {
      version = e.value("version", 0.0);
      size = e.value("size", 0.0);
      const std::string reason = e.value("reason", "");
      if (reason == "resize" || reason == "restart" || reason == "lost") ++counts[reason];
    } else if (counts.contains(kind)) {
      ++counts[kind];
    }
  }
  std::string out =
      "# HELP aikido_job_cluster_version version of the job's latest cluster (0 for a job that is not elastic)\n"
      "# TYPE aikido_job_cluster_version gauge\naikido_job_cluster_version " +
      format("%.0f", version) +
      "\n# HELP aikido_job_cluster_size workers in the job's latest cluster\n"
      "# TYPE aikido_job_cluster_size gauge\naikido_job_cluster_size " +
      format("%.0f", size) +
      "\n# HELP aikido_job_running 1 while the job's workers run, 0 once it finished or failed\n"
      "# TYPE aikido_job_running gauge\naikido_job_running " +
      (running ? "1" : "0") +
      "\n# HELP aikido_job_events_total events of the job by kind (a resize asked by aikido-ctl or a policy, a "
      "restart, a lost worker, a failure, a recovery, a checkpoint, a policy decision)\n"
      "# TYPE aikido_job_events_total counter\n";
  for (const auto& [kind, count] : counts) {
    out += "aikido_job_events_total{kind=\"" + kind + "\"} " + std::to_string(count) + "\n";
  }
  return out;
}

std::optional<std::string> summarize_metrics(int rank, std::string_view json_text) {
  const auto j = nlohmann::json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return std::nullopt;
  // A worker's publication is read as untrusted: a field of another type counts as absent.
  const auto num = [](const nlohmann::json& object, const char* key) {
    const auto it = object.find(key);
    return it != object.end() && it->is_number() ? it->get<double>() : NAN;
  };
  std::string s = "aikido-run: metrics of rank " + std::to_string(rank) + ": " + format("%.0f", num(j, "step")) +
                  " steps, " + format("%.0f", num(j, "samples_per_second")) + " samples/s, step " +
                  format("%.2f", num(j, "step_seconds") * 1e3) + " ms (compute " +
                  format("%.2f", num(j, "compute_seconds") * 1e3) + ", waiting for communication " +
                  format("%.2f", num(j, "wait_seconds") * 1e3) + ")";
  if (!std::isnan(num(j, "noise_scale"))) s += ", noise scale " + format("%.1f", num(j, "noise_scale"));
  if (!std::isnan(num(j, "snr"))) s += ", SNR " + format("%.3g", num(j, "snr"));
  const auto links = j.find("links");
  if (links != j.end() && links->is_array()) {
    for (const auto& link : *links) {
      if (!link.is_object()) continue;
      const double peer = num(link, "peer"), latency = num(link, "latency_seconds"),
                   bandwidth = num(link, "bandwidth_bytes_per_second");
      if (std::isnan(peer) || std::isnan(latency) || std::isnan(bandwidth)) continue;
      s += ", link to rank " + format("%.0f", peer) + " " + format("%.0f", latency * 1e6) + " us " +
           format("%.2f", bandwidth / 1e9) + " GB/s";
    }
  }
  return s;
}

MetricsExporter::MetricsExporter(Config config) : config_(std::move(config)) {
  prometheus_.resize(config_.workers);
  json_.resize(config_.workers);
  const std::string url =
      config_.store_address.find("://") == std::string::npos ? "tcp://" + config_.store_address : config_.store_address;
  store_ = connect_store(url, config_.secret, std::chrono::milliseconds(10'000), config_.tls);
  if (config_.elastic) {
    // Across hosts the membership is etcd's (one key and its watch); on one host, keys of aikido-run's store.
    membership_ = url.starts_with("etcd")
                      ? make_etcd_membership(etcd_options_from_env(url, std::chrono::seconds(10)), config_.job_id)
                      : make_membership_store(store_, config_.job_id);
  }
  if (config_.file) {
    file_fd_ = ::open(config_.file->c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (file_fd_ < 0) {
      throw ConfigError("--metrics-file: cannot open '" + *config_.file + "': " + std::strerror(errno));
    }
  }
  if (config_.port) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<std::uint16_t>(*config_.port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(listen_fd_, 16) != 0) {
      const std::string reason = std::strerror(errno);
      ::close(listen_fd_);
      if (file_fd_ >= 0) ::close(file_fd_);
      throw ConfigError("--metrics-port " + std::to_string(*config_.port) + ": cannot listen on 127.0.0.1: " + reason);
    }
    socklen_t len = sizeof addr;
    ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    server_ = std::thread([this] { serve_loop(); });
  }
  poller_ = std::thread([this] { poll_loop(); });
}

MetricsExporter::~MetricsExporter() {
  stopping_ = true;
  if (poller_.joinable()) poller_.join();
  if (server_.joinable()) server_.join();
  if (listen_fd_ >= 0) ::close(listen_fd_);
  if (file_fd_ >= 0) ::close(file_fd_);
}

// Reads every worker's latest metrics; appends the ones that changed to the file. In an elastic job, ranks beyond
// the latest cluster version's size are forgotten, in the store too: their workers left, and their last values would
// show a worker that no longer trains (or, after a later grow, stand for the new worker of that rank).
void MetricsExporter::poll() {
  int ranks = config_.workers;
  if (membership_) {
    try {
      if (auto spec = membership_->latest()) ranks = std::min(ranks, spec->size());
      // Only ranks that once trained can have keys to empty (not every rank up to --max-np, every interval).
      for (int rank = ranks; rank < highest_served_; ++rank) {
        for (const auto& key : {metrics_key_prometheus(config_.job_id, rank), metrics_key_json(config_.job_id, rank)}) {
          if (auto value = store_->get(key); value && !value->empty()) store_->set(key, "");
        }
      }
    } catch (const std::exception&) {
      return;  // the store is gone: the job is ending
    }
    std::lock_guard<std::mutex> lock(mutex_);
    for (int rank = ranks; rank < highest_served_; ++rank) {
      prometheus_[rank].clear();
      json_[rank].clear();
    }
    highest_served_ = std::max(highest_served_, ranks);
  }
  for (int rank = 0; rank < ranks; ++rank) {
    std::optional<std::string> prom, json;
    try {
      prom = store_->get(metrics_key_prometheus(config_.job_id, rank));
      json = store_->get(metrics_key_json(config_.job_id, rank));
    } catch (const std::exception&) {
      return;  // the store is gone: the job is ending
    }
    std::unique_lock<std::mutex> lock(mutex_);
    if (prom) prometheus_[rank] = *prom;
    if (json && *json != json_[rank]) {
      json_[rank] = *json;
      if (json->size() <= 1) continue;
      const std::string line = "{\"time\":" + format("%.3f", now_seconds()) + "," + json->substr(1);
      if (file_fd_ >= 0) write_all(file_fd_, line + "\n");
      lock.unlock();
      if (config_.on_record || config_.events) {
        try {
          record(nlohmann::json::parse(line));
        } catch (const std::exception&) {  // a worker of another version's format: not shown
        }
      }
    }
  }
}

void MetricsExporter::record(const nlohmann::json& metrics) {
  if (config_.on_record) config_.on_record(metrics);
  if (!config_.events || !metrics.contains("decisions") || !metrics["decisions"].is_array()) return;
  // Every worker publishes the same decisions: each is recorded once.
  for (const auto& d : metrics["decisions"]) {
    const std::string key = d.dump();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!decisions_seen_.insert(key).second) continue;
    }
    nlohmann::json e = d;
    e["text"] = "policy " + d.value("policy", "") + " changed " + d.value("setting", "") + " from " +
                d.value("from", "") + " to " + d.value("to", "") + " at step " + std::to_string(d.value("step", 0));
    config_.events->emit("policy", std::move(e));
  }
}

void MetricsExporter::write_record(const nlohmann::json& record) {
  if (file_fd_ < 0) return;
  const std::string line = record.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  std::lock_guard<std::mutex> lock(mutex_);
  write_all(file_fd_, line);
}

void MetricsExporter::poll_loop() {
  const auto interval = std::chrono::duration<double>(config_.interval_seconds);
  auto next = std::chrono::steady_clock::now();
  while (!stopping_) {
    poll();
    next += std::chrono::duration_cast<std::chrono::steady_clock::duration>(interval);
    while (!stopping_ && std::chrono::steady_clock::now() < next) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
}

void MetricsExporter::serve_loop() {
  while (!stopping_) {
    pollfd p{listen_fd_, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    answer(fd);
    ::close(fd);
  }
}

// One HTTP/1.0 exchange: GET /metrics (or /) gets every worker's metrics; anything else 404.
void MetricsExporter::answer(int fd) {
  timeval tv{2, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::string request;
  char buffer[1024];
  while (request.find("\r\n\r\n") == std::string::npos && request.find("\n\n") == std::string::npos &&
         request.size() < 8192) {
    const ssize_t n = ::recv(fd, buffer, sizeof buffer, 0);
    if (n <= 0) break;
    request.append(buffer, std::size_t(n));
  }
  const auto line_end = request.find_first_of("\r\n");
  const std::string line = request.substr(0, line_end);
  std::string status = "200 OK", body;
  if (line.rfind("GET /metrics ", 0) == 0 || line.rfind("GET / ", 0) == 0) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      body = "# Aikido training metrics, one series per worker (label rank)\n" + merge_prometheus(prometheus_);
    }
    // Outside mutex_: the event log calls write_record (which takes mutex_) under its own lock.
    if (config_.events) body += job_prometheus(config_.events->since(0));
  } else {
    status = "404 Not Found";
    body = "not found: GET /metrics\n";
  }
  write_all(fd, "HTTP/1.0 " + status + "\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: " +
                    std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body);
}

std::vector<std::string> MetricsExporter::finish() {
  stopping_ = true;
  if (poller_.joinable()) poller_.join();
  poll();
  std::vector<std::string> summary;
  std::lock_guard<std::mutex> lock(mutex_);
  for (int rank = 0; rank < config_.workers; ++rank) {
    if (json_[rank].empty()) continue;
    if (auto line = summarize_metrics(rank, json_[rank])) summary.push_back(*line);
  }
  return summary;
}

}  // namespace aikido::run
