// aikido-bench: collective benchmarks over Aikido's public API. Run it under the launcher, e.g.
//   aikido-run -np 4 aikido-bench allreduce --sizes 4K,1M --format json
// Alone it runs as a single rank. The timing method and the output lines are those of bench_common.hpp, shared
// with the OpenMPI and Gloo reference programs in bench/.
#include <aikido/aikido.hpp>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "bench_common.hpp"

namespace {

using aikido::bench::CheckOp;
using aikido::bench::CheckPattern;
using aikido::bench::Options;
using aikido::bench::ResultCheck;
using aikido::bench::UsageError;

constexpr const char* kProgram = "aikido-bench";

constexpr const char* kUsage = R"(usage: aikido-run -np N aikido-bench allreduce [options]
       aikido-bench allreduce [options]            (one rank)

Times allreduce for each size: every iteration starts with a barrier, every rank times its call, the time of the
iteration is the maximum over ranks. Rank 0 prints, per size, the median and minimum time and the algorithm and bus
bandwidth (algbw = bytes / median time, busbw = algbw * 2(n-1)/n).

options:
  --sizes LIST      comma-separated buffer sizes in bytes, K/M/G suffixes binary (default 4K,64K,1M,16M,64M)
  --dtype T         f32 f64 f16 bf16 i32 i64 u8 (default f32)
  --op OP           sum min max prod mean (default sum)
  --iters N         timed iterations per size (default: 200 for small sizes down to 10 for 64M and above)
  --warmup W        untimed iterations before them (default: iters/10, between 2 and 20)
  --check           verify every element of every result against a closed form; exit 1 naming the first wrong one
  --format F        table (default) or json (one object per line and size: bytes, median_us, min_us, algbw_gbps,
                    busbw_gbps, size, dtype, ranks, iters)
  --name PREFIX     prefix of the names of the collectives the benchmark posts (default "bench")
  -h, --help        this text

exit status: 0 success, 1 a collective failed or --check found a wrong element, 2 bad command line.
)";

aikido::ReduceOp parse_op(const std::string& name) {
  if (name == "sum") return aikido::ReduceOp::sum;
  if (name == "min") return aikido::ReduceOp::min;
  if (name == "max") return aikido::ReduceOp::max;
  if (name == "prod") return aikido::ReduceOp::prod;
  if (name == "mean") return aikido::ReduceOp::mean;
  throw UsageError("unknown --op '" + name + "': expected one of sum, min, max, prod, mean");
}

CheckOp check_op_of(aikido::ReduceOp op) {
  switch (op) {
    case aikido::ReduceOp::sum:
      return CheckOp::sum;
    case aikido::ReduceOp::min:
      return CheckOp::min;
    case aikido::ReduceOp::max:
      return CheckOp::max;
    case aikido::ReduceOp::prod:
      return CheckOp::prod;
    case aikido::ReduceOp::mean:
      return CheckOp::mean;
  }
  return CheckOp::sum;
}

aikido::DType parse_dtype_flag(const std::string& name) {
  for (aikido::DType dtype : {aikido::DType::f32, aikido::DType::f64, aikido::DType::f16, aikido::DType::bf16,
                              aikido::DType::i32, aikido::DType::i64, aikido::DType::u8}) {
    if (name == aikido::dtype_name(dtype)) return dtype;
  }
  throw UsageError("unknown --dtype '" + name + "': expected one of f32, f64, f16, bf16, i32, i64, u8");
}

/// Calls f(T{}) with the C++ type of `dtype`.
template <class F>
auto with_dtype(aikido::DType dtype, F&& f) {
  switch (dtype) {
    case aikido::DType::f32:
      return f(float{});
    case aikido::DType::f64:
      return f(double{});
    case aikido::DType::f16:
      return f(aikido::float16{});
    case aikido::DType::bf16:
      return f(aikido::bfloat16{});
    case aikido::DType::i32:
      return f(std::int32_t{});
    case aikido::DType::i64:
      return f(std::int64_t{});
    case aikido::DType::u8:
      return f(std::uint8_t{});
  }
  throw UsageError("unsupported element type");
}

struct AllreduceSetup {
  Options options;
  aikido::DType dtype = aikido::DType::f32;
  aikido::ReduceOp op = aikido::ReduceOp::sum;
};

void print_line(const std::string& line) {
  std::fputs(line.c_str(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

/// Benchmarks one size; returns false when --check found a wrong element on any rank.
template <class T>
bool run_allreduce_size(aikido::Peer& peer, const AllreduceSetup& setup, std::size_t bytes) {
  const Options& options = setup.options;
  const int ranks = peer.size();
  const std::size_t count = bytes / sizeof(T);
  const std::size_t used_bytes = count * sizeof(T);
  const int iters = options.iters > 0 ? options.iters : aikido::bench::default_iters(used_bytes);
  const int warmup = options.warmup >= 0 ? options.warmup : aikido::bench::default_warmup(iters);
  const std::string label = aikido::bench::size_label(used_bytes);
  const std::string collective_name = options.name + ".allreduce." + label;
  const std::string barrier_name = options.name + ".barrier";

  // Allocated and touched once per size; every iteration reuses them.
  const CheckPattern<T> pattern(check_op_of(setup.op), ranks);
  std::vector<T> send(count);
  std::vector<T> recv(count);
  pattern.fill_input(send, peer.rank());
  ResultCheck<T> check(pattern, {kProgram, aikido::dtype_name(setup.dtype), aikido::reduce_op_name(setup.op),
                                 used_bytes, peer.rank(), warmup});
  if (options.check) check.start(recv);

  const std::vector<double> seconds = aikido::bench::time_iterations(
      warmup, iters, [&] { peer.barrier(barrier_name); },
      [&] { peer.allreduce(std::span<const T>(send), std::span<T>(recv), setup.op, collective_name); },
      [&](int iteration) {
        if (options.check) check.after(recv, iteration);
      });
  const std::optional<std::string>& failure = check.failure();

  std::vector<double> max_seconds(seconds.size());
  peer.allreduce(std::span<const double>(seconds), std::span<double>(max_seconds), aikido::ReduceOp::max,
                 options.name + ".times." + label);

  bool all_ok = true;
  if (options.check) {
    std::int32_t failed_ranks = failure ? 1 : 0;
    peer.allreduce(std::span<std::int32_t>(&failed_ranks, 1), aikido::ReduceOp::sum, options.name + ".check." + label);
    if (failure) std::fprintf(stderr, "%s\n", failure->c_str());
    if (failed_ranks > 0 && peer.rank() == 0) {
      std::fprintf(stderr, "%s: check failed on %d of %d ranks for size %s; stopping\n", kProgram, int(failed_ranks),
                   ranks, label.c_str());
    }
    all_ok = failed_ranks == 0;
  }
  if (peer.rank() == 0) {
    const auto summary = aikido::bench::summarize(used_bytes, count, ranks, max_seconds);
    print_line(options.json ? aikido::bench::json_line(summary, aikido::dtype_name(setup.dtype))
                            : aikido::bench::table_row(summary));
  }
  return all_ok;
}

int run_allreduce(const std::vector<std::string>& args) {
  AllreduceSetup setup;
  for (std::size_t i = 1; i < args.size(); ++i) {
    if (args[i] == "-h" || args[i] == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (!aikido::bench::parse_common_flag(args, i, setup.options)) {
      throw UsageError("unknown option '" + args[i] + "' for allreduce");
    }
  }
  setup.dtype = parse_dtype_flag(setup.options.dtype);
  setup.op = parse_op(setup.options.op);
  const std::size_t element_bytes = aikido::dtype_size(setup.dtype);
  for (std::size_t bytes : setup.options.sizes) {
    if (bytes < element_bytes) {
      throw UsageError("size " + std::to_string(bytes) + " is smaller than one " + setup.options.dtype + " element (" +
                       std::to_string(element_bytes) + " bytes)");
    }
  }

  aikido::Peer peer = aikido::Peer::from_env();
  if (peer.rank() == 0) {
    std::printf("# %s allreduce: ranks %d, dtype %s, op %s, check %s\n", kProgram, peer.size(),
                aikido::dtype_name(setup.dtype), aikido::reduce_op_name(setup.op), setup.options.check ? "on" : "off");
    if (!setup.options.json) print_line(aikido::bench::table_header());
  }
  for (std::size_t bytes : setup.options.sizes) {
    const bool ok = with_dtype(setup.dtype,
                               [&](auto element) { return run_allreduce_size<decltype(element)>(peer, setup, bytes); });
    if (!ok) return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  try {
    if (args.empty()) {
      std::fputs(kUsage, stderr);
      return 2;
    }
    if (args[0] == "-h" || args[0] == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (args[0] != "allreduce") {
      throw UsageError("unknown subcommand '" + args[0] + "'; available: allreduce (see --help)");
    }
    return run_allreduce(args);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "%s: %s\n", kProgram, e.what());
    return 2;
  } catch (const aikido::Error& e) {
    std::fprintf(stderr, "%s: %s\n", kProgram, e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: unexpected error: %s\n", kProgram, e.what());
    return 1;
  }
}
