// Training metrics monitored inside the training step, the gradient noise-scale estimator, and their export formats.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>

namespace aikido {

/// What a worker knows about training after a step. The LibTorch integration fills it (DistributedOptimizer::
/// metrics()); every value that comes from several workers is reduced across them first, so all workers hold the
/// same numbers at the same step (times are means over workers). Values that cannot be measured yet are NaN
/// (exported as null / omitted).
struct TrainingMetrics {
  static constexpr double kUnknown = std::numeric_limits<double>::quiet_NaN();

  std::int64_t step = 0;  // steps completed
  std::int64_t epoch = 0;
  int workers = 1;
  std::int64_t batch_size = 0;         // per worker
  std::int64_t global_batch_size = 0;  // all workers, last step
  double lr = kUnknown;
  std::string strategy;
  std::string topology;

  // Gradient statistics (McCandlish et al. 2018). From synchronous SGD every step; with model averaging from the
  // steps that sample the global gradient.
  double noise_scale = kUnknown;           // B_simple = EMA(tr Sigma) / EMA(|G|^2)
  double gradient_sq_norm = kUnknown;      // EMA of the unbiased estimate of |G|^2 (true gradient)
  double gradient_noise_trace = kUnknown;  // EMA of the estimate of tr(Sigma) (per-sample gradient covariance)
  double gradient_variance = kUnknown;     // last step: mean over workers of |g_r - g|^2 (g: mean of the g_r)
  double snr = kUnknown;                   // last step: |g|^2 / gradient_variance

  // Throughput and where the step's time goes (seconds, means over workers, last step).
  double samples_per_second = kUnknown;  // all workers together
  double step_seconds = kUnknown;
  double compute_seconds = kUnknown;             // outside step(): forward, backward, data
  double communication_seconds = kUnknown;       // first gradient collective started -> last one finished
  double wait_seconds = kUnknown;                // blocked in step() waiting for communication
  double allreduce_bytes_per_second = kUnknown;  // gradient bytes / communication_seconds

  static bool known(double v) { return !std::isnan(v); }
};

/// Prometheus text exposition of `m` for one worker: one `aikido_<name>{rank="R"} value` line per known value.
std::string to_prometheus(const TrainingMetrics& m, int rank, bool with_help = true);
/// One JSON object (no newline); unknown values are null.
std::string to_json(const TrainingMetrics& m, int rank);

/// The gradient noise scale B_simple from pairs of batch sizes (McCandlish et al. 2018, appendix A.1).
///
/// With B_small the per-worker batch and |G_small|^2 the mean over workers of their local gradients' squared norms,
/// B_big the global batch and |G_big|^2 the squared norm of the averaged gradient:
///   |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
///   tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)
/// Both are noisy and unbiased; they are averaged separately (exponential moving averages) and
/// B_simple = EMA(tr Sigma) / EMA(|G|^2).
class NoiseScaleEstimator {
 public:
  /// `smoothing`: weight of a new value in the moving averages (0 < smoothing <= 1).
  explicit NoiseScaleEstimator(double smoothing = 0.05);
  /// Adds one step's measurement. Ignored when b_big <= b_small (one worker) or a value is not finite.
  void update(double b_small, double b_big, double small_sq_norm, double big_sq_norm);
  double noise_scale() const;       // NaN until the first update
  double gradient_sq_norm() const;  // EMA of |G|^2
  double noise_trace() const;       // EMA of tr(Sigma)
  std::int64_t updates() const { return updates_; }
  void reset();

 private:
  double smoothing_;
  double g2_ = 0, trace_ = 0;
  std::int64_t updates_ = 0;
};

class Store;

/// Store keys under which worker `rank` of job `job_id` publishes its metrics: Prometheus text and a JSON object.
std::string metrics_key_prometheus(const std::string& job_id, int rank);
std::string metrics_key_json(const std::string& job_id, int rank);

/// Publishes one worker's latest metrics to the job's store in the background, where aikido-run's exporters
/// (--metrics-port, --metrics-file) read them. update() only copies under a lock; a thread writes the last value
/// every `interval` and once more when the publisher is destroyed. Failures to publish are logged, never thrown:
/// monitoring must not stop training.
class MetricsPublisher {
 public:
  /// When aikido-run asked for metrics (AIKIDO_METRICS_INTERVAL and the store address are set), a publisher for
  /// `rank`; otherwise nullptr.
  static std::unique_ptr<MetricsPublisher> from_env(int rank);
  MetricsPublisher(std::shared_ptr<Store> store, std::string job_id, int rank, std::chrono::milliseconds interval);
  ~MetricsPublisher();
  MetricsPublisher(const MetricsPublisher&) = delete;
  MetricsPublisher& operator=(const MetricsPublisher&) = delete;

  void update(const TrainingMetrics& metrics);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace aikido
