// Adaptation policies: user code (and built-in policies) that read training metrics and act during training.
//
// A policy is a class with hooks. A runner (aikido::torch::PolicyRunner in the LibTorch integration) calls them
// at fixed points of the training loop on every worker, with a context holding the metrics, which are reduced
// across workers so that all workers see the same numbers at the same step, and the actions. Policies must decide
// from the metrics only (never from the rank, the clock or a private random source), so that every worker takes
// the same decision at the same step; the runner checks this by consensus before it applies any change
// (MismatchError otherwise).
//
//   class Warmup : public aikido::Policy {
//    public:
//     explicit Warmup(const aikido::PolicyOptions& o) : steps_(aikido::option_int(o, "steps", 100)) {}
//     void after_step(aikido::PolicyContext& c) override {
//       if (c.metrics().step <= steps_) c.set_lr(0.1 * c.metrics().step / steps_);
//     }
//    private:
//     std::int64_t steps_;
//   };
//   static aikido::PolicyRegistration warmup("warmup", [](const aikido::PolicyOptions& o) {
//     return std::make_unique<Warmup>(o);
//   });   // now `--policy warmup:steps=200` makes one
#pragma once

#include <aikido/compression.hpp>
#include <aikido/metrics.hpp>
#include <aikido/types.hpp>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace aikido {

/// How the workers of a distributed optimizer keep their models together (see aikido/torch.hpp).
enum class Strategy : std::uint8_t {
  synchronous_sgd,        // gradients averaged before every step
  synchronous_averaging,  // local step, then models averaged (SMA)
  pair_averaging,         // local step, then averaging with one random peer's model, asynchronously (AD-PSGD)
  local_sgd,              // K local steps, then the models' updates averaged
  federated_averaging,    // FedAvg: K local steps on each worker's own data, updates averaged by sample counts
  diloco,                 // DiLoCo: K inner steps, then an outer Nesterov step on the averaged pseudo-gradient
};
/// "synchronous_sgd", "synchronous_averaging", "pair_averaging", "local_sgd", "federated_averaging" or "diloco".
const char* strategy_name(Strategy strategy);
/// Accepts the full names and the short ones: "ssgd", "sma", "pair", "fedavg". ConfigError otherwise.
Strategy parse_strategy(std::string_view name);
/// True for the strategies that average in rounds of local steps: local_sgd, federated_averaging and diloco.
bool is_round_strategy(Strategy strategy);

/// What a hook sees and can do. Actions take effect when the hook returns (after every policy of that hook ran; of
/// two requests of the same kind, the later wins), identically on every worker.
class PolicyContext {
 public:
  virtual ~PolicyContext() = default;
  virtual const TrainingMetrics& metrics() const = 0;
  /// Per-worker batch size from the next step on (>= 1).
  virtual void set_batch_size(std::int64_t batch_size) = 0;
  virtual void set_lr(double lr) = 0;
  virtual void set_strategy(Strategy strategy) = 0;
  virtual void set_topology(Topology topology) = 0;
  /// Compression of what the optimizer exchanges (aikido/compression.hpp), from the next step on. The default
  /// throws ConfigError: runners that cannot apply it keep it (the LibTorch PolicyRunner applies it).
  virtual void set_compression(Compression compression);
  /// Asks for a cluster of `workers` workers: applied at the next step boundary of an elastic job; ConfigError in a
  /// job that is not elastic.
  virtual void request_resize(int workers) = 0;
  /// Ends training after this hook; `reason` is reported.
  virtual void stop(std::string reason) = 0;
};

class Policy {
 public:
  virtual ~Policy() = default;
  /// Name for messages (the registered name for built-in and registered policies).
  virtual std::string name() const { return "policy"; }
  virtual void before_train(PolicyContext&) {}
  virtual void before_epoch(PolicyContext&) {}
  virtual void after_step(PolicyContext&) {}
  virtual void after_epoch(PolicyContext&) {}
  virtual void after_train(PolicyContext&) {}
  /// The state this policy's decisions depend on, for elastic jobs: the runner registers it with the session, so a
  /// worker that joins receives rank 0's and a recovery rolls it back with the model. Stateless policies (those that
  /// decide from the metrics alone) keep the defaults. load_state gets exactly what save_state returned.
  virtual std::vector<std::byte> save_state() const { return {}; }
  virtual void load_state(std::span<const std::byte> /*state*/) {}
};

/// key=value options of a policy spec.
using PolicyOptions = std::map<std::string, std::string>;
/// Typed access to options with a default; ConfigError naming the key when a value does not parse.
double option_double(const PolicyOptions& options, const std::string& key, double fallback);
std::int64_t option_int(const PolicyOptions& options, const std::string& key, std::int64_t fallback);
std::string option_string(const PolicyOptions& options, const std::string& key, const std::string& fallback);

/// "NAME" or "NAME:key=value,key=value". ConfigError for a malformed spec.
struct PolicySpec {
  std::string name;
  PolicyOptions options;
  static PolicySpec parse(std::string_view spec);
};

using PolicyFactory = std::function<std::unique_ptr<Policy>(const PolicyOptions& options)>;
/// Makes `name` available to make_policy (and so to --policy). Replaces an earlier registration of the name.
void register_policy(const std::string& name, PolicyFactory factory);
/// Registers at static-initialisation time: `static aikido::PolicyRegistration r("name", factory);`
struct PolicyRegistration {
  PolicyRegistration(const std::string& name, PolicyFactory factory) { register_policy(name, std::move(factory)); }
};
/// Builds a policy from a spec. ConfigError for an unknown name (listing the known ones) or bad options; unknown
/// option keys are errors too.
std::unique_ptr<Policy> make_policy(std::string_view spec);
/// Registered names, sorted (the built-in ones: adaptive-batch, adaptive-compression, schedule, strategy-switch).
std::vector<std::string> policy_names();

}  // namespace aikido
