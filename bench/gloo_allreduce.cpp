// Gloo reference for aikido-bench: float32 sum allreduce with gloo::allreduce (the call PyTorch's Gloo process
// group makes) over Gloo's TCP transport (loopback, or --hostname's address), timed and printed exactly like
// `aikido-bench allreduce` (tools/aikido-bench/bench_common.hpp). Start one process per rank, all with the same store
// directory:
//   for r in 0 1 2 3; do gloo_allreduce --rank $r --world 4 --store /tmp/gloo.XXXX --format json & done; wait
// bench/compare_allreduce.py does this for you.
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/file_store.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/transport/tcp/device.h>
#include <sys/socket.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bench_common.hpp"

namespace {

using aikido::bench::CheckOp;
using aikido::bench::CheckPattern;
using aikido::bench::Options;
using aikido::bench::UsageError;

constexpr const char* kProgram = "gloo_allreduce";

constexpr const char* kUsage =
    R"(usage: gloo_allreduce --rank R --world N --store DIR [options]   (one process per rank)
Gloo reference for aikido-bench: float32 sum allreduce over Gloo's TCP transport (on 127.0.0.1, or the address
--hostname gives: a host's address when ranks are on several hosts), same timing and output as aikido-bench allreduce. Ranks meet through a Gloo file store in DIR (an existing directory shared by all
ranks; use a fresh one per run).
options: --rank R  --world N  --store DIR  --prefix P (store key prefix, default "gloo_allreduce")
         --hostname ADDR (address this rank listens on and others reach it at, default 127.0.0.1)
         --timeout S (seconds, default 120)  --sizes LIST  --iters N  --warmup W  --check  --format table|json
         (--dtype f32 and --op sum only)
)";

using ReduceFunction = void (*)(void*, const void*, const void*, std::size_t);

struct GlooOptions {
  Options common;
  int rank = 0;
  int world = 1;
  std::string store_dir;
  std::string prefix = "gloo_allreduce";
  std::string hostname = "127.0.0.1";
  int timeout_s = 120;
};

GlooOptions parse_options(const std::vector<std::string>& args, bool& help) {
  GlooOptions options;
  bool have_rank = false;
  bool have_world = false;
  for (std::size_t i = 0; i < args.size(); ++i) {
    std::string value;
    if (args[i] == "-h" || args[i] == "--help") {
      help = true;
    } else if (aikido::bench::take_flag(args, i, "--rank", value)) {
      options.rank = aikido::bench::parse_int_flag("--rank", value, 0, 1 << 20);
      have_rank = true;
    } else if (aikido::bench::take_flag(args, i, "--world", value)) {
      options.world = aikido::bench::parse_int_flag("--world", value, 1, 1 << 20);
      have_world = true;
    } else if (aikido::bench::take_flag(args, i, "--store", value)) {
      options.store_dir = value;
    } else if (aikido::bench::take_flag(args, i, "--prefix", value)) {
      options.prefix = value;
    } else if (aikido::bench::take_flag(args, i, "--hostname", value)) {
      options.hostname = value;
    } else if (aikido::bench::take_flag(args, i, "--timeout", value)) {
      options.timeout_s = aikido::bench::parse_int_flag("--timeout", value, 1, 86400);
    } else if (!aikido::bench::parse_common_flag(args, i, options.common)) {
      throw UsageError("unknown option '" + args[i] + "'");
    }
  }
  if (help) return options;
  if (have_world != have_rank) throw UsageError("give both --rank and --world (or neither, for one rank)");
  if (options.rank >= options.world) {
    throw UsageError("--rank " + std::to_string(options.rank) + " is not below --world " +
                     std::to_string(options.world));
  }
  if (options.world > 1 && options.store_dir.empty()) throw UsageError("--store DIR is required with --world > 1");
  if (options.store_dir.empty()) options.store_dir = "/tmp";
  if (options.common.dtype != "f32")
    throw UsageError("only --dtype f32 is supported, got '" + options.common.dtype + "'");
  if (options.common.op != "sum") throw UsageError("only --op sum is supported, got '" + options.common.op + "'");
  for (std::size_t bytes : options.common.sizes) {
    if (bytes < sizeof(float)) throw UsageError("size " + std::to_string(bytes) + " is smaller than one f32 element");
  }
  return options;
}

// Tags keep the different operations apart (Gloo requires unique tags only among concurrent operations).
constexpr std::uint32_t kBarrierTag = 1;
constexpr std::uint32_t kDataTag = 2;
constexpr std::uint32_t kTimesTag = 3;
constexpr std::uint32_t kCheckTag = 4;

template <class T>
void gloo_allreduce(const std::shared_ptr<gloo::Context>& context, const T* send, T* recv, std::size_t count,
                    ReduceFunction reduce, std::uint32_t tag) {
  gloo::AllreduceOptions opts(context);
  opts.setInput(const_cast<T*>(send), count);
  opts.setOutput(recv, count);
  opts.setReduceFunction(reduce);
  opts.setTag(tag);
  gloo::allreduce(opts);
}

/// Returns false when --check found a wrong element on any rank.
bool run_size(const GlooOptions& gloo_options, const std::shared_ptr<gloo::Context>& context, std::size_t bytes) {
  const Options& options = gloo_options.common;
  const int rank = context->rank;
  const int ranks = context->size;
  const std::size_t count = bytes / sizeof(float);
  const std::size_t used_bytes = count * sizeof(float);
  const int iters = options.iters > 0 ? options.iters : aikido::bench::default_iters(used_bytes);
  const int warmup = options.warmup >= 0 ? options.warmup : aikido::bench::default_warmup(iters);

  const CheckPattern<float> pattern(CheckOp::sum, ranks);
  std::vector<float> send(count);
  std::vector<float> recv(count);
  pattern.fill_input(send, rank);
  if (options.check) CheckPattern<float>::poison(recv);

  // Options (and the buffers they register) are built once per size and reused by every iteration.
  gloo::BarrierOptions barrier(context);
  barrier.setTag(kBarrierTag);
  gloo::AllreduceOptions allreduce(context);
  allreduce.setInput(send.data(), count);
  allreduce.setOutput(recv.data(), count);
  allreduce.setReduceFunction(static_cast<ReduceFunction>(&gloo::sum<float>));
  allreduce.setTag(kDataTag);

  std::optional<std::string> failure;
  const std::vector<double> seconds = aikido::bench::time_iterations(
      warmup, iters, [&] { gloo::barrier(barrier); }, [&] { gloo::allreduce(allreduce); },
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
  gloo_allreduce(context, seconds.data(), max_seconds.data(), seconds.size(),
                 static_cast<ReduceFunction>(&gloo::max<double>), kTimesTag);
  int failed_ranks = failure ? 1 : 0;
  int failed_total = 0;
  gloo_allreduce(context, &failed_ranks, &failed_total, 1, static_cast<ReduceFunction>(&gloo::sum<int>), kCheckTag);
  if (failure) std::fprintf(stderr, "%s\n", failure->c_str());
  if (rank == 0) {
    const auto summary = aikido::bench::summarize(used_bytes, count, ranks, max_seconds);
    const std::string line =
        options.json ? aikido::bench::json_line(summary, "f32") : aikido::bench::table_row(summary);
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
  }
  return failed_total == 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    bool help = false;
    const GlooOptions options = parse_options(std::vector<std::string>(argv + 1, argv + argc), help);
    if (help) {
      std::fputs(kUsage, stdout);
      return 0;
    }
    gloo::transport::tcp::attr attr;
    attr.hostname = options.hostname;
    attr.ai_family = AF_INET;
    auto device = gloo::transport::tcp::CreateDevice(attr);
    gloo::rendezvous::FileStore file_store(options.store_dir);
    gloo::rendezvous::PrefixStore store(options.prefix, file_store);
    auto context = std::make_shared<gloo::rendezvous::Context>(options.rank, options.world);
    context->setTimeout(std::chrono::seconds(options.timeout_s));
    context->connectFullMesh(store, device);

    if (options.rank == 0) {
      std::printf("# %s: ranks %d, dtype f32, op sum, check %s\n", kProgram, options.world,
                  options.common.check ? "on" : "off");
      if (!options.common.json) std::printf("%s\n", aikido::bench::table_header().c_str());
    }
    for (std::size_t bytes : options.common.sizes) {
      if (!run_size(options, context, bytes)) return 1;
    }
    return 0;
  } catch (const UsageError& e) {
    std::fprintf(stderr, "%s: %s\n", kProgram, e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", kProgram, e.what());
    return 1;
  }
}
