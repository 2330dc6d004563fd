// Minimal leveled logging to stderr (AIKIDO_LOG_LEVEL). One line per call, written atomically.
#pragma once

#include <string>

#include "base/error.hpp"

namespace aikido::log {

enum class Level { error = 0, warn = 1, info = 2, debug = 3 };

bool enabled(Level level);
void write(Level level, const std::string& message);

template <class... Args>
void warn(const Args&... args) {
  if (enabled(Level::warn)) write(Level::warn, detail::str_cat(args...));
}
template <class... Args>
void info(const Args&... args) {
  if (enabled(Level::info)) write(Level::info, detail::str_cat(args...));
}
template <class... Args>
void debug(const Args&... args) {
  if (enabled(Level::debug)) write(Level::debug, detail::str_cat(args...));
}

}  // namespace aikido::log
