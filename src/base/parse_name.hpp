// Parsing an enumeration's value from its name, with the error every such setting gives.
#pragma once

#include <initializer_list>
#include <string>
#include <string_view>

#include "base/error.hpp"

namespace aikido::detail {

/// The value of `values` whose name (`name_of`) is `name`; otherwise a ConfigError that names `what` and lists the
/// accepted names.
template <class E>
E parse_name(std::string_view name, std::initializer_list<E> values, const char* (*name_of)(E), const char* what) {
  std::string accepted;
  for (E value : values) {
    if (name == name_of(value)) return value;
    accepted += (accepted.empty() ? "" : ", ") + std::string(name_of(value));
  }
  throw ConfigError(str_cat("unknown ", what, " '", name, "'; use one of ", accepted));
}

}  // namespace aikido::detail
