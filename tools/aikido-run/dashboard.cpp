#include "dashboard.hpp"

#include <httplib.h>
#include <unistd.h>

#include <aikido/errors.hpp>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace aikido::run {
namespace {

bool is_file(const std::string& path) { return std::filesystem::is_regular_file(path); }

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

std::string self_dir() {
  char buffer[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buffer, sizeof buffer - 1);
  if (n <= 0) return ".";
  return std::filesystem::path(std::string(buffer, std::size_t(n))).parent_path().string();
}

}  // namespace

std::string dashboard_web_dir() {
  for (const std::string& dir :
       {self_dir() + "/../share/aikido/web", std::string(AIKIDO_WEB_INSTALL_DIR), std::string(AIKIDO_WEB_SOURCE_DIR)}) {
    if (is_file(dir + "/index.html")) return dir;
  }
  return {};
}

Dashboard::Dashboard(const std::string& address, int port) : address_(address) {
  web_dir_ = dashboard_web_dir();
  if (web_dir_.empty()) {
    throw ConfigError(std::string("--dashboard: the page's files (index.html) are not installed in ") +
                      AIKIDO_WEB_INSTALL_DIR + "; reinstall aikido (cmake --install)");
  }
  chart_js_ = AIKIDO_CHART_JS;
  if (!is_file(chart_js_)) {
    throw ConfigError("--dashboard: the chart library " + chart_js_ +
                      " is missing; install Debian's libjs-chart.js (scripts/setup.sh does)");
  }
  server_ = std::make_unique<httplib::Server>();
  const auto serve_file = [this](const std::string& path, const char* type) {
    return [this, path, type](const httplib::Request&, httplib::Response& response) {
      // Read at each request: an edited page shows at the next reload.
      response.set_content(read_file(path.front() == '/' ? path : web_dir_ + "/" + path), type);
      response.set_header("Cache-Control", "no-store");
    };
  };
  server_->Get("/", serve_file("index.html", "text/html; charset=utf-8"));
  server_->Get("/app.js", serve_file("app.js", "text/javascript; charset=utf-8"));
  server_->Get("/style.css", serve_file("style.css", "text/css; charset=utf-8"));
  server_->Get("/chart.js", serve_file(chart_js_, "text/javascript; charset=utf-8"));
  server_->Get("/events", [this](const httplib::Request& request, httplib::Response& response) {
    response.set_header("Cache-Control", "no-store");
    // Each record's id is its index: a browser that reconnects (EventSource does by itself) names the last one it
    // got in Last-Event-ID and continues after it instead of receiving everything twice.
    auto next = std::make_shared<std::size_t>(0);
    const std::string last_id = request.get_header_value("Last-Event-ID");
    if (!last_id.empty() && last_id.size() < 20 && last_id.find_first_not_of("0123456789") == std::string::npos) {
      *next = std::stoull(last_id) + 1;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++open_streams_;
    }
    const auto closed = [this](bool) {
      std::lock_guard<std::mutex> lock(mutex_);
      --open_streams_;
      streams_closed_.notify_all();
    };
    response.set_chunked_content_provider(
        "text/event-stream",
        [this, next](std::size_t, httplib::DataSink& sink) {
          std::unique_lock<std::mutex> lock(mutex_);
          // A comment line every 15 s keeps proxies and the browser from closing an idle stream.
          added_.wait_for(lock, std::chrono::seconds(15), [&] { return stopping_ || *next < records_.size(); });
          // Records added just before the stop (the job's end) still go out, then the stream ends normally.
          const bool stopping = stopping_;
          std::string out;
          for (; *next < records_.size(); ++*next) {
            out += "id: " + std::to_string(*next) + "\ndata: " + records_[*next] + "\n\n";
          }
          lock.unlock();
          if (out.empty() && !stopping) out = ": idle\n\n";
          if (!out.empty() && !sink.write(out.data(), out.size())) return false;
          if (stopping) sink.done();
          return true;
        },
        closed);
  });
  server_->set_keep_alive_max_count(1000);
  if (port == 0) {
    port_ = server_->bind_to_any_port(address_);
  } else if (server_->bind_to_port(address_, port)) {
    port_ = port;
  }
  if (port_ <= 0) {
    throw ConfigError("--dashboard " + std::to_string(port) + ": cannot listen on " + address_ + ":" +
                      std::to_string(port) + " (in use, or not an address of this host); try --dashboard 0");
  }
  thread_ = std::thread([this] { server_->listen_after_bind(); });
}

Dashboard::~Dashboard() {
  {
    std::unique_lock<std::mutex> lock(mutex_);
    stopping_ = true;
    added_.notify_all();
    // Every open stream sends what it has not sent yet (the job's last records: its end) and ends: the server's
    // stop would cut a stream that is between two writes. A client that does not read is not waited for long.
    streams_closed_.wait_for(lock, std::chrono::seconds(2), [&] { return open_streams_ == 0; });
  }
  server_->stop();
  if (thread_.joinable()) thread_.join();
}

std::string Dashboard::url() const { return "http://" + address_ + ":" + std::to_string(port_) + "/"; }

void Dashboard::add(const nlohmann::json& record) {
  std::string text = record.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    records_.push_back(std::move(text));
  }
  added_.notify_all();
}

}  // namespace aikido::run
