// The README's LibTorch training loop, built against the installed package: a few steps of a small model on random
// data.
#include <aikido/torch.hpp>
#include <cstdio>

int main() {
  try {
    aikido::Peer peer = aikido::Peer::from_env();
    torch::manual_seed(1);
    torch::nn::Sequential model(torch::nn::Linear(8, 4), torch::nn::ReLU(), torch::nn::Linear(4, 2));
    torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
    aikido::torch::broadcast_parameters(peer, model->named_parameters(), /*root=*/0);
    aikido::torch::DistributedOptimizer opt(peer, sgd, model->named_parameters(),
                                            aikido::torch::Strategy::synchronous_sgd);
    const std::size_t dataset_size = 256;
    const torch::Tensor inputs = torch::randn({std::int64_t(dataset_size), 8});
    const torch::Tensor labels = torch::randint(0, 2, {std::int64_t(dataset_size)});
    aikido::torch::DistributedSampler sampler(dataset_size, peer, /*seed=*/1);
    for (int epoch = 0; epoch < 2; ++epoch) {
      sampler.set_epoch(epoch);
      while (auto batch = sampler.next_batch(32)) {
        opt.zero_grad();
        std::vector<std::int64_t> indices(batch->begin(), batch->end());
        const torch::Tensor index = torch::tensor(indices, torch::kInt64);
        const torch::Tensor loss = torch::nn::functional::cross_entropy(model->forward(inputs.index_select(0, index)),
                                                                        labels.index_select(0, index));
        loss.backward();
        opt.step();
      }
    }
  } catch (const aikido::Error& e) {
    std::fprintf(stderr, "torch_worker: %s\n", e.what());
    return 1;
  }
}
