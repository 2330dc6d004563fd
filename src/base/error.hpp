// Internal helpers around the public error model (include/aikido/errors.hpp).
#pragma once

#include <aikido/errors.hpp>
#include <chrono>
#include <sstream>
#include <string>
#include <vector>

namespace aikido::detail {

[[noreturn]] void throw_enforce(const char* file, int line, const char* condition, const std::string& message);
/// Throws Error with strerror(errno) appended.
[[noreturn]] void throw_system(const std::string& what);

template <class... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

/// For error messages: "1.5 s".
std::string seconds(std::chrono::milliseconds ms);
/// For error messages: "0, 2, 3".
std::string rank_list(const std::vector<int>& ranks);

}  // namespace aikido::detail

/// Invariant check: throws aikido::Error with file and line; never aborts.
#define AIKIDO_ENFORCE(cond, ...)                                                                \
  do {                                                                                           \
    if (!(cond))                                                                                 \
      ::aikido::detail::throw_enforce(__FILE__, __LINE__, #cond,                                 \
                                      ::aikido::detail::str_cat("" __VA_OPT__(, ) __VA_ARGS__)); \
  } while (0)
