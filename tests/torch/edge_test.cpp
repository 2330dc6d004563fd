// Edge training in the LibTorch integration, with ranks as threads: the round strategies (local SGD, federated
// averaging, DiLoCo), compression, differential privacy (per-sample gradients, DP-SGD, client-level) and secure
// aggregation inside the DistributedOptimizer.
#include <gtest/gtest.h>

#include <aikido/torch.hpp>
#include <atomic>
#include <cmath>
#include <map>
#include <mutex>
#include <thread>

#include "cluster.hpp"
#include "models.hpp"
#include "thread_job.hpp"

namespace aikido::test {
namespace {

namespace at = aikido::torch;

constexpr std::int64_t kSamples = 240;

// Trains `strategy` for `epochs` over the shared data with per-worker batches of `batch` and returns every rank's
// final parameters.
std::vector<Tensor> train(int workers, at::Strategy strategy, at::DistributedOptimizerOptions options,
                          double momentum = 0.9, int epochs = 2, std::int64_t batch = 8, PeerConfig config = {}) {
  const Data data = make_data(kSamples);
  if (config.secret.empty()) config = base_config();
  std::vector<Tensor> results(static_cast<std::size_t>(workers));
  run_cluster(workers, config, [&](Peer& peer) {
    nn::Sequential net = make_mlp(7);
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.1).momentum(momentum));
    at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), strategy, options);
    at::DistributedSampler sampler(kSamples, peer, /*seed=*/5);
    for (int e = 0; e < epochs; ++e) {
      sampler.set_epoch(e);
      while (auto b = sampler.next_batch(static_cast<std::size_t>(batch))) {
        opt.zero_grad();
        if (!b->empty()) loss_on(net, data, index_of(*b)).backward();
        opt.step(static_cast<std::int64_t>(b->size()));
      }
    }
    opt.finish_pending();
    results[static_cast<std::size_t>(peer.rank())] = flat_parameters(net);
  });
  return results;
}

double loss_of(const Tensor& flat) {
  const Data data = make_data(kSamples);
  nn::Sequential net = make_mlp(7);
  ::torch::NoGradGuard no_grad;
  std::int64_t offset = 0;
  for (auto& p : net->parameters()) {
    p.copy_(flat.narrow(0, offset, p.numel()).view_as(p));
    offset += p.numel();
  }
  return nn::functional::cross_entropy(net->forward(data.x), data.y).item<double>();
}

void expect_equal_across_ranks(const std::vector<Tensor>& results, const std::string& what) {
  for (std::size_t r = 1; r < results.size(); ++r) {
    EXPECT_TRUE(::torch::equal(results[r], results[0])) << what << ": ranks 0 and " << r << " differ";
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Round strategies

// With one local step, every worker present, equal batches and IID data, averaging the updates of one SGD step (with
// momentum: linear in the gradients) is averaging the gradients.
TEST(TorchRounds, LocalSgdAndFedAvgWithOneLocalStepEqualSynchronousSgd) {
  at::DistributedOptimizerOptions options;
  options.local_steps = 1;
  const auto ssgd = train(3, at::Strategy::synchronous_sgd, options);
  for (auto strategy : {at::Strategy::local_sgd, at::Strategy::federated_averaging}) {
    const auto rounds = train(3, strategy, options);
    expect_equal_across_ranks(rounds, at::strategy_name(strategy));
    EXPECT_TRUE(::torch::allclose(rounds[0], ssgd[0], 1e-5, 1e-6))
        << at::strategy_name(strategy) << " differs from synchronous SGD by "
        << (rounds[0] - ssgd[0]).abs().max().item<double>();
  }
  // DiLoCo with an outer learning rate of 1 and no outer momentum is local SGD.
  options.outer_lr = 1;
  options.outer_momentum = 0;
  const auto diloco = train(3, at::Strategy::diloco, options);
  EXPECT_TRUE(::torch::allclose(diloco[0], ssgd[0], 1e-5, 1e-6))
      << "diloco differs by " << (diloco[0] - ssgd[0]).abs().max().item<double>();
}

// The same with four local steps: local SGD is no longer synchronous SGD, but its models are equal after every
// round and it learns.
TEST(TorchRounds, SeveralLocalStepsLearnAndEndRoundsWithEqualModels) {
  at::DistributedOptimizerOptions options;
  options.local_steps = 4;
  const double start = loss_of(flat_parameters(make_mlp(7)));
  for (auto strategy : {at::Strategy::local_sgd, at::Strategy::federated_averaging, at::Strategy::diloco}) {
    // 240 samples / (3 x 8) = 10 steps per epoch; 4 epochs = 40 steps = 10 rounds.
    const auto results = train(3, strategy, options, 0.9, 4);
    expect_equal_across_ranks(results, at::strategy_name(strategy));
    EXPECT_LT(loss_of(results[0]), 0.6 * start) << at::strategy_name(strategy);
  }
}

// Reference for FedAvg and DiLoCo: every worker's local steps replayed in one process on copies of the model.
struct Replay {
  std::vector<nn::Sequential> nets;
  std::vector<std::unique_ptr<::torch::optim::SGD>> optimizers;
};

Replay replay(int workers, double lr) {
  Replay r;
  for (int w = 0; w < workers; ++w) {
    r.nets.push_back(make_mlp(7));
    r.optimizers.push_back(
        std::make_unique<::torch::optim::SGD>(r.nets.back()->parameters(), ::torch::optim::SGDOptions(lr)));
  }
  return r;
}

void set_flat(nn::Sequential& net, const Tensor& flat) {
  ::torch::NoGradGuard no_grad;
  std::int64_t offset = 0;
  for (auto& p : net->parameters()) {
    p.copy_(flat.narrow(0, offset, p.numel()).view_as(p).to(p.scalar_type()));
    offset += p.numel();
  }
}

// Worker w's batch in step s of the runs below: worker 0 takes 2 samples, worker 1 takes 6.
Tensor batch_of(int worker, int step) {
  const std::int64_t size = worker == 0 ? 2 : 6;
  return ::torch::arange(step * 8 + (worker == 0 ? 0 : 2), step * 8 + (worker == 0 ? 0 : 2) + size);
}

// Federated averaging weights each worker's update by the samples it trained on in the round.
TEST(TorchRounds, FedAvgWeightsUpdatesBySampleCounts) {
  constexpr int kRounds = 3, kLocal = 2;
  const Data data = make_data(kSamples);
  Replay ref = replay(2, 0.1);
  Tensor global = flat_parameters(ref.nets[0]);
  for (int round = 0; round < kRounds; ++round) {
    std::vector<Tensor> updates;
    for (int w = 0; w < 2; ++w) {
      set_flat(ref.nets[w], global);
      for (int k = 0; k < kLocal; ++k) {
        ref.optimizers[w]->zero_grad();
        loss_on(ref.nets[w], data, batch_of(w, round * kLocal + k)).backward();
        ref.optimizers[w]->step();
      }
      updates.push_back(flat_parameters(ref.nets[w]) - global);
    }
    global = global + (4.0 * updates[0] + 12.0 * updates[1]) / 16.0;  // 2 x 2 and 2 x 6 samples
  }
  std::vector<Tensor> results(2);
  run_cluster(2, base_config(), [&](Peer& peer) {
    nn::Sequential net = make_mlp(7);
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.1));
    at::DistributedOptimizerOptions options;
    options.local_steps = kLocal;
    at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), at::Strategy::federated_averaging, options);
    for (int s = 0; s < kRounds * kLocal; ++s) {
      opt.zero_grad();
      const Tensor index = batch_of(peer.rank(), s);
      loss_on(net, data, index).backward();
      opt.step(index.size(0));
    }
    results[static_cast<std::size_t>(peer.rank())] = flat_parameters(net);
  });
  EXPECT_TRUE(::torch::allclose(results[0], global, 1e-6, 1e-7))
      << "differs from the sample-weighted mean by " << (results[0] - global).abs().max().item<double>();
  EXPECT_TRUE(::torch::equal(results[0], results[1]));
}

// DiLoCo: after K inner steps, an outer SGD step with Nesterov momentum on the pseudo-gradient (anchor minus the
// mean of the workers' models).
TEST(TorchRounds, DiLoCoTakesANesterovStepOnTheAveragedPseudoGradient) {
  constexpr int kRounds = 3, kLocal = 2;
  constexpr double kOuterLr = 0.7, kMomentum = 0.9;
  const Data data = make_data(kSamples);
  Replay ref = replay(2, 0.1);
  Tensor anchor = flat_parameters(ref.nets[0]);
  Tensor velocity = ::torch::zeros_like(anchor);
  for (int round = 0; round < kRounds; ++round) {
    Tensor mean = ::torch::zeros_like(anchor);
    for (int w = 0; w < 2; ++w) {
      set_flat(ref.nets[w], anchor);
      for (int k = 0; k < kLocal; ++k) {
        ref.optimizers[w]->zero_grad();
        loss_on(ref.nets[w], data, batch_of(w, round * kLocal + k)).backward();
        ref.optimizers[w]->step();
      }
      mean += flat_parameters(ref.nets[w]) / 2;
    }
    const Tensor g = anchor - mean;
    velocity = kMomentum * velocity + g;
    anchor = anchor - kOuterLr * (g + kMomentum * velocity);
  }
  std::vector<Tensor> results(2);
  run_cluster(2, base_config(), [&](Peer& peer) {
    nn::Sequential net = make_mlp(7);
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.1));
    at::DistributedOptimizerOptions options;
    options.local_steps = kLocal;
    options.outer_lr = kOuterLr;
    options.outer_momentum = kMomentum;
    at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), at::Strategy::diloco, options);
    for (int s = 0; s < kRounds * kLocal; ++s) {
      opt.zero_grad();
      const Tensor index = batch_of(peer.rank(), s);
      loss_on(net, data, index).backward();
      opt.step(index.size(0));
    }
    results[static_cast<std::size_t>(peer.rank())] = flat_parameters(net);
  });
  EXPECT_TRUE(::torch::allclose(results[0], anchor, 1e-5, 1e-6))
      << "differs from the outer Nesterov step by " << (results[0] - anchor).abs().max().item<double>();
  EXPECT_TRUE(::torch::equal(results[0], results[1]));
}

// Secure aggregation changes how the update travels (fixed point, masked), not the average, beyond rounding.
TEST(TorchRounds, SecureAggregationGivesTheSameAverage) {
  at::DistributedOptimizerOptions options;
  options.local_steps = 4;  // 20 steps: the last round ends with the training
  const auto plain = train(3, at::Strategy::federated_averaging, options);
  options.secure_aggregation = true;
  const auto secure = train(3, at::Strategy::federated_averaging, options);
  expect_equal_across_ranks(secure, "secure aggregation");
  EXPECT_TRUE(::torch::allclose(secure[0], plain[0], 1e-4, 1e-6))
      << "differs by " << (secure[0] - plain[0]).abs().max().item<double>();
  options.compression = Compression::fp16();
  EXPECT_THROW(train(1, at::Strategy::federated_averaging, options), ConfigError);
  options.compression = Compression::none();
  EXPECT_THROW(train(1, at::Strategy::synchronous_sgd, options), ConfigError);
}

// A strategy switch in the middle of a round ends it with an exchange: the models are equal afterwards, and
// synchronous SGD goes on from there.
TEST(TorchRounds, ASwitchEndsTheRound) {
  const Data data = make_data(kSamples);
  std::vector<Tensor> results(3);
  run_cluster(3, base_config(), [&](Peer& peer) {
    nn::Sequential net = make_mlp(7);
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.1).momentum(0.9));
    at::DistributedOptimizerOptions options;
    options.local_steps = 5;
    at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), at::Strategy::federated_averaging, options);
    at::PolicyRunner runner(opt, 8, at::PolicyRunner::make({"schedule:strategy@step3=ssgd"}));
    at::DistributedSampler sampler(kSamples, peer, 5);
    while (auto b = sampler.next_batch(8)) {
      opt.zero_grad();
      loss_on(net, data, index_of(*b)).backward();
      opt.step(static_cast<std::int64_t>(b->size()));
      runner.after_step();
    }
    EXPECT_EQ(opt.strategy(), at::Strategy::synchronous_sgd);
    results[static_cast<std::size_t>(peer.rank())] = flat_parameters(net);
  });
  expect_equal_across_ranks(results, "after the switch");
}

// ---------------------------------------------------------------------------------------------------------------
// Compression

// Compressed synchronous SGD learns, with every worker's model equal: top-k and PowerSGD through their error
// feedback, the quantisers by losing little.
TEST(TorchCompression, EveryCodecLearnsWithEqualModels) {
  const double start = loss_of(flat_parameters(make_mlp(7)));
  at::DistributedOptimizerOptions options;
  const double plain = loss_of(train(3, at::Strategy::synchronous_sgd, options, 0.9, 6)[0]);
  ASSERT_LT(plain, 0.5 * start);
  for (const char* name : {"fp16", "bf16", "int8", "topk:0.1", "powersgd:2"}) {
    options.compression = Compression::parse(name);
    const auto results = train(3, at::Strategy::synchronous_sgd, options, 0.9, 6);
    expect_equal_across_ranks(results, name);
    const double loss = loss_of(results[0]);
    EXPECT_LT(loss, 0.5 * start) << name << " did not learn";
    EXPECT_LT(loss, 1.3 * plain + 0.02) << name << " learns much worse than uncompressed (" << plain << ")";
  }
}

// The same for the updates of the round strategies: DiLoCo's quantised outer exchange, and compressed local SGD.
TEST(TorchCompression, RoundUpdatesTravelCompressed) {
  const double start = loss_of(flat_parameters(make_mlp(7)));
  at::DistributedOptimizerOptions options;
  options.local_steps = 4;
  for (const char* name : {"none", "fp16", "bf16", "int8", "topk:0.2", "powersgd:2"}) {
    options.compression = Compression::parse(name);
    for (auto strategy : {at::Strategy::diloco, at::Strategy::local_sgd}) {
      const auto results = train(3, strategy, options, 0.9, 4);
      expect_equal_across_ranks(results, name);
      EXPECT_LT(loss_of(results[0]), 0.6 * start) << name << " " << at::strategy_name(strategy) << " did not learn";
    }
  }
}

// Bytes written to the connections (TCP) per worker: what the codecs promise.
TEST(TorchCompression, CodecsCutTheBytesOnTheWire) {
  const Data data = make_data(kSamples);
  PeerConfig config = base_config();
  config.transport = TransportKind::tcp;
  std::map<std::string, double> bytes;
  for (const char* name : {"none", "fp16", "topk:0.01", "powersgd:4"}) {
    std::vector<double> sent(2);
    run_cluster(2, config, [&](Peer& peer) {
      // Weights up to 512 x 512: large enough for the codecs' framing to matter little.
      nn::Sequential net = [] {
        std::lock_guard<std::mutex> lock(model_mutex());
        ::torch::manual_seed(3);
        return nn::Sequential(nn::Linear(8, 512), nn::Tanh(), nn::Linear(512, 512), nn::Tanh(), nn::Linear(512, 3));
      }();
      ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.01));
      at::DistributedOptimizerOptions options;
      options.monitor = false;
      options.compression = Compression::parse(name);
      at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), at::Strategy::synchronous_sgd, options);
      peer.barrier("start");
      const auto before = peer.bytes_sent();
      for (int s = 0; s < 5; ++s) {
        opt.zero_grad();
        loss_on(net, data, ::torch::arange(s * 8, s * 8 + 8)).backward();
        opt.step(8);
      }
      sent[static_cast<std::size_t>(peer.rank())] = static_cast<double>(peer.bytes_sent() - before);
      peer.barrier("end");
    });
    bytes[name] = sent[0];
  }
  const double parameters = 8 * 512 + 512 + 512 * 512 + 512 + 512 * 3 + 3;
  // Two workers: a ring allreduce sends each worker's half of the buffer and receives the other half back.
  EXPECT_NEAR(bytes["none"], 5 * 4 * parameters, 5 * 4 * parameters * 0.05);
  EXPECT_NEAR(bytes["fp16"] / bytes["none"], 0.5, 0.05);
  EXPECT_LT(bytes["topk:0.01"] / bytes["none"], 0.03);
  EXPECT_LT(bytes["powersgd:4"] / bytes["none"], 0.05);
}

TEST(TorchCompression, PoliciesSwitchItOnEveryWorker) {
  const Data data = make_data(kSamples);
  std::vector<std::string> seen(3);
  run_cluster(3, base_config(), [&](Peer& peer) {
    nn::Sequential net = make_mlp(7);
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.1));
    at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), at::Strategy::synchronous_sgd);
    at::PolicyRunner runner(opt, 8, at::PolicyRunner::make({"schedule:compression@step2=topk:0.1"}));
    at::DistributedSampler sampler(kSamples, peer, 5);
    for (int s = 0; s < 5; ++s) {
      auto b = sampler.next_batch(8);
      opt.zero_grad();
      loss_on(net, data, index_of(*b)).backward();
      opt.step(8);
      runner.after_step();
    }
    seen[static_cast<std::size_t>(peer.rank())] = opt.compression().name() + " " + opt.metrics().compression;
    if (peer.rank() == 0) {
      EXPECT_THROW(opt.set_compression(Compression::fp16()), MismatchError);
    } else {
      EXPECT_THROW(opt.set_compression(Compression::bf16()), MismatchError);
    }
  });
  for (const auto& s : seen) EXPECT_EQ(s, "topk:0.1 topk:0.1");
}

// ---------------------------------------------------------------------------------------------------------------
// Differential privacy

nn::Sequential make_cnn(std::uint64_t seed) {
  std::lock_guard<std::mutex> lock(model_mutex());
  ::torch::manual_seed(seed);
  return nn::Sequential(nn::Conv2d(nn::Conv2dOptions(2, 3, 3).padding(1).stride(2)), nn::ReLU(), nn::Flatten(),
                        nn::Linear(3 * 3 * 3, 4));
}

// Per-sample gradients equal the gradients of each sample's loss on its own, for Linear and Conv2d layers.
TEST(TorchPrivacy, PerSampleGradientsMatchOneSampleBackwardPasses) {
  nn::Sequential net = make_cnn(3);
  const Tensor x = ::torch::randn({5, 2, 6, 6});
  const Tensor y = ::torch::tensor({0, 3, 1, 2, 3}, ::torch::kInt64);
  at::PerSampleGradients grads(net);
  nn::functional::cross_entropy(grads.forward(x), y).backward();  // mean over the batch
  const auto per_sample = grads.per_sample();
  ASSERT_EQ(per_sample.size(), net->parameters().size());
  for (std::int64_t b = 0; b < 5; ++b) {
    net->zero_grad();
    nn::functional::cross_entropy(net->forward(x.narrow(0, b, 1)), y.narrow(0, b, 1)).backward();
    for (std::size_t p = 0; p < per_sample.size(); ++p) {
      const Tensor expected = net->parameters()[p].grad();
      EXPECT_TRUE(::torch::allclose(per_sample[p][b], expected, 1e-4, 1e-6))
          << "parameter " << p << ", sample " << b << ": off by "
          << (per_sample[p][b] - expected).abs().max().item<double>();
    }
  }
  EXPECT_THROW(at::PerSampleGradients(nn::Sequential(nn::Linear(4, 4), nn::BatchNorm1d(4))), ConfigError);
}

// Clipping scales each sample's whole gradient to norm at most C and leaves smaller ones alone; the fast clipped sum
// (without per-sample weight gradients for Linear layers) equals the sum of the clipped gradients.
TEST(TorchPrivacy, ClippedPerSampleNormsAreAtMostC) {
  nn::Sequential net = make_cnn(4);
  const Tensor x = ::torch::randn({16, 2, 6, 6}) * ::torch::linspace(0.01, 20, 16).view({16, 1, 1, 1});
  const Tensor y = ::torch::randint(0, 4, {16}, ::torch::kInt64);
  at::PerSampleGradients grads(net);
  nn::functional::cross_entropy(grads.forward(x), y).backward();
  Tensor norms;
  const auto raw = grads.per_sample();
  const double clip = 1.0;
  const auto clipped = grads.clipped(clip, &norms);
  int above = 0;
  for (std::int64_t b = 0; b < 16; ++b) {
    double squares = 0;
    for (const auto& g : clipped) squares += g[b].to(::torch::kFloat64).square().sum().item<double>();
    const double norm = norms[b].item<double>();
    EXPECT_LE(std::sqrt(squares), clip * (1 + 1e-6)) << "sample " << b << " (norm " << norm << ")";
    if (norm > clip) {
      ++above;
    } else {
      for (std::size_t p = 0; p < raw.size(); ++p) EXPECT_TRUE(::torch::allclose(clipped[p][b], raw[p][b], 1e-5, 1e-7));
    }
  }
  EXPECT_GT(above, 2) << "no sample was clipped: the test shows nothing";
  EXPECT_LT(above, 16) << "every sample was clipped: the test shows nothing";
  const auto sum = grads.clipped_sum(clip);
  for (std::size_t p = 0; p < sum.size(); ++p) {
    EXPECT_TRUE(::torch::allclose(sum[p], clipped[p].sum(0), 1e-4, 1e-6))
        << "parameter " << p << ": off by " << (sum[p] - clipped[p].sum(0)).abs().max().item<double>();
  }
}

// DP-SGD in the optimizer: without noise, the averaged gradient is the sum of all workers' clipped per-sample
// gradients over the global batch; the accountant counts one subsampled Gaussian step per step.
TEST(TorchPrivacy, DpSgdAveragesClippedGradientsAndAccountsEveryStep) {
  const Data data = make_data(kSamples);
  std::vector<Tensor> clipped_sums(2), grads(2);
  std::vector<double> epsilons(2);
  run_cluster(2, base_config(), [&](Peer& peer) {
    nn::Sequential net = make_mlp(7);
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.0));  // the model stays put
    at::PerSampleGradients per_sample(net);
    at::DistributedOptimizerOptions options;
    at::PrivacyOptions privacy;
    privacy.clip = 0.05;
    privacy.noise_multiplier = 0.0;
    privacy.dataset_size = kSamples;
    options.privacy = privacy;
    at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), at::Strategy::synchronous_sgd, options);
    EXPECT_THROW(opt.step(8), ConfigError) << "DP-SGD without per-sample gradients";
    opt.set_per_sample_gradients(&per_sample);
    opt.set_batch_size(8);
    for (int s = 0; s < 3; ++s) {
      opt.zero_grad();
      const Tensor index = ::torch::arange(16 * s + 8 * peer.rank(), 16 * s + 8 * peer.rank() + 8);
      nn::functional::cross_entropy(per_sample.forward(data.x.index_select(0, index)), data.y.index_select(0, index))
          .backward();
      opt.step(8);
    }
    std::vector<Tensor> mine, grad;
    for (const auto& t : per_sample.clipped_sum(0.05)) mine.push_back(t.reshape(-1));
    for (const auto& p : net->parameters()) grad.push_back(p.grad().reshape(-1));
    clipped_sums[static_cast<std::size_t>(peer.rank())] = ::torch::cat(mine);
    grads[static_cast<std::size_t>(peer.rank())] = ::torch::cat(grad);
    EXPECT_EQ(opt.accountant()->steps(), 3);
    EXPECT_TRUE(std::isinf(opt.accountant()->epsilon(1e-5))) << "no noise, no privacy";
  });
  const Tensor expected = (clipped_sums[0] + clipped_sums[1]) / 16;
  for (int r = 0; r < 2; ++r) {
    EXPECT_TRUE(::torch::allclose(grads[r], expected, 1e-5, 1e-7))
        << "rank " << r << " off by " << (grads[r] - expected).abs().max().item<double>();
  }
  RdpAccountant reference;
  reference.step(16.0 / kSamples, 1.1, 3);
  run_cluster(1, base_config(), [&](Peer& peer) {
    nn::Sequential net = make_mlp(7);
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.1));
    at::PerSampleGradients per_sample(net);
    at::DistributedOptimizerOptions options;
    options.privacy = at::PrivacyOptions{1.0, 1.1, 1e-5, kSamples / 2, 0};  // one worker of two's share
    at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), at::Strategy::synchronous_sgd, options);
    opt.set_per_sample_gradients(&per_sample);
    opt.set_batch_size(8);
    for (int s = 0; s < 3; ++s) {
      opt.zero_grad();
      const Tensor index = ::torch::arange(8 * s, 8 * s + 8);
      nn::functional::cross_entropy(per_sample.forward(data.x.index_select(0, index)), data.y.index_select(0, index))
          .backward();
      opt.step(8);
    }
    opt.finish_pending();
    EXPECT_NEAR(opt.accountant()->epsilon(1e-5), reference.epsilon(1e-5), 1e-12);
    EXPECT_NEAR(opt.metrics().epsilon, reference.epsilon(1e-5), 1e-12);
  });
}

// The noise: each worker adds N(0, (sigma C)^2 / workers) to its clipped sum, so the averaged gradient carries noise
// of standard deviation sigma C / global batch, from every worker's own seed.
TEST(TorchPrivacy, DpSgdNoiseHasTheStandardDeviationOfTheWholeSum) {
  const Data data = make_data(kSamples);
  constexpr double kClip = 0.5, kSigma = 2.0;
  std::vector<Tensor> noisy(3), clean(3);
  for (double sigma : {0.0, kSigma}) {
    std::vector<Tensor>& out = sigma > 0 ? noisy : clean;
    run_cluster(3, base_config(), [&](Peer& peer) {
      nn::Sequential net = make_mlp(7, ::torch::kFloat32, 256);
      ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.0));
      at::PerSampleGradients per_sample(net);
      at::DistributedOptimizerOptions options;
      options.privacy = at::PrivacyOptions{kClip, sigma, 1e-5, kSamples, 1000 + std::uint64_t(peer.rank())};
      at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), at::Strategy::synchronous_sgd, options);
      opt.set_per_sample_gradients(&per_sample);
      opt.set_batch_size(8);
      opt.zero_grad();
      const Tensor index = ::torch::arange(8 * peer.rank(), 8 * peer.rank() + 8);
      nn::functional::cross_entropy(per_sample.forward(data.x.index_select(0, index)), data.y.index_select(0, index))
          .backward();
      opt.step(8);
      std::vector<Tensor> grad;
      for (const auto& p : net->parameters()) grad.push_back(p.grad().reshape(-1).clone());
      out[static_cast<std::size_t>(peer.rank())] = ::torch::cat(grad);
    });
  }
  const Tensor noise = noisy[0] - clean[0];
  const double expected = kSigma * kClip / 24;  // global batch 3 x 8
  EXPECT_NEAR(noise.std().item<double>(), expected, expected * 0.05);
  EXPECT_NEAR(noise.mean().item<double>(), 0.0, expected * 0.05);
  EXPECT_TRUE(::torch::equal(noisy[0], noisy[2])) << "workers hold the same noised average";
}

// Client-level DP: every worker's update of a round is clipped to C, so the model moves by at most C per round
// (the mean of vectors of norm <= C), and each round is one Gaussian step of the accountant.
TEST(TorchPrivacy, ClientLevelClippingBoundsEveryRound) {
  const Data data = make_data(kSamples);
  run_cluster(3, base_config(), [&](Peer& peer) {
    nn::Sequential net = make_mlp(7);
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.5));
    at::DistributedOptimizerOptions options;
    options.local_steps = 3;
    options.privacy = at::PrivacyOptions{0.01, 0.0, 1e-5, 0, 0};
    at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), at::Strategy::federated_averaging, options);
    at::DistributedSampler sampler(kSamples, peer, 5);
    Tensor last = flat_parameters(net);
    int rounds = 0;
    for (int s = 1; s <= 9; ++s) {
      auto b = sampler.next_batch(8);
      opt.zero_grad();
      loss_on(net, data, index_of(*b)).backward();
      opt.step(8);
      if (s % 3 == 0) {
        const Tensor now = flat_parameters(net);
        EXPECT_LE((now - last).norm().item<double>(), 0.01 * (1 + 1e-5)) << "round " << s / 3;
        EXPECT_GT((now - last).norm().item<double>(), 0.001) << "the model did not move";
        last = now;
        ++rounds;
      }
    }
    EXPECT_EQ(opt.accountant()->steps(), rounds);
    EXPECT_THROW(opt.set_strategy(at::Strategy::synchronous_sgd), ConfigError) << "per-worker to per-sample DP";
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Elastic rounds: a worker leaving mid-round, and stragglers left behind at the round deadline

struct ElasticRun {
  std::mutex mutex;
  std::map<std::uint64_t, Tensor> models;   // per worker, at the end
  std::map<std::uint64_t, int> final_size;  // per worker, the cluster size at the end
  std::map<std::uint64_t, bool> removed;    // per worker
};

// FedAvg with secure aggregation, 3 workers; worker 2 leaves (its session closes) in the middle of round 3, after
// the round-2 commit. The others fail the round, roll back to the commit, redo the round among themselves with fresh
// masks and go on; their models stay equal.
TEST(TorchElasticRounds, FedAvgGoesOnWhenAWorkerLeavesMidRound) {
  const Data data = make_data(512);
  ElasticRun run;
  test::ThreadJob job(3, 3, [&](ElasticSession& s) {
    nn::Sequential net = make_mlp(5);
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.05).momentum(0.9));
    at::DistributedOptimizerOptions options;
    options.collective_setup = false;
    options.local_steps = 3;
    options.secure_aggregation = true;
    at::DistributedOptimizer opt(s.peer(), sgd, net->named_parameters(), at::Strategy::federated_averaging, options);
    at::DistributedSampler sampler(512, s.peer(), 1);
    std::int64_t step = 0;
    opt.set_elastic_session(&s);
    at::register_state(s, net->named_parameters(), sgd, sampler);
    s.register_value("step", step);
    while (step < 15) {
      try {
        opt.finish_pending();
        const SyncResult r = s.sync(step);
        if (r == SyncResult::removed) return;
        if (r == SyncResult::changed) opt.on_cluster_change();
        if (s.worker_id() == 2 && step == 7) return;  // mid-round 3 (steps 7 to 9)
        auto b = sampler.next_batch(8);
        if (!b) {
          sampler.set_epoch(sampler.epoch() + 1);
          continue;
        }
        opt.zero_grad();
        if (!b->empty()) loss_on(net, data, index_of(*b)).backward();
        opt.step(static_cast<std::int64_t>(b->size()));
        ++step;
        if (step % 3 == 0) s.commit();  // at the end of every round
      } catch (const PeerLostError&) {
        opt.finish_pending(/*after_failure=*/true);
        ASSERT_EQ(s.recover(), SyncResult::changed);
        opt.on_cluster_change();
      }
    }
    opt.finish_pending();
    std::lock_guard<std::mutex> lock(run.mutex);
    run.models[s.worker_id()] = flat_parameters(net);
    run.final_size[s.worker_id()] = s.size();
  });
  job.run();
  ASSERT_EQ(run.models.size(), 2u) << "worker 2 left, the others finished";
  EXPECT_EQ(run.final_size[0], 2);
  EXPECT_EQ(run.final_size[1], 2);
  EXPECT_TRUE(::torch::equal(run.models[0], run.models[1]));
}

// FedAvg with a round deadline: worker 2 stalls in a local step of round 3 until the others have left it behind
// (waiting for that event, not for a time). The others wait for the deadline, find it has not finished its round,
// propose the cluster without it, recover and go on; worker 2 finds itself removed.
TEST(TorchElasticRounds, TheRoundDeadlineLeavesAStragglerBehind) {
  const Data data = make_data(512);
  ElasticRun run;
  std::atomic<test::ThreadJob*> self{nullptr};
  std::atomic<int> deadlines{0};
  test::ThreadJob job(3, 3, [&](ElasticSession& s) {
    nn::Sequential net = make_mlp(5);
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.05));
    at::DistributedOptimizerOptions options;
    options.collective_setup = false;
    options.local_steps = 2;
    options.round_deadline = std::chrono::milliseconds(300);
    at::DistributedOptimizer opt(s.peer(), sgd, net->named_parameters(), at::Strategy::federated_averaging, options);
    at::DistributedSampler sampler(512, s.peer(), 1);
    std::int64_t step = 0;
    opt.set_elastic_session(&s);
    at::register_state(s, net->named_parameters(), sgd, sampler);
    s.register_value("step", step);
    bool stalled = false;
    while (step < 12) {
      try {
        opt.finish_pending();
        const SyncResult r = s.sync(step);
        if (r == SyncResult::removed) break;
        if (r == SyncResult::changed) opt.on_cluster_change();
        auto b = sampler.next_batch(8);
        if (!b) {
          sampler.set_epoch(sampler.epoch() + 1);
          continue;
        }
        if (s.worker_id() == 2 && step == 5 && !stalled) {
          stalled = true;  // round 3's second step: wait until a cluster without this worker exists
          for (;;) {
            const auto latest = self.load()->membership()->latest();
            if (latest && latest->size() == 2) break;
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
          }
        }
        opt.zero_grad();
        if (!b->empty()) loss_on(net, data, index_of(*b)).backward();
        opt.step(static_cast<std::int64_t>(b->size()));
        ++step;
        if (step % 2 == 0) s.commit();
      } catch (const TimeoutError& e) {
        EXPECT_NE(std::string(e.what()).find("did not finish round 3 within the round deadline"), std::string::npos)
            << e.what();
        ++deadlines;
        opt.finish_pending(/*after_failure=*/true);
        if (s.recover() == SyncResult::removed) break;
        opt.on_cluster_change();
      } catch (const PeerLostError&) {
        opt.finish_pending(/*after_failure=*/true);
        if (s.recover() == SyncResult::removed) break;
        opt.on_cluster_change();
      }
    }
    opt.finish_pending(/*after_failure=*/true);
    std::lock_guard<std::mutex> lock(run.mutex);
    run.removed[s.worker_id()] = s.removed();
    run.final_size[s.worker_id()] = s.size();
    if (!s.removed()) run.models[s.worker_id()] = flat_parameters(net);
  });
  self = &job;
  job.run();
  EXPECT_GE(deadlines.load(), 1);
  EXPECT_TRUE(run.removed[2]) << "the straggler was not left behind";
  EXPECT_FALSE(run.removed[0]);
  EXPECT_FALSE(run.removed[1]);
  EXPECT_EQ(run.final_size[0], 2);
  ASSERT_EQ(run.models.size(), 2u);
  EXPECT_TRUE(::torch::equal(run.models[0], run.models[1]));
}

// ---------------------------------------------------------------------------------------------------------------
// Partitions

TEST(TorchPartition, DirichletSplitIsExactDisjointAndSkewed) {
  const Tensor labels = ::torch::arange(10).repeat({200});  // 10 classes x 200
  for (double alpha : {0.1, 100.0}) {
    const auto parts = at::dirichlet_partition(labels, 4, alpha, 9);
    ASSERT_EQ(parts.size(), 4u);
    std::vector<int> seen(2000, 0);
    double largest_share = 0;
    for (const auto& part : parts) {
      std::vector<int> per_class(10, 0);
      for (auto i : part) {
        ++seen[static_cast<std::size_t>(i)];
        ++per_class[static_cast<std::size_t>(i % 10)];
      }
      for (int c : per_class) largest_share = std::max(largest_share, c / 200.0);
    }
    for (int count : seen) EXPECT_EQ(count, 1);
    if (alpha < 1) {
      EXPECT_GT(largest_share, 0.8) << "alpha 0.1 should give some worker most of a class";
    } else {
      EXPECT_LT(largest_share, 0.45) << "alpha 100 is close to an even split";
    }
    EXPECT_EQ(at::dirichlet_partition(labels, 4, alpha, 9), parts) << "the same on every worker";
  }
  EXPECT_THROW(at::dirichlet_partition(labels, 4, 0.0, 1), ConfigError);
}

}  // namespace
}  // namespace aikido::test
