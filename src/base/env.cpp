#include "base/env.hpp"

#include <sched.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>

#include "base/error.hpp"

namespace aikido::env {

std::optional<std::string> get(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return std::nullopt;
  return std::string(value);
}

std::int64_t get_int(const char* name, std::int64_t fallback, std::int64_t min, std::int64_t max) {
  auto value = get(name);
  if (!value) return fallback;
  errno = 0;
  char* end = nullptr;
  const long long parsed = std::strtoll(value->c_str(), &end, 10);
  if (errno != 0 || end == value->c_str() || *end != '\0' || parsed < min || parsed > max) {
    throw ConfigError(
        detail::str_cat(name, "='", *value, "' is not an integer in [", min, ", ", max, "]; fix or unset it"));
  }
  return parsed;
}

std::chrono::milliseconds get_seconds(const char* name, std::chrono::milliseconds fallback) {
  auto value = get(name);
  if (!value) return fallback;
  errno = 0;
  char* end = nullptr;
  const double seconds = std::strtod(value->c_str(), &end);
  if (errno != 0 || end == value->c_str() || *end != '\0' || !(seconds > 0) || !std::isfinite(seconds)) {
    throw ConfigError(detail::str_cat(name, "='", *value, "' is not a positive number of seconds; fix or unset it"));
  }
  return std::chrono::milliseconds(std::max<std::int64_t>(1, std::llround(seconds * 1000.0)));
}

int local_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  const int own = ::sched_getaffinity(0, sizeof set, &set) == 0 ? std::max(1, CPU_COUNT(&set)) : 1;
  return int(get_int(kLocalCpus, own, 1, 1 << 20));
}

}  // namespace aikido::env
