// RDP accounting of the Poisson-subsampled Gaussian mechanism (include/aikido/privacy.hpp).
//
// For sampling rate q and noise multiplier sigma, one step is (alpha, log(A_alpha) / (alpha - 1))-RDP, where
//   A_alpha = E_{z ~ N(0, sigma^2)} [ ((1 - q) + q exp((2z - 1) / (2 sigma^2)))^alpha ]
// (Mironov, Talwar and Zhang 2019, Theorem 4 / Section 3). Everything below works in log space: A_alpha overflows
// a double long before the orders that matter stop mattering.
#include <aikido/errors.hpp>
#include <aikido/privacy.hpp>
#include <algorithm>
#include <cmath>
#include <limits>

#include "base/error.hpp"

namespace aikido {

using detail::str_cat;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// log(exp(a) + exp(b)).
double log_add(double a, double b) {
  const double lo = std::min(a, b), hi = std::max(a, b);
  if (lo == -kInf) return hi;
  return std::log1p(std::exp(lo - hi)) + hi;
}

// log |binomial(n, k)| for real n (the fractional series uses it past k > n, where the sign alternates).
double log_binomial(double n, double k) { return std::lgamma(n + 1) - std::lgamma(k + 1) - std::lgamma(n - k + 1); }

// log(erfc(x)), accurate where erfc underflows (x above about 26).
double log_erfc(double x) {
  if (x < 25) return std::log(std::erfc(x));
  // Asymptotic series: erfc(x) = exp(-x^2) / (x sqrt(pi)) (1 - 1/(2x^2) + 3/(4x^4) - 15/(8x^6) + ...).
  const double r = 1 / (x * x);
  return -x * x - std::log(x) - 0.5 * std::log(M_PI) + std::log1p(-r / 2 + 3 * r * r / 4 - 15 * r * r * r / 8);
}

// log(A_alpha) for integer alpha: the binomial expansion of ((1 - q) + q e^{...})^alpha, whose k-th term has the
// Gaussian expectation exp((k^2 - k) / (2 sigma^2)).
double log_a_integer(double q, double sigma, long alpha) {
  double log_a = -kInf;
  const double log_q = std::log(q), log_1mq = std::log1p(-q);
  for (long k = 0; k <= alpha; ++k) {
    const double kd = static_cast<double>(k);
    const double term = log_binomial(static_cast<double>(alpha), kd) + kd * log_q +
                        static_cast<double>(alpha - k) * log_1mq + (kd * kd - kd) / (2 * sigma * sigma);
    log_a = log_add(log_a, term);
  }
  return log_a;
}

// A real number kept as its sign and the log of its magnitude, so that series of huge terms of both signs add up.
struct LogSigned {
  bool negative = false;
  double log_abs = -kInf;

  void add(bool term_negative, double log_term) {
    if (log_term == -kInf) return;
    if (log_abs == -kInf) {
      negative = term_negative;
      log_abs = log_term;
    } else if (term_negative == negative) {
      log_abs = log_add(log_abs, log_term);
    } else if (log_term > log_abs) {
      negative = term_negative;
      log_abs = log_term + std::log1p(-std::exp(log_abs - log_term));
    } else if (log_term < log_abs) {
      log_abs = log_abs + std::log1p(-std::exp(log_term - log_abs));
    } else {
      log_abs = -kInf;  // exact cancellation
    }
  }
};

// log(A_alpha) for fractional alpha: the integral split at z0, where the two Gaussians' densities cross
// (Mironov et al. 2019, Section 3.3); on each side ((1 - q) + q e^x)^alpha is expanded in the binomial series that
// converges there, whose coefficients binomial(alpha, i) change sign once i passes alpha. Each part is summed until
// its terms are negligible.
double log_a_fractional(double q, double sigma, double alpha) {
  LogSigned a0, a1;
  const double z0 = sigma * sigma * std::log(1 / q - 1) + 0.5;
  const double log_q = std::log(q), log_1mq = std::log1p(-q);
  double last0 = -kInf, last1 = -kInf;
  bool negative = false;  // the sign of binomial(alpha, i): flips with every factor (alpha - m) below zero
  for (int i = 0; i < 1000; ++i) {
    const double id = i;
    if (i > 0 && alpha - (id - 1) < 0) negative = !negative;
    const double j = alpha - id;
    const double coef = log_binomial(alpha, id);
    const double t0 = coef + id * log_q + j * log_1mq;
    const double t1 = coef + j * log_q + id * log_1mq;
    const double e0 = std::log(0.5) + log_erfc((id - z0) / (std::sqrt(2.0) * sigma));
    const double e1 = std::log(0.5) + log_erfc((z0 - j) / (std::sqrt(2.0) * sigma));
    const double s0 = t0 + (id * id - id) / (2 * sigma * sigma) + e0;
    const double s1 = t1 + (j * j - j) / (2 * sigma * sigma) + e1;
    a0.add(negative, s0);
    a1.add(negative, s1);
    LogSigned total = a0;
    total.add(a1.negative, a1.log_abs);
    if (i > alpha && s0 < last0 && s1 < last1 && std::max(s0, s1) < total.log_abs - 36) {
      return total.negative ? kInf : total.log_abs;  // a negative total would be a numerical failure: no bound
    }
    last0 = s0;
    last1 = s1;
  }
  return kInf;  // did not converge: this order gives no bound (the minimum over orders ignores it)
}

}  // namespace

double subsampled_gaussian_rdp(double q, double sigma, double alpha) {
  if (!(q >= 0 && q <= 1)) throw ConfigError(str_cat("RDP: the sampling rate ", q, " must be in [0, 1]"));
  if (!(sigma >= 0)) throw ConfigError(str_cat("RDP: the noise multiplier ", sigma, " must not be negative"));
  if (!(alpha > 1)) throw ConfigError(str_cat("RDP: the order ", alpha, " must be above 1"));
  if (q == 0) return 0;
  if (std::isinf(alpha) || sigma == 0) return kInf;
  if (q == 1) return alpha / (2 * sigma * sigma);
  const double log_a = alpha == std::floor(alpha) && alpha < 1e6 ? log_a_integer(q, sigma, static_cast<long>(alpha))
                                                                 : log_a_fractional(q, sigma, alpha);
  return log_a / (alpha - 1);
}

std::pair<double, double> epsilon_from_rdp(std::span<const double> orders, std::span<const double> rdp, double delta) {
  if (!(delta > 0 && delta < 1)) throw ConfigError(str_cat("epsilon: delta ", delta, " must be in (0, 1)"));
  if (orders.size() != rdp.size() || orders.empty()) {
    throw ConfigError("epsilon: give one RDP value per order (and at least one order)");
  }
  double best = kInf, best_order = orders[0];
  for (std::size_t i = 0; i < orders.size(); ++i) {
    const double a = orders[i], r = rdp[i];
    double eps;
    if (r < 0 || delta * delta + std::expm1(-r) > 0) {
      eps = 0;  // delta >= sqrt(1 - exp(-KL)) bounds it already
    } else if (a > 1.01) {
      eps = r + std::log1p(-1 / a) - std::log(delta * a) / (a - 1);
    } else {
      eps = kInf;  // the conversion is unstable as alpha -> 1, and useless there
    }
    if (eps < best) {
      best = eps;
      best_order = a;
    }
  }
  return {std::max(0.0, best), best_order};
}

std::vector<double> RdpAccountant::default_orders() {
  std::vector<double> orders;
  for (int x = 1; x < 100; ++x) orders.push_back(1 + x / 10.0);
  for (int a = 12; a < 64; ++a) orders.push_back(a);
  return orders;
}

RdpAccountant::RdpAccountant(std::vector<double> orders) : orders_(std::move(orders)), rdp_(orders_.size(), 0.0) {
  if (orders_.empty()) throw ConfigError("RdpAccountant: give at least one order");
  for (double a : orders_) {
    if (!(a > 1)) throw ConfigError(str_cat("RdpAccountant: order ", a, " must be above 1"));
  }
}

void RdpAccountant::step(double sampling_rate, double noise_multiplier, std::int64_t steps) {
  if (steps < 0) throw ConfigError(str_cat("RdpAccountant::step: ", steps, " steps"));
  if (steps == 0) return;
  if (sampling_rate != cached_rate_ || noise_multiplier != cached_noise_ || cached_.size() != orders_.size()) {
    cached_.resize(orders_.size());
    for (std::size_t i = 0; i < orders_.size(); ++i) {
      cached_[i] = subsampled_gaussian_rdp(sampling_rate, noise_multiplier, orders_[i]);
    }
    cached_rate_ = sampling_rate;
    cached_noise_ = noise_multiplier;
  }
  for (std::size_t i = 0; i < orders_.size(); ++i) rdp_[i] += static_cast<double>(steps) * cached_[i];
  auto it = std::find_if(history_.begin(), history_.end(), [&](const Steps& s) {
    return s.sampling_rate == sampling_rate && s.noise_multiplier == noise_multiplier;
  });
  if (it == history_.end()) {
    history_.push_back({sampling_rate, noise_multiplier, steps});
  } else {
    it->count += steps;
  }
}

double RdpAccountant::epsilon(double delta) const { return epsilon_and_order(delta).first; }

std::pair<double, double> RdpAccountant::epsilon_and_order(double delta) const {
  if (history_.empty()) return {0.0, orders_.front()};
  return epsilon_from_rdp(orders_, rdp_, delta);
}

void RdpAccountant::restore(const std::vector<Steps>& history) {
  std::fill(rdp_.begin(), rdp_.end(), 0.0);
  history_.clear();
  for (const Steps& s : history) step(s.sampling_rate, s.noise_multiplier, s.count);
}

std::int64_t RdpAccountant::steps() const {
  std::int64_t n = 0;
  for (const Steps& s : history_) n += s.count;
  return n;
}

}  // namespace aikido
