#include <aikido/cluster_spec.hpp>
#include <aikido/errors.hpp>
#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <set>

#include "base/error.hpp"

namespace aikido {

using detail::str_cat;

namespace {

constexpr std::size_t kMaxLineBytes = 1024;

std::uint64_t parse_u64(std::string_view field, std::string_view value) {
  const std::string text(value);
  errno = 0;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(text.c_str(), &end, 10);
  if (text.empty() || text[0] == '-' || errno != 0 || *end != '\0') {
    throw ProtocolError(str_cat("cluster spec: ", field, " '", text, "' is not a non-negative integer"));
  }
  return v;
}

}  // namespace

int ClusterSpec::rank_of(std::uint64_t id) const {
  for (std::size_t i = 0; i < workers.size(); ++i) {
    if (workers[i].id == id) return int(i);
  }
  return -1;
}

void ClusterSpec::validate() const {
  const std::string where = str_cat("cluster spec version ", version, ": ");
  if (min_size < 1 || max_size < min_size || max_size > kMaxWorkers) {
    throw ConfigError(str_cat(where, "min size ", min_size, " and max size ", max_size,
                              " must satisfy 1 <= min <= max <= ", kMaxWorkers));
  }
  if (workers.empty()) throw ConfigError(where + "a cluster needs at least one worker");
  if (size() > max_size) {
    throw ConfigError(str_cat(where, size(), " workers exceed the maximum of ", max_size, " (--max-np)"));
  }
  std::set<std::uint64_t> ids;
  for (const auto& w : workers) {
    if (!ids.insert(w.id).second) throw ConfigError(str_cat(where, "worker id ", w.id, " appears twice"));
    if (w.id >= next_id) throw ConfigError(str_cat(where, "worker id ", w.id, " is not below next_id ", next_id));
    if (w.host.empty() || w.host.find_first_of(" \n") != std::string::npos) {
      throw ConfigError(str_cat(where, "worker ", w.id, " has an empty or malformed host name"));
    }
  }
  if (reason.find('\n') != std::string::npos) throw ConfigError(where + "the reason must be one line");
  if (requested_by.find('\n') != std::string::npos) throw ConfigError(where + "requested_by must be one line");
}

ClusterSpec ClusterSpec::resized(int n, const std::string& host, std::string why) const {
  if (n < min_size || n > max_size) {
    throw ConfigError(str_cat("cannot resize to ", n, " workers: the job allows ", min_size, " to ", max_size,
                              " (--min-np, --max-np)"));
  }
  ClusterSpec next = *this;
  next.version = version + 1;
  next.reason = std::move(why);
  next.requested_by.clear();
  if (n < size()) next.workers.resize(std::size_t(n));
  while (next.size() < n) next.workers.push_back({next.next_id++, host});
  next.validate();
  return next;
}

ClusterSpec ClusterSpec::without(const std::vector<std::uint64_t>& ids, std::string why) const {
  ClusterSpec next = *this;
  next.version = version + 1;
  next.reason = std::move(why);
  next.requested_by.clear();
  std::erase_if(next.workers,
                [&](const WorkerSpec& w) { return std::find(ids.begin(), ids.end(), w.id) != ids.end(); });
  return next;
}

ClusterSpec ClusterSpec::with_size(int n, std::string why) const {
  if (n < min_size || n > max_size) {
    throw ConfigError(str_cat("cannot resize to ", n, " workers: the job allows ", min_size, " to ", max_size,
                              " (--min-np, --max-np)"));
  }
  ClusterSpec next = *this;
  next.version = version + 1;
  next.reason = std::move(why);
  next.requested_by.clear();
  const std::vector<std::string> order = hosts();
  while (next.size() > n) {
    // The host with the most workers gives one up (the later host on a tie), its highest rank: hosts stay even and
    // each keeps a worker while there are enough, so a shrink never puts the whole job on one host that may be
    // failing; rank 0 goes last.
    const std::string* most = &order.back();
    for (auto h = order.rbegin(); h != order.rend(); ++h) {
      if (next.workers_on(*h) > next.workers_on(*most)) most = &*h;
    }
    for (auto w = next.workers.end(); w != next.workers.begin();) {
      if ((--w)->host == *most) {
        next.workers.erase(w);
        break;
      }
    }
  }
  while (next.size() < n) {
    const std::string* least = &order.front();
    for (const auto& h : order) {
      if (next.workers_on(h) < next.workers_on(*least)) least = &h;
    }
    next = next.with_workers_on(*least, 1, next.reason);
    next.version = version + 1;
  }
  next.validate();
  return next;
}

ClusterSpec ClusterSpec::with_workers_on(const std::string& host, int n, std::string why) const {
  ClusterSpec next = *this;
  next.version = version + 1;
  next.reason = std::move(why);
  next.requested_by.clear();
  auto after = next.workers.end();
  for (auto it = next.workers.begin(); it != next.workers.end(); ++it) {
    if (it->host == host) after = it + 1;
  }
  std::vector<WorkerSpec> added;
  for (int i = 0; i < n; ++i) added.push_back({next.next_id++, host});
  next.workers.insert(after, added.begin(), added.end());
  return next;
}

ClusterSpec ClusterSpec::without_host(const std::string& host, std::string why) const {
  ClusterSpec next = *this;
  next.version = version + 1;
  next.reason = std::move(why);
  next.requested_by.clear();
  std::erase_if(next.workers, [&](const WorkerSpec& w) { return w.host == host; });
  return next;
}

std::vector<std::string> ClusterSpec::hosts() const {
  std::vector<std::string> out;
  for (const auto& w : workers) {
    if (std::find(out.begin(), out.end(), w.host) == out.end()) out.push_back(w.host);
  }
  return out;
}

int ClusterSpec::workers_on(const std::string& host) const {
  return int(std::count_if(workers.begin(), workers.end(), [&](const WorkerSpec& w) { return w.host == host; }));
}

ClusterSpec::Diff ClusterSpec::diff(const ClusterSpec& next) const {
  Diff d;
  for (const auto& w : next.workers) {
    if (!contains(w.id)) d.added.push_back(w.id);
  }
  for (const auto& w : workers) {
    if (!next.contains(w.id)) d.removed.push_back(w.id);
  }
  return d;
}

std::string ClusterSpec::encode() const {
  std::string out = str_cat("version=", version, "\nmin=", min_size, "\nmax=", max_size, "\nnext_id=", next_id,
                            "\nreason=", reason, "\nproposed_ms=", proposed_unix_ms, "\n");
  if (!requested_by.empty()) out += str_cat("by=", requested_by, "\n");
  for (const auto& w : workers) out += str_cat("worker=", w.id, " ", w.host, "\n");
  return out;
}

ClusterSpec ClusterSpec::decode(std::string_view text) {
  ClusterSpec spec;
  spec.workers.clear();
  bool have_version = false;
  std::size_t begin = 0;
  while (begin < text.size()) {
    std::size_t end = text.find('\n', begin);
    if (end == std::string_view::npos) end = text.size();
    const std::string_view line = text.substr(begin, end - begin);
    begin = end + 1;
    if (line.empty()) continue;
    if (line.size() > kMaxLineBytes) throw ProtocolError("cluster spec: a line is too long");
    const auto eq = line.find('=');
    if (eq == std::string_view::npos) {
      throw ProtocolError(str_cat("cluster spec: line '", line, "' is not KEY=VALUE"));
    }
    const std::string_view key = line.substr(0, eq), value = line.substr(eq + 1);
    if (key == "version") {
      spec.version = parse_u64(key, value);
      have_version = true;
    } else if (key == "min") {
      spec.min_size = int(std::min<std::uint64_t>(parse_u64(key, value), 1u << 30));
    } else if (key == "max") {
      spec.max_size = int(std::min<std::uint64_t>(parse_u64(key, value), 1u << 30));
    } else if (key == "next_id") {
      spec.next_id = parse_u64(key, value);
    } else if (key == "reason") {
      spec.reason = std::string(value);
    } else if (key == "by") {
      spec.requested_by = std::string(value);
    } else if (key == "proposed_ms") {
      const std::uint64_t ms = parse_u64(key, value);
      // Above INT64_MAX the cast would wrap to a negative time that encode() writes and decode() refuses.
      if (ms > std::uint64_t(INT64_MAX))
        throw ProtocolError(str_cat("cluster spec: proposed_ms ", ms, " is too large"));
      spec.proposed_unix_ms = std::int64_t(ms);
    } else if (key == "worker") {
      if (spec.workers.size() >= std::size_t(kMaxWorkers)) throw ProtocolError("cluster spec: too many workers");
      const auto space = value.find(' ');
      if (space == std::string_view::npos) {
        throw ProtocolError(str_cat("cluster spec: worker line '", line, "' is not 'worker=ID HOST'"));
      }
      spec.workers.push_back({parse_u64("worker id", value.substr(0, space)), std::string(value.substr(space + 1))});
    } else {
      throw ProtocolError(str_cat("cluster spec: unknown key '", key, "'"));
    }
  }
  if (!have_version) throw ProtocolError("cluster spec: no version line");
  spec.validate();
  return spec;
}

std::string ClusterSpec::describe() const {
  std::string ids;
  for (const auto& w : workers) {
    if (!ids.empty()) ids += ' ';
    ids += std::to_string(w.id);
  }
  return str_cat("version ", version, " (", reason, "): ", size(), " worker", size() == 1 ? "" : "s", " [", ids,
                 "], min ", min_size, ", max ", max_size);
}

}  // namespace aikido
