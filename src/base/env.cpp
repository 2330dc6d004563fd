#include "base/env.hpp"

#include <sched.h>

#include <aikido/peer.hpp>
#include <aikido/types.hpp>
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "base/error.hpp"

extern char** environ;

namespace aikido::env {
namespace {

std::optional<std::int64_t> parse_int(const std::string& value, std::int64_t min, std::int64_t max) {
  errno = 0;
  char* end = nullptr;
  const long long parsed = std::strtoll(value.c_str(), &end, 10);
  if (errno != 0 || end == value.c_str() || *end != '\0' || parsed < min || parsed > max) return std::nullopt;
  return parsed;
}

std::optional<double> parse_seconds(const std::string& value) {
  errno = 0;
  char* end = nullptr;
  const double seconds = std::strtod(value.c_str(), &end);
  if (errno != 0 || end == value.c_str() || *end != '\0' || !(seconds > 0) || !std::isfinite(seconds)) {
    return std::nullopt;
  }
  return seconds;
}

std::string int_problem(const char* name, const std::string& value, std::int64_t min, std::int64_t max) {
  return detail::str_cat(name, "='", value, "' is not an integer in [", min, ", ", max, "]; fix or unset it");
}

std::string seconds_problem(const char* name, const std::string& value) {
  return detail::str_cat(name, "='", value, "' is not a positive number of seconds; fix or unset it");
}

// How each setting is checked: its accepted values, as its reader parses them.
struct Rule {
  const char* name;
  std::function<std::optional<std::string>(const std::string& value)> check;
};

std::function<std::optional<std::string>(const std::string&)> integer(const char* name, std::int64_t min,
                                                                      std::int64_t max) {
  return [=](const std::string& value) -> std::optional<std::string> {
    if (parse_int(value, min, max)) return std::nullopt;
    return int_problem(name, value, min, max);
  };
}

std::function<std::optional<std::string>(const std::string&)> seconds(const char* name) {
  return [=](const std::string& value) -> std::optional<std::string> {
    if (parse_seconds(value)) return std::nullopt;
    return seconds_problem(name, value);
  };
}

std::function<std::optional<std::string>(const std::string&)> one_of(const char* name,
                                                                     std::vector<std::string> choices) {
  return [=](const std::string& value) -> std::optional<std::string> {
    if (std::find(choices.begin(), choices.end(), value) != choices.end()) return std::nullopt;
    std::string list;
    for (std::size_t i = 0; i < choices.size(); ++i) {
      list += i == 0 ? "" : (i + 1 == choices.size() ? " or " : ", ");
      list += choices[i];
    }
    return detail::str_cat(name, "='", value, "' is not ", list, "; fix or unset it");
  };
}

// A parser of the public API that throws ConfigError with its own message.
template <class Parse>
std::function<std::optional<std::string>(const std::string&)> parsed_by(const char* name, Parse parse) {
  return [=](const std::string& value) -> std::optional<std::string> {
    try {
      parse(value);
      return std::nullopt;
    } catch (const ConfigError& e) {
      return detail::str_cat(name, "='", value, "': ", e.what());
    }
  };
}

std::function<std::optional<std::string>(const std::string&)> store_address(const char* name) {
  return [=](const std::string& value) -> std::optional<std::string> {
    const auto colon = value.rfind(':');
    if (colon != std::string::npos && colon > 0 && parse_int(value.substr(colon + 1), 1, 65535)) return std::nullopt;
    return detail::str_cat(name, "='", value, "' is not HOST:PORT (aikido-run sets it); fix or unset it");
  };
}

const std::vector<Rule>& rules() {
  static const std::vector<Rule> kRules = {
      {kRank, integer(kRank, 0, 1 << 20)},
      {kSize, integer(kSize, 1, 1 << 20)},
      {kLocalRank, integer(kLocalRank, 0, 1 << 20)},
      {kLocalSize, integer(kLocalSize, 1, 1 << 20)},
      {kLocalCpus, integer(kLocalCpus, 1, 1 << 20)},
      {kAutoThreads, one_of(kAutoThreads, {"0", "1"})},
      {kStoreAddr, store_address(kStoreAddr)},
      {kClusterVersion, integer(kClusterVersion, 0, INT64_MAX)},
      {kTopology, parsed_by(kTopology, [](const std::string& v) { parse_topology(v); })},
      {kTransport, parsed_by(kTransport, [](const std::string& v) { parse_transport(v); })},
      {kTimeout, seconds(kTimeout)},
      {kConnectTimeout, seconds(kConnectTimeout)},
      {kStoreTimeout, seconds(kStoreTimeout)},
      {kSegmentBytes,
       [](const std::string& value) -> std::optional<std::string> {
         if (value == "0" || parse_int(value, kMinSegmentBytes, kMaxSegmentBytes)) return std::nullopt;
         return detail::str_cat(int_problem(kSegmentBytes, value, kMinSegmentBytes, kMaxSegmentBytes),
                                " (or 0: chosen per link)");
       }},
      {kStreams, integer(kStreams, 0, 8)},
      {kLogLevel, one_of(kLogLevel, {"error", "warn", "info", "debug"})},
      {kMetricsInterval, seconds(kMetricsInterval)},
      {kElastic, one_of(kElastic, {"0", "1"})},
      {kTls, one_of(kTls, {"0", "1"})},
      {kConsoleTty, one_of(kConsoleTty, {"0", "1"})},
      {kWorkerId, integer(kWorkerId, 0, INT64_MAX)},
  };
  return kRules;
}

}  // namespace

std::optional<std::string> get(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return std::nullopt;
  return std::string(value);
}

std::int64_t get_int(const char* name, std::int64_t fallback, std::int64_t min, std::int64_t max) {
  auto value = get(name);
  if (!value) return fallback;
  const auto parsed = parse_int(*value, min, max);
  if (!parsed) throw ConfigError(int_problem(name, *value, min, max));
  return *parsed;
}

std::chrono::milliseconds get_seconds(const char* name, std::chrono::milliseconds fallback) {
  auto value = get(name);
  if (!value) return fallback;
  const auto seconds = parse_seconds(*value);
  if (!seconds) throw ConfigError(seconds_problem(name, *value));
  return std::chrono::milliseconds(std::max<std::int64_t>(1, std::llround(*seconds * 1000.0)));
}

int local_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  const int own = ::sched_getaffinity(0, sizeof set, &set) == 0 ? std::max(1, CPU_COUNT(&set)) : 1;
  return int(get_int(kLocalCpus, own, 1, 1 << 20));
}

std::optional<std::string> check_setting(std::string_view name, std::string_view value) {
  if (value.empty()) return std::nullopt;
  for (const auto& rule : rules()) {
    if (name == rule.name) return rule.check(std::string(value));
  }
  return std::nullopt;
}

void check_environment() {
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string_view entry = *e;
    if (!entry.starts_with("AIKIDO_")) continue;
    const auto eq = entry.find('=');
    if (eq == std::string_view::npos) continue;
    if (auto problem = check_setting(entry.substr(0, eq), entry.substr(eq + 1))) throw ConfigError(*problem);
  }
}

}  // namespace aikido::env
