// LibTorch integration: model checks, broadcasts and the distributed optimizer (include/aikido/torch.hpp): buckets,
// backward hooks, synchronous SGD, model and pair averaging, monitoring. The round strategies, compression codecs and
// privacy are in strategies.cpp; slots and buckets are defined in optimizer_parts.hpp.
#include <aikido/torch.hpp>
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>

#include "base/env.hpp"
#include "base/error.hpp"
#include "base/reduce.hpp"
#include "base/timeline.hpp"
#include "base/visit_dtype.hpp"
#include "optimizer_parts.hpp"
#include "splitmix.hpp"

namespace aikido::torch {

using detail::str_cat;

namespace {

using internal::kLinkChange;
using internal::kPrefix;
using internal::post_tensor;

template <class T>
std::span<T> span_of(const ::torch::Tensor& tensor) {
  return std::span<T>(static_cast<T*>(tensor.data_ptr()), static_cast<std::size_t>(tensor.numel()));
}

void save_tensor(Peer& peer, const std::string& name, const ::torch::Tensor& tensor) {
  detail::visit_dtype(dtype_of_tensor(tensor), [&](auto zero) {
    using T = decltype(zero);
    peer.save(name, std::span<const T>(span_of<T>(tensor)));
  });
}

Work request_tensor(Peer& peer, int target, const std::string& name, const ::torch::Tensor& out) {
  return detail::visit_dtype(dtype_of_tensor(out), [&](auto zero) {
    using T = decltype(zero);
    return peer.request_async(target, name, span_of<T>(out));
  });
}

std::string describe(const ::torch::Tensor& t) {
  std::ostringstream os;
  static constexpr const char* kNames[] = {"float32", "float64", "float16", "bfloat16", "int32", "int64", "uint8"};
  static constexpr DType kTypes[] = {DType::f32, DType::f64, DType::f16, DType::bf16,
                                     DType::i32, DType::i64, DType::u8};
  const DType type = dtype_of_tensor(t);
  os << kNames[std::find(std::begin(kTypes), std::end(kTypes), type) - std::begin(kTypes)] << " [";
  for (std::int64_t d = 0; d < t.dim(); ++d) os << (d ? ", " : "") << t.size(d);
  os << "]";
  return os.str();
}

void require_cpu(const std::string& name, const ::torch::Tensor& t) {
  if (!t.defined()) throw ConfigError(str_cat("parameter '", name, "' is an undefined tensor"));
  if (!t.device().is_cpu()) {
    throw ConfigError(
        str_cat("parameter '", name, "' is on ", t.device().str(), "; aikido::torch supports CPU tensors"));
  }
}

struct Line {
  std::string name;
  std::string description;
};

std::vector<Line> parse_signature(std::string_view text) {
  std::vector<Line> lines;
  while (!text.empty()) {
    const auto end = text.find('\n');
    const std::string_view line = text.substr(0, end);
    const auto tab = line.find('\t');
    lines.push_back({std::string(line.substr(0, tab)), std::string(line.substr(tab + 1))});
    if (end == std::string_view::npos) break;
    text.remove_prefix(end + 1);
  }
  return lines;
}

// The first difference between rank 0's and rank r's parameter list, in words.
std::string first_difference(std::string_view what, const std::vector<Line>& a, const std::vector<Line>& b, int r) {
  for (std::size_t i = 0; i < std::max(a.size(), b.size()); ++i) {
    if (i >= b.size()) {
      return str_cat(what, " differ across workers: '", a[i].name, "' (", a[i].description,
                     ") exists on rank 0 but not on rank ", r, " (rank 0 has ", a.size(), " parameters, rank ", r,
                     " has ", b.size(), ")");
    }
    if (i >= a.size()) {
      return str_cat(what, " differ across workers: '", b[i].name, "' (", b[i].description, ") exists on rank ", r,
                     " but not on rank 0 (rank 0 has ", a.size(), " parameters, rank ", r, " has ", b.size(), ")");
    }
    if (a[i].name != b[i].name) {
      return str_cat(what, " differ across workers: parameter #", i, " is '", a[i].name, "' on rank 0 but '", b[i].name,
                     "' on rank ", r);
    }
    if (a[i].description != b[i].description) {
      return str_cat(what, " differ across workers: parameter '", a[i].name, "' is ", a[i].description,
                     " on rank 0 but ", b[i].description, " on rank ", r);
    }
  }
  return {};
}

// Groups tensors by dtype, in the given order: the flat buffers that broadcasts and averages fuse them into.
std::vector<std::vector<::torch::Tensor>> group_by_dtype(const NamedParameters& parameters) {
  std::vector<std::vector<::torch::Tensor>> groups;
  for (const auto& item : parameters) {
    require_cpu(item.key(), item.value());
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&](const auto& g) { return g.front().scalar_type() == item.value().scalar_type(); });
    if (it == groups.end()) {
      groups.push_back({item.value()});
    } else {
      it->push_back(item.value());
    }
  }
  return groups;
}

::torch::Tensor flatten(const std::vector<::torch::Tensor>& tensors) {
  std::vector<::torch::Tensor> flat;
  flat.reserve(tensors.size());
  for (const auto& t : tensors) flat.push_back(t.detach().reshape(-1));
  return ::torch::cat(flat);
}

void unflatten(const ::torch::Tensor& flat, const std::vector<::torch::Tensor>& tensors) {
  ::torch::NoGradGuard no_grad;
  std::int64_t offset = 0;
  for (const auto& t : tensors) {
    t.copy_(flat.narrow(0, offset, t.numel()).view_as(t));
    offset += t.numel();
  }
}

using internal::copy_measuring;
using internal::seconds_between;
using internal::sum_of_squares;

}  // namespace

DType dtype_of_tensor(const ::torch::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case ::torch::kFloat32:
      return DType::f32;
    case ::torch::kFloat64:
      return DType::f64;
    case ::torch::kFloat16:
      return DType::f16;
    case ::torch::kBFloat16:
      return DType::bf16;
    case ::torch::kInt32:
      return DType::i32;
    case ::torch::kInt64:
      return DType::i64;
    case ::torch::kUInt8:
      return DType::u8;
    default:
      throw ConfigError(str_cat("tensors of type ", c10::toString(tensor.scalar_type()),
                                " are not supported: use float32, float64, float16, bfloat16, int32, int64 or uint8"));
  }
}

void check_same_parameters(Peer& peer, const NamedParameters& parameters, std::string_view what) {
  std::string signature;
  for (const auto& item : parameters) {
    require_cpu(item.key(), item.value());
    signature += str_cat(item.key(), "\t", describe(item.value()), "\n");
  }
  if (peer.size() == 1) return;
  const std::string name = str_cat(kPrefix, "check/", what);
  // Fast path: one consensus. Only when it fails are the lists gathered to say what differs.
  const auto* bytes = reinterpret_cast<const std::byte*>(signature.data());
  if (peer.consensus(std::span<const std::byte>(bytes, signature.size()), name)) return;

  std::vector<std::int64_t> lengths(peer.size());
  const std::int64_t mine = static_cast<std::int64_t>(signature.size());
  peer.allgather(std::span<const std::int64_t>(&mine, 1), std::span<std::int64_t>(lengths), name + "/lengths");
  const auto longest = static_cast<std::size_t>(*std::max_element(lengths.begin(), lengths.end()));
  std::vector<std::uint8_t> padded(longest, 0), all(longest * peer.size());
  std::memcpy(padded.data(), signature.data(), signature.size());
  peer.allgather(std::span<const std::uint8_t>(padded), std::span<std::uint8_t>(all), name + "/lists");
  const auto text = [&](int r) {
    return std::string_view(reinterpret_cast<const char*>(all.data()) + r * longest, lengths[r]);
  };
  const auto first = parse_signature(text(0));
  for (int r = 1; r < peer.size(); ++r) {
    const std::string difference = first_difference(what, first, parse_signature(text(r)), r);
    if (!difference.empty()) throw MismatchError(difference);
  }
  throw MismatchError(str_cat(what, " differ across workers"));
}

void broadcast_parameters(Peer& peer, const NamedParameters& parameters, int root) {
  check_same_parameters(peer, parameters, "parameters");
  if (peer.size() == 1) return;
  int index = 0;
  for (const auto& group : group_by_dtype(parameters)) {
    ::torch::Tensor flat = flatten(group);
    post_tensor(peer, detail::CollectiveKind::broadcast, flat, ReduceOp::sum, root,
                str_cat(kPrefix, "broadcast/", index++))
        .wait();
    unflatten(flat, group);
  }
}

void average_parameters(Peer& peer, const NamedParameters& parameters, std::string_view name) {
  if (peer.size() == 1) return;
  int index = 0;
  for (const auto& group : group_by_dtype(parameters)) {
    ::torch::Tensor flat = flatten(group);
    post_tensor(peer, detail::CollectiveKind::allreduce, flat, ReduceOp::mean, 0, str_cat(name, "/", index++)).wait();
    unflatten(flat, group);
  }
}

void broadcast_optimizer_state(Peer& peer, ::torch::optim::Optimizer& optimizer, int root) {
  if (peer.size() == 1) return;
  std::string bytes;
  if (peer.rank() == root) {
    ::torch::serialize::OutputArchive archive;
    optimizer.save(archive);
    std::ostringstream os;
    archive.save_to(os);
    bytes = os.str();
  }
  std::int64_t length = static_cast<std::int64_t>(bytes.size());
  peer.broadcast(std::span<std::int64_t>(&length, 1), root, str_cat(kPrefix, "optimizer/length"));
  bytes.resize(static_cast<std::size_t>(length));
  peer.broadcast(std::span<std::uint8_t>(reinterpret_cast<std::uint8_t*>(bytes.data()), bytes.size()), root,
                 str_cat(kPrefix, "optimizer/state"));
  if (peer.rank() != root) {
    std::istringstream is(bytes);
    ::torch::serialize::InputArchive archive;
    archive.load_from(is);
    optimizer.load(archive);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// DistributedOptimizer

DistributedOptimizer::DistributedOptimizer(Peer& peer, ::torch::optim::Optimizer& optimizer,
                                           const NamedParameters& parameters, Strategy strategy,
                                           DistributedOptimizerOptions options)
    : peer_(peer),
      optimizer_(optimizer),
      strategy_(strategy),
      options_(options),
      rng_state_(options.seed * 0x9e3779b97f4a7c15ULL + static_cast<std::uint64_t>(peer.rank()) + 1) {
  if (options_.collective_setup) check_same_parameters(peer_, parameters, "parameters");
  for (const auto& item : parameters) {
    if (!item.value().requires_grad()) continue;
    names_.push_back(item.key());
    parameters_.push_back(item.value());
  }
  if (parameters_.empty()) throw ConfigError("DistributedOptimizer: no parameter requires a gradient");
  check_allowed(strategy_, options_.compression);
  setup_privacy();
  monitor_ = std::make_unique<Monitor>(options_.noise_smoothing);
  for (const auto& p : parameters_) monitor_->gradient_bytes += p.numel() * static_cast<std::int64_t>(p.element_size());
  bucket_bytes_ = planned_bucket_bytes();
  build_buckets();
  build_codecs();
  start_round();
  install_hooks();
  if (options_.monitor) monitor_->publisher = MetricsPublisher::from_env(peer_.rank());
  if (options_.monitor && options_.link_probe_interval.count() > 0) {
    LinkMonitor::Options probe;
    probe.interval = options_.link_probe_interval;
    probe.probe_bytes = options_.link_probe_bytes;
    monitor_->links = std::make_unique<LinkMonitor>(peer_, probe);
  }
  metrics_.workers = peer_.size();
  metrics_.strategy = strategy_name(strategy_);
  metrics_.topology = topology_name(peer_.topology());
  metrics_.compression = options_.compression.name();
  metrics_.lr = lr();
  // Threads that aikido-run chose (OMP_NUM_THREADS = CPUs / workers) and the program kept follow the cluster's size.
  if (env::get(env::kAutoThreads).value_or("") == "1") {
    const int chosen = static_cast<int>(env::get_int("OMP_NUM_THREADS", 0, 0, 1 << 20));
    if (chosen > 0 && ::torch::get_num_threads() == chosen) auto_threads_ = chosen;
  }
  if (strategy_ == Strategy::pair_averaging && options_.collective_setup) publish_model(true);
}

DistributedOptimizer::~DistributedOptimizer() {
  remove_hooks();
  wait_launched();
}

// Collectives and pulls still running write into our buffers: lets them end (they all have deadlines), ignoring
// their errors, before the buffers can be reused or freed.
void DistributedOptimizer::wait_launched() noexcept {
  for (auto& bucket : buckets_) {
    if (!bucket.launched) continue;
    if (bucket.coded) {
      bucket.codec->abandon();
      continue;
    }
    try {
      bucket.work.wait();
    } catch (...) {
    }
  }
  if (rounds_ && rounds_->arrival_pending) {
    try {
      rounds_->arrival_work.wait();
    } catch (...) {
    }
    rounds_->arrival_pending = false;
  }
  if (pull_) {
    for (auto& w : pull_->works) {
      try {
        w.wait();
      } catch (...) {
      }
    }
    pull_->works.clear();
  }
  if (monitor_ && monitor_->pending) {
    for (Work* work : {&monitor_->work, &monitor_->link_work}) {
      try {
        work->wait();
      } catch (...) {
      }
    }
    monitor_->pending = false;
  }
}

void DistributedOptimizer::build_buckets() {
  slots_.resize(parameters_.size());
  // Reverse order: a backward pass produces the gradients of the last layers first.
  std::vector<std::int64_t> sizes;
  std::vector<std::size_t> open;  // per dtype: index into buckets_ of the bucket being filled, or npos
  std::vector<::torch::ScalarType> open_types;
  for (std::size_t i = parameters_.size(); i-- > 0;) {
    const ::torch::Tensor& p = parameters_[i];
    require_cpu(names_[i], p);
    dtype_of_tensor(p);  // rejects unsupported types with a clear error
    const std::size_t bytes = static_cast<std::size_t>(p.numel()) * p.element_size();
    auto t = std::find(open_types.begin(), open_types.end(), p.scalar_type());
    std::size_t b;
    if (t == open_types.end()) {
      b = buckets_.size();
      buckets_.emplace_back();
      sizes.push_back(0);
      open_types.push_back(p.scalar_type());
      open.push_back(b);
    } else {
      b = open[t - open_types.begin()];
      if (sizes[b] > 0 && static_cast<std::size_t>(sizes[b]) * p.element_size() + bytes > bucket_bytes_) {
        b = buckets_.size();
        buckets_.emplace_back();
        sizes.push_back(0);
        open[t - open_types.begin()] = b;
      }
    }
    slots_[i].bucket = b;
    slots_[i].offset = sizes[b];
    slots_[i].numel = p.numel();
    sizes[b] += p.numel();
    buckets_[b].slots.push_back(i);
  }
  for (std::size_t b = 0; b < buckets_.size(); ++b) {
    auto& bucket = buckets_[b];
    bucket.index = b;
    const auto type = parameters_[bucket.slots.front()].scalar_type();
    bucket.flat = ::torch::zeros({sizes[b]}, ::torch::TensorOptions().dtype(type));
    bucket.pending = bucket.slots.size();
    for (std::size_t i : bucket.slots) {
      Slot& slot = slots_[i];
      const ::torch::Tensor& p = parameters_[i];
      void* data = static_cast<char*>(bucket.flat.data_ptr()) + slot.offset * bucket.flat.element_size();
      slot.grad_alias = ::torch::from_blob(
          data, p.sizes(), [keep = bucket.flat](void*) {}, bucket.flat.options());
    }
  }
}

// options().bucket_bytes, or what the Peer's links call for (the same on every worker that installed the same links).
std::size_t DistributedOptimizer::planned_bucket_bytes() const {
  if (options_.bucket_bytes > 0) return options_.bucket_bytes;
  return peer_.fusion_bytes(static_cast<std::size_t>(monitor_->gradient_bytes));
}

// Lays the buckets out anew for `bytes`, between steps, on every worker at the same point (the bucket names and
// sizes must match across workers). What lives in per-bucket tensors beyond a step moves with its parameters: the
// round strategies' anchors and momentum, a pulled model. Codecs begin anew.
void DistributedOptimizer::relayout_buckets(std::size_t bytes, std::string_view why) {
  if (bytes == bucket_bytes_) return;
  finish_pull();
  release_gradient_aliases();
  const std::vector<Slot> old = slots_;
  const std::size_t before = bucket_bytes_;
  buckets_.clear();
  bucket_bytes_ = bytes;
  build_buckets();
  build_codecs();
  reset_step();
  auto carry = [&](std::vector<::torch::Tensor>& per_bucket) {
    if (per_bucket.empty()) return;
    std::vector<::torch::Tensor> moved;
    for (const auto& bucket : buckets_) moved.push_back(::torch::zeros_like(bucket.flat));
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      const ::torch::Tensor& from = per_bucket[old[i].bucket];
      if (!from.defined()) continue;
      moved[slots_[i].bucket]
          .narrow(0, slots_[i].offset, slots_[i].numel)
          .copy_(from.narrow(0, old[i].offset, old[i].numel));
    }
    per_bucket = std::move(moved);
  };
  carry(rounds_->anchors);
  carry(rounds_->momentum);
  if (pull_) carry(pull_->flats);
  if (auto* timeline = detail::Timeline::get()) {
    timeline->instant("buckets", "buckets", "buckets laid out", Monitor::Clock::now(),
                      str_cat("\"step\":", steps_, ",\"why\":\"", why, "\",\"bucket_bytes_before\":", before,
                              ",\"bucket_bytes\":", bytes, ",\"buckets\":", buckets_.size()));
  }
}

void DistributedOptimizer::set_bucket_bytes(std::size_t bytes) {
  if (std::any_of(slots_.begin(), slots_.end(), [](const Slot& s) { return s.ready; })) {
    throw ConfigError("set_bucket_bytes: called between backward() and step(); call it at a step boundary");
  }
  const std::string value = str_cat(bytes, "@", steps_);
  if (!peer_.consensus(std::as_bytes(std::span(value.data(), value.size())), str_cat(kPrefix, "set_bucket_bytes"))) {
    throw MismatchError(
        str_cat("set_bucket_bytes: workers asked for different sizes or at different steps (this "
                "worker, rank ",
                peer_.rank(), ": ", bytes, " after step ", steps_, ")"));
  }
  options_.bucket_bytes = bytes;
  const std::size_t before = bucket_bytes_;
  relayout_buckets(planned_bucket_bytes(), "set_bucket_bytes");
  if (strategy_ == Strategy::pair_averaging && bucket_bytes_ != before) {
    pull_.reset();  // the models it pulled and published were per old bucket
    publish_model(true);
  }
}

void DistributedOptimizer::install_hooks() {
  for (std::size_t i = 0; i < parameters_.size(); ++i) {
    slots_[i].hook = parameters_[i].register_hook([this, i](::torch::Tensor grad) { on_gradient(i, grad); });
    slots_[i].hooked = true;
  }
  hooks_installed_ = true;
}

void DistributedOptimizer::remove_hooks() {
  if (!hooks_installed_) return;
  for (std::size_t i = 0; i < parameters_.size(); ++i) {
    if (slots_[i].hooked) parameters_[i].remove_hook(slots_[i].hook);
    slots_[i].hooked = false;
  }
  hooks_installed_ = false;
}

std::string DistributedOptimizer::bucket_name(const Bucket& bucket, std::string_view purpose) const {
  return str_cat(kPrefix, purpose, "/", bucket.index);
}

// Called by autograd, on the thread running backward(), when parameter `i`'s gradient of this pass is computed (before
// it is accumulated into .grad()).
void DistributedOptimizer::on_gradient(std::size_t i, const ::torch::Tensor& grad) {
  // DP-SGD replaces the gradients by noised sums of clipped per-sample ones at step(): nothing to send yet.
  if (strategy_ != Strategy::synchronous_sgd || peer_.size() == 1 || privacy_) return;
  Slot& slot = slots_[i];
  if (slot.ready) {
    second_backward_ = true;  // reported by step(): throwing inside autograd would lose the error type
    return;
  }
  Bucket& bucket = buckets_[slot.bucket];
  if (grad.layout() != ::torch::kStrided) {
    gradient_error_ = str_cat("parameter '", names_[i], "' has a sparse gradient; only dense gradients are supported");
    return;
  }
  monitor_->local_sq += copy_measuring(bucket.flat.narrow(0, slot.offset, slot.numel), grad, options_.monitor);
  // Autograd accumulates `grad` into .grad() right after this hook. .grad() may still be the last step's alias of
  // this bucket, which the allreduce is about to work on: with .grad() undefined, autograd instead takes `grad`
  // itself as .grad() (no zero fill, no addition, usually no copy). step() replaces it by the average.
  parameters_[i].mutable_grad().reset();
  slot.ready = true;
  if (--bucket.pending == 0) {
    try {
      launch(bucket, "grad");
    } catch (...) {
      hook_error_ = std::current_exception();  // rethrown by step(): exceptions do not cross autograd intact
    }
  }
}

// Starts averaging a bucket across the workers, in place: through its codec when it has one (gradients and round
// updates; models always travel as they are), else one allreduce (mean).
void DistributedOptimizer::launch(Bucket& bucket, std::string_view purpose) {
  monitor_->note_launch();
  bucket.launched = true;
  bucket.coded = bucket.codec && purpose != "model";
  if (bucket.coded) {
    bucket.codec->start(peer_, bucket_name(bucket, purpose));
    return;
  }
  bucket.work = post_tensor(peer_, detail::CollectiveKind::allreduce, bucket.flat, ReduceOp::mean, 0,
                            bucket_name(bucket, purpose));
}

// Waits for a launched bucket's average.
void DistributedOptimizer::finish(Bucket& bucket) {
  if (bucket.coded) {
    bucket.codec->finish(peer_);
  } else {
    bucket.work.wait();
  }
}

void DistributedOptimizer::build_codecs() {
  for (auto& bucket : buckets_) {
    bucket.codec.reset();
    if (bucket.flat.scalar_type() != ::torch::kFloat32) continue;
    std::vector<internal::SlotShape> shapes;
    for (std::size_t i : bucket.slots) shapes.push_back({slots_[i].offset, parameters_[i].sizes().vec()});
    bucket.codec = internal::make_codec(options_.compression, bucket.flat, std::move(shapes),
                                        options_.seed * 0x9e3779b97f4a7c15ULL + bucket.index);
  }
}

void DistributedOptimizer::zero_grad() {
  if (strategy_ == Strategy::synchronous_sgd && peer_.size() > 1) {
    // The hooks clear .grad() before autograd writes the new gradient anyway: skip the zero fill.
    for (auto& p : parameters_) p.mutable_grad().reset();
    return;
  }
  optimizer_.zero_grad();
}

// At step(): launches the gradient buckets the backward pass did not complete (parameters without a gradient this
// step count as zero), waits for all and measures the averaged gradient. `apply` (synchronous SGD) writes the averages
// into .grad(); without it (a gradient sample under model averaging) the gradients stay local.
void DistributedOptimizer::finish_gradients(bool apply) {
  for (auto& bucket : buckets_) {
    if (bucket.launched) continue;
    for (std::size_t i : bucket.slots) {
      if (!slots_[i].ready) bucket.flat.narrow(0, slots_[i].offset, slots_[i].numel).zero_();
    }
    launch(bucket, "grad");
  }
  const auto before = Monitor::Clock::now();
  for (auto& bucket : buckets_) finish(bucket);
  const auto after = Monitor::Clock::now();
  if (auto* timeline = detail::Timeline::get()) {
    const std::string step = str_cat("\"step\":", steps_);
    timeline->span("step", "step", "wait", before, after, step);
    timeline->async_span("communication", "step", "communication", monitor_->first_launch, after, step);
  }
  monitor_->wait += seconds_between(before, after);
  monitor_->communication += seconds_between(monitor_->first_launch, after);
  if (options_.monitor) {
    double big = 0;
    for (const auto& bucket : buckets_) big += sum_of_squares(bucket.flat);
    monitor_->big_sq = big;
    monitor_->measured = true;
  }
  if (!apply) return;
  for (std::size_t i = 0; i < parameters_.size(); ++i) parameters_[i].mutable_grad() = slots_[i].grad_alias;
}

// Gives parameters whose .grad() is an alias of a bucket a gradient of their own, before the buckets are used for
// anything else (another strategy keeps model values in them).
void DistributedOptimizer::release_gradient_aliases() {
  for (std::size_t i = 0; i < parameters_.size(); ++i) {
    ::torch::Tensor& grad = parameters_[i].mutable_grad();
    if (grad.defined() && grad.data_ptr() == slots_[i].grad_alias.data_ptr()) grad = grad.clone();
  }
}

// Model averaging, on the steps that sample the global gradient: this worker's gradients into the buckets.
void DistributedOptimizer::fill_buckets_from_gradients() {
  for (std::size_t i = 0; i < parameters_.size(); ++i) {
    const ::torch::Tensor region = buckets_[slots_[i].bucket].flat.narrow(0, slots_[i].offset, slots_[i].numel);
    const ::torch::Tensor& grad = parameters_[i].grad();
    if (grad.defined()) {
      monitor_->local_sq += copy_measuring(region, grad, true);
    } else {
      region.zero_();
    }
    slots_[i].ready = true;
  }
}

void DistributedOptimizer::reset_step() {
  monitor_->launched = false;
  for (auto& slot : slots_) slot.ready = false;
  for (auto& bucket : buckets_) {
    bucket.pending = bucket.slots.size();
    bucket.launched = false;
    bucket.coded = false;
  }
}

void DistributedOptimizer::step() { step(monitor_->batch_size); }

void DistributedOptimizer::set_batch_size(std::int64_t batch_size) {
  if (batch_size < 1) throw ConfigError(str_cat("DistributedOptimizer: batch size ", batch_size, " must be >= 1"));
  monitor_->batch_size = batch_size;
  metrics_.batch_size = batch_size;
}

void DistributedOptimizer::step(std::int64_t samples) {
  monitor_->entry = Monitor::Clock::now();
  if (second_backward_) {
    second_backward_ = false;
    wait_launched();
    reset_step();
    throw ConfigError(
        "DistributedOptimizer: backward() ran twice before step(); with synchronous_sgd each step takes one backward "
        "pass (add the losses and call backward() once)");
  }
  if (hook_error_) {
    const std::exception_ptr error = hook_error_;
    hook_error_ = nullptr;
    wait_launched();
    reset_step();
    std::rethrow_exception(error);
  }
  if (!gradient_error_.empty()) {
    const std::string error = std::move(gradient_error_);
    gradient_error_.clear();
    wait_launched();
    reset_step();
    throw ConfigError(str_cat("DistributedOptimizer: ", error));
  }
  const bool distributed = peer_.size() > 1;
  // Under model averaging, some steps also allreduce the gradients, only to measure them. Not under the round
  // strategies, which exist to communicate less.
  const bool sample_gradients =
      distributed && options_.monitor &&
      (strategy_ == Strategy::synchronous_averaging || strategy_ == Strategy::pair_averaging) &&
      options_.gradient_sample_interval > 0 && steps_ % options_.gradient_sample_interval == 0;
  try {
    if (strategy_ == Strategy::synchronous_sgd && privacy_) {
      privatize_gradients(samples);
      if (distributed) fill_buckets_from_gradients();
    }
    if (strategy_ == Strategy::synchronous_sgd && distributed) finish_gradients(true);
    if (sample_gradients) {
      fill_buckets_from_gradients();
      finish_gradients(false);
    }
  } catch (...) {
    wait_launched();
    reset_step();
    throw;
  }
  reset_step();
  const bool rounds = is_round_strategy(strategy_);
  if (rounds && !rounds_->anchored) anchor_round();
  const auto optimizer_begin = Monitor::Clock::now();
  optimizer_.step();
  if (auto* timeline = detail::Timeline::get()) {
    const std::string step = str_cat("\"step\":", steps_);
    timeline->span("step", "step", "forward+backward", monitor_->last_step_end, monitor_->entry, step);
    timeline->span("step", "step", "optimizer", optimizer_begin, Monitor::Clock::now(), step);
  }
  if (strategy_ == Strategy::synchronous_averaging) average_models();
  if (strategy_ == Strategy::pair_averaging) pair_step();
  if (rounds) round_step(samples);
  ++steps_;
  if (options_.monitor) {
    launch_metrics(static_cast<double>(samples), seconds_between(monitor_->last_step_end, Monitor::Clock::now()));
    if (monitor_->links) monitor_->links->poll();
    if (monitor_->replan_due) install_links();
  }
  monitor_->last_step_end = Monitor::Clock::now();
}

// Some worker's links changed (or were measured for the first time): every worker gathers all of them into one
// matrix and installs it in the Peer, which re-plans later collectives with it (Topology::automatic's choice, the
// segment sizes). Collective; runs at the same step on every worker (absorb_metrics).
void DistributedOptimizer::install_links() {
  Monitor& m = *monitor_;
  m.replan_due = false;
  const LinkMatrix matrix = m.links->matrix();
  const auto before = peer_.planned_topology(static_cast<std::size_t>(m.gradient_bytes));
  peer_.set_link_matrix(matrix);
  const int rank = peer_.rank(), n = matrix.size;
  m.installed_bandwidth.assign(std::size_t(n), 0.0);
  for (int to = 0; to < n; ++to) {
    const double bandwidth = matrix.bandwidth(rank, to);
    if (std::isfinite(bandwidth)) m.installed_bandwidth[std::size_t(to)] = bandwidth;
  }
  ++metrics_.link_matrices_installed;
  // Pair averaging's published models are per bucket and pulled at any time: its layout stays.
  if (strategy_ != Strategy::pair_averaging) relayout_buckets(planned_bucket_bytes(), "links installed");
  const auto after = peer_.planned_topology(static_cast<std::size_t>(m.gradient_bytes));
  if (auto* timeline = detail::Timeline::get()) {
    timeline->instant("links", "links", "link matrix installed", Monitor::Clock::now(),
                      str_cat("\"step\":", steps_, ",\"gradient_topology_before\":\"", topology_name(before),
                              "\",\"gradient_topology_after\":\"", topology_name(after), "\""));
  }
}

// Publishes this step's values (the allreduce completes during the next step) and folds in the previous step's.
void DistributedOptimizer::launch_metrics(double samples, double step_seconds) {
  Monitor& m = *monitor_;
  absorb_metrics();  // the buffer is free again
  m.values[Monitor::kSamples] = samples;
  m.values[Monitor::kLocalSq] = m.measured ? m.local_sq : 0.0;
  m.values[Monitor::kMeasured] = m.measured ? 1.0 : 0.0;
  m.values[Monitor::kCompute] = seconds_between(m.last_step_end, m.entry);
  m.values[Monitor::kWait] = m.wait;
  m.values[Monitor::kCommunication] = m.communication;
  m.values[Monitor::kStep] = step_seconds;
  const bool have_loss = std::isfinite(pending_loss_);
  m.values[Monitor::kLoss] = have_loss ? pending_loss_ * samples : 0.0;
  m.values[Monitor::kLossSamples] = have_loss ? samples : 0.0;
  pending_loss_ = TrainingMetrics::kUnknown;
  metrics_.local_step_seconds = step_seconds;
  metrics_.local_compute_seconds = m.values[Monitor::kCompute];
  metrics_.local_communication_seconds = m.communication;
  metrics_.local_wait_seconds = m.wait;
  metrics_.local_samples_per_second = step_seconds > 0 ? samples / step_seconds : TrainingMetrics::kUnknown;
  m.pending_measured = m.measured;
  m.pending_big_sq = m.big_sq;
  m.local_sq = m.big_sq = m.wait = m.communication = 0;
  m.measured = false;
  // The slowest of this worker's measured links; the allreduce (max) of its negation finds the cluster's slowest.
  // And whether any of them moved away from the installed link matrix.
  m.link_values = {-std::numeric_limits<double>::infinity(), 0.0};
  if (m.links) {
    for (const LinkStats& link : m.links->links()) {
      const double bandwidth = link.bandwidth_bytes_per_second;
      if (!TrainingMetrics::known(bandwidth)) continue;
      m.link_values[0] = std::max(m.link_values[0], -bandwidth);
      const std::size_t peer = static_cast<std::size_t>(link.peer);
      const double installed = peer < m.installed_bandwidth.size() ? m.installed_bandwidth[peer] : 0.0;
      if (!(installed > 0) || bandwidth > installed * kLinkChange || bandwidth * kLinkChange < installed) {
        m.link_values[1] = 1.0;
      }
    }
  }
  if (peer_.size() > 1) {
    m.work = peer_.allreduce_async(std::span<double>(m.values), ReduceOp::sum, str_cat(kPrefix, "metrics"));
    m.link_work =
        peer_.allreduce_async(std::span<double>(m.link_values), ReduceOp::max, str_cat(kPrefix, "metrics/links"));
  }
  m.pending = true;
  metrics_.step = steps_;
  metrics_.lr = lr();
  metrics_.strategy = strategy_name(strategy_);
  metrics_.topology = topology_name(peer_.topology());
  metrics_.compression = options_.compression.name();
  metrics_.workers = peer_.size();
  metrics_.bytes_sent = static_cast<std::int64_t>(peer_.bytes_sent());
  metrics_.epsilon = accountant_ ? accountant_->epsilon(privacy_->options.delta) : TrainingMetrics::kUnknown;
  if (peer_.size() == 1) absorb_metrics();
}

void DistributedOptimizer::set_test_accuracy(double accuracy) {
  metrics_.test_accuracy = accuracy;
  if (monitor_->publisher) monitor_->publisher->update(metrics_);
}

void DistributedOptimizer::record_decision(PolicyDecision decision) {
  if (auto* timeline = detail::Timeline::get()) {
    using detail::Timeline;
    std::string args = str_cat("\"step\":", decision.step, ",\"policy\":\"", Timeline::escape(decision.policy),
                               "\",\"hook\":\"", decision.hook, "\",\"from\":\"", Timeline::escape(decision.from),
                               "\",\"to\":\"", Timeline::escape(decision.to), "\"");
    for (const auto& [name, value] : decision.metrics) {
      if (std::isfinite(value)) args += str_cat(",\"", name, "\":", value);
    }
    timeline->instant("policy", "policy", str_cat(decision.policy, ": ", decision.setting), Monitor::Clock::now(),
                      args);
  }
  metrics_.decisions.push_back(std::move(decision));
  if (metrics_.decisions.size() > TrainingMetrics::kMaxDecisions) metrics_.decisions.erase(metrics_.decisions.begin());
  if (monitor_->publisher) monitor_->publisher->update(metrics_);
}

void DistributedOptimizer::absorb_metrics() {
  Monitor& m = *monitor_;
  if (!m.pending) return;
  m.pending = false;
  m.work.wait();
  m.link_work.wait();
  metrics_.slowest_link_bytes_per_second =
      std::isfinite(m.link_values[0]) ? -m.link_values[0] : TrainingMetrics::kUnknown;
  // Every worker reads the same reduced flag of the same step, so all of them install the links at the same step.
  if (m.links && peer_.size() > 1 && m.link_values[1] > 0) m.replan_due = true;
  const auto& v = m.values;
  const double n = peer_.size();
  const double samples = v[Monitor::kSamples];
  metrics_.global_batch_size = static_cast<std::int64_t>(samples);
  metrics_.step_seconds = v[Monitor::kStep] / n;
  metrics_.compute_seconds = v[Monitor::kCompute] / n;
  metrics_.wait_seconds = v[Monitor::kWait] / n;
  metrics_.communication_seconds = v[Monitor::kCommunication] / n;
  if (v[Monitor::kLossSamples] > 0) metrics_.train_loss = v[Monitor::kLoss] / v[Monitor::kLossSamples];
  metrics_.samples_per_second = metrics_.step_seconds > 0 ? samples / metrics_.step_seconds : TrainingMetrics::kUnknown;
  metrics_.allreduce_bytes_per_second = metrics_.communication_seconds > 0
                                            ? static_cast<double>(m.gradient_bytes) / metrics_.communication_seconds
                                            : TrainingMetrics::kUnknown;
  // Every worker measured its gradient in the same steps (the choice depends only on the step and the strategy).
  if (m.pending_measured && v[Monitor::kMeasured] == n) {
    const double small_sq = v[Monitor::kLocalSq] / n;
    const double big_sq = m.pending_big_sq;
    m.noise.update(samples / n, samples, small_sq, big_sq);
    metrics_.gradient_variance = std::max(0.0, small_sq - big_sq);
    metrics_.snr = metrics_.gradient_variance > 0 ? big_sq / metrics_.gradient_variance : TrainingMetrics::kUnknown;
    metrics_.noise_scale = m.noise.noise_scale();
    metrics_.gradient_sq_norm = m.noise.gradient_sq_norm();
    metrics_.gradient_noise_trace = m.noise.noise_trace();
  }
  if (m.links) metrics_.links = m.links->links();
  if (m.publisher) m.publisher->update(metrics_);
}

void DistributedOptimizer::copy_parameters_into_buckets() {
  for (std::size_t i = 0; i < parameters_.size(); ++i) {
    buckets_[slots_[i].bucket]
        .flat.narrow(0, slots_[i].offset, slots_[i].numel)
        .copy_(parameters_[i].detach().reshape(-1));
  }
}

void DistributedOptimizer::copy_buckets_into_parameters() {
  ::torch::NoGradGuard no_grad;
  for (std::size_t i = 0; i < parameters_.size(); ++i) {
    parameters_[i].copy_(
        buckets_[slots_[i].bucket].flat.narrow(0, slots_[i].offset, slots_[i].numel).view_as(parameters_[i]));
  }
}

// Synchronous model averaging: every bucket of parameter values is averaged across workers, all in flight at once.
void DistributedOptimizer::average_models() {
  if (peer_.size() == 1) return;
  copy_parameters_into_buckets();
  for (auto& bucket : buckets_) launch(bucket, "model");
  try {
    const auto before = Monitor::Clock::now();
    for (auto& bucket : buckets_) finish(bucket);
    monitor_->wait += seconds_between(before, Monitor::Clock::now());
  } catch (...) {
    wait_launched();
    reset_step();
    throw;
  }
  reset_step();
  copy_buckets_into_parameters();
}

// Publishes this worker's model in the model store (one entry per bucket). `first`: also waits until every worker
// has published, so that no pull can find a partner with nothing saved.
void DistributedOptimizer::publish_model(bool first) {
  if (peer_.size() == 1) return;
  if (first) copy_parameters_into_buckets();
  for (auto& bucket : buckets_) {
    save_tensor(peer_, bucket_name(bucket, "pair"), bucket.flat);
  }
  if (first) peer_.barrier(str_cat(kPrefix, "pair/published"));
  published_ = true;
}

void DistributedOptimizer::pair_step() {
  if (peer_.size() == 1) return;
  copy_parameters_into_buckets();
  if (pull_ && pull_->done()) {
    for (auto& w : pull_->works) w.wait();  // rethrows a failed pull
    for (std::size_t b = 0; b < buckets_.size(); ++b) buckets_[b].flat.add_(pull_->flats[b]).mul_(0.5);
    copy_buckets_into_parameters();
    pull_->works.clear();
  }
  // Without a collective setup (workers of an elastic job) the first publication happens here, at the first step,
  // which is the same on every worker.
  publish_model(!published_);
  if (!pull_) {
    pull_ = std::make_unique<Pull>();
    for (const auto& bucket : buckets_) pull_->flats.push_back(::torch::empty_like(bucket.flat));
  }
  if (pull_->works.empty()) {
    // A random partner other than this worker.
    const auto others = static_cast<std::uint64_t>(peer_.size() - 1);
    int partner = static_cast<int>(rng::splitmix64(rng_state_) % others);
    if (partner >= peer_.rank()) ++partner;
    pull_->partner = partner;
    for (std::size_t b = 0; b < buckets_.size(); ++b) {
      pull_->works.push_back(request_tensor(peer_, partner, bucket_name(buckets_[b], "pair"), pull_->flats[b]));
    }
  }
}

void DistributedOptimizer::finish_pull() {
  if (!pull_) return;
  for (auto& w : pull_->works) w.wait();
  pull_->works.clear();
}

void DistributedOptimizer::set_strategy(Strategy strategy) {
  check_allowed(strategy, options_.compression);
  // All workers must switch at the same step to the same strategy.
  struct {
    std::uint8_t strategy;
    std::int64_t steps;
  } value{static_cast<std::uint8_t>(strategy), steps_};
  std::byte bytes[16] = {};
  std::memcpy(bytes, &value.strategy, 1);
  std::memcpy(bytes + 8, &value.steps, 8);
  if (!peer_.consensus(std::span<const std::byte>(bytes), str_cat(kPrefix, "set_strategy"))) {
    throw MismatchError(
        str_cat("set_strategy: workers asked for different strategies or switched at different steps "
                "(this worker, rank ",
                peer_.rank(), ": ", strategy_name(strategy), " after step ", steps_, ")"));
  }
  finish_pull();
  pull_.reset();
  release_gradient_aliases();
  // A round ends with its exchange (through compression, privacy and secure aggregation), which makes the models
  // equal; other strategies' models are averaged as they are.
  const bool ended_round = is_round_strategy(strategy_) && rounds_->anchored;
  if (ended_round) exchange_round("switch");
  if (peer_.size() > 1) {
    if (!ended_round) {
      NamedParameters named;
      for (std::size_t i = 0; i < parameters_.size(); ++i) named.insert(names_[i], parameters_[i]);
      average_parameters(peer_, named, str_cat(kPrefix, "switch"));
    }
    broadcast_optimizer_state(peer_, optimizer_, 0);
  }
  strategy_ = strategy;
  metrics_.strategy = strategy_name(strategy_);
  start_round();
  for (auto& bucket : buckets_) {
    if (bucket.codec) bucket.codec->reset();  // the residuals belong to the quantity the old strategy exchanged
  }
  if (strategy_ == Strategy::pair_averaging) publish_model(true);
}

void DistributedOptimizer::set_compression(Compression compression) {
  check_allowed(strategy_, compression);
  const std::string value = str_cat(compression.name(), "@", steps_);
  if (!peer_.consensus(std::as_bytes(std::span(value.data(), value.size())), str_cat(kPrefix, "set_compression"))) {
    throw MismatchError(
        str_cat("set_compression: workers asked for different compressions or switched at different "
                "steps (this worker, rank ",
                peer_.rank(), ": ", compression.name(), " after step ", steps_, ")"));
  }
  options_.compression = compression;
  build_codecs();
  metrics_.compression = compression.name();
}

void DistributedOptimizer::finish_pending(bool after_failure) {
  if (monitor_->links) monitor_->links->finish();
  if (after_failure) {
    wait_launched();
    reset_step();
    monitor_->pending = false;
    monitor_->measured = false;
    monitor_->local_sq = monitor_->big_sq = monitor_->wait = monitor_->communication = 0;
    second_backward_ = false;
    hook_error_ = nullptr;
    gradient_error_.clear();
    return;
  }
  absorb_metrics();
  finish_pull();
}

void DistributedOptimizer::on_cluster_change() {
  // More workers on this host than its CPUs allow threads for would each run several OpenMP threads per core (2.7x
  // slower steps measured with 2 workers x 2 threads on 2 cores); fewer would leave cores idle.
  if (auto_threads_ > 0 && ::torch::get_num_threads() == auto_threads_) {
    auto_threads_ = std::max(1, env::local_cpus() / std::max(1, peer_.local_size()));
    ::torch::set_num_threads(auto_threads_);
  }
  pull_.reset();
  metrics_.workers = peer_.size();
  metrics_.topology = topology_name(peer_.topology());
  monitor_->noise.reset();                // the batch sizes it pairs changed
  monitor_->installed_bandwidth.clear();  // the new cluster's Peer has no matrix installed; its links are new
  monitor_->replan_due = false;
  if (monitor_->publisher) monitor_->publisher->set_rank(peer_.rank());
  if (peer_.size() > 1) {
    // Without a PolicyRunner (which registers this count with the session), a worker that joined counts its steps
    // from 0 and a rollback restores the model, not this count: every member takes rank 0's, so that the steps that
    // also allreduce gradients (model and pair averaging with monitoring) are the same steps everywhere; otherwise
    // their collectives would not meet.
    // Rank 0's bucket size too, planned for the new cluster's links: a joining worker planned with what it knew.
    std::array<std::int64_t, 2> values{steps_, static_cast<std::int64_t>(planned_bucket_bytes())};
    peer_.broadcast(std::span<std::int64_t>(values), 0, str_cat(kPrefix, "steps"));
    steps_ = values[0];
    relayout_buckets(static_cast<std::size_t>(values[1]), "cluster change");
  }
  published_ = false;
  if (strategy_ == Strategy::pair_averaging) publish_model(true);
  for (auto& bucket : buckets_) {
    if (bucket.codec) bucket.codec->reset();  // residuals and warm starts of the old cluster's averages
  }
  // The round ends early among the new cluster. Its state (anchor, steps) came with the session's state, so the
  // members agree on whether a round is open; without a registered session a rollback or a joining worker would
  // leave workers with anchors that do not belong to their models.
  if (is_round_strategy(strategy_) && rounds_->anchored) {
    if (!session_) {
      throw ConfigError(str_cat("DistributedOptimizer: ", strategy_name(strategy_),
                                " in an elastic job needs set_elastic_session() before the first sync(), so that the "
                                "round's state is committed and sent to joining workers with the model"));
    }
    exchange_round("cluster change");
  }
}

void DistributedOptimizer::restore_compression(Compression compression) {
  if (compression == options_.compression) return;
  options_.compression = compression;
  build_codecs();
  metrics_.compression = compression.name();
}

void DistributedOptimizer::restore_steps(std::int64_t steps) {
  if (steps < 0) throw ConfigError(str_cat("DistributedOptimizer::restore_steps: ", steps, " is negative"));
  steps_ = steps;
  metrics_.step = steps;
}

// The round state that belongs to the restored model comes with the session's state too (set_elastic_session), so
// the round is left as the session restores it.
void DistributedOptimizer::restore_strategy(Strategy strategy) {
  if (strategy == strategy_) return;
  pull_.reset();
  release_gradient_aliases();
  strategy_ = strategy;
  metrics_.strategy = strategy_name(strategy_);
  published_ = false;
}

void DistributedOptimizer::set_lr(double lr) {
  if (!(lr > 0) || !std::isfinite(lr))
    throw ConfigError(str_cat("DistributedOptimizer: learning rate ", lr, " must be positive"));
  for (auto& group : optimizer_.param_groups()) group.options().set_lr(lr);
  metrics_.lr = lr;
}

double DistributedOptimizer::lr() const {
  return optimizer_.param_groups().empty() ? 0.0 : optimizer_.param_groups().front().options().get_lr();
}

}  // namespace aikido::torch
