// Training metrics monitored inside the training step, the gradient noise-scale estimator, and their export formats.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace aikido {

class Peer;
struct LinkMatrix;  // aikido/peer.hpp

/// This worker's link to one other worker, measured by LinkMonitor with requests through the peer-to-peer model
/// store (so over the same connections and code paths as collectives).
struct LinkStats {
  int peer = -1;
  /// Half the round-trip time of an 8-byte request (median of the last round trips): one-way latency, as MPI
  /// ping-pong benchmarks report it. NaN until measured.
  double latency_seconds = std::numeric_limits<double>::quiet_NaN();
  /// Probe bytes / (time of one probe-sized request - round-trip time of a small one). NaN until measured.
  double bandwidth_bytes_per_second = std::numeric_limits<double>::quiet_NaN();
  std::int64_t probes = 0;  // probe-sized requests completed
};

/// One change a policy made (PolicyRunner): which policy, in which hook at which step, which setting ("batch_size",
/// "lr", "strategy", "topology", "workers", "stop") from what to what, and the metric values it saw.
struct PolicyDecision {
  std::int64_t step = 0;
  std::string policy;
  std::string hook;
  std::string setting;
  std::string from;
  std::string to;
  std::vector<std::pair<std::string, double>> metrics;
};

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

  // Links and traffic. slowest_link_bytes_per_second is the lowest bandwidth any worker measured to any other
  // (reduced: the same on every worker; NaN until a link was measured); bytes_sent is this worker's own count of
  // bytes written to its connections since its session began (not reduced; collectives through same-host shared
  // memory put none on a wire and count none).
  double slowest_link_bytes_per_second = kUnknown;
  std::int64_t bytes_sent = 0;
  // How often the workers installed their measured links in the Peer (Peer::set_link_matrix: the first
  // measurement, then every time a link's bandwidth moved by more than 1.5x), re-planning the collectives after it.
  std::int64_t link_matrices_installed = 0;
  std::string compression;  // what the optimizer exchanges with: "none", "fp16", "topk:0.01", ... (Compression)

  // Differential privacy spent so far: epsilon at the optimizer's delta (RdpAccountant). NaN without privacy.
  double epsilon = kUnknown;
  // This worker's own share of its last step (not reduced: stragglers show here), seconds and samples per second.
  double local_step_seconds = kUnknown;
  double local_compute_seconds = kUnknown;
  double local_communication_seconds = kUnknown;
  double local_wait_seconds = kUnknown;
  double local_samples_per_second = kUnknown;

  // What the program reports (DistributedOptimizer::set_loss, set_test_accuracy): the mean training loss of the
  // last step over all workers' samples, and the latest test accuracy (0 to 1).
  double train_loss = kUnknown;
  double test_accuracy = kUnknown;

  /// The latest policy decisions (at most kMaxDecisions, oldest first), the same on every worker.
  static constexpr std::size_t kMaxDecisions = 16;
  std::vector<PolicyDecision> decisions;

  // This worker's own links, one entry per other worker (LinkMonitor). Unlike the values above these are not
  // reduced: each worker sees its own links. Empty when link probing is off or there is one worker.
  std::vector<LinkStats> links;

  static bool known(double v) { return !std::isnan(v); }
};

/// Prometheus text exposition of `m` for one worker: one `aikido_<name>{rank="R"} value` line per known value, and
/// `aikido_link_latency_seconds{rank="R",peer="P"}` / `aikido_link_bandwidth_bytes_per_second{...}` per link.
std::string to_prometheus(const TrainingMetrics& m, int rank, bool with_help = true);
/// One JSON object (no newline); unknown values are null; `links` is an array of objects with the keys `peer`,
/// `latency_seconds`, `bandwidth_bytes_per_second` and `probes`; `decisions` an array of objects with the keys
/// `step`, `policy`, `hook`, `setting`, `from`, `to` and `metrics` (an object of the values the policy saw).
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

/// Measures latency and bandwidth of this worker's links to every other worker, a little at a time, without
/// stopping training: each call of poll() at most starts one request to one peer (round robin), so a step never
/// waits for a probe. Per peer one round is `round_trips` requests of 8 bytes (latency) and one of `probe_bytes`
/// (bandwidth). Requests go through the peer-to-peer model store: the constructor saves the two probe buffers on
/// this rank (names `aikido.link/small` and `aikido.link/probe`), and the peer's receive thread answers, so the
/// peer's training thread does no work. A peer that has no LinkMonitor (yet) or fails a request is skipped until
/// the next round; monitoring never throws into training. Not thread safe: one thread calls poll() (the training
/// thread, once per step).
class LinkMonitor {
 public:
  struct Options {
    std::chrono::milliseconds interval{5000};  // from the start of one round to the start of the next
    std::size_t probe_bytes = std::size_t(1) << 20;
    int round_trips = 5;
  };
  /// Throws ConfigError for probe_bytes of 0 or over 1 GiB, round_trips below 1, a negative interval.
  LinkMonitor(Peer& peer, Options options);
  explicit LinkMonitor(Peer& peer) : LinkMonitor(peer, Options{}) {}
  ~LinkMonitor();
  LinkMonitor(const LinkMonitor&) = delete;
  LinkMonitor& operator=(const LinkMonitor&) = delete;

  /// Records a finished request and starts the next one when due. Cheap when nothing is due (a clock read).
  void poll();
  /// Measures every link once now, blocking (about round_trips + 1 requests per peer); returns links().
  std::vector<LinkStats> measure();
  /// Waits for the request in flight and forgets what was measured when the cluster changed (call before the
  /// Peer reconnects; the next poll() starts over with the new cluster's peers).
  void finish();
  /// The latest measurement of every link (NaN where not measured yet), in peer order, self excluded.
  std::vector<LinkStats> links() const;
  /// Every worker's latest measurements as one matrix (row: the measuring worker), gathered by an allgather named
  /// "aikido/links/matrix": collective, every worker calls it at the same point and gets the same matrix, ready for
  /// Peer::set_link_matrix. NaN where a link was not measured.
  LinkMatrix matrix();

 private:
  struct State;
  std::unique_ptr<State> state_;
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
  /// The worker's rank changed (an elastic job): from the next update on it publishes under `rank`, and empties
  /// what it published under the old one.
  void set_rank(int rank);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace aikido
