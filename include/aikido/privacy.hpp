// Privacy: an RDP accountant for the subsampled Gaussian mechanism, and secure aggregation (pairwise masks agreed
// by X25519 key exchange) over a Peer's integer allreduce.
#pragma once

#include <aikido/peer.hpp>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

namespace aikido {

/// Rényi DP of one application of the Poisson-subsampled Gaussian mechanism (each record is used with probability
/// `sampling_rate`; Gaussian noise of standard deviation `noise_multiplier` times the L2 sensitivity) at order
/// `alpha` > 1 (Mironov, Talwar and Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism":
/// integer orders by the binomial expansion of A_alpha, fractional ones by its two series, Section 3.3). Closed forms
/// at the ends: 0 for sampling_rate 0, alpha / (2 sigma^2) for sampling_rate 1; +inf for noise_multiplier 0.
/// ConfigError for a rate outside [0, 1], a negative noise multiplier or alpha <= 1.
double subsampled_gaussian_rdp(double sampling_rate, double noise_multiplier, double alpha);

/// The smallest epsilon such that the RDP guarantees `rdp` at `orders` imply (epsilon, delta)-DP, and the order
/// that gives it. Uses the conversion of Balle et al. 2020 ("Hypothesis testing interpretations and Rényi
/// differential privacy", Proposition 12; also Canonne, Kamath and Steinke 2020):
///   epsilon = rdp + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1),
/// over orders above 1.01, and 0 where the RDP is so small that delta alone covers it (delta^2 > 1 - exp(-rdp)), as
/// Opacus and Google's dp_accounting do. ConfigError for delta outside (0, 1) or lists of different lengths.
std::pair<double, double> epsilon_from_rdp(std::span<const double> orders, std::span<const double> rdp, double delta);

/// Composes steps of the Poisson-subsampled Gaussian mechanism (DP-SGD's steps, or rounds of client-level DP) and
/// reports epsilon at a delta. Plain value; not thread safe.
class RdpAccountant {
 public:
  /// Opacus's default orders: 1.1, 1.2, ..., 10.9, then 12, 13, ..., 63.
  static std::vector<double> default_orders();

  RdpAccountant() : RdpAccountant(default_orders()) {}
  /// ConfigError for an empty list or an order <= 1.
  explicit RdpAccountant(std::vector<double> orders);

  /// Records `steps` steps, each with sampling rate `sampling_rate` and noise multiplier `noise_multiplier`.
  void step(double sampling_rate, double noise_multiplier, std::int64_t steps = 1);
  /// epsilon at `delta` (0 before the first step; +inf when a step had no noise).
  double epsilon(double delta) const;
  /// epsilon and the order that achieves it.
  std::pair<double, double> epsilon_and_order(double delta) const;

  /// Every recorded kind of step with its count, in the order first seen: the accountant's whole state.
  struct Steps {
    double sampling_rate = 0;
    double noise_multiplier = 0;
    std::int64_t count = 0;
  };
  const std::vector<Steps>& history() const { return history_; }
  /// Replaces the state by `history` (restored state of an elastic job).
  void restore(const std::vector<Steps>& history);
  std::int64_t steps() const;
  const std::vector<double>& orders() const { return orders_; }
  /// Accumulated RDP per order.
  const std::vector<double>& rdp() const { return rdp_; }

 private:
  std::vector<double> orders_;
  std::vector<double> rdp_;
  std::vector<Steps> history_;
  // The per-step RDP of the last (rate, noise) seen: training adds the same kind of step over and over.
  double cached_rate_ = -1, cached_noise_ = -1;
  std::vector<double> cached_;
};

/// Fixed point for secure aggregation: out[i] = round(in[i] * scale), saturated to +-(2^31 - 1); NaN becomes 0.
/// Returns how many values saturated.
std::size_t encode_fixed_point(std::span<const float> in, double scale, std::span<std::int32_t> out);
/// out[i] = in[i] / scale.
void decode_fixed_point(std::span<const std::int32_t> in, double scale, std::span<float> out);

/// Sums int32 vectors across the ranks of a Peer so that what each rank sends reveals nothing but the sum (secure
/// aggregation with pairwise masks, Bonawitz et al. 2017, for honest-but-curious workers).
///
/// At the first sum of every cluster version each rank makes a fresh X25519 key pair (OpenSSL) and the ranks
/// exchange their public keys (an allgather over the job's authenticated connections); every pair of ranks (i, j)
/// derives the same secret from it, and from that secret and a round counter a ChaCha20 key stream, the pair's mask.
/// Rank i adds the masks of pairs (i, j > i) and subtracts those of pairs (i, j < i), modulo 2^32, so every mask
/// appears once with each sign and the integer allreduce of the masked vectors is exactly the sum of the plain ones
/// (integer sums wrap modulo 2^32). Each masked vector is uniformly distributed on its own (one uniform mask
/// suffices), so a worker or an observer of the wire learns nothing from it.
///
/// Dropouts: when a rank is lost during a sum, the sum fails (PeerLostError). After the survivors reconnected (a new
/// cluster version: Peer::reconnect, or ElasticSession's recovery), the next sum runs a new key exchange, so the
/// round is redone with fresh masks; masks of the old version are never used again.
///
/// Not thread safe; collective: every rank calls sum() in the same order.
class SecureAggregator {
 public:
  /// `peer` must outlive the aggregator.
  explicit SecureAggregator(Peer& peer);
  ~SecureAggregator();
  SecureAggregator(const SecureAggregator&) = delete;
  SecureAggregator& operator=(const SecureAggregator&) = delete;

  /// values := the sum over ranks of every rank's values, modulo 2^32. Collective, named like other collectives.
  void sum(std::span<std::int32_t> values, std::string_view name);
  /// What sum() sends: adds this rank's masks of the next round to `values` (runs the key exchange when due, which
  /// is collective). For tests and inspection; a sum() after it uses the following round's masks.
  void mask(std::span<std::int32_t> values);
  /// Masked sums run since the last key exchange.
  std::uint64_t round() const;
  /// Key exchanges run so far (one per cluster version used).
  std::uint64_t key_exchanges() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace aikido
