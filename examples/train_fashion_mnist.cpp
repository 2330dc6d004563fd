// Trains an MLP or a small CNN on Fashion-MNIST with Aikido's distributed optimizer.
//
//   aikido-run -np 2 build/bin/train_fashion_mnist --model mlp --epochs 3
//
// Rank 0 prints a "starting" line with the configuration (stderr), then one JSON line per epoch (stdout; every
// rank's with --all-ranks; see --help for the keys) and its progress (stderr: on a terminal one line updated in
// place, otherwise one line per epoch); --output json|text|both chooses. Under aikido-run --elastic it follows the
// job's membership by itself. The data are the IDX gzip files of Debian's dataset-fashion-mnist package
// (/usr/share/datasets/fashion-mnist), or of --data DIR.
#include <unistd.h>
#include <zlib.h>

#include <CLI/CLI.hpp>
#include <aikido/aikido.hpp>
#include <aikido/elastic.hpp>
#include <aikido/torch.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>

namespace {

struct Split {
  torch::Tensor images;  // [n, 1, 28, 28] float32, normalised
  torch::Tensor labels;  // [n] int64
};

std::uint32_t read_u32(gzFile file, const std::string& path) {
  unsigned char b[4];
  if (gzread(file, b, 4) != 4) throw std::runtime_error("truncated IDX file " + path);
  return (std::uint32_t(b[0]) << 24) | (std::uint32_t(b[1]) << 16) | (std::uint32_t(b[2]) << 8) | b[3];
}

// Reads one gzip-compressed IDX file: magic 2051 (images, n x rows x cols bytes) or 2049 (labels, n bytes).
torch::Tensor read_idx(const std::string& path, std::uint32_t magic) {
  gzFile file = gzopen(path.c_str(), "rb");
  if (file == nullptr) {
    throw std::runtime_error("cannot open " + path +
                             " (install Debian's dataset-fashion-mnist package, or give the folder with --data DIR)");
  }
  try {
    if (read_u32(file, path) != magic) throw std::runtime_error(path + " is not an IDX file of the expected kind");
    std::vector<std::int64_t> shape{read_u32(file, path)};
    if (magic == 2051) {
      shape.push_back(1);
      shape.push_back(read_u32(file, path));
      shape.push_back(read_u32(file, path));
    }
    auto data = torch::empty(shape, torch::kUInt8);
    const auto bytes = static_cast<unsigned>(data.numel());
    if (gzread(file, data.data_ptr(), bytes) != static_cast<int>(bytes)) {
      throw std::runtime_error("truncated IDX file " + path);
    }
    gzclose(file);
    return data;
  } catch (...) {
    gzclose(file);
    throw;
  }
}

Split load_split(const std::string& dir, const std::string& prefix) {
  Split s;
  // Mean and standard deviation of the Fashion-MNIST training images.
  s.images = read_idx(dir + "/" + prefix + "-images-idx3-ubyte.gz", 2051)
                 .to(torch::kFloat32)
                 .div_(255)
                 .sub_(0.2860)
                 .div_(0.3530);
  s.labels = read_idx(dir + "/" + prefix + "-labels-idx1-ubyte.gz", 2049).to(torch::kInt64);
  if (s.images.size(0) != s.labels.size(0))
    throw std::runtime_error("images and labels of " + prefix + " differ in number");
  return s;
}

torch::nn::Sequential make_model(const std::string& kind) {
  namespace nn = torch::nn;
  if (kind == "mlp") {
    return nn::Sequential(nn::Flatten(), nn::Linear(784, 512), nn::ReLU(), nn::Linear(512, 256), nn::ReLU(),
                          nn::Linear(256, 10));
  }
  return nn::Sequential(nn::Conv2d(nn::Conv2dOptions(1, 16, 5).padding(2)), nn::ReLU(), nn::MaxPool2d(2),
                        nn::Conv2d(nn::Conv2dOptions(16, 32, 5).padding(2)), nn::ReLU(), nn::MaxPool2d(2),
                        nn::Flatten(), nn::Linear(32 * 7 * 7, 10));
}

// After a lost worker: the survivors agree on the cluster without it and roll back to the last commit. False when
// this worker was left out.
bool recover(aikido::ElasticSession& session, aikido::torch::DistributedOptimizer* opt, const std::string& what) {
  std::cerr << "train_fashion_mnist: rank " << session.rank() << ": recovering after: " << what << std::endl;
  if (opt) opt->finish_pending(/*after_failure=*/true);
  if (session.recover() == aikido::SyncResult::removed) return false;
  if (opt) opt->on_cluster_change();
  return true;
}

// CLI11's own range checks print the limits of the type ("Value 0 not in range 0.000000 to 1797693134862315..."):
// these say what is accepted. `whole`: an integer.
CLI::Validator at_least(double min, bool whole, const std::string& accepted) {
  return CLI::Validator(
      [=](std::string& text) -> std::string {
        try {
          std::size_t used = 0;
          const double value = std::stod(text, &used);
          if (used == text.size() && value >= min && std::isfinite(value) && (!whole || value == std::floor(value))) {
            return "";
          }
        } catch (const std::exception&) {
        }
        return "'" + text + "' is not " + accepted;
      },
      "");
}

CLI::Validator between(double low, double high, const std::string& accepted) {
  return CLI::Validator(
      [=](std::string& text) -> std::string {
        try {
          std::size_t used = 0;
          const double value = std::stod(text, &used);
          if (used == text.size() && value >= low && value <= high) return "";
        } catch (const std::exception&) {
        }
        return "'" + text + "' is not " + accepted;
      },
      "");
}

// Rank 0's progress for people: on a terminal one line rewritten in place ("TEXT\r"; aikido-run passes such lines
// on as they come when its own console is a terminal, AIKIDO_CONSOLE_TTY=1), otherwise one line per epoch.
class ProgressLine {
 public:
  ProgressLine(bool on, int epochs, std::size_t dataset_size) : on_(on), epochs_(epochs), dataset_size_(dataset_size) {
    const char* console = std::getenv("AIKIDO_CONSOLE_TTY");
    in_place_ = console != nullptr ? std::string(console) == "1" : ::isatty(STDERR_FILENO) == 1;
    direct_ = console == nullptr;  // not under aikido-run, which clears the line itself
  }

  // After a step: `epoch_samples` of all workers done in this epoch, `loss` this worker's mean loss so far.
  void step(std::int64_t epoch, std::int64_t step, std::int64_t steps, std::uint64_t epoch_samples, double loss,
            double seconds) {
    if (!on_ || !in_place_) return;
    const auto now = std::chrono::steady_clock::now();
    if (now < next_) return;
    next_ = now + std::chrono::milliseconds(250);  // a terminal need not redraw faster than the eye reads
    const double rate = seconds > 0 ? static_cast<double>(epoch_samples) / seconds : 0;
    // Steps left in this epoch and the later ones, at this epoch's pace.
    const double left = static_cast<double>(steps - step) + static_cast<double>(steps) * double(epochs_ - epoch - 1);
    char line[256];
    const int n = std::snprintf(line, sizeof line, "epoch %lld/%d  step %lld/%lld  %.0f samples/s  loss %.4f  ETA %s\r",
                                static_cast<long long>(epoch + 1), epochs_, static_cast<long long>(step),
                                static_cast<long long>(steps), rate, loss,
                                step > 0 && seconds > 0 ? clock(left * seconds / double(step)).c_str() : "--:--");
    shown_ = std::max(shown_, n);
    std::fputs(line, stderr);
    std::fflush(stderr);
  }

  void epoch_done(std::int64_t epoch, std::int64_t steps, double loss, double accuracy, double samples_per_second,
                  double seconds, int workers) {
    if (!on_) return;
    // On a terminal of its own the line covers the last progress line: pad it to that length.
    const int n = std::fprintf(
        stderr, "epoch %lld/%d: %lld steps, train loss %.4f, test accuracy %.4f, %.0f samples/s, %.1f s, %d worker%s",
        static_cast<long long>(epoch + 1), epochs_, static_cast<long long>(steps), loss, accuracy, samples_per_second,
        seconds, workers, workers == 1 ? "" : "s");
    std::fprintf(stderr, "%*s\n", direct_ && in_place_ ? std::max(0, shown_ - n) : 0, "");
    shown_ = 0;
    std::fflush(stderr);
  }

 private:
  static std::string clock(double seconds) {
    const long long s = std::llround(seconds);
    char text[32];
    if (s >= 3600) {
      std::snprintf(text, sizeof text, "%lld:%02lld:%02lld", s / 3600, s / 60 % 60, s % 60);
    } else {
      std::snprintf(text, sizeof text, "%02lld:%02lld", s / 60, s % 60);
    }
    return text;
  }

  bool on_;
  bool in_place_ = false;
  bool direct_ = false;
  int shown_ = 0;  // length of the longest progress line on the terminal
  int epochs_;
  std::size_t dataset_size_;
  std::chrono::steady_clock::time_point next_{};
};

// --count-samples: a sample index's contribution to the epoch's fingerprint (40 bits, so that the sum over a whole
// training set fits an int64 exactly). The sum over an epoch equals the sum over all indices when each index was
// trained once; an index trained twice and another skipped change it (but for a 2^-40 chance).
std::int64_t index_fingerprint(std::uint64_t index) {
  std::uint64_t z = index + 0x9e3779b97f4a7c15ULL;  // splitmix64
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return static_cast<std::int64_t>((z ^ (z >> 31)) & ((std::uint64_t{1} << 40) - 1));
}

// FNV-1a over the bytes of every parameter, in order: equal on every worker exactly when their models are.
std::string parameters_digest(torch::nn::Module& model) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (const auto& p : model.parameters()) {
    const torch::Tensor t = p.detach().contiguous();
    const auto* bytes = static_cast<const unsigned char*>(t.data_ptr());
    for (std::size_t i = 0, n = t.numel() * t.element_size(); i < n; ++i) h = (h ^ bytes[i]) * 0x100000001b3ULL;
  }
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(h));
  return text;
}

torch::Tensor to_index(const std::vector<std::size_t>& indices) {
  auto t = torch::empty({static_cast<std::int64_t>(indices.size())}, torch::kInt64);
  auto* p = t.data_ptr<std::int64_t>();
  for (std::size_t i = 0; i < indices.size(); ++i) p[i] = static_cast<std::int64_t>(indices[i]);
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Trains an MLP or a small CNN on Fashion-MNIST with Aikido (run under aikido-run for several workers)."};
  std::string model_kind = "mlp", strategy_name = "ssgd", data_dir = "/usr/share/datasets/fashion-mnist";
  int epochs = 3;
  std::int64_t batch_size = 64, max_steps = 0;
  double lr = 0.05, momentum = 0.9;
  std::uint64_t seed = 1;
  int threads = 0;
  bool skip_communication = false;
  // Under aikido-run --elastic (AIKIDO_ELASTIC=1) the example follows the membership without being told.
  const char* elastic_job = std::getenv("AIKIDO_ELASTIC");
  bool elastic = elastic_job != nullptr && std::string(elastic_job) == "1";
  bool all_ranks = false;
  bool count_samples = false;
  std::int64_t commit_every = 10;
  double target_accuracy = 0;
  std::int64_t eval_every = 0;
  std::vector<std::string> policies;
  std::string monitor = "on";
  std::int64_t local_steps = 8;
  double round_deadline = 0, outer_lr = 0.7;
  std::string compression_name = "none", partition = "iid";
  double dp_clip = 0, dp_noise = 0, dp_delta = 1e-5;
  bool secure_aggregation = false;
  std::string output = "both";
  app.add_option("--model", model_kind, "mlp (784-512-256-10) or cnn (two 5x5 conv layers)")
      ->check(CLI::IsMember({"mlp", "cnn"}))
      ->capture_default_str();
  app.add_option("--epochs", epochs, "passes over the training set")
      ->check(at_least(1, true, "a number of epochs (1 or more)"))
      ->capture_default_str();
  app.add_option("--batch-size", batch_size, "samples per step on each worker")
      ->check(at_least(1, true, "a number of samples (1 or more)"))
      ->capture_default_str();
  app.add_option("--lr", lr, "learning rate of SGD")
      ->check(at_least(1e-300, false, "a learning rate above 0"))
      ->capture_default_str();
  app.add_option("--momentum", momentum, "momentum of SGD")
      ->check(between(0, 1, "a momentum from 0 to 1"))
      ->capture_default_str();
  app.add_option("--strategy", strategy_name,
                 "ssgd (synchronous SGD), sma (synchronous model averaging), pair (asynchronous pair averaging), "
                 "local_sgd (--local-steps K local steps, then the models are averaged), fedavg (federated averaging: "
                 "updates of K local steps averaged by sample counts) or diloco (K inner steps, then an outer "
                 "Nesterov step on the averaged pseudo-gradient)")
      ->check(CLI::IsMember({"ssgd", "sma", "pair", "local_sgd", "fedavg", "diloco", "synchronous_sgd",
                             "synchronous_averaging", "pair_averaging", "federated_averaging"}))
      ->capture_default_str();
  app.add_option("--local-steps", local_steps, "local_sgd, fedavg, diloco: local steps per round (K)")
      ->check(at_least(1, true, "a number of steps (1 or more)"))
      ->capture_default_str();
  app.add_option("--round-deadline", round_deadline,
                 "fedavg: seconds a worker that finished its round waits for the others; then, in an elastic job, "
                 "the others go on without the stragglers (0: the collective timeout)")
      ->check(at_least(0, false, "a number of seconds (0: none)"));
  app.add_option("--outer-lr", outer_lr, "diloco: learning rate of the outer Nesterov SGD")
      ->check(at_least(1e-300, false, "a learning rate above 0"))
      ->capture_default_str();
  app.add_option("--compression", compression_name,
                 "what the workers exchange (ssgd: gradients; local_sgd, fedavg, diloco: updates): none, fp16, bf16, "
                 "int8, topk:FRACTION (top-k with error feedback) or powersgd:RANK")
      ->check([](const std::string& text) -> std::string {
        try {
          aikido::Compression::parse(text);
          return "";
        } catch (const aikido::ConfigError& e) {
          return e.what();
        }
      })
      ->capture_default_str();
  app.add_option("--dp-clip", dp_clip,
                 "differential privacy: clip each sample's gradient (ssgd: DP-SGD) or each worker's round update "
                 "(local_sgd, fedavg, diloco: client-level DP) to this L2 norm")
      ->check(at_least(1e-300, false, "a norm above 0"));
  app.add_option("--dp-noise", dp_noise, "differential privacy: noise multiplier sigma (needs --dp-clip)")
      ->check(at_least(0, false, "a noise multiplier (0 or more)"));
  app.add_option("--dp-delta", dp_delta, "differential privacy: the delta at which epsilon is reported")
      ->check(between(1e-300, 0.999999, "a delta in (0, 1)"))
      ->capture_default_str();
  app.add_flag("--secure-aggregation", secure_aggregation,
               "local_sgd, fedavg, diloco: updates travel in fixed point with pairwise masks (X25519), so that only "
               "their sum is revealed");
  app.add_option("--partition", partition,
                 "how the training set is split among the workers: iid (every worker draws from the whole set) or "
                 "label:ALPHA (each worker keeps its own shard, with class shares drawn from a Dirichlet(ALPHA): "
                 "small ALPHA, few classes per worker)")
      ->check([](const std::string& text) -> std::string {
        if (text == "iid") return "";
        if (text.rfind("label:", 0) == 0) {
          try {
            std::size_t used = 0;
            const double alpha = std::stod(text.substr(6), &used);
            if (used == text.size() - 6 && alpha > 0 && std::isfinite(alpha)) return "";
          } catch (const std::exception&) {
          }
        }
        return "'" + text + "' is not iid or label:ALPHA with ALPHA above 0 (e.g. label:0.5)";
      })
      ->capture_default_str();
  app.add_option("--seed", seed, "seed of the initial model and of the data order")->capture_default_str();
  app.add_option("--data", data_dir, "folder with the Fashion-MNIST IDX gzip files")->capture_default_str();
  app.add_option("--threads", threads,
                 "LibTorch intra-op threads per worker (default: OMP_NUM_THREADS, which aikido-run sets)")
      ->check(at_least(0, true, "a number of threads (0: the default)"));
  app.add_option("--max-steps", max_steps, "stop each epoch after this many steps (0: the whole epoch)")
      ->check(at_least(0, true, "a number of steps (0: the whole epoch)"));
  app.add_option("--policy", policies,
                 "adaptation policy NAME[:key=value,...] (repeatable): adaptive-batch, strategy-switch, schedule, or "
                 "one registered by the program");
  app.add_option("--monitor", monitor, "gradient statistics and timing inside the step: on or off")
      ->check(CLI::IsMember({"on", "off"}))
      ->capture_default_str();
  app.add_option("--target-accuracy", target_accuracy,
                 "stop after the first epoch whose test accuracy reaches this (0: train all epochs)")
      ->check(between(0, 1, "an accuracy from 0 to 1"));
  app.add_option("--eval-every", eval_every,
                 "with --target-accuracy: also test after every this many samples (all workers') inside an epoch and "
                 "stop as soon as the target is reached; the last epoch's line then covers part of an epoch and its "
                 "seconds exclude the tests (0: test at the end of each epoch only)")
      ->check(at_least(0, true, "a number of samples (0: test at the end of each epoch only)"));
  app.add_flag("--elastic", elastic,
               "follow the job's membership: survive resizes and lost workers, new workers get the model, optimizer "
               "state and data position (on by itself under aikido-run --elastic)");
  app.add_option("--commit-every", commit_every, "elastic: commit the training state every this many steps")
      ->check(at_least(1, true, "a number of steps (1 or more)"))
      ->capture_default_str();
  app.add_option("--output", output,
                 "json: one JSON line per epoch on stdout; text: progress on stderr (on a terminal one line updated "
                 "in place with epoch, step, samples/s, loss and ETA; otherwise one line per epoch); both")
      ->check(CLI::IsMember({"json", "text", "both"}))
      ->capture_default_str();
  app.add_flag("--all-ranks", all_ranks, "every rank prints its epoch lines (default: rank 0 alone)");
  app.add_flag("--count-samples", count_samples,
               "check: every step also sums the workers' batch sizes and a fingerprint of their sample indices (one "
               "16-byte allreduce), kept with the training state; the epoch line then says how many samples were "
               "trained and whether each index was trained exactly once (iid partition only)");
  app.add_flag("--skip-communication", skip_communication,
               "benchmarks only: every worker trains alone on its shard, without communication (the throughput "
               "ceiling of the same run)");
  app.footer(
      "Rank 0 (every rank with --all-ranks) prints one JSON line per epoch, keys in this order: epoch, rank, workers, "
      "test_accuracy (0 to 1), train_loss (mean over all workers' samples), seconds (the epoch's training time: the "
      "slowest worker's, so the same on every worker), steps (steps taken since the start, all epochs), samples "
      "(this worker's), global_samples (all workers'; it counts the samples whose updates are in the model, so it "
      "equals the training set size in every epoch, resizes and lost workers included), samples_per_second (this "
      "worker's), global_samples_per_second, batch_size (per worker), lr, strategy, model, threads (LibTorch "
      "intra-op threads), cluster_version, and the gradient statistics as they stand at the end of the epoch: "
      "noise_scale, gradient_variance, snr (null until measured); then bytes_sent (this worker's bytes put on the "
      "wire during the epoch: written to its connections, framing included; same-host shared memory counts none), "
      "compression, and epsilon (differential privacy spent so far, at --dp-delta; null without --dp-clip). Before "
      "training, rank 0 prints a line that starts "
      "with 'train_fashion_mnist: starting:' and gives the configuration (stderr); a job that resumed from a "
      "checkpoint says from where. With --count-samples the line ends with trained_samples (the samples all workers "
      "trained in the epoch, counted step by step and rolled back with the model) and samples_once (true when the "
      "epoch trained every index of the training set exactly once). At the end, rank 0 (every rank with --all-ranks) "
      "prints 'train_fashion_mnist: finished: ...' on stderr with a digest of its parameters (equal on every worker "
      "exactly when the models are).");
  CLI11_PARSE(app, argc, argv);

  try {
    if (threads == 0) {
      if (const char* omp = std::getenv("OMP_NUM_THREADS")) threads = std::atoi(omp);
    }
    if (threads > 0) torch::set_num_threads(threads);
    const aikido::torch::Strategy strategy = aikido::torch::parse_strategy(strategy_name);
    if (eval_every > 0 && target_accuracy <= 0) {
      throw aikido::ConfigError("--eval-every needs --target-accuracy (it tests only to stop at the target)");
    }
    if (dp_clip == 0 && (dp_noise > 0 || app.count("--dp-delta") > 0)) {
      throw aikido::ConfigError(
          "--dp-noise and --dp-delta need --dp-clip (the norm each gradient or update is "
          "clipped to)");
    }
    const aikido::Compression compression = aikido::Compression::parse(compression_name);
    const double partition_alpha = partition == "iid" ? 0.0 : std::stod(partition.substr(6));
    if (count_samples && (partition_alpha > 0 || strategy == aikido::torch::Strategy::pair_averaging)) {
      throw aikido::ConfigError(
          "--count-samples needs --partition iid and a strategy whose workers step together (not pair)");
    }
    auto policy_objects = aikido::torch::PolicyRunner::make(policies);  // bad specs fail before any work

    // With --elastic the session owns the Peer, follows the job's membership and carries the training state across
    // resizes and lost workers; no collective may run before its first sync() (workers joining later start there).
    std::unique_ptr<aikido::ElasticSession> session;
    std::optional<aikido::Peer> own_peer;
    if (elastic) {
      session = aikido::ElasticSession::from_env();
    } else {
      own_peer.emplace(aikido::Peer::from_env());
    }
    aikido::Peer& peer = session ? session->peer() : *own_peer;
    const Split train = load_split(data_dir, "train");
    const Split test = load_split(data_dir, "t10k");

    torch::manual_seed(seed);
    torch::nn::Sequential model = make_model(model_kind);
    torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(lr).momentum(momentum));
    if (!session) aikido::torch::broadcast_parameters(peer, model->named_parameters(), /*root=*/0);
    // DP-SGD clips every sample's gradient: the training steps run the model through PerSampleGradients.
    std::unique_ptr<aikido::torch::PerSampleGradients> per_sample;
    if (dp_clip > 0 && strategy == aikido::torch::Strategy::synchronous_sgd) {
      per_sample = std::make_unique<aikido::torch::PerSampleGradients>(model);
    }
    std::unique_ptr<aikido::torch::DistributedOptimizer> opt;
    std::unique_ptr<aikido::torch::PolicyRunner> runner;
    if (!skip_communication) {
      aikido::torch::DistributedOptimizerOptions options;
      options.monitor = monitor == "on";
      options.seed = seed;
      options.collective_setup = !session;
      options.local_steps = local_steps;
      options.round_deadline = std::chrono::milliseconds(std::llround(round_deadline * 1000));
      options.outer_lr = outer_lr;
      options.compression = compression;
      options.secure_aggregation = secure_aggregation;
      if (dp_clip > 0) {
        aikido::torch::PrivacyOptions privacy;
        privacy.clip = dp_clip;
        privacy.noise_multiplier = dp_noise;
        privacy.delta = dp_delta;
        privacy.dataset_size = train.images.size(0);
        options.privacy = privacy;
      }
      opt = std::make_unique<aikido::torch::DistributedOptimizer>(peer, sgd, model->named_parameters(), strategy,
                                                                  options);
      if (per_sample) opt->set_per_sample_gradients(per_sample.get());
      runner = std::make_unique<aikido::torch::PolicyRunner>(*opt, batch_size, std::move(policy_objects));
    } else if (!policies.empty() || session) {
      throw aikido::ConfigError("--policy and --elastic need communication: drop --skip-communication");
    } else if (dp_clip > 0 || secure_aggregation || compression.kind != aikido::Compression::Kind::none) {
      throw aikido::ConfigError(
          "--dp-clip, --secure-aggregation and --compression need communication: drop --skip-communication");
    }
    aikido::torch::DistributedSampler sampler(static_cast<std::size_t>(train.images.size(0)), peer, seed);
    ProgressLine console(output != "json" && peer.rank() == 0 && !all_ranks, epochs, sampler.dataset_size());

    // What the cluster agrees on; with --elastic registered, committed every --commit-every steps and at the end of
    // each epoch, and rolled back after a lost worker. A worker that joins receives it, so it knows whether the epoch
    // has begun (before_epoch ran) and where tests and --max-steps fall, like the members.
    struct Progress {
      std::int64_t step = 0;
      std::uint64_t epoch_samples = 0;  // samples of this epoch whose updates are in the model
      std::int64_t steps_in_epoch = 0;
      bool epoch_begun = false;
      std::int64_t trained_samples = 0;      // --count-samples: all workers' samples of this epoch, and their
      std::int64_t trained_fingerprint = 0;  // indices' fingerprints summed
    } progress;
    if (session) {
      if (runner) runner->set_elastic_session(session.get());
      if (opt) opt->set_elastic_session(session.get());
      aikido::torch::register_state(*session, model->named_parameters(), sgd, sampler);
      session->register_value("progress", progress);
    }
    if (runner) runner->before_train();

    // Test accuracy: each worker evaluates its share of the test set; the counts are summed (a collective).
    const auto evaluate = [&] {
      model->eval();
      double correct = 0;
      {
        torch::NoGradGuard no_grad;
        const std::int64_t n = test.images.size(0);
        const std::int64_t begin = n * peer.rank() / peer.size(), end = n * (peer.rank() + 1) / peer.size();
        for (std::int64_t b = begin; b < end; b += 1000) {
          const std::int64_t len = std::min<std::int64_t>(1000, end - b);
          const auto predicted = model->forward(test.images.narrow(0, b, len)).argmax(1);
          correct += predicted.eq(test.labels.narrow(0, b, len)).sum().item<double>();
        }
      }
      std::vector<double> total{correct};
      peer.allreduce(std::span<double>(total), aikido::ReduceOp::sum, "example/test-correct");
      model->train();
      return total[0] / static_cast<double>(test.images.size(0));
    };

    // --partition label:ALPHA: every worker trains on its own shard of a Dirichlet split (made again when the
    // cluster's size changes). Steps still follow the sampler, so every worker takes the same number; a worker's
    // batch is the next samples of its shard, in an order drawn per epoch, at the place the global position gives.
    std::vector<std::vector<std::int64_t>> shards;
    int shards_for = 0;
    std::vector<std::int64_t> shard_order;
    std::int64_t shard_order_epoch = -1;
    const auto shard_batch = [&](std::size_t position, std::size_t count) {
      if (shards_for != peer.size()) {
        shards = aikido::torch::dirichlet_partition(train.labels, peer.size(), partition_alpha, seed);
        shards_for = peer.size();
        shard_order_epoch = -1;
      }
      if (shard_order_epoch != sampler.epoch()) {
        shard_order = shards[static_cast<std::size_t>(peer.rank())];
        std::mt19937_64 rng(seed * 1000003 + static_cast<std::uint64_t>(sampler.epoch()) * 7919 +
                            static_cast<std::uint64_t>(peer.rank()));
        std::shuffle(shard_order.begin(), shard_order.end(), rng);
        shard_order_epoch = sampler.epoch();
      }
      std::vector<std::size_t> indices;
      if (shard_order.empty()) return indices;  // a worker the split gave nothing: it contributes no samples
      const std::size_t first = position / static_cast<std::size_t>(peer.size());
      for (std::size_t k = 0; k < count; ++k) {
        indices.push_back(static_cast<std::size_t>(shard_order[(first + k) % shard_order.size()]));
      }
      return indices;
    };

    // This worker's own view of the current epoch.
    std::int64_t printed_epoch = -1;
    std::uint64_t bytes_at_start = 0;  // peer.bytes_sent() when the epoch began
    double loss_sum = 0;
    std::int64_t samples = 0;
    double test_seconds = 0;  // time of this epoch's tests inside the epoch (--eval-every), not counted as training
    double reached = -1;      // the accuracy of a test inside the epoch that reached the target
    auto start = std::chrono::steady_clock::now();
    const auto test_every = static_cast<std::uint64_t>(std::max<std::int64_t>(eval_every, 1));
    bool done = false;
    bool started = false;
    while (!done && sampler.epoch() < epochs) {
      try {
        if (session) {
          if (opt) opt->finish_pending();
          const aikido::SyncResult r = session->sync(progress.step);
          if (r == aikido::SyncResult::removed) return 0;
          if (r == aikido::SyncResult::changed && opt) opt->on_cluster_change();
        }
        if (!started) {  // after the first sync(): a new or resumed worker has the cluster's state now
          started = true;
          if (peer.rank() == 0) {
            std::ostringstream line;
            line << "train_fashion_mnist: starting: " << peer.size() << (peer.size() == 1 ? " worker" : " workers")
                 << ", model " << model_kind << ", strategy "
                 << (opt ? aikido::torch::strategy_name(opt->strategy()) : "none (--skip-communication)") << ", "
                 << epochs << (epochs == 1 ? " epoch" : " epochs") << " of " << sampler.dataset_size()
                 << " samples, batch " << batch_size << " per worker (" << batch_size * peer.size() << " in all), lr "
                 << lr << ", momentum " << momentum << ", seed " << seed << ", " << torch::get_num_threads()
                 << " LibTorch thread" << (torch::get_num_threads() == 1 ? "" : "s") << " per worker";
            if (max_steps > 0) line << ", at most " << max_steps << " steps per epoch";
            if (opt && aikido::is_round_strategy(opt->strategy()))
              line << ", " << local_steps << " local steps per round";
            if (compression.kind != aikido::Compression::Kind::none) line << ", compression " << compression.name();
            if (dp_clip > 0) {
              line << ", differential privacy (" << (per_sample ? "DP-SGD" : "per worker") << ", clip " << dp_clip
                   << ", noise " << dp_noise << ", delta " << dp_delta << ")";
            }
            if (secure_aggregation) line << ", secure aggregation";
            if (partition_alpha > 0) line << ", partition " << partition;
            for (const auto& policy : policies) line << ", policy " << policy;
            if (session && session->elastic()) line << ", elastic (commit every " << commit_every << " steps)";
            std::cerr << line.str() << std::endl;
            if (session && session->resumed()) {
              const char* path = std::getenv("AIKIDO_RESUME");
              std::cerr << "train_fashion_mnist: resumed from " << (path ? path : "the checkpoint") << " at epoch "
                        << sampler.epoch() << " (" << progress.epoch_samples << " of " << sampler.dataset_size()
                        << " samples done), step " << progress.step << std::endl;
            }
          }
          if (sampler.epoch() >= epochs) {
            if (peer.rank() == 0) {
              std::cerr << "train_fashion_mnist: nothing left to train: the state is at epoch " << sampler.epoch()
                        << " and --epochs is " << epochs << std::endl;
            }
            break;
          }
        }
        const std::int64_t epoch = sampler.epoch();
        if (!progress.epoch_begun) {
          if (runner) runner->before_epoch(epoch);
          model->train();
          loss_sum = 0;
          samples = 0;
          progress.steps_in_epoch = 0;
          test_seconds = 0;
          reached = -1;
          start = std::chrono::steady_clock::now();
          bytes_at_start = peer.bytes_sent();
          progress.epoch_begun = true;
        }
        const std::size_t position = sampler.position();
        const std::size_t batch_now = static_cast<std::size_t>(runner ? runner->batch_size() : batch_size);
        std::optional<std::vector<std::size_t>> batch;
        if (max_steps == 0 || progress.steps_in_epoch < max_steps) batch = sampler.next_batch(batch_now);
        if (batch && partition_alpha > 0) *batch = shard_batch(position, batch->size());
        if (batch) {
          if (opt) {
            opt->zero_grad();
          } else {
            sgd.zero_grad();
          }
          if (!batch->empty()) {
            const torch::Tensor index = to_index(*batch);
            const torch::Tensor input = train.images.index_select(0, index);
            const torch::Tensor output = per_sample ? per_sample->forward(input) : model->forward(input);
            const torch::Tensor loss =
                torch::nn::functional::cross_entropy(output, train.labels.index_select(0, index));
            loss.backward();
            const double batch_loss = loss.item<double>();
            if (opt) opt->set_loss(batch_loss);
            loss_sum += batch_loss * static_cast<double>(batch->size());
            samples += static_cast<std::int64_t>(batch->size());
          }
          if (opt) {
            opt->step(static_cast<std::int64_t>(batch->size()));
          } else {
            sgd.step();
          }
          const std::uint64_t samples_before = progress.epoch_samples;
          progress.epoch_samples += sampler.position() - position;
          ++progress.step;
          ++progress.steps_in_epoch;
          if (count_samples) {
            std::vector<std::int64_t> counted{static_cast<std::int64_t>(batch->size()), 0};
            for (const std::size_t index : *batch) counted[1] += index_fingerprint(index);
            peer.allreduce(std::span<std::int64_t>(counted), aikido::ReduceOp::sum, "example/step-samples");
            progress.trained_samples += counted[0];
            progress.trained_fingerprint += counted[1];
          }
          if (peer.rank() == 0) {
            const auto per_step = static_cast<std::uint64_t>(std::max<std::size_t>(1, batch_now)) *
                                  static_cast<std::uint64_t>(peer.size());
            std::int64_t steps = static_cast<std::int64_t>((sampler.dataset_size() + per_step - 1) / per_step);
            if (max_steps > 0) steps = std::min(steps, max_steps);
            const double elapsed =
                std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() - test_seconds;
            console.step(epoch, progress.steps_in_epoch, std::max(steps, progress.steps_in_epoch),
                         progress.epoch_samples, samples > 0 ? loss_sum / static_cast<double>(samples) : 0.0, elapsed);
          }
          if (session && progress.step % commit_every == 0) session->commit();
          if (runner) {
            runner->after_step();
            if (runner->stopped()) done = true;
          }
          // A test whenever the epoch's samples pass a multiple of --eval-every: progress.epoch_samples is global, so
          // every worker tests after the same step.
          if (!done && eval_every > 0 && progress.epoch_samples / test_every > samples_before / test_every &&
              progress.epoch_samples < sampler.dataset_size()) {
            const auto test_start = std::chrono::steady_clock::now();
            const double accuracy = evaluate();
            if (opt) opt->set_test_accuracy(accuracy);
            if (accuracy >= target_accuracy) {
              reached = accuracy;
              done = true;
            }
            test_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - test_start).count();
          }
          if (!done) continue;
        }

        // The end of the epoch.
        if (runner) runner->after_epoch();
        const double seconds =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() - test_seconds;
        // Without communication nothing keeps the workers in step: one that finished first would test the model
        // while the others still train, taking their cores, and the slowest worker's time (the epoch's) would
        // count that. The ceiling then came out below the real run (CNN: 4328 against 7870 samples/s).
        if (skip_communication) peer.barrier("example/epoch-trained");
        const double accuracy = reached >= 0 ? reached : evaluate();  // the model is unchanged since that test
        if (opt) opt->set_test_accuracy(accuracy);
        std::vector<double> totals{loss_sum, static_cast<double>(samples)};
        peer.allreduce(std::span<double>(totals), aikido::ReduceOp::sum, "example/epoch-totals");
        // One synchronous epoch has one duration: the slowest worker's (each worker's own clock started when it
        // began the epoch, which the first collective of the epoch evens out, and stopped at a different moment).
        std::vector<double> slowest{seconds};
        peer.allreduce(std::span<double>(slowest), aikido::ReduceOp::max, "example/epoch-seconds");
        const double epoch_seconds = slowest[0];

        // A recovery may repeat the end of an epoch; say it once.
        if (printed_epoch < epoch && (all_ranks || peer.rank() == 0)) {
          const auto statistic = [](double v) {
            return aikido::TrainingMetrics::known(v) ? nlohmann::ordered_json(v) : nlohmann::ordered_json();
          };
          const aikido::TrainingMetrics none;
          const aikido::TrainingMetrics& metrics = opt ? opt->metrics() : none;
          nlohmann::ordered_json line;  // what a reader looks for first comes first
          line["epoch"] = epoch;
          line["rank"] = peer.rank();
          line["workers"] = peer.size();
          line["test_accuracy"] = accuracy;
          line["train_loss"] = totals[1] > 0 ? totals[0] / totals[1] : 0.0;
          line["seconds"] = epoch_seconds;
          line["steps"] = progress.step;
          line["samples"] = samples;
          line["global_samples"] = progress.epoch_samples;
          line["samples_per_second"] = epoch_seconds > 0 ? static_cast<double>(samples) / epoch_seconds : 0.0;
          line["global_samples_per_second"] = epoch_seconds > 0 ? totals[1] / epoch_seconds : 0.0;
          line["batch_size"] = runner ? runner->batch_size() : batch_size;
          line["lr"] = opt ? opt->lr() : lr;
          line["strategy"] = opt ? aikido::torch::strategy_name(opt->strategy()) : "none";
          line["model"] = model_kind;
          line["threads"] = torch::get_num_threads();
          line["cluster_version"] = peer.cluster_version();
          line["noise_scale"] = statistic(metrics.noise_scale);
          line["gradient_variance"] = statistic(metrics.gradient_variance);
          line["snr"] = statistic(metrics.snr);
          line["bytes_sent"] = peer.bytes_sent() - bytes_at_start;
          line["compression"] = opt ? opt->compression().name() : "none";
          line["epsilon"] =
              opt && opt->accountant() ? statistic(opt->accountant()->epsilon(dp_delta)) : nlohmann::ordered_json();
          if (count_samples) {
            std::int64_t expected = 0;
            for (std::size_t i = 0; i < sampler.dataset_size(); ++i) expected += index_fingerprint(i);
            line["trained_samples"] = progress.trained_samples;
            line["samples_once"] = progress.trained_samples == static_cast<std::int64_t>(sampler.dataset_size()) &&
                                   progress.trained_fingerprint == expected;
          }
          if (output != "text") std::cout << line.dump() << std::endl;
          console.epoch_done(epoch, progress.steps_in_epoch, line["train_loss"].get<double>(), accuracy,
                             line["global_samples_per_second"].get<double>(), epoch_seconds, peer.size());
        }
        printed_epoch = std::max(printed_epoch, epoch);
        if (target_accuracy > 0 && accuracy >= target_accuracy) done = true;
        if (runner && runner->stopped()) {
          if (peer.rank() == 0) {
            std::cerr << "train_fashion_mnist: stopped by policy: " << runner->stop_reason() << std::endl;
          }
          done = true;
        }
        sampler.set_epoch(epoch + 1);
        progress.epoch_samples = 0;
        progress.trained_samples = 0;
        progress.trained_fingerprint = 0;
        progress.epoch_begun = false;
        if (session) session->commit();
      } catch (const aikido::PeerLostError& e) {
        if (!session) throw;
        if (!recover(*session, opt.get(), e.what())) return 0;
      } catch (const aikido::TimeoutError& e) {
        if (!session) throw;
        if (!recover(*session, opt.get(), e.what())) return 0;
      }
    }
    // The metrics of the last step travel in an allreduce that the next step would wait for: wait here, so that the
    // last values published (aikido-run's summary) count every step.
    if (opt) opt->finish_pending();
    if (runner) runner->after_train();
    if (all_ranks || peer.rank() == 0) {
      std::cerr << "train_fashion_mnist: finished: rank " << peer.rank() << " of " << peer.size() << ", epoch "
                << sampler.epoch() << ", step " << progress.step << ", cluster version " << peer.cluster_version()
                << ", parameters " << parameters_digest(*model) << std::endl;
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "train_fashion_mnist: " << e.what() << std::endl;
    return 1;
  }
}
