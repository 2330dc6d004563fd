// LibTorch integration: distributed optimizers, parameter and optimizer-state broadcast, a distributed sampler.
// Link `aikido::torch`. This is the only public header that includes LibTorch.
//
// Inside namespace aikido::torch, the name `torch` means this namespace; LibTorch is spelled `::torch`.
#pragma once

#include <torch/torch.h>

#include <aikido/compression.hpp>
#include <aikido/metrics.hpp>
#include <aikido/peer.hpp>
#include <aikido/policy.hpp>
#include <aikido/privacy.hpp>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace aikido {
class ElasticSession;
}

namespace aikido::torch {

using NamedParameters = ::torch::OrderedDict<std::string, ::torch::Tensor>;
class DistributedSampler;

/// How the workers of a DistributedOptimizer keep their models together (declared in aikido/policy.hpp, so that
/// policies can name it):
/// - Strategy::synchronous_sgd: gradients are averaged across workers (allreduce, mean) before every optimizer step.
///   Gradients are fused into buckets and a bucket's allreduce starts during the backward pass as soon as all its
///   gradients are ready, so communication overlaps the rest of the backward pass.
/// - Strategy::synchronous_averaging (SMA, as in KungFu and Crossbow): every worker takes a local step on its own
///   gradient, then the models are averaged across workers.
/// - Strategy::pair_averaging (AD-PSGD): after every local step the worker publishes its model in the peer-to-peer
///   model store and pulls the model of one random other worker in the background; the next step averages with it
///   once it has arrived. No worker ever waits for all others.
///
/// The round strategies communicate once per round of `local_steps` (K) local steps. A round starts from a model
/// equal on every worker (its *anchor*); each worker takes K steps of its own optimizer on its own batches; then
/// every worker's update (its model minus the anchor) is averaged, through the options' compression, privacy and
/// secure aggregation, and the next round starts from the new model on every worker:
/// - Strategy::local_sgd: the new model is the anchor plus the mean update. With K = 1 and the same batch sizes it
///   equals synchronous SGD for SGD with momentum (up to rounding).
/// - Strategy::federated_averaging (FedAvg, McMahan et al. 2017): the updates are averaged weighted by the samples
///   each worker trained on in the round (equal weights under differential privacy, which bounds each worker's
///   influence by the clip). A worker that leaves or joins an elastic job only changes who contributes; with
///   `round_deadline`, workers that finished their round wait that long for the others, then go on without the
///   stragglers (see DistributedOptimizerOptions::round_deadline).
/// - Strategy::diloco (DiLoCo, Douillard et al. 2023): the wrapped optimizer is the inner one; the mean update's
///   negative is a pseudo-gradient on which an outer SGD with Nesterov momentum (`outer_lr`, `outer_momentum`)
///   steps from the anchor. Quantise the exchange with `compression` (fp16, bf16, int8).
/// A change of the cluster, or a switch to another strategy, ends the current round early (an exchange of the
/// updates so far).
using Strategy = ::aikido::Strategy;
using ::aikido::parse_strategy;
using ::aikido::strategy_name;

/// The aikido element type of a tensor's dtype: float32, float64, float16, bfloat16, int32, int64, uint8.
/// ConfigError for any other.
DType dtype_of_tensor(const ::torch::Tensor& tensor);

/// Checks that every worker holds parameters with the same names, shapes and dtypes in the same order. Collective.
/// Throws MismatchError on every worker, naming the first parameter that differs and the ranks that disagree.
void check_same_parameters(Peer& peer, const NamedParameters& parameters, std::string_view what = "parameters");

/// Copies root's parameter values to every worker (fused per dtype). Collective; checks first, like
/// check_same_parameters.
void broadcast_parameters(Peer& peer, const NamedParameters& parameters, int root = 0);

/// Copies root's optimizer state (momentum buffers, Adam moments, step counts, param-group options such as the
/// learning rate) to every worker. Collective. The optimizers must have the same parameters on all workers.
void broadcast_optimizer_state(Peer& peer, ::torch::optim::Optimizer& optimizer, int root = 0);

/// Averages the parameters across workers (allreduce, mean); afterwards every worker holds equal values.
void average_parameters(Peer& peer, const NamedParameters& parameters, std::string_view name = "aikido.torch/average");

/// Differential privacy of a DistributedOptimizer (DistributedOptimizerOptions::privacy).
///
/// Under synchronous_sgd it is DP-SGD (Abadi et al. 2016): every sample's gradient is clipped to L2 norm `clip`
/// (all parameters together; per-sample gradients from PerSampleGradients), the clipped gradients are summed, and
/// Gaussian noise of standard deviation noise_multiplier * clip is added to the sum over all workers' samples before
/// it is divided by the global batch. Under local_sgd, federated_averaging and diloco it is client-level DP
/// (McMahan et al. 2018): every worker's update of a round is clipped to `clip` and the noise is added to the sum of
/// the updates. Either way each worker adds its share, noise of standard deviation noise_multiplier * clip /
/// sqrt(workers), from its own secret seed, so that the sum carries the whole noise; the guarantee is for what
/// leaves training (the models), and against the other workers only together with secure aggregation.
///
/// The RdpAccountant composes one Poisson-subsampled Gaussian step per training step (sampling rate: global batch /
/// dataset_size, as Opacus and TF-Privacy account shuffled batches) or one Gaussian step per round (sampling rate 1:
/// every present worker contributes), and metrics().epsilon reports epsilon at `delta`.
struct PrivacyOptions {
  double clip = 0;              // C > 0
  double noise_multiplier = 0;  // sigma >= 0 (0: clipping only, epsilon infinite)
  double delta = 1e-5;
  /// Training-set size (all workers' samples together): needed under synchronous_sgd for the sampling rate.
  std::int64_t dataset_size = 0;
  /// This worker's noise seed. 0: drawn from the operating system's random source. Any other value makes the noise
  /// reproducible, for tests: whoever knows the seed can remove the noise.
  std::uint64_t noise_seed = 0;
};

struct DistributedOptimizerOptions {
  /// Gradients are fused into buckets of about this many bytes (per dtype), filled in reverse order of the
  /// parameters, which is the order a backward pass produces them; each bucket's allreduce starts as soon as it is
  /// full, while the backward pass goes on. 0 (the default): sized for the links, Peer::fusion_bytes of all the
  /// gradients' bytes: 1 MiB on one host; across hosts, large enough that a bucket's allreduce spends at most 10% of
  /// its time on latencies (a fast link between hosts takes larger buckets), at most a quarter of the gradients.
  /// Re-planned whenever the link monitor installs measured links (install_links; not under pair_averaging, whose
  /// published models are per bucket) and after every cluster change (rank 0's choice), on every worker at the same
  /// step. See bucket_bytes() and set_bucket_bytes().
  std::size_t bucket_bytes = 0;
  /// Seed of the choice of partner in pair averaging (combined with the rank).
  std::uint64_t seed = 0;
  /// Monitoring (metrics()): gradient noise scale, variance and SNR, throughput and the split of the step's time.
  /// Costs a fused pass over the gradients and one small allreduce per step that runs during the next step.
  bool monitor = true;
  /// With synchronous_averaging and pair_averaging the averaged gradient is not otherwise computed: every this many
  /// steps an extra gradient allreduce measures it for the gradient statistics (0: never).
  std::int64_t gradient_sample_interval = 16;
  /// Weight of a new step in the moving averages of the noise-scale estimator.
  double noise_smoothing = 0.05;
  /// With monitoring on, the latency and bandwidth of this worker's links to every other worker are probed
  /// (LinkMonitor, metrics().links) in rounds this far apart: per peer a few 8-byte requests and one of
  /// `link_probe_bytes`, one request at a time, started from step() and answered by the peers' receive threads, so
  /// no step waits for a probe. 0: no link probing. When a link is first measured, and whenever its bandwidth
  /// moves by more than 1.5x, every worker installs all workers' links in the Peer at the same step
  /// (Peer::set_link_matrix, metrics().link_matrices_installed): Topology::automatic and the segment sizes re-plan.
  std::chrono::milliseconds link_probe_interval{5000};
  std::size_t link_probe_bytes = std::size_t(1) << 20;
  /// The constructor checks the parameters across workers (and, for pair averaging, publishes the model), which
  /// are collectives. False: it communicates nothing, for workers that join an elastic job while the others train;
  /// the ElasticSession's state transfer then checks the sizes and makes the models equal.
  bool collective_setup = true;

  /// Round strategies (local_sgd, federated_averaging, diloco): local steps per round (K >= 1).
  std::int64_t local_steps = 8;
  /// federated_averaging: how long a worker that finished its round's local steps waits for the others (0: the
  /// peer's timeout). When it expires, the workers that have not finished their round are asked who they are (the
  /// peer-to-peer store answers without their training thread); in an elastic job (set_elastic_session) the others
  /// propose the cluster without them and step() throws TimeoutError, after which recover() goes on with the
  /// present workers; without a session step() throws TimeoutError naming them.
  std::chrono::milliseconds round_deadline{0};
  /// diloco: the outer optimizer, SGD with Nesterov momentum on the pseudo-gradient (the paper's values).
  double outer_lr = 0.7;
  double outer_momentum = 0.9;
  /// What synchronous_sgd (gradients) and the round strategies (updates) exchange with (aikido/compression.hpp).
  /// Applies to float32 parameters; others travel uncompressed, and so do the models of synchronous_averaging and
  /// pair_averaging. Change it during training with set_compression().
  Compression compression;
  /// Differential privacy (PrivacyOptions). Supported with synchronous_sgd (needs set_per_sample_gradients) and the
  /// round strategies; ConfigError for the others.
  std::optional<PrivacyOptions> privacy;
  /// Round strategies: every worker's update travels in fixed point, masked with pairwise masks
  /// (SecureAggregator), so that the allreduce reveals only the sum. Not combinable with compression.
  bool secure_aggregation = false;
};

/// Per-sample gradients of a Sequential model whose layers with parameters are Linear and Conv2d layers (the other
/// layers, such as ReLU, pooling, Flatten and Dropout, may have none), for DP-SGD. Like Opacus: the forward pass
/// records each such layer's input, the backward pass the gradient at its output, and the per-sample gradients
/// are their per-sample products (for Conv2d on the unfolded input). Not thread safe.
class PerSampleGradients {
 public:
  enum class LossReduction : std::uint8_t { mean, sum };
  /// `reduction`: how the loss given to backward() combines the samples' losses. ConfigError naming the first
  /// layer with parameters that is neither Linear nor Conv2d (BatchNorm, for one, mixes samples), or a Conv2d with
  /// groups, dilation other than 1 or non-zero padding modes.
  explicit PerSampleGradients(::torch::nn::Sequential model, LossReduction reduction = LossReduction::mean);
  ~PerSampleGradients();
  PerSampleGradients(const PerSampleGradients&) = delete;
  PerSampleGradients& operator=(const PerSampleGradients&) = delete;

  /// The model's forward pass, recording what per-sample gradients need: use it instead of model->forward() in
  /// every training step, then call backward() on the loss once.
  ::torch::Tensor forward(const ::torch::Tensor& input);
  /// Samples in the last forward pass.
  std::int64_t batch_size() const;
  /// After backward(): every parameter's per-sample gradients, [batch, shape...], in named_parameters() order.
  std::vector<::torch::Tensor> per_sample() const;
  /// After backward(): every sample's gradient scaled to L2 norm at most `clip` (over all parameters together, by
  /// the factor min(1, clip / (norm + 1e-6)) as in Opacus), [batch, shape...] per parameter. `norms`, when given,
  /// receives each sample's norm before clipping ([batch], float64).
  std::vector<::torch::Tensor> clipped(double clip, ::torch::Tensor* norms = nullptr) const;
  /// After backward(): every sample's gradient clipped to L2 norm `clip` (over all parameters together), summed over
  /// the samples; one tensor per parameter, in named_parameters() order. `norms`, when given, receives each
  /// sample's norm before clipping ([batch], float64).
  std::vector<::torch::Tensor> clipped_sum(double clip, ::torch::Tensor* norms = nullptr) const;
  /// The model's parameters, in the order of per_sample() and clipped_sum().
  const std::vector<::torch::Tensor>& parameters() const;

 private:
  struct Layer;
  struct Factors;
  Factors factors(const Layer& layer) const;
  static ::torch::Tensor clip_factor(const ::torch::Tensor& squares, double clip, ::torch::Tensor* norms);
  std::vector<std::unique_ptr<Layer>> layers_;
  ::torch::nn::Sequential model_;
  LossReduction reduction_;
  std::vector<::torch::Tensor> parameters_;
  std::int64_t batch_size_ = 0;
};

/// A non-IID split of a labelled data set among `workers`, as federated-learning papers make one (Hsu et al. 2019):
/// for every class, the shares of the workers are drawn from a Dirichlet distribution with concentration `alpha`,
/// and the class's samples (in an order drawn from `seed`) are cut in those shares. Small alpha: each worker sees
/// few classes; large alpha: close to an even split. Returns each worker's sample indices, sorted. The same on every
/// worker for the same arguments. ConfigError for alpha <= 0 or workers < 1.
std::vector<std::vector<std::int64_t>> dirichlet_partition(const ::torch::Tensor& labels, int workers, double alpha,
                                                           std::uint64_t seed);

/// Wraps a LibTorch optimizer so that `step()` keeps the workers' models together by the chosen Strategy.
///
///     aikido::torch::DistributedOptimizer opt(peer, sgd, model->named_parameters(),
///                                             aikido::torch::Strategy::synchronous_sgd);
///     for (...) { opt.zero_grad(); loss = ...; loss.backward(); opt.step(); }
///
/// The constructor is collective: it checks that all workers hold the same parameters (MismatchError naming the
/// parameter and the ranks otherwise). It does not copy parameters: call broadcast_parameters first so that all
/// workers start from the same model. The parameters must be the ones `optimizer` updates and must stay alive
/// while this object exists; `peer` and `optimizer` must outlive it. One backward pass per step: with
/// synchronous_sgd a second backward before step() raises ConfigError (sum the losses instead). Parameters that get
/// no gradient in a step count as zero gradients. Not thread safe: use from the training thread.
class DistributedOptimizer {
 public:
  DistributedOptimizer(Peer& peer, ::torch::optim::Optimizer& optimizer, const NamedParameters& parameters,
                       Strategy strategy, DistributedOptimizerOptions options = {});
  ~DistributedOptimizer();
  DistributedOptimizer(const DistributedOptimizer&) = delete;
  DistributedOptimizer& operator=(const DistributedOptimizer&) = delete;

  /// Clears the gradients and prepares the next step. With synchronous_sgd on several workers the gradients become
  /// undefined (like PyTorch's set_to_none), which saves a fill: backward() then stores fresh gradients and step()
  /// replaces them by the averages, which share memory with the optimizer's communication buffers (no copy back;
  /// they stay valid until the next backward). Otherwise they are set to zero.
  void zero_grad();
  /// Completes the step: synchronous_sgd waits for the averaged gradients and steps; synchronous_averaging steps
  /// and averages the models; pair_averaging averages with the last pulled model (if any), steps, publishes and
  /// pulls the next one.
  void step();

  /// Switches strategy at a step boundary. Collective: every worker calls it after the same number of steps with
  /// the same strategy (MismatchError otherwise). Pending model pulls are finished, the parameters are averaged (a
  /// round strategy ends its round with an exchange instead) and rank 0's optimizer state is broadcast, so that all
  /// workers continue from equal models and equal state. ConfigError, before any communication, for a switch that
  /// privacy or secure aggregation do not allow (differential privacy is per sample under synchronous_sgd and per
  /// worker under the round strategies: a switch between them would mix two guarantees).
  void set_strategy(Strategy strategy);
  Strategy strategy() const { return strategy_; }

  /// Switches compression at a step boundary. Collective like set_strategy (MismatchError when workers disagree).
  /// Error-feedback residuals and PowerSGD's warm start begin anew. ConfigError with secure aggregation.
  void set_compression(Compression compression);
  Compression compression() const { return options_.compression; }

  /// The size of the buckets now (DistributedOptimizerOptions::bucket_bytes, or what was chosen for the links).
  std::size_t bucket_bytes() const { return bucket_bytes_; }
  /// Sets the bucket size at a step boundary (0: sized for the links again, as by default). Collective like
  /// set_strategy (MismatchError when workers disagree); the buckets are laid out anew, with the round strategies'
  /// anchors and momentum carried over; compression's error feedback begins anew. ConfigError between backward()
  /// and step().
  void set_bucket_bytes(std::size_t bytes);

  /// DP-SGD's per-sample gradients (synchronous_sgd with privacy): `grads` wraps the model whose forward pass the
  /// training loop runs through it; it must outlive this object. step() then clips, sums and noises them in place of
  /// the gradients backward() produced.
  void set_per_sample_gradients(PerSampleGradients* grads);
  /// The privacy accountant (null without privacy). Its state is the same on every worker.
  const RdpAccountant* accountant() const { return accountant_.get(); }

  /// Registers this optimizer's own state with an elastic session (call before its first sync(), on every worker,
  /// like every registration): the bucket size, the round of the round strategies (anchor model, local steps taken,
  /// DiLoCo's outer momentum) and the privacy accountant (a rollback never makes it forget steps: noise once released
  /// stays spent). With it, federated averaging's round deadline can leave stragglers behind. `session` must outlive
  /// this object.
  void set_elastic_session(ElasticSession* session);

  /// Sets the learning rate of every param group (the optimizer must be one whose options have `lr`, as all of
  /// LibTorch's do). Local: call it with the same value on every worker.
  void set_lr(double lr);
  double lr() const;

  /// Like step(); `samples` is the size of this worker's batch in this step (for throughput and the gradient
  /// statistics). step() counts the batch size last given to set_batch_size().
  void step(std::int64_t samples);
  /// The per-worker batch size step() assumes, and the one reported in metrics().
  void set_batch_size(std::int64_t batch_size);
  /// The epoch reported in metrics().
  void set_epoch(std::int64_t epoch) { metrics_.epoch = epoch; }
  /// This worker's mean loss over its batch of the coming step(): metrics().train_loss becomes the mean over all
  /// workers' samples (it travels in the metrics allreduce, no collective of its own).
  void set_loss(double loss) { pending_loss_ = loss; }
  /// The latest test accuracy (0 to 1), the same on every worker (the program reduces it): metrics().test_accuracy.
  void set_test_accuracy(double accuracy);
  /// Records a policy's decision in metrics().decisions (the latest TrainingMetrics::kMaxDecisions) and on the
  /// timeline (aikido-run --timeline). PolicyRunner calls it for every change it applies.
  void record_decision(PolicyDecision decision);

  /// Monitored metrics (options().monitor). Identical on all workers: values gathered from several workers are
  /// reduced across them by an allreduce that runs during the following step, so they describe the step before
  /// the last one; the rest (lr, batch size, strategy, step) are current.
  const TrainingMetrics& metrics() const { return metrics_; }

  /// Steps taken through this object; after on_cluster_change(), rank 0's count (the same on every worker).
  std::int64_t steps() const { return steps_; }

  /// Waits for the background work this optimizer started (the metrics allreduce, a model pull), so that none is in
  /// flight: call it before ElasticSession::sync(). `after_failure`: for recover(); errors of that work are dropped.
  void finish_pending(bool after_failure = false);
  /// After the cluster changed (sync() or recover() returned changed): collective on the new cluster. Every member
  /// takes rank 0's step count (steps()) and bucket size (bucket_bytes()), and pair averaging publishes the model anew.
  /// A round strategy ends its round with an exchange among the new cluster (with a registered elastic session;
  /// otherwise the models are averaged and the round starts again from the mean). Compression state begins anew. When
  /// aikido-run chose the thread count (AIKIDO_AUTO_THREADS) and the program kept it, LibTorch's intra-op threads
  /// become this host's CPUs divided by the workers now on it.
  void on_cluster_change();
  /// Sets the strategy on this worker alone, without the collectives of set_strategy(): for state that an elastic
  /// session restores on every member (PolicyRunner), followed by on_cluster_change().
  void restore_strategy(Strategy strategy);
  /// Sets the compression on this worker alone, without the consensus of set_compression(): for state that an
  /// elastic session restores on every member (PolicyRunner).
  void restore_compression(Compression compression);
  /// Sets steps() on this worker alone: for state that an elastic session restores on every member (PolicyRunner
  /// rolls the count back with the model, so that step-triggered decisions fall at the same training steps).
  void restore_steps(std::int64_t steps);
  Peer& peer() { return peer_; }
  ::torch::optim::Optimizer& optimizer() { return optimizer_; }

 private:
  struct Slot;
  struct Bucket;
  struct Pull;
  struct Rounds;
  struct Privacy;
  void build_buckets();
  std::size_t planned_bucket_bytes() const;
  void relayout_buckets(std::size_t bytes, std::string_view why);
  void install_hooks();
  void remove_hooks();
  void on_gradient(std::size_t parameter, const ::torch::Tensor& grad);
  void launch(Bucket& bucket, std::string_view purpose);
  void finish(Bucket& bucket);
  void build_codecs();
  // Round strategies and privacy (src/torch/strategies.cpp).
  void setup_privacy();
  void check_allowed(Strategy strategy, const Compression& compression) const;
  void start_round();
  void anchor_round();
  void round_step(std::int64_t samples);
  void exchange_round(std::string_view why);
  double wait_for_round_arrivals(double weight);
  std::vector<int> find_stragglers();
  void secure_average(double weight, bool weighted);
  void privatize_gradients(std::int64_t samples);
  void add_noise(const ::torch::Tensor& flat, double stddev);
  void finish_gradients(bool apply);
  void release_gradient_aliases();
  void fill_buckets_from_gradients();
  void reset_step();
  void launch_metrics(double samples, double step_seconds);
  void absorb_metrics();
  void install_links();
  void wait_launched() noexcept;
  void copy_parameters_into_buckets();
  void copy_buckets_into_parameters();
  void average_models();
  void publish_model(bool first);
  void pair_step();
  void finish_pull();
  std::string bucket_name(const Bucket& bucket, std::string_view purpose) const;

  Peer& peer_;
  ::torch::optim::Optimizer& optimizer_;
  std::vector<std::string> names_;
  std::vector<::torch::Tensor> parameters_;
  Strategy strategy_;
  DistributedOptimizerOptions options_;
  std::vector<Slot> slots_;
  std::vector<Bucket> buckets_;
  std::size_t bucket_bytes_ = 0;  // the buckets' size now (options_.bucket_bytes, or chosen for the links)
  std::int64_t steps_ = 0;
  bool hooks_installed_ = false;
  bool second_backward_ = false;   // a gradient arrived twice in one step
  std::string gradient_error_;     // an unsupported gradient seen by a hook, reported by step()
  std::exception_ptr hook_error_;  // a collective that failed to start inside a hook, rethrown by step()
  std::uint64_t rng_state_;        // pair averaging: choice of partner
  std::unique_ptr<Pull> pull_;     // pair averaging: the model being pulled
  int auto_threads_ = 0;           // the intra-op thread count aikido-run chose, while it is in force; 0: none
  bool published_ = false;         // pair averaging: every worker has published its model since the last change
  // Monitoring.
  struct Monitor;
  std::unique_ptr<Monitor> monitor_;
  TrainingMetrics metrics_;
  // Round strategies, privacy and secure aggregation.
  std::unique_ptr<Rounds> rounds_;
  std::unique_ptr<Privacy> privacy_;
  std::unique_ptr<RdpAccountant> accountant_;
  std::unique_ptr<SecureAggregator> secure_;
  PerSampleGradients* per_sample_ = nullptr;
  ElasticSession* session_ = nullptr;
  double pending_loss_ = TrainingMetrics::kUnknown;  // set_loss(), for the coming step
};

/// Runs adaptation policies (aikido/policy.hpp) in a training loop built on a DistributedOptimizer:
///
///     aikido::torch::PolicyRunner runner(opt, batch_size, aikido::torch::PolicyRunner::make({"adaptive-batch"}));
///     runner.before_train();
///     for (epoch...) {
///       runner.before_epoch(epoch);
///       while (auto batch = sampler.next_batch(runner.batch_size())) {
///         ... opt.step(batch->size()); runner.after_step();
///         if (runner.stopped()) break;
///       }
///       runner.after_epoch();
///     }
///     runner.after_train();
///
/// Every hook call is made by every worker at the same point. After the policies of a hook ran, their requests
/// (batch size, learning rate, strategy, compression, topology) are checked by consensus to be the same on every worker
/// (MismatchError naming the step otherwise) and applied. A policy that throws ends training on that worker with
/// aikido::Error "policy 'NAME' failed in HOOK at step N: ..."; policies decide from the metrics only, so a
/// failure happens at the same step on every worker (a worker that fails alone is seen by the others as a lost
/// peer). A resize request needs an elastic session (set_elastic_session): rank 0 proposes the new size and every
/// worker applies it at its next ElasticSession::sync(); without one it is refused with ConfigError.
class PolicyRunner {
 public:
  PolicyRunner(DistributedOptimizer& optimizer, std::int64_t batch_size, std::vector<std::unique_ptr<Policy>> policies);
  ~PolicyRunner();
  /// Lets policies resize the cluster through `session` (which must outlive the runner), and registers the
  /// runner's state with it (call before the first sync(), like every registration): batch size, strategy,
  /// compression, the
  /// optimizer's step count (which policies read as metrics().step), a stop, and every policy's save_state(). A worker
  /// that joins receives them, a recovery rolls them back, and a joining worker skips before_train() (the members ran
  /// it long ago). The topology is the session's (it keeps the members' topology across changes).
  void set_elastic_session(ElasticSession* session);
  /// Policies from specs "NAME[:key=value,...]" (make_policy).
  static std::vector<std::unique_ptr<Policy>> make(const std::vector<std::string>& specs);

  void before_train();
  void before_epoch(std::int64_t epoch);
  void after_step();
  void after_epoch();
  void after_train();

  /// The per-worker batch size to use from now on.
  std::int64_t batch_size() const { return batch_size_; }
  /// A policy asked to stop training, and why.
  bool stopped() const { return stopped_; }
  const std::string& stop_reason() const { return stop_reason_; }
  const TrainingMetrics& metrics() const { return optimizer_.metrics(); }

 private:
  class Context;
  void run(const char* hook, void (Policy::*method)(PolicyContext&));

  DistributedOptimizer& optimizer_;
  std::int64_t batch_size_;
  std::vector<std::unique_ptr<Policy>> policies_;
  bool stopped_ = false;
  std::string stop_reason_;
  ElasticSession* session_ = nullptr;
};

/// Registers a LibTorch training loop's state with an elastic session (aikido/elastic.hpp), so that new workers
/// receive it and a recovery rolls it back: the parameters (in place), the optimizer's state (serialised; it may
/// grow after the first step) and the sampler's epoch and position. Register anything else (step counters, RNG
/// state) on the session directly. Every worker registers the same things in the same order before its first
/// sync().
void register_state(ElasticSession& session, const NamedParameters& parameters, ::torch::optim::Optimizer& optimizer,
                    DistributedSampler& sampler);

/// Shards the indices 0..dataset_size-1 among the workers without overlap and reshuffles them every epoch from a
/// seed all workers share: epoch e's order is a permutation drawn from (seed, e), the same on every worker.
///
/// Steps of an epoch walk through that order one global batch (workers x batch size) at a time; a worker of rank r
/// takes the r-th contiguous block of each global batch. The last, partial global batch is split as evenly as
/// possible, so that every index is used exactly once per epoch; a worker may then receive an empty batch, and
/// every worker takes the same number of steps per epoch (collectives stay matched). Because the place in the epoch
/// is one global position, the split stays exact when the number of workers changes between steps.
///
/// Use it directly (`next_batch`), or as a LibTorch sampler with `torch::data::make_data_loader`.
class DistributedSampler : public ::torch::data::samplers::Sampler<std::vector<std::size_t>> {
 public:
  /// Rank and size are read from `peer` at every batch; `peer` must outlive the sampler.
  DistributedSampler(std::size_t dataset_size, const Peer& peer, std::uint64_t seed = 0, bool shuffle = true);
  /// Fixed rank and size.
  DistributedSampler(std::size_t dataset_size, int rank, int size, std::uint64_t seed = 0, bool shuffle = true);

  /// Starts epoch `epoch` from its beginning (a new order when shuffling).
  void set_epoch(std::int64_t epoch);
  std::int64_t epoch() const { return epoch_; }
  /// Indices consumed by all workers together so far in this epoch.
  std::size_t position() const { return position_; }
  /// Moves to a place in the epoch (for example restored state); must be <= dataset_size().
  void set_position(std::size_t position);
  std::size_t dataset_size() const { return dataset_size_; }
  /// Steps per epoch at this world size and per-worker batch size.
  std::size_t steps_per_epoch(std::size_t batch_size) const;

  /// This worker's next batch of at most `batch_size` indices (possibly empty near the end of the epoch), or
  /// nullopt when the epoch is over.
  std::optional<std::vector<std::size_t>> next_batch(std::size_t batch_size);

  // torch::data::samplers::Sampler
  void reset(::c10::optional<std::size_t> new_size = ::c10::nullopt) override;
  ::c10::optional<std::vector<std::size_t>> next(std::size_t batch_size) override;
  void save(::torch::serialize::OutputArchive& archive) const override;
  void load(::torch::serialize::InputArchive& archive) override;

 private:
  std::pair<int, int> world() const;
  void shuffle_order();

  std::size_t dataset_size_;
  const Peer* peer_ = nullptr;
  int rank_ = 0;
  int size_ = 1;
  std::uint64_t seed_;
  bool shuffle_;
  std::int64_t epoch_ = 0;
  std::size_t position_ = 0;
  std::vector<std::size_t> order_;
};

}  // namespace aikido::torch
