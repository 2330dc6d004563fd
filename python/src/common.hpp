// Helpers shared by the translation units of the Python module aikido._C: the GIL, interruptible waits, tensors.
//
// Rules every binding follows:
// - A call that may block (a collective, a wait, a rendezvous, a training step) runs with the GIL released, so that
//   other Python threads and the library's completion callbacks (which may need the GIL) keep running.
// - Waits on operations whose buffers Python keeps alive (aikido.Work, the backend's c10d Work) are interruptible:
//   on the main thread, Python's signal handlers run between slices of the wait, so that Ctrl-C raises
//   KeyboardInterrupt while the operation goes on. Calls that wait inside the C++ library on buffers of its own (a
//   training step, ElasticSession.sync) cannot be left in the middle: the signal is handled when they return, which
//   is within the collective timeout.
// - C++ code that calls into Python (policies, state callbacks, the optimizer adapter) takes the GIL itself.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <aikido/peer.hpp>
#include <aikido/policy.hpp>
#include <aikido/work.hpp>
#include <chrono>
#include <memory>
#include <optional>
#include <string>

namespace aikido::python {

namespace py = pybind11;

/// How often a wait looks at Python's signals.
inline constexpr std::chrono::milliseconds kSignalSlice{50};

/// True on the thread that runs Python's signal handlers (the interpreter's main thread).
bool on_main_thread();

/// On the main thread: takes the GIL and runs Python's signal handlers; throws py::error_already_set when one raised
/// (KeyboardInterrupt for Ctrl-C). Elsewhere: nothing.
void check_signals();

/// Runs `fn` with the GIL released (the caller holds it).
template <class Fn>
decltype(auto) blocking(Fn&& fn) {
  py::gil_scoped_release release;
  return fn();
}

/// Waits for `work` with the GIL released (the caller holds it), checking signals between slices. Without a timeout,
/// until done (rethrowing its error); with one, returns false when it is still running after `timeout`.
bool wait_interruptibly(const Work& work, std::optional<std::chrono::milliseconds> timeout = std::nullopt);

/// A reference to a Python object that may be dropped from any thread: the last owner takes the GIL to release it.
/// Use it for Python objects captured by callbacks that C++ keeps (state registrations, policy factories).
class SharedObject {
 public:
  SharedObject() = default;
  explicit SharedObject(py::object object);
  /// The object; the caller holds the GIL.
  py::object get() const;
  explicit operator bool() const { return bool(holder_); }

 private:
  std::shared_ptr<py::object> holder_;
};

/// A CPU tensor for `object`: a torch.Tensor as it is, a numpy array as a tensor sharing its memory. TypeError for
/// other objects; ValueError naming `what` for tensors that are not on the CPU or not contiguous (results are written
/// in place, so a copy would not do).
at::Tensor as_tensor(py::handle object, const char* what);

/// torch's name of an element type: "float32", not c10's "Float".
std::string scalar_type_name(at::ScalarType type);

/// Seconds (Python float) to milliseconds; ValueError for negative or non-finite values.
std::chrono::milliseconds to_ms(double seconds, const char* what);
double to_seconds(std::chrono::milliseconds ms);

/// A policy for PolicyRunner: a spec string ("NAME[:key=value,...]", aikido::make_policy) or an aikido.Policy object,
/// whose hooks are called with the GIL.
std::unique_ptr<Policy> policy_from_python(py::handle policy);

// The parts of the module, defined in their translation units and called by the module init (module.cpp).
void bind_torch_api(py::module_& m);
void bind_process_group(py::module_& m);

// The library's element type of a tensor type; nullopt for those the library does not reduce (int8, bool, ...).
inline std::optional<DType> library_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return DType::f32;
    case at::kDouble:
      return DType::f64;
    case at::kHalf:
      return DType::f16;
    case at::kBFloat16:
      return DType::bf16;
    case at::kInt:
      return DType::i32;
    case at::kLong:
      return DType::i64;
    case at::kByte:
      return DType::u8;
    default:
      return std::nullopt;
  }
}

}  // namespace aikido::python
