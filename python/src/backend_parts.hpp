// Pieces of the torch.distributed backend "aikido" (process_group.cpp, the only file that includes this one): the
// c10d store as an aikido::Store, tensors as the library's buffers, reductions, the Work a call returns, and the
// thread that drives a group's collectives.
#pragma once

#include <aikido/peer.hpp>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <sstream>
#include <thread>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include "base/error.hpp"
#include "common.hpp"

namespace aikido::python::backend {

using detail::CollectiveKind;
using detail::str_cat;

// ---------------------------------------------------------------------------------------------------------------
// The c10d store as an aikido::Store (the rendezvous of the group's Peers)

inline std::vector<std::uint8_t> to_bytes(const std::string& s) { return {s.begin(), s.end()}; }
inline std::string to_string(const std::vector<std::uint8_t>& b) { return {b.begin(), b.end()}; }

class C10dStore final : public Store {
 public:
  C10dStore(c10::intrusive_ptr<c10d::Store> store, std::string prefix)
      : store_(std::move(store)), prefix_(std::move(prefix)) {}
  void set(const std::string& key, const std::string& value) override { store_->set(prefix_ + key, to_bytes(value)); }
  std::optional<std::string> get(const std::string& key) override {
    if (!store_->check({prefix_ + key})) return std::nullopt;
    return to_string(store_->get(prefix_ + key));
  }
  // Polls instead of c10d's blocking wait: the TCPStore client holds its one connection for the whole of a wait, so
  // two rendezvous at once in this process (send/recv pairs) would each block the other's requests.
  std::string wait(const std::string& key, std::chrono::milliseconds timeout) override {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    auto pause = std::chrono::milliseconds(1);
    for (;;) {
      try {
        if (store_->check({prefix_ + key})) return to_string(store_->get(prefix_ + key));
      } catch (const std::exception& e) {
        throw Error(str_cat("reading store key '", prefix_ + key, "' failed: ", e.what()));
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        throw TimeoutError(
            str_cat("store key '", prefix_ + key, "' did not appear within ", to_seconds(timeout), " s"));
      }
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, std::chrono::milliseconds(50));
    }
  }
  std::optional<std::string> compare_and_set(const std::string& key, const std::optional<std::string>& expected,
                                             const std::string& desired) override {
    return to_string(store_->compareSet(prefix_ + key, to_bytes(expected.value_or("")), to_bytes(desired)));
  }

 private:
  c10::intrusive_ptr<c10d::Store> store_;
  std::string prefix_;
};

// ---------------------------------------------------------------------------------------------------------------
// Tensors as the library's buffers

inline std::string type_name(const at::Tensor& t) { return scalar_type_name(t.scalar_type()); }

inline std::string describe(const at::Tensor& t) {
  std::ostringstream os;
  os << type_name(t) << " [";
  for (std::int64_t d = 0; d < t.dim(); ++d) os << (d ? ", " : "") << t.size(d);
  os << "]";
  return os.str();
}

// "4 float32": what a call's signature says about a tensor (element counts, not shapes, must agree).
inline std::string elements(const at::Tensor& t) { return str_cat(t.numel(), " ", type_name(t)); }

// The same error type with `prefix` before its message (the call that failed, for errors of its parts).
inline std::exception_ptr with_context(std::exception_ptr error, const std::string& prefix) {
  try {
    std::rethrow_exception(error);
  } catch (const TimeoutError& e) {
    return std::make_exception_ptr(TimeoutError(prefix + e.what()));
  } catch (const PeerLostError& e) {
    return std::make_exception_ptr(PeerLostError(prefix + e.what()));
  } catch (const MismatchError& e) {
    return std::make_exception_ptr(MismatchError(prefix + e.what()));
  } catch (const ConfigError& e) {
    return std::make_exception_ptr(ConfigError(prefix + e.what()));
  } catch (const Error& e) {
    return std::make_exception_ptr(Error(prefix + e.what()));
  } catch (...) {
    return std::current_exception();
  }
}

inline void require_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.defined(), "aikido backend: ", what, ": undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), "aikido backend: ", what, ": the tensor is on ", t.device().str(),
              "; this backend takes CPU tensors (use gloo or nccl for others)");
  TORCH_CHECK(t.is_contiguous(), "aikido backend: ", what, ": the tensor is not contiguous");
}

inline const at::Tensor& single(const std::vector<at::Tensor>& tensors, const char* what) {
  TORCH_CHECK(tensors.size() == 1, "aikido backend: ", what, " takes one tensor per process, got ", tensors.size());
  require_cpu(tensors[0], what);
  return tensors[0];
}

// A tensor's memory as bytes (the data-movement collectives do not look at element types).
inline std::byte* bytes_of(const at::Tensor& t) { return static_cast<std::byte*>(t.data_ptr()); }
inline std::size_t nbytes(const at::Tensor& t) { return static_cast<std::size_t>(t.nbytes()); }

inline at::Tensor byte_buffer(std::size_t n) { return at::empty({static_cast<std::int64_t>(n)}, at::kByte); }

// How a reduction runs: a library reduction on `view` (a tensor of a type the library reduces, sharing the memory), or
// a fold: an allgather of every rank's tensor, then the reduction locally with ATen (bitwise reductions, and element
// types the library does not reduce: int8, int16, bool sums, complex products).
struct Reduction {
  at::Tensor view;
  DType dtype = DType::f32;
  ReduceOp op = ReduceOp::sum;
  bool fold = false;
  c10d::ReduceOp::RedOpType c10d_op = c10d::ReduceOp::SUM;
  std::string name;  // for signatures and messages
};

inline const char* c10d_op_name(c10d::ReduceOp::RedOpType op) {
  switch (op) {
    case c10d::ReduceOp::SUM:
      return "SUM";
    case c10d::ReduceOp::AVG:
      return "AVG";
    case c10d::ReduceOp::PRODUCT:
      return "PRODUCT";
    case c10d::ReduceOp::MIN:
      return "MIN";
    case c10d::ReduceOp::MAX:
      return "MAX";
    case c10d::ReduceOp::BAND:
      return "BAND";
    case c10d::ReduceOp::BOR:
      return "BOR";
    case c10d::ReduceOp::BXOR:
      return "BXOR";
    case c10d::ReduceOp::PREMUL_SUM:
      return "PREMUL_SUM";
    default:
      return "UNKNOWN";
  }
}

// PREMUL_SUM's factor: a double, or a one-element tensor.
inline void premultiply(const at::Tensor& t, const c10d::ReduceOp& op) {
  auto* supplement = dynamic_cast<c10d::NCCLPreMulSumSupplement*>(op.supplement_.get());
  TORCH_CHECK(supplement, "aikido backend: PREMUL_SUM without a factor");
  if (!supplement->tensor_factors.empty()) {
    t.mul_(supplement->tensor_factors.front().to(t.device()));
  } else {
    t.mul_(supplement->double_factor);
  }
}

inline Reduction reduction_for(const at::Tensor& t, const c10d::ReduceOp& op, const char* what) {
  Reduction r;
  r.c10d_op = op;
  r.name = c10d_op_name(op);
  TORCH_CHECK(r.name != "UNKNOWN", "aikido backend: ", what, ": unknown reduction ", static_cast<int>(op.op_));
  const bool bitwise = op == c10d::ReduceOp::BAND || op == c10d::ReduceOp::BOR || op == c10d::ReduceOp::BXOR;
  TORCH_CHECK(!bitwise || !(at::isFloatingType(t.scalar_type()) || t.is_complex()), "aikido backend: ", what, ": ",
              r.name, " needs an integer or bool tensor, not ", type_name(t));
  at::Tensor view = t;
  if (t.is_complex() && (op == c10d::ReduceOp::SUM || op == c10d::ReduceOp::AVG || op == c10d::ReduceOp::PREMUL_SUM)) {
    view = at::view_as_real(t);  // element-wise on the real and imaginary parts
  }
  if (t.scalar_type() == at::kBool && (op == c10d::ReduceOp::BAND || op == c10d::ReduceOp::MIN ||
                                       op == c10d::ReduceOp::BOR || op == c10d::ReduceOp::MAX)) {
    // On 0/1 bytes, AND is MIN and OR is MAX.
    r.view = at::from_blob(
        t.data_ptr(), t.sizes(), [keep = t](void*) {}, t.options().dtype(at::kByte));
    r.dtype = DType::u8;
    r.op = op == c10d::ReduceOp::BAND || op == c10d::ReduceOp::MIN ? ReduceOp::min : ReduceOp::max;
    return r;
  }
  const auto dtype = library_dtype(view.scalar_type());
  if (bitwise || !dtype) {
    r.view = t;
    r.fold = true;
    return r;
  }
  r.view = view;
  r.dtype = *dtype;
  switch (op) {
    case c10d::ReduceOp::SUM:
    case c10d::ReduceOp::PREMUL_SUM:
      r.op = ReduceOp::sum;
      break;
    case c10d::ReduceOp::AVG:
      r.op = ReduceOp::mean;
      break;
    case c10d::ReduceOp::PRODUCT:
      r.op = ReduceOp::prod;
      break;
    case c10d::ReduceOp::MIN:
      r.op = ReduceOp::min;
      break;
    default:
      r.op = ReduceOp::max;
      break;
  }
  return r;
}

// Folds `size` blocks of `gathered` (each shaped like `into`, one after the other) into `into`.
inline void fold_into(const at::Tensor& into, const at::Tensor& gathered, int size, c10d::ReduceOp::RedOpType op) {
  const at::Tensor blocks = gathered.view({size, -1});
  at::Tensor acc = blocks[0].clone();
  for (int r = 1; r < size; ++r) {
    const at::Tensor& b = blocks[r];
    switch (op) {
      case c10d::ReduceOp::PRODUCT:
        acc.mul_(b);
        break;
      case c10d::ReduceOp::MIN:
        acc = at::minimum(acc, b);
        break;
      case c10d::ReduceOp::MAX:
        acc = at::maximum(acc, b);
        break;
      case c10d::ReduceOp::BAND:
        acc.bitwise_and_(b);
        break;
      case c10d::ReduceOp::BOR:
        acc.bitwise_or_(b);
        break;
      case c10d::ReduceOp::BXOR:
        acc.bitwise_xor_(b);
        break;
      default:  // SUM, AVG, PREMUL_SUM (premultiplied before)
        acc.add_(b);
        break;
    }
  }
  if (op == c10d::ReduceOp::AVG) {
    acc = at::isIntegralType(acc.scalar_type(), /*includeBool=*/true) ? at::div(acc, size, "trunc").to(acc.dtype())
                                                                      : acc.div(size);
  }
  into.view({-1}).copy_(acc);
}

// ---------------------------------------------------------------------------------------------------------------
// Work

constexpr std::size_t kSignatureBytes = 192;  // signatures are cut to this length for the exchange on a mismatch

class AikidoWork final : public c10d::Work {
 public:
  AikidoWork(int rank, c10d::OpType type, std::uint64_t call, std::vector<at::Tensor> outputs)
      : c10d::Work(rank, type), seq(call), outputs_(std::move(outputs)) {
    future_ = c10::make_intrusive<c10::ivalue::Future>(c10::ListType::create(c10::TensorType::get()));
  }

  const std::uint64_t seq;  // the call's sequence number in its group (send/recv: the message's number)
  std::string description;  // the call, for messages ("allreduce(SUM) of 4 float32")
  aikido::Work signature;   // the consensus on the call's signature (not for size-1 groups or send/recv)
  std::shared_ptr<bool> agreed = std::make_shared<bool>(false);

  /// Buffers that must live until every part is done.
  void keep(at::Tensor t) { keep_.push_back(std::move(t)); }
  /// Steps run in order once every part succeeded, before the work completes (copies out of temporaries).
  void on_success(std::function<void()> fn) { finish_.push_back(std::move(fn)); }
  /// Announces `parts` more parts; each completes through add() or add_result().
  void expect(int parts) {
    std::lock_guard<std::mutex> lock(parts_mutex_);
    pending_ += parts;
  }
  void add(const aikido::Work& part) {
    part.on_complete([self = c10::intrusive_ptr<AikidoWork>::reclaim_copy(this)](std::exception_ptr e) {
      self->add_result(std::move(e));
    });
  }
  void add_result(std::exception_ptr error) {
    {
      std::lock_guard<std::mutex> lock(parts_mutex_);
      if (error && !first_error_) first_error_ = error;
      if (--pending_ > 0) return;
      error = first_error_;
    }
    if (!error) {
      try {
        for (auto& step : finish_) step();
      } catch (...) {
        error = std::current_exception();
      }
    }
    if (error && !description.empty()) {
      error = with_context(error, str_cat("aikido backend: ", description, " failed: "));
    }
    complete(error);
    keep_.clear();  // every part is done: the buffers may go
    finish_.clear();
  }
  /// Called once every part was announced: the call's setup is complete.
  void seal() { add_result(nullptr); }
  /// The call failed for a reason found outside its data (a signature mismatch): the work completes now, while the
  /// parts still running keep the buffers.
  void fail_early(std::exception_ptr error) { complete(std::move(error)); }

  bool isCompleted() override {
    std::lock_guard<std::mutex> lock(mutex_);
    return completed_;
  }
  bool isSuccess() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    return completed_ && !exception_;
  }
  std::exception_ptr exception() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    return exception_;
  }
  std::vector<at::Tensor> result() override { return outputs_; }
  void synchronize() override {}
  void abort() override {
    TORCH_CHECK(false, "aikido backend: a collective cannot be aborted; it ends by itself within the timeout");
  }
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override { return future_; }

  // kNoTimeout: until completion (the collective's own deadline bounds it). Checks Python's signals between slices,
  // so that Ctrl-C interrupts a wait on the main thread.
  bool wait(std::chrono::milliseconds timeout) override {
    const auto start = std::chrono::steady_clock::now();
    std::unique_lock<std::mutex> lock(mutex_);
    while (!completed_) {
      if (timeout != kNoTimeout && std::chrono::steady_clock::now() - start >= timeout) {
        throw TimeoutError(str_cat("aikido backend: Work.wait() gave up after ", to_seconds(timeout),
                                   " s; the collective goes on and fails by itself when it cannot complete"));
      }
      cv_.wait_for(lock, kSignalSlice);
      if (!completed_) {
        lock.unlock();
        check_signals();
        lock.lock();
      }
    }
    if (exception_) std::rethrow_exception(exception_);
    return true;
  }

 private:
  void complete(std::exception_ptr error) {
    if (completing_.exchange(true)) return;
    // The future first: a thread that wait() releases may read it at once (work.get_future().value()).
    if (error) {
      future_->setError(error);
    } else {
      future_->markCompleted(c10::IValue(outputs_));
    }
    finish(error);  // c10d::Work: completed_, exception_, wakes waiters
  }

  std::vector<at::Tensor> outputs_;
  std::vector<at::Tensor> keep_;
  std::vector<std::function<void()>> finish_;
  std::mutex parts_mutex_;
  int pending_ = 1;  // seal() counts as one
  std::exception_ptr first_error_;
  std::atomic<bool> completing_{false};
  c10::intrusive_ptr<c10::ivalue::Future> future_;
};

using WorkPtr = c10::intrusive_ptr<AikidoWork>;

// Waits for every posted collective in turn. The library completes work soonest when a thread waits for it: the
// waiter reads the connections and runs the same-host collectives itself, while work that nobody waits for is picked
// up by a progress thread, which looks only every millisecond or so once it has been idle. c10d's callers (DDP) wait
// on futures that the library knows nothing of, so this thread is their waiter (measured: DDP on 2 workers at batch
// 64 ran at 0.6x Gloo's speed without it).
class Driver {
 public:
  Driver() : thread_([this] { loop(); }) {}
  ~Driver() { stop(); }
  void add(aikido::Work work) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(std::move(work));
    }
    wake_.notify_one();
  }
  /// Stops within a slice of a wait; the work still queued completes without it (the library's own threads).
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_one();
    if (thread_.joinable()) thread_.join();
  }

 private:
  static constexpr std::chrono::milliseconds kSlice{50};
  void loop() {
    for (;;) {
      aikido::Work work;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (stopping_) return;
        work = std::move(queue_.front());
        queue_.pop_front();
      }
      try {
        // In slices, so that stop() never waits for a collective's deadline.
        while (!work.wait(kSlice)) {
          std::lock_guard<std::mutex> lock(mutex_);
          if (stopping_) return;
        }
      } catch (...) {
        // The work's own completion callback reports its error.
      }
    }
  }
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<aikido::Work> queue_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace aikido::python::backend
