// Compression: the Compression value and the codecs on plain buffers (src/compress).
#include <gtest/gtest.h>

#include <aikido/compression.hpp>
#include <aikido/errors.hpp>
#include <aikido/policy.hpp>
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "compress/codecs.hpp"

namespace aikido::test {
namespace {

TEST(Compression, ParsesAndNamesEveryKind) {
  for (const char* text : {"none", "fp16", "bf16", "int8", "topk:0.01", "topk:1", "powersgd:4"}) {
    EXPECT_EQ(Compression::parse(text).name(), text);
  }
  EXPECT_EQ(Compression::parse("topk:0.25").fraction, 0.25);
  EXPECT_EQ(Compression::parse("powersgd:2").rank, 2);
  EXPECT_EQ(Compression::parse("powersgd:2"), Compression::powersgd(2));
  for (const char* bad :
       {"", "zip", "topk", "topk:", "topk:0", "topk:1.5", "topk:x", "powersgd:0", "powersgd:2.5", "fp16:1"}) {
    try {
      Compression::parse(bad);
      ADD_FAILURE() << "'" << bad << "' parsed";
    } catch (const ConfigError& e) {
      const std::string what = e.what();
      EXPECT_TRUE(what.find("topk:FRACTION") != std::string::npos || what.find("must be") != std::string::npos) << what;
    }
  }
}

TEST(Compression, WireRatios) {
  EXPECT_EQ(Compression::none().wire_ratio(4, 1000), 1.0);
  EXPECT_EQ(Compression::fp16().wire_ratio(4, 1000), 0.5);
  // 4 workers: a ring allreduce sends 1.5x the buffer per worker; a gather of 1% pairs sends 3 x 8 bytes x 1%.
  EXPECT_NEAR(Compression::topk(0.01).wire_ratio(4, 100000), 3 * 8 * 1000.0 / (1.5 * 4 * 100000), 1e-12);
  EXPECT_LT(Compression::powersgd(4).wire_ratio(4, 1 << 20), 0.01);
}

std::vector<float> random_values(std::size_t n, std::uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

TEST(Codecs, HalfPrecisionRoundTrips) {
  const auto values = random_values(1000, 1);
  std::vector<float16> half(values.size());
  std::vector<bfloat16> brain(values.size());
  std::vector<float> back(values.size());
  compress::encode_fp16(values, half);
  compress::decode_fp16(half, back);
  for (std::size_t i = 0; i < values.size(); ++i) EXPECT_NEAR(back[i], values[i], std::fabs(values[i]) * 1e-3 + 1e-7);
  compress::encode_bf16(values, brain);
  compress::decode_bf16(brain, back);
  for (std::size_t i = 0; i < values.size(); ++i) EXPECT_NEAR(back[i], values[i], std::fabs(values[i]) * 8e-3 + 1e-30);
}

TEST(Codecs, Int8BlocksKeepEachValueWithinHalfAStep) {
  // Blocks of very different magnitudes: each keeps its own scale.
  auto values = random_values(3 * 256 + 17, 2);
  for (std::size_t i = 256; i < 512; ++i) values[i] *= 1e-4f;
  std::vector<std::uint8_t> encoded(compress::int8_encoded_bytes(values.size()));
  EXPECT_EQ(encoded.size(), 4 * 4 + values.size());
  compress::encode_int8(values, encoded);
  std::vector<float> decoded(values.size(), 1.0f);  // decode adds
  compress::decode_int8_add(encoded, decoded);
  for (std::size_t block = 0; block * 256 < values.size(); ++block) {
    const std::size_t begin = block * 256, end = std::min(values.size(), begin + 256);
    float largest = 0;
    for (std::size_t i = begin; i < end; ++i) largest = std::max(largest, std::fabs(values[i]));
    for (std::size_t i = begin; i < end; ++i) {
      EXPECT_LE(std::fabs(decoded[i] - 1.0f - values[i]), largest / 127 / 2 * 1.0001f + 1e-6f) << i;
    }
  }
}

TEST(Codecs, TopKSendsTheLargestAndKeepsTheRest) {
  compress::TopK topk(10, 0.3);
  ASSERT_EQ(topk.k(), 3u);
  const std::vector<float> values{0.1f, -5, 0.2f, 3, 0, 0, -0.5f, 4, 0.3f, 0};
  std::vector<std::int32_t> packed(6);
  topk.encode(values, packed);
  std::vector<float> sent(10, 0);
  compress::TopK::decode_add(packed, sent);
  EXPECT_EQ(sent, (std::vector<float>{0, -5, 0, 3, 0, 0, 0, 4, 0, 0}));
  // The residual is exactly what was not sent; the next step adds it to its values.
  for (std::size_t i = 0; i < values.size(); ++i) EXPECT_EQ(topk.residual()[i] + sent[i], values[i]);
  topk.encode(std::vector<float>(10, 0.0f), packed);
  std::fill(sent.begin(), sent.end(), 0.0f);
  compress::TopK::decode_add(packed, sent);
  EXPECT_EQ(sent, (std::vector<float>{0, 0, 0.2f, 0, 0, 0, -0.5f, 0, 0.3f, 0})) << "the residual's largest go next";
  std::vector<float> small(3);
  EXPECT_THROW(compress::TopK::decode_add(packed, small), Error);  // an index beyond the buffer
  EXPECT_THROW(compress::TopK(10, 0.0), ConfigError);
}

// Error feedback conserves what is sent: over many steps, everything given to encode() is either sent or still in
// the residual, to rounding.
TEST(Codecs, TopKErrorFeedbackLosesNothing) {
  compress::TopK topk(500, 0.02);
  std::vector<double> given(500, 0.0), sent_total(500, 0.0);
  std::vector<std::int32_t> packed(2 * topk.k());
  for (int step = 0; step < 200; ++step) {
    const auto values = random_values(500, 100 + step);
    for (std::size_t i = 0; i < values.size(); ++i) given[i] += values[i];
    topk.encode(values, packed);
    std::vector<float> sent(500, 0.0f);
    compress::TopK::decode_add(packed, sent);
    for (std::size_t i = 0; i < sent.size(); ++i) sent_total[i] += sent[i];
  }
  for (std::size_t i = 0; i < given.size(); ++i) EXPECT_NEAR(sent_total[i] + topk.residual()[i], given[i], 1e-3);
}

// Gradient descent on a least-squares problem whose gradient travels through top-k (10% of the values): with error
// feedback it reaches the optimum (the loss of the exact solution) as plain gradient descent does.
TEST(Codecs, TopKWithErrorFeedbackConvergesOnLeastSquares) {
  constexpr std::size_t kDim = 50, kRows = 200;
  std::mt19937_64 rng(7);
  std::normal_distribution<double> normal;
  std::vector<double> a(kRows * kDim), b(kRows);
  for (auto& x : a) x = normal(rng) / std::sqrt(double(kRows));
  std::vector<double> truth(kDim);
  for (auto& x : truth) x = normal(rng);
  for (std::size_t r = 0; r < kRows; ++r) {
    b[r] = 0.01 * normal(rng);
    for (std::size_t c = 0; c < kDim; ++c) b[r] += a[r * kDim + c] * truth[c];
  }
  const auto loss_and_gradient = [&](const std::vector<double>& x, std::vector<float>* g) {
    std::vector<double> residual(kRows);
    double loss = 0;
    for (std::size_t r = 0; r < kRows; ++r) {
      double s = -b[r];
      for (std::size_t c = 0; c < kDim; ++c) s += a[r * kDim + c] * x[c];
      residual[r] = s;
      loss += 0.5 * s * s;
    }
    if (g) {
      g->assign(kDim, 0.0f);
      for (std::size_t c = 0; c < kDim; ++c) {
        double s = 0;
        for (std::size_t r = 0; r < kRows; ++r) s += a[r * kDim + c] * residual[r];
        (*g)[c] = static_cast<float>(s);
      }
    }
    return loss;
  };
  const auto descend = [&](bool compressed) {
    std::vector<double> x(kDim, 0.0);
    compress::TopK topk(kDim, 0.1);
    std::vector<std::int32_t> packed(2 * topk.k());
    std::vector<float> g, step(kDim);
    for (int it = 0; it < 4000; ++it) {
      loss_and_gradient(x, &g);
      if (compressed) {
        topk.encode(g, packed);
        std::fill(step.begin(), step.end(), 0.0f);
        compress::TopK::decode_add(packed, step);
      } else {
        step = g;
      }
      for (std::size_t c = 0; c < kDim; ++c) x[c] -= 0.1 * step[c];
    }
    return loss_and_gradient(x, nullptr);
  };
  const double exact = descend(false);
  const double start = loss_and_gradient(std::vector<double>(kDim, 0.0), nullptr);
  const double compressed = descend(true);
  EXPECT_LT(compressed, start * 1e-3) << "top-k with error feedback did not converge";
  EXPECT_NEAR(compressed, exact, exact * 0.05 + 1e-6);
}

// ---------------------------------------------------------------------------------------------------------------
// The adaptive-compression policy

class CompressionContext : public PolicyContext {
 public:
  TrainingMetrics m;
  std::vector<std::string> actions;
  const TrainingMetrics& metrics() const override { return m; }
  void set_batch_size(std::int64_t) override { actions.push_back("batch"); }
  void set_lr(double) override { actions.push_back("lr"); }
  void set_strategy(Strategy) override { actions.push_back("strategy"); }
  void set_topology(Topology) override { actions.push_back("topology"); }
  void set_compression(Compression c) override {
    actions.push_back("compression=" + c.name());
    m.compression = c.name();
  }
  void request_resize(int) override { actions.push_back("resize"); }
  void stop(std::string) override { actions.push_back("stop"); }
};

// 4 workers, 2 MB of gradients, 0.2 s of compute: a step that spends `communication` seconds communicating.
void step_metrics(CompressionContext& c, std::int64_t step, double communication, double link) {
  c.m.step = step;
  c.m.workers = 4;
  c.m.compute_seconds = 0.2;
  c.m.communication_seconds = communication;
  c.m.step_seconds = 0.2 + communication;
  c.m.allreduce_bytes_per_second = 2e6 / communication;
  c.m.slowest_link_bytes_per_second = link;
}

TEST(AdaptiveCompression, ClimbsToTheFirstLevelTheLinkAllows) {
  auto policy = make_policy("adaptive-compression:interval=10,warmup=10");
  CompressionContext c;
  c.m.compression = "none";
  step_metrics(c, 5, 3.0, 1.25e6);
  policy->after_step(c);
  EXPECT_TRUE(c.actions.empty()) << "warming up";
  step_metrics(c, 15, 3.0, 1.25e6);
  policy->after_step(c);
  EXPECT_TRUE(c.actions.empty()) << "not a decision step";
  // At 10 Mbit/s fp16 would still spend 1.2 s of 1.4 s communicating; PowerSGD of rank 4 about a tenth.
  step_metrics(c, 20, 3.0, 1.25e6);
  policy->after_step(c);
  EXPECT_EQ(c.actions, std::vector<std::string>{"compression=powersgd:4"});
  // At 10 Gbit/s fp16 is enough.
  c.actions.clear();
  c.m.compression = "none";
  step_metrics(c, 30, 0.5, 1.25e9);
  policy->after_step(c);
  EXPECT_EQ(c.actions, std::vector<std::string>{"compression=fp16"});
  // Without a measured link: one level at a time.
  c.actions.clear();
  step_metrics(c, 40, 0.5, TrainingMetrics::kUnknown);
  policy->after_step(c);
  EXPECT_EQ(c.actions, std::vector<std::string>{"compression=powersgd:4"});
}

TEST(AdaptiveCompression, StepsDownAfterPatienceWhenTheLinkAllows) {
  auto policy = make_policy("adaptive-compression:interval=10,warmup=0,patience=2,ladder=none/fp16");
  CompressionContext c;
  c.m.compression = "fp16";
  step_metrics(c, 10, 0.001, 1.25e9);
  policy->after_step(c);
  EXPECT_TRUE(c.actions.empty()) << "patience";
  step_metrics(c, 20, 0.001, 1.25e9);
  policy->after_step(c);
  EXPECT_EQ(c.actions, std::vector<std::string>{"compression=none"});
  // On a slow link the level below would communicate too much: it stays.
  c.actions.clear();
  c.m.compression = "fp16";
  for (std::int64_t step : {30, 40, 50}) {
    step_metrics(c, step, 0.001, 1e3);
    policy->after_step(c);
  }
  EXPECT_TRUE(c.actions.empty());
}

TEST(AdaptiveCompression, RefusesBadOptions) {
  EXPECT_THROW(make_policy("adaptive-compression:ladder=fp16"), ConfigError);
  EXPECT_THROW(make_policy("adaptive-compression:ladder=none/zip"), ConfigError);
  EXPECT_THROW(make_policy("adaptive-compression:low=0.5,high=0.4"), ConfigError);
  EXPECT_THROW(make_policy("adaptive-compression:speed=1"), ConfigError);
  EXPECT_THROW(make_policy("schedule:compression@step3=zip"), ConfigError);
}

}  // namespace
}  // namespace aikido::test
