// The LibTorch integration, with ranks as threads of this process (tests/unit/cluster.hpp).
#include <gtest/gtest.h>

#include <aikido/torch.hpp>
#include <cmath>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "cluster.hpp"
#include "models.hpp"
#include "thread_job.hpp"

namespace aikido::test {
namespace {

namespace at = aikido::torch;
namespace nn = ::torch::nn;
using ::torch::Tensor;

// Synchronous SGD with N workers at batch b equals one process at batch N*b on the same samples.
void expect_ssgd_matches_single_process(int workers, ::torch::Dtype dtype, double tolerance) {
  constexpr std::int64_t kBatch = 8, kSamples = 240;
  constexpr int kEpochs = 2;
  const Data data = make_data(kSamples, dtype);

  // The reference: one process, global batch.
  nn::Sequential reference = make_mlp(7, dtype);
  {
    ::torch::optim::SGD sgd(reference->parameters(), ::torch::optim::SGDOptions(0.1).momentum(0.9));
    at::DistributedSampler sampler(kSamples, 0, 1, /*seed=*/5);
    for (int e = 0; e < kEpochs; ++e) {
      sampler.set_epoch(e);
      while (auto batch = sampler.next_batch(kBatch * workers)) {
        sgd.zero_grad();
        loss_on(reference, data, index_of(*batch)).backward();
        sgd.step();
      }
    }
  }
  const Tensor expected = flat_parameters(reference);

  std::vector<Tensor> results(workers);
  run_cluster(workers, base_config(), [&](Peer& peer) {
    nn::Sequential net = make_mlp(7, dtype);
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.1).momentum(0.9));
    at::broadcast_parameters(peer, net->named_parameters(), 0);
    at::DistributedOptimizerOptions options;
    options.bucket_bytes = 256;  // several buckets even for this small model
    at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), at::Strategy::synchronous_sgd, options);
    at::DistributedSampler sampler(kSamples, peer, /*seed=*/5);
    for (int e = 0; e < kEpochs; ++e) {
      sampler.set_epoch(e);
      while (auto batch = sampler.next_batch(kBatch)) {
        opt.zero_grad();
        loss_on(net, data, index_of(*batch)).backward();
        opt.step();
      }
    }
    results[peer.rank()] = flat_parameters(net);
  });
  for (int r = 0; r < workers; ++r) {
    EXPECT_TRUE(::torch::allclose(results[r], expected, tolerance, tolerance))
        << "rank " << r << " differs from the single process by " << (results[r] - expected).abs().max().item<double>();
    EXPECT_TRUE(::torch::equal(results[r], results[0])) << "ranks 0 and " << r << " differ";
  }
}

TEST(TorchSynchronousSgd, MatchesOneProcessWithTheGlobalBatch) {
  expect_ssgd_matches_single_process(2, ::torch::kFloat32, 1e-5);
  expect_ssgd_matches_single_process(3, ::torch::kFloat32, 1e-5);
}

TEST(TorchSynchronousSgd, MatchesOneProcessInFloat64) {
  expect_ssgd_matches_single_process(4, ::torch::kFloat64, 1e-12);
}

TEST(TorchSynchronousSgd, HalfPrecisionParametersStayEqualAcrossWorkers) {
  // LibTorch's CPU kernels lack some half-precision layers: the parameters are stored in half precision and used in
  // float32, so that their gradients arrive in half precision.
  for (auto dtype : {::torch::kFloat16, ::torch::kBFloat16}) {
    std::vector<Tensor> results(2);
    run_cluster(2, base_config(), [&](Peer& peer) {
      Tensor w = ::torch::full({300}, 0.5, ::torch::TensorOptions().dtype(dtype).requires_grad(true));
      Tensor b = ::torch::zeros({3}, ::torch::TensorOptions().dtype(dtype).requires_grad(true));
      at::NamedParameters named;
      named.insert("w", w);
      named.insert("b", b);
      ::torch::optim::SGD sgd({w, b}, ::torch::optim::SGDOptions(0.01));
      at::DistributedOptimizer opt(peer, sgd, named, at::Strategy::synchronous_sgd);
      const Tensor before = ::torch::cat({w.detach(), b.detach()}).clone();
      for (int step = 0; step < 4; ++step) {
        opt.zero_grad();
        const Tensor x = ::torch::linspace(-1, 1, 300) * static_cast<double>(peer.rank() + step + 1);
        const Tensor y = (w.to(::torch::kFloat32) * x).sum() + b.to(::torch::kFloat32).sum();
        (y - 1.0).pow(2).backward();
        opt.step();
      }
      EXPECT_EQ(w.grad().scalar_type(), dtype);
      EXPECT_FALSE(::torch::equal(before, ::torch::cat({w.detach(), b.detach()}))) << "training changed nothing";
      results[peer.rank()] = ::torch::cat({w.detach(), b.detach()});
    });
    EXPECT_TRUE(::torch::equal(results[0], results[1])) << c10::toString(dtype);
  }
}

TEST(TorchSynchronousSgd, ParametersWithoutGradientCountAsZero) {
  // Rank 0 uses both heads, rank 1 only the first: the second head's bucket must still complete on both.
  std::vector<Tensor> results(2);
  run_cluster(2, base_config(), [&](Peer& peer) {
    std::unique_lock<std::mutex> lock(model_mutex());
    ::torch::manual_seed(3);
    nn::Linear a(4, 4), b(4, 4);
    lock.unlock();
    auto named = a->named_parameters(true);
    for (const auto& item : b->named_parameters(true)) named.insert("b." + item.key(), item.value());
    std::vector<Tensor> params;
    for (const auto& item : named) params.push_back(item.value());
    ::torch::optim::SGD sgd(params, ::torch::optim::SGDOptions(0.1));
    at::DistributedOptimizerOptions options;
    options.bucket_bytes = 64;
    at::DistributedOptimizer opt(peer, sgd, named, at::Strategy::synchronous_sgd, options);
    const Tensor x = ::torch::ones({2, 4});
    for (int step = 0; step < 3; ++step) {
      opt.zero_grad();
      Tensor loss = a->forward(x).sum();
      if (peer.rank() == 0) loss = loss + b->forward(x).sum();
      loss.backward();
      opt.step();
    }
    std::vector<Tensor> flat;
    for (const auto& p : params) flat.push_back(p.detach().reshape(-1));
    results[peer.rank()] = ::torch::cat(flat);
  });
  EXPECT_TRUE(::torch::equal(results[0], results[1]));
}

// One 4-element parameter `w` whose gradient on rank r is the unit vector e_r (loss (w * x).sum() with x = e_r).
struct UnitGradient {
  explicit UnitGradient(int rank)
      : w(::torch::zeros({4}, ::torch::requires_grad())),
        x(::torch::zeros({4})),
        sgd({w}, ::torch::optim::SGDOptions(0.1)) {
    named.insert("w", w);
    x[rank] = 1.0;
  }
  void backward() { (w * x).sum().backward(); }
  Tensor w, x;
  at::NamedParameters named;
  ::torch::optim::SGD sgd;
};

TEST(TorchSynchronousSgd, AveragedGradientsSurviveEitherZeroGradAndAStrategySwitch) {
  // Rank r's gradient is e_r: the average is (1/2, 1/2, 0, 0). After step() .grad() shares memory with the bucket;
  // LibTorch's own zero_grad() must work on it, a following step must not add into it, and after a switch to model
  // averaging (which fills the buckets with model values) the gradient must keep its value.
  run_cluster(2, base_config(), [&](Peer& peer) {
    UnitGradient g(peer.rank());
    Tensor& w = g.w;
    auto& named = g.named;
    auto& sgd = g.sgd;
    at::DistributedOptimizer opt(peer, sgd, named, at::Strategy::synchronous_sgd);
    const Tensor average = ::torch::tensor({0.5f, 0.5f, 0.0f, 0.0f});
    for (int step = 0; step < 4; ++step) {
      if (step % 2) {
        sgd.zero_grad();
        EXPECT_TRUE(::torch::equal(w.grad(), ::torch::zeros({4})));
      } else {
        opt.zero_grad();
      }
      g.backward();
      opt.step();
      EXPECT_TRUE(::torch::allclose(w.grad(), average)) << "step " << step << ": " << w.grad();
    }
    opt.set_strategy(at::Strategy::synchronous_averaging);
    opt.step();  // a local step with the same gradient, then the models are averaged through the buckets
    EXPECT_TRUE(::torch::allclose(w.grad(), average)) << w.grad();
  });
}

TEST(TorchSynchronousSgd, SecondBackwardBeforeStepIsAClearError) {
  run_cluster(2, base_config(), [&](Peer& peer) {
    nn::Sequential net = make_mlp(1);
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.1));
    at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), at::Strategy::synchronous_sgd);
    const Data data = make_data(16);
    const Tensor index = ::torch::arange(8);
    opt.zero_grad();
    loss_on(net, data, index).backward();
    loss_on(net, data, index).backward();
    try {
      opt.step();
      ADD_FAILURE() << "expected ConfigError";
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("backward() ran twice"), std::string::npos) << e.what();
    }
    // The optimizer is usable again afterwards.
    opt.zero_grad();
    loss_on(net, data, index).backward();
    opt.step();
  });
}

// A bucket's allreduce is posted as soon as its gradients are ready, while backward() still runs: a hook on the first
// layer's weight, whose gradient the backward pass produces last, finds the later layers' buckets posted already.
TEST(TorchSynchronousSgd, BucketAllreducesStartDuringBackward) {
  run_cluster(2, base_config(), [&](Peer& peer) {
    nn::Sequential net = make_mlp(7);  // Linear(8, 16), Tanh, Linear(16, 3)
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.1));
    at::DistributedOptimizerOptions options;
    options.bucket_bytes = 64;  // every parameter in a bucket of its own: four buckets
    options.monitor = false;    // no metrics allreduce in between
    at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), at::Strategy::synchronous_sgd, options);
    const auto posted = [&] {
      const PathCounts paths = peer.path_counts();
      return paths.shared_memory + paths.sockets;
    };
    const Data data = make_data(16);
    Tensor first_weight = net->parameters()[0];
    std::vector<std::uint64_t> in_backward;
    first_weight.register_hook([&](Tensor) { in_backward.push_back(posted()); });
    for (int step = 0; step < 3; ++step) {
      opt.zero_grad();
      const std::uint64_t before = posted();
      loss_on(net, data, ::torch::arange(peer.rank() * 8, peer.rank() * 8 + 8)).backward();
      ASSERT_EQ(in_backward.size(), std::size_t(step + 1));
      // The second layer's weight and bias (two buckets) at least, before the backward pass reached the first layer.
      EXPECT_GE(in_backward.back() - before, 2u) << "step " << step;
      opt.step();
      EXPECT_EQ(posted() - before, 4u) << "step " << step;
    }
  });
}

// After step() every parameter's .grad() is the averaged gradient in the optimizer's bucket, not a copy of it: the
// gradients of a bucket lie back to back in the reverse order of the parameters, at the same addresses every step,
// and hold the same values on every worker.
// Buckets sized for the links (bucket_bytes 0, the default): 1 MiB with every worker on one host; with workers on two
// hosts, what Peer::fusion_bytes says for the model's gradients, at the start (from links installed as 10 Gbit/s
// with 100 us) and again after the link monitor installed the measured ones, the same on both workers.
TEST(TorchSynchronousSgd, BucketsAreSizedForTheLinks) {
  for (const bool across : {false, true}) {
    std::vector<std::size_t> start(2), measured(2), planned(2);
    run_cluster(
        2, base_config(),
        [&](Peer& peer) {
          if (across) {
            LinkMatrix links = LinkMatrix::unmeasured(2);
            for (int i : {1, 2}) {
              links.latency_seconds[std::size_t(i)] = 100e-6;
              links.bandwidth_bytes_per_second[std::size_t(i)] = 1.25e9;
            }
            peer.set_link_matrix(links);
          }
          nn::Sequential net = make_mlp(7, ::torch::kFloat32, 1 << 18);  // 12 MiB of gradients
          ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.01));
          at::DistributedOptimizerOptions options;
          options.link_probe_interval = std::chrono::milliseconds(1);
          options.link_probe_bytes = 64 * 1024;
          at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), at::Strategy::synchronous_sgd, options);
          std::size_t total = 0;
          for (const auto& p : net->parameters()) total += std::size_t(p.numel()) * p.element_size();
          start[peer.rank()] = opt.bucket_bytes();
          EXPECT_EQ(opt.bucket_bytes(), peer.fusion_bytes(total));
          const Data data = make_data(16);
          // metrics() is the same on both workers, so both leave the loop after the same step.
          for (int step = 0; step < 3000 && opt.metrics().link_matrices_installed == 0; ++step) {
            opt.zero_grad();
            loss_on(net, data, ::torch::arange(peer.rank() * 8, peer.rank() * 8 + 8)).backward();
            opt.step(8);
            std::this_thread::sleep_for(std::chrono::milliseconds(2));
          }
          opt.finish_pending();
          EXPECT_GE(opt.metrics().link_matrices_installed, 1);
          measured[peer.rank()] = opt.bucket_bytes();
          planned[peer.rank()] = peer.fusion_bytes(total);
        },
        [&](int rank, PeerConfig& c) { c.host = across ? "host" + std::to_string(rank) : "host"; });
    for (int r = 0; r < 2; ++r) {
      if (!across) {
        EXPECT_EQ(start[r], std::size_t(1) << 20);
        EXPECT_EQ(measured[r], std::size_t(1) << 20);
      }
      EXPECT_EQ(measured[r], planned[r]) << "rank " << r << (across ? ", two hosts" : ", one host");
      EXPECT_EQ(measured[r], measured[0]);
    }
    if (across) {
      // At 10 Gbit/s with 100 us, 1 MiB would spend 19% on latency; a quarter of 12 MiB bounds the size.
      EXPECT_EQ(start[0], std::size_t(2) << 20);
      EXPECT_EQ(start[1], start[0]);
    }
  }
}

// set_bucket_bytes lays the buckets out anew between steps: synchronous SGD's result does not change (two workers:
// every mean is exact whatever the grouping), nor does a DiLoCo round's, whose anchor and outer momentum move into the
// new buckets mid-round.
TEST(TorchSynchronousSgd, SetBucketBytesChangesNothingButTheBuckets) {
  for (const auto strategy : {at::Strategy::synchronous_sgd, at::Strategy::diloco}) {
    std::vector<Tensor> plain(2), resized(2);
    for (const bool resize : {false, true}) {
      run_cluster(2, base_config(), [&](Peer& peer) {
        nn::Sequential net = make_mlp(7);
        ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.1).momentum(0.9));
        at::DistributedOptimizerOptions options;
        options.local_steps = 3;
        at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), strategy, options);
        EXPECT_EQ(opt.bucket_bytes(), std::size_t(1) << 20);
        const Data data = make_data(64);
        for (int step = 0; step < 10; ++step) {
          if (resize && step == 4) {
            opt.set_bucket_bytes(64);  // every parameter in a bucket of its own
            EXPECT_EQ(opt.bucket_bytes(), 64u);
          }
          if (resize && step == 8) {
            opt.set_bucket_bytes(0);
            EXPECT_EQ(opt.bucket_bytes(), std::size_t(1) << 20);
          }
          opt.zero_grad();
          const std::int64_t first = peer.rank() * 32 + step;
          loss_on(net, data, ::torch::arange(first, first + 8)).backward();
          opt.step(8);
        }
        opt.finish_pending();
        (resize ? resized : plain)[peer.rank()] = flat_parameters(net);
      });
    }
    for (int r = 0; r < 2; ++r) {
      EXPECT_TRUE(::torch::equal(resized[r], plain[r]))
          << at::strategy_name(strategy) << ", rank " << r << " differs by "
          << (resized[r] - plain[r]).abs().max().item<double>();
    }
  }
}

TEST(TorchSynchronousSgd, SetBucketBytesBetweenBackwardAndStepIsAClearError) {
  run_cluster(2, base_config(), [&](Peer& peer) {
    nn::Sequential net = make_mlp(7);
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.1));
    at::DistributedOptimizerOptions options;
    options.bucket_bytes = 64;
    at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), at::Strategy::synchronous_sgd, options);
    const Data data = make_data(16);
    opt.zero_grad();
    loss_on(net, data, ::torch::arange(peer.rank() * 8, peer.rank() * 8 + 8)).backward();
    try {
      opt.set_bucket_bytes(1024);
      ADD_FAILURE() << "no error";
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("between backward() and step()"), std::string::npos) << e.what();
    }
    opt.step();
    EXPECT_EQ(opt.bucket_bytes(), 64u);
  });
}

TEST(TorchSynchronousSgd, GradientsShareTheBucketMemoryAfterStep) {
  run_cluster(2, base_config(), [&](Peer& peer) {
    nn::Sequential net = make_mlp(7);
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.1));
    at::DistributedOptimizerOptions options;
    options.bucket_bytes = std::size_t(1) << 20;  // one bucket for the whole model
    at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), at::Strategy::synchronous_sgd, options);
    const Data data = make_data(32);
    const auto params = net->parameters();
    std::vector<const void*> addresses;
    for (int step = 0; step < 3; ++step) {
      opt.zero_grad();
      loss_on(net, data, ::torch::arange(peer.rank() * 16 + step, peer.rank() * 16 + step + 8)).backward();
      opt.step();
      const char* next = static_cast<const char*>(params.back().grad().data_ptr());
      for (std::size_t i = params.size(); i-- > 0;) {
        EXPECT_EQ(params[i].grad().data_ptr(), next) << "parameter " << i << ", step " << step;
        next += params[i].numel() * params[i].element_size();
      }
      std::vector<const void*> now;
      for (const auto& p : params) now.push_back(p.grad().data_ptr());
      if (step > 0) {
        EXPECT_EQ(now, addresses) << "step " << step;
      }
      addresses = now;
      std::vector<Tensor> flat;
      for (const auto& p : params) flat.push_back(p.grad().reshape(-1).to(::torch::kFloat64));
      Tensor mine = ::torch::cat(flat), root = mine.clone();
      peer.broadcast(std::span<double>(root.data_ptr<double>(), std::size_t(root.numel())), 0, "grads");
      EXPECT_TRUE(::torch::equal(mine, root)) << "step " << step;
    }
  });
}

// Least squares with a known solution: SMA and pair averaging must drive the loss down, and switching to synchronous
// SGD leaves all workers with equal parameters.
struct Regression {
  Tensor x, y;
};
Regression make_regression() {
  std::lock_guard<std::mutex> lock(model_mutex());
  ::torch::manual_seed(99);
  Regression r;
  r.x = ::torch::randn({512, 6});
  const Tensor w = ::torch::arange(1, 7, ::torch::kFloat32).unsqueeze(1) * 0.5;
  r.y = r.x.matmul(w) + 0.01 * ::torch::randn({512, 1});
  return r;
}

nn::Linear make_linear(std::uint64_t seed) {
  std::lock_guard<std::mutex> lock(model_mutex());
  ::torch::manual_seed(seed);
  return nn::Linear(6, 1);
}

// `steps` steps of `opt`, each on the 16 samples of `rank`'s own slice of the data.
void train_on_own_slice(at::DistributedOptimizer& opt, nn::Linear& net, const Regression& data, int rank, int steps) {
  const Tensor i = ::torch::arange(rank * 16, rank * 16 + 16);
  for (int step = 0; step < steps; ++step) {
    opt.zero_grad();
    ::torch::mse_loss(net->forward(data.x.index_select(0, i)), data.y.index_select(0, i)).backward();
    opt.step();
  }
}

void expect_converges_then_switch_equalises(at::Strategy strategy, int workers) {
  const Regression data = make_regression();
  std::vector<Tensor> results(workers);
  std::vector<double> losses(workers);
  run_cluster(workers, base_config(), [&](Peer& peer) {
    nn::Linear net = make_linear(11 + peer.rank());  // different starting points: averaging must bring them together
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.05).momentum(0.5));
    at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), strategy);
    at::DistributedSampler sampler(512, peer, 3);
    for (int epoch = 0; epoch < 15; ++epoch) {
      sampler.set_epoch(epoch);
      while (auto batch = sampler.next_batch(16)) {
        opt.zero_grad();
        const Tensor i = index_of(*batch);
        ::torch::mse_loss(net->forward(data.x.index_select(0, i)), data.y.index_select(0, i)).backward();
        opt.step();
      }
    }
    {
      ::torch::NoGradGuard no_grad;
      losses[peer.rank()] = ::torch::mse_loss(net->forward(data.x), data.y).item<double>();
    }
    opt.set_strategy(at::Strategy::synchronous_sgd);
    EXPECT_EQ(opt.strategy(), at::Strategy::synchronous_sgd);
    train_on_own_slice(opt, net, data, peer.rank(), 5);
    std::vector<Tensor> flat;
    for (const auto& p : net->parameters()) flat.push_back(p.detach().reshape(-1));
    results[peer.rank()] = ::torch::cat(flat);
  });
  for (int r = 0; r < workers; ++r) {
    EXPECT_LT(losses[r], 1e-3) << at::strategy_name(strategy) << " did not converge on rank " << r;
    EXPECT_TRUE(::torch::equal(results[r], results[0])) << "after the switch, ranks 0 and " << r << " differ";
  }
}

TEST(TorchModelAveraging, ConvergesAndSwitchesToSynchronousSgd) {
  expect_converges_then_switch_equalises(at::Strategy::synchronous_averaging, 3);
}

TEST(TorchPairAveraging, ConvergesAndSwitchesToSynchronousSgd) {
  expect_converges_then_switch_equalises(at::Strategy::pair_averaging, 3);
}

// Workers of an elastic job build their optimizer without collectives (collective_setup = false), and a worker
// that joins later starts counting steps at 0. on_cluster_change() must bring every member to the same step count,
// or the steps that also sample the gradient (gradient_sample_interval) differ and the collectives never meet.
void expect_a_replacement_follows_the_cluster(at::Strategy strategy) {
  const Regression data = make_regression();
  PeerConfig config = base_config();
  config.timeout = std::chrono::milliseconds(5'000);
  std::vector<std::int64_t> steps(2);
  std::vector<Tensor> results(2);
  run_cluster(2, config, [&](Peer& peer) {
    nn::Linear net = make_linear(11);
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.05));
    at::DistributedOptimizerOptions options;
    options.gradient_sample_interval = 2;
    options.collective_setup = false;
    auto train = [&](at::DistributedOptimizer& opt, int steps) {
      train_on_own_slice(opt, net, data, peer.rank(), steps);
    };
    auto opt = std::make_unique<at::DistributedOptimizer>(peer, sgd, net->named_parameters(), strategy, options);
    train(*opt, 3);
    opt->finish_pending();
    if (peer.rank() == 1) {  // rank 1 is a replacement that has taken no step
      opt = std::make_unique<at::DistributedOptimizer>(peer, sgd, net->named_parameters(), strategy, options);
      EXPECT_EQ(opt->steps(), 0);
    }
    opt->on_cluster_change();
    steps[peer.rank()] = opt->steps();
    train(*opt, 4);
    opt->set_strategy(at::Strategy::synchronous_sgd);
    train(*opt, 1);
    results[peer.rank()] = ::torch::cat({net->weight.detach().reshape(-1), net->bias.detach()});
  });
  EXPECT_EQ(steps[0], 3);
  EXPECT_EQ(steps[1], 3);
  EXPECT_TRUE(::torch::equal(results[0], results[1]));
}

TEST(TorchModelAveraging, AReplacementFollowsTheClusterAfterOnClusterChange) {
  expect_a_replacement_follows_the_cluster(at::Strategy::synchronous_averaging);
}

TEST(TorchPairAveraging, AReplacementFollowsTheClusterAfterOnClusterChange) {
  expect_a_replacement_follows_the_cluster(at::Strategy::pair_averaging);
}

// Without a collective setup, the first pair-averaging step publishes every model before any worker pulls one,
// however late a worker comes to it: the models do not change but by averaging (learning rate 0), so after the
// second step each worker holds the mean of its own first model and a partner's.
TEST(TorchPairAveraging, FirstStepWithoutCollectiveSetupWaitsForEveryModel) {
  constexpr int kWorkers = 3;
  const Regression data = make_regression();
  std::vector<Tensor> first(kWorkers), second(kWorkers);
  run_cluster(kWorkers, base_config(), [&](Peer& peer) {
    nn::Linear net = make_linear(11 + peer.rank());
    first[std::size_t(peer.rank())] = ::torch::cat({net->weight.detach().reshape(-1), net->bias.detach()}).clone();
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.0));
    at::DistributedOptimizerOptions options;
    options.collective_setup = false;
    options.gradient_sample_interval = 0;  // no gradient allreduce in the first step to line the workers up
    at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), at::Strategy::pair_averaging, options);
    // Late workers: a pull of a model not published yet would fail ("no such name") or return nothing.
    if (peer.rank() != 0) std::this_thread::sleep_for(std::chrono::milliseconds(200 * peer.rank()));
    EXPECT_NO_THROW(train_on_own_slice(opt, net, data, peer.rank(), 1));
    EXPECT_NO_THROW(opt.finish_pending());  // the first pull has arrived
    EXPECT_NO_THROW(train_on_own_slice(opt, net, data, peer.rank(), 1));
    EXPECT_NO_THROW(opt.finish_pending());
    second[std::size_t(peer.rank())] = ::torch::cat({net->weight.detach().reshape(-1), net->bias.detach()});
  });
  for (int r = 0; r < kWorkers; ++r) {
    bool averaged = false;
    for (int q = 0; q < kWorkers; ++q) {
      if (q != r && ::torch::allclose(second[std::size_t(r)], (first[std::size_t(r)] + first[std::size_t(q)]) / 2)) {
        averaged = true;
      }
    }
    EXPECT_TRUE(averaged) << "rank " << r << " does not hold the mean of its model and another worker's first model";
  }
}

TEST(TorchModelAveraging, AveragesDifferentModels) {
  std::vector<Tensor> results(2);
  run_cluster(2, base_config(), [&](Peer& peer) {
    nn::Linear net(2, 1);
    {
      ::torch::NoGradGuard no_grad;
      net->weight.fill_(peer.rank() == 0 ? 1.0 : 3.0);
      net->bias.fill_(peer.rank() == 0 ? -1.0 : 1.0);
    }
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.1));
    at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), at::Strategy::synchronous_averaging);
    opt.zero_grad();
    opt.step();  // no gradient: the local step changes nothing, then the models are averaged
    results[peer.rank()] = ::torch::cat({net->weight.detach().reshape(-1), net->bias.detach().reshape(-1)});
  });
  EXPECT_TRUE(::torch::equal(results[0], ::torch::tensor({2.0f, 2.0f, 0.0f})));
  EXPECT_TRUE(::torch::equal(results[1], results[0]));
}

TEST(TorchStrategy, SwitchWithDifferentStrategiesIsAMismatch) {
  std::vector<std::string> errors(2);
  run_cluster(2, base_config(), [&](Peer& peer) {
    nn::Sequential net = make_mlp(1);
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.1));
    at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), at::Strategy::synchronous_sgd);
    try {
      opt.set_strategy(peer.rank() == 0 ? at::Strategy::pair_averaging : at::Strategy::synchronous_averaging);
    } catch (const MismatchError& e) {
      errors[peer.rank()] = e.what();
    }
  });
  for (const auto& e : errors) EXPECT_NE(e.find("set_strategy"), std::string::npos) << e;
}

TEST(TorchStrategy, NamesParse) {
  EXPECT_EQ(at::parse_strategy("ssgd"), at::Strategy::synchronous_sgd);
  EXPECT_EQ(at::parse_strategy("sma"), at::Strategy::synchronous_averaging);
  EXPECT_EQ(at::parse_strategy("pair"), at::Strategy::pair_averaging);
  EXPECT_EQ(at::parse_strategy("pair_averaging"), at::Strategy::pair_averaging);
  EXPECT_THROW(at::parse_strategy("gossip"), ConfigError);
  EXPECT_THROW(at::dtype_of_tensor(::torch::zeros({1}, ::torch::kComplexFloat)), ConfigError);
}

// Mismatched models: every rank gets a MismatchError naming the parameter and the ranks.
void expect_model_mismatch(const std::function<nn::Sequential(int rank)>& make, const std::string& expected) {
  std::vector<std::string> errors(3);
  run_cluster(3, base_config(), [&](Peer& peer) {
    nn::Sequential net = make(peer.rank());
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.1));
    try {
      at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), at::Strategy::synchronous_sgd);
    } catch (const MismatchError& e) {
      errors[peer.rank()] = e.what();
    }
  });
  for (int r = 0; r < 3; ++r)
    EXPECT_NE(errors[r].find(expected), std::string::npos) << "rank " << r << ": " << errors[r];
}

TEST(TorchModelCheck, DifferentShapeNamesParameterAndRanks) {
  expect_model_mismatch([](int rank) { return make_mlp(1, ::torch::kFloat32, rank == 2 ? 12 : 16); },
                        "parameter '0.weight' is float32 [16, 8] on rank 0 but float32 [12, 8] on rank 2");
}

TEST(TorchModelCheck, MissingParameterIsNamed) {
  expect_model_mismatch(
      [](int rank) {
        nn::Sequential net = make_mlp(1);
        if (rank == 1) net->push_back(nn::Linear(3, 3));
        return net;
      },
      "'3.weight' (float32 [3, 3]) exists on rank 1 but not on rank 0");
}

TEST(TorchModelCheck, DifferentDtypeIsNamed) {
  expect_model_mismatch([](int rank) { return make_mlp(1, rank == 1 ? ::torch::kFloat64 : ::torch::kFloat32); },
                        "parameter '0.weight' is float32 [16, 8] on rank 0 but float64 [16, 8] on rank 1");
}

TEST(TorchBroadcast, ParametersAndOptimizerStateFollowTheRoot) {
  std::vector<Tensor> results(3);
  run_cluster(3, base_config(), [&](Peer& peer) {
    nn::Sequential net = make_mlp(100 + peer.rank());  // different models
    ::torch::optim::Adam adam(net->parameters(), ::torch::optim::AdamOptions(0.01));
    const Data data = make_data(32);
    if (peer.rank() == 1) {  // only the root has optimizer state
      adam.zero_grad();
      loss_on(net, data, ::torch::arange(32)).backward();
      adam.step();
    }
    at::broadcast_parameters(peer, net->named_parameters(), /*root=*/1);
    at::broadcast_optimizer_state(peer, adam, /*root=*/1);
    // Equal models and equal Adam state: one more equal step keeps them equal.
    adam.zero_grad();
    loss_on(net, data, ::torch::arange(32)).backward();
    adam.step();
    results[peer.rank()] = flat_parameters(net);
  });
  EXPECT_TRUE(::torch::equal(results[0], results[1]));
  EXPECT_TRUE(::torch::equal(results[2], results[1]));
}

TEST(TorchAverage, AverageParametersMakesThemEqual) {
  std::vector<Tensor> results(4);
  run_cluster(4, base_config(), [&](Peer& peer) {
    nn::Sequential net = make_mlp(200 + peer.rank());
    at::average_parameters(peer, net->named_parameters());
    results[peer.rank()] = flat_parameters(net);
  });
  for (int r = 1; r < 4; ++r) EXPECT_TRUE(::torch::equal(results[r], results[0]));
}

// ---------------------------------------------------------------------------------------------------------------
// DistributedSampler

// Every index exactly once per epoch, the same number of steps on every rank.
void expect_exact_epoch(std::size_t n, int size, std::size_t batch) {
  std::vector<at::DistributedSampler> samplers;
  for (int r = 0; r < size; ++r) samplers.emplace_back(n, r, size, 42);
  for (std::int64_t epoch = 0; epoch < 2; ++epoch) {
    std::multiset<std::size_t> seen;
    std::size_t steps = 0;
    for (auto& s : samplers) s.set_epoch(epoch);
    while (true) {
      std::vector<std::optional<std::vector<std::size_t>>> batches;
      for (auto& s : samplers) batches.push_back(s.next_batch(batch));
      const bool any = std::any_of(batches.begin(), batches.end(), [](const auto& b) { return b.has_value(); });
      const bool all = std::all_of(batches.begin(), batches.end(), [](const auto& b) { return b.has_value(); });
      ASSERT_EQ(any, all) << "ranks disagree on the end of the epoch";
      if (!any) break;
      ++steps;
      for (const auto& b : batches) {
        EXPECT_LE(b->size(), batch);
        seen.insert(b->begin(), b->end());
      }
    }
    EXPECT_EQ(steps, samplers[0].steps_per_epoch(batch));
    ASSERT_EQ(seen.size(), n) << "n=" << n << " size=" << size << " batch=" << batch;
    std::size_t expect = 0;
    for (std::size_t i : seen) ASSERT_EQ(i, expect++) << "an index was repeated or skipped";
  }
}

TEST(TorchSampler, EveryIndexExactlyOncePerEpoch) {
  for (std::size_t n : {0, 1, 7, 100, 1001}) {
    for (int size : {1, 2, 3, 4}) {
      for (std::size_t batch : {1, 5, 64}) expect_exact_epoch(n, size, batch);
    }
  }
}

TEST(TorchSampler, ReshufflesEveryEpochTheSameOnAllRanks) {
  at::DistributedSampler a(1000, 0, 2, 7), b(1000, 0, 2, 7), c(1000, 0, 2, 8);
  const auto e0 = *a.next_batch(10);
  a.set_epoch(1);
  const auto e1 = *a.next_batch(10);
  EXPECT_NE(e0, e1);
  EXPECT_EQ(*b.next_batch(10), e0);
  EXPECT_NE(*c.next_batch(10), e0);
  at::DistributedSampler plain(10, 1, 2, 7, /*shuffle=*/false);
  EXPECT_EQ(*plain.next_batch(2), (std::vector<std::size_t>{2, 3}));
}

TEST(TorchSampler, WorldSizeChangeMidEpochStaysExact) {
  // Two workers for a while, then three: the shared position keeps the epoch exact.
  const std::size_t n = 500, batch = 16;
  std::multiset<std::size_t> seen;
  std::vector<at::DistributedSampler> two, three;
  for (int r = 0; r < 2; ++r) two.emplace_back(n, r, 2, 9);
  for (int r = 0; r < 3; ++r) three.emplace_back(n, r, 3, 9);
  for (int step = 0; step < 5; ++step) {
    for (auto& s : two) {
      const auto b = s.next_batch(batch);
      seen.insert(b->begin(), b->end());
    }
  }
  for (auto& s : three) s.set_position(two[0].position());
  while (true) {
    bool any = false;
    for (auto& s : three) {
      if (auto b = s.next_batch(batch)) {
        any = true;
        seen.insert(b->begin(), b->end());
      }
    }
    if (!any) break;
  }
  ASSERT_EQ(seen.size(), n);
  EXPECT_EQ(std::set<std::size_t>(seen.begin(), seen.end()).size(), n);
  EXPECT_THROW(three[0].set_position(n + 1), ConfigError);
  EXPECT_THROW(at::DistributedSampler(10, 2, 2), ConfigError);
}

TEST(TorchSampler, WorksWithTheLibTorchDataLoader) {
  auto dataset = ::torch::data::datasets::TensorDataset(::torch::arange(100).unsqueeze(1));
  std::vector<int> seen(100, 0);
  for (int rank = 0; rank < 3; ++rank) {
    auto loader = ::torch::data::make_data_loader(dataset, at::DistributedSampler(100, rank, 3, 1),
                                                  ::torch::data::DataLoaderOptions().batch_size(8));
    for (auto& batch : *loader) {
      for (const auto& example : batch) ++seen[std::size_t(example.data.item<std::int64_t>())];
    }
  }
  for (std::size_t i = 0; i < seen.size(); ++i) EXPECT_EQ(seen[i], 1) << "sample " << i;
}

}  // namespace
}  // namespace aikido::test

// ---------------------------------------------------------------------------------------------------------------
// Monitoring and policies

namespace aikido::test {
namespace {

TEST(TorchMonitor, GradientStatisticsAcrossWorkersAreExactAndEqual) {
  // Rank r's gradient is the unit vector e_r: the mean is (1/2, 1/2, 0, 0), its squared norm 1/2, each worker's
  // squared distance to it 1/2: variance 1/2, SNR 1.
  std::vector<TrainingMetrics> seen(2);
  run_cluster(2, base_config(), [&](Peer& peer) {
    UnitGradient g(peer.rank());
    auto& named = g.named;
    auto& sgd = g.sgd;
    at::DistributedOptimizer opt(peer, sgd, named, at::Strategy::synchronous_sgd);
    for (int step = 0; step < 3; ++step) {
      opt.zero_grad();
      g.backward();
      opt.step(4);
    }
    seen[peer.rank()] = opt.metrics();
  });
  for (const auto& m : seen) {
    EXPECT_EQ(m.step, 3);
    EXPECT_EQ(m.workers, 2);
    EXPECT_EQ(m.global_batch_size, 8);
    EXPECT_DOUBLE_EQ(m.gradient_variance, 0.5);
    EXPECT_DOUBLE_EQ(m.snr, 1.0);
    EXPECT_GT(m.samples_per_second, 0);
    EXPECT_GE(m.step_seconds, m.compute_seconds);
    EXPECT_GT(m.allreduce_bytes_per_second, 0);
    EXPECT_EQ(m.strategy, "synchronous_sgd");
  }
  EXPECT_EQ(seen[0].samples_per_second, seen[1].samples_per_second) << "reduced values are equal on all workers";
}

TEST(TorchMonitor, ModelAveragingSamplesTheGradient) {
  std::vector<TrainingMetrics> seen(2);
  run_cluster(2, base_config(), [&](Peer& peer) {
    UnitGradient g(peer.rank());
    auto& named = g.named;
    auto& sgd = g.sgd;
    at::DistributedOptimizerOptions options;
    options.gradient_sample_interval = 2;
    at::DistributedOptimizer opt(peer, sgd, named, at::Strategy::synchronous_averaging, options);
    for (int step = 0; step < 4; ++step) {
      opt.zero_grad();
      g.backward();
      opt.step(4);
    }
    seen[peer.rank()] = opt.metrics();
  });
  for (const auto& m : seen) EXPECT_DOUBLE_EQ(m.gradient_variance, 0.5);
}

TEST(TorchMonitor, LinksAreProbedDuringTraining) {
  std::vector<TrainingMetrics> seen(2), off(2);
  std::vector<LinkMatrix> installed(2);
  run_cluster(2, base_config(), [&](Peer& peer) {
    for (const bool probe : {true, false}) {
      UnitGradient g(peer.rank());
      Tensor& w = g.w;
      auto& named = g.named;
      auto& sgd = g.sgd;
      at::DistributedOptimizerOptions options;
      options.link_probe_interval = std::chrono::milliseconds(probe ? 1 : 0);
      options.link_probe_bytes = 64 * 1024;
      at::DistributedOptimizer opt(peer, sgd, named, at::Strategy::synchronous_sgd, options);
      for (int step = 0; step < 300; ++step) {
        opt.zero_grad();
        (w * w).sum().backward();
        opt.step(4);
        std::this_thread::sleep_for(std::chrono::microseconds(500));
      }
      opt.finish_pending();
      (probe ? seen : off)[peer.rank()] = opt.metrics();
      if (probe) installed[peer.rank()] = peer.link_matrix();
      peer.barrier("links measured");
    }
  });
  for (int rank = 0; rank < 2; ++rank) {
    ASSERT_EQ(seen[rank].links.size(), 1u);
    const LinkStats& link = seen[rank].links[0];
    EXPECT_EQ(link.peer, 1 - rank);
    EXPECT_GT(link.latency_seconds, 0);
    EXPECT_GT(link.bandwidth_bytes_per_second, 0);
    EXPECT_GE(link.probes, 1);
    EXPECT_TRUE(off[rank].links.empty()) << "link_probe_interval 0 turns probing off";
    // The measured links were installed in the Peer, alike on both workers, at the same steps.
    EXPECT_GE(seen[rank].link_matrices_installed, 1);
    EXPECT_EQ(seen[rank].link_matrices_installed, seen[0].link_matrices_installed);
    EXPECT_EQ(off[rank].link_matrices_installed, 0);
    ASSERT_EQ(installed[rank].size, 2);
    EXPECT_GT(installed[rank].bandwidth(rank, 1 - rank), 0);
    EXPECT_GT(installed[rank].latency(1 - rank, rank), 0);
    for (int from = 0; from < 2; ++from) {  // the diagonal is NaN (not measured)
      EXPECT_EQ(installed[rank].bandwidth(from, 1 - from), installed[0].bandwidth(from, 1 - from));
    }
  }
}

// Records what every worker saw after each step.
struct Trace {
  std::vector<std::string> rows;
};

class ThrowingPolicy : public Policy {
 public:
  std::string name() const override { return "thrower"; }
  void after_step(PolicyContext& c) override {
    if (c.metrics().step == 3) throw std::runtime_error("boom");
  }
};

class RankDependentPolicy : public Policy {
 public:
  explicit RankDependentPolicy(int rank) : rank_(rank) {}
  void after_step(PolicyContext& c) override {
    if (c.metrics().step == 2) c.set_lr(0.01 * (rank_ + 1));
  }

 private:
  int rank_;
};

class ResizePolicy : public Policy {
 public:
  std::string name() const override { return "resizer"; }
  void after_epoch(PolicyContext& c) override { c.request_resize(4); }
};

// One worker of train_with_policies.
void train_under_policies(Peer& peer, const Data& data, int epochs,
                          const std::function<std::vector<std::unique_ptr<Policy>>(int)>& policies, Trace& trace) {
  nn::Sequential net = make_mlp(5);
  ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.05).momentum(0.9));
  at::DistributedOptimizer opt(peer, sgd, net->named_parameters(), at::Strategy::synchronous_sgd);
  at::PolicyRunner runner(opt, 8, policies(peer.rank()));
  at::DistributedSampler sampler(512, peer, 1);
  runner.before_train();
  for (int epoch = 0; epoch < epochs && !runner.stopped(); ++epoch) {
    sampler.set_epoch(epoch);
    runner.before_epoch(epoch);
    while (auto batch = sampler.next_batch(runner.batch_size())) {
      opt.zero_grad();
      if (!batch->empty()) loss_on(net, data, index_of(*batch)).backward();
      opt.step(static_cast<std::int64_t>(batch->size()));
      runner.after_step();
      const auto& m = runner.metrics();
      trace.rows.push_back(std::to_string(m.step) + " batch=" + std::to_string(runner.batch_size()) +
                           " lr=" + std::to_string(opt.lr()) + " " + at::strategy_name(opt.strategy()) + " " +
                           topology_name(peer.topology()));
      if (runner.stopped()) break;
    }
    runner.after_epoch();
  }
  runner.after_train();
}

// Trains the small MLP for `epochs` under `policies(rank)`; returns each rank's trace. With `errors`, each rank's
// aikido::Error is stored there (by rank) instead of ending the run.
std::vector<Trace> train_with_policies(int workers, int epochs,
                                       const std::function<std::vector<std::unique_ptr<Policy>>(int)>& policies,
                                       std::vector<std::string>* errors = nullptr) {
  const Data data = make_data(512);
  std::vector<Trace> traces(workers);
  if (errors) errors->assign(std::size_t(workers), "");
  run_cluster(workers, base_config(), [&](Peer& peer) {
    try {
      train_under_policies(peer, data, epochs, policies, traces[std::size_t(peer.rank())]);
    } catch (const Error& e) {
      if (!errors) throw;
      (*errors)[std::size_t(peer.rank())] = e.what();
    }
  });
  return traces;
}

// One step of the elastic loops below at the runner's batch size; false when the epoch ended (the sampler moved on).
bool policy_step(nn::Sequential& net, const Data& data, at::DistributedOptimizer& opt, at::PolicyRunner& runner,
                 at::DistributedSampler& sampler) {
  auto batch = sampler.next_batch(static_cast<std::size_t>(runner.batch_size()));
  if (!batch) {
    sampler.set_epoch(sampler.epoch() + 1);
    return false;
  }
  opt.zero_grad();
  if (!batch->empty()) loss_on(net, data, index_of(*batch)).backward();
  opt.step(static_cast<std::int64_t>(batch->size()));
  runner.after_step();
  return true;
}

// An elastic job with a policy runner grows from 2 to 3 workers after policies changed the batch size, the learning
// rate and the strategy. The worker that joins receives the runner's, the policies' and the optimizer's state and the
// step count, skips before_train, and from then on every worker steps alike (otherwise its collectives would not
// meet the others': it would still run synchronous SGD at the first batch size).
TEST(TorchElastic, AJoiningWorkerTakesOverTheRunnersAndTheOptimizersState) {
  const Data data = make_data(512);
  std::mutex mutex;
  std::map<std::uint64_t, std::vector<std::string>> rows;  // per worker, one per step at 3 workers
  test::ThreadJob job(2, 3, [&](ElasticSession& s) {
    nn::Sequential net = make_mlp(5);
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.05).momentum(0.9));
    at::DistributedOptimizerOptions options;
    options.collective_setup = false;
    options.gradient_sample_interval = 2;
    at::DistributedOptimizer opt(s.peer(), sgd, net->named_parameters(), at::Strategy::synchronous_sgd, options);
    at::PolicyRunner runner(opt, 8,
                            at::PolicyRunner::make({"adaptive-batch:interval=2,warmup=2,min=16,max=32,rule=linear",
                                                    "schedule:lr@step5=0.02,strategy@step6=sma"}));
    at::DistributedSampler sampler(512, s.peer(), 1);
    std::int64_t step = 0;
    runner.set_elastic_session(&s);
    at::register_state(s, net->named_parameters(), sgd, sampler);
    s.register_value("step", step);
    EXPECT_EQ(s.joining(), s.worker_id() == 2) << "worker " << s.worker_id();
    runner.before_train();
    while (step < 16) {
      opt.finish_pending();
      SyncResult r = s.sync(step);
      EXPECT_FALSE(s.joining()) << "the state has arrived";
      if (step == 8 && s.size() == 2) r = s.resize(3);
      if (r == SyncResult::removed) return;
      if (r == SyncResult::changed) opt.on_cluster_change();
      if (!policy_step(net, data, opt, runner, sampler)) continue;
      ++step;
      if (step % 2 == 0) s.commit();
      if (s.size() == 3) {
        std::lock_guard<std::mutex> lock(mutex);
        std::ostringstream row;
        row << "step " << step << " optimizer steps " << opt.steps() << " batch " << runner.batch_size() << " lr "
            << opt.lr() << " " << at::strategy_name(opt.strategy());
        rows[s.worker_id()].push_back(row.str());
      }
    }
    opt.finish_pending();
  });
  job.run();
  ASSERT_EQ(rows.size(), 3u);
  ASSERT_FALSE(rows[0].empty());
  EXPECT_EQ(rows[1], rows[0]);
  EXPECT_EQ(rows[2], rows[0]) << "the worker that joined";
  EXPECT_NE(rows[0].front().find("synchronous_averaging"), std::string::npos) << rows[0].front();
  EXPECT_EQ(rows[0].front().find("batch 8 "), std::string::npos) << "the batch never grew: " << rows[0].front();
}

// A policy switched the topology and the strategy; then a worker is lost and the launcher replaces it at once, so
// one change both rolls the survivors back and brings the state to a new worker. The topology comes from the
// session, not from the runner's rolled-back state: restoring it there ran a collective on the survivors only,
// while the new worker waited for the state (a hang until the timeout).
TEST(TorchElastic, AReplacementJoinsARollbackAfterAPolicySwitchedTheTopology) {
  const Data data = make_data(512);
  std::mutex mutex;
  std::map<std::uint64_t, std::vector<std::string>> rows;  // per worker, one per step after the replacement
  std::atomic<test::ThreadJob*> self{nullptr};
  test::ThreadJob job(3, 3, [&](ElasticSession& s) {
    nn::Sequential net = make_mlp(5);
    ::torch::optim::SGD sgd(net->parameters(), ::torch::optim::SGDOptions(0.05).momentum(0.9));
    at::DistributedOptimizerOptions options;
    options.collective_setup = false;
    at::DistributedOptimizer opt(s.peer(), sgd, net->named_parameters(), at::Strategy::synchronous_sgd, options);
    at::PolicyRunner runner(opt, 8, at::PolicyRunner::make({"schedule:topology@step3=tree,strategy@step5=sma"}));
    at::DistributedSampler sampler(512, s.peer(), 1);
    std::int64_t step = 0;
    runner.set_elastic_session(&s);
    at::register_state(s, net->named_parameters(), sgd, sampler);
    s.register_value("step", step);
    runner.before_train();
    while (step < 14) {
      try {
        opt.finish_pending();
        const SyncResult r = s.sync(step);
        if (r == SyncResult::removed) return;
        if (r == SyncResult::changed) opt.on_cluster_change();
        if (s.worker_id() == 1 && step == 7) {
          // Lost after the commit of step 6; the launcher proposes its replacement before anyone notices.
          ClusterSpec next = s.spec().without({1}, "restart").resized(3, "h", "restart");
          next.version = s.spec().version + 1;
          EXPECT_TRUE(self.load()->membership()->propose(next));
          return;
        }
        if (!policy_step(net, data, opt, runner, sampler)) continue;
        ++step;
        if (step % 2 == 0) s.commit();
      } catch (const PeerLostError&) {
        opt.finish_pending(/*after_failure=*/true);
        ASSERT_EQ(s.recover(), SyncResult::changed);
        opt.on_cluster_change();
        continue;
      }
      if (s.cluster_version() >= 1) {
        std::lock_guard<std::mutex> lock(mutex);
        std::ostringstream row;
        row << "step " << step << " optimizer steps " << opt.steps() << " " << at::strategy_name(opt.strategy()) << " "
            << topology_name(s.peer().topology()) << " version " << s.cluster_version();
        rows[s.worker_id()].push_back(row.str());
      }
    }
    opt.finish_pending();
  });
  self = &job;
  job.run();
  ASSERT_EQ(rows.size(), 3u);
  ASSERT_EQ(rows.count(3), 1u) << "the replacement trained";
  ASSERT_FALSE(rows[0].empty());
  EXPECT_EQ(rows[0].front(), "step 7 optimizer steps 7 synchronous_averaging tree version 1")
      << "rolled back to the commit of step 6";
  EXPECT_EQ(rows[2], rows[0]);
  EXPECT_EQ(rows[3], rows[0]) << "the replacement";
}

TEST(TorchPolicies, EveryWorkerTakesTheSameDecisionsAtTheSameStep) {
  const auto traces = train_with_policies(3, 3, [](int) {
    return at::PolicyRunner::make({"adaptive-batch:interval=5,warmup=5,max=32",
                                   "schedule:strategy@step12=sma,topology@step15=tree,lr@step20=0.01,"
                                   "strategy@epoch2=ssgd"});
  });
  ASSERT_FALSE(traces[0].rows.empty());
  EXPECT_EQ(traces[1].rows, traces[0].rows);
  EXPECT_EQ(traces[2].rows, traces[0].rows);
  const auto has = [&](const std::string& text) {
    return std::any_of(traces[0].rows.begin(), traces[0].rows.end(),
                       [&](const std::string& r) { return r.find(text) != std::string::npos; });
  };
  EXPECT_TRUE(has("12 batch=") && has("synchronous_averaging tree")) << traces[0].rows[12];
  EXPECT_TRUE(has("lr=0.010000"));
  EXPECT_TRUE(has("synchronous_sgd tree"));
}

TEST(TorchPolicies, StopEndsTrainingOnAllWorkers) {
  const auto traces = train_with_policies(2, 5, [](int) { return at::PolicyRunner::make({"schedule:stop@step7=1"}); });
  for (const auto& t : traces) {
    ASSERT_EQ(t.rows.size(), 7u);
    EXPECT_EQ(t.rows.back().rfind("7 ", 0), 0u);
  }
}

TEST(TorchPolicies, AThrowingPolicyStopsEveryWorkerWithAClearError) {
  std::vector<std::string> errors;
  const auto traces = train_with_policies(
      2, 1,
      [](int) {
        std::vector<std::unique_ptr<Policy>> p;
        p.push_back(std::make_unique<ThrowingPolicy>());
        return p;
      },
      &errors);
  for (std::size_t rank = 0; rank < errors.size(); ++rank) {
    EXPECT_NE(errors[rank].find("policy 'thrower' failed in after_step at step 3: boom"), std::string::npos)
        << "rank " << rank << ": '" << errors[rank] << "'";
    EXPECT_EQ(traces[rank].rows.size(), 2u) << "rank " << rank << " went on past the failing step";
  }
}

TEST(TorchPolicies, DivergingDecisionsAreAMismatch) {
  EXPECT_THROW(train_with_policies(2, 1,
                                   [](int rank) {
                                     std::vector<std::unique_ptr<Policy>> p;
                                     p.push_back(std::make_unique<RankDependentPolicy>(rank));
                                     return p;
                                   }),
               MismatchError);
}

TEST(TorchPolicies, ResizeIsRefusedClearly) {
  try {
    train_with_policies(2, 1, [](int) {
      std::vector<std::unique_ptr<Policy>> p;
      p.push_back(std::make_unique<ResizePolicy>());
      return p;
    });
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("policy 'resizer' failed in after_epoch"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("resizing needs an elastic job"), std::string::npos);
  }
}

}  // namespace
}  // namespace aikido::test

// The user-written policy of the README, verbatim.
namespace readme {
class SnrDecay : public aikido::Policy {
 public:
  explicit SnrDecay(const aikido::PolicyOptions& o) : threshold_(aikido::option_double(o, "below", 0.5)) {}
  std::string name() const override { return "snr-decay"; }
  void after_epoch(aikido::PolicyContext& c) override {
    const aikido::TrainingMetrics& m = c.metrics();
    if (aikido::TrainingMetrics::known(m.snr) && m.snr < threshold_) c.set_lr(m.lr / 2);
  }

 private:
  double threshold_;
};
static aikido::PolicyRegistration snr_decay("snr-decay", [](const aikido::PolicyOptions& o) {
  return std::make_unique<SnrDecay>(o);
});
}  // namespace readme

namespace aikido::test {
namespace {

TEST(TorchPolicies, TheReadmePolicyRuns) {
  const auto traces = train_with_policies(2, 3, [](int) { return at::PolicyRunner::make({"snr-decay:below=1e9"}); });
  EXPECT_EQ(traces[0].rows, traces[1].rows);
  EXPECT_NE(traces[0].rows.back().find("lr=0.012500"), std::string::npos) << traces[0].rows.back();
}

}  // namespace
}  // namespace aikido::test
