// Small models and data for the LibTorch tests (ranks as threads: every model is built under one lock, since
// LibTorch's default generator is global).
#pragma once

#include <aikido/torch.hpp>
#include <mutex>
#include <vector>

namespace aikido::test {

namespace nn = ::torch::nn;
using ::torch::Tensor;

// Models are built under one lock with a fixed seed: LibTorch's default generator is global.
inline std::mutex& model_mutex() {
  static std::mutex m;
  return m;
}

inline nn::Sequential make_mlp(std::uint64_t seed, ::torch::Dtype dtype = ::torch::kFloat32, int hidden = 16) {
  std::lock_guard<std::mutex> lock(model_mutex());
  ::torch::manual_seed(seed);
  nn::Sequential net(nn::Linear(8, hidden), nn::Tanh(), nn::Linear(hidden, 3));
  net->to(dtype);
  return net;
}

// A fixed classification data set: 8 features, 3 classes.
struct Data {
  Tensor x, y;
};
inline Data make_data(std::int64_t n, ::torch::Dtype dtype = ::torch::kFloat32) {
  std::lock_guard<std::mutex> lock(model_mutex());
  ::torch::manual_seed(1234);
  Data d;
  d.x = ::torch::randn({n, 8}).to(dtype);
  d.y = (d.x.narrow(1, 0, 1).squeeze(1).to(::torch::kFloat32) > 0).to(::torch::kInt64) +
        (d.x.narrow(1, 1, 1).squeeze(1).to(::torch::kFloat32) > 0.5).to(::torch::kInt64);
  return d;
}

inline Tensor index_of(const std::vector<std::size_t>& v) {
  std::vector<std::int64_t> i(v.begin(), v.end());
  return ::torch::tensor(i, ::torch::kInt64);
}

inline Tensor flat_parameters(const nn::Sequential& net) {
  std::vector<Tensor> all;
  for (const auto& p : net->parameters()) all.push_back(p.detach().reshape(-1).to(::torch::kFloat64));
  return ::torch::cat(all);
}

// One training step of `net` on the samples `index`.
inline Tensor loss_on(nn::Sequential& net, const Data& d, const Tensor& index) {
  const Tensor out = net->forward(d.x.index_select(0, index)).to(::torch::kFloat32);
  return nn::functional::cross_entropy(out, d.y.index_select(0, index));
}

}  // namespace aikido::test
