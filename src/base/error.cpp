#include "base/error.hpp"

#include <cerrno>
#include <cstring>

namespace aikido::detail {

void throw_enforce(const char* file, int line, const char* condition, const std::string& message) {
  throw Error(
      str_cat("internal check failed: ", condition, " at ", file, ":", line, message.empty() ? "" : ": ", message));
}

void throw_system(const std::string& what) {
  const int err = errno;
  throw Error(str_cat(what, ": ", std::strerror(err)));
}

std::string seconds(std::chrono::milliseconds ms) { return str_cat(double(ms.count()) / 1000.0, " s"); }

std::string rank_list(const std::vector<int>& ranks) {
  std::string out;
  for (std::size_t i = 0; i < ranks.size(); ++i) out += (i ? ", " : "") + std::to_string(ranks[i]);
  return out;
}

}  // namespace aikido::detail
