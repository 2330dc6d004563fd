// What aikido-bench and the reference programs in bench/ (OpenMPI, Gloo) share, so that their numbers compare:
// the flags, the size list, the timing method, the statistics and the output lines. Standard library only: the
// reference programs include it without linking Aikido.
//
// Timing method (the same in every program):
//   - each iteration starts with a barrier, then every rank times its own collective with a steady clock;
//   - the time of iteration k is the maximum over ranks of the per-rank times of iteration k (one allreduce with
//     max over the vector of per-rank times, after the loop, so the timed loop runs nothing else);
//   - per size we report the median and the minimum of those per-iteration times, the algorithm bandwidth
//     algbw = bytes / median time and the bus bandwidth busbw = algbw * 2(n-1)/n (what each rank's links carry in
//     a bandwidth-optimal allreduce; comparable across rank counts, as in nccl-tests).
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <cinttypes>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace aikido::bench {

/// A bad command line: the programs print the message and exit with status 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline constexpr const char* kDefaultSizes = "4K,64K,1M,16M,64M";

/// "4096", "4K", "4KiB", "64M", "1G" (binary multiples, case-insensitive suffix) -> bytes.
inline std::size_t parse_size(std::string_view text) {
  const std::string original(text);
  std::size_t digits = 0;
  while (digits < text.size() && text[digits] >= '0' && text[digits] <= '9') ++digits;
  if (digits == 0 || digits > 15) {
    throw UsageError("bad size '" + original + "': expected a number with an optional K, M or G suffix, e.g. 64K");
  }
  const std::uint64_t number = std::stoull(std::string(text.substr(0, digits)));
  std::string suffix(text.substr(digits));
  for (char& c : suffix) c = char(std::toupper(static_cast<unsigned char>(c)));
  std::uint64_t unit = 1;
  if (suffix.empty() || suffix == "B") {
    unit = 1;
  } else if (suffix == "K" || suffix == "KB" || suffix == "KIB") {
    unit = std::uint64_t(1) << 10;
  } else if (suffix == "M" || suffix == "MB" || suffix == "MIB") {
    unit = std::uint64_t(1) << 20;
  } else if (suffix == "G" || suffix == "GB" || suffix == "GIB") {
    unit = std::uint64_t(1) << 30;
  } else {
    throw UsageError("bad size '" + original + "': unknown suffix '" + std::string(text.substr(digits)) +
                     "' (use K, M or G, binary multiples)");
  }
  if (number == 0) throw UsageError("bad size '" + original + "': must be at least 1 byte");
  if (number > (std::uint64_t(1) << 40) / unit) throw UsageError("bad size '" + original + "': larger than 1T");
  return std::size_t(number * unit);
}

/// Comma-separated list of sizes, e.g. "4K,64K,1M".
inline std::vector<std::size_t> parse_size_list(std::string_view text) {
  std::vector<std::size_t> sizes;
  while (true) {
    const std::size_t comma = text.find(',');
    const std::string_view item = text.substr(0, comma);
    if (item.empty()) throw UsageError("bad size list '" + std::string(text) + "': empty item");
    sizes.push_back(parse_size(item));
    if (comma == std::string_view::npos) break;
    text.remove_prefix(comma + 1);
  }
  return sizes;
}

/// 4096 -> "4K", 1048576 -> "1M", 1000 -> "1000".
inline std::string size_label(std::size_t bytes) {
  const char* units[] = {"G", "M", "K"};
  const int shifts[] = {30, 20, 10};
  for (int u = 0; u < 3; ++u) {
    const std::size_t unit = std::size_t(1) << shifts[u];
    if (bytes >= unit && bytes % unit == 0) return std::to_string(bytes / unit) + units[u];
  }
  return std::to_string(bytes);
}

/// Default number of timed iterations: more for small sizes, so that a sweep up to 64M takes seconds.
inline int default_iters(std::size_t bytes) {
  const std::size_t budget = std::size_t(512) << 20;  // about this many bytes reduced per size
  return int(std::clamp<std::size_t>(budget / std::max<std::size_t>(bytes, 1), 10, 200));
}
inline int default_warmup(int iters) { return std::clamp(iters / 10, 2, 20); }

/// Options every allreduce benchmark takes. `iters` 0 and `warmup` -1 mean "the default for the size".
struct Options {
  std::vector<std::size_t> sizes = parse_size_list(kDefaultSizes);
  int iters = 0;
  int warmup = -1;
  bool check = false;
  bool json = false;
  std::string dtype = "f32";
  std::string op = "sum";
  std::string name = "bench";
};

/// Splits "--flag=value" or "--flag value"; returns false when args[i] is not `flag`. Advances i past the value.
inline bool take_flag(const std::vector<std::string>& args, std::size_t& i, std::string_view flag, std::string& value) {
  const std::string& arg = args[i];
  if (arg == flag) {
    if (i + 1 >= args.size()) throw UsageError(std::string(flag) + " needs a value");
    value = args[++i];
    return true;
  }
  if (arg.size() > flag.size() && arg.compare(0, flag.size(), flag) == 0 && arg[flag.size()] == '=') {
    value = arg.substr(flag.size() + 1);
    return true;
  }
  return false;
}

inline int parse_int_flag(std::string_view flag, const std::string& value, int min, int max) {
  std::size_t used = 0;
  long long parsed = 0;
  try {
    parsed = std::stoll(value, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != value.size() || value.empty() || parsed < min || parsed > max) {
    throw UsageError(std::string(flag) + " expects an integer in [" + std::to_string(min) + ", " + std::to_string(max) +
                     "], got '" + value + "'");
  }
  return int(parsed);
}

/// Consumes args[i] (and its value) when it is one of the shared flags; returns false otherwise.
inline bool parse_common_flag(const std::vector<std::string>& args, std::size_t& i, Options& options) {
  std::string value;
  if (take_flag(args, i, "--sizes", value)) {
    options.sizes = parse_size_list(value);
  } else if (take_flag(args, i, "--iters", value)) {
    options.iters = parse_int_flag("--iters", value, 1, 1'000'000);
  } else if (take_flag(args, i, "--warmup", value)) {
    options.warmup = parse_int_flag("--warmup", value, 0, 1'000'000);
  } else if (take_flag(args, i, "--format", value)) {
    if (value != "table" && value != "json") throw UsageError("--format expects table or json, got '" + value + "'");
    options.json = value == "json";
  } else if (take_flag(args, i, "--dtype", value)) {
    options.dtype = value;
  } else if (take_flag(args, i, "--op", value)) {
    options.op = value;
  } else if (take_flag(args, i, "--name", value)) {
    if (value.empty()) throw UsageError("--name must not be empty");
    options.name = value;
  } else if (args[i] == "--check") {
    options.check = true;
  } else {
    return false;
  }
  return true;
}

/// Runs `warmup` untimed then `iters` timed iterations of: barrier(); start clock; collective(); stop clock;
/// after(iteration) (untimed, e.g. result verification; iteration < 0 during warmup). Returns this rank's
/// seconds per timed iteration; the caller reduces them with max over ranks.
template <class Barrier, class Collective, class After>
std::vector<double> time_iterations(int warmup, int iters, Barrier&& barrier, Collective&& collective, After&& after) {
  using Clock = std::chrono::steady_clock;
  std::vector<double> seconds;
  seconds.reserve(std::size_t(iters));
  for (int iteration = -warmup; iteration < iters; ++iteration) {
    barrier();
    const Clock::time_point start = Clock::now();
    collective();
    const Clock::time_point stop = Clock::now();
    if (iteration >= 0) seconds.push_back(std::chrono::duration<double>(stop - start).count());
    after(iteration);
  }
  return seconds;
}

/// One output row: a size's statistics over the per-iteration times (already the max over ranks).
struct Summary {
  std::size_t bytes = 0;
  std::size_t count = 0;
  int ranks = 1;
  int iters = 0;
  double median_us = 0;
  double min_us = 0;
  double algbw_gbps = 0;  // bytes / median time, in 1e9 bytes per second
  double busbw_gbps = 0;  // algbw * 2(n-1)/n
};

inline Summary summarize(std::size_t bytes, std::size_t count, int ranks, std::vector<double> seconds) {
  Summary s;
  s.bytes = bytes;
  s.count = count;
  s.ranks = ranks;
  s.iters = int(seconds.size());
  if (seconds.empty()) return s;
  std::sort(seconds.begin(), seconds.end());
  const std::size_t n = seconds.size();
  const double median = n % 2 == 1 ? seconds[n / 2] : 0.5 * (seconds[n / 2 - 1] + seconds[n / 2]);
  s.median_us = median * 1e6;
  s.min_us = seconds.front() * 1e6;
  s.algbw_gbps = median > 0 ? double(bytes) / median / 1e9 : 0;
  s.busbw_gbps = s.algbw_gbps * 2.0 * double(ranks - 1) / double(ranks);
  return s;
}

/// One JSON object on one line: bytes, median_us, min_us, algbw_gbps, busbw_gbps, plus size, dtype, ranks, iters.
inline std::string json_line(const Summary& s, std::string_view dtype) {
  char line[512];
  std::snprintf(line, sizeof line,
                "{\"size\": \"%s\", \"bytes\": %zu, \"dtype\": \"%.*s\", \"ranks\": %d, \"iters\": %d, "
                "\"median_us\": %.3f, \"min_us\": %.3f, \"algbw_gbps\": %.4f, \"busbw_gbps\": %.4f}",
                size_label(s.bytes).c_str(), s.bytes, int(dtype.size()), dtype.data(), s.ranks, s.iters, s.median_us,
                s.min_us, s.algbw_gbps, s.busbw_gbps);
  return line;
}

inline std::string table_header() {
  char line[256];
  std::snprintf(line, sizeof line, "%10s %12s %12s %7s %12s %12s %11s %11s", "size", "bytes", "count", "iters",
                "median_us", "min_us", "algbw_GB/s", "busbw_GB/s");
  return line;
}

inline std::string table_row(const Summary& s) {
  char line[256];
  std::snprintf(line, sizeof line, "%10s %12zu %12zu %7d %12.2f %12.2f %11.3f %11.3f", size_label(s.bytes).c_str(),
                s.bytes, s.count, s.iters, s.median_us, s.min_us, s.algbw_gbps, s.busbw_gbps);
  return line;
}

// --check: rank r contributes, at element i, a small integer that depends only on (i + r) mod kCheckPeriod, so
// that every reduction is exact in every element type (bf16 holds integers up to 256 exactly, u8 up to 255) and the
// expected result depends only on i mod kCheckPeriod. The period is odd, so a chunk misplaced by a power-of-two
// offset shows up.
enum class CheckOp { sum, min, max, prod, mean };
inline constexpr int kCheckPeriod = 7;

inline std::int64_t check_value(CheckOp op, int ranks, int phase) {
  switch (op) {
    case CheckOp::sum:
    case CheckOp::mean:
      // Values 1..7 keep the sum <= 255 up to 36 ranks; beyond, ones and zeros.
      return ranks * kCheckPeriod <= 252 ? phase + 1 : (phase == 0 ? 1 : 0);
    case CheckOp::prod:
      return phase == 0 && ranks <= 49 ? 2 : 1;  // at most ceil(n/7) <= 7 factors of two: fits u8
    case CheckOp::min:
    case CheckOp::max:
      return phase + 1;
  }
  return 0;
}

template <class T>
T check_element(std::int64_t value) {
  return T(static_cast<float>(value));  // small integers: exact in every element type, incl. float16/bfloat16
}

template <class T>
double element_as_double(T value) {
  if constexpr (std::is_arithmetic_v<T>) {
    return double(value);
  } else {
    return double(static_cast<float>(value));
  }
}

/// Inputs and expected results of --check for one element type, operation and number of ranks.
template <class T>
class CheckPattern {
 public:
  CheckPattern(CheckOp op, int ranks) : op_(op), ranks_(ranks) {
    for (int residue = 0; residue < kCheckPeriod; ++residue) {
      std::int64_t acc = check_value(op, ranks, residue % kCheckPeriod);
      for (int r = 1; r < ranks; ++r) {
        const std::int64_t v = check_value(op, ranks, (residue + r) % kCheckPeriod);
        switch (op) {
          case CheckOp::sum:
          case CheckOp::mean:
            acc += v;
            break;
          case CheckOp::prod:
            acc *= v;
            break;
          case CheckOp::min:
            acc = std::min(acc, v);
            break;
          case CheckOp::max:
            acc = std::max(acc, v);
            break;
        }
      }
      expected_[std::size_t(residue)] = op == CheckOp::mean ? mean_of(acc) : check_element<T>(acc);
    }
  }

  /// Rank `rank`'s input.
  void fill_input(std::span<T> input, int rank) const {
    int phase = rank % kCheckPeriod;
    std::array<T, kCheckPeriod> values;
    for (int p = 0; p < kCheckPeriod; ++p) values[std::size_t(p)] = check_element<T>(check_value(op_, ranks_, p));
    for (T& x : input) {
      x = values[std::size_t(phase)];
      if (++phase == kCheckPeriod) phase = 0;
    }
  }

  /// Overwrites the output with all-ones bytes (NaN for floating types) so that a collective that writes nothing
  /// cannot pass.
  static void poison(std::span<T> output) { std::memset(static_cast<void*>(output.data()), 0xff, output.size_bytes()); }

  /// Index of the first wrong element, or output.size() when all are right.
  std::size_t first_mismatch(std::span<const T> output) const {
    int residue = 0;
    for (std::size_t i = 0; i < output.size(); ++i) {
      if (!(output[i] == expected_[std::size_t(residue)])) return i;
      if (++residue == kCheckPeriod) residue = 0;
    }
    return output.size();
  }

  T expected(std::size_t index) const { return expected_[index % kCheckPeriod]; }

 private:
  // `mean` is the sum divided by the number of ranks: integer division for integers, in the element type for
  // float and double, through float for the 16-bit types.
  T mean_of(std::int64_t sum) const {
    if constexpr (std::is_integral_v<T>) {
      return T(sum / ranks_);
    } else if constexpr (std::is_floating_point_v<T>) {
      return T(sum) / T(ranks_);
    } else {
      return T(float(sum) / float(ranks_));
    }
  }

  CheckOp op_;
  int ranks_;
  std::array<T, kCheckPeriod> expected_{};
};

/// "aikido-bench: check failed: allreduce of 4K (4096 bytes, f32 sum) on rank 2, iteration 3, element 17:
/// expected 10, got 9". `iteration` < 0 is warmup iteration `iteration + warmup`.
inline std::string check_failure_message(std::string_view program, std::size_t bytes, std::string_view dtype,
                                         std::string_view op, int rank, int iteration, int warmup, std::size_t index,
                                         double expected, double got) {
  char line[512];
  std::snprintf(line, sizeof line,
                "%.*s: check failed: allreduce of %s (%zu bytes, %.*s %.*s) on rank %d, %s %d, element %zu: "
                "expected %.17g, got %.17g",
                int(program.size()), program.data(), size_label(bytes).c_str(), bytes, int(dtype.size()), dtype.data(),
                int(op.size()), op.data(), rank, iteration < 0 ? "warmup iteration" : "iteration",
                iteration < 0 ? iteration + warmup : iteration, index, expected, got);
  return line;
}

/// --check of one size: the output is poisoned up front and after every iteration, in between compared with the
/// closed form; the first wrong element is kept as a check_failure_message.
template <class T>
class ResultCheck {
 public:
  struct Where {
    std::string_view program, dtype, op;
    std::size_t bytes = 0;
    int rank = 0;
    int warmup = 0;
  };
  ResultCheck(const CheckPattern<T>& pattern, Where where) : pattern_(pattern), where_(where) {}

  /// Before the first iteration.
  void start(std::span<T> output) const { CheckPattern<T>::poison(output); }
  /// After iteration `iteration` (< 0: warmup) wrote `output`.
  void after(std::span<T> output, int iteration) {
    const std::size_t index = pattern_.first_mismatch(output);
    if (index < output.size() && !failure_) {
      failure_ = check_failure_message(where_.program, where_.bytes, where_.dtype, where_.op, where_.rank, iteration,
                                       where_.warmup, index, element_as_double(pattern_.expected(index)),
                                       element_as_double(output[index]));
    }
    CheckPattern<T>::poison(output);
  }
  /// The first wrong element's message, if any.
  const std::optional<std::string>& failure() const { return failure_; }

 private:
  const CheckPattern<T>& pattern_;
  Where where_;
  std::optional<std::string> failure_;
};

}  // namespace aikido::bench
