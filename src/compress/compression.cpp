// The Compression value (include/aikido/compression.hpp): parsing, names and the wire estimate policies use.
#include <aikido/compression.hpp>
#include <aikido/errors.hpp>
#include <algorithm>
#include <cmath>
#include <sstream>

#include "base/error.hpp"
#include "compress/codecs.hpp"

namespace aikido {

using detail::str_cat;

namespace {
constexpr const char* kAccepted = "none, fp16, bf16, int8, topk:FRACTION (0 < FRACTION <= 1) or powersgd:RANK (>= 1)";
}

Compression Compression::topk(double fraction) {
  if (!(fraction > 0 && fraction <= 1)) {
    throw ConfigError(str_cat("compression topk:", fraction, ": the fraction must be in (0, 1], e.g. topk:0.01"));
  }
  return {Kind::topk, fraction, 0};
}

Compression Compression::powersgd(int rank) {
  if (rank < 1)
    throw ConfigError(str_cat("compression powersgd:", rank, ": the rank must be 1 or more, e.g. powersgd:4"));
  return {Kind::powersgd, 0, rank};
}

Compression Compression::parse(std::string_view text) {
  if (text == "none") return none();
  if (text == "fp16") return fp16();
  if (text == "bf16") return bf16();
  if (text == "int8") return int8();
  const auto colon = text.find(':');
  const std::string_view kind = text.substr(0, colon);
  const std::string value(colon == std::string_view::npos ? std::string_view() : text.substr(colon + 1));
  if (kind == "topk" || kind == "powersgd") {
    std::size_t used = 0;
    try {
      if (kind == "topk") {
        const double fraction = std::stod(value, &used);
        if (used == value.size()) return topk(fraction);
      } else {
        const long rank = std::stol(value, &used);
        if (used == value.size() && rank <= 1 << 20) return powersgd(static_cast<int>(rank));
      }
    } catch (const ConfigError&) {
      throw;
    } catch (const std::exception&) {
    }
  }
  throw ConfigError(str_cat("unknown compression '", text, "': use ", kAccepted));
}

std::string Compression::name() const {
  switch (kind) {
    case Kind::none:
      return "none";
    case Kind::fp16:
      return "fp16";
    case Kind::bf16:
      return "bf16";
    case Kind::int8:
      return "int8";
    case Kind::topk: {
      std::ostringstream os;
      os << "topk:" << fraction;
      return os.str();
    }
    case Kind::powersgd:
      return str_cat("powersgd:", rank);
  }
  return "unknown";
}

double Compression::wire_ratio(int workers, std::int64_t count) const {
  const double n = std::max(2, workers);
  const double c = static_cast<double>(std::max<std::int64_t>(count, 1));
  const double dense = 2 * (n - 1) / n * 4 * c;  // ring allreduce of float32
  switch (kind) {
    case Kind::none:
      return 1;
    case Kind::fp16:
    case Kind::bf16:
      return 0.5;
    case Kind::int8:
      return (n - 1) * static_cast<double>(compress::int8_encoded_bytes(static_cast<std::size_t>(c))) / dense;
    case Kind::topk:
      return (n - 1) * 8.0 * static_cast<double>(compress::topk_count(static_cast<std::size_t>(c), fraction)) / dense;
    case Kind::powersgd: {
      const double side = std::sqrt(c);
      return std::min(1.0, 2 * side * rank / c);  // P and Q of a square matrix, both averaged by allreduce
    }
  }
  return 1;
}

}  // namespace aikido
