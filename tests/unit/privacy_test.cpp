// Privacy: the RDP accountant against closed forms, an independent numerical evaluation and published values; secure
// aggregation with ranks as threads.
#include <gtest/gtest.h>

#include <aikido/privacy.hpp>
#include <array>
#include <cmath>
#include <limits>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>

#include "cluster.hpp"

namespace aikido::test {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// RDP accountant

// An independent evaluation of the subsampled Gaussian mechanism's RDP (Mironov, Talwar and Zhang 2019, Section 3):
//   A_alpha = integral over z of N(z; 0, sigma^2) ((1 - q) + q exp((2z - 1) / (2 sigma^2)))^alpha dz,
//   RDP(alpha) = log(A_alpha) / (alpha - 1),
// by the trapezoid rule in long double, in log space, over a range that covers both the integrand's bulk near 0 and
// its shifted mode near z = alpha (where q exp(...) dominates). It shares nothing with the library's binomial
// expansion (integer orders) or its two series (fractional orders).
double rdp_by_integration(double q, double sigma, double alpha) {
  using Real = long double;
  const Real s2 = Real(sigma) * sigma;
  // The integrand is smooth and decays like a Gaussian: the trapezoid rule converges faster than any power of h.
  const Real low = -40 * Real(sigma), high = Real(alpha) + 40 * Real(sigma);
  const Real h = Real(sigma) / 100;
  const auto log_integrand = [&](Real z) {
    const Real log_density = -z * z / (2 * s2) - std::log(std::sqrt(2 * Real(M_PI)) * Real(sigma));
    const Real e = (2 * z - 1) / (2 * s2);
    // log((1 - q) + q e^e) without overflow.
    const Real a = std::log1p(-Real(q)), b = std::log(Real(q)) + e;
    const Real hi = std::max(a, b), lo = std::min(a, b);
    return log_density + Real(alpha) * (hi + std::log1p(std::exp(lo - hi)));
  };
  Real peak = -std::numeric_limits<Real>::infinity();
  for (Real z = low; z <= high; z += h) peak = std::max(peak, log_integrand(z));
  Real sum = 0;
  for (Real z = low; z <= high; z += h) sum += std::exp(log_integrand(z) - peak);
  const Real log_a = peak + std::log(sum * h);
  return static_cast<double>(log_a / (Real(alpha) - 1));
}

// The conversion the library documents, written out here for the independent check of a whole accounting.
double epsilon_by_hand(const std::vector<double>& orders, const std::vector<double>& rdp, double delta) {
  double best = std::numeric_limits<double>::infinity();
  for (std::size_t i = 0; i < orders.size(); ++i) {
    const double a = orders[i];
    if (a <= 1.01) continue;
    best = std::min(best, rdp[i] + std::log((a - 1) / a) - (std::log(delta) + std::log(a)) / (a - 1));
  }
  return best;
}

TEST(RdpAccountant, FullSamplingIsTheGaussianMechanismsClosedForm) {
  for (double sigma : {0.5, 1.0, 2.71828}) {
    for (double alpha : {1.5, 2.0, 3.14159, 32.0}) {
      EXPECT_DOUBLE_EQ(subsampled_gaussian_rdp(1.0, sigma, alpha), alpha / (2 * sigma * sigma));
    }
  }
  EXPECT_EQ(subsampled_gaussian_rdp(0.0, 1.0, 2.0), 0.0);
  EXPECT_TRUE(std::isinf(subsampled_gaussian_rdp(0.1, 0.0, 2.0)));
  EXPECT_THROW(subsampled_gaussian_rdp(1.5, 1.0, 2.0), ConfigError);
  EXPECT_THROW(subsampled_gaussian_rdp(0.1, 1.0, 1.0), ConfigError);
}

TEST(RdpAccountant, MatchesANumericalIntegrationAtIntegerAndFractionalOrders) {
  struct Case {
    double q, sigma, alpha;
  };
  for (const Case c : {Case{0.01, 1.0, 2}, Case{0.01, 1.0, 8}, Case{0.04, 1.5, 32}, Case{0.1, 2.0, 63},
                       Case{0.5, 0.8, 5}, Case{0.004, 1.1, 17}, Case{0.01, 1.0, 1.5}, Case{0.04, 1.5, 7.3},
                       Case{0.2, 3.0, 2.5}, Case{0.004, 1.1, 10.9}, Case{0.1, 0.9, 3.7}}) {
    const double expected = rdp_by_integration(c.q, c.sigma, c.alpha);
    EXPECT_NEAR(subsampled_gaussian_rdp(c.q, c.sigma, c.alpha), expected, std::fabs(expected) * 1e-6 + 1e-12)
        << "q " << c.q << ", sigma " << c.sigma << ", alpha " << c.alpha;
  }
}

// Google's dp_accounting (TF-Privacy's successor), rdp_privacy_accountant_test.py, test_compute_rdp_poisson_sampled_
// gaussian: 50 steps at q = 0.01, sigma = 2.5, compared there with rtol 1e-4. At order 1.5 the published 6.70579741e-04
// is not the integral: that version sums the fractional series' terms without their alternating signs (an upper
// bound, 3% high here); the integral, by this file's integration and by mpmath's quadrature (40 digits), is
// 6.50070897e-04, as Opacus's and TF-Privacy's earlier signed sums give.
TEST(RdpAccountant, MatchesTensorFlowPrivacysPublishedRdp) {
  RdpAccountant accountant({1.5, 2.5, 5, 50, 100});
  accountant.step(0.01, 2.5, 50);
  const std::array<double, 5> published{6.70579741e-04, 1.08548710e-03, 2.18075656e-03, 2.38460375e-02, 1.67416308e02};
  for (std::size_t i = 1; i < published.size(); ++i) {
    EXPECT_NEAR(accountant.rdp()[i], published[i], published[i] * 1e-4) << "order " << accountant.orders()[i];
  }
  EXPECT_NEAR(accountant.rdp()[0], 6.50070897e-04, 1e-11);
  EXPECT_NEAR(accountant.rdp()[0], 50 * rdp_by_integration(0.01, 2.5, 1.5), 1e-11);
  EXPECT_LT(accountant.rdp()[0], published[0]);
}

// dp_accounting's test_compute_epsilon_delta_pure_dp: a constant RDP of 1.1 at orders 2..32 gives epsilon
// 1.32783806176 at delta 1e-5, at order 32; test_compute_epsilon_delta_gaussian: sigma 4.530877117 without
// sampling is (1, 1e-6)-DP over the orders 1.000, 1.001, ..., 99.999.
TEST(RdpAccountant, EpsilonConversionMatchesPublishedValues) {
  std::vector<double> orders, rdp;
  for (int a = 2; a <= 32; ++a) {
    orders.push_back(a);
    rdp.push_back(1.1);
  }
  const auto [epsilon, order] = epsilon_from_rdp(orders, rdp, 1e-5);
  EXPECT_NEAR(epsilon, 1.32783806176, 1e-9);
  EXPECT_EQ(order, 32);

  std::vector<double> fine;
  for (int i = 1000; i < 100000; ++i) fine.push_back(0.001 * i);
  std::vector<double> fine_rdp;
  for (double a : fine) fine_rdp.push_back(a / (2 * 4.530877117 * 4.530877117));  // q = 1: the closed form
  EXPECT_NEAR(epsilon_from_rdp(fine, fine_rdp, 1e-6).first, 1.0, 1e-3);
  EXPECT_THROW(epsilon_from_rdp(orders, rdp, 0.0), ConfigError);
}

// Opacus, opacus/tests/accountants_test.py, test_rdp_accountant: 2250 steps (90 epochs) at sample rate 0.04 and noise
// multiplier 1.5 give epsilon 7.32911117143 at delta 1e-5 with the default orders; and the same from this test's own
// integration and conversion.
TEST(RdpAccountant, MatchesOpacusPublishedEpsilon) {
  RdpAccountant accountant;
  for (int step = 0; step < 2250; ++step) accountant.step(0.04, 1.5);
  EXPECT_NEAR(accountant.epsilon(1e-5), 7.32911117143, 1e-3);
  EXPECT_EQ(accountant.steps(), 2250);

  const std::vector<double> orders = RdpAccountant::default_orders();
  ASSERT_EQ(orders.size(), 99u + 52u);
  std::vector<double> rdp;
  for (double a : orders) rdp.push_back(2250 * rdp_by_integration(0.04, 1.5, a));
  EXPECT_NEAR(accountant.epsilon(1e-5), epsilon_by_hand(orders, rdp, 1e-5), 1e-3);
}

TEST(RdpAccountant, ComposesStepsOfDifferentKindsAndRestores) {
  RdpAccountant a, b;
  a.step(0.01, 1.0, 100);
  a.step(1.0, 4.0, 10);
  a.step(0.01, 1.0, 100);
  ASSERT_EQ(a.history().size(), 2u);
  EXPECT_EQ(a.history()[0].count, 200);
  for (std::size_t i = 0; i < a.orders().size(); ++i) {
    const double alpha = a.orders()[i];
    EXPECT_NEAR(a.rdp()[i], 200 * subsampled_gaussian_rdp(0.01, 1.0, alpha) + 10 * alpha / 32, 1e-9 * a.rdp()[i]);
  }
  b.restore(a.history());
  EXPECT_NEAR(b.epsilon(1e-5), a.epsilon(1e-5), 1e-12);
  EXPECT_EQ(RdpAccountant().epsilon(1e-5), 0.0);
  RdpAccountant none;
  none.step(0.01, 0.0);
  EXPECT_TRUE(std::isinf(none.epsilon(1e-5)));
  EXPECT_THROW(RdpAccountant({1.0}), ConfigError);
}

// ---------------------------------------------------------------------------------------------------------------
// Secure aggregation

std::vector<std::int32_t> values_of(int rank, std::size_t n) {
  std::mt19937 rng(1000 + rank);
  std::vector<std::int32_t> v(n);
  for (auto& x : v) x = static_cast<std::int32_t>(rng());  // the whole range: sums wrap
  return v;
}

std::vector<std::int32_t> wrapping_sum(const std::vector<int>& ranks, std::size_t n) {
  std::vector<std::uint32_t> sum(n, 0);
  for (int r : ranks) {
    const auto v = values_of(r, n);
    for (std::size_t i = 0; i < n; ++i) sum[i] += static_cast<std::uint32_t>(v[i]);
  }
  return std::vector<std::int32_t>(sum.begin(), sum.end());
}

TEST(SecureAggregation, TheMaskedSumIsThePlainSumBitForBit) {
  constexpr std::size_t kCount = 10007;
  for (int size : {2, 4}) {
    std::vector<std::vector<std::int32_t>> results(static_cast<std::size_t>(size));
    run_cluster(size, base_config(), [&](Peer& peer) {
      SecureAggregator aggregator(peer);
      for (int round = 0; round < 3; ++round) {
        auto v = values_of(peer.rank(), kCount);
        aggregator.sum(v, "secagg/test");
        results[static_cast<std::size_t>(peer.rank())] = v;
      }
      EXPECT_EQ(aggregator.key_exchanges(), 1u);
      EXPECT_EQ(aggregator.round(), 3u);
    });
    std::vector<int> all(static_cast<std::size_t>(size));
    std::iota(all.begin(), all.end(), 0);
    const auto expected = wrapping_sum(all, kCount);
    for (const auto& r : results) EXPECT_EQ(r, expected) << size << " ranks";
  }
}

// A byte histogram's chi-square statistic against the uniform distribution (255 degrees of freedom: mean 255,
// standard deviation about 22.6).
double chi_square_of_bytes(const std::vector<std::int32_t>& v) {
  std::array<double, 256> counts{};
  const auto* bytes = reinterpret_cast<const std::uint8_t*>(v.data());
  const std::size_t n = v.size() * sizeof(std::int32_t);
  for (std::size_t i = 0; i < n; ++i) counts[bytes[i]] += 1;
  const double expected = static_cast<double>(n) / 256;
  double chi = 0;
  for (double c : counts) chi += (c - expected) * (c - expected) / expected;
  return chi;
}

TEST(SecureAggregation, WhatAWorkerSendsLooksUniform) {
  constexpr std::size_t kCount = 1 << 16;
  run_cluster(3, base_config(), [&](Peer& peer) {
    SecureAggregator aggregator(peer);
    // A fixed-point update: small values, far from uniform.
    std::vector<float> update(kCount);
    for (std::size_t i = 0; i < kCount; ++i) update[i] = 0.001f * static_cast<float>(i % 17) - 0.008f;
    std::vector<std::int32_t> plain(kCount);
    encode_fixed_point(update, 1 << 20, plain);
    auto masked = plain;
    aggregator.mask(masked);
    EXPECT_GT(chi_square_of_bytes(plain), 10000) << "the check cannot tell a plain update from noise";
    EXPECT_LT(chi_square_of_bytes(masked), 400) << "rank " << peer.rank() << "'s masked update is not uniform";
    // Every bit is set about half of the time.
    std::array<int, 32> ones{};
    for (auto x : masked) {
      for (int b = 0; b < 32; ++b) ones[b] += (static_cast<std::uint32_t>(x) >> b) & 1u;
    }
    for (int b = 0; b < 32; ++b) EXPECT_NEAR(ones[b], kCount / 2.0, 6 * std::sqrt(kCount / 4.0)) << "bit " << b;
    // The next round's masks are others: the same update is sent differently.
    auto again = plain;
    aggregator.mask(again);
    EXPECT_NE(again, masked);
    peer.barrier("done");
  });
}

// Rank 3 leaves after the key exchange, before it sends its masked vector of round 2: the others' sum fails. The
// survivors reconnect as a cluster of 3 (a new cluster version) and redo the round: a new key exchange, fresh masks,
// and the sum of the survivors' plain values, bit for bit.
TEST(SecureAggregation, AfterADropoutTheSurvivorsRedoTheRoundWithFreshMasks) {
  constexpr std::size_t kCount = 4099;
  auto store = make_memory_store();
  std::vector<std::vector<std::int32_t>> results(3), first_masks(3), redo_masks(3);
  std::vector<std::thread> threads;
  std::mutex mutex;
  std::vector<std::string> errors;
  for (int rank = 0; rank < 4; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        PeerConfig config = base_config();
        config.rank = rank;
        config.size = 4;
        config.store = store;
        config.job_id = "secagg-dropout";
        config.timeout = std::chrono::milliseconds(20'000);
        Peer peer = Peer::create(config);
        SecureAggregator aggregator(peer);
        auto warmup = values_of(rank, kCount);
        aggregator.sum(warmup, "secagg/round1");  // keys exchanged, one round done by all four
        peer.barrier("secagg/round1-done");
        if (rank == 3) return;  // leaves: its Peer closes its connections
        auto v = values_of(rank, kCount);
        auto masked = v;
        aggregator.mask(masked);  // what round 2 would have sent
        first_masks[static_cast<std::size_t>(rank)] = masked;
        bool lost = false;
        try {
          aggregator.sum(v, "secagg/round2");
        } catch (const PeerLostError&) {
          lost = true;
        }
        EXPECT_TRUE(lost) << "rank " << rank << ": the round finished without rank 3";
        config.size = 3;
        config.cluster_version = 1;
        peer.reconnect(config);
        v = values_of(rank, kCount);
        masked = v;
        aggregator.mask(masked);
        redo_masks[static_cast<std::size_t>(rank)] = masked;
        v = values_of(rank, kCount);
        aggregator.sum(v, "secagg/round2-redo");
        EXPECT_EQ(aggregator.key_exchanges(), 2u);
        results[static_cast<std::size_t>(rank)] = v;
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(mutex);
        errors.push_back("rank " + std::to_string(rank) + ": " + e.what());
      }
    });
  }
  for (auto& t : threads) t.join();
  ASSERT_TRUE(errors.empty()) << errors.front();
  const auto expected = wrapping_sum({0, 1, 2}, kCount);
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(results[r], expected) << "rank " << r;
    EXPECT_NE(redo_masks[r], first_masks[r]) << "rank " << r << " reused the masks of the failed round";
  }
}

TEST(SecureAggregation, FixedPointSaturatesAndRoundTrips) {
  const std::vector<float> in{0.5f, -0.25f, 3e9f, -3e9f, std::nanf("")};
  std::vector<std::int32_t> out(in.size());
  EXPECT_EQ(encode_fixed_point(in, 4.0, out), 2u);
  EXPECT_EQ(out, (std::vector<std::int32_t>{2, -1, INT32_MAX, -INT32_MAX, 0}));
  std::vector<float> back(in.size());
  decode_fixed_point(out, 4.0, back);
  EXPECT_EQ(back[0], 0.5f);
  EXPECT_EQ(back[1], -0.25f);
  EXPECT_THROW(encode_fixed_point(in, 0.0, out), ConfigError);
}

}  // namespace
}  // namespace aikido::test
