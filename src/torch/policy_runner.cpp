// PolicyRunner (include/aikido/torch.hpp): calls the policies' hooks and applies their actions on every worker alike.
#include <aikido/elastic.hpp>
#include <aikido/torch.hpp>
#include <cstring>
#include <map>
#include <optional>
#include <sstream>

#include "base/bytes.hpp"
#include "base/error.hpp"

namespace aikido::torch {

using detail::str_cat;

// The actions requested during one hook call; applied when every policy of the hook has run.
class PolicyRunner::Context : public PolicyContext {
 public:
  Context(const TrainingMetrics& metrics, bool elastic) : metrics_(metrics), elastic_(elastic) {}
  const TrainingMetrics& metrics() const override { return metrics_; }
  void set_batch_size(std::int64_t batch_size) override {
    if (batch_size < 1) throw ConfigError(str_cat("set_batch_size(", batch_size, "): the batch size must be >= 1"));
    batch_size_ = batch_size;
  }
  void set_lr(double lr) override {
    if (!(lr > 0) || !std::isfinite(lr))
      throw ConfigError(str_cat("set_lr(", lr, "): the learning rate must be positive"));
    lr_ = lr;
  }
  void set_strategy(Strategy strategy) override { strategy_ = strategy; }
  void set_compression(Compression compression) override { compression_ = compression; }
  void set_topology(Topology topology) override { topology_ = topology; }
  void request_resize(int workers) override {
    if (!elastic_) {
      throw ConfigError(str_cat("request_resize(", workers,
                                "): resizing needs an elastic job (aikido-run --elastic, an aikido::ElasticSession "
                                "given to PolicyRunner::set_elastic_session)"));
    }
    if (workers < 1) throw ConfigError(str_cat("request_resize(", workers, "): need at least one worker"));
    resize_ = workers;
  }
  void stop(std::string reason) override { stop_ = std::move(reason); }

  bool any() const { return batch_size_ || lr_ || strategy_ || compression_ || topology_ || stop_ || resize_; }
  // Everything requested, as bytes that must be equal on every worker.
  std::string digest(std::int64_t step, const char* hook) const {
    std::string d = str_cat(hook, "@", step, ";");
    if (batch_size_) d += str_cat("batch=", *batch_size_, ";");
    if (lr_) {
      char bits[sizeof(double)];
      std::memcpy(bits, &*lr_, sizeof bits);
      d += "lr=" + std::string(bits, sizeof bits) + ";";
    }
    if (strategy_) d += str_cat("strategy=", strategy_name(*strategy_), ";");
    if (compression_) d += str_cat("compression=", compression_->name(), ";");
    if (topology_) d += str_cat("topology=", topology_name(*topology_), ";");
    if (stop_) d += "stop;";
    if (resize_) d += str_cat("resize=", *resize_, ";");
    return d;
  }

  const TrainingMetrics& metrics_;
  bool elastic_;
  std::optional<int> resize_;
  std::optional<std::int64_t> batch_size_;
  std::optional<double> lr_;
  std::optional<Strategy> strategy_;
  std::optional<Compression> compression_;
  std::optional<Topology> topology_;
  std::optional<std::string> stop_;
};

PolicyRunner::PolicyRunner(DistributedOptimizer& optimizer, std::int64_t batch_size,
                           std::vector<std::unique_ptr<Policy>> policies)
    : optimizer_(optimizer), batch_size_(batch_size), policies_(std::move(policies)) {
  optimizer_.set_batch_size(batch_size);
}

PolicyRunner::~PolicyRunner() = default;

std::vector<std::unique_ptr<Policy>> PolicyRunner::make(const std::vector<std::string>& specs) {
  std::vector<std::unique_ptr<Policy>> policies;
  for (const auto& spec : specs) policies.push_back(make_policy(spec));
  return policies;
}

void PolicyRunner::set_elastic_session(ElasticSession* session) {
  session_ = session;
  if (!session) return;
  session->register_state(
      "aikido.torch/policy-runner",
      [this] {
        detail::ByteWriter w;
        w.put(batch_size_)
            .put(optimizer_.strategy())
            .put(optimizer_.steps())
            .put(stopped_);  // not the topology: the session's
        w.put_string(stop_reason_);
        for (const auto& policy : policies_) w.put_bytes(policy->save_state());
        w.put_string(optimizer_.compression().name());
        return w.take();
      },
      [this](std::span<const std::byte> bytes) {
        detail::ByteReader r(bytes, "PolicyRunner");
        const auto batch = r.get<std::int64_t>();
        const auto strategy = r.get<Strategy>();
        const auto steps = r.get<std::int64_t>();
        const auto stopped = r.get<bool>();
        std::string stop_reason = r.get_string();
        std::vector<std::span<const std::byte>> states;
        for (std::size_t i = 0; i < policies_.size(); ++i) states.push_back(r.get_bytes());
        const Compression compression = Compression::parse(r.get_string());
        r.finish(" (different policies?)");
        for (std::size_t i = 0; i < policies_.size(); ++i) policies_[i]->load_state(states[i]);
        batch_size_ = batch;
        optimizer_.set_batch_size(batch);
        optimizer_.restore_strategy(strategy);
        optimizer_.restore_compression(compression);
        optimizer_.restore_steps(steps);
        stopped_ = stopped;
        stop_reason_ = std::move(stop_reason);
      });
}

void PolicyRunner::before_train() {
  if (session_ && session_->joining()) return;  // the state that the members' before_train() left comes with sync()
  run("before_train", &Policy::before_train);
}

void PolicyRunner::before_epoch(std::int64_t epoch) {
  optimizer_.set_epoch(epoch);
  run("before_epoch", &Policy::before_epoch);
}

void PolicyRunner::after_step() { run("after_step", &Policy::after_step); }
void PolicyRunner::after_epoch() { run("after_epoch", &Policy::after_epoch); }
void PolicyRunner::after_train() { run("after_train", &Policy::after_train); }

namespace {

std::string number_text(double v) {
  std::ostringstream out;
  out << v;
  return out.str();
}

}  // namespace

void PolicyRunner::run(const char* hook, void (Policy::*method)(PolicyContext&)) {
  if (policies_.empty()) return;
  const TrainingMetrics& metrics = optimizer_.metrics();
  Context context(metrics, session_ != nullptr);
  // Which policy asked for each setting (the later request wins, as it is applied).
  std::map<std::string, std::string> asked_by;
  for (auto& policy : policies_) {
    const std::string before = context.digest(metrics.step, hook);
    const auto batch = context.batch_size_;
    const auto lr = context.lr_;
    const auto strategy = context.strategy_;
    const auto topology = context.topology_;
    const auto resize = context.resize_;
    const auto stop = context.stop_;
    try {
      ((*policy).*method)(context);
    } catch (const std::exception& e) {
      throw Error(str_cat("policy '", policy->name(), "' failed in ", hook, " at step ", metrics.step, ": ", e.what()));
    }
    if (context.digest(metrics.step, hook) == before) continue;
    if (context.batch_size_ != batch) asked_by["batch_size"] = policy->name();
    if (context.lr_ != lr) asked_by["lr"] = policy->name();
    if (context.strategy_ != strategy) asked_by["strategy"] = policy->name();
    if (context.topology_ != topology) asked_by["topology"] = policy->name();
    if (context.resize_ != resize) asked_by["workers"] = policy->name();
    if (context.stop_ != stop) asked_by["stop"] = policy->name();
  }
  if (!context.any()) return;
  Peer& peer = optimizer_.peer();
  const std::string digest = context.digest(metrics.step, hook);
  if (!peer.consensus(std::span<const std::byte>(reinterpret_cast<const std::byte*>(digest.data()), digest.size()),
                      "aikido.torch/policy")) {
    throw MismatchError(str_cat("policies decided differently on different workers in ", hook, " at step ",
                                metrics.step, " (policies must decide from the metrics only)"));
  }
  // What changes, from what to what, on which metric values: the decisions the dashboard and the timeline show.
  const auto decide = [&](const std::string& setting, const std::string& from, const std::string& to) {
    if (from == to) return;
    PolicyDecision d;
    d.step = metrics.step;
    d.policy = asked_by.count(setting) ? asked_by[setting] : "policy";
    d.hook = hook;
    d.setting = setting;
    d.from = from;
    d.to = to;
    d.metrics = {{"noise_scale", metrics.noise_scale},
                 {"gradient_variance", metrics.gradient_variance},
                 {"snr", metrics.snr},
                 {"samples_per_second", metrics.samples_per_second},
                 {"train_loss", metrics.train_loss},
                 {"step_seconds", metrics.step_seconds}};
    optimizer_.record_decision(std::move(d));
  };
  if (context.batch_size_) decide("batch_size", std::to_string(batch_size_), std::to_string(*context.batch_size_));
  if (context.lr_) decide("lr", number_text(optimizer_.lr()), number_text(*context.lr_));
  if (context.strategy_) decide("strategy", strategy_name(optimizer_.strategy()), strategy_name(*context.strategy_));
  if (context.topology_) decide("topology", topology_name(peer.topology()), topology_name(*context.topology_));
  if (context.resize_) decide("workers", std::to_string(peer.size()), std::to_string(*context.resize_));
  if (context.stop_) decide("stop", "training", "stopped: " + *context.stop_);
  if (context.batch_size_) {
    batch_size_ = *context.batch_size_;
    optimizer_.set_batch_size(batch_size_);
  }
  if (context.lr_) optimizer_.set_lr(*context.lr_);
  if (context.strategy_ && *context.strategy_ != optimizer_.strategy()) optimizer_.set_strategy(*context.strategy_);
  if (context.compression_ && !(*context.compression_ == optimizer_.compression())) {
    optimizer_.set_compression(*context.compression_);
  }
  if (context.topology_ && *context.topology_ != peer.topology()) peer.set_topology(*context.topology_);
  // One proposal for the cluster; every worker applies it at its next ElasticSession::sync().
  if (context.resize_ && *context.resize_ != peer.size() && peer.rank() == 0)
    session_->request_resize(*context.resize_, "policy " + asked_by["workers"]);
  if (context.stop_) {
    stopped_ = true;
    stop_reason_ = *context.stop_;
  }
}

}  // namespace aikido::torch
