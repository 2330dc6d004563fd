// Monitoring and policies without LibTorch: the noise-scale estimator, export formats, policy specs and built-ins.
#include <gtest/gtest.h>

#include <aikido/errors.hpp>
#include <aikido/metrics.hpp>
#include <aikido/policy.hpp>
#include <cmath>
#include <random>

#include "cluster.hpp"

namespace aikido::test {
namespace {

// Gradients with a known mean G and per-sample covariance Sigma = diag(sigma^2): a worker's batch-B gradient is
// G + N(0, Sigma / B). The true noise scale is tr(Sigma) / |G|^2.
TEST(NoiseScaleEstimator, RecoversTheTrueNoiseScaleOfGaussianGradients) {
  std::mt19937_64 rng(7);
  constexpr int kDim = 200, kWorkers = 4, kBatch = 32;
  std::vector<double> mean(kDim), sigma(kDim);
  std::uniform_real_distribution<double> u(-1, 1), s(0.5, 3);
  double g2 = 0, trace = 0;
  for (int i = 0; i < kDim; ++i) {
    mean[i] = u(rng) * 0.2;
    sigma[i] = s(rng);
    g2 += mean[i] * mean[i];
    trace += sigma[i] * sigma[i];
  }
  const double truth = trace / g2;
  NoiseScaleEstimator estimator(0.002);
  std::normal_distribution<double> normal;
  for (int step = 0; step < 3000; ++step) {
    std::vector<double> big(kDim, 0.0);
    double small_sq = 0;
    for (int w = 0; w < kWorkers; ++w) {
      double sq = 0;
      for (int i = 0; i < kDim; ++i) {
        const double g = mean[i] + sigma[i] / std::sqrt(double(kBatch)) * normal(rng);
        sq += g * g;
        big[i] += g / kWorkers;
      }
      small_sq += sq / kWorkers;
    }
    double big_sq = 0;
    for (double b : big) big_sq += b * b;
    estimator.update(kBatch, kBatch * kWorkers, small_sq, big_sq);
  }
  EXPECT_NEAR(estimator.noise_scale(), truth, 0.1 * truth) << "truth " << truth;
  EXPECT_NEAR(estimator.gradient_sq_norm(), g2, 0.1 * g2);
  EXPECT_NEAR(estimator.noise_trace(), trace, 0.1 * trace);
}

TEST(NoiseScaleEstimator, UnknownUntilMeasuredAndIgnoresOneWorker) {
  NoiseScaleEstimator e;
  EXPECT_TRUE(std::isnan(e.noise_scale()));
  e.update(32, 32, 1.0, 1.0);  // one worker: B_big == B_small, no information
  EXPECT_EQ(e.updates(), 0);
  e.update(32, 64, NAN, 1.0);
  EXPECT_EQ(e.updates(), 0);
  EXPECT_THROW(NoiseScaleEstimator(0.0), ConfigError);
}

TEST(MetricsExport, PrometheusAndJson) {
  TrainingMetrics m;
  m.step = 12;
  m.noise_scale = 345.5;
  m.strategy = "synchronous_sgd";
  m.topology = "ring";
  const std::string text = to_prometheus(m, 3);
  EXPECT_NE(text.find("# TYPE aikido_noise_scale gauge\naikido_noise_scale{rank=\"3\"} 345.5\n"), std::string::npos)
      << text;
  EXPECT_NE(text.find("aikido_step{rank=\"3\"} 12\n"), std::string::npos) << text;
  EXPECT_EQ(text.find("aikido_snr"), std::string::npos) << "unknown values are omitted";
  EXPECT_NE(text.find("aikido_info{rank=\"3\",strategy=\"synchronous_sgd\",topology=\"ring\"} 1"), std::string::npos);
  const std::string json = to_json(m, 3);
  EXPECT_NE(json.find("\"noise_scale\":345.5"), std::string::npos) << json;
  EXPECT_NE(json.find("\"snr\":null"), std::string::npos) << json;
  EXPECT_EQ(json.front(), '{');
  EXPECT_EQ(json.back(), '}');
  EXPECT_NE(json.find("\"links\":[]"), std::string::npos) << json;
}

TEST(MetricsExport, PolicyDecisionsAndLocalTimesInJson) {
  TrainingMetrics m;
  m.local_compute_seconds = 0.25;
  m.train_loss = 0.5;
  PolicyDecision d;
  d.step = 7;
  d.policy = "adaptive-batch";
  d.hook = "after_step";
  d.setting = "batch_size";
  d.from = "64";
  d.to = "128";
  d.metrics = {{"noise_scale", 300.0}, {"snr", TrainingMetrics::kUnknown}};
  m.decisions.push_back(d);
  const std::string json = to_json(m, 0);
  EXPECT_NE(json.find("\"local_compute_seconds\":0.25,"), std::string::npos) << json;
  EXPECT_NE(json.find("\"train_loss\":0.5,"), std::string::npos) << json;
  EXPECT_NE(json.find("\"decisions\":[{\"step\":7,\"policy\":\"adaptive-batch\",\"hook\":\"after_step\","
                      "\"setting\":\"batch_size\",\"from\":\"64\",\"to\":\"128\",\"metrics\":{\"noise_scale\":300,"
                      "\"snr\":null}}]}"),
            std::string::npos)
      << json;
  EXPECT_NE(to_prometheus(m, 3).find("aikido_local_compute_seconds{rank=\"3\"} 0.25\n"), std::string::npos);
}

TEST(MetricsExport, LinksPerPeer) {
  TrainingMetrics m;
  LinkStats a;
  a.peer = 0;
  a.latency_seconds = 2.5e-05;
  a.bandwidth_bytes_per_second = 3e9;
  a.probes = 4;
  LinkStats b;  // not measured yet
  b.peer = 2;
  m.links = {a, b};
  const std::string text = to_prometheus(m, 1);
  EXPECT_NE(text.find("# TYPE aikido_link_latency_seconds gauge\naikido_link_latency_seconds{rank=\"1\",peer=\"0\"} "
                      "2.5e-05\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("aikido_link_bandwidth_bytes_per_second{rank=\"1\",peer=\"0\"} 3e+09\n"), std::string::npos)
      << text;
  EXPECT_EQ(text.find("peer=\"2\""), std::string::npos) << "unmeasured links are omitted";
  const std::string json = to_json(m, 1);
  EXPECT_NE(json.find("\"links\":[{\"peer\":0,\"latency_seconds\":2.5e-05,\"bandwidth_bytes_per_second\":3e+09,"
                      "\"probes\":4},{\"peer\":2,\"latency_seconds\":null,\"bandwidth_bytes_per_second\":null,"
                      "\"probes\":0}],\"decisions\":[]}"),
            std::string::npos)
      << json;
}

void expect_measured(const std::vector<LinkStats>& links, int self, int size) {
  ASSERT_EQ(links.size(), std::size_t(size - 1));
  int expected_peer = 0;
  for (const LinkStats& link : links) {
    if (expected_peer == self) ++expected_peer;
    EXPECT_EQ(link.peer, expected_peer++);
    EXPECT_GT(link.latency_seconds, 0) << "rank " << self << " to " << link.peer;
    EXPECT_LT(link.latency_seconds, 10) << "rank " << self << " to " << link.peer;
    EXPECT_GT(link.bandwidth_bytes_per_second, 0) << "rank " << self << " to " << link.peer;
    EXPECT_TRUE(std::isfinite(link.bandwidth_bytes_per_second));
    EXPECT_GE(link.probes, 1);
  }
}

TEST(LinkMonitor, MeasuresEveryLink) {
  run_cluster(3, base_config(), [](Peer& peer) {
    LinkMonitor::Options options;
    options.probe_bytes = 256 * 1024;
    options.round_trips = 3;
    LinkMonitor monitor(peer, options);
    peer.barrier("probes saved");
    expect_measured(monitor.measure(), peer.rank(), peer.size());
    peer.barrier("measured");
  });
}

TEST(LinkMonitor, PollMeasuresWithoutBlockingAndRepeatsEveryInterval) {
  run_cluster(2, base_config(), [](Peer& peer) {
    LinkMonitor::Options options;
    options.probe_bytes = 64 * 1024;
    options.round_trips = 2;
    options.interval = std::chrono::milliseconds(0);
    LinkMonitor monitor(peer, options);
    peer.barrier("probes saved");
    EXPECT_TRUE(std::isnan(monitor.links().at(0).latency_seconds));
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (monitor.links().at(0).probes < 3 && std::chrono::steady_clock::now() < deadline) {
      monitor.poll();
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    monitor.finish();
    expect_measured(monitor.links(), peer.rank(), peer.size());
    EXPECT_GE(monitor.links().at(0).probes, 3) << "rounds repeat with interval 0";
    peer.barrier("measured");
  });
}

TEST(LinkMonitor, SkipsPeersWithoutAMonitorAndRejectsBadOptions) {
  run_cluster(3, base_config(), [](Peer& peer) {
    std::unique_ptr<LinkMonitor> monitor;
    if (peer.rank() != 2) monitor = std::make_unique<LinkMonitor>(peer);
    peer.barrier("probes saved");
    if (monitor) {
      const auto links = monitor->measure();  // rank 2 saved no probe: skipped, nothing thrown
      ASSERT_EQ(links.size(), 2u);
      const LinkStats& other = links[0].peer == 2 ? links[1] : links[0];
      const LinkStats& silent = links[0].peer == 2 ? links[0] : links[1];
      EXPECT_GT(other.bandwidth_bytes_per_second, 0);
      EXPECT_TRUE(std::isnan(silent.latency_seconds));
      EXPECT_EQ(silent.probes, 0);
    }
    peer.barrier("measured");
    LinkMonitor::Options bad;
    bad.probe_bytes = 0;
    EXPECT_THROW(LinkMonitor(peer, bad), ConfigError);
    bad = {};
    bad.round_trips = 0;
    EXPECT_THROW(LinkMonitor(peer, bad), ConfigError);
  });
}

TEST(LinkMonitor, OneWorkerHasNoLinks) {
  run_cluster(1, base_config(), [](Peer& peer) {
    LinkMonitor monitor(peer);
    monitor.poll();
    EXPECT_TRUE(monitor.measure().empty());
  });
}

// A context that records what policies ask for.
class RecordingContext : public PolicyContext {
 public:
  TrainingMetrics m;
  std::vector<std::string> actions;
  const TrainingMetrics& metrics() const override { return m; }
  void set_batch_size(std::int64_t b) override { actions.push_back("batch=" + std::to_string(b)); }
  void set_lr(double lr) override { actions.push_back("lr=" + std::to_string(lr)); }
  void set_strategy(Strategy s) override { actions.push_back(std::string("strategy=") + strategy_name(s)); }
  void set_topology(Topology t) override { actions.push_back(std::string("topology=") + topology_name(t)); }
  void request_resize(int n) override { actions.push_back("resize=" + std::to_string(n)); }
  void stop(std::string reason) override { actions.push_back("stop:" + reason); }
};

// Training starts at per-worker batch `batch`, learning rate `lr` and `workers` workers: `p` sees before_train.
void start_training(Policy& p, RecordingContext& c, std::int64_t batch, double lr, int workers) {
  c.m.batch_size = batch;
  c.m.lr = lr;
  c.m.workers = workers;
  p.before_train(c);
}

TEST(PolicySpec, ParsesNamesAndOptions) {
  const auto spec = PolicySpec::parse("adaptive-batch:max=512,rule=linear");
  EXPECT_EQ(spec.name, "adaptive-batch");
  EXPECT_EQ(spec.options.at("max"), "512");
  EXPECT_EQ(spec.options.at("rule"), "linear");
  EXPECT_TRUE(PolicySpec::parse("schedule").options.empty());
  EXPECT_THROW(PolicySpec::parse(":a=1"), ConfigError);
  EXPECT_THROW(PolicySpec::parse("x:novalue"), ConfigError);
  try {
    make_policy("gossip");
    ADD_FAILURE();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("known: adaptive-batch"), std::string::npos) << e.what();
  }
  EXPECT_THROW(make_policy("adaptive-batch:rule=cubic"), ConfigError);
  EXPECT_THROW(make_policy("adaptive-batch:maxx=3"), ConfigError);
  EXPECT_THROW(make_policy("adaptive-batch:max=lots"), ConfigError);
  EXPECT_THROW(make_policy("strategy-switch"), ConfigError);  // no trigger
  EXPECT_THROW(make_policy("strategy-switch:to=gossip,step=3"), ConfigError);
  EXPECT_THROW(make_policy("schedule:lr@week2=0.1"), ConfigError);
  EXPECT_THROW(make_policy("schedule:dance@step2=1"), ConfigError);
  EXPECT_THROW(make_policy("schedule:topology@step2=mesh"), ConfigError);
}

TEST(BuiltinPolicies, AdaptiveBatchGrowsTowardTheNoiseScale) {
  auto p = make_policy("adaptive-batch:max=256,interval=10,warmup=0,rule=linear");
  RecordingContext c;
  start_training(*p, c, 32, 0.1, 2);
  c.m.step = 10;
  c.m.noise_scale = 1000;  // wants 500 per worker: doubles, at most
  p->after_step(c);
  EXPECT_EQ(c.actions, (std::vector<std::string>{"batch=64", "lr=0.200000"}));
  c.actions.clear();
  c.m.step = 15;  // not a decision step
  p->after_step(c);
  EXPECT_TRUE(c.actions.empty());
  c.m.step = 20;
  c.m.batch_size = 256;  // at max already
  p->after_step(c);
  EXPECT_TRUE(c.actions.empty());
  c.m.step = 30;
  c.m.batch_size = 64;
  c.m.noise_scale = 10;  // never shrinks
  p->after_step(c);
  EXPECT_TRUE(c.actions.empty());
}

TEST(BuiltinPolicies, AdaptiveBatchScaleMultipliesTheTarget) {
  // Noise scale 256 over 2 workers is 128 per worker: scale 1 stays at 128, scale 4 grows (doubling) toward 512.
  for (const auto& [spec, expected] : std::vector<std::pair<std::string, std::vector<std::string>>>{
           {"adaptive-batch:interval=10,warmup=0", {}},
           {"adaptive-batch:interval=10,warmup=0,scale=4", {"batch=256", "lr=0.141421"}}}) {
    auto p = make_policy(spec);
    RecordingContext c;
    start_training(*p, c, 128, 0.1, 2);
    c.m.step = 10;
    c.m.noise_scale = 256;
    p->after_step(c);
    EXPECT_EQ(c.actions, expected) << spec;
  }
  EXPECT_THROW(make_policy("adaptive-batch:scale=0"), ConfigError);
  EXPECT_THROW(make_policy("adaptive-batch:scale=-2"), ConfigError);
}

// min_speedup: a doubling that does not raise the measured samples/s by the factor is undone and not tried again;
// one that does stays, and growth goes on.
TEST(BuiltinPolicies, AdaptiveBatchKeepsADoublingOnlyWhereThroughputGrows) {
  // Steps first..last at per-worker batch `batch` with `sps` samples/s; after_step on each.
  auto steps = [](Policy& p, RecordingContext& c, std::int64_t first, std::int64_t last, std::int64_t batch,
                  double sps) {
    for (std::int64_t s = first; s <= last; ++s) {
      c.m.step = s;
      c.m.batch_size = batch;
      c.m.samples_per_second = sps;
      p.after_step(c);
    }
  };
  for (const double speedup_at_128 : {1.03, 1.5}) {
    auto p = make_policy("adaptive-batch:interval=10,warmup=0,rule=linear,min_speedup=1.1");
    RecordingContext c;
    start_training(*p, c, 64, 0.1, 2);
    c.m.noise_scale = 4096;  // wants the maximum: doubles at every decision it may
    steps(*p, c, 1, 10, 64, 1000);
    EXPECT_EQ(c.actions, (std::vector<std::string>{"batch=128", "lr=0.200000"}));  // a trial
    c.actions.clear();
    steps(*p, c, 11, 20, 128, 1000 * speedup_at_128);
    if (speedup_at_128 < 1.1) {
      EXPECT_EQ(c.actions, (std::vector<std::string>{"batch=64", "lr=0.100000"})) << "3% more samples/s: undone";
      c.actions.clear();
      steps(*p, c, 21, 40, 64, 1000);
      EXPECT_TRUE(c.actions.empty()) << "128 is not tried again";
    } else {
      EXPECT_EQ(c.actions, (std::vector<std::string>{"batch=256", "lr=0.400000"})) << "kept, and grows on";
    }
  }
  // Without min_speedup the throughput plays no part: the same 3% doubling is kept.
  auto p = make_policy("adaptive-batch:interval=10,warmup=0,rule=linear");
  RecordingContext c;
  start_training(*p, c, 64, 0.1, 2);
  c.m.noise_scale = 4096;
  steps(*p, c, 1, 10, 64, 1000);
  c.actions.clear();
  steps(*p, c, 11, 20, 128, 1030);
  EXPECT_EQ(c.actions, (std::vector<std::string>{"batch=256", "lr=0.400000"}));
  EXPECT_THROW(make_policy("adaptive-batch:min_speedup=-1"), ConfigError);
  EXPECT_THROW(make_policy("adaptive-batch:min_speedup=1.1,interval=3"), ConfigError);
}

// A worker that joins an elastic job gets rank 0's policy state (PolicyRunner registers save_state with the session):
// from then on it must decide exactly as the policy it was copied from.
// In an elastic job a worker's rank changes: it publishes under the new rank and empties the old rank's keys (the
// exporter skips empty values), so no rank shows two workers' metrics or a departed worker's.
TEST(MetricsPublisher, ARankChangeMovesTheMetricsAndEmptiesTheOldKeys) {
  auto store = make_memory_store();
  MetricsPublisher publisher(store, "job", 2, std::chrono::milliseconds(5));
  TrainingMetrics m;
  m.step = 7;
  auto published = [&](int rank) {
    for (int i = 0; i < 1000; ++i) {
      const auto json = store->get(metrics_key_json("job", rank));
      if (json && json->find("\"step\":7") != std::string::npos) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return false;
  };
  publisher.update(m);
  ASSERT_TRUE(published(2));
  publisher.set_rank(1);
  publisher.update(m);
  ASSERT_TRUE(published(1));
  EXPECT_EQ(store->get(metrics_key_json("job", 2)), std::optional<std::string>(""));
  EXPECT_EQ(store->get(metrics_key_prometheus("job", 2)), std::optional<std::string>(""));
  EXPECT_NE(store->get(metrics_key_prometheus("job", 1))->find("rank=\"1\""), std::string::npos);
}

TEST(BuiltinPolicies, SavedStateMakesAFreshPolicyDecideAlike) {
  auto steps = [](Policy& p, RecordingContext& c, std::int64_t first, std::int64_t last, std::int64_t batch) {
    for (std::int64_t s = first; s <= last; ++s) {
      c.m.step = s;
      c.m.batch_size = batch;
      c.m.samples_per_second = 1000;
      p.after_step(c);
    }
  };
  const std::string spec = "adaptive-batch:interval=10,warmup=0,rule=linear,min_speedup=1.1";
  auto member = make_policy(spec);
  RecordingContext c;
  start_training(*member, c, 64, 0.1, 2);
  c.m.noise_scale = 4096;
  steps(*member, c, 1, 10, 64);    // a trial of 128
  steps(*member, c, 11, 20, 128);  // no faster: undone, 128 refused
  // A fresh policy that never ran before_train (a joining worker) and one that received the member's state.
  auto fresh = make_policy(spec);
  auto joined = make_policy(spec);
  joined->load_state(member->save_state());
  RecordingContext a, b, d;
  for (auto* ctx : {&a, &b, &d}) ctx->m = c.m;
  steps(*member, a, 21, 40, 64);
  steps(*joined, b, 21, 40, 64);
  steps(*fresh, d, 21, 40, 64);
  EXPECT_TRUE(a.actions.empty()) << "128 was refused";
  EXPECT_EQ(b.actions, a.actions);
  EXPECT_NE(d.actions, a.actions) << "without the state the decisions differ (the test would prove nothing)";
  EXPECT_EQ(joined->save_state(), member->save_state());

  auto switcher = make_policy("strategy-switch:step=5,to=ssgd");
  RecordingContext e;
  e.m.step = 6;
  switcher->after_step(e);
  ASSERT_EQ(e.actions, (std::vector<std::string>{"strategy=synchronous_sgd"}));
  auto switched = make_policy("strategy-switch:step=5,to=ssgd");
  switched->load_state(switcher->save_state());
  RecordingContext f;
  f.m.step = 7;
  switched->after_step(f);
  EXPECT_TRUE(f.actions.empty()) << "it switched once already";

  auto state = member->save_state();
  state.pop_back();
  EXPECT_THROW(fresh->load_state(state), ProtocolError);
  state = member->save_state();
  state.push_back(std::byte{0});
  EXPECT_THROW(fresh->load_state(state), ProtocolError);
}

TEST(BuiltinPolicies, AdaScaleGainIsBetweenOneAndTheScale) {
  auto p = make_policy("adaptive-batch:interval=1,warmup=0,rule=adascale");
  RecordingContext c;
  start_training(*p, c, 32, 0.1, 1);
  c.m.step = 1;
  c.m.batch_size = 64;  // S = 2
  c.m.noise_scale = 32;
  c.m.gradient_sq_norm = 1.0;
  c.m.gradient_noise_trace = 32.0;  // s2 = 1 at B0: gain = 2 / 1.5
  p->after_step(c);
  ASSERT_EQ(c.actions.size(), 1u);
  EXPECT_EQ(c.actions[0], "lr=" + std::to_string(0.1 * 2 / 1.5));
}

TEST(BuiltinPolicies, StrategySwitchAndInterference) {
  auto p = make_policy("strategy-switch:to=ssgd,noise_scale=100");
  RecordingContext c;
  c.m.noise_scale = 50;
  p->after_step(c);
  EXPECT_TRUE(c.actions.empty());
  c.m.noise_scale = 150;
  p->after_step(c);
  p->after_step(c);  // once only
  EXPECT_EQ(c.actions, std::vector<std::string>{"strategy=synchronous_sgd"});

  auto q = make_policy("strategy-switch:fallback_topology=tree,reference_steps=2,patience=3,min_fraction=0.5");
  RecordingContext d;
  for (double bw : {100.0, 100.0, 80.0, 40.0, 40.0, 60.0, 40.0, 40.0}) {
    d.m.allreduce_bytes_per_second = bw;
    q->after_step(d);
  }
  EXPECT_TRUE(d.actions.empty()) << "60 resets the patience";
  d.m.allreduce_bytes_per_second = 30;
  q->after_step(d);
  EXPECT_EQ(d.actions, std::vector<std::string>{"topology=tree"});
}

TEST(BuiltinPolicies, ScheduleActsAtItsSteps) {
  auto p = make_policy("schedule:lr@epoch2=0.01,batch@step5=128,strategy@step5=sma,topology@epoch1=tree,stop@step9=1");
  RecordingContext c;
  c.m.epoch = 1;
  p->before_epoch(c);
  EXPECT_EQ(c.actions, std::vector<std::string>{"topology=tree"});
  c.actions.clear();
  c.m.step = 5;
  p->after_step(c);
  EXPECT_EQ(c.actions, (std::vector<std::string>{"batch=128", "strategy=synchronous_averaging"}));
  c.actions.clear();
  c.m.epoch = 2;
  p->before_epoch(c);
  c.m.step = 9;
  p->after_step(c);
  EXPECT_EQ(c.actions, (std::vector<std::string>{"lr=0.010000", "stop:schedule: stop at step 9"}));
}

class CountingPolicy : public Policy {
 public:
  std::string name() const override { return "counting"; }
};

TEST(PolicyRegistry, UserPoliciesRegisterByName) {
  static PolicyRegistration registration("counting",
                                         [](const PolicyOptions&) { return std::make_unique<CountingPolicy>(); });
  EXPECT_EQ(make_policy("counting")->name(), "counting");
  const auto names = policy_names();
  EXPECT_NE(std::find(names.begin(), names.end(), "counting"), names.end());
  EXPECT_THROW(register_policy("bad:name", {}), ConfigError);
}

}  // namespace
}  // namespace aikido::test
