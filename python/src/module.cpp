// The module aikido._C: errors, stores, Peer and Work, the elastic session, policies and metrics. The LibTorch parts
// are in torch_api.cpp (DistributedOptimizer, samplers, PolicyRunner) and process_group.cpp (the torch.distributed
// backend). The Python package (python/aikido) re-exports everything with docstrings and type stubs.
#include <torch/csrc/autograd/python_variable.h>

#include <aikido/aikido.hpp>
#include <aikido/compression.hpp>
#include <aikido/metrics.hpp>
#include <aikido/policy.hpp>
#include <aikido/privacy.hpp>
#include <cmath>
#include <cstring>

#include "base/visit_dtype.hpp"
#include "common.hpp"

namespace aikido::python {

// ---------------------------------------------------------------------------------------------------------------
// Helpers (common.hpp)

namespace {
unsigned long main_thread_id = 0;  // PyThread_get_thread_ident() of the interpreter's main thread
}

bool on_main_thread() { return main_thread_id != 0 && PyThread_get_thread_ident() == main_thread_id; }

void check_signals() {
  if (!on_main_thread()) return;
  py::gil_scoped_acquire gil;
  if (PyErr_CheckSignals() != 0) throw py::error_already_set();
}

bool wait_interruptibly(const Work& work, std::optional<std::chrono::milliseconds> timeout) {
  py::gil_scoped_release release;
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    auto slice = kSignalSlice;
    if (timeout) {
      const auto left =
          *timeout - std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start);
      if (left <= std::chrono::milliseconds(0)) return work.wait(std::chrono::milliseconds(0));
      slice = std::min(slice, left);
    }
    if (work.wait(slice)) return true;
    check_signals();
  }
}

SharedObject::SharedObject(py::object object)
    : holder_(new py::object(std::move(object)), [](py::object* o) {
        py::gil_scoped_acquire gil;
        delete o;
      }) {}

py::object SharedObject::get() const { return holder_ ? *holder_ : py::none(); }

at::Tensor as_tensor(py::handle object, const char* what) {
  at::Tensor tensor;
  if (THPVariable_Check(object.ptr())) {
    tensor = THPVariable_Unpack(object.ptr());
  } else if (py::hasattr(object, "__array_interface__")) {
    tensor = THPVariable_Unpack(py::module_::import("torch").attr("from_numpy")(object).ptr());
  } else {
    throw py::type_error(std::string(what) + ": expected a torch.Tensor or a numpy.ndarray, got " +
                         std::string(py::str(py::type::handle_of(object).attr("__name__"))));
  }
  if (!tensor.device().is_cpu()) {
    throw py::value_error(std::string(what) + ": the tensor is on " + tensor.device().str() +
                          "; aikido's collectives take CPU tensors");
  }
  if (!tensor.is_contiguous()) {
    throw py::value_error(std::string(what) +
                          ": the tensor is not contiguous; pass tensor.contiguous() (and copy "
                          "the result back where it was written in place)");
  }
  return tensor;
}

// torch's names of element types ("float32", not c10's "Float").
std::string scalar_type_name(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return "float32";
    case at::kDouble:
      return "float64";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kInt:
      return "int32";
    case at::kLong:
      return "int64";
    case at::kShort:
      return "int16";
    case at::kChar:
      return "int8";
    case at::kByte:
      return "uint8";
    case at::kBool:
      return "bool";
    case at::kComplexFloat:
      return "complex64";
    case at::kComplexDouble:
      return "complex128";
    default:
      return c10::toString(type);
  }
}

std::chrono::milliseconds to_ms(double seconds, const char* what) {
  if (!std::isfinite(seconds) || seconds < 0) {
    throw py::value_error(std::string(what) + " must be a non-negative number of seconds");
  }
  return std::chrono::milliseconds(static_cast<std::int64_t>(std::llround(seconds * 1000)));
}

double to_seconds(std::chrono::milliseconds ms) { return static_cast<double>(ms.count()) / 1000.0; }

// ---------------------------------------------------------------------------------------------------------------
// Policies written in Python

namespace {

// What a Python hook receives: the runner's context, valid only while the hook runs.
struct ContextHandle {
  PolicyContext* context = nullptr;
  PolicyContext& get() const {
    if (!context) throw ConfigError("a PolicyContext was used after its hook returned; act inside the hook");
    return *context;
  }
};

class PythonPolicy final : public Policy {
 public:
  explicit PythonPolicy(py::object policy) : policy_(std::move(policy)) {}

  std::string name() const override {
    py::gil_scoped_acquire gil;
    return py::str(policy_.get().attr("name")());
  }
  void before_train(PolicyContext& c) override { call("before_train", c); }
  void before_epoch(PolicyContext& c) override { call("before_epoch", c); }
  void after_step(PolicyContext& c) override { call("after_step", c); }
  void after_epoch(PolicyContext& c) override { call("after_epoch", c); }
  void after_train(PolicyContext& c) override { call("after_train", c); }

  std::vector<std::byte> save_state() const override {
    py::gil_scoped_acquire gil;
    py::object state = policy_.get().attr("save_state")();
    if (state.is_none()) return {};
    const std::string bytes = py::bytes(state);
    const auto* b = reinterpret_cast<const std::byte*>(bytes.data());
    return {b, b + bytes.size()};
  }
  void load_state(std::span<const std::byte> state) override {
    py::gil_scoped_acquire gil;
    policy_.get().attr("load_state")(py::bytes(reinterpret_cast<const char*>(state.data()), state.size()));
  }

 private:
  void call(const char* hook, PolicyContext& context) {
    py::gil_scoped_acquire gil;
    auto handle = std::make_shared<ContextHandle>(ContextHandle{&context});
    py::object wrapped = py::cast(handle);
    try {
      policy_.get().attr(hook)(wrapped);
    } catch (...) {
      handle->context = nullptr;
      throw;
    }
    handle->context = nullptr;
  }

  SharedObject policy_;
};

}  // namespace

std::unique_ptr<Policy> policy_from_python(py::handle policy) {
  if (py::isinstance<py::str>(policy)) return make_policy(policy.cast<std::string>());
  const py::object base = py::module_::import("aikido").attr("Policy");
  if (!py::isinstance(policy, base)) {
    throw py::type_error("policies are spec strings ('NAME[:key=value,...]') or aikido.Policy objects, not " +
                         std::string(py::str(py::type::handle_of(policy).attr("__name__"))));
  }
  return std::make_unique<PythonPolicy>(py::reinterpret_borrow<py::object>(policy));
}

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Errors: each C++ error type raises its own Python class, all under aikido.Error (a RuntimeError).

PyObject* new_error(py::module_& m, const char* name, PyObject* base, const char* doc) {
  const std::string qualified = std::string("aikido.") + name;
  PyObject* type = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, base, nullptr);
  if (!type) throw py::error_already_set();
  m.add_object(name, py::handle(type));  // the module keeps a reference; so does this process (never freed)
  return type;
}

void bind_errors(py::module_& m) {
  static PyObject* error = new_error(m, "Error", PyExc_RuntimeError, "Base of every error Aikido raises.");
  static PyObject* timeout = new_error(
      m, "TimeoutError", error,
      "A collective or a connection did not complete within its deadline (AIKIDO_TIMEOUT); the message names the "
      "ranks that did not post it.");
  static PyObject* lost = new_error(m, "PeerLostError", error,
                                    "A peer closed its connection, crashed, or failed its own part of a collective.");
  static PyObject* mismatch =
      new_error(m, "MismatchError", error,
                "Ranks posted the same collective with different sizes, element types, operations or roots; the "
                "message names the ranks and both calls.");
  static PyObject* config = new_error(m, "ConfigError", error, "An invalid setting or argument.");
  static PyObject* auth = new_error(m, "AuthError", error, "A connection failed the job-secret handshake.");
  static PyObject* protocol =
      new_error(m, "ProtocolError", error, "A peer sent bytes that do not follow the wire protocol.");
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const TimeoutError& e) {
      PyErr_SetString(timeout, e.what());
    } catch (const PeerLostError& e) {
      PyErr_SetString(lost, e.what());
    } catch (const MismatchError& e) {
      PyErr_SetString(mismatch, e.what());
    } catch (const ConfigError& e) {
      PyErr_SetString(config, e.what());
    } catch (const AuthError& e) {
      PyErr_SetString(auth, e.what());
    } catch (const ProtocolError& e) {
      PyErr_SetString(protocol, e.what());
    } catch (const Error& e) {
      PyErr_SetString(error, e.what());
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Work: an aikido::Work with what Python must keep alive until it is done, and its result.

struct PyWork {
  Work work;
  std::vector<at::Tensor> keep;  // the buffers the operation reads and writes
  py::object result;             // returned by result(): the output tensor, or for consensus a bool
  std::shared_ptr<bool> agreed;  // consensus

  PyWork(Work w, std::vector<at::Tensor> k, py::object r)
      : work(std::move(w)), keep(std::move(k)), result(std::move(r)) {}
  PyWork(const PyWork&) = delete;
  PyWork& operator=(const PyWork&) = delete;
  ~PyWork() {
    // Dropped before it is done: the buffers stay alive until the library no longer touches them.
    if (!work.done()) work.on_complete([keep = std::move(keep), agreed = agreed](std::exception_ptr) {});
  }

  bool wait(std::optional<double> timeout) const {
    return wait_interruptibly(work, timeout ? std::optional(to_ms(*timeout, "timeout")) : std::nullopt);
  }
  py::object get_result() const {
    wait(std::nullopt);
    if (agreed) return py::bool_(*agreed);
    return result;
  }
};

using PyWorkPtr = std::shared_ptr<PyWork>;

PyWorkPtr make_work(Work work, std::vector<at::Tensor> keep, py::object result) {
  return std::make_shared<PyWork>(std::move(work), std::move(keep), std::move(result));
}

py::object wait_for_result(const PyWorkPtr& work) { return work->get_result(); }

// ---------------------------------------------------------------------------------------------------------------
// Peer collectives on tensors and numpy arrays

DType dtype_of(const at::Tensor& t, const char* what) {
  if (const auto dtype = library_dtype(t.scalar_type())) return *dtype;
  throw py::type_error(std::string(what) + ": tensors of type " + scalar_type_name(t.scalar_type()) +
                       " are not supported; use float32, float64, float16, bfloat16, int32, int64 or uint8");
}


py::object wrap(const at::Tensor& t) { return py::reinterpret_steal<py::object>(THPVariable_Wrap(t)); }

// The output of an out-of-place collective: `out` when given (checked), else a new tensor of `shape`.
std::pair<at::Tensor, py::object> output_for(const py::object& out, const at::Tensor& like, at::IntArrayRef shape,
                                             std::int64_t numel, const char* what) {
  if (out.is_none()) {
    at::Tensor t = at::empty(shape, like.options());
    return {t, wrap(t)};
  }
  at::Tensor t = as_tensor(out, what);
  if (t.scalar_type() != like.scalar_type()) {
    throw py::type_error(std::string(what) + ": out is " + scalar_type_name(t.scalar_type()) + " but the input is " +
                         scalar_type_name(like.scalar_type()));
  }
  if (t.numel() != numel) {
    throw py::value_error(std::string(what) + ": out holds " + std::to_string(t.numel()) + " elements; " +
                          std::to_string(numel) + " expected");
  }
  return {t, out};
}

PyWorkPtr post(Peer& peer, const detail::Request& request, std::vector<at::Tensor> keep, py::object result) {
  Work work;
  {
    py::gil_scoped_release release;  // a post may wait for mailbox space
    work = peer.post(request);
  }
  return make_work(std::move(work), std::move(keep), std::move(result));
}

PyWorkPtr allreduce_async(Peer& peer, const py::object& input, const std::string& name, ReduceOp op,
                          const py::object& out) {
  at::Tensor send = as_tensor(input, "allreduce");
  at::Tensor recv = send;
  py::object result = input;
  if (!out.is_none()) std::tie(recv, result) = output_for(out, send, send.sizes(), send.numel(), "allreduce");
  const auto n = static_cast<std::size_t>(send.numel());
  return post(peer,
              {detail::CollectiveKind::allreduce, dtype_of(send, "allreduce"), op, 0, send.data_ptr(), recv.data_ptr(),
               n, n, name},
              {send, recv}, result);
}

PyWorkPtr broadcast_async(Peer& peer, const py::object& input, int root, const std::string& name) {
  at::Tensor t = as_tensor(input, "broadcast");
  const auto n = static_cast<std::size_t>(t.numel());
  return post(peer,
              {detail::CollectiveKind::broadcast, dtype_of(t, "broadcast"), ReduceOp::sum, root, t.data_ptr(),
               t.data_ptr(), n, n, name},
              {t}, input);
}

std::vector<std::int64_t> stacked_shape(int size, const at::Tensor& t) {
  std::vector<std::int64_t> shape{size};
  for (auto d : t.sizes()) shape.push_back(d);
  return shape;
}

PyWorkPtr allgather_async(Peer& peer, const py::object& input, const std::string& name, const py::object& out) {
  at::Tensor send = as_tensor(input, "allgather");
  const auto shape = stacked_shape(peer.size(), send);
  auto [recv, result] = output_for(out, send, shape, send.numel() * peer.size(), "allgather");
  return post(peer,
              {detail::CollectiveKind::allgather, dtype_of(send, "allgather"), ReduceOp::sum, 0, send.data_ptr(),
               recv.data_ptr(), static_cast<std::size_t>(send.numel()), static_cast<std::size_t>(recv.numel()), name},
              {send, recv}, result);
}

PyWorkPtr reduce_scatter_async(Peer& peer, const py::object& input, const std::string& name, ReduceOp op,
                               const py::object& out) {
  at::Tensor send = as_tensor(input, "reduce_scatter");
  const int size = peer.size();
  if (send.numel() % size != 0) {
    throw py::value_error("reduce_scatter: the input's " + std::to_string(send.numel()) +
                          " elements do not split into " + std::to_string(size) + " equal blocks");
  }
  std::vector<std::int64_t> shape{send.numel() / size};
  if (send.dim() >= 1 && send.size(0) % size == 0) {
    shape = send.sizes().vec();
    shape[0] /= size;
  }
  auto [recv, result] = output_for(out, send, shape, send.numel() / size, "reduce_scatter");
  return post(peer,
              {detail::CollectiveKind::reduce_scatter, dtype_of(send, "reduce_scatter"), op, 0, send.data_ptr(),
               recv.data_ptr(), static_cast<std::size_t>(send.numel()), static_cast<std::size_t>(recv.numel()), name},
              {send, recv}, result);
}

PyWorkPtr gather_async(Peer& peer, const py::object& input, int root, const std::string& name, const py::object& out) {
  at::Tensor send = as_tensor(input, "gather");
  at::Tensor recv;
  py::object result = py::none();
  if (peer.rank() == root) {
    std::tie(recv, result) =
        output_for(out, send, stacked_shape(peer.size(), send), send.numel() * peer.size(), "gather");
  }
  return post(peer,
              {detail::CollectiveKind::gather, dtype_of(send, "gather"), ReduceOp::sum, root, send.data_ptr(),
               recv.defined() ? recv.data_ptr() : nullptr, static_cast<std::size_t>(send.numel()),
               recv.defined() ? static_cast<std::size_t>(recv.numel()) : 0, name},
              {send, recv.defined() ? recv : send}, result);
}

// The bytes of a consensus value: bytes-like objects and str as they are, tensors and arrays by their memory.
at::Tensor value_bytes(const py::object& value) {
  std::string bytes;
  if (py::isinstance<py::str>(value)) {
    bytes = value.cast<std::string>();
  } else if (py::isinstance<py::bytes>(value) || py::isinstance<py::bytearray>(value) ||
             py::isinstance<py::memoryview>(value)) {
    bytes = py::bytes(value).cast<std::string>();
  } else {
    at::Tensor t = as_tensor(value, "consensus");
    bytes.assign(static_cast<const char*>(t.data_ptr()), static_cast<std::size_t>(t.nbytes()));
  }
  at::Tensor copy = at::empty({static_cast<std::int64_t>(bytes.size())}, at::kByte);
  if (!bytes.empty()) std::memcpy(copy.data_ptr(), bytes.data(), bytes.size());
  return copy;
}

PyWorkPtr consensus_async(Peer& peer, const py::object& value, const std::string& name) {
  at::Tensor bytes = value_bytes(value);
  auto agreed = std::make_shared<bool>(false);
  Work work;
  {
    py::gil_scoped_release release;
    work = peer.consensus_async(
        std::span<const std::byte>(static_cast<const std::byte*>(bytes.data_ptr()), std::size_t(bytes.numel())),
        *agreed, name);
  }
  auto w = make_work(std::move(work), {bytes}, py::none());
  w->agreed = agreed;
  return w;
}

void save(Peer& peer, const std::string& name, const py::object& input) {
  at::Tensor t = as_tensor(input, "save");
  detail::visit_dtype(dtype_of(t, "save"), [&](auto zero) {
    using T = decltype(zero);
    peer.save(name, std::span<const T>(static_cast<const T*>(t.data_ptr()), std::size_t(t.numel())));
  });
}

PyWorkPtr request_async(Peer& peer, int target, const std::string& name, const py::object& out) {
  at::Tensor t = as_tensor(out, "request");
  Work work;
  {
    py::gil_scoped_release release;
    work = detail::visit_dtype(dtype_of(t, "request"), [&](auto zero) {
      using T = decltype(zero);
      return peer.request_async(target, name, std::span<T>(static_cast<T*>(t.data_ptr()), std::size_t(t.numel())));
    });
  }
  return make_work(std::move(work), {t}, out);
}

// A Python buffer (bytearray, numpy array, writable memoryview) or tensor as writable bytes that stay where they are.
std::span<std::byte> writable_bytes(const py::object& object, const char* what) {
  if (THPVariable_Check(object.ptr()) || py::hasattr(object, "__array_interface__")) {
    at::Tensor t = as_tensor(object, what);
    return {static_cast<std::byte*>(t.data_ptr()), static_cast<std::size_t>(t.nbytes())};
  }
  py::buffer buffer = py::reinterpret_borrow<py::buffer>(object);
  py::buffer_info info = buffer.request(/*writable=*/true);
  if (!PyBuffer_IsContiguous(info.view(), 'C')) throw py::value_error(std::string(what) + ": not contiguous");
  return {static_cast<std::byte*>(info.ptr), static_cast<std::size_t>(info.size * info.itemsize)};
}

std::string bytes_of(const py::handle& value) {
  if (py::isinstance<py::str>(value)) return value.cast<std::string>();
  return py::bytes(py::reinterpret_borrow<py::object>(value)).cast<std::string>();
}

py::object optional_bytes(const std::optional<std::string>& value) {
  if (!value) return py::none();
  return py::bytes(*value);
}

// Python objects captured by the session's registrations: kept by the session object (keep_alive), called with the
// GIL taken.
std::function<std::vector<std::byte>()> python_save(py::function save, std::string name) {
  return [save = SharedObject(std::move(save)), name] {
    py::gil_scoped_acquire gil;
    py::object value = save.get()();
    if (!py::isinstance<py::bytes>(value) && !py::isinstance<py::bytearray>(value)) {
      throw ConfigError("ElasticSession.register_state('" + name + "'): save() must return bytes, not " +
                        std::string(py::str(py::type::handle_of(value).attr("__name__"))));
    }
    const std::string bytes = bytes_of(value);
    const auto* b = reinterpret_cast<const std::byte*>(bytes.data());
    return std::vector<std::byte>(b, b + bytes.size());
  };
}

std::function<void(std::span<const std::byte>)> python_load(py::function load) {
  return [load = SharedObject(std::move(load))](std::span<const std::byte> bytes) {
    py::gil_scoped_acquire gil;
    load.get()(py::bytes(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
  };
}

template <class Enum>
void parse_from_str(py::enum_<Enum>& e, Enum (*parse)(std::string_view)) {
  e.def(py::init([parse](const std::string& name) { return parse(name); }), py::arg("name"));
  py::implicitly_convertible<py::str, Enum>();
}

ReduceOp parse_reduce_op(std::string_view name) {
  for (ReduceOp op : {ReduceOp::sum, ReduceOp::min, ReduceOp::max, ReduceOp::prod, ReduceOp::mean}) {
    if (name == reduce_op_name(op)) return op;
  }
  throw ConfigError("unknown reduction '" + std::string(name) + "': use sum, min, max, prod or mean");
}

void bind_enums(py::module_& m) {
  py::enum_<ReduceOp> reduce(m, "ReduceOp", "Element-wise reduction of a collective.");
  reduce.value("sum", ReduceOp::sum)
      .value("min", ReduceOp::min)
      .value("max", ReduceOp::max)
      .value("prod", ReduceOp::prod)
      .value("mean", ReduceOp::mean);
  parse_from_str(reduce, &parse_reduce_op);
  py::enum_<Topology> topology(m, "Topology", "Communication graph of the collectives.");
  topology.value("ring", Topology::ring)
      .value("tree", Topology::tree)
      .value("star", Topology::star)
      .value("hierarchical", Topology::hierarchical);
  parse_from_str(topology, &parse_topology);
  py::enum_<TransportKind> transport(m, "TransportKind", "How ranks on one host talk to each other.");
  transport.value("automatic", TransportKind::automatic)
      .value("tcp", TransportKind::tcp)
      .value("unix_socket", TransportKind::unix_socket);
  parse_from_str(transport, &parse_transport);
  py::enum_<Strategy> strategy(m, "Strategy", "How the workers of a DistributedOptimizer keep their models together.");
  strategy.value("synchronous_sgd", Strategy::synchronous_sgd)
      .value("synchronous_averaging", Strategy::synchronous_averaging)
      .value("pair_averaging", Strategy::pair_averaging)
      .value("local_sgd", Strategy::local_sgd)
      .value("federated_averaging", Strategy::federated_averaging)
      .value("diloco", Strategy::diloco);
  parse_from_str(strategy, &parse_strategy);
  py::enum_<SyncResult>(m, "SyncResult", "What ElasticSession.sync() found at a step boundary.")
      .value("unchanged", SyncResult::unchanged)
      .value("changed", SyncResult::changed)
      .value("removed", SyncResult::removed);
}

// Compression is a plain value: built from its name ("fp16", "topk:0.01", ...) wherever one is expected.
void bind_edge(py::module_& m) {
  py::class_<Compression>(m, "Compression",
                          "How the values that workers average are encoded on the wire: none, fp16, bf16, int8, "
                          "topk:FRACTION (error feedback) or powersgd:RANK (warm start, error feedback).")
      .def(py::init<>())
      .def(py::init([](const std::string& name) { return Compression::parse(name); }), py::arg("name"))
      .def_static("parse", &Compression::parse, py::arg("name"))
      .def_static("topk", &Compression::topk, py::arg("fraction"))
      .def_static("powersgd", &Compression::powersgd, py::arg("rank"))
      .def_property_readonly("name", &Compression::name)
      .def_readonly("fraction", &Compression::fraction)
      .def_readonly("rank", &Compression::rank)
      .def("wire_ratio", &Compression::wire_ratio, py::arg("workers"), py::arg("count"))
      .def(
          "__eq__", [](const Compression& a, const Compression& b) { return a == b; }, py::is_operator())
      .def("__str__", &Compression::name)
      .def("__repr__", [](const Compression& c) { return "aikido.Compression('" + c.name() + "')"; });
  py::implicitly_convertible<py::str, Compression>();

  py::class_<RdpAccountant>(m, "RdpAccountant",
                            "Renyi-DP accountant of the Poisson-subsampled Gaussian mechanism (Mironov et al. 2019).")
      .def(py::init<>())
      .def(py::init<std::vector<double>>(), py::arg("orders"))
      .def("step", &RdpAccountant::step, py::arg("sampling_rate"), py::arg("noise_multiplier"), py::arg("steps") = 1)
      .def("epsilon", &RdpAccountant::epsilon, py::arg("delta"))
      .def("epsilon_and_order", &RdpAccountant::epsilon_and_order, py::arg("delta"))
      .def_property_readonly("steps", &RdpAccountant::steps)
      .def_property_readonly("orders", &RdpAccountant::orders);
}

void bind_stores(py::module_& m) {
  py::class_<Store, std::shared_ptr<Store>>(m, "Store", "A shared key-value store used for rendezvous.")
      .def(
          "set",
          [](Store& s, const std::string& key, const py::object& value) {
            const std::string v = bytes_of(value);
            py::gil_scoped_release release;
            s.set(key, v);
          },
          py::arg("key"), py::arg("value"))
      .def(
          "get",
          [](Store& s, const std::string& key) {
            std::optional<std::string> v;
            {
              py::gil_scoped_release release;
              v = s.get(key);
            }
            return optional_bytes(v);
          },
          py::arg("key"))
      .def(
          "wait",
          [](Store& s, const std::string& key, double timeout) {
            std::string v;
            {
              py::gil_scoped_release release;
              v = s.wait(key, to_ms(timeout, "timeout"));
            }
            return py::bytes(v);
          },
          py::arg("key"), py::arg("timeout"))
      .def(
          "compare_and_set",
          [](Store& s, const std::string& key, const py::object& expected, const py::object& desired) {
            std::optional<std::string> e;
            if (!expected.is_none()) e = bytes_of(expected);
            const std::string d = bytes_of(desired);
            std::optional<std::string> v;
            {
              py::gil_scoped_release release;
              v = s.compare_and_set(key, e, d);
            }
            return optional_bytes(v);
          },
          py::arg("key"), py::arg("expected"), py::arg("desired"));
  m.def("make_memory_store", &make_memory_store, "A store inside this process (ranks as threads, tests).");
  m.def(
      "connect_tcp_store",
      [](const std::string& address, const std::string& secret, double timeout) {
        py::gil_scoped_release release;
        return connect_tcp_store(address, secret, to_ms(timeout, "timeout"));
      },
      py::arg("address"), py::arg("secret"), py::arg("timeout") = 60.0,
      "A client of the store aikido-run serves (address 'host:port').");
}

void bind_peer(py::module_& m) {
  py::class_<PyWork, PyWorkPtr>(m, "Work", "Handle to an asynchronous collective.")
      .def("wait", &PyWork::wait, py::arg("timeout") = py::none(),
           "Waits until the operation completes and raises its error. With a timeout (seconds), returns False when "
           "it is still running then. Ctrl-C interrupts the wait (the operation goes on).")
      .def(
          "done", [](const PyWork& w) { return w.work.done(); }, "True once the operation completed.")
      .def("result", &wait_for_result,
           "Waits, then returns the output: the tensor the collective wrote (None on a gather's non-root ranks), or "
           "for consensus whether all ranks agreed.");

  py::class_<PeerConfig>(m, "PeerConfig", "Everything a Peer needs to join a cluster (Peer.create).")
      .def(py::init<>())
      .def_readwrite("rank", &PeerConfig::rank)
      .def_readwrite("size", &PeerConfig::size)
      .def_readwrite("host", &PeerConfig::host)
      .def_readwrite("store", &PeerConfig::store)
      .def_readwrite("secret", &PeerConfig::secret)
      .def_readwrite("cluster_version", &PeerConfig::cluster_version)
      .def_readwrite("topology", &PeerConfig::topology)
      .def_readwrite("transport", &PeerConfig::transport)
      .def_property(
          "timeout", [](const PeerConfig& c) { return to_seconds(c.timeout); },
          [](PeerConfig& c, double s) { c.timeout = to_ms(s, "timeout"); }, "Deadline of each collective, seconds.")
      .def_readwrite("bind_address", &PeerConfig::bind_address)
      .def_readwrite("segment_bytes", &PeerConfig::segment_bytes)
      .def_readwrite("tcp_congestion", &PeerConfig::tcp_congestion)
      .def_readwrite("job_id", &PeerConfig::job_id);

  py::class_<Peer>(m, "Peer", "One worker's session in a cluster, and the collectives it runs.")
      .def_static(
          "from_env", [] { return blocking([] { return std::make_unique<Peer>(Peer::from_env()); }); },
          "Joins the cluster described by aikido-run's environment; without it, a 1-rank peer.")
      .def_static(
          "create",
          [](const PeerConfig& config) {
            return blocking([&] { return std::make_unique<Peer>(Peer::create(config)); });
          },
          py::arg("config"), "Joins the cluster described by config; blocks until every rank has connected.")
      .def_property_readonly("rank", &Peer::rank)
      .def_property_readonly("size", &Peer::size)
      .def_property_readonly("local_rank", &Peer::local_rank)
      .def_property_readonly("local_size", &Peer::local_size)
      .def_property_readonly("cluster_version", &Peer::cluster_version)
      .def_property_readonly("timeout", [](const Peer& p) { return to_seconds(p.timeout()); })
      .def_property_readonly("topology", &Peer::topology)
      .def("lost_ranks", &Peer::lost_ranks)
      .def(
          "_leave",
          [](Peer& p) {
            // At interpreter exit the objects that hold a Peer may never be destroyed (references held by C++ are
            // invisible to Python's cycle collector): its connections are closed here, so that the other ranks see
            // a departure (goodbye) rather than a lost peer. The Peer is then a 1-rank session of its own.
            if (p.size() == 1) return;
            PeerConfig alone;
            alone.job_id = p.config().job_id;
            alone.host = p.config().host;
            py::gil_scoped_release release;
            p.reconnect(alone);
          },
          "Internal (used at interpreter exit): closes the connections; the peer becomes a 1-rank session.")
      .def(
          "set_topology", [](Peer& p, Topology t) { blocking([&] { p.set_topology(t); }); }, py::arg("topology"),
          "Switches the topology of later collectives; collective (every rank, same point).")
      .def("allreduce_async", &allreduce_async, py::arg("tensor"), py::arg("name"), py::arg("op") = ReduceOp::sum,
           py::arg("out") = py::none())
      .def(
          "allreduce",
          [](Peer& p, const py::object& t, const std::string& name, ReduceOp op, const py::object& out) {
            return allreduce_async(p, t, name, op, out)->get_result();
          },
          py::arg("tensor"), py::arg("name"), py::arg("op") = ReduceOp::sum, py::arg("out") = py::none(),
          "Element-wise reduction over ranks; in place unless out is given. Returns the result.")
      .def("broadcast_async", &broadcast_async, py::arg("tensor"), py::arg("root"), py::arg("name"))
      .def(
          "broadcast",
          [](Peer& p, const py::object& t, int root, const std::string& name) {
            return broadcast_async(p, t, root, name)->get_result();
          },
          py::arg("tensor"), py::arg("root"), py::arg("name"), "Root's tensor to every rank, in place.")
      .def("allgather_async", &allgather_async, py::arg("tensor"), py::arg("name"), py::arg("out") = py::none())
      .def(
          "allgather",
          [](Peer& p, const py::object& t, const std::string& name, const py::object& out) {
            return allgather_async(p, t, name, out)->get_result();
          },
          py::arg("tensor"), py::arg("name"), py::arg("out") = py::none(),
          "Every rank's tensor, stacked in rank order (shape [size, *tensor.shape] unless out is given).")
      .def("reduce_scatter_async", &reduce_scatter_async, py::arg("tensor"), py::arg("name"),
           py::arg("op") = ReduceOp::sum, py::arg("out") = py::none())
      .def(
          "reduce_scatter",
          [](Peer& p, const py::object& t, const std::string& name, ReduceOp op, const py::object& out) {
            return reduce_scatter_async(p, t, name, op, out)->get_result();
          },
          py::arg("tensor"), py::arg("name"), py::arg("op") = ReduceOp::sum, py::arg("out") = py::none(),
          "Reduces over ranks and returns this rank's block (the input holds size equal blocks).")
      .def("gather_async", &gather_async, py::arg("tensor"), py::arg("root"), py::arg("name"),
           py::arg("out") = py::none())
      .def(
          "gather",
          [](Peer& p, const py::object& t, int root, const std::string& name, const py::object& out) {
            return gather_async(p, t, root, name, out)->get_result();
          },
          py::arg("tensor"), py::arg("root"), py::arg("name"), py::arg("out") = py::none(),
          "Every rank's tensor stacked on root (None on the other ranks).")
      .def(
          "barrier_async",
          [](Peer& p, const std::string& name) {
            Work w;
            {
              py::gil_scoped_release release;
              w = p.barrier_async(name);
            }
            return make_work(std::move(w), {}, py::none());
          },
          py::arg("name") = "barrier")
      .def(
          "barrier",
          [](Peer& p, const std::string& name) {
            Work w;
            {
              py::gil_scoped_release release;
              w = p.barrier_async(name);
            }
            wait_interruptibly(w);
          },
          py::arg("name") = "barrier", "Returns once every rank has posted a barrier of this name.")
      .def("consensus_async", &consensus_async, py::arg("value"), py::arg("name"))
      .def(
          "consensus",
          [](Peer& p, const py::object& value, const std::string& name) {
            return consensus_async(p, value, name)->get_result().cast<bool>();
          },
          py::arg("value"), py::arg("name"), "True when every rank holds the same bytes (bytes, str or a tensor).")
      .def("save", &save, py::arg("name"), py::arg("tensor"),
           "Keeps a copy of the tensor under name in this rank's model store, for request() from any rank.")
      .def("request_async", &request_async, py::arg("target"), py::arg("name"), py::arg("out"))
      .def(
          "request",
          [](Peer& p, int target, const std::string& name, const py::object& out) {
            return request_async(p, target, name, out)->get_result();
          },
          py::arg("target"), py::arg("name"), py::arg("out"),
          "Fills out with the latest tensor that target saved under name.");
}

void bind_metrics(py::module_& m) {
  py::class_<LinkStats>(m, "LinkStats", "This worker's link to one other worker.")
      .def_readonly("peer", &LinkStats::peer)
      .def_readonly("latency_seconds", &LinkStats::latency_seconds)
      .def_readonly("bandwidth_bytes_per_second", &LinkStats::bandwidth_bytes_per_second)
      .def_readonly("probes", &LinkStats::probes);
  py::class_<TrainingMetrics>(m, "TrainingMetrics",
                              "What a worker knows about training after a step; identical on every worker (NaN: not "
                              "measured yet).")
      .def(py::init<>())
      .def_readonly("step", &TrainingMetrics::step)
      .def_readonly("epoch", &TrainingMetrics::epoch)
      .def_readonly("workers", &TrainingMetrics::workers)
      .def_readonly("batch_size", &TrainingMetrics::batch_size)
      .def_readonly("global_batch_size", &TrainingMetrics::global_batch_size)
      .def_readonly("lr", &TrainingMetrics::lr)
      .def_readonly("strategy", &TrainingMetrics::strategy)
      .def_readonly("topology", &TrainingMetrics::topology)
      .def_readonly("noise_scale", &TrainingMetrics::noise_scale)
      .def_readonly("gradient_sq_norm", &TrainingMetrics::gradient_sq_norm)
      .def_readonly("gradient_noise_trace", &TrainingMetrics::gradient_noise_trace)
      .def_readonly("gradient_variance", &TrainingMetrics::gradient_variance)
      .def_readonly("snr", &TrainingMetrics::snr)
      .def_readonly("samples_per_second", &TrainingMetrics::samples_per_second)
      .def_readonly("step_seconds", &TrainingMetrics::step_seconds)
      .def_readonly("compute_seconds", &TrainingMetrics::compute_seconds)
      .def_readonly("communication_seconds", &TrainingMetrics::communication_seconds)
      .def_readonly("wait_seconds", &TrainingMetrics::wait_seconds)
      .def_readonly("allreduce_bytes_per_second", &TrainingMetrics::allreduce_bytes_per_second)
      .def_readonly("links", &TrainingMetrics::links)
      .def_readonly("slowest_link_bytes_per_second", &TrainingMetrics::slowest_link_bytes_per_second)
      .def_readonly("bytes_sent", &TrainingMetrics::bytes_sent)
      .def_readonly("compression", &TrainingMetrics::compression)
      .def_readonly("epsilon", &TrainingMetrics::epsilon)
      .def_static("known", &TrainingMetrics::known, py::arg("value"), "False for NaN (not measured yet).")
      .def("to_json", &to_json, py::arg("rank"), "One JSON object; unknown values are null.")
      .def("to_prometheus", &to_prometheus, py::arg("rank"), py::arg("with_help") = true);
}

void bind_policies(py::module_& m) {
  py::class_<ContextHandle, std::shared_ptr<ContextHandle>>(
      m, "PolicyContext",
      "What a policy hook sees and can do; valid only while the hook runs. Actions take effect when the hook "
      "returns, identically on every worker.")
      .def_property_readonly("metrics", [](const ContextHandle& c) { return c.get().metrics(); })
      .def(
          "set_batch_size", [](ContextHandle& c, std::int64_t b) { c.get().set_batch_size(b); }, py::arg("batch_size"))
      .def(
          "set_lr", [](ContextHandle& c, double lr) { c.get().set_lr(lr); }, py::arg("lr"))
      .def(
          "set_strategy", [](ContextHandle& c, Strategy s) { c.get().set_strategy(s); }, py::arg("strategy"))
      .def(
          "set_topology", [](ContextHandle& c, Topology t) { c.get().set_topology(t); }, py::arg("topology"))
      .def(
          "set_compression", [](ContextHandle& c, const Compression& z) { c.get().set_compression(z); },
          py::arg("compression"))
      .def(
          "request_resize", [](ContextHandle& c, int n) { c.get().request_resize(n); }, py::arg("workers"))
      .def(
          "stop", [](ContextHandle& c, std::string reason) { c.get().stop(std::move(reason)); }, py::arg("reason"));
  m.def(
      "register_policy",
      [](const std::string& name, py::function factory) {
        // Kept for the life of the process, like the C++ registry it enters.
        auto* keep = new py::object(std::move(factory));
        register_policy(name, [keep](const PolicyOptions& options) {
          py::gil_scoped_acquire gil;
          py::dict kwargs;
          for (const auto& [key, value] : options) kwargs[py::str(key)] = value;
          return policy_from_python((*keep)(kwargs));
        });
      },
      py::arg("name"), py::arg("factory"),
      "Makes NAME usable in policy specs: factory(options: dict[str, str]) returns an aikido.Policy.");
  m.def("policy_names", &policy_names, "The registered policy names, sorted.");
}

void bind_elastic(py::module_& m) {
  py::class_<WorkerSpec>(m, "WorkerSpec").def_readonly("id", &WorkerSpec::id).def_readonly("host", &WorkerSpec::host);
  py::class_<ClusterSpec>(m, "ClusterSpec", "The workers of one version of an elastic job's cluster, in rank order.")
      .def_readonly("version", &ClusterSpec::version)
      .def_readonly("workers", &ClusterSpec::workers)
      .def_readonly("min_size", &ClusterSpec::min_size)
      .def_readonly("max_size", &ClusterSpec::max_size)
      .def_readonly("next_id", &ClusterSpec::next_id)
      .def_readonly("reason", &ClusterSpec::reason)
      .def_readonly("proposed_unix_ms", &ClusterSpec::proposed_unix_ms)
      .def_property_readonly("size", &ClusterSpec::size)
      .def("rank_of", &ClusterSpec::rank_of, py::arg("worker_id"))
      .def("describe", &ClusterSpec::describe)
      .def("encode", &ClusterSpec::encode)
      .def_static("decode", &ClusterSpec::decode, py::arg("text"))
      .def("__repr__", [](const ClusterSpec& s) { return "<aikido.ClusterSpec " + s.describe() + ">"; });
  py::class_<MembershipStore, std::shared_ptr<MembershipStore>>(m, "MembershipStore",
                                                                "The versioned membership of one job.")
      .def("latest",
           [](MembershipStore& s) {
             py::gil_scoped_release release;
             return s.latest();
           })
      .def(
          "get",
          [](MembershipStore& s, std::uint64_t v) {
            py::gil_scoped_release release;
            return s.get(v);
          },
          py::arg("version"))
      .def(
          "propose",
          [](MembershipStore& s, const ClusterSpec& next) {
            py::gil_scoped_release release;
            return s.propose(next);
          },
          py::arg("next"));
  m.def("make_membership_store", &make_membership_store, py::arg("store"), py::arg("job_id"));

  py::class_<ElasticSampler>(m, "ElasticSampler",
                             "Global-position sharding of an index space: exact across resizes (register it with "
                             "ElasticSession.register_sampler).")
      .def(py::init<std::uint64_t, std::uint64_t, bool>(), py::arg("dataset_size"), py::arg("seed") = 0,
           py::arg("shuffle") = true)
      .def(
          "shard",
          [](const ElasticSampler& s, int rank, int size, std::uint64_t batch) {
            const auto r = s.shard(rank, size, batch);
            return py::make_tuple(r.begin, r.end);
          },
          py::arg("rank"), py::arg("size"), py::arg("batch_size"),
          "The positions [begin, end) this rank reads in the current step.")
      .def(
          "indices",
          [](const ElasticSampler& s, int rank, int size, std::uint64_t batch) {
            const auto r = s.shard(rank, size, batch);
            std::vector<std::uint64_t> out;
            out.reserve(r.end - r.begin);
            for (auto p = r.begin; p < r.end; ++p) out.push_back(s.index(p));
            return out;
          },
          py::arg("rank"), py::arg("size"), py::arg("batch_size"),
          "The sample indices this rank reads in the current step (possibly empty at the end of an epoch).")
      .def("index", &ElasticSampler::index, py::arg("position"))
      .def("advance", &ElasticSampler::advance, py::arg("size"), py::arg("batch_size"),
           "Moves past the step's samples; True when the epoch ended.")
      .def_property_readonly("epoch", &ElasticSampler::epoch)
      .def_property_readonly("position", &ElasticSampler::position)
      .def_property_readonly("dataset_size", &ElasticSampler::dataset_size);

  py::class_<ChangeTimings>(m, "ChangeTimings", "Phases of the last membership change on this worker (ms; -1: none).")
      .def_readonly("from_version", &ChangeTimings::from_version)
      .def_readonly("to_version", &ChangeTimings::to_version)
      .def_readonly("from_size", &ChangeTimings::from_size)
      .def_readonly("to_size", &ChangeTimings::to_size)
      .def_readonly("failure", &ChangeTimings::failure)
      .def_readonly("decided_to_agreed", &ChangeTimings::decided_to_agreed)
      .def_readonly("agree_to_connected", &ChangeTimings::agree_to_connected)
      .def_readonly("connected_to_restored", &ChangeTimings::connected_to_restored)
      .def_readonly("decided_to_restored", &ChangeTimings::decided_to_restored);

  py::class_<ElasticConfig>(m, "ElasticConfig", "Settings of an ElasticSession (ElasticSession.from_env fills them).")
      .def(py::init<>())
      .def_readwrite("peer", &ElasticConfig::peer)
      .def_readwrite("worker_id", &ElasticConfig::worker_id)
      .def_readwrite("membership", &ElasticConfig::membership)
      .def_readwrite("watch_membership", &ElasticConfig::watch_membership)
      .def_readwrite("status_store", &ElasticConfig::status_store)
      .def_readwrite("check_every", &ElasticConfig::check_every)
      .def_property(
          "recovery_timeout", [](const ElasticConfig& c) { return to_seconds(c.recovery_timeout); },
          [](ElasticConfig& c, double s) { c.recovery_timeout = to_ms(s, "recovery_timeout"); })
      .def_readwrite("checkpoint_path", &ElasticConfig::checkpoint_path)
      .def_readwrite("resume_path", &ElasticConfig::resume_path);

  py::class_<ElasticSession>(m, "ElasticSession",
                             "One worker's membership in an elastic job and the state it carries across changes.")
      .def(py::init([](ElasticConfig config) {
             return blocking([&] { return std::make_unique<ElasticSession>(std::move(config)); });
           }),
           py::arg("config"))
      .def_static(
          "from_env", [] { return blocking([] { return ElasticSession::from_env(); }); },
          "Joins the job of aikido-run's environment (with --elastic, follows its membership; otherwise a static "
          "session around Peer.from_env()).")
      .def_property_readonly("peer", &ElasticSession::peer, py::return_value_policy::reference_internal)
      .def_property_readonly("rank", &ElasticSession::rank)
      .def_property_readonly("size", &ElasticSession::size)
      .def_property_readonly("cluster_version", &ElasticSession::cluster_version)
      .def_property_readonly("worker_id", &ElasticSession::worker_id)
      .def_property_readonly("spec", &ElasticSession::spec)
      .def_property_readonly("elastic", &ElasticSession::elastic)
      .def_property_readonly("removed", &ElasticSession::removed)
      .def_property_readonly("joining", &ElasticSession::joining)
      .def(
          "register_bytes",
          [](ElasticSession& s, std::string name, const py::object& buffer) {
            s.register_bytes(std::move(name), writable_bytes(buffer, "register_bytes"));
          },
          py::arg("name"), py::arg("buffer"), py::keep_alive<1, 3>(),
          "A buffer of fixed size (tensor, numpy array, bytearray): sent and restored in place.")
      .def(
          "register_state",
          [](ElasticSession& s, std::string name, py::function save, py::function load) {
            auto saver = python_save(std::move(save), name);
            s.register_state(std::move(name), std::move(saver), python_load(std::move(load)));
          },
          py::arg("name"), py::arg("save"), py::arg("load"),
          "State of any shape: save() returns bytes, load(bytes) restores them (it must not run collectives).")
      .def("register_sampler", &ElasticSession::register_sampler, py::arg("name"), py::arg("sampler"),
           py::keep_alive<1, 3>(), "The sampler's epoch and position.")
      .def(
          "sync", [](ElasticSession& s, std::int64_t step) { return blocking([&] { return s.sync(step); }); },
          py::arg("step") = -1, "At a step boundary on every worker: applies a pending membership change.")
      .def(
          "resize", [](ElasticSession& s, int n) { return blocking([&] { return s.resize(n); }); }, py::arg("workers"))
      .def(
          "request_resize", [](ElasticSession& s, int n) { return blocking([&] { return s.request_resize(n); }); },
          py::arg("workers"))
      .def(
          "commit", [](ElasticSession& s) { blocking([&] { s.commit(); }); },
          "Copies the registered state into the in-memory commit (two are kept).")
      .def(
          "recover", [](ElasticSession& s) { return blocking([&] { return s.recover(); }); },
          "After PeerLostError or TimeoutError: agrees on the new cluster, reconnects, rolls back to the last "
          "common commit.")
      .def("last_change", &ElasticSession::last_change);
}

}  // namespace
}  // namespace aikido::python

PYBIND11_MODULE(_C, m) {
  using namespace aikido::python;
  m.doc() = "Aikido's compiled core; use it through the package `aikido`.";
  py::module_::import("torch");
  main_thread_id = py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
  bind_errors(m);
  bind_enums(m);
  bind_edge(m);
  bind_stores(m);
  bind_peer(m);
  bind_metrics(m);
  bind_policies(m);
  bind_elastic(m);
  bind_torch_api(m);
  bind_process_group(m);
}
