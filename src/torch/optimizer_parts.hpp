// The DistributedOptimizer's internal parts, shared by its translation units: distributed.cpp (buckets, hooks,
// synchronous SGD, model and pair averaging, monitoring), strategies.cpp (compression codecs, the round strategies,
// differential privacy and secure aggregation) and privacy.cpp (per-sample gradients).
//
// Terms. A *slot* is one parameter's place in a bucket. A *bucket* is a flat buffer of one dtype holding several
// parameters (gradients for synchronous SGD, values for model averaging, updates for the round strategies),
// averaged as one unit: one collective, or the few collectives of its codec.
#pragma once

#include <aikido/torch.hpp>
#include <algorithm>
#include <array>
#include <chrono>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/reduce.hpp"

namespace aikido::torch {

namespace internal {

inline constexpr std::string_view kPrefix = "aikido.torch/";
/// A link whose measured bandwidth moved by more than this factor (either way) since the installed link matrix has
/// every worker install a new one (DistributedOptimizer::install_links): the topology and segments are re-planned.
inline constexpr double kLinkChange = 1.5;

inline Work post_tensor(Peer& peer, detail::CollectiveKind kind, ::torch::Tensor& tensor, ReduceOp op, int root,
                        std::string_view name) {
  const auto count = static_cast<std::size_t>(tensor.numel());
  return peer.post({kind, dtype_of_tensor(tensor), op, root, tensor.data_ptr(), tensor.data_ptr(), count, count, name});
}

// Sum of squares of a contiguous 1-D tensor. float32 (the common case) in one vectorised pass over memory that is
// usually still in cache; other types through LibTorch.
inline double sum_of_squares(const ::torch::Tensor& t) {
  if (t.scalar_type() == ::torch::kFloat32 && t.is_contiguous()) {
    return detail::sum_of_squares(t.data_ptr<float>(), static_cast<std::size_t>(t.numel()));
  }
  return t.to(::torch::kFloat64).square().sum().item<double>();
}

// dst = src (dst contiguous, same numel), returning the sum of squares of the values when `measure`: one pass over
// the gradient instead of a copy and a second read.
inline double copy_measuring(const ::torch::Tensor& dst, const ::torch::Tensor& src, bool measure) {
  if (!measure || dst.scalar_type() != ::torch::kFloat32 || src.scalar_type() != ::torch::kFloat32 ||
      !src.is_contiguous()) {
    dst.copy_(src.reshape(-1));
    return measure ? sum_of_squares(dst) : 0.0;
  }
  return detail::copy_sum_of_squares(dst.data_ptr<float>(), src.data_ptr<float>(),
                                     static_cast<std::size_t>(dst.numel()));
}

inline double seconds_between(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

/// One slot's place and shape, for codecs that look at matrices (PowerSGD).
struct SlotShape {
  std::int64_t offset = 0;  // elements into the bucket
  std::vector<std::int64_t> sizes;
};

/// Averages one float32 bucket across the workers in compressed form (aikido/compression.hpp). The codec keeps the
/// bucket's tensor (same memory) and its own state: error-feedback residuals, PowerSGD's matrices.
class BucketCodec {
 public:
  virtual ~BucketCodec() = default;
  /// Encodes the bucket's values and starts the first collective; the bucket must stay untouched until finish().
  virtual void start(Peer& peer, const std::string& name) = 0;
  /// Waits for the collectives (running any later ones) and writes the mean over workers into the bucket.
  virtual void finish(Peer& peer) = 0;
  /// Waits for collectives in flight, ignoring their errors (after a failure, before the buffers are reused).
  virtual void abandon() noexcept = 0;
  /// Forgets error feedback and warm starts (the cluster or the exchanged quantity changed).
  virtual void reset() = 0;
};

/// A codec for `compression` on the float32 bucket `flat` whose slots are `slots`; nullptr for Compression::none
/// (the bucket goes as is). `seed` makes PowerSGD's first Q the same on every worker.
std::unique_ptr<BucketCodec> make_codec(const Compression& compression, const ::torch::Tensor& flat,
                                        std::vector<SlotShape> slots, std::uint64_t seed);

}  // namespace internal

struct DistributedOptimizer::Slot {
  std::size_t bucket = 0;
  std::int64_t offset = 0;  // elements into the bucket
  std::int64_t numel = 0;
  bool ready = false;  // its gradient of this step is in the bucket
  // Synchronous SGD: after step() the parameter's .grad() is this tensor, which shares the bucket's memory (the
  // averaged gradient, without a copy back). Made with from_blob, not as a view of the bucket, so that LibTorch's
  // zero_grad() (which detaches .grad() in place, refused for views) still works on it.
  ::torch::Tensor grad_alias;
  unsigned hook = 0;
  bool hooked = false;
};

struct DistributedOptimizer::Bucket {
  std::size_t index = 0;
  ::torch::Tensor flat;            // gradients (synchronous SGD), values (model averaging) or updates (rounds)
  std::vector<std::size_t> slots;  // parameter indices, in bucket order
  std::size_t pending = 0;         // gradients still to come this step
  bool launched = false;
  Work work;
  std::unique_ptr<internal::BucketCodec> codec;  // null: uncompressed (or not float32)
  bool coded = false;                            // the launched average runs through `codec`
};

// Monitoring state. The per-step values of all workers travel in one small float64 allreduce (sum), launched at the
// end of a step and read at the end of the next one, so that it never delays a step; the slowest link travels
// beside it in an allreduce (max) of its negated bandwidth.
struct DistributedOptimizer::Monitor {
  using Clock = std::chrono::steady_clock;
  // kLoss: loss x samples of the workers that reported a loss (set_loss), whose samples are kLossSamples.
  enum Slot { kLocalSq, kMeasured, kSamples, kCompute, kWait, kCommunication, kStep, kLoss, kLossSamples, kCount };

  explicit Monitor(double smoothing) : noise(smoothing) {}
  NoiseScaleEstimator noise;
  std::unique_ptr<MetricsPublisher> publisher;  // when aikido-run exports metrics
  std::unique_ptr<LinkMonitor> links;           // options().link_probe_interval > 0
  Clock::time_point last_step_end = Clock::now();
  Clock::time_point entry;         // this step's call of step()
  Clock::time_point first_launch;  // this step's first gradient collective
  bool launched = false;
  double local_sq = 0;                 // this step: squared norm of this worker's gradient
  bool measured = false;               // ... when it was measured (with the averaged one)
  double big_sq = 0;                   // this step: squared norm of the averaged gradient
  double wait = 0, communication = 0;  // this step, seconds
  std::int64_t gradient_bytes = 0;
  std::int64_t batch_size = 0;
  // In flight: the values of the last step, and what only this worker knows about it.
  std::array<double, kCount> values{};
  Work work;
  // Reduced by max: [0] minus the lowest bandwidth of this worker's links (-inf: none measured); [1] 1 when one of
  // this worker's links changed by more than kLinkChange since the Peer's link matrix was installed.
  std::array<double, 2> link_values{};
  Work link_work;
  // This worker's bandwidths (by peer) in the installed link matrix; empty until one was installed.
  std::vector<double> installed_bandwidth;
  bool replan_due = false;  // some worker's links changed: install the matrix at the end of this step
  bool pending = false;
  bool pending_measured = false;
  double pending_big_sq = 0;

  void note_launch() {
    if (!launched) first_launch = Clock::now();
    launched = true;
  }
};

struct DistributedOptimizer::Pull {
  int partner = -1;
  std::vector<::torch::Tensor> flats;  // one per bucket: the partner's model
  std::vector<Work> works;
  bool done() const {
    return std::all_of(works.begin(), works.end(), [](const Work& w) { return w.done(); });
  }
};

// The round strategies' state (strategies.cpp). Registered with an elastic session (set_elastic_session), so that
// a rollback restores the anchor that belongs to the restored model and a joining worker receives rank 0's.
struct DistributedOptimizer::Rounds {
  std::vector<::torch::Tensor> anchors;   // per bucket: the model the round started from, equal on every worker
  std::vector<::torch::Tensor> momentum;  // per bucket: DiLoCo's outer momentum (empty until its first round)
  bool anchored = false;
  std::int64_t local_steps = 0;  // taken in this round
  std::int64_t samples = 0;      // this worker's samples in this round
  std::int64_t completed = 0;    // rounds completed, the same on every worker
  // Federated averaging: the round's arrival point, an allreduce of the workers' weights that the deadline bounds,
  // and what this worker publishes in the peer-to-peer store when it arrives (the round it finished).
  std::array<double, 1> arrival{};
  Work arrival_work;
  bool arrival_pending = false;
  std::array<std::int64_t, 1> finished{};
  std::array<double, 1> largest{};   // secure aggregation: the largest magnitude of any worker's update (max)
  std::vector<std::int32_t> secure;  // secure aggregation: the fixed-point update (and weight)
};

struct DistributedOptimizer::Privacy {
  PrivacyOptions options;
  ::at::Generator generator;  // this worker's secret noise source
};

}  // namespace aikido::torch
