#include "timeline.hpp"

#include <aikido/errors.hpp>
#include <filesystem>
#include <fstream>
#include <set>
#include <system_error>

#include "environment.hpp"
#include "output.hpp"

namespace aikido::run {
namespace {

// A short title for one of aikido-run's events on the trace.
std::string title_of(const nlohmann::json& e) {
  const std::string kind = e.value("event", "");
  if (kind == "cluster") {
    std::string by = e.value("by", "");
    return "cluster version " + std::to_string(e.value("version", 0)) + " (" + e.value("reason", "") +
           (by.empty() ? "" : " by " + by) + "): " + std::to_string(e.value("size", 0)) + " workers";
  }
  if (kind == "failure") return "worker " + std::to_string(e.value("id", 0)) + " " + e.value("what", "failed");
  if (kind == "recovery") return "recovered at cluster version " + std::to_string(e.value("version", 0));
  if (kind == "worker_started") return "worker " + std::to_string(e.value("id", 0)) + " started";
  if (kind == "worker_exited") return "worker " + std::to_string(e.value("id", 0)) + " exited";
  if (kind == "message") return e.value("text", "");
  return kind;
}

}  // namespace

void prepare_timeline(const std::string& path) {
  const std::filesystem::path parts = timeline_parts_dir(path);
  std::error_code error;
  std::filesystem::remove_all(parts, error);
  std::filesystem::create_directories(parts, error);
  if (error) {
    throw ConfigError("--timeline " + path + ": cannot create " + parts.string() + " (" + error.message() +
                      "); give a file in a folder aikido-run may write");
  }
}

bool write_timeline(const std::string& path, const JobEvents& events) {
  const std::filesystem::path parts = timeline_parts_dir(path);
  std::ofstream out(path, std::ios::trunc);
  if (!out) {
    report("aikido-run: --timeline " + path + ": cannot write it");
    return false;
  }
  out << "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n";
  bool first = true;
  const auto put = [&](const std::string& line) {
    out << (first ? "" : ",\n") << line;
    first = false;
  };
  put(nlohmann::json{
      {"ph", "M"}, {"name", "process_name"}, {"pid", kLauncherTracePid}, {"args", {{"name", "aikido-run"}}}}
          .dump());
  std::set<std::string> workers;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(parts, error)) {
    const std::string file = entry.path().filename().string();
    if (!file.starts_with("worker-") || !file.ends_with(".jsonl")) continue;
    const std::string id = file.substr(7, file.size() - 13);
    workers.insert(id);
    std::ifstream in(entry.path());
    for (std::string line; std::getline(in, line);) {
      if (!line.empty() && line.front() == '{' && line.back() == '}')
        put(line);  // a killed worker's last line may be cut
    }
  }
  for (const auto& id : workers) {
    put(nlohmann::json{
        {"ph", "M"}, {"name", "process_name"}, {"pid", std::stoll(id)}, {"args", {{"name", "worker " + id}}}}
            .dump());
    put(nlohmann::json{{"ph", "M"},
                       {"name", "process_sort_index"},
                       {"pid", std::stoll(id)},
                       {"args", {{"sort_index", std::stoll(id)}}}}
            .dump());
  }
  for (const auto& e : events.since(0)) {
    const std::string kind = e.value("event", "");
    nlohmann::json args = e;
    args.erase("time");
    args.erase("seq");
    nlohmann::json event = {{"ph", "i"},
                            {"s", kind == "message" ? "p" : "g"},  // job-wide events span every track
                            {"pid", kLauncherTracePid},
                            {"tid", 0},
                            {"ts", e.value("time", 0.0) * 1e6},
                            {"cat", kind == "cluster" || kind == "failure" || kind == "recovery" ? "elastic" : kind},
                            {"name", title_of(e)},
                            {"args", args}};
    put(event.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  }
  out << "\n]}\n";
  out.close();
  std::filesystem::remove_all(parts, error);
  if (!out) {
    report("aikido-run: --timeline " + path + ": writing it failed");
    return false;
  }
  report("aikido-run: timeline of " + std::to_string(workers.size()) + " worker" + (workers.size() == 1 ? "" : "s") +
         " written to " + path + " (open it in https://ui.perfetto.dev or chrome://tracing)");
  return true;
}

}  // namespace aikido::run
