// aikido._C's LibTorch integration: DistributedOptimizer around a Python optimizer, the samplers, PolicyRunner and the
// state helpers of include/aikido/torch.hpp.
//
// aikido::torch works on ::torch::optim::Optimizer, LibTorch's C++ optimizer. A Python optimizer (torch.optim.SGD,
// Adam, any subclass of torch.optim.Optimizer) is adapted by PythonOptimizer: a C++ optimizer over the same
// parameter tensors whose step() runs the Python optimizer's step(), whose learning rate is the Python param groups'
// "lr", and whose serialised state is the Python state_dict() (torch.save). Everything else, gradient buckets, hooks,
// strategies and monitoring, is the C++ implementation itself.
#include <torch/csrc/autograd/python_variable.h>

#include <aikido/elastic.hpp>
#include <aikido/torch.hpp>

#include "common.hpp"

namespace aikido::python {
namespace {

namespace at_torch = ::aikido::torch;

// The Python optimizer shared by the adapter and the options of its parameter groups.
struct OptimizerHandle {
  SharedObject optimizer;
};

// One Python param group's options: its learning rate is the Python group's "lr".
class GroupOptions final : public ::torch::optim::OptimizerOptions {
 public:
  GroupOptions(std::shared_ptr<OptimizerHandle> handle, std::size_t group)
      : handle_(std::move(handle)), group_(group) {}
  std::unique_ptr<OptimizerOptions> clone() const override { return std::make_unique<GroupOptions>(handle_, group_); }
  // The Python state_dict() already holds every group's options (PythonOptimizer::save).
  void serialize(::torch::serialize::InputArchive&) override {}
  void serialize(::torch::serialize::OutputArchive&) const override {}
  double get_lr() const override {
    py::gil_scoped_acquire gil;
    return group().attr("get")("lr", 0.0).cast<double>();
  }
  void set_lr(const double lr) override {
    py::gil_scoped_acquire gil;
    group()["lr"] = lr;
  }

 private:
  py::object group() const {
    py::list groups = handle_->optimizer.get().attr("param_groups");
    if (group_ >= groups.size()) {
      throw ConfigError("the optimizer's param group " + std::to_string(group_) +
                        " is gone; groups added after the DistributedOptimizer was made are not followed");
    }
    return groups[group_];
  }
  std::shared_ptr<OptimizerHandle> handle_;
  std::size_t group_;
};

std::vector<::torch::optim::OptimizerParamGroup> groups_of(const py::object& optimizer,
                                                           const std::shared_ptr<OptimizerHandle>& handle) {
  if (!py::hasattr(optimizer, "param_groups") || !py::hasattr(optimizer, "step") ||
      !py::hasattr(optimizer, "state_dict")) {
    throw py::type_error("expected a torch.optim.Optimizer, got " +
                         std::string(py::str(py::type::handle_of(optimizer).attr("__name__"))));
  }
  std::vector<::torch::optim::OptimizerParamGroup> groups;
  std::size_t index = 0;
  for (py::handle group : optimizer.attr("param_groups")) {
    std::vector<at::Tensor> params;
    for (py::handle p : group["params"]) params.push_back(THPVariable_Unpack(p.ptr()));
    groups.emplace_back(std::move(params), std::make_unique<GroupOptions>(handle, index++));
  }
  return groups;
}

constexpr const char* kStateKey = "aikido/python_optimizer";

class PythonOptimizer final : public ::torch::optim::Optimizer {
 public:
  // With the GIL held.
  PythonOptimizer(py::object optimizer, std::shared_ptr<OptimizerHandle> handle)
      : Optimizer(groups_of(optimizer, handle), std::make_unique<GroupOptions>(handle, 0)),
        handle_(std::move(handle)) {}
  static std::unique_ptr<PythonOptimizer> make(py::object optimizer) {
    auto handle = std::make_shared<OptimizerHandle>(OptimizerHandle{SharedObject(optimizer)});
    return std::make_unique<PythonOptimizer>(std::move(optimizer), std::move(handle));
  }

  at::Tensor step(LossClosure closure) override {
    py::gil_scoped_acquire gil;
    if (closure) {
      handle_->optimizer.get().attr("step")(py::cpp_function([closure] { return closure(); }));
    } else {
      handle_->optimizer.get().attr("step")();
    }
    return {};
  }
  void save(::torch::serialize::OutputArchive& archive) const override {
    py::gil_scoped_acquire gil;
    py::object buffer = py::module_::import("io").attr("BytesIO")();
    py::module_::import("torch").attr("save")(handle_->optimizer.get().attr("state_dict")(), buffer);
    archive.write(kStateKey, c10::IValue(buffer.attr("getvalue")().cast<std::string>()));
  }
  void load(::torch::serialize::InputArchive& archive) override {
    c10::IValue value;
    archive.read(kStateKey, value);
    py::gil_scoped_acquire gil;
    py::object buffer = py::module_::import("io").attr("BytesIO")(py::bytes(value.toStringRef()));
    handle_->optimizer.get().attr("load_state_dict")(py::module_::import("torch").attr("load")(buffer));
  }
  py::object python() const { return handle_->optimizer.get(); }

 private:
  std::shared_ptr<OptimizerHandle> handle_;
};

// (name, tensor) pairs from model.named_parameters(), a dict, or a list of pairs.
at_torch::NamedParameters named_parameters(const py::object& parameters) {
  py::object items = parameters;
  if (py::isinstance<py::dict>(parameters)) items = parameters.attr("items")();
  at_torch::NamedParameters named;
  for (py::handle item : items) {
    auto pair = py::reinterpret_borrow<py::tuple>(item);
    if (pair.size() != 2 || !THPVariable_Check(pair[1].ptr())) {
      throw py::type_error("named parameters are (name, tensor) pairs, as model.named_parameters() gives them");
    }
    named.insert(pair[0].cast<std::string>(), THPVariable_Unpack(pair[1].ptr()));
  }
  return named;
}

// A Python optimizer made usable by the C++ functions; kept by whoever registered it.
struct OptimizerAdapter {
  std::unique_ptr<PythonOptimizer> adapter;
};

struct PyDistributedOptimizer {
  py::object python_optimizer;
  py::object peer;
  std::unique_ptr<PythonOptimizer> adapter;
  std::unique_ptr<at_torch::DistributedOptimizer> optimizer;

  ~PyDistributedOptimizer() {
    // Waits for collectives still in flight: other threads may need the GIL to complete them.
    py::gil_scoped_release release;
    optimizer.reset();
    adapter.reset();
  }
  at_torch::DistributedOptimizer& get() const {
    if (!optimizer) throw ConfigError("DistributedOptimizer was not initialised (call super().__init__)");
    return *optimizer;
  }
};

std::unique_ptr<PyDistributedOptimizer> make_distributed_optimizer(
    py::object optimizer, const py::object& parameters, Strategy strategy, py::object peer, std::size_t bucket_bytes,
    std::uint64_t seed, bool monitor, std::int64_t gradient_sample_interval, double noise_smoothing,
    double link_probe_interval, std::size_t link_probe_bytes, bool collective_setup, std::int64_t local_steps,
    double round_deadline, double outer_lr, double outer_momentum, const Compression& compression,
    std::optional<at_torch::PrivacyOptions> privacy, bool secure_aggregation) {
  auto result = std::make_unique<PyDistributedOptimizer>();
  result->python_optimizer = optimizer;
  result->peer = peer;
  Peer& p = peer.cast<Peer&>();
  const at_torch::NamedParameters named = named_parameters(parameters);
  result->adapter = PythonOptimizer::make(optimizer);
  at_torch::DistributedOptimizerOptions options;
  options.bucket_bytes = bucket_bytes;
  options.seed = seed;
  options.monitor = monitor;
  options.gradient_sample_interval = gradient_sample_interval;
  options.noise_smoothing = noise_smoothing;
  options.link_probe_interval = to_ms(link_probe_interval, "link_probe_interval");
  options.link_probe_bytes = link_probe_bytes;
  options.collective_setup = collective_setup;
  options.local_steps = local_steps;
  options.round_deadline = to_ms(round_deadline, "round_deadline");
  options.outer_lr = outer_lr;
  options.outer_momentum = outer_momentum;
  options.compression = compression;
  options.privacy = std::move(privacy);
  options.secure_aggregation = secure_aggregation;
  result->optimizer = blocking(
      [&] { return std::make_unique<at_torch::DistributedOptimizer>(p, *result->adapter, named, strategy, options); });
  return result;
}

std::optional<std::vector<std::size_t>> next_batch(at_torch::DistributedSampler& s, std::size_t batch_size) {
  return s.next_batch(batch_size);
}

}  // namespace

void bind_torch_api(py::module_& m) {
  py::class_<OptimizerAdapter>(m, "_OptimizerAdapter");

  py::class_<PyDistributedOptimizer>(m, "DistributedOptimizer", py::dynamic_attr(),
                                     "Wraps a torch.optim optimizer so that step() keeps the workers' models together "
                                     "by the chosen strategy.")
      .def(py::init(&make_distributed_optimizer), py::arg("optimizer"), py::arg("named_parameters"),
           py::arg("strategy"), py::arg("peer"), py::arg("bucket_bytes"), py::arg("seed"), py::arg("monitor"),
           py::arg("gradient_sample_interval"), py::arg("noise_smoothing"), py::arg("link_probe_interval"),
           py::arg("link_probe_bytes"), py::arg("collective_setup"), py::arg("local_steps"), py::arg("round_deadline"),
           py::arg("outer_lr"), py::arg("outer_momentum"), py::arg("compression"), py::arg("privacy"),
           py::arg("secure_aggregation"))
      .def("zero_grad", [](PyDistributedOptimizer& o) { o.get().zero_grad(); })
      .def(
          "step",
          [](PyDistributedOptimizer& o, std::optional<std::int64_t> samples) {
            blocking([&] {
              if (samples) {
                o.get().step(*samples);
              } else {
                o.get().step();
              }
            });
          },
          py::arg("samples") = py::none())
      .def(
          "set_strategy", [](PyDistributedOptimizer& o, Strategy s) { blocking([&] { o.get().set_strategy(s); }); },
          py::arg("strategy"))
      .def_property_readonly("strategy", [](const PyDistributedOptimizer& o) { return o.get().strategy(); })
      .def(
          "set_lr", [](PyDistributedOptimizer& o, double lr) { o.get().set_lr(lr); }, py::arg("lr"))
      .def_property_readonly("lr", [](const PyDistributedOptimizer& o) { return o.get().lr(); })
      .def(
          "set_batch_size", [](PyDistributedOptimizer& o, std::int64_t b) { o.get().set_batch_size(b); },
          py::arg("batch_size"))
      .def(
          "set_epoch", [](PyDistributedOptimizer& o, std::int64_t e) { o.get().set_epoch(e); }, py::arg("epoch"))
      .def_property_readonly("metrics", [](const PyDistributedOptimizer& o) { return o.get().metrics(); })
      .def_property_readonly("steps", [](const PyDistributedOptimizer& o) { return o.get().steps(); })
      .def(
          "finish_pending",
          [](PyDistributedOptimizer& o, bool after_failure) {
            blocking([&] { o.get().finish_pending(after_failure); });
          },
          py::arg("after_failure") = false)
      .def("on_cluster_change", [](PyDistributedOptimizer& o) { blocking([&] { o.get().on_cluster_change(); }); })
      .def(
          "restore_strategy", [](PyDistributedOptimizer& o, Strategy s) { o.get().restore_strategy(s); },
          py::arg("strategy"))
      .def(
          "restore_steps", [](PyDistributedOptimizer& o, std::int64_t s) { o.get().restore_steps(s); },
          py::arg("steps"))
      .def(
          "set_compression",
          [](PyDistributedOptimizer& o, const Compression& c) { blocking([&] { o.get().set_compression(c); }); },
          py::arg("compression"))
      .def_property_readonly("compression", [](const PyDistributedOptimizer& o) { return o.get().compression(); })
      .def(
          "set_bucket_bytes",
          [](PyDistributedOptimizer& o, std::size_t bytes) { blocking([&] { o.get().set_bucket_bytes(bytes); }); },
          py::arg("bucket_bytes"))
      .def_property_readonly("bucket_bytes", [](const PyDistributedOptimizer& o) { return o.get().bucket_bytes(); })
      .def(
          "restore_compression",
          [](PyDistributedOptimizer& o, const Compression& c) { o.get().restore_compression(c); },
          py::arg("compression"))
      .def_property_readonly("accountant",
                             [](const PyDistributedOptimizer& o) -> std::optional<RdpAccountant> {
                               const RdpAccountant* a = o.get().accountant();
                               return a ? std::optional<RdpAccountant>(*a) : std::nullopt;
                             })
      .def(
          "set_elastic_session",
          [](PyDistributedOptimizer& o, const py::object& session) {
            o.get().set_elastic_session(&session.cast<ElasticSession&>());
          },
          py::arg("session"), py::keep_alive<1, 2>())
      .def_property_readonly("peer", [](const PyDistributedOptimizer& o) { return o.peer; })
      .def_property_readonly("optimizer", [](const PyDistributedOptimizer& o) { return o.python_optimizer; });

  m.def(
      "check_same_parameters",
      [](Peer& peer, const py::object& parameters, const std::string& what) {
        const auto named = named_parameters(parameters);
        blocking([&] { at_torch::check_same_parameters(peer, named, what); });
      },
      py::arg("peer"), py::arg("named_parameters"), py::arg("what") = "parameters");
  m.def(
      "broadcast_parameters",
      [](Peer& peer, const py::object& parameters, int root) {
        const auto named = named_parameters(parameters);
        blocking([&] { at_torch::broadcast_parameters(peer, named, root); });
      },
      py::arg("peer"), py::arg("named_parameters"), py::arg("root") = 0);
  m.def(
      "average_parameters",
      [](Peer& peer, const py::object& parameters, const std::string& name) {
        const auto named = named_parameters(parameters);
        blocking([&] { at_torch::average_parameters(peer, named, name); });
      },
      py::arg("peer"), py::arg("named_parameters"), py::arg("name") = "aikido.torch/average");
  m.def(
      "broadcast_optimizer_state",
      [](Peer& peer, const py::object& optimizer, int root) {
        auto adapter = PythonOptimizer::make(optimizer);
        blocking([&] { at_torch::broadcast_optimizer_state(peer, *adapter, root); });
      },
      py::arg("peer"), py::arg("optimizer"), py::arg("root") = 0);

  py::class_<at_torch::PrivacyOptions>(m, "PrivacyOptions",
                                       "Differential privacy of a DistributedOptimizer: client-level DP under "
                                       "local_sgd, federated_averaging and diloco.")
      .def(py::init([](double clip, double noise_multiplier, double delta, std::int64_t dataset_size,
                       std::uint64_t noise_seed) {
             return at_torch::PrivacyOptions{clip, noise_multiplier, delta, dataset_size, noise_seed};
           }),
           py::arg("clip"), py::arg("noise_multiplier"), py::arg("delta") = 1e-5, py::arg("dataset_size") = 0,
           py::arg("noise_seed") = 0)
      .def_readwrite("clip", &at_torch::PrivacyOptions::clip)
      .def_readwrite("noise_multiplier", &at_torch::PrivacyOptions::noise_multiplier)
      .def_readwrite("delta", &at_torch::PrivacyOptions::delta)
      .def_readwrite("dataset_size", &at_torch::PrivacyOptions::dataset_size)
      .def_readwrite("noise_seed", &at_torch::PrivacyOptions::noise_seed);

  m.def(
      "dirichlet_partition",
      [](const ::at::Tensor& labels, int workers, double alpha, std::uint64_t seed) {
        return at_torch::dirichlet_partition(labels, workers, alpha, seed);
      },
      py::arg("labels"), py::arg("workers"), py::arg("alpha"), py::arg("seed") = 0,
      "A non-IID split of a labelled data set: per class, the workers' shares drawn from Dirichlet(alpha). Each "
      "worker's sorted sample indices; the same on every worker for the same arguments.");

  py::class_<at_torch::DistributedSampler>(m, "DistributedSampler", py::dynamic_attr())
      .def(py::init<std::size_t, const Peer&, std::uint64_t, bool>(), py::arg("dataset_size"), py::arg("peer"),
           py::arg("seed") = 0, py::arg("shuffle") = true, py::keep_alive<1, 3>())
      .def(py::init<std::size_t, int, int, std::uint64_t, bool>(), py::arg("dataset_size"), py::arg("rank"),
           py::arg("size"), py::arg("seed") = 0, py::arg("shuffle") = true)
      .def("set_epoch", &at_torch::DistributedSampler::set_epoch, py::arg("epoch"))
      .def_property_readonly("epoch", &at_torch::DistributedSampler::epoch)
      .def_property_readonly("position", &at_torch::DistributedSampler::position)
      .def("set_position", &at_torch::DistributedSampler::set_position, py::arg("position"))
      .def_property_readonly("dataset_size", &at_torch::DistributedSampler::dataset_size)
      .def("steps_per_epoch", &at_torch::DistributedSampler::steps_per_epoch, py::arg("batch_size"))
      .def("next_batch", &next_batch, py::arg("batch_size"),
           "This worker's next batch of at most batch_size indices (possibly empty near the end of the epoch), or "
           "None when the epoch is over.");

  py::class_<at_torch::PolicyRunner>(m, "PolicyRunner", "Runs adaptation policies in a training loop.")
      .def(py::init([](PyDistributedOptimizer& optimizer, std::int64_t batch_size, const py::list& policies) {
             std::vector<std::unique_ptr<Policy>> made;
             for (py::handle p : policies) made.push_back(policy_from_python(p));
             return std::make_unique<at_torch::PolicyRunner>(optimizer.get(), batch_size, std::move(made));
           }),
           py::arg("optimizer"), py::arg("batch_size"), py::arg("policies"), py::keep_alive<1, 2>())
      .def("set_elastic_session", &at_torch::PolicyRunner::set_elastic_session, py::arg("session"),
           py::keep_alive<1, 2>())
      .def("before_train", [](at_torch::PolicyRunner& r) { blocking([&] { r.before_train(); }); })
      .def(
          "before_epoch", [](at_torch::PolicyRunner& r, std::int64_t e) { blocking([&] { r.before_epoch(e); }); },
          py::arg("epoch"))
      .def("after_step", [](at_torch::PolicyRunner& r) { blocking([&] { r.after_step(); }); })
      .def("after_epoch", [](at_torch::PolicyRunner& r) { blocking([&] { r.after_epoch(); }); })
      .def("after_train", [](at_torch::PolicyRunner& r) { blocking([&] { r.after_train(); }); })
      .def_property_readonly("batch_size", &at_torch::PolicyRunner::batch_size)
      .def_property_readonly("stopped", &at_torch::PolicyRunner::stopped)
      .def_property_readonly("stop_reason", &at_torch::PolicyRunner::stop_reason)
      .def_property_readonly("metrics", &at_torch::PolicyRunner::metrics);

  m.def(
      "register_state",
      [](const py::object& session_object, const py::object& parameters, const py::object& optimizer,
         at_torch::DistributedSampler& sampler) {
        ElasticSession& session = session_object.cast<ElasticSession&>();
        const auto named = named_parameters(parameters);
        ::torch::optim::Optimizer* adapted = nullptr;
        py::object keep;
        if (py::isinstance<PyDistributedOptimizer>(optimizer)) {
          adapted = optimizer.cast<PyDistributedOptimizer&>().adapter.get();
          keep = optimizer;
        } else {
          auto holder = std::make_unique<OptimizerAdapter>(OptimizerAdapter{PythonOptimizer::make(optimizer)});
          adapted = holder->adapter.get();
          keep = py::cast(std::move(holder));
        }
        at_torch::register_state(session, named, *adapted, sampler);
        // The session calls the optimizer and the sampler whenever it commits or restores: they live as long as it.
        py::detail::keep_alive_impl(session_object, keep);
      },
      py::arg("session"), py::arg("named_parameters"), py::arg("optimizer"), py::arg("sampler"),
      py::keep_alive<1, 4>());
}

}  // namespace aikido::python
