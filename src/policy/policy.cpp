// Policy registry, spec parsing and the built-in policies (include/aikido/policy.hpp).
//
// Built-in policies:
//   adaptive-batch   grows the global batch toward the measured gradient noise scale and scales the learning rate
//   strategy-switch  switches the synchronisation strategy at a step, an epoch or a noise-scale trigger; moves to
//                    another topology when the measured allreduce throughput collapses (interference)
//   schedule         changes learning rate, batch size, strategy or topology at given steps or epochs
//   adaptive-compression
//                    picks the compression of what the optimizer exchanges from the measured link bandwidth and the
//                    step's communication share
#include <aikido/errors.hpp>
#include <aikido/policy.hpp>
#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "base/bytes.hpp"
#include "base/error.hpp"

namespace aikido {

using detail::str_cat;

const char* strategy_name(Strategy strategy) {
  switch (strategy) {
    case Strategy::synchronous_sgd:
      return "synchronous_sgd";
    case Strategy::synchronous_averaging:
      return "synchronous_averaging";
    case Strategy::pair_averaging:
      return "pair_averaging";
    case Strategy::local_sgd:
      return "local_sgd";
    case Strategy::federated_averaging:
      return "federated_averaging";
    case Strategy::diloco:
      return "diloco";
  }
  return "unknown";
}

Strategy parse_strategy(std::string_view name) {
  if (name == "ssgd" || name == "synchronous_sgd") return Strategy::synchronous_sgd;
  if (name == "sma" || name == "synchronous_averaging") return Strategy::synchronous_averaging;
  if (name == "pair" || name == "pair_averaging") return Strategy::pair_averaging;
  if (name == "local_sgd") return Strategy::local_sgd;
  if (name == "fedavg" || name == "federated_averaging") return Strategy::federated_averaging;
  if (name == "diloco") return Strategy::diloco;
  throw ConfigError(str_cat("unknown strategy '", name,
                            "': use ssgd (synchronous_sgd), sma (synchronous_averaging), pair (pair_averaging), "
                            "local_sgd, fedavg (federated_averaging) or diloco"));
}

bool is_round_strategy(Strategy strategy) {
  return strategy == Strategy::local_sgd || strategy == Strategy::federated_averaging || strategy == Strategy::diloco;
}

void PolicyContext::set_compression(Compression compression) {
  throw ConfigError(str_cat("set_compression(", compression.name(), "): this policy runner cannot change compression"));
}

// ---------------------------------------------------------------------------------------------------------------
// Options and specs

namespace {

const std::string* find_option(const PolicyOptions& options, const std::string& key) {
  auto it = options.find(key);
  return it == options.end() ? nullptr : &it->second;
}

}  // namespace

double option_double(const PolicyOptions& options, const std::string& key, double fallback) {
  const std::string* v = find_option(options, key);
  if (v == nullptr) return fallback;
  try {
    std::size_t used = 0;
    const double d = std::stod(*v, &used);
    if (used == v->size() && std::isfinite(d)) return d;
  } catch (const std::exception&) {
  }
  throw ConfigError(str_cat("policy option ", key, "='", *v, "' is not a number"));
}

std::int64_t option_int(const PolicyOptions& options, const std::string& key, std::int64_t fallback) {
  const std::string* v = find_option(options, key);
  if (v == nullptr) return fallback;
  try {
    std::size_t used = 0;
    const long long i = std::stoll(*v, &used);
    if (used == v->size()) return i;
  } catch (const std::exception&) {
  }
  throw ConfigError(str_cat("policy option ", key, "='", *v, "' is not an integer"));
}

std::string option_string(const PolicyOptions& options, const std::string& key, const std::string& fallback) {
  const std::string* v = find_option(options, key);
  return v == nullptr ? fallback : *v;
}

PolicySpec PolicySpec::parse(std::string_view spec) {
  PolicySpec result;
  const auto colon = spec.find(':');
  result.name = std::string(spec.substr(0, colon));
  if (result.name.empty()) throw ConfigError(str_cat("policy spec '", spec, "' has no name: use NAME[:key=value,...]"));
  if (colon == std::string_view::npos) return result;
  std::string_view rest = spec.substr(colon + 1);
  while (!rest.empty()) {
    const auto comma = rest.find(',');
    const std::string_view item = rest.substr(0, comma);
    const auto eq = item.find('=');
    if (eq == std::string_view::npos || eq == 0) {
      throw ConfigError(str_cat("policy spec '", spec, "': '", item, "' is not key=value"));
    }
    result.options[std::string(item.substr(0, eq))] = std::string(item.substr(eq + 1));
    if (comma == std::string_view::npos) break;
    rest.remove_prefix(comma + 1);
  }
  return result;
}

// ---------------------------------------------------------------------------------------------------------------
// Registry

namespace {

struct Registry {
  std::mutex mutex;
  std::map<std::string, PolicyFactory> factories;
};

Registry& registry();

void require_known_keys(const std::string& policy, const PolicyOptions& options,
                        std::initializer_list<const char*> known) {
  for (const auto& option : options) {
    const std::string& key = option.first;  // a plain reference: clang 14 cannot capture structured bindings
    if (std::find_if(known.begin(), known.end(), [&](const char* k) { return key == k; }) == known.end()) {
      std::string list;
      for (const char* k : known) list += str_cat(list.empty() ? "" : ", ", k);
      throw ConfigError(str_cat("policy ", policy, ": unknown option '", key, "' (known: ", list, ")"));
    }
  }
}

std::int64_t round_to_power_of_two(double x) {
  if (!(x >= 1)) return 1;
  return std::int64_t(1) << static_cast<int>(std::lround(std::log2(x)));
}

// adaptive-batch: every `interval` steps after `warmup`, moves the per-worker batch toward scale * noise_scale /
// workers (rounded to a power of two, within [min, max], growing only and at most doubling per decision) and sets the
// learning rate by `rule`: linear (lr0 * B / B0), sqrt (lr0 * sqrt(B / B0)) or adascale (lr0 times AdaScale's
// gain ratio (s2 + g2) / (s2 / S + g2), S = B / B0, s2 the gradient variance at batch B0, g2 = |G|^2).
//
// With min_speedup > 0 a doubling is a trial: at the next decision, the throughput measured at the new batch (mean
// samples/s of the steps since the change, the first kSettleSteps left out) must be at least min_speedup times the
// one measured at the old batch, or the batch and learning rate go back and that batch is not tried again. Where the
// hardware gives no more samples/s for a larger batch (a model bound by compute), growing only costs progress per
// sample. The throughput is reduced across workers, so every worker takes the same decision.
class AdaptiveBatch : public Policy {
 public:
  explicit AdaptiveBatch(const PolicyOptions& o)
      : min_(option_int(o, "min", 0)),
        max_(option_int(o, "max", 1024)),
        interval_(option_int(o, "interval", 50)),
        warmup_(option_int(o, "warmup", 50)),
        rule_(option_string(o, "rule", "sqrt")),
        scale_(option_double(o, "scale", 1.0)),
        min_speedup_(option_double(o, "min_speedup", 0.0)) {
    require_known_keys("adaptive-batch", o, {"min", "max", "interval", "warmup", "rule", "scale", "min_speedup"});
    if (rule_ != "linear" && rule_ != "sqrt" && rule_ != "adascale") {
      throw ConfigError(str_cat("policy adaptive-batch: rule '", rule_, "' is not linear, sqrt or adascale"));
    }
    if (max_ < 1 || min_ < 0 || (min_ > 0 && min_ > max_) || interval_ < 1 || warmup_ < 0 ||
        !(scale_ > 0 && std::isfinite(scale_))) {
      throw ConfigError("policy adaptive-batch: need 1 <= min <= max, interval >= 1, warmup >= 0, scale > 0");
    }
    if (!(min_speedup_ >= 0 && std::isfinite(min_speedup_))) {
      throw ConfigError("policy adaptive-batch: min_speedup must be 0 (off) or a positive factor such as 1.1");
    }
    if (min_speedup_ > 0 && interval_ <= kSettleSteps) {
      throw ConfigError(str_cat("policy adaptive-batch: min_speedup needs interval > ", kSettleSteps,
                                " (the throughput of a new batch is measured between two decisions)"));
    }
  }
  std::string name() const override { return "adaptive-batch"; }

  std::vector<std::byte> save_state() const override {
    detail::ByteWriter w;
    w.put(min_)
        .put(base_batch_)
        .put(base_lr_)
        .put(measured_batch_)
        .put(steps_at_batch_)
        .put(trial_from_)
        .put(trial_to_);
    w.put(std::uint64_t(throughput_.size()));
    for (const auto& [batch, sum_count] : throughput_) w.put(batch).put(sum_count.first).put(sum_count.second);
    w.put(std::uint64_t(refused_.size()));
    for (std::int64_t batch : refused_) w.put(batch);
    return w.take();
  }
  void load_state(std::span<const std::byte> state) override {
    detail::ByteReader r(state, "policy adaptive-batch");
    min_ = r.get<std::int64_t>();
    base_batch_ = r.get<std::int64_t>();
    base_lr_ = r.get<double>();
    measured_batch_ = r.get<std::int64_t>();
    steps_at_batch_ = r.get<int>();
    trial_from_ = r.get<std::int64_t>();
    trial_to_ = r.get<std::int64_t>();
    throughput_.clear();
    for (auto n = r.get<std::uint64_t>(); n > 0; --n) {
      const auto batch = r.get<std::int64_t>();
      const auto sum = r.get<double>();
      throughput_[batch] = {sum, r.get<int>()};
    }
    refused_.clear();
    for (auto n = r.get<std::uint64_t>(); n > 0; --n) refused_.push_back(r.get<std::int64_t>());
    r.finish();
  }

  void before_train(PolicyContext& c) override {
    base_batch_ = c.metrics().batch_size;
    base_lr_ = c.metrics().lr;
    if (min_ == 0) min_ = base_batch_;
  }

  void after_step(PolicyContext& c) override {
    const TrainingMetrics& m = c.metrics();
    record_throughput(m);
    if (m.step < warmup_ || m.step % interval_ != 0 || !TrainingMetrics::known(m.noise_scale)) return;
    const std::int64_t current = m.batch_size;
    if (trial_from_ > 0) {
      if (current != trial_to_) {
        trial_from_ = 0;  // the batch changed by other means: no verdict
      } else {
        const auto now = mean_throughput(current), before = mean_throughput(trial_from_);
        if (!now || !before) return;  // not measured yet: the verdict waits for the next decision
        const std::int64_t from = trial_from_;
        trial_from_ = 0;
        if (*now < min_speedup_ * *before) {
          refused_.push_back(current);
          c.set_batch_size(from);
          set_lr(c, m, from, current);
          return;
        }
      }
    }
    std::int64_t target = round_to_power_of_two(scale_ * m.noise_scale / std::max(1, m.workers));
    target = std::clamp(target, std::max<std::int64_t>(1, min_), max_);
    target = std::min(target, current * 2);
    std::int64_t next = std::max(target, current);
    if (next != current && min_speedup_ > 0) {
      if (std::find(refused_.begin(), refused_.end(), next) != refused_.end()) {
        next = current;
      } else {
        trial_from_ = current;
        trial_to_ = next;
      }
    }
    if (next != current) c.set_batch_size(next);
    set_lr(c, m, next, current);
  }

 private:
  static constexpr int kSettleSteps = 5;  // steps after a batch change whose throughput is not counted

  void set_lr(PolicyContext& c, const TrainingMetrics& m, std::int64_t next, std::int64_t current) const {
    const double scale = static_cast<double>(next) / static_cast<double>(base_batch_);
    if (!TrainingMetrics::known(base_lr_)) return;
    if (rule_ == "linear") {
      if (next != current) c.set_lr(base_lr_ * scale);
    } else if (rule_ == "sqrt") {
      if (next != current) c.set_lr(base_lr_ * std::sqrt(scale));
    } else if (TrainingMetrics::known(m.gradient_noise_trace) && TrainingMetrics::known(m.gradient_sq_norm) &&
               m.gradient_sq_norm > 0) {
      const double s2 = m.gradient_noise_trace / static_cast<double>(base_batch_ * std::max(1, m.workers));
      const double gain = (s2 + m.gradient_sq_norm) / (s2 / scale + m.gradient_sq_norm);
      c.set_lr(base_lr_ * std::clamp(gain, 1.0, scale));
    }
  }

  void record_throughput(const TrainingMetrics& m) {
    if (min_speedup_ <= 0) return;
    if (m.batch_size != measured_batch_) {
      measured_batch_ = m.batch_size;
      steps_at_batch_ = 0;
    }
    if (++steps_at_batch_ <= kSettleSteps || !TrainingMetrics::known(m.samples_per_second)) return;
    auto& [sum, n] = throughput_[m.batch_size];
    sum += m.samples_per_second;
    ++n;
  }

  std::optional<double> mean_throughput(std::int64_t batch) const {
    const auto it = throughput_.find(batch);
    if (it == throughput_.end() || it->second.second < 3) return std::nullopt;
    return it->second.first / it->second.second;
  }

  std::int64_t min_, max_, interval_, warmup_;
  std::string rule_;
  double scale_, min_speedup_;
  std::int64_t base_batch_ = 1;
  double base_lr_ = TrainingMetrics::kUnknown;
  // min_speedup: samples/s (sum, count) per per-worker batch; the doubling on trial; batches that did not pay.
  std::map<std::int64_t, std::pair<double, int>> throughput_;
  std::int64_t measured_batch_ = -1;
  int steps_at_batch_ = 0;
  std::int64_t trial_from_ = 0, trial_to_ = 0;
  std::vector<std::int64_t> refused_;
};

// strategy-switch: switches to `to` (default ssgd) once, at `step`, at the start of `epoch`, or when the noise scale
// reaches `noise_scale`. With `fallback_topology`, also watches the allreduce throughput: its mean over the first
// `reference_steps` measured steps is the reference, and after `patience` consecutive steps below `min_fraction`
// of it the topology switches to the fallback (once; KungFu's interference policy).
class StrategySwitch : public Policy {
 public:
  explicit StrategySwitch(const PolicyOptions& o)
      : to_(parse_strategy(option_string(o, "to", "ssgd"))),
        step_(option_int(o, "step", -1)),
        epoch_(option_int(o, "epoch", -1)),
        noise_scale_(option_double(o, "noise_scale", -1)),
        min_fraction_(option_double(o, "min_fraction", 0.5)),
        reference_steps_(option_int(o, "reference_steps", 20)),
        patience_(option_int(o, "patience", 10)) {
    require_known_keys(
        "strategy-switch", o,
        {"to", "step", "epoch", "noise_scale", "fallback_topology", "min_fraction", "reference_steps", "patience"});
    if (const auto t = option_string(o, "fallback_topology", ""); !t.empty()) fallback_ = parse_topology(t);
    if (step_ < 0 && epoch_ < 0 && noise_scale_ < 0 && !fallback_) {
      throw ConfigError(
          "policy strategy-switch needs a trigger: step=N, epoch=N, noise_scale=X or fallback_topology=T");
    }
  }
  std::string name() const override { return "strategy-switch"; }

  std::vector<std::byte> save_state() const override {
    return detail::ByteWriter().put(switched_).put(moved_).put(reference_).put(measured_).put(below_).take();
  }
  void load_state(std::span<const std::byte> state) override {
    detail::ByteReader r(state, "policy strategy-switch");
    switched_ = r.get<bool>();
    moved_ = r.get<bool>();
    reference_ = r.get<double>();
    measured_ = r.get<std::int64_t>();
    below_ = r.get<std::int64_t>();
    r.finish();
  }

  void before_epoch(PolicyContext& c) override {
    if (!switched_ && epoch_ >= 0 && c.metrics().epoch >= epoch_) switch_now(c);
  }

  void after_step(PolicyContext& c) override {
    const TrainingMetrics& m = c.metrics();
    if (!switched_ && ((step_ >= 0 && m.step >= step_) ||
                       (noise_scale_ >= 0 && TrainingMetrics::known(m.noise_scale) && m.noise_scale >= noise_scale_))) {
      switch_now(c);
    }
    if (fallback_ && !moved_ && TrainingMetrics::known(m.allreduce_bytes_per_second)) {
      if (measured_ < reference_steps_) {
        reference_ += m.allreduce_bytes_per_second / static_cast<double>(reference_steps_);
        ++measured_;
      } else if (m.allreduce_bytes_per_second < min_fraction_ * reference_) {
        if (++below_ >= patience_) {
          c.set_topology(*fallback_);
          moved_ = true;
        }
      } else {
        below_ = 0;
      }
    }
  }

 private:
  void switch_now(PolicyContext& c) {
    c.set_strategy(to_);
    switched_ = true;
  }
  Strategy to_;
  std::int64_t step_, epoch_;
  double noise_scale_, min_fraction_;
  std::int64_t reference_steps_, patience_;
  std::optional<Topology> fallback_;
  bool switched_ = false, moved_ = false;
  double reference_ = 0;
  std::int64_t measured_ = 0, below_ = 0;
};

// schedule: options "<action>@<step|epoch><N>=<value>", for example lr@epoch2=0.01, batch@step500=128,
// strategy@epoch1=ssgd, compression@step200=fp16, topology@step100=tree, workers@step300=4, stop@epoch5=1. Epoch
// triggers act when that epoch starts, step triggers after that step.
class Schedule : public Policy {
 public:
  explicit Schedule(const PolicyOptions& o) {
    for (const auto& [key, value] : o) {
      const auto at = key.find('@');
      Change change;
      change.action = key.substr(0, at);
      const std::string when = at == std::string::npos ? "" : key.substr(at + 1);
      const auto digits = when.find_first_of("0123456789");
      const std::string unit = when.substr(0, digits);
      if (at == std::string::npos || digits == std::string::npos || (unit != "step" && unit != "epoch")) {
        throw ConfigError(str_cat("policy schedule: '", key, "' is not ACTION@stepN or ACTION@epochN"));
      }
      change.by_epoch = unit == "epoch";
      change.at = option_int({{key, when.substr(digits)}}, key, 0);
      change.value = value;
      if (change.action == "lr") {
        option_double({{key, value}}, key, 0);
      } else if (change.action == "batch") {
        if (option_int({{key, value}}, key, 0) < 1)
          throw ConfigError(str_cat("policy schedule: ", key, " must be >= 1"));
      } else if (change.action == "strategy") {
        parse_strategy(value);
      } else if (change.action == "topology") {
        parse_topology(value);
      } else if (change.action == "compression") {
        Compression::parse(value);
      } else if (change.action == "workers") {
        if (option_int({{key, value}}, key, 0) < 1)
          throw ConfigError(str_cat("policy schedule: ", key, " must be >= 1"));
      } else if (change.action != "stop") {
        throw ConfigError(str_cat("policy schedule: unknown action '", change.action,
                                  "' (known: lr, batch, strategy, compression, topology, workers, stop)"));
      }
      changes_.push_back(change);
    }
    if (changes_.empty()) throw ConfigError("policy schedule needs at least one change, e.g. schedule:lr@epoch2=0.01");
  }
  std::string name() const override { return "schedule"; }
  void before_epoch(PolicyContext& c) override { apply(c, true, c.metrics().epoch); }
  void after_step(PolicyContext& c) override { apply(c, false, c.metrics().step); }

 private:
  struct Change {
    std::string action, value;
    bool by_epoch = false;
    std::int64_t at = 0;
  };
  void apply(PolicyContext& c, bool by_epoch, std::int64_t now) {
    for (const auto& ch : changes_) {
      if (ch.by_epoch != by_epoch || ch.at != now) continue;
      if (ch.action == "lr") c.set_lr(std::stod(ch.value));
      if (ch.action == "batch") c.set_batch_size(std::stoll(ch.value));
      if (ch.action == "strategy") c.set_strategy(parse_strategy(ch.value));
      if (ch.action == "topology") c.set_topology(parse_topology(ch.value));
      if (ch.action == "compression") c.set_compression(Compression::parse(ch.value));
      if (ch.action == "workers") c.request_resize(static_cast<int>(std::stoll(ch.value)));
      if (ch.action == "stop") c.stop(str_cat("schedule: stop at ", by_epoch ? "epoch " : "step ", now));
    }
  }
  std::vector<Change> changes_;
};

// adaptive-compression: every `interval` steps after `warmup`, looks at the step's communication share (reduced
// communication_seconds / step_seconds) and moves along a ladder of compressions, least compressing first
// (default none/fp16/powersgd:4/topk:0.01; '/' separates levels). Above `high` it predicts each higher level's share
// from the slowest measured link (bytes of a ring allreduce of the gradients times the level's wire ratio, over the
// bandwidth, against the measured compute time) and takes the first level predicted at or below `high`, the last
// level if none is; without a bandwidth measurement it climbs one level. Below `low` for `patience` decisions in a
// row it goes one level down, if that level is predicted at or below `high` (or, unmeasured, at once). Every input is
// reduced across workers, so every worker takes the same decision.
class AdaptiveCompression : public Policy {
 public:
  explicit AdaptiveCompression(const PolicyOptions& o)
      : high_(option_double(o, "high", 0.3)),
        low_(option_double(o, "low", 0.1)),
        interval_(option_int(o, "interval", 20)),
        warmup_(option_int(o, "warmup", 20)),
        patience_(option_int(o, "patience", 3)) {
    require_known_keys("adaptive-compression", o, {"high", "low", "interval", "warmup", "patience", "ladder"});
    std::string ladder = option_string(o, "ladder", "none/fp16/powersgd:4/topk:0.01");
    while (!ladder.empty()) {
      const auto slash = ladder.find('/');
      ladder_.push_back(Compression::parse(ladder.substr(0, slash)));
      if (slash == std::string::npos) break;
      ladder = ladder.substr(slash + 1);
    }
    if (ladder_.size() < 2) {
      throw ConfigError("policy adaptive-compression: the ladder needs at least two levels, e.g. ladder=none/fp16");
    }
    if (!(low_ >= 0 && low_ < high_ && high_ < 1) || interval_ < 1 || warmup_ < 0 || patience_ < 1) {
      throw ConfigError(
          "policy adaptive-compression: need 0 <= low < high < 1, interval >= 1, warmup >= 0, patience >= 1");
    }
  }
  std::string name() const override { return "adaptive-compression"; }

  std::vector<std::byte> save_state() const override { return detail::ByteWriter().put(below_).take(); }
  void load_state(std::span<const std::byte> state) override {
    detail::ByteReader r(state, "policy adaptive-compression");
    below_ = r.get<std::int64_t>();
    r.finish();
  }

  void after_step(PolicyContext& c) override {
    const TrainingMetrics& m = c.metrics();
    if (m.step < warmup_ || m.step % interval_ != 0) return;
    if (!TrainingMetrics::known(m.communication_seconds) || !TrainingMetrics::known(m.step_seconds) ||
        !(m.step_seconds > 0)) {
      return;
    }
    const std::size_t current = level_of(m.compression);
    const double share = m.communication_seconds / m.step_seconds;
    if (share > high_) {
      below_ = 0;
      std::size_t next = current;
      for (std::size_t l = current + 1; l < ladder_.size(); ++l) {
        next = l;
        const auto predicted = predicted_share(m, l);
        if (!predicted || *predicted <= high_) break;
      }
      if (next != current) c.set_compression(ladder_[next]);
    } else if (share < low_ && current > 0) {
      if (++below_ < patience_) return;
      below_ = 0;
      const auto predicted = predicted_share(m, current - 1);
      if (!predicted || *predicted <= high_) c.set_compression(ladder_[current - 1]);
    } else {
      below_ = 0;
    }
  }

 private:
  // The ladder level in force: the one whose name the metrics report (a level set by other means: the first).
  std::size_t level_of(const std::string& name) const {
    for (std::size_t l = 0; l < ladder_.size(); ++l) {
      if (ladder_[l].name() == name) return l;
    }
    return 0;
  }

  // The communication share level `l` would have: gradient bytes (allreduce throughput x communication time) as a
  // ring allreduce over the slowest link, scaled by the level's wire ratio, against the compute time.
  std::optional<double> predicted_share(const TrainingMetrics& m, std::size_t l) const {
    if (!TrainingMetrics::known(m.slowest_link_bytes_per_second) || !(m.slowest_link_bytes_per_second > 0) ||
        !TrainingMetrics::known(m.allreduce_bytes_per_second) || !TrainingMetrics::known(m.compute_seconds)) {
      return std::nullopt;
    }
    const double gradient_bytes = m.allreduce_bytes_per_second * m.communication_seconds;
    const double n = std::max(2, m.workers);
    const auto count = static_cast<std::int64_t>(gradient_bytes / 4);
    const double seconds =
        ladder_[l].wire_ratio(m.workers, count) * 2 * (n - 1) / n * gradient_bytes / m.slowest_link_bytes_per_second;
    return seconds / (seconds + std::max(m.compute_seconds, 1e-9));
  }

  double high_, low_;
  std::int64_t interval_, warmup_, patience_;
  std::vector<Compression> ladder_;
  std::int64_t below_ = 0;
};

Registry& registry() {
  static Registry* r = [] {
    auto* reg = new Registry;
    reg->factories["adaptive-batch"] = [](const PolicyOptions& o) { return std::make_unique<AdaptiveBatch>(o); };
    reg->factories["strategy-switch"] = [](const PolicyOptions& o) { return std::make_unique<StrategySwitch>(o); };
    reg->factories["schedule"] = [](const PolicyOptions& o) { return std::make_unique<Schedule>(o); };
    reg->factories["adaptive-compression"] = [](const PolicyOptions& o) {
      return std::make_unique<AdaptiveCompression>(o);
    };
    return reg;
  }();
  return *r;
}

}  // namespace

void register_policy(const std::string& name, PolicyFactory factory) {
  if (name.empty() || name.find_first_of(":,=") != std::string::npos) {
    throw ConfigError(str_cat("policy name '", name, "' must be non-empty without ':', ',' or '='"));
  }
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.factories[name] = std::move(factory);
}

std::vector<std::string> policy_names() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  std::vector<std::string> names;
  for (const auto& [name, factory] : r.factories) names.push_back(name);
  return names;
}

std::unique_ptr<Policy> make_policy(std::string_view spec) {
  const PolicySpec parsed = PolicySpec::parse(spec);
  PolicyFactory factory;
  {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.factories.find(parsed.name);
    if (it != r.factories.end()) factory = it->second;
  }
  if (!factory) {
    std::string known;
    for (const auto& n : policy_names()) known += str_cat(known.empty() ? "" : ", ", n);
    throw ConfigError(str_cat("unknown policy '", parsed.name, "' (known: ", known, ")"));
  }
  auto policy = factory(parsed.options);
  if (!policy) throw ConfigError(str_cat("policy '", parsed.name, "': its factory returned nothing"));
  return policy;
}

}  // namespace aikido
