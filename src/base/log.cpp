#include "base/log.hpp"

#include <unistd.h>

#include "base/env.hpp"

namespace aikido::log {
namespace {

Level level_from_env() {
  auto value = env::get(env::kLogLevel);
  if (!value || *value == "warn") return Level::warn;
  if (*value == "error") return Level::error;
  if (*value == "info") return Level::info;
  if (*value == "debug") return Level::debug;
  // Logging cannot throw; Peer creation refuses the value (env::check_environment). Say it once here too, for
  // programs that log before or without a Peer.
  write(Level::warn, env::check_setting(env::kLogLevel, *value).value_or("") + " (logging at warn)");
  return Level::warn;
}

}  // namespace

bool enabled(Level level) {
  static const Level threshold = level_from_env();
  return level <= threshold;
}

void write(Level level, const std::string& message) {
  static const char* const kNames[] = {"error", "warn", "info", "debug"};
  std::string line = "[aikido ";
  line += kNames[int(level)];
  line += "] ";
  line += message;
  line += '\n';
  // One write() per line so that lines of concurrent threads do not interleave.
  [[maybe_unused]] ssize_t n = ::write(STDERR_FILENO, line.data(), line.size());
}

}  // namespace aikido::log
