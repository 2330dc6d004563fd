// Training metrics: the noise-scale estimator and the export formats (include/aikido/metrics.hpp).
#include <aikido/errors.hpp>
#include <aikido/metrics.hpp>
#include <cstdio>
#include <sstream>
#include <utility>
#include <vector>

namespace aikido {

namespace {

struct Field {
  const char* name;
  const char* help;
  double value;
};

std::vector<Field> numeric_fields(const TrainingMetrics& m) {
  return {
      {"step", "steps completed", static_cast<double>(m.step)},
      {"epoch", "current epoch", static_cast<double>(m.epoch)},
      {"workers", "workers in the cluster", static_cast<double>(m.workers)},
      {"batch_size", "samples per step on each worker", static_cast<double>(m.batch_size)},
      {"global_batch_size", "samples per step on all workers", static_cast<double>(m.global_batch_size)},
      {"lr", "learning rate", m.lr},
      {"noise_scale", "gradient noise scale B_simple", m.noise_scale},
      {"gradient_sq_norm", "moving average of the estimated squared norm of the true gradient", m.gradient_sq_norm},
      {"gradient_noise_trace", "moving average of the estimated trace of the gradient covariance",
       m.gradient_noise_trace},
      {"gradient_variance", "mean squared distance of the workers' gradients from their mean", m.gradient_variance},
      {"snr", "gradient signal-to-noise ratio across workers", m.snr},
      {"samples_per_second", "training throughput of all workers", m.samples_per_second},
      {"step_seconds", "time of one step", m.step_seconds},
      {"compute_seconds", "time of a step outside the optimizer (forward, backward, data)", m.compute_seconds},
      {"communication_seconds", "time from the first gradient collective's start to the last one's end",
       m.communication_seconds},
      {"wait_seconds", "time of a step blocked waiting for communication", m.wait_seconds},
      {"allreduce_bytes_per_second", "gradient bytes allreduced per second of communication",
       m.allreduce_bytes_per_second},
      {"slowest_link_bytes_per_second", "lowest bandwidth measured on any link between two workers",
       m.slowest_link_bytes_per_second},
      {"bytes_sent", "bytes this worker wrote to its connections since its session began",
       static_cast<double>(m.bytes_sent)},
      {"link_matrices_installed", "times the workers installed their measured links, re-planning the collectives",
       static_cast<double>(m.link_matrices_installed)},
      {"epsilon", "differential privacy spent so far (epsilon at the optimizer's delta)", m.epsilon},
      {"local_step_seconds", "this worker's time of its last step", m.local_step_seconds},
      {"local_compute_seconds", "this worker's time outside the optimizer in its last step", m.local_compute_seconds},
      {"local_communication_seconds", "this worker's communication time in its last step",
       m.local_communication_seconds},
      {"local_wait_seconds", "this worker's time blocked on communication in its last step", m.local_wait_seconds},
      {"local_samples_per_second", "this worker's own throughput in its last step", m.local_samples_per_second},
      {"train_loss", "mean training loss of the last step over all workers' samples", m.train_loss},
      {"test_accuracy", "latest test accuracy", m.test_accuracy},
  };
}

std::string number(double v) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.9g", v);
  return buffer;
}

std::string known_or_null(double v) { return TrainingMetrics::known(v) ? number(v) : "null"; }

std::string quoted(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) continue;
    out += c;
  }
  return out + "\"";
}

}  // namespace

std::string to_prometheus(const TrainingMetrics& m, int rank, bool with_help) {
  std::ostringstream os;
  const std::string labels = "{rank=\"" + std::to_string(rank) + "\"}";
  for (const auto& f : numeric_fields(m)) {
    if (!TrainingMetrics::known(f.value)) continue;
    if (with_help) os << "# HELP aikido_" << f.name << " " << f.help << "\n# TYPE aikido_" << f.name << " gauge\n";
    os << "aikido_" << f.name << labels << " " << number(f.value) << "\n";
  }
  if (!m.strategy.empty() || !m.topology.empty()) {
    if (with_help) os << "# HELP aikido_info strategy, topology and compression in use\n# TYPE aikido_info gauge\n";
    os << "aikido_info{rank=\"" << rank << "\",strategy=" << quoted(m.strategy) << ",topology=" << quoted(m.topology);
    if (!m.compression.empty()) os << ",compression=" << quoted(m.compression);
    os << "} 1\n";
  }
  const struct {
    const char* name;
    const char* help;
    double LinkStats::*value;
  } link_fields[] = {
      {"link_latency_seconds", "one-way latency of this worker's link to a peer (half an 8-byte round trip)",
       &LinkStats::latency_seconds},
      {"link_bandwidth_bytes_per_second", "bandwidth of this worker's link to a peer",
       &LinkStats::bandwidth_bytes_per_second},
  };
  for (const auto& f : link_fields) {
    bool first = true;
    for (const LinkStats& link : m.links) {
      if (!TrainingMetrics::known(link.*f.value)) continue;
      if (with_help && first)
        os << "# HELP aikido_" << f.name << " " << f.help << "\n# TYPE aikido_" << f.name << " gauge\n";
      first = false;
      os << "aikido_" << f.name << "{rank=\"" << rank << "\",peer=\"" << link.peer << "\"} " << number(link.*f.value)
         << "\n";
    }
  }
  return os.str();
}

std::string to_json(const TrainingMetrics& m, int rank) {
  std::ostringstream os;
  os << "{\"rank\":" << rank;
  for (const auto& f : numeric_fields(m)) {
    os << ",\"" << f.name << "\":" << known_or_null(f.value);
  }
  os << ",\"strategy\":" << quoted(m.strategy) << ",\"topology\":" << quoted(m.topology)
     << ",\"compression\":" << quoted(m.compression) << ",\"links\":[";
  for (std::size_t i = 0; i < m.links.size(); ++i) {
    const LinkStats& link = m.links[i];
    os << (i ? "," : "") << "{\"peer\":" << link.peer << ",\"latency_seconds\":" << known_or_null(link.latency_seconds)
       << ",\"bandwidth_bytes_per_second\":" << known_or_null(link.bandwidth_bytes_per_second)
       << ",\"probes\":" << link.probes << "}";
  }
  os << "],\"decisions\":[";
  for (std::size_t i = 0; i < m.decisions.size(); ++i) {
    const PolicyDecision& d = m.decisions[i];
    os << (i ? "," : "") << "{\"step\":" << d.step << ",\"policy\":" << quoted(d.policy)
       << ",\"hook\":" << quoted(d.hook) << ",\"setting\":" << quoted(d.setting) << ",\"from\":" << quoted(d.from)
       << ",\"to\":" << quoted(d.to) << ",\"metrics\":{";
    for (std::size_t k = 0; k < d.metrics.size(); ++k) {
      os << (k ? "," : "") << quoted(d.metrics[k].first) << ":" << known_or_null(d.metrics[k].second);
    }
    os << "}}";
  }
  os << "]}";
  return os.str();
}

NoiseScaleEstimator::NoiseScaleEstimator(double smoothing) : smoothing_(smoothing) {
  if (!(smoothing > 0 && smoothing <= 1)) throw ConfigError("NoiseScaleEstimator: smoothing must be in (0, 1]");
}

void NoiseScaleEstimator::update(double b_small, double b_big, double small_sq_norm, double big_sq_norm) {
  if (!(b_small > 0) || !(b_big > b_small) || !std::isfinite(small_sq_norm) || !std::isfinite(big_sq_norm)) return;
  const double g2 = (b_big * big_sq_norm - b_small * small_sq_norm) / (b_big - b_small);
  const double trace = (small_sq_norm - big_sq_norm) / (1.0 / b_small - 1.0 / b_big);
  if (updates_ == 0) {
    g2_ = g2;
    trace_ = trace;
  } else {
    g2_ += smoothing_ * (g2 - g2_);
    trace_ += smoothing_ * (trace - trace_);
  }
  ++updates_;
}

double NoiseScaleEstimator::noise_scale() const {
  if (updates_ == 0 || !(g2_ > 0)) return TrainingMetrics::kUnknown;
  return trace_ / g2_;
}

double NoiseScaleEstimator::gradient_sq_norm() const { return updates_ ? g2_ : TrainingMetrics::kUnknown; }
double NoiseScaleEstimator::noise_trace() const { return updates_ ? trace_ : TrainingMetrics::kUnknown; }

void NoiseScaleEstimator::reset() {
  g2_ = trace_ = 0;
  updates_ = 0;
}

}  // namespace aikido
