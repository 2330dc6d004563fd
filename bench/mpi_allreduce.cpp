// OpenMPI reference for aikido-bench: float32 sum allreduce with MPI_Allreduce, timed and printed exactly like
// `aikido-bench allreduce` (tools/aikido-bench/bench_common.hpp). Run:
//   mpirun --allow-run-as-root --oversubscribe -np 4 mpi_allreduce --format json [--sizes 4K,1M] [--check]
#include <mpi.h>

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "bench_common.hpp"

namespace {

using aikido::bench::CheckOp;
using aikido::bench::CheckPattern;
using aikido::bench::Options;
using aikido::bench::UsageError;

constexpr const char* kProgram = "mpi_allreduce";

constexpr const char* kUsage = R"(usage: mpirun -np N mpi_allreduce [options]
OpenMPI reference for aikido-bench: float32 sum allreduce, same timing and output as aikido-bench allreduce.
options: --sizes LIST  --iters N  --warmup W  --check  --format table|json  (--dtype f32 and --op sum only)
)";

Options parse_options(const std::vector<std::string>& args, bool& help) {
  Options options;
  for (std::size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "-h" || args[i] == "--help") {
      help = true;
    } else if (!aikido::bench::parse_common_flag(args, i, options)) {
      throw UsageError("unknown option '" + args[i] + "'");
    }
  }
  if (options.dtype != "f32") throw UsageError("only --dtype f32 is supported, got '" + options.dtype + "'");
  if (options.op != "sum") throw UsageError("only --op sum is supported, got '" + options.op + "'");
  for (std::size_t bytes : options.sizes) {
    if (bytes < sizeof(float)) throw UsageError("size " + std::to_string(bytes) + " is smaller than one f32 element");
  }
  return options;
}

/// Returns false when --check found a wrong element on any rank.
bool run_size(const Options& options, int rank, int ranks, std::size_t bytes) {
  const std::size_t count = bytes / sizeof(float);
  const std::size_t used_bytes = count * sizeof(float);
  const int iters = options.iters > 0 ? options.iters : aikido::bench::default_iters(used_bytes);
  const int warmup = options.warmup >= 0 ? options.warmup : aikido::bench::default_warmup(iters);

  const CheckPattern<float> pattern(CheckOp::sum, ranks);
  std::vector<float> send(count);
  std::vector<float> recv(count);
  pattern.fill_input(send, rank);
  if (options.check) CheckPattern<float>::poison(recv);

  std::optional<std::string> failure;
  const std::vector<double> seconds = aikido::bench::time_iterations(
      warmup, iters, [&] { MPI_Barrier(MPI_COMM_WORLD); },
      [&] { MPI_Allreduce(send.data(), recv.data(), int(count), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD); },
      [&](int iteration) {
        if (!options.check) return;
        const std::size_t index = pattern.first_mismatch(recv);
        if (index < count && !failure) {
          failure = aikido::bench::check_failure_message(kProgram, used_bytes, "f32", "sum", rank, iteration, warmup,
                                                         index, pattern.expected(index), recv[index]);
        }
        CheckPattern<float>::poison(recv);
      });

  std::vector<double> max_seconds(seconds.size());
  MPI_Allreduce(seconds.data(), max_seconds.data(), int(seconds.size()), MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);

  int failed_ranks = failure ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &failed_ranks, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (failure) std::fprintf(stderr, "%s\n", failure->c_str());
  if (rank == 0) {
    const auto summary = aikido::bench::summarize(used_bytes, count, ranks, max_seconds);
    const std::string line =
        options.json ? aikido::bench::json_line(summary, "f32") : aikido::bench::table_row(summary);
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
  }
  return failed_ranks == 0;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  int ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);

  int status = 0;
  try {
    bool help = false;
    const Options options = parse_options(std::vector<std::string>(argv + 1, argv + argc), help);
    if (help) {
      if (rank == 0) std::fputs(kUsage, stdout);
    } else {
      if (rank == 0) {
        std::printf("# %s: ranks %d, dtype f32, op sum, check %s\n", kProgram, ranks, options.check ? "on" : "off");
        if (!options.json) std::printf("%s\n", aikido::bench::table_header().c_str());
      }
      for (std::size_t bytes : options.sizes) {
        if (!run_size(options, rank, ranks, bytes)) {
          status = 1;
          break;
        }
      }
    }
  } catch (const UsageError& e) {
    if (rank == 0) std::fprintf(stderr, "%s: %s\n", kProgram, e.what());
    status = 2;
  }
  MPI_Finalize();
  return status;
}
