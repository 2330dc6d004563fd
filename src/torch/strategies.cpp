// The DistributedOptimizer's compression codecs, round strategies (local SGD, federated averaging, DiLoCo),
// differential privacy and secure aggregation (include/aikido/torch.hpp). Buckets and slots: optimizer_parts.hpp.
#include <ATen/CPUGeneratorImpl.h>

#include <aikido/elastic.hpp>
#include <aikido/torch.hpp>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <unordered_map>

#include "base/bytes.hpp"
#include "base/error.hpp"
#include "base/log.hpp"
#include "compress/codecs.hpp"
#include "optimizer_parts.hpp"

namespace aikido::torch {

using detail::str_cat;
using internal::kPrefix;
using internal::seconds_between;

// ---------------------------------------------------------------------------------------------------------------
// Codecs. Each averages one float32 bucket: encode, one or two collectives, decode into the bucket.

namespace internal {
namespace {

template <class T>
std::span<T> span_of(const ::torch::Tensor& t) {
  return std::span<T>(static_cast<T*>(t.data_ptr()), static_cast<std::size_t>(t.numel()));
}

// Waits for `work` if it is running, dropping its error: for abandon().
void quietly_wait(Work& work, bool& running) noexcept {
  if (!running) return;
  running = false;
  try {
    work.wait();
  } catch (...) {
  }
}

// fp16 and bf16: the bucket rounded to 16 bits (round to nearest even, as src/compress does; LibTorch's vectorised
// conversion) and averaged in that type by one allreduce.
class HalfCodec final : public BucketCodec {
 public:
  HalfCodec(const ::torch::Tensor& flat, ::torch::ScalarType type)
      : flat_(flat), wire_(::torch::empty_like(flat, ::torch::TensorOptions().dtype(type))) {}
  void start(Peer& peer, const std::string& name) override {
    wire_.copy_(flat_);
    work_ = internal::post_tensor(peer, detail::CollectiveKind::allreduce, wire_, ReduceOp::mean, 0, name);
    running_ = true;
  }
  void finish(Peer&) override {
    running_ = false;
    work_.wait();
    flat_.copy_(wire_);
  }
  void abandon() noexcept override { quietly_wait(work_, running_); }
  void reset() override {}

 private:
  ::torch::Tensor flat_, wire_;
  Work work_;
  bool running_ = false;
};

// int8 blocks and top-k pairs: each worker's encoding is gathered (their sum would not fit the encoding), then
// every worker decodes all of them and takes the mean.
class GatherCodec : public BucketCodec {
 public:
  explicit GatherCodec(const ::torch::Tensor& flat) : flat_(flat) {}
  void finish(Peer& peer) override {
    running_ = false;
    work_.wait();
    auto out = span_of<float>(flat_);
    std::fill(out.begin(), out.end(), 0.0f);
    const std::size_t part = encoded_size();
    for (int r = 0; r < peer.size(); ++r) decode_add(r, part, out);
    const float inverse = 1.0f / static_cast<float>(peer.size());
    for (float& v : out) v *= inverse;
  }
  void abandon() noexcept override { quietly_wait(work_, running_); }

 protected:
  virtual std::size_t encoded_size() const = 0;
  virtual void decode_add(int rank, std::size_t part, std::span<float> out) const = 0;
  ::torch::Tensor flat_;
  Work work_;
  bool running_ = false;
};

class Int8Codec final : public GatherCodec {
 public:
  explicit Int8Codec(const ::torch::Tensor& flat)
      : GatherCodec(flat), wire_(compress::int8_encoded_bytes(static_cast<std::size_t>(flat.numel()))) {}
  void start(Peer& peer, const std::string& name) override {
    compress::encode_int8(span_of<const float>(flat_), wire_);
    gathered_.resize(wire_.size() * static_cast<std::size_t>(peer.size()));
    work_ = peer.allgather_async(std::span<const std::uint8_t>(wire_), std::span<std::uint8_t>(gathered_), name);
    running_ = true;
  }
  void reset() override {}

 private:
  std::size_t encoded_size() const override { return wire_.size(); }
  void decode_add(int rank, std::size_t part, std::span<float> out) const override {
    compress::decode_int8_add(std::span<const std::uint8_t>(gathered_).subspan(rank * part, part), out);
  }
  std::vector<std::uint8_t> wire_, gathered_;
};

class TopKCodec final : public GatherCodec {
 public:
  TopKCodec(const ::torch::Tensor& flat, double fraction)
      : GatherCodec(flat), topk_(static_cast<std::size_t>(flat.numel()), fraction), wire_(2 * topk_.k()) {}
  void start(Peer& peer, const std::string& name) override {
    topk_.encode(span_of<const float>(flat_), wire_);
    gathered_.resize(wire_.size() * static_cast<std::size_t>(peer.size()));
    work_ = peer.allgather_async(std::span<const std::int32_t>(wire_), std::span<std::int32_t>(gathered_), name);
    running_ = true;
  }
  void reset() override { topk_.reset(); }

 private:
  std::size_t encoded_size() const override { return wire_.size(); }
  void decode_add(int rank, std::size_t part, std::span<float> out) const override {
    compress::TopK::decode_add(std::span<const std::int32_t>(gathered_).subspan(rank * part, part), out);
  }
  compress::TopK topk_;
  std::vector<std::int32_t> wire_, gathered_;
};

// PowerSGD (Vogels et al. 2019). Every slot of 2 or more dimensions whose rank-r factors are smaller than it is a
// matrix M (rows x the rest), with this worker's error feedback added. Round one averages P = M Q (Q: the last
// step's, the same on every worker) together with the slots that travel as they are; P's columns are then made
// orthonormal, round two averages Q = M^T P, and the bucket receives P Q^T. Its difference from M is the new
// error feedback.
class PowerSgdCodec final : public BucketCodec {
 public:
  PowerSgdCodec(const ::torch::Tensor& flat, std::vector<SlotShape> slots, int rank, std::uint64_t seed)
      : flat_(flat), rank_(rank), seed_(seed) {
    std::int64_t first = 0, second = 0;
    for (const SlotShape& slot : slots) {
      std::int64_t numel = 1;
      for (auto d : slot.sizes) numel *= d;
      const std::int64_t rows = slot.sizes.empty() ? 1 : slot.sizes[0];
      const std::int64_t cols = rows > 0 ? numel / rows : 0;
      if (slot.sizes.size() >= 2 && (rows + cols) * rank < rows * cols) {
        Matrix m;
        m.offset = slot.offset;
        m.rows = rows;
        m.cols = cols;
        m.m = ::torch::zeros({rows, cols});
        m.error = ::torch::zeros({rows, cols});
        m.p_offset = first;
        m.q_offset = second;
        first += rows * rank;
        second += cols * rank;
        matrices_.push_back(std::move(m));
      } else {
        plain_.push_back({slot.offset, numel, first});
        first += numel;
      }
    }
    first_ = ::torch::zeros({first});
    second_ = ::torch::zeros({std::max<std::int64_t>(second, 1)});
    reset();
  }

  void start(Peer& peer, const std::string& name) override {
    ::torch::NoGradGuard no_grad;
    for (const Plain& p : plain_) first_.narrow(0, p.wire_offset, p.numel).copy_(flat_.narrow(0, p.offset, p.numel));
    for (Matrix& m : matrices_) {
      m.m.copy_(flat_.narrow(0, m.offset, m.rows * m.cols).view({m.rows, m.cols}));
      m.m.add_(m.error);
      auto p = first_.narrow(0, m.p_offset, m.rows * rank_).view({m.rows, rank_});
      ::torch::mm_out(p, m.m, m.q);
    }
    name_ = name;
    work_ = internal::post_tensor(peer, detail::CollectiveKind::allreduce, first_, ReduceOp::mean, 0, name + "/p");
    running_ = true;
  }

  void finish(Peer& peer) override {
    ::torch::NoGradGuard no_grad;
    running_ = false;
    work_.wait();
    for (const Plain& p : plain_) flat_.narrow(0, p.offset, p.numel).copy_(first_.narrow(0, p.wire_offset, p.numel));
    if (matrices_.empty()) return;
    for (Matrix& m : matrices_) {
      auto p = first_.narrow(0, m.p_offset, m.rows * rank_).view({m.rows, rank_});
      orthonormalize(p);
      auto q = second_.narrow(0, m.q_offset, m.cols * rank_).view({m.cols, rank_});
      ::torch::mm_out(q, m.m.t(), p);
    }
    work_ = internal::post_tensor(peer, detail::CollectiveKind::allreduce, second_, ReduceOp::mean, 0, name_ + "/q");
    running_ = true;
    work_.wait();
    running_ = false;
    for (Matrix& m : matrices_) {
      auto p = first_.narrow(0, m.p_offset, m.rows * rank_).view({m.rows, rank_});
      m.q.copy_(second_.narrow(0, m.q_offset, m.cols * rank_).view({m.cols, rank_}));
      auto out = flat_.narrow(0, m.offset, m.rows * m.cols).view({m.rows, m.cols});
      ::torch::mm_out(out, p, m.q.t());
      ::torch::sub_out(m.error, m.m, out);
    }
  }

  void abandon() noexcept override { quietly_wait(work_, running_); }

  // Q starts from the same Gaussian draw on every worker; the error feedback from zero.
  void reset() override {
    for (std::size_t i = 0; i < matrices_.size(); ++i) {
      Matrix& m = matrices_[i];
      ::at::Generator generator = ::at::detail::createCPUGenerator(seed_ + 7919 * i);
      m.q = ::torch::randn({m.cols, rank_}, generator, ::torch::TensorOptions().dtype(::torch::kFloat32));
      m.error.zero_();
    }
  }

 private:
  struct Matrix {
    std::int64_t offset = 0, rows = 0, cols = 0;
    std::int64_t p_offset = 0, q_offset = 0;
    ::torch::Tensor m, error, q;
  };
  struct Plain {
    std::int64_t offset = 0, numel = 0, wire_offset = 0;
  };

  // Gram-Schmidt on the columns; every worker holds the same P, so every worker gets the same basis. A column that
  // vanishes (the matrix has lower rank) stays zero instead of dividing by zero.
  static void orthonormalize(const ::torch::Tensor& p) {
    for (std::int64_t i = 0; i < p.size(1); ++i) {
      auto column = p.select(1, i);
      for (std::int64_t j = 0; j < i; ++j) {
        const auto other = p.select(1, j);
        column.sub_(other * column.dot(other));
      }
      const double norm = column.norm().item<double>();
      if (norm > 1e-12) column.div_(norm);
    }
  }

  ::torch::Tensor flat_;
  int rank_;
  std::uint64_t seed_;
  std::vector<Matrix> matrices_;
  std::vector<Plain> plain_;
  ::torch::Tensor first_, second_;
  std::string name_;
  Work work_;
  bool running_ = false;
};

}  // namespace

std::unique_ptr<BucketCodec> make_codec(const Compression& compression, const ::torch::Tensor& flat,
                                        std::vector<SlotShape> slots, std::uint64_t seed) {
  switch (compression.kind) {
    case Compression::Kind::none:
      return nullptr;
    case Compression::Kind::fp16:
      return std::make_unique<HalfCodec>(flat, ::torch::kHalf);
    case Compression::Kind::bf16:
      return std::make_unique<HalfCodec>(flat, ::torch::kBFloat16);
    case Compression::Kind::int8:
      return std::make_unique<Int8Codec>(flat);
    case Compression::Kind::topk:
      return std::make_unique<TopKCodec>(flat, compression.fraction);
    case Compression::Kind::powersgd:
      return std::make_unique<PowerSgdCodec>(flat, std::move(slots), compression.rank, seed);
  }
  return nullptr;
}

}  // namespace internal

// ---------------------------------------------------------------------------------------------------------------
// Options and privacy

void DistributedOptimizer::check_allowed(Strategy strategy, const Compression& compression) const {
  const char* name = strategy_name(strategy);
  if (options_.privacy && (strategy == Strategy::synchronous_averaging || strategy == Strategy::pair_averaging)) {
    throw ConfigError(
        str_cat("DistributedOptimizer: differential privacy is supported with synchronous_sgd (DP-SGD) "
                "and the round strategies (local_sgd, federated_averaging, diloco), not with ",
                name));
  }
  if (options_.secure_aggregation && !is_round_strategy(strategy)) {
    throw ConfigError(
        str_cat("DistributedOptimizer: secure aggregation averages the updates of the round strategies "
                "(local_sgd, federated_averaging, diloco), not ",
                name));
  }
  if (options_.secure_aggregation && compression.kind != Compression::Kind::none) {
    throw ConfigError(
        str_cat("DistributedOptimizer: secure aggregation sums fixed-point values and cannot also use "
                "compression ",
                compression.name(), ": choose one"));
  }
  if (is_round_strategy(strategy) && options_.local_steps < 1) {
    throw ConfigError(str_cat("DistributedOptimizer: local_steps ", options_.local_steps, " must be 1 or more"));
  }
  if (strategy == Strategy::diloco &&
      (!(options_.outer_lr > 0) || !(options_.outer_momentum >= 0 && options_.outer_momentum < 1))) {
    throw ConfigError(str_cat("DistributedOptimizer: diloco needs outer_lr > 0 and 0 <= outer_momentum < 1 (got ",
                              options_.outer_lr, " and ", options_.outer_momentum, ")"));
  }
  // A switch between per-sample and per-worker privacy would compose two guarantees about different units.
  if (privacy_ && accountant_ && accountant_->steps() > 0 &&
      is_round_strategy(strategy) != is_round_strategy(strategy_)) {
    throw ConfigError(str_cat("DistributedOptimizer: cannot switch from ", strategy_name(strategy_), " to ", name,
                              " with differential privacy: its guarantee is per sample under synchronous_sgd and per "
                              "worker under the round strategies, and the two do not compose"));
  }
}

void DistributedOptimizer::setup_privacy() {
  if (options_.secure_aggregation) secure_ = std::make_unique<SecureAggregator>(peer_);
  if (!options_.privacy) return;
  const PrivacyOptions& p = *options_.privacy;
  if (!(p.clip > 0) || !std::isfinite(p.clip)) {
    throw ConfigError(str_cat("DistributedOptimizer: privacy needs a clip above 0 (got ", p.clip, ")"));
  }
  if (!(p.noise_multiplier >= 0) || !std::isfinite(p.noise_multiplier)) {
    throw ConfigError(str_cat("DistributedOptimizer: the noise multiplier ", p.noise_multiplier, " must be >= 0"));
  }
  if (!(p.delta > 0 && p.delta < 1)) {
    throw ConfigError(str_cat("DistributedOptimizer: the privacy delta ", p.delta, " must be in (0, 1)"));
  }
  if (strategy_ == Strategy::synchronous_sgd && p.dataset_size < 1) {
    throw ConfigError(
        "DistributedOptimizer: DP-SGD needs PrivacyOptions::dataset_size (the training set's size) "
        "for its sampling rate");
  }
  std::uint64_t seed = p.noise_seed;
  if (seed == 0) {
    std::random_device device;
    seed = (std::uint64_t(device()) << 32) ^ device();
  }
  privacy_ = std::make_unique<Privacy>(Privacy{p, ::at::detail::createCPUGenerator(seed)});
  accountant_ = std::make_unique<RdpAccountant>();
}

void DistributedOptimizer::add_noise(const ::torch::Tensor& flat, double stddev) {
  if (stddev <= 0) return;
  ::torch::NoGradGuard no_grad;
  flat.add_(::torch::randn(flat.sizes(), privacy_->generator, flat.options()), stddev);
}

void DistributedOptimizer::set_per_sample_gradients(PerSampleGradients* grads) {
  if (grads != nullptr) {
    // Every parameter this optimizer steps must be covered: a gradient outside the clipping would escape privacy.
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      const bool covered = std::any_of(grads->parameters().begin(), grads->parameters().end(), [&](const auto& p) {
        return p.unsafeGetTensorImpl() == parameters_[i].unsafeGetTensorImpl();
      });
      if (!covered) {
        throw ConfigError(str_cat("set_per_sample_gradients: parameter '", names_[i],
                                  "' is not in the model of the PerSampleGradients"));
      }
    }
  }
  per_sample_ = grads;
}

// DP-SGD: this worker's clipped per-sample gradients, summed, plus its share of the noise, over the expected batch.
// The allreduce (mean) that follows makes it (sum over all samples + noise) / global batch.
void DistributedOptimizer::privatize_gradients(std::int64_t samples) {
  if (per_sample_ == nullptr) {
    throw ConfigError(
        "DistributedOptimizer: DP-SGD (privacy with synchronous_sgd) needs per-sample gradients: wrap the model in an "
        "aikido::torch::PerSampleGradients, run the forward pass through it and give it to "
        "set_per_sample_gradients()");
  }
  const PrivacyOptions& p = privacy_->options;
  const double batch = static_cast<double>(std::max<std::int64_t>(1, monitor_->batch_size));
  std::vector<::torch::Tensor> sums;
  if (samples > 0) {
    if (per_sample_->batch_size() != samples) {
      throw ConfigError(str_cat("DistributedOptimizer: step(", samples, ") after a forward pass of ",
                                per_sample_->batch_size(),
                                " samples through PerSampleGradients: run every step's forward pass through it"));
    }
    sums = per_sample_->clipped_sum(p.clip);
  }
  const double stddev = p.noise_multiplier * p.clip / std::sqrt(static_cast<double>(peer_.size()));
  ::torch::NoGradGuard no_grad;
  const auto& model = per_sample_->parameters();
  for (std::size_t i = 0; i < parameters_.size(); ++i) {
    const auto it = std::find_if(model.begin(), model.end(), [&](const auto& t) {
      return t.unsafeGetTensorImpl() == parameters_[i].unsafeGetTensorImpl();
    });
    ::torch::Tensor grad =
        sums.empty() ? ::torch::zeros_like(parameters_[i]) : sums[static_cast<std::size_t>(it - model.begin())].clone();
    add_noise(grad, stddev);
    grad.div_(batch);
    parameters_[i].mutable_grad() = grad;
  }
  const double rate = std::min(1.0, batch * peer_.size() / static_cast<double>(p.dataset_size));
  accountant_->step(rate, p.noise_multiplier);
}

// ---------------------------------------------------------------------------------------------------------------
// Round strategies

void DistributedOptimizer::start_round() {
  if (!rounds_) rounds_ = std::make_unique<Rounds>();
  rounds_->anchored = false;
  rounds_->local_steps = 0;
  rounds_->samples = 0;
}

// The model before the round's first local step is its anchor (the same on every worker: the models are equal when
// a round begins).
void DistributedOptimizer::anchor_round() {
  Rounds& r = *rounds_;
  r.anchors.resize(buckets_.size());
  copy_parameters_into_buckets();
  for (std::size_t b = 0; b < buckets_.size(); ++b) {
    if (!r.anchors[b].defined()) r.anchors[b] = ::torch::empty_like(buckets_[b].flat);
    r.anchors[b].copy_(buckets_[b].flat);
  }
  r.anchored = true;
  r.local_steps = 0;
  r.samples = 0;
}

void DistributedOptimizer::round_step(std::int64_t samples) {
  Rounds& r = *rounds_;
  ++r.local_steps;
  r.samples += samples;
  if (r.local_steps >= options_.local_steps) exchange_round("round");
}

// Ends the round: every worker's update (model - anchor) is clipped and noised (client-level privacy), weighted
// (federated averaging) and averaged (plain, compressed or secure), and the next round starts from the result.
void DistributedOptimizer::exchange_round(std::string_view why) {
  Rounds& r = *rounds_;
  if (!r.anchored) return;
  const auto begin = Monitor::Clock::now();
  const double n = peer_.size();
  ::torch::NoGradGuard no_grad;
  copy_parameters_into_buckets();
  for (std::size_t b = 0; b < buckets_.size(); ++b) buckets_[b].flat.sub_(r.anchors[b]);
  if (privacy_) {
    const PrivacyOptions& p = privacy_->options;
    double squares = 0;
    for (const auto& bucket : buckets_) squares += internal::sum_of_squares(bucket.flat);
    const double norm = std::sqrt(squares);
    for (auto& bucket : buckets_) {
      if (norm > p.clip) bucket.flat.mul_(p.clip / norm);
      add_noise(bucket.flat, p.noise_multiplier * p.clip / std::sqrt(n));
    }
    accountant_->step(1.0, p.noise_multiplier);
  }
  const bool weighted = strategy_ == Strategy::federated_averaging && !privacy_;
  const double weight = weighted ? static_cast<double>(r.samples) : 1.0;
  try {
    if (peer_.size() > 1) {
      double total = n;
      if (strategy_ == Strategy::federated_averaging) total = wait_for_round_arrivals(secure_ ? 1.0 : weight);
      if (secure_) {
        secure_average(weight, weighted);
      } else {
        // Scaled so that the mean over workers is the weighted mean; nobody trained (total 0): plain mean.
        if (weighted && total > 0) {
          for (auto& bucket : buckets_) bucket.flat.mul_(n * weight / total);
        }
        const std::string purpose = str_cat("round/", why);
        for (auto& bucket : buckets_) launch(bucket, purpose);
        for (auto& bucket : buckets_) finish(bucket);
      }
    }
  } catch (...) {
    wait_launched();
    reset_step();
    throw;
  }
  reset_step();
  // The buckets hold the mean update.
  for (std::size_t b = 0; b < buckets_.size(); ++b) {
    ::torch::Tensor& anchor = r.anchors[b];
    const ::torch::Tensor& mean = buckets_[b].flat;
    if (strategy_ == Strategy::diloco) {
      if (r.momentum.size() != buckets_.size()) r.momentum.resize(buckets_.size());
      if (!r.momentum[b].defined()) r.momentum[b] = ::torch::zeros_like(anchor);
      // Outer SGD with Nesterov momentum on the pseudo-gradient g = -(mean update): v = mu v + g; x -= lr (g + mu v).
      const ::torch::Tensor g = -mean;
      r.momentum[b].mul_(options_.outer_momentum).add_(g);
      anchor.sub_(g.add(r.momentum[b], options_.outer_momentum), options_.outer_lr);
    } else {
      anchor.add_(mean);
    }
    buckets_[b].flat.copy_(anchor);
  }
  copy_buckets_into_parameters();
  ++r.completed;
  r.local_steps = 0;
  r.samples = 0;
  const double seconds = seconds_between(begin, Monitor::Clock::now());
  monitor_->wait += seconds;
  monitor_->communication += seconds;
}

// Federated averaging's arrival point: an allreduce (sum) of the workers' weights that a worker enters when its local
// steps are done. With a round deadline, a worker that waited that long asks the others which round they finished.
double DistributedOptimizer::wait_for_round_arrivals(double weight) {
  Rounds& r = *rounds_;
  r.finished[0] = r.completed + 1;
  peer_.save(str_cat(kPrefix, "round/finished"), std::span<const std::int64_t>(r.finished));
  r.arrival[0] = weight;
  r.arrival_work =
      peer_.allreduce_async(std::span<double>(r.arrival), ReduceOp::sum, str_cat(kPrefix, "round/arrival"));
  r.arrival_pending = true;
  if (options_.round_deadline.count() > 0 && !r.arrival_work.wait(options_.round_deadline)) {
    const std::vector<int> stragglers = find_stragglers();
    if (!stragglers.empty()) {
      const std::string message =
          str_cat("federated averaging: rank(s) ", detail::rank_list(stragglers), " did not finish round ",
                  r.completed + 1, " within the round deadline of ", detail::seconds(options_.round_deadline),
                  " (rank ", peer_.rank(), " waited)");
      if (session_ != nullptr && session_->elastic()) {
        session_->request_removal(stragglers, "missed the round deadline");
        throw TimeoutError(str_cat(message, "; the others go on without them (recover() applies the new cluster)"));
      }
      throw TimeoutError(str_cat(message,
                                 "; in an elastic job (set_elastic_session) the others would go on without "
                                 "them, or raise round_deadline"));
    }
  }
  r.arrival_work.wait();
  r.arrival_pending = false;
  return r.arrival[0];
}

// Asks every other worker, through the peer-to-peer store (answered by its receive thread, not its training thread),
// which round it finished. Those behind, and those that cannot say, are stragglers.
std::vector<int> DistributedOptimizer::find_stragglers() {
  const Rounds& r = *rounds_;
  const int size = peer_.size();
  std::vector<std::array<std::int64_t, 1>> answers(static_cast<std::size_t>(size));
  std::vector<Work> works(static_cast<std::size_t>(size));
  for (int p = 0; p < size; ++p) {
    if (p == peer_.rank()) continue;
    works[p] = peer_.request_async(p, str_cat(kPrefix, "round/finished"), std::span<std::int64_t>(answers[p]));
  }
  std::vector<int> stragglers;
  for (int p = 0; p < size; ++p) {
    if (p == peer_.rank()) continue;
    bool behind = true;
    try {
      works[p].wait();
      behind = answers[p][0] < r.completed + 1;
    } catch (const Error&) {
      // Nothing published yet (its first round), or it does not answer.
    }
    if (behind) stragglers.push_back(p);
  }
  return stragglers;
}

// Secure aggregation of the buckets' updates (times `weight`; with `weighted`, the weight travels too): fixed point
// at a scale every worker agrees on (from the largest magnitude, an allreduce max), so that the sum of all workers'
// values fits 31 bits; masked by the SecureAggregator; the buckets receive the (weighted) mean.
void DistributedOptimizer::secure_average(double weight, bool weighted) {
  Rounds& r = *rounds_;
  const double n = peer_.size();
  std::int64_t count = 0;
  double largest = 0;
  for (auto& bucket : buckets_) {
    if (weight != 1.0) bucket.flat.mul_(weight);
    count += bucket.flat.numel();
    largest = std::max(largest, bucket.flat.abs().max().item<double>());
  }
  r.largest[0] = largest;
  peer_.allreduce(std::span<double>(r.largest), ReduceOp::max, str_cat(kPrefix, "round/secure/largest"));
  // A power of two keeps the scaling exact; the sum of n values of magnitude <= largest stays below 2^31.
  double scale = 1;
  if (r.largest[0] > 0 && std::isfinite(r.largest[0])) {
    scale = std::exp2(std::floor(std::log2(2147483647.0 / (n * r.largest[0]))));
  }
  r.secure.assign(static_cast<std::size_t>(count) + (weighted ? 1 : 0), 0);
  std::size_t offset = 0, saturated = 0;
  for (auto& bucket : buckets_) {
    const ::torch::Tensor values = bucket.flat.to(::torch::kFloat32).contiguous();
    const auto size = static_cast<std::size_t>(values.numel());
    saturated += encode_fixed_point(std::span<const float>(values.data_ptr<float>(), size), scale,
                                    std::span<std::int32_t>(r.secure).subspan(offset, size));
    offset += size;
  }
  if (saturated > 0) log::warn("secure aggregation: ", saturated, " values saturated the fixed-point range");
  if (weighted) r.secure.back() = static_cast<std::int32_t>(std::min(weight, 2147483647.0 / n));
  secure_->sum(r.secure, str_cat(kPrefix, "round/secure"));
  double divisor = n;
  if (weighted && r.secure.back() > 0) divisor = r.secure.back();
  offset = 0;
  for (auto& bucket : buckets_) {
    const auto size = static_cast<std::size_t>(bucket.flat.numel());
    ::torch::Tensor sum = ::torch::empty({bucket.flat.numel()}, ::torch::kFloat32);
    decode_fixed_point(std::span<const std::int32_t>(r.secure).subspan(offset, size), scale * divisor,
                       std::span<float>(sum.data_ptr<float>(), size));
    bucket.flat.copy_(sum);
    offset += size;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Elastic state: the round and the accountant.

namespace {

void put_tensors(detail::ByteWriter& w, const std::vector<::torch::Tensor>& tensors) {
  w.put(std::uint64_t(tensors.size()));
  for (const auto& t : tensors) {
    const ::torch::Tensor c = t.defined() ? t.contiguous() : ::torch::Tensor();
    const auto* data = c.defined() ? static_cast<const std::byte*>(c.data_ptr()) : nullptr;
    w.put_bytes(std::span<const std::byte>(data, c.defined() ? c.nbytes() : 0));
  }
}

void get_tensors(detail::ByteReader& r, std::vector<::torch::Tensor>& tensors, const std::vector<::torch::Tensor>& like,
                 const char* what) {
  const auto count = r.get<std::uint64_t>();
  tensors.assign(static_cast<std::size_t>(count), ::torch::Tensor());
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const auto bytes = r.get_bytes();
    if (bytes.empty()) continue;
    if (i >= like.size() || bytes.size() != like[i].nbytes()) {
      throw ProtocolError(str_cat("DistributedOptimizer: restored ", what, " ", i, " has ", bytes.size(),
                                  " bytes, this worker's buckets differ (different models?)"));
    }
    tensors[i] = ::torch::empty_like(like[i]);
    std::memcpy(tensors[i].data_ptr(), bytes.data(), bytes.size());
  }
}

}  // namespace

void DistributedOptimizer::set_elastic_session(ElasticSession* session) {
  session_ = session;
  if (session == nullptr) return;
  // The bucket layout first: the round's tensors below are per bucket, laid out for the size they were saved with.
  session->register_state(
      "aikido.torch/optimizer-buckets",
      [this] {
        detail::ByteWriter w;
        w.put(std::uint64_t(bucket_bytes_));
        return w.take();
      },
      [this](std::span<const std::byte> bytes) {
        detail::ByteReader reader(bytes, "DistributedOptimizer buckets");
        const auto size = reader.get<std::uint64_t>();
        reader.finish();
        if (size == 0) throw ProtocolError("DistributedOptimizer: restored a bucket size of 0 bytes");
        relayout_buckets(static_cast<std::size_t>(size), "state restored");
      });
  session->register_state(
      "aikido.torch/optimizer-rounds",
      [this] {
        detail::ByteWriter w;
        const Rounds& r = *rounds_;
        w.put(r.anchored).put(r.local_steps).put(r.samples).put(r.completed);
        put_tensors(w, r.anchored ? r.anchors : std::vector<::torch::Tensor>());
        put_tensors(w, r.momentum);
        const auto history = accountant_ ? accountant_->history() : std::vector<RdpAccountant::Steps>();
        w.put(std::uint64_t(history.size()));
        for (const auto& s : history) w.put(s.sampling_rate).put(s.noise_multiplier).put(s.count);
        return w.take();
      },
      [this](std::span<const std::byte> bytes) {
        detail::ByteReader reader(bytes, "DistributedOptimizer rounds");
        Rounds& r = *rounds_;
        const auto anchored = reader.get<bool>();
        const auto local_steps = reader.get<std::int64_t>();
        const auto samples = reader.get<std::int64_t>();
        const auto completed = reader.get<std::int64_t>();
        std::vector<::torch::Tensor> flats;
        for (const auto& bucket : buckets_) flats.push_back(bucket.flat);
        std::vector<::torch::Tensor> anchors, momentum;
        get_tensors(reader, anchors, flats, "anchor");
        get_tensors(reader, momentum, flats, "outer momentum");
        std::vector<RdpAccountant::Steps> history(static_cast<std::size_t>(reader.get<std::uint64_t>()));
        for (auto& s : history) {
          s.sampling_rate = reader.get<double>();
          s.noise_multiplier = reader.get<double>();
          s.count = reader.get<std::int64_t>();
        }
        reader.finish(" (different optimizer options?)");
        r.anchored = anchored && anchors.size() == buckets_.size();
        r.local_steps = local_steps;
        r.samples = samples;
        r.completed = completed;
        if (r.anchored) r.anchors = std::move(anchors);
        r.momentum = std::move(momentum);
        // Noise once released stays spent: a rollback never lowers the count.
        if (accountant_) {
          std::int64_t steps = 0;
          for (const auto& s : history) steps += s.count;
          if (steps > accountant_->steps()) accountant_->restore(history);
        }
      });
}

}  // namespace aikido::torch
