// Per-sample gradients for DP-SGD and the Dirichlet split of a data set (include/aikido/torch.hpp).
#include <aikido/torch.hpp>
#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>

#include "base/error.hpp"

namespace aikido::torch {

using detail::str_cat;

// One Linear or Conv2d layer: its input of this step, and the gradient at its output that backward() hands to the
// hook on that output. Their per-sample products are the per-sample gradients of its weight and bias.
struct PerSampleGradients::Layer {
  std::size_t position = 0;  // in the Sequential
  ::torch::nn::LinearImpl* linear = nullptr;
  ::torch::nn::Conv2dImpl* conv = nullptr;
  std::int64_t weight = -1, bias = -1;  // indices into parameters_
  ::torch::Tensor input, grad_output;
};

PerSampleGradients::PerSampleGradients(::torch::nn::Sequential model, LossReduction reduction)
    : model_(std::move(model)), reduction_(reduction) {
  parameters_ = model_->parameters();
  const auto index_of = [&](const ::torch::Tensor& t) -> std::int64_t {
    if (!t.defined()) return -1;
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      if (parameters_[i].unsafeGetTensorImpl() == t.unsafeGetTensorImpl()) return static_cast<std::int64_t>(i);
    }
    return -1;
  };
  for (std::size_t i = 0; i < model_->size(); ++i) {
    const std::shared_ptr<::torch::nn::Module> module = model_->ptr(i);
    auto layer = std::make_unique<Layer>();
    layer->position = i;
    if (auto* linear = module->as<::torch::nn::Linear>()) {
      layer->linear = linear;
      layer->weight = index_of(linear->weight);
      layer->bias = index_of(linear->bias);
    } else if (auto* conv = module->as<::torch::nn::Conv2d>()) {
      const auto& o = conv->options;
      if (o.groups() != 1 || !c10::get_if<::torch::enumtype::kZeros>(&o.padding_mode()) ||
          c10::get_if<::torch::enumtype::kSame>(&o.padding())) {
        throw ConfigError(str_cat("PerSampleGradients: layer ", i,
                                  " is a Conv2d with groups, a padding mode other than zeros or padding 'same': "
                                  "per-sample gradients support plain Conv2d layers"));
      }
      layer->conv = conv;
      layer->weight = index_of(conv->weight);
      layer->bias = index_of(conv->bias);
    } else {
      if (!module->parameters().empty()) {
        throw ConfigError(str_cat("PerSampleGradients: layer ", i, " (", module->name(),
                                  ") has parameters but is neither Linear nor Conv2d; per-sample gradients (DP-SGD) "
                                  "support those two (a layer such as BatchNorm mixes the samples of a batch)"));
      }
      continue;
    }
    layers_.push_back(std::move(layer));
  }
}

PerSampleGradients::~PerSampleGradients() = default;

const std::vector<::torch::Tensor>& PerSampleGradients::parameters() const { return parameters_; }
std::int64_t PerSampleGradients::batch_size() const { return batch_size_; }

::torch::Tensor PerSampleGradients::forward(const ::torch::Tensor& input) {
  batch_size_ = input.size(0);
  auto next = layers_.begin();
  ::torch::Tensor x = input;
  for (std::size_t i = 0; i < model_->size(); ++i) {
    if (next != layers_.end() && (*next)->position == i) {
      Layer* layer = next->get();
      ++next;
      layer->input = x.detach();
      layer->grad_output = ::torch::Tensor();
      x = layer->linear != nullptr ? layer->linear->forward(x) : layer->conv->forward(x);
      if (x.requires_grad()) x.register_hook([layer](::torch::Tensor g) { layer->grad_output = g.detach(); });
    } else {
      x = model_->begin()[static_cast<std::ptrdiff_t>(i)].forward(x);
    }
  }
  return x;
}

// The per-sample factors of one layer's gradients. Linear: g [b, S, out] (gradient at the output, per sample's own
// loss) and a [b, S, in] (input); the per-sample weight gradient is g_b^T a_b. Conv2d: g [b, out, L] and the unfolded
// input a [b, in * kh * kw, L]; the per-sample weight gradient is g_b a_b^T.
struct PerSampleGradients::Factors {
  bool conv = false;
  ::torch::Tensor g, a;
};

PerSampleGradients::Factors PerSampleGradients::factors(const Layer& layer) const {
  if (!layer.grad_output.defined()) {
    throw ConfigError(str_cat("PerSampleGradients: layer ", layer.position,
                              " received no gradient: call backward() on a loss of this step's forward() first"));
  }
  const std::int64_t b = batch_size_;
  const double scale = reduction_ == LossReduction::mean ? static_cast<double>(b) : 1.0;
  const ::torch::Tensor g = layer.grad_output * scale;
  Factors f;
  if (layer.linear != nullptr) {
    // Inputs of any rank: the middle dimensions (a sequence) add up.
    f.a = layer.input.reshape({b, -1, layer.input.size(-1)});
    f.g = g.reshape({b, -1, g.size(-1)});
    return f;
  }
  const auto& o = layer.conv->options;
  std::vector<std::int64_t> padding{0, 0};
  if (const auto* p = c10::get_if<::torch::ExpandingArray<2>>(&o.padding())) padding = {(**p)[0], (**p)[1]};
  f.conv = true;
  f.a = ::torch::nn::functional::unfold(layer.input, ::torch::nn::functional::UnfoldFuncOptions(o.kernel_size())
                                                         .dilation(o.dilation())
                                                         .padding(::torch::ExpandingArray<2>(padding))
                                                         .stride(o.stride()));
  f.g = g.reshape({b, g.size(1), -1});
  return f;
}

namespace {

// [b, shape...] for a parameter of `shape`.
std::vector<std::int64_t> batched(std::int64_t b, ::torch::IntArrayRef shape) {
  std::vector<std::int64_t> out{b};
  for (auto d : shape) out.push_back(d);
  return out;
}

}  // namespace

std::vector<::torch::Tensor> PerSampleGradients::per_sample() const {
  ::torch::NoGradGuard no_grad;
  std::vector<::torch::Tensor> out(parameters_.size());
  const std::int64_t b = batch_size_;
  for (const auto& layer : layers_) {
    const Factors f = factors(*layer);
    const ::torch::Tensor weight =
        f.conv ? ::torch::bmm(f.g, f.a.transpose(1, 2)) : ::torch::bmm(f.g.transpose(1, 2), f.a);
    const ::torch::Tensor bias = f.conv ? f.g.sum(2) : f.g.sum(1);
    if (layer->weight >= 0) {
      const auto& p = parameters_[static_cast<std::size_t>(layer->weight)];
      out[static_cast<std::size_t>(layer->weight)] = weight.reshape(batched(b, p.sizes()));
    }
    if (layer->bias >= 0) out[static_cast<std::size_t>(layer->bias)] = bias;
  }
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (!out[i].defined()) out[i] = ::torch::zeros(batched(b, parameters_[i].sizes()));  // not reached by backward
  }
  return out;
}

std::vector<::torch::Tensor> PerSampleGradients::clipped(double clip, ::torch::Tensor* norms) const {
  if (!(clip > 0)) throw ConfigError(str_cat("PerSampleGradients: the clip ", clip, " must be above 0"));
  ::torch::NoGradGuard no_grad;
  std::vector<::torch::Tensor> grads = per_sample();
  ::torch::Tensor squares = ::torch::zeros({batch_size_}, ::torch::kFloat64);
  for (const auto& g : grads) squares += g.reshape({batch_size_, -1}).to(::torch::kFloat64).square().sum(1);
  const ::torch::Tensor factor = clip_factor(squares, clip, norms);
  for (auto& g : grads) {
    std::vector<std::int64_t> shape(static_cast<std::size_t>(g.dim()), 1);
    shape[0] = batch_size_;
    g = g * factor.to(g.scalar_type()).view(shape);
  }
  return grads;
}

// Opacus's factor: clip / (norm + 1e-6), at most 1.
::torch::Tensor PerSampleGradients::clip_factor(const ::torch::Tensor& squares, double clip, ::torch::Tensor* norms) {
  const ::torch::Tensor norm = squares.sqrt();
  if (norms != nullptr) *norms = norm;
  return (clip / (norm + 1e-6)).clamp_max(1.0);
}

// Without the per-sample gradients themselves where it can: a Linear layer's per-sample weight gradient g_b^T a_b
// (one position per sample) has the norm |g_b| |a_b|, and the clipped sum is one product (f g)^T a. Only convolutions
// (and Linear layers over sequences) need their per-sample gradients for the norms, which are small for them.
std::vector<::torch::Tensor> PerSampleGradients::clipped_sum(double clip, ::torch::Tensor* norms) const {
  if (!(clip > 0)) throw ConfigError(str_cat("PerSampleGradients: the clip ", clip, " must be above 0"));
  ::torch::NoGradGuard no_grad;
  const std::int64_t b = batch_size_;
  std::vector<Factors> all;
  std::vector<::torch::Tensor> materialised(layers_.size());
  ::torch::Tensor squares = ::torch::zeros({b}, ::torch::kFloat64);
  for (std::size_t l = 0; l < layers_.size(); ++l) {
    const Layer& layer = *layers_[l];
    all.push_back(factors(layer));
    const Factors& f = all.back();
    const bool rank_one = !f.conv && f.g.size(1) == 1;
    if (layer.weight >= 0) {
      if (rank_one) {
        squares += (f.g.squeeze(1).to(::torch::kFloat64).square().sum(1) *
                    f.a.squeeze(1).to(::torch::kFloat64).square().sum(1));
      } else {
        materialised[l] = f.conv ? ::torch::bmm(f.g, f.a.transpose(1, 2)) : ::torch::bmm(f.g.transpose(1, 2), f.a);
        squares += materialised[l].reshape({b, -1}).to(::torch::kFloat64).square().sum(1);
      }
    }
    if (layer.bias >= 0) squares += (f.conv ? f.g.sum(2) : f.g.sum(1)).to(::torch::kFloat64).square().sum(1);
  }
  const ::torch::Tensor factor = clip_factor(squares, clip, norms);
  std::vector<::torch::Tensor> out(parameters_.size());
  for (std::size_t l = 0; l < layers_.size(); ++l) {
    const Layer& layer = *layers_[l];
    const Factors& f = all[l];
    const ::torch::Tensor scaled = f.g * factor.to(f.g.scalar_type()).view({b, 1, 1});
    if (layer.weight >= 0) {
      const auto& p = parameters_[static_cast<std::size_t>(layer.weight)];
      ::torch::Tensor weight;
      if (f.conv) {
        // sum_b (f_b g_b) a_b^T as one product over every sample's positions: [out, b L] x [b L, in kh kw].
        weight = ::torch::mm(scaled.transpose(0, 1).reshape({f.g.size(1), -1}),
                             f.a.transpose(1, 2).reshape({-1, f.a.size(1)}));
      } else {
        weight = ::torch::mm(scaled.reshape({-1, f.g.size(2)}).t(), f.a.reshape({-1, f.a.size(2)}));
      }
      out[static_cast<std::size_t>(layer.weight)] = weight.reshape(p.sizes());
    }
    if (layer.bias >= 0)
      out[static_cast<std::size_t>(layer.bias)] = f.conv ? scaled.sum(2).sum(0) : scaled.sum(1).sum(0);
  }
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (!out[i].defined()) out[i] = ::torch::zeros_like(parameters_[i]);
  }
  return out;
}

std::vector<std::vector<std::int64_t>> dirichlet_partition(const ::torch::Tensor& labels, int workers, double alpha,
                                                           std::uint64_t seed) {
  if (workers < 1) throw ConfigError(str_cat("dirichlet_partition: ", workers, " workers"));
  if (!(alpha > 0) || !std::isfinite(alpha)) {
    throw ConfigError(str_cat("dirichlet_partition: alpha ", alpha, " must be above 0 (e.g. 0.5)"));
  }
  const ::torch::Tensor flat = labels.to(::torch::kInt64).contiguous().reshape(-1);
  const auto* data = flat.data_ptr<std::int64_t>();
  std::map<std::int64_t, std::vector<std::int64_t>> by_class;
  for (std::int64_t i = 0; i < flat.numel(); ++i) by_class[data[i]].push_back(i);
  std::mt19937_64 rng(seed * 0x9e3779b97f4a7c15ULL + 0x5851f42d4c957f2dULL);
  std::gamma_distribution<double> gamma(alpha, 1.0);
  std::vector<std::vector<std::int64_t>> parts(static_cast<std::size_t>(workers));
  for (auto& [label, indices] : by_class) {
    std::shuffle(indices.begin(), indices.end(), rng);
    // Dirichlet(alpha, ..., alpha) shares: independent Gamma(alpha) draws, normalised.
    std::vector<double> shares(static_cast<std::size_t>(workers));
    double total = 0;
    for (auto& s : shares) total += (s = gamma(rng));
    if (!(total > 0)) {
      std::fill(shares.begin(), shares.end(), 1.0);  // every draw underflowed (tiny alpha): an even split
      total = workers;
    }
    std::size_t begin = 0;
    double cumulative = 0;
    for (int w = 0; w < workers; ++w) {
      cumulative += shares[static_cast<std::size_t>(w)] / total;
      const std::size_t end =
          w + 1 == workers
              ? indices.size()
              : std::min(indices.size(), static_cast<std::size_t>(std::llround(cumulative * indices.size())));
      for (std::size_t k = begin; k < std::max(begin, end); ++k)
        parts[static_cast<std::size_t>(w)].push_back(indices[k]);
      begin = std::max(begin, end);
    }
  }
  for (auto& p : parts) std::sort(p.begin(), p.end());
  return parts;
}

}  // namespace aikido::torch
