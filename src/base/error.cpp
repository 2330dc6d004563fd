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

}  // namespace aikido::detail
