// Hierarchical collectives on a cluster of several hosts with the same number of ranks on each (several): phases
// inside each host, through the host's shared-memory segment (over the connections when it has none), and across
// hosts over the connections, among the ranks of one local index, so that every rank of a host carries a slice of
// the buffer across hosts and all of them drive the links between hosts at once.
//
// Phases, with H hosts of L ranks, this rank at local index l, and group l the ranks of local index l (one per host,
// in host order):
//   allreduce, large   inside: reduce-scatter (rank l gets its host's reduction of slice l of the chunk)
//                      across: allreduce of slice l among group l
//                      inside: allgather (every slice to every rank of the host)
//   allreduce, small;  inside: the same collective among the host's ranks
//   barrier; consensus across: the same among group l, of the host's result (each group carries all of it; for a
//                      consensus the host's combined digests, or this host's own mark when its ranks disagreed)
//   reduce_scatter     the input is rearranged by local index (group l's blocks together), then
//                      inside: reduce-scatter (rank l gets its host's reduction of group l's blocks)
//                      across: reduce-scatter among group l (each member its own block)
//   allgather          across: allgather among group l into group l's place of a workspace
//                      inside: allgather (every group's blocks), then rearranged into rank order
//   broadcast          on the root's host: inside: broadcast from the root. Everywhere: across: broadcast of slice
//                      l among group l from the root's host. Off the root's host: inside: allgather.
// Large buffers go in chunks, each through all its phases; up to kLanes chunks are in flight at once, so that one
// chunk crosses hosts while the next is reduced inside them. A lane's chunks run one after the other under the
// lane's phase names, derived from the collective's ("aikido.h/<name>/in<lane>" inside, "aikido.h/<name>/x<l>.<lane>"
// across); every phase carries the collective's signature (kind, type, op, root and the whole collective's count),
// so that ranks that posted it differently fail alike in whichever phase meets them first.
//
// Failures: a rank whose phase fails gives up the phases it has not posted (it abandons them, lane by lane in the
// order it would have posted them, once the lane's phase in flight has ended: the ranks waiting for them fail at
// once, naming it) and fails the collective with the first error, prefixed with the collective's name. The
// collective completes once none of its phases still touches its buffers.
#include "runtime/engine_hierarchy.hpp"

#include <algorithm>
#include <cstring>

#include "base/crypto.hpp"
#include "base/error.hpp"
#include "base/reduce.hpp"
#include "collective/algorithms.hpp"
#include "runtime/engine.hpp"
#include "runtime/engine_collective.hpp"
#include "runtime/work_state.hpp"

namespace aikido::detail {

using transport::WireError;

namespace {

/// Chunks in flight at once (each has its own phase names).
constexpr int kLanes = 4;
/// A buffer is cut into at most this many chunks (their size otherwise follows the links: collective::chunk_bytes).
constexpr std::size_t kMaxChunks = 16;

struct Slice {
  std::size_t offset;
  std::size_t count;
};
Slice slice(std::size_t count, int parts, int q) {
  return {collective::block_offset(count, parts, q), collective::block_count(count, parts, q)};
}

}  // namespace

std::optional<HostLayout> HostLayout::of(const ClusterInfo& info, int rank) {
  const int size = int(info.host_of_rank.size());
  int hosts = 0;
  for (int h : info.host_of_rank) hosts = std::max(hosts, h + 1);
  if (hosts < 2 || size % hosts != 0 || size / hosts < 2) return std::nullopt;
  HostLayout layout;
  layout.hosts = hosts;
  layout.per_host = size / hosts;
  std::vector<std::vector<int>> ranks_of_host(static_cast<std::size_t>(hosts));
  for (int r = 0; r < size; ++r) ranks_of_host[std::size_t(info.host_of_rank[std::size_t(r)])].push_back(r);
  for (const auto& ranks : ranks_of_host) {
    if (int(ranks.size()) != layout.per_host) return std::nullopt;
  }
  layout.groups.assign(std::size_t(layout.per_host), {});
  for (int h = 0; h < hosts; ++h) {
    for (int l = 0; l < layout.per_host; ++l) {
      const int r = ranks_of_host[std::size_t(h)][std::size_t(l)];
      layout.groups[std::size_t(l)].push_back(r);
      if (r == rank) {
        layout.host = h;
        layout.local = l;
      }
    }
  }
  layout.local_ranks = ranks_of_host[std::size_t(layout.host)];
  return layout;
}

bool HierarchicalCollective::handles(CollectiveKind kind) { return kind != CollectiveKind::gather; }

HierarchicalCollective::HierarchicalCollective(Engine& engine, const Request& request, std::uint64_t seq,
                                               const HierarchyPlan& plan)
    : engine_(engine),
      layout_(*engine.host_layout()),
      request_(request),
      name_(request.name),
      seq_(seq),
      plan_(plan),
      esize_(dtype_size(request.dtype)),
      phase_op_(request.op == ReduceOp::mean ? ReduceOp::sum : request.op),
      work_(std::make_shared<WorkState>()) {
  request_.name = name_;
  // What every rank must have posted alike beside kind, type, op and root (the consensus compares values of any
  // length: its phases carry digests).
  switch (request.kind) {
    case CollectiveKind::allgather:
      signature_ = request.recv_count;
      break;
    case CollectiveKind::barrier:
      signature_ = 1;
      break;
    case CollectiveKind::consensus:
      signature_ = 64;
      break;
    default:
      signature_ = request.send_count;
      break;
  }
  // Phase names: the collective's own, or its digest where that would make them too long.
  if (name_.size() + 32 <= transport::kMaxNameBytes) {
    base_ = name_;
  } else {
    base_ = to_hex(sha256(name_.data(), name_.size()));
  }
}

std::string HierarchicalCollective::label() const {
  return str_cat(kind_name(request_.kind), " '", name_, "' (seq ", seq_, ")");
}

std::string HierarchicalCollective::inside_name(int lane) const { return str_cat("aikido.h/", base_, "/in", lane); }

std::string HierarchicalCollective::across_name(int lane) const {
  return str_cat("aikido.h/", base_, "/x", layout_.local, ".", lane);
}

void HierarchicalCollective::build() {
  const int L = layout_.per_host, H = layout_.hosts, l = layout_.local, h = layout_.host;
  const int n = L * H;
  switch (request_.kind) {
    case CollectiveKind::allreduce: {
      const std::size_t count = request_.send_count;
      auto* out = static_cast<std::byte*>(request_.recv);
      const auto* in = static_cast<const std::byte*>(request_.send);
      if (count * esize_ <= plan_.small_bytes) {
        Chunk chunk;
        chunk.steps.push_back(inside(CollectiveKind::allreduce, in, out, count));
        chunk.steps.push_back(across_allreduce(out, count));
        if (request_.op == ReduceOp::mean) {
          chunk.steps.back().after = [this, out, count, n] { divide_by_count(request_.dtype, out, count, n); };
        }
        chunks_.push_back(std::move(chunk));
        break;
      }
      const std::size_t chunk_elems =
          std::max<std::size_t>({1, plan_.chunk_bytes / esize_, (count + kMaxChunks - 1) / kMaxChunks});
      for (std::size_t at = 0; at < count; at += chunk_elems) {
        const std::size_t len = std::min(chunk_elems, count - at);
        const Slice mine = slice(len, L, l);
        std::byte* base = out + at * esize_;
        std::byte* own = base + mine.offset * esize_;
        Chunk chunk;
        chunk.steps.push_back(inside(CollectiveKind::reduce_scatter, in + at * esize_, base, len));
        chunk.steps.push_back(across_allreduce(own, mine.count));
        if (request_.op == ReduceOp::mean) {
          chunk.steps.back().after = [this, own, c = mine.count, n] { divide_by_count(request_.dtype, own, c, n); };
        }
        chunk.steps.push_back(inside(CollectiveKind::allgather, base, base, len));
        chunks_.push_back(std::move(chunk));
      }
      break;
    }
    case CollectiveKind::barrier: {
      Chunk chunk;
      chunk.steps.push_back(inside(CollectiveKind::barrier, nullptr, nullptr, 0));
      Step across;
      across.kind = CollectiveKind::barrier;
      chunk.steps.push_back(across);
      chunks_.push_back(std::move(chunk));
      break;
    }
    case CollectiveKind::consensus: {
      // Inside, the ranks of a host check that they agree; across, the hosts check that their values agree: each
      // offers its value's digest when its ranks agreed, and a mark of its own (which no other host offers) when not.
      Chunk chunk;
      chunk.steps.push_back(inside(CollectiveKind::consensus, request_.send, nullptr, request_.send_count));
      chunk.steps.back().agreed = &host_agreed_;
      chunk.steps.back().after = [this, h] {
        const Digest d = sha256(request_.send, request_.send_count);
        host_value_ = host_agreed_ ? to_hex(d) : str_cat("ranks of host ", h, " disagree");
      };
      Step across;
      across.kind = CollectiveKind::consensus;
      across.agreed = &agreed_;
      chunk.steps.push_back(across);
      chunks_.push_back(std::move(chunk));
      break;
    }
    case CollectiveKind::reduce_scatter: {
      // The workspace holds group l's blocks together: group g's member j's block at (g * H + j) * k.
      const std::size_t k = request_.recv_count;
      workspace_ = engine_.pool().acquire(std::max<std::size_t>(1, std::size_t(n) * k * esize_));
      const auto* in = static_cast<const std::byte*>(request_.send);
      for (int g = 0; g < L; ++g) {
        for (int j = 0; j < H; ++j) {
          const int r = layout_.groups[std::size_t(g)][std::size_t(j)];
          if (k > 0) {
            std::memcpy(workspace_.data() + (std::size_t(g) * H + j) * k * esize_, in + std::size_t(r) * k * esize_,
                        k * esize_);
          }
        }
      }
      // One chunk: the blocks of a chunk would not lie together.
      Chunk chunk;
      std::byte* ws = workspace_.data();
      chunk.steps.push_back(inside(CollectiveKind::reduce_scatter, ws, ws, std::size_t(n) * k));
      Step across;
      across.kind = CollectiveKind::reduce_scatter;
      across.send = ws + std::size_t(l) * H * k * esize_;
      across.recv = request_.recv;
      across.send_count = std::size_t(H) * k;
      across.recv_count = k;
      chunk.steps.push_back(across);
      if (request_.op == ReduceOp::mean) {
        chunk.steps.back().after = [this, k, n] { divide_by_count(request_.dtype, request_.recv, k, n); };
      }
      chunks_.push_back(std::move(chunk));
      break;
    }
    case CollectiveKind::allgather: {
      const std::size_t k = request_.send_count;
      workspace_ = engine_.pool().acquire(std::max<std::size_t>(1, std::size_t(n) * k * esize_));
      std::byte* ws = workspace_.data();
      Chunk chunk;
      Step across;
      across.kind = CollectiveKind::allgather;
      across.send = request_.send;
      across.recv = ws + std::size_t(l) * H * k * esize_;
      across.send_count = k;
      across.recv_count = std::size_t(H) * k;
      chunk.steps.push_back(across);
      chunk.steps.push_back(
          inside(CollectiveKind::allgather, ws + std::size_t(l) * H * k * esize_, ws, std::size_t(n) * k));
      chunk.steps.back().after = [this, k, L, H] {
        auto* out = static_cast<std::byte*>(request_.recv);
        for (int g = 0; g < L; ++g) {
          for (int j = 0; j < H; ++j) {
            const int r = layout_.groups[std::size_t(g)][std::size_t(j)];
            if (k > 0) {
              std::memcpy(out + std::size_t(r) * k * esize_, workspace_.data() + (std::size_t(g) * H + j) * k * esize_,
                          k * esize_);
            }
          }
        }
      };
      chunks_.push_back(std::move(chunk));
      break;
    }
    case CollectiveKind::broadcast: {
      const std::size_t count = request_.send_count;
      auto* buffer = static_cast<std::byte*>(request_.recv);
      const int root = request_.root;
      const auto root_local =
          int(std::find(layout_.local_ranks.begin(), layout_.local_ranks.end(), root) - layout_.local_ranks.begin());
      const bool root_host = root_local < L;
      // The root's host, by the group member of the root's local index.
      int root_host_index = 0;
      for (int g = 0; g < L; ++g) {
        for (int j = 0; j < H; ++j) {
          if (layout_.groups[std::size_t(g)][std::size_t(j)] == root) root_host_index = j;
        }
      }
      const std::size_t chunk_elems =
          std::max<std::size_t>({1, plan_.chunk_bytes / esize_, (count + kMaxChunks - 1) / kMaxChunks});
      for (std::size_t at = 0; at < count || (count == 0 && at == 0); at += chunk_elems) {
        const std::size_t len = std::min(chunk_elems, count - at);
        const Slice mine = slice(len, L, l);
        std::byte* base = buffer + at * esize_;
        Chunk chunk;
        if (root_host) {
          Step in = inside(CollectiveKind::broadcast, nullptr, base, len);
          in.root = root_local;
          chunk.steps.push_back(in);
        }
        Step across;
        across.kind = CollectiveKind::broadcast;
        across.root = layout_.groups[std::size_t(l)][std::size_t(root_host_index)];
        across.send = across.recv = base + mine.offset * esize_;
        across.send_count = across.recv_count = mine.count;
        chunk.steps.push_back(across);
        if (!root_host)
          chunk.steps.push_back(inside(CollectiveKind::allgather, base + mine.offset * esize_, base, len));
        chunks_.push_back(std::move(chunk));
        if (count == 0) break;
      }
      // The root's part ends once its data is sent, whatever the others did: a barrier inside and across hosts at
      // the end makes every rank complete only once every rank finished its phases (so a rank that posted another
      // root, or left, fails the broadcast on every rank, as on the other topologies).
      Chunk& last = chunks_.back();
      last.steps.push_back(inside(CollectiveKind::barrier, nullptr, nullptr, 0));
      Step confirm;
      confirm.kind = CollectiveKind::barrier;
      last.steps.push_back(confirm);
      break;
    }
    case CollectiveKind::gather:
      throw Error("gather has no hierarchical form");
  }
  if (chunks_.empty()) {  // an allreduce of nothing: one chunk of empty phases keeps every rank's phases alike
    chunks_.push_back(Chunk{{inside(CollectiveKind::reduce_scatter, request_.send, request_.recv, 0),
                             across_allreduce(static_cast<std::byte*>(request_.recv), 0),
                             inside(CollectiveKind::allgather, request_.recv, request_.recv, 0)}});
  }
  lanes_ = std::min<int>(kLanes, int(chunks_.size()));
  for (std::size_t c = 0; c < chunks_.size(); ++c) chunks_[c].lane = int(c % std::size_t(lanes_));
}

HierarchicalCollective::Step HierarchicalCollective::inside(CollectiveKind kind, const void* input, void* buffer,
                                                            std::size_t count) const {
  Step s;
  s.inside = true;
  s.kind = kind;
  s.send = input;
  s.recv = buffer;
  s.count = count;
  return s;
}

HierarchicalCollective::Step HierarchicalCollective::across_allreduce(void* buffer, std::size_t count) const {
  Step s;
  s.kind = CollectiveKind::allreduce;
  s.send = s.recv = buffer;
  s.send_count = s.recv_count = count;
  return s;
}

ShmRequest HierarchicalCollective::shm_request(const Step& step) const {
  ShmRequest r;
  r.kind = step.kind;
  r.dtype = request_.dtype;
  r.op = phase_op_;
  r.root = step.root;
  r.count = step.count;
  r.signature_count = signature_;
  r.signature_root = request_.root;
  r.agreed = step.agreed;
  const int L = layout_.per_host, l = layout_.local;
  auto* buffer = static_cast<std::byte*>(step.recv);
  switch (step.kind) {
    case CollectiveKind::reduce_scatter:
      r.send = step.send;
      r.recv = buffer + slice(step.count, L, l).offset * esize_;
      break;
    case CollectiveKind::allgather:
      r.send = buffer + slice(step.count, L, l).offset * esize_;
      r.recv = buffer;
      break;
    default:
      r.send = step.send;
      r.recv = step.recv;
      break;
  }
  return r;
}

Work HierarchicalCollective::post_step(const Step& step, int lane) {
  if (step.inside) {
    const std::string name = inside_name(lane);
    if (const auto& shm = engine_.shared_memory()) {
      if (auto work = shm->post(shm_request(step), name)) {
        engine_.count_host_phase(true);
        return *work;
      }
    }
    engine_.count_host_phase(false);
    MessageRoute route;
    route.members = layout_.local_ranks;
    route.topology = plan_.inside_topology;
    route.signature_count = signature_;
    route.signature_root = request_.root;
    route.phase = true;
    Request r{step.kind, request_.dtype, phase_op_, 0, step.send, step.recv, step.count, step.count, name, step.agreed};
    switch (step.kind) {
      case CollectiveKind::reduce_scatter:
        route.slices = true;
        break;
      case CollectiveKind::allgather: {
        route.slices = true;
        const Slice mine = slice(step.count, layout_.per_host, layout_.local);
        r.send = static_cast<std::byte*>(step.recv) + mine.offset * esize_;
        r.send_count = mine.count;
        break;
      }
      case CollectiveKind::broadcast:
        r.root = layout_.local_ranks[std::size_t(step.root)];
        r.send = step.recv;
        break;
      case CollectiveKind::allreduce:
        if (!r.send) r.send = r.recv;
        break;
      default:
        break;
    }
    return engine_.post_messages(r, name, route);
  }
  const std::string name = across_name(lane);
  MessageRoute route;
  route.members = layout_.groups[std::size_t(layout_.local)];
  route.topology = plan_.across_topology;
  route.signature_count = signature_;
  route.signature_root = request_.root;
  route.phase = true;
  Request r{step.kind, request_.dtype,  phase_op_,       step.root, step.send,
            step.recv, step.send_count, step.recv_count, name,      step.agreed};
  if (step.kind == CollectiveKind::consensus) {
    r.send = host_value_.data();
    r.send_count = host_value_.size();
  }
  return engine_.post_messages(r, name, route);
}

void HierarchicalCollective::abandon_step(const Step& step, int lane, WireError kind, const std::string& text) {
  try {
    if (step.inside) {
      const std::string name = inside_name(lane);
      if (const auto& shm = engine_.shared_memory()) {
        if (shm->abandon(shm_request(step), name, kind, text)) return;
      }
      engine_.abandon_messages(name, layout_.local_ranks, kind, text);
      return;
    }
    engine_.abandon_messages(across_name(lane), layout_.groups[std::size_t(layout_.local)], kind, text);
  } catch (const std::exception&) {
    // Closing: the others learn of this rank's end from its connections.
  }
}

Work HierarchicalCollective::start() {
  build();
  work_->drive = [weak = std::weak_ptr<HierarchicalCollective>(shared_from_this())](WorkState& w,
                                                                                    Clock::time_point until) {
    if (auto self = weak.lock()) self->drive(w, until);
  };
  std::vector<int> first;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    lane_next_.assign(std::size_t(lanes_), 0);
    for (int lane = 0; lane < lanes_; ++lane) {
      lane_next_[std::size_t(lane)] = std::size_t(lane);
      first.push_back(lane);
    }
  }
  for (int lane : first) advance(lane);
  return Work(work_);
}

// Runs lane `lane` as far as it goes without waiting: posts its next phase (or, after a failure, abandons the rest).
void HierarchicalCollective::advance(int lane) {
  for (;;) {
    Step step;
    std::size_t chunk_index = 0;
    bool give_up = false;
    std::string text;
    WireError kind = WireError::other;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      std::size_t& c = lane_next_[std::size_t(lane)];
      if (c >= chunks_.size()) {
        if (++lanes_done_ < lanes_) return;
        break;  // every lane has ended: finish below
      }
      Chunk& chunk = chunks_[c];
      if (chunk.next == chunk.steps.size()) {
        c += std::size_t(lanes_);
        continue;
      }
      chunk_index = c;
      step = chunk.steps[chunk.next++];
      give_up = error_ != nullptr;
      if (give_up) {
        text = error_text(error_);
        kind = wire_error_of(error_);
      }
    }
    if (give_up) {
      abandon_step(step, lane, kind, text);
      continue;
    }
    Work work;
    try {
      work = post_step(step, lane);
    } catch (...) {
      fail(std::current_exception(), chunk_index, step);
      continue;
    }
    std::exception_ptr failed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      lane_work_[lane] = work;
      failed = error_;
    }
    // Another lane failed while this phase was being posted (fail() did not see it in flight): it may wait for
    // ranks that will never post it (ranks whose other size gives them fewer lanes), so it fails now too.
    if (failed) {
      const auto& state = WorkAccess::state(work);
      if (state->cancel) state->cancel(failed);
    }
    // Runs at once when the phase is done already: the loop then goes on from the callback's advance().
    work.on_complete([self = shared_from_this(), lane, chunk_index, step](std::exception_ptr error) {
      self->phase_done(lane, chunk_index, step, error);
    });
    return;
  }
  finish();
}

void HierarchicalCollective::phase_done(int lane, std::size_t chunk, const Step& step, std::exception_ptr error) {
  if (!error && step.after) {
    try {
      step.after();
    } catch (...) {
      error = std::current_exception();
    }
  }
  if (error) fail(error, chunk, step);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    lane_work_.erase(lane);
  }
  advance(lane);
}

void HierarchicalCollective::fail(std::exception_ptr error, std::size_t chunk, const Step& step) {
  std::vector<Work> in_flight;
  std::exception_ptr failure = describe_failure(error, chunk, step);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (error_) return;
    error_ = failure;
    for (const auto& [lane, work] : lane_work_) in_flight.push_back(work);
  }
  // Phases in flight on other lanes may wait for ranks that will never post them (ranks that posted another size
  // cut the buffer into other chunks): they fail now, and tell their ranks.
  for (const Work& work : in_flight) {
    const auto& state = WorkAccess::state(work);
    if (state->cancel) state->cancel(failure);
  }
}

std::exception_ptr HierarchicalCollective::describe_failure(std::exception_ptr error, std::size_t chunk,
                                                            const Step& step) const {
  const std::string where =
      step.inside ? "inside its host"
                  : str_cat("across hosts among ranks ", rank_list(layout_.groups[std::size_t(layout_.local)]));
  const std::string text = str_cat(
      label(), " failed on rank ", engine_.config().rank, " in a phase ", where,
      chunks_.size() > 1 ? str_cat(" (chunk ", chunk + 1, " of ", chunks_.size(), ")") : "", ": ", error_text(error));
  return error_for(wire_error_of(error), text);
}

void HierarchicalCollective::finish() {
  std::exception_ptr error;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    error = error_;
    workspace_ = PooledBuffer();
  }
  if (!error && request_.kind == CollectiveKind::consensus && request_.agreed) *request_.agreed = agreed_;
  engine_.hierarchical_finished(name_);
  work_->complete(error);
}

void HierarchicalCollective::drive(WorkState& w, Clock::time_point until) {
  auto done = [&] {
    std::lock_guard<std::mutex> lock(w.mutex);
    return w.done;
  };
  while (!done() && Clock::now() < until) {
    Work current;
    bool any = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!lane_work_.empty()) {
        current = lane_work_.begin()->second;  // the lowest lane: its chunk came first
        any = true;
      }
    }
    if (!any) {
      // Between two phases on another thread: look again shortly.
      std::unique_lock<std::mutex> lock(w.mutex);
      w.changed.wait_for(lock, std::chrono::microseconds(200), [&] { return w.done; });
      continue;
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now());
    try {
      current.wait(std::clamp(left, std::chrono::milliseconds(1), std::chrono::milliseconds(1000)));
    } catch (const std::exception&) {
      // The phase's failure reaches the collective through its callback.
    }
  }
}

Work Engine::post_hierarchical(const Request& request) {
  const std::string name(request.name);
  std::uint64_t seq = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closing_) throw Error("the Peer is closing");
    bool& active = hierarchical_active_[name];
    std::uint64_t& posted = hierarchical_posted_[name];
    if (active) {
      throw ConfigError(str_cat(kind_name(request.kind), " '", name, "' was posted again on rank ", config_.rank,
                                " while its occurrence ", posted - 1,
                                " is still in flight; wait for it first or use another name"));
    }
    active = true;
    seq = posted++;
    ++counts_.hierarchical;
  }
  try {
    auto collective = std::make_shared<HierarchicalCollective>(*this, request, seq, hierarchy_plan(request));
    return collective->start();
  } catch (...) {
    hierarchical_finished(name);
    throw;
  }
}

void Engine::hierarchical_finished(const std::string& name) {
  std::lock_guard<std::mutex> lock(mutex_);
  hierarchical_active_[name] = false;
}

void Engine::abandon_messages(const std::string& name, const std::vector<int>& members, WireError kind,
                              const std::string& text) {
  std::lock_guard<std::mutex> lock(mutex_);
  const std::uint64_t seq = posted_count_[name]++;
  if (bury(CollectiveKey{name, seq}, text, kind)) {
    send_control_to_all(transport::FrameType::abort, name, seq, std::int32_t(kind), text, -1, 0, &members);
  }
}

}  // namespace aikido::detail
