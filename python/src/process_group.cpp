// The torch.distributed backend "aikido": a c10d::ProcessGroup whose collectives run on an aikido::Peer.
//
// Version-specific part: PyTorch 1.13's custom backends subclass c10d::ProcessGroup and return c10d::Work (2.x moved
// this to c10d::Backend); everything below the ProcessGroupAikido methods is independent of that API.
//
// Matching. c10d calls carry no names: every call of a group gets the group's next sequence number `seq` (all ranks
// call a group's collectives in the same order, as c10d requires) and posts
//   - its data collectives as "c10d/<seq>/<op>" (plus a suffix where one call takes several), so that two ranks that
//     called different operations at the same point never exchange data;
//   - a consensus "c10d/<seq>" on the call's signature (operation, element type, sizes, root, reduction), so that they
//     learn it at once: when it fails, every rank gathers the signatures ("c10d/<seq>/signatures") and the call fails
//     with MismatchError naming the ranks and their calls, instead of waiting for the timeout.
// Point-to-point send/recv run on a 2-rank Peer per pair of ranks, made on first use.
//
// Completion. A call's Work completes when all its parts (the consensus and the data collectives) completed, from the
// library's completion callbacks; its future (getFuture, what DDP chains its bucket handling on) is then completed
// with the output tensors. Temporary buffers and the caller's tensors are kept alive until every part is done, even
// when the Work already failed (a mismatch) or was dropped.
#include <aikido/peer.hpp>
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include "backend_parts.hpp"
#include "base/error.hpp"
#include "base/sha256.hpp"
#include "common.hpp"

namespace aikido::python {
namespace {

using namespace backend;

// ---------------------------------------------------------------------------------------------------------------
// The process group

struct Pair;  // a 2-rank Peer for send/recv with one other rank

class ProcessGroupAikido final : public c10d::ProcessGroup {
 public:
  /// `cross_host_address`: where to listen when the group spans hosts and config.bind_address is empty (empty: none
  /// found, an error then).
  ProcessGroupAikido(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size, PeerConfig config,
                     const std::string& cross_host_address)
      : c10d::ProcessGroup(rank, size), store_(store), config_(std::move(config)) {
    config_.rank = rank;
    config_.size = size;
    config_.store = std::make_shared<C10dStore>(store, "aikido/");
    if (size > 1) agree_on_secret_and_address(cross_host_address);
    peer_ = std::make_unique<Peer>(Peer::create(config_));
  }
  ~ProcessGroupAikido() override;

  const std::string getBackendName() const override { return "aikido"; }
  Peer& peer() { return *peer_; }

  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& opts) override {
    const at::Tensor& t = single(tensors, "broadcast");
    check_root(opts.rootRank, "broadcast");
    WorkPtr work = start(c10d::OpType::BROADCAST, str_cat("broadcast(root ", opts.rootRank, ") of ", elements(t)), {t});
    post_bytes(work, CollectiveKind::broadcast, "broadcast", t, t, static_cast<int>(opts.rootRank));
    work->seal();
    return work;
  }

  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions& opts) override {
    const at::Tensor& t = single(tensors, "allreduce");
    const Reduction r = reduction_for(t, opts.reduceOp, "allreduce");
    WorkPtr work = start(c10d::OpType::ALLREDUCE, str_cat("allreduce(", r.name, ") of ", elements(t)), {t});
    if (opts.reduceOp == c10d::ReduceOp::PREMUL_SUM) premultiply(t, opts.reduceOp);
    if (r.fold) {
      fold(work, r, t, "allreduce");
    } else {
      post_reduction(work, CollectiveKind::allreduce, "allreduce", r, r.view, r.view);
    }
    work->seal();
    return work;
  }

  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(std::vector<at::Tensor>& tensors,
                                                     const c10d::AllreduceCoalescedOptions& opts) override {
    TORCH_CHECK(!tensors.empty(), "aikido backend: allreduce_coalesced of no tensors");
    for (const auto& t : tensors) {
      require_cpu(t, "allreduce_coalesced");
      TORCH_CHECK(t.scalar_type() == tensors[0].scalar_type(),
                  "aikido backend: allreduce_coalesced needs tensors of one type");
    }
    std::vector<at::Tensor> flat_parts;
    for (const auto& t : tensors) flat_parts.push_back(t.view({-1}));
    at::Tensor flat = at::cat(flat_parts);
    const Reduction r = reduction_for(flat, opts.reduceOp, "allreduce_coalesced");
    WorkPtr work = start(
        c10d::OpType::ALLREDUCE_COALESCED,
        str_cat("allreduce_coalesced(", r.name, ") of ", elements(flat), " in ", tensors.size(), " tensors"), tensors);
    if (opts.reduceOp == c10d::ReduceOp::PREMUL_SUM) premultiply(flat, opts.reduceOp);
    work->keep(flat);
    if (r.fold) {
      fold(work, r, flat, "allreduce_coalesced");
    } else {
      post_reduction(work, CollectiveKind::allreduce, "allreduce_coalesced", r, r.view, r.view);
    }
    work->on_success([flat, tensors] {
      std::int64_t offset = 0;
      for (const auto& t : tensors) {
        t.view({-1}).copy_(flat.narrow(0, offset, t.numel()));
        offset += t.numel();
      }
    });
    work->seal();
    return work;
  }

  c10::intrusive_ptr<c10d::Work> reduce(std::vector<at::Tensor>& tensors, const c10d::ReduceOptions& opts) override {
    const at::Tensor& t = single(tensors, "reduce");
    check_root(opts.rootRank, "reduce");
    const int root = static_cast<int>(opts.rootRank);
    const Reduction r = reduction_for(t, opts.reduceOp, "reduce");
    WorkPtr work = start(c10d::OpType::REDUCE, str_cat("reduce(root ", root, ", ", r.name, ") of ", elements(t)), {t});
    // Every rank computes the reduction (there is no rooted reduce below); only the root's tensor receives it.
    at::Tensor input = t;
    if (opts.reduceOp == c10d::ReduceOp::PREMUL_SUM) {
      input = t.clone();
      premultiply(input, opts.reduceOp);
    }
    if (r.fold) {
      at::Tensor into = getRank() == root ? t : at::empty_like(t);
      work->keep(into);
      fold(work, reduction_for(input, opts.reduceOp, "reduce"), into, "reduce", input);
    } else {
      const Reduction in = reduction_for(input, opts.reduceOp, "reduce");
      at::Tensor out = getRank() == root ? r.view : at::empty_like(in.view);
      post_reduction(work, CollectiveKind::allreduce, "reduce", in, in.view, out);
    }
    work->seal();
    return work;
  }

  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                           std::vector<at::Tensor>& inputs, const c10d::AllgatherOptions&) override {
    const at::Tensor& in = single(inputs, "allgather");
    TORCH_CHECK(outputs.size() == 1, "aikido backend: allgather takes one output list per process");
    check_blocks(outputs[0], in, "allgather");
    WorkPtr work = start(c10d::OpType::ALLGATHER, str_cat("allgather of ", elements(in)), outputs[0]);
    at::Tensor recv = contiguous_blocks(outputs[0]);
    const bool direct = recv.defined();
    if (!direct) recv = byte_buffer(nbytes(in) * static_cast<std::size_t>(getSize()));
    post_bytes(work, CollectiveKind::allgather, "allgather", in, recv, 0);
    if (!direct) work->on_success(scatter_blocks(recv, outputs[0]));
    work->seal();
    return work;
  }

  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& output, at::Tensor& input,
                                                 const c10d::AllgatherOptions&) override {
    require_cpu(output, "all_gather_into_tensor");
    require_cpu(input, "all_gather_into_tensor");
    TORCH_CHECK(output.scalar_type() == input.scalar_type() && output.numel() == input.numel() * getSize(),
                "aikido backend: all_gather_into_tensor: the output must hold ", getSize(), " x ", describe(input),
                ", it is ", describe(output));
    WorkPtr work = start(c10d::OpType::_ALLGATHER_BASE, str_cat("allgather of ", elements(input)), {output});
    post_bytes(work, CollectiveKind::allgather, "allgather", input, output, 0);
    work->seal();
    return work;
  }

  c10::intrusive_ptr<c10d::Work> allgather_coalesced(std::vector<std::vector<at::Tensor>>& outputs,
                                                     std::vector<at::Tensor>& inputs,
                                                     const c10d::AllgatherOptions&) override {
    TORCH_CHECK(outputs.size() == static_cast<std::size_t>(getSize()),
                "aikido backend: allgather_coalesced takes one output list per rank");
    std::size_t total = 0;
    std::string sizes;
    for (const auto& t : inputs) {
      require_cpu(t, "allgather_coalesced");
      total += nbytes(t);
      sizes += str_cat(sizes.empty() ? "" : ", ", elements(t));
    }
    for (const auto& list : outputs) {
      TORCH_CHECK(list.size() == inputs.size(), "aikido backend: allgather_coalesced: every output list needs ",
                  inputs.size(), " tensors");
      for (std::size_t i = 0; i < list.size(); ++i) {
        TORCH_CHECK(list[i].nbytes() == inputs[i].nbytes(), "aikido backend: allgather_coalesced: output ",
                    describe(list[i]), " does not fit input ", describe(inputs[i]));
      }
    }
    std::vector<at::Tensor> all;
    for (const auto& list : outputs) all.insert(all.end(), list.begin(), list.end());
    WorkPtr work = start(c10d::OpType::ALLGATHER_COALESCED, "allgather_coalesced of " + sizes, all);
    at::Tensor send = byte_buffer(total), recv = byte_buffer(total * static_cast<std::size_t>(getSize()));
    std::size_t offset = 0;
    for (const auto& t : inputs) {
      if (nbytes(t)) std::memcpy(bytes_of(send) + offset, bytes_of(t), nbytes(t));
      offset += nbytes(t);
    }
    post_bytes(work, CollectiveKind::allgather, "allgather_coalesced", send, recv, 0);
    work->on_success([recv, outputs, total] {
      std::size_t at = 0;
      for (const auto& list : outputs) {
        std::size_t in_block = 0;
        for (const auto& t : list) {
          if (nbytes(t)) std::memcpy(bytes_of(t), bytes_of(recv) + at + in_block, nbytes(t));
          in_block += nbytes(t);
        }
        at += total;
      }
    });
    work->seal();
    return work;
  }

  c10::intrusive_ptr<c10d::Work> gather(std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
                                        const c10d::GatherOptions& opts) override {
    const at::Tensor& in = single(inputs, "gather");
    check_root(opts.rootRank, "gather");
    const int root = static_cast<int>(opts.rootRank);
    std::vector<at::Tensor> outs;
    if (getRank() == root) {
      TORCH_CHECK(outputs.size() == 1, "aikido backend: gather takes one output list on the root");
      check_blocks(outputs[0], in, "gather");
      outs = outputs[0];
    } else {
      TORCH_CHECK(outputs.empty() || outputs[0].empty(), "aikido backend: gather: only the root takes outputs");
    }
    WorkPtr work = start(c10d::OpType::GATHER, str_cat("gather(root ", root, ") of ", elements(in)), outs);
    at::Tensor recv;
    if (getRank() == root) recv = byte_buffer(nbytes(in) * static_cast<std::size_t>(getSize()));
    post_bytes(work, CollectiveKind::gather, "gather", in, recv, root);
    if (getRank() == root) work->on_success(scatter_blocks(recv, outs));
    work->seal();
    return work;
  }

  c10::intrusive_ptr<c10d::Work> scatter(std::vector<at::Tensor>& outputs, std::vector<std::vector<at::Tensor>>& inputs,
                                         const c10d::ScatterOptions& opts) override {
    const at::Tensor& out = single(outputs, "scatter");
    check_root(opts.rootRank, "scatter");
    const int root = static_cast<int>(opts.rootRank);
    const std::size_t block = nbytes(out);
    at::Tensor all = byte_buffer(block * static_cast<std::size_t>(getSize()));
    if (getRank() == root) {
      TORCH_CHECK(inputs.size() == 1, "aikido backend: scatter takes one input list on the root");
      check_blocks(inputs[0], out, "scatter");
      for (int r = 0; r < getSize(); ++r) {
        if (block) std::memcpy(bytes_of(all) + block * r, bytes_of(inputs[0][r]), block);
      }
    } else {
      TORCH_CHECK(inputs.empty() || inputs[0].empty(), "aikido backend: scatter: only the root takes inputs");
    }
    WorkPtr work = start(c10d::OpType::SCATTER, str_cat("scatter(root ", root, ") of ", elements(out)), {out});
    // The root's blocks reach every rank (a broadcast); each keeps its own.
    post_bytes(work, CollectiveKind::broadcast, "scatter", all, all, root);
    work->on_success([all, out, block, rank = getRank()] {
      if (block) std::memcpy(bytes_of(out), bytes_of(all) + block * rank, block);
    });
    work->seal();
    return work;
  }

  c10::intrusive_ptr<c10d::Work> reduce_scatter(std::vector<at::Tensor>& outputs,
                                                std::vector<std::vector<at::Tensor>>& inputs,
                                                const c10d::ReduceScatterOptions& opts) override {
    const at::Tensor& out = single(outputs, "reduce_scatter");
    TORCH_CHECK(inputs.size() == 1, "aikido backend: reduce_scatter takes one input list per process");
    check_blocks(inputs[0], out, "reduce_scatter");
    std::vector<at::Tensor> flat_parts;
    for (const auto& t : inputs[0]) flat_parts.push_back(t.reshape({-1}));
    at::Tensor flat = at::cat(flat_parts);
    return reduce_scatter_flat(c10d::OpType::REDUCE_SCATTER, out, flat, opts.reduceOp);
  }

  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                                      const c10d::ReduceScatterOptions& opts) override {
    require_cpu(output, "reduce_scatter_tensor");
    require_cpu(input, "reduce_scatter_tensor");
    TORCH_CHECK(output.scalar_type() == input.scalar_type() && input.numel() == output.numel() * getSize(),
                "aikido backend: reduce_scatter_tensor: the input must hold ", getSize(), " x ", describe(output),
                ", it is ", describe(input));
    at::Tensor flat = input;
    if (opts.reduceOp == c10d::ReduceOp::PREMUL_SUM) flat = input.clone();  // premultiplied below, not in place
    return reduce_scatter_flat(c10d::OpType::_REDUCE_SCATTER_BASE, output, flat.view({-1}), opts.reduceOp);
  }

  c10::intrusive_ptr<c10d::Work> alltoall_base(at::Tensor& output, at::Tensor& input,
                                               std::vector<int64_t>& output_splits, std::vector<int64_t>& input_splits,
                                               const c10d::AllToAllOptions&) override {
    require_cpu(output, "all_to_all_single");
    require_cpu(input, "all_to_all_single");
    TORCH_CHECK(output.scalar_type() == input.scalar_type(), "aikido backend: all_to_all_single: the output is ",
                type_name(output), ", the input ", type_name(input));
    const int size = getSize();
    const auto rows = [size](const at::Tensor& t, const std::vector<int64_t>& splits, const char* what) {
      std::vector<std::int64_t> r(static_cast<std::size_t>(size));
      const std::int64_t n = t.dim() == 0 ? 1 : t.size(0);
      if (splits.empty()) {
        TORCH_CHECK(n % size == 0, "aikido backend: all_to_all_single: ", what, " has ", n,
                    " rows, which do not split evenly among ", size, " ranks; give split sizes");
        std::fill(r.begin(), r.end(), n / size);
      } else {
        TORCH_CHECK(splits.size() == static_cast<std::size_t>(size), "aikido backend: all_to_all_single: ", what,
                    " split sizes must have one entry per rank");
        std::int64_t total = 0;
        for (std::size_t i = 0; i < r.size(); ++i) total += (r[i] = splits[i]);
        TORCH_CHECK(total == n, "aikido backend: all_to_all_single: ", what, " split sizes add up to ", total,
                    " but the tensor has ", n, " rows");
      }
      return r;
    };
    const auto in_rows = rows(input, input_splits, "input"), out_rows = rows(output, output_splits, "output");
    const std::size_t in_row = input.numel() ? nbytes(input) / std::max<std::int64_t>(1, input.size(0)) : 0;
    const std::size_t out_row = output.numel() ? nbytes(output) / std::max<std::int64_t>(1, output.size(0)) : 0;
    std::vector<std::pair<std::byte*, std::size_t>> sends, recvs;
    std::size_t offset = 0;
    for (auto r : in_rows) {
      sends.push_back({bytes_of(input) + offset, static_cast<std::size_t>(r) * in_row});
      offset += static_cast<std::size_t>(r) * in_row;
    }
    offset = 0;
    for (auto r : out_rows) {
      recvs.push_back({bytes_of(output) + offset, static_cast<std::size_t>(r) * out_row});
      offset += static_cast<std::size_t>(r) * out_row;
    }
    WorkPtr work = start(c10d::OpType::ALLTOALL_BASE, str_cat("all_to_all of ", type_name(input)), {output});
    work->keep(input);
    alltoall_bytes(work, sends, recvs, input_splits.empty() && output_splits.empty());
    work->seal();
    return work;
  }

  c10::intrusive_ptr<c10d::Work> alltoall(std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
                                          const c10d::AllToAllOptions&) override {
    TORCH_CHECK(
        outputs.size() == static_cast<std::size_t>(getSize()) && inputs.size() == static_cast<std::size_t>(getSize()),
        "aikido backend: all_to_all takes one input and one output tensor per rank");
    std::vector<std::pair<std::byte*, std::size_t>> sends, recvs;
    for (const auto& t : inputs) {
      require_cpu(t, "all_to_all");
      sends.push_back({bytes_of(t), nbytes(t)});
    }
    for (const auto& t : outputs) {
      require_cpu(t, "all_to_all");
      recvs.push_back({bytes_of(t), nbytes(t)});
    }
    WorkPtr work = start(c10d::OpType::ALLTOALL, str_cat("all_to_all of ", type_name(inputs[0])), outputs);
    for (const auto& t : inputs) work->keep(t);
    alltoall_bytes(work, sends, recvs, false);
    work->seal();
    return work;
  }

  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions&) override {
    WorkPtr work = start(c10d::OpType::BARRIER, "barrier", {});  // the signature consensus is the barrier
    work->seal();
    return work;
  }

  c10::intrusive_ptr<c10d::Work> send(std::vector<at::Tensor>& tensors, int dst, int tag) override;
  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor>& tensors, int src, int tag) override;
  c10::intrusive_ptr<c10d::Work> recvAnysource(std::vector<at::Tensor>&, int) override {
    TORCH_CHECK(false,
                "aikido backend: recv without a source rank is not supported; pass src (send and recv are matched per "
                "pair of ranks)");
  }

  void setSequenceNumberForGroup() override {}  // every rank starts at 0
  uint64_t getSequenceNumberForGroup() override { return seq_.load(); }

 private:
  // Without AIKIDO_SECRET, rank 0 makes the job secret and shares it through the group's store (as safe as that
  // store). Without an explicit bind address, the ranks publish their host ids: one host, the Peer listens on
  // loopback (and uses shared memory and Unix sockets); several, on `cross_host_address`.
  void agree_on_secret_and_address(const std::string& cross_host_address) {
    Store& store = *config_.store;
    if (config_.secret.empty()) {
      if (getRank() == 0) {
        std::uint8_t bytes[32];
        detail::random_bytes(bytes, sizeof bytes);
        store.set("secret", detail::to_hex(bytes));
      }
      config_.secret = store.wait("secret", config_.timeout);
    }
    if (!config_.bind_address.empty()) return;
    store.set(str_cat("host/", getRank()), config_.host);
    std::vector<std::string> hosts;
    for (int r = 0; r < getSize(); ++r) {
      std::string host = store.wait(str_cat("host/", r), config_.timeout);
      if (std::find(hosts.begin(), hosts.end(), host) == hosts.end()) hosts.push_back(std::move(host));
    }
    if (hosts.size() == 1) {
      config_.bind_address = "127.0.0.1";
      return;
    }
    if (cross_host_address.empty()) {
      std::string list;
      for (const auto& h : hosts) list += (list.empty() ? "" : ", ") + h;
      throw ConfigError(str_cat("rank ", getRank(), ": the process group spans hosts ", list,
                                " but no address of this host other than loopback was found; set AIKIDO_BIND_ADDRESS "
                                "to an address the other hosts reach"));
    }
    config_.bind_address = cross_host_address;
  }

  void check_root(std::int64_t root, const char* what) const {
    TORCH_CHECK(root >= 0 && root < getSize(), "aikido backend: ", what, ": root ", root, " is not a rank of this ",
                getSize(), "-rank group");
  }

  // `blocks` holds one tensor per rank, each like `like`.
  void check_blocks(const std::vector<at::Tensor>& blocks, const at::Tensor& like, const char* what) const {
    TORCH_CHECK(blocks.size() == static_cast<std::size_t>(getSize()), "aikido backend: ", what, " needs ", getSize(),
                " tensors (one per rank), got ", blocks.size());
    for (const auto& b : blocks) {
      require_cpu(b, what);
      TORCH_CHECK(b.scalar_type() == like.scalar_type() && b.numel() == like.numel(), "aikido backend: ", what, ": ",
                  describe(b), " does not match ", describe(like));
    }
  }

  // When the tensors lie one after the other in memory, a byte view of them all (the collective writes there
  // directly); otherwise undefined.
  static at::Tensor contiguous_blocks(const std::vector<at::Tensor>& blocks) {
    if (blocks.empty()) return {};
    const std::size_t block = nbytes(blocks[0]);
    for (std::size_t i = 1; i < blocks.size(); ++i) {
      if (bytes_of(blocks[i]) != bytes_of(blocks[0]) + i * block) return {};
    }
    return at::from_blob(
        blocks[0].data_ptr(), {static_cast<std::int64_t>(block * blocks.size())}, [keep = blocks](void*) {},
        at::TensorOptions().dtype(at::kByte));
  }

  static std::function<void()> scatter_blocks(const at::Tensor& flat, const std::vector<at::Tensor>& blocks) {
    return [flat, blocks] {
      std::size_t at = 0;
      for (const auto& b : blocks) {
        if (nbytes(b)) std::memcpy(bytes_of(b), bytes_of(flat) + at, nbytes(b));
        at += nbytes(b);
      }
    };
  }

  // Starts a call: its sequence number, its Work, and the consensus on its signature.
  WorkPtr start(c10d::OpType type, std::string signature, std::vector<at::Tensor> outputs) {
    auto work = c10::make_intrusive<AikidoWork>(getRank(), type, seq_.fetch_add(1), std::move(outputs));
    work->description = str_cat(signature, " (call ", work->seq, " of its process group)");
    if (getSize() == 1) {
      *work->agreed = true;
      return work;
    }
    if (signature.size() > kSignatureBytes) signature.resize(kSignatureBytes);
    auto text = std::make_shared<std::string>(std::move(signature));
    work->expect(1);
    work->signature = peer_->consensus_async(
        std::span<const std::byte>(reinterpret_cast<const std::byte*>(text->data()), text->size()), *work->agreed,
        name(work->seq));
    driver_.add(work->signature);
    Peer* peer = peer_.get();
    const int size = getSize(), rank = getRank();
    // The callback holds the work (and through it `agreed`) and the signature until the consensus is done.
    work->signature.on_complete([work, text, peer, size, rank](std::exception_ptr error) {
      if (error || *work->agreed) {
        work->add_result(error);
        return;
      }
      describe_mismatch(*peer, size, rank, work, text);
    });
    return work;
  }

  // The signatures differ: every rank (all of them saw the consensus fail) gathers them, and the call fails with a
  // MismatchError that names the ranks and their calls, without waiting for the data collectives (which never meet).
  // Runs in the consensus's completion callback; the gathered signatures arrive in another.
  static void describe_mismatch(Peer& peer, int size, int rank, const WorkPtr& work,
                                const std::shared_ptr<std::string>& signature) {
    auto mine = std::make_shared<std::vector<std::uint8_t>>(kSignatureBytes, 0);
    auto all = std::make_shared<std::vector<std::uint8_t>>(kSignatureBytes * static_cast<std::size_t>(size), 0);
    std::memcpy(mine->data(), signature->data(), signature->size());
    const std::uint64_t version = peer.cluster_version();
    const auto fail = [work, version](const std::string& text) {
      work->fail_early(std::make_exception_ptr(MismatchError(str_cat(
          "aikido backend: ranks called different collectives as call ", work->seq,
          " of their process group (cluster version ", version, "): ", text,
          ". Every rank must call a group's collectives in the same order with the same sizes, types, operations "
          "and roots"))));
      work->add_result(nullptr);  // the consensus part is done; data parts still running keep their buffers
    };
    const std::string alone =
        str_cat("rank ", rank, " called ", *signature, " but another rank called something else at that point");
    aikido::Work gathered;
    try {
      gathered = peer.allgather_async(std::span<const std::uint8_t>(*mine), std::span<std::uint8_t>(*all),
                                      str_cat("c10d/", work->seq, "/signatures"));
    } catch (const std::exception&) {
      fail(alone);
      return;
    }
    gathered.on_complete([fail, alone, mine, all, size](std::exception_ptr error) {
      if (error) {
        fail(alone);
        return;
      }
      std::map<std::string, std::vector<int>> by_call;
      for (int r = 0; r < size; ++r) {
        const char* s = reinterpret_cast<const char*>(all->data()) + kSignatureBytes * static_cast<std::size_t>(r);
        by_call[std::string(s, strnlen(s, kSignatureBytes))].push_back(r);
      }
      std::string text;
      for (const auto& [call, ranks] : by_call) {
        std::string list;
        for (int r : ranks) list += (list.empty() ? "" : ", ") + std::to_string(r);
        text += str_cat(text.empty() ? "" : "; ", ranks.size() == 1 ? "rank " : "ranks ", list, " called ", call);
      }
      fail(text);
    });
  }

  static std::string name(std::uint64_t seq) { return str_cat("c10d/", seq); }
  static std::string name(std::uint64_t seq, const std::string& tag) { return str_cat("c10d/", seq, "/", tag); }

  // Posts one data collective of the current call as a part of `work`.
  void post_part(const WorkPtr& work, const detail::Request& request) {
    work->expect(1);
    aikido::Work part = peer_->post(request);
    work->add(part);
    driver_.add(std::move(part));
  }

  // Data movement on raw bytes.
  void post_bytes(const WorkPtr& work, CollectiveKind kind, const std::string& tag, const at::Tensor& send,
                  const at::Tensor& recv, int root) {
    work->keep(send);
    if (recv.defined()) work->keep(recv);
    const std::string n = name(work->seq, tag);
    post_part(work, {kind, DType::u8, ReduceOp::sum, root, bytes_of(send), recv.defined() ? bytes_of(recv) : nullptr,
                     nbytes(send), recv.defined() ? nbytes(recv) : 0, n});
  }

  void post_reduction(const WorkPtr& work, CollectiveKind kind, const std::string& tag, const Reduction& r,
                      const at::Tensor& send, const at::Tensor& recv) {
    work->keep(send);
    work->keep(recv);
    const std::string n = name(work->seq, tag);
    post_part(work, {kind, r.dtype, r.op, 0, send.data_ptr(), recv.data_ptr(), static_cast<std::size_t>(send.numel()),
                     static_cast<std::size_t>(recv.numel()), n});
  }

  // Bitwise reductions: gather every rank's `input` (default: `into`) and fold them into `into`.
  void fold(const WorkPtr& work, const Reduction& r, const at::Tensor& into, const std::string& tag,
            at::Tensor input = {}) {
    if (!input.defined()) input = into;
    at::Tensor gathered = at::empty({getSize() * input.numel()}, input.options());
    post_bytes(work, CollectiveKind::allgather, tag + "/fold", input, gathered, 0);
    work->on_success([into, gathered, size = getSize(), op = r.c10d_op] { fold_into(into, gathered, size, op); });
  }

  c10::intrusive_ptr<c10d::Work> reduce_scatter_flat(c10d::OpType type, const at::Tensor& out, at::Tensor flat,
                                                     const c10d::ReduceOp& op) {
    const Reduction r = reduction_for(flat, op, "reduce_scatter");
    WorkPtr work = start(type, str_cat("reduce_scatter(", r.name, ") of ", elements(out)), {out});
    if (op == c10d::ReduceOp::PREMUL_SUM) premultiply(flat, op);
    if (r.fold) {
      at::Tensor gathered = at::empty({getSize() * flat.numel()}, flat.options());
      post_bytes(work, CollectiveKind::allgather, "reduce_scatter/fold", flat, gathered, 0);
      work->on_success([out, gathered, size = getSize(), rank = getRank(), c = r.c10d_op] {
        const at::Tensor blocks = gathered.view({size, size, -1});
        at::Tensor mine = at::empty({size, blocks.size(2)}, gathered.options());
        for (int q = 0; q < size; ++q) mine[q].copy_(blocks[q][rank]);
        fold_into(out, mine.view({-1}), size, c);
      });
    } else {
      const Reduction o = reduction_for(out, op, "reduce_scatter");
      post_reduction(work, CollectiveKind::reduce_scatter, "reduce_scatter", r, r.view, o.view);
    }
    work->seal();
    return work;
  }

  // All-to-all on byte ranges: one gather per rank (rank r gathers what every rank sends it), with blocks padded to
  // the largest one sent to r. Uneven splits first exchange the matrix of sizes (a small allgather, waited for here).
  void alltoall_bytes(const WorkPtr& work, const std::vector<std::pair<std::byte*, std::size_t>>& sends,
                      const std::vector<std::pair<std::byte*, std::size_t>>& recvs, bool even) {
    const int size = getSize(), rank = getRank();
    const auto n = static_cast<std::size_t>(size);
    std::vector<std::int64_t> matrix(n * n);  // matrix[q * n + r]: bytes q sends to r
    if (even) {
      for (std::size_t q = 0; q < n; ++q) {
        for (std::size_t r = 0; r < n; ++r) matrix[q * n + r] = static_cast<std::int64_t>(sends[r].second);
      }
    } else {
      std::vector<std::int64_t> mine(n);
      for (std::size_t r = 0; r < n; ++r) mine[r] = static_cast<std::int64_t>(sends[r].second);
      if (size > 1) {
        // Only once the signatures agreed: a rank that called something else would never post the sizes.
        work->signature.wait();
        if (!*work->agreed) return;  // the work fails with the mismatch
        peer_->allgather(std::span<const std::int64_t>(mine), std::span<std::int64_t>(matrix),
                         name(work->seq, "all_to_all/sizes"));
      } else {
        matrix = mine;
      }
    }
    for (std::size_t q = 0; q < n; ++q) {
      TORCH_CHECK(matrix[q * n + static_cast<std::size_t>(rank)] == static_cast<std::int64_t>(recvs[q].second),
                  "aikido backend: all_to_all: rank ", q, " sends ", matrix[q * n + static_cast<std::size_t>(rank)],
                  " bytes to rank ", rank, ", which expects ", recvs[q].second);
    }
    std::vector<at::Tensor> gathered(n);
    for (std::size_t r = 0; r < n; ++r) {
      std::int64_t block = 0;
      for (std::size_t q = 0; q < n; ++q) block = std::max(block, matrix[q * n + r]);
      at::Tensor send = byte_buffer(static_cast<std::size_t>(block));
      if (sends[r].second) std::memcpy(bytes_of(send), sends[r].first, sends[r].second);
      at::Tensor recv;
      if (static_cast<int>(r) == rank) recv = gathered[r] = byte_buffer(static_cast<std::size_t>(block) * n);
      post_bytes(work, CollectiveKind::gather, str_cat("all_to_all/", r), send, recv, static_cast<int>(r));
    }
    std::int64_t block = 0;
    for (std::size_t q = 0; q < n; ++q) block = std::max(block, matrix[q * n + static_cast<std::size_t>(rank)]);
    work->on_success([recvs, mine = gathered[static_cast<std::size_t>(rank)], block] {
      for (std::size_t q = 0; q < recvs.size(); ++q) {
        if (recvs[q].second) {
          std::memcpy(recvs[q].first, bytes_of(mine) + static_cast<std::size_t>(block) * q, recvs[q].second);
        }
      }
    });
  }

  Pair& pair_with(int other);
  c10::intrusive_ptr<c10d::Work> point_to_point(std::vector<at::Tensor>& tensors, int other, int tag, bool sending);

  c10::intrusive_ptr<c10d::Store> store_;
  PeerConfig config_;
  std::unique_ptr<Peer> peer_;
  std::atomic<std::uint64_t> seq_{0};
  std::mutex pairs_mutex_;
  std::map<int, std::unique_ptr<Pair>> pairs_;
  std::map<std::tuple<int, int, int>, std::uint64_t> p2p_count_;  // (from, to, tag) -> messages so far
  Driver driver_;
};

// A 2-rank Peer for the messages between this rank and one other, made in the background on first use (both ranks
// of a pair make it when they first send or receive to each other; doing it in the calling thread could deadlock a
// ring of sends).
struct Pair {
  std::mutex mutex;
  std::unique_ptr<Peer> peer;
  std::exception_ptr error;
  bool ready = false;
  std::vector<std::function<void(Peer*, std::exception_ptr)>> waiting;
  std::thread maker;
};

Pair& ProcessGroupAikido::pair_with(int other) {
  std::lock_guard<std::mutex> lock(pairs_mutex_);
  auto& slot = pairs_[other];
  if (slot) return *slot;
  slot = std::make_unique<Pair>();
  Pair* pair = slot.get();
  const int low = std::min(getRank(), other), high = std::max(getRank(), other);
  PeerConfig c = config_;
  c.rank = getRank() == low ? 0 : 1;
  c.size = 2;
  c.store = std::make_shared<C10dStore>(store_, str_cat("aikido/p2p/", low, "-", high, "/"));
  c.job_id = str_cat(config_.job_id, "-p2p-", low, "-", high);
  pair->maker = std::thread([pair, c] {
    std::unique_ptr<Peer> peer;
    std::exception_ptr error;
    try {
      peer = std::make_unique<Peer>(Peer::create(c));
    } catch (...) {
      error = std::current_exception();
    }
    std::vector<std::function<void(Peer*, std::exception_ptr)>> run;
    {
      std::lock_guard<std::mutex> lock(pair->mutex);
      pair->peer = std::move(peer);
      pair->error = error;
      pair->ready = true;
      run.swap(pair->waiting);
    }
    for (auto& fn : run) fn(pair->peer.get(), error);
  });
  return *pair;
}

// A message is a broadcast from the sender in the pair's Peer, named by direction, tag and number: the n-th send from
// a to b with tag t meets the n-th recv at b from a with tag t. Different sizes raise MismatchError on both sides.
c10::intrusive_ptr<c10d::Work> ProcessGroupAikido::point_to_point(std::vector<at::Tensor>& tensors, int other, int tag,
                                                                  bool sending) {
  const char* what = sending ? "send" : "recv";
  const at::Tensor& t = single(tensors, what);
  TORCH_CHECK(other >= 0 && other < getSize() && other != getRank(), "aikido backend: ", what, ": rank ", other,
              " is not another rank of this ", getSize(), "-rank group");
  const int from = sending ? getRank() : other, to = sending ? other : getRank();
  std::uint64_t number;
  {
    std::lock_guard<std::mutex> lock(pairs_mutex_);
    number = p2p_count_[{from, to, tag}]++;
  }
  auto work = c10::make_intrusive<AikidoWork>(getRank(), sending ? c10d::OpType::SEND : c10d::OpType::RECV, number,
                                              sending ? std::vector<at::Tensor>{} : std::vector<at::Tensor>{t});
  work->description = sending ? str_cat("send of ", elements(t), " to rank ", to, " (tag ", tag, ")")
                              : str_cat("recv of ", elements(t), " from rank ", from, " (tag ", tag, ")");
  work->keep(t);
  work->expect(1);
  const int root = from == std::min(from, to) ? 0 : 1;
  auto post = [work, t, root, driver = &driver_, name = str_cat("p2p/", from, "->", to, "/", tag, "/", number)](
                  Peer* peer, std::exception_ptr error) {
    if (error) {
      work->add_result(error);
      return;
    }
    try {
      aikido::Work part = peer->post({CollectiveKind::broadcast, DType::u8, ReduceOp::sum, root, bytes_of(t),
                                      bytes_of(t), nbytes(t), nbytes(t), name});
      work->add(part);
      driver->add(std::move(part));
    } catch (...) {
      work->add_result(std::current_exception());
    }
  };
  Pair& pair = pair_with(other);
  Peer* ready = nullptr;
  std::exception_ptr error;
  bool queued = false;
  {
    std::lock_guard<std::mutex> lock(pair.mutex);
    if (!pair.ready) {
      pair.waiting.push_back(post);
      queued = true;
    } else {
      ready = pair.peer.get();
      error = pair.error;
    }
  }
  if (!queued) post(ready, error);
  work->seal();
  return work;
}

c10::intrusive_ptr<c10d::Work> ProcessGroupAikido::send(std::vector<at::Tensor>& tensors, int dst, int tag) {
  return point_to_point(tensors, dst, tag, true);
}

c10::intrusive_ptr<c10d::Work> ProcessGroupAikido::recv(std::vector<at::Tensor>& tensors, int src, int tag) {
  return point_to_point(tensors, src, tag, false);
}

ProcessGroupAikido::~ProcessGroupAikido() {
  driver_.stop();  // before the Peers go: it may be inside one's wait
  // A pair still being made gives up within the timeout.
  for (auto& [rank, pair] : pairs_) {
    if (pair->maker.joinable()) pair->maker.join();
  }
  pairs_.clear();
  peer_.reset();
}

// The Python side's settings of the group's Peer (aikido/torch/_backend.py decides them).
PeerConfig config_from(const py::dict& settings) {
  PeerConfig c;
  c.bind_address.clear();  // decided by the group's hosts unless given
  for (auto [key, value] : settings) {
    const std::string k = py::str(key);
    if (k == "secret") {
      c.secret = value.cast<std::string>();
    } else if (k == "host") {
      c.host = value.cast<std::string>();
    } else if (k == "bind_address") {
      c.bind_address = value.cast<std::string>();
    } else if (k == "job_id") {
      c.job_id = value.cast<std::string>();
    } else if (k == "timeout") {
      c.timeout = to_ms(value.cast<double>(), "timeout");
    } else if (k == "topology") {
      c.topology = parse_topology(value.cast<std::string>());
    } else if (k == "transport") {
      c.transport = parse_transport(value.cast<std::string>());
    } else if (k == "segment_bytes") {
      c.segment_bytes = value.cast<std::size_t>();
    } else if (k == "tcp_congestion") {
      c.tcp_congestion = value.cast<std::string>();
    } else {
      throw py::value_error("unknown process group setting '" + k + "'");
    }
  }
  return c;
}

}  // namespace

void bind_process_group(py::module_& m) {
  py::module_::import("torch.distributed");  // registers c10d's ProcessGroup, Store and Work with pybind11
  py::class_<ProcessGroupAikido, c10d::ProcessGroup, c10::intrusive_ptr<ProcessGroupAikido>>(
      m, "ProcessGroupAikido", "The torch.distributed backend 'aikido' (made by torch.distributed, not directly).")
      .def(py::init([](const c10::intrusive_ptr<c10d::Store>& store, int rank, int size, const py::dict& settings,
                       const std::string& cross_host_address) {
             PeerConfig config = config_from(settings);
             return blocking([&] {
               return c10::make_intrusive<ProcessGroupAikido>(store, rank, size, config, cross_host_address);
             });
           }),
           py::arg("store"), py::arg("rank"), py::arg("size"), py::arg("settings"), py::arg("cross_host_address"))
      .def_property_readonly("peer", &ProcessGroupAikido::peer, py::return_value_policy::reference_internal,
                             "The group's aikido.Peer (its collectives are named, and do not disturb the group's).");
}

}  // namespace aikido::python
