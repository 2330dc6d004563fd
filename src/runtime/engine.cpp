#include "runtime/engine.hpp"

#include <algorithm>
#include <cstring>

#include "base/crypto.hpp"
#include "base/env.hpp"
#include "base/error.hpp"
#include "base/log.hpp"
#include "base/reduce.hpp"
#include "base/thread.hpp"
#include "base/timeline.hpp"
#include "runtime/engine_collective.hpp"
#include "runtime/engine_hierarchy.hpp"
#include "transport/shm_segment.hpp"

namespace aikido::detail {

using collective::Op;
using collective::OpKind;
using collective::Plan;
using transport::FrameHeader;
using transport::FrameType;
using transport::WireError;

namespace {

/// An allreduce of at most this many bytes on the ring topology takes fewer hops: the tree on more than 2 ranks
/// (latency over bandwidth; see post()).
constexpr std::size_t kSmallAllreduceBytes = 64 * 1024;
/// On 2 ranks, an allreduce of at most this many bytes on the ring topology uses recursive doubling (see post()).
constexpr std::size_t kRecursiveDoublingBytes = std::size_t(1) << 20;
/// Bound on data that arrived before its receive was armed; past it the receiving thread waits (and so holds the
/// sender back through the connection's flow control).
constexpr std::size_t kMailboxCap = std::size_t(256) << 20;
/// Bytes of scratch each receive thread reduces through.
constexpr std::size_t kScratchBytes = 256 * 1024;
constexpr std::uint64_t kMaxErrorText = 64 * 1024;

}  // namespace

const char* kind_name(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::allreduce:
      return "allreduce";
    case CollectiveKind::broadcast:
      return "broadcast";
    case CollectiveKind::allgather:
      return "allgather";
    case CollectiveKind::reduce_scatter:
      return "reduce_scatter";
    case CollectiveKind::gather:
      return "gather";
    case CollectiveKind::barrier:
      return "barrier";
    case CollectiveKind::consensus:
      return "consensus";
  }
  return "collective";
}

namespace {

// An out-of-place allreduce: the plan's ops read the send buffer where it still holds the input; the elements no op
// writes are copied into the buffer now. A plan that cannot read its input in place (none built here) and buffers
// that overlap get a copy of the whole input.
void take_input(Collective& c) {
  const std::size_t esize = c.element_bytes, bytes = c.count * esize;
  const bool overlapping = c.input < c.buffer + bytes && c.buffer < c.input + bytes;
  if (c.plan->mixed_input || overlapping) {
    std::memmove(c.buffer, c.input, bytes);
    c.input = nullptr;
    return;
  }
  std::size_t at = 0;
  auto copy = [&](std::size_t begin, std::size_t end) {
    if (end > begin) std::memcpy(c.buffer + begin * esize, c.input + begin * esize, (end - begin) * esize);
  };
  for (const auto& [begin, end] : c.plan->written) {
    copy(at, std::min<std::size_t>(begin, c.count));
    at = std::max(at, end);
  }
  copy(at, c.count);
}

const std::byte* source_of(const Collective& c, const Op& op) { return op.from_input && c.input ? c.input : c.buffer; }

// Combines `n` arrived elements into elements [at, at + n) of receive `op`'s region: with the input where the op
// reads it (from_input), else with what the buffer holds.
void reduce_arrived(const Collective& c, const Op& op, std::size_t at, const std::byte* data, std::size_t n) {
  const std::size_t byte = (op.offset + at) * c.element_bytes;
  if (op.from_input && c.input) {
    reduce_pair(c.dtype, c.op, c.buffer + byte, c.input + byte, data, n);
  } else {
    reduce_into(c.dtype, c.op, c.buffer + byte, data, n);
  }
}

// A frame header carrying the collective's signature, which the receiver checks against its own.
FrameHeader signed_header(const Collective& c, FrameType type) {
  FrameHeader h;
  h.type = type;
  h.kind = std::uint8_t(c.kind);
  h.dtype = std::uint8_t(c.dtype);
  h.op = std::uint8_t(c.op);
  h.topology = std::uint8_t(c.topology);
  h.root = c.signature_root;
  h.seq = c.seq;
  h.count = c.signature_count;
  return h;
}

}  // namespace

std::size_t Engine::MessageKeyHash::operator()(const MessageKey& k) const {
  std::size_t h = std::hash<std::string>()(k.name);
  h ^= std::hash<std::uint64_t>()(k.seq) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  h ^= std::hash<std::uint64_t>()(k.tag) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  h ^= std::hash<int>()(k.source) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  return h;
}

std::size_t Engine::CollectiveKeyHash::operator()(const CollectiveKey& k) const {
  std::size_t h = std::hash<std::string>()(k.name);
  return h ^ (std::hash<std::uint64_t>()(k.seq) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2));
}

Engine::Engine(PeerConfig config, ClusterInfo cluster, std::vector<std::vector<transport::Socket>> sockets,
               std::shared_ptr<ShmCollectives> shm, LinkMatrix measured)
    : config_(std::move(config)),
      cluster_(std::move(cluster)),
      topology_(config_.topology),
      shm_(std::move(shm)),
      hierarchy_(HostLayout::of(cluster_, config_.rank)),
      links_(std::move(measured), cluster_.host_of_rank),
      oversubscribed_(cluster_.local_size > env::local_cpus()),
      pause_(wait_pause(oversubscribed_)) {
  if (shm_) {
    shm_members_ = shm_->members();
    shm_covers_cluster_ = int(shm_members_.size()) == config_.size;
  }
  lost_.resize(std::size_t(config_.size));
  departed_.resize(std::size_t(config_.size), false);
  drop_reason_.resize(std::size_t(config_.size));
  connections_.resize(std::size_t(config_.size));
  streams_.resize(std::size_t(config_.size));
  ended_streams_.resize(std::size_t(config_.size), 0);
  next_stream_.resize(std::size_t(config_.size), 0);
  if (config_.size > 1) gate_ = std::make_shared<transport::ReceiveGate>();
  for (int p = 0; p < config_.size; ++p) {
    if (p == config_.rank) continue;
    auto& mine = sockets[std::size_t(p)];
    AIKIDO_ENFORCE(std::size_t(p) < sockets.size() && !mine.empty() && mine.front().valid(), "no connection to rank ",
                   p);
    for (auto& socket : mine) {
      auto c = std::make_unique<transport::Connection>(config_.rank, p, config_.cluster_version, std::move(socket),
                                                       *this, gate_);
      readers_.push_back(c.get());
      streams_[std::size_t(p)].push_back(c.get());
      if (!connections_[std::size_t(p)]) {
        connections_[std::size_t(p)] = std::move(c);
      } else {
        extra_streams_.push_back(std::move(c));
      }
    }
  }
  for (int p = 0; p < config_.size; ++p) {
    if (cluster_.host_of_rank[std::size_t(p)] != cluster_.host_of_rank[std::size_t(config_.rank)]) {
      counts_.streams_across_hosts = streams_[std::size_t(p)].size();
    }
  }
  for (auto* c : readers_) c->start();
  watchdog_ = std::thread([this] { watchdog_loop(); });
  name_thread(watchdog_, "aikido-watchdog");
}

Engine::~Engine() {
  if (shm_) shm_->close();
  {
    std::unique_lock<std::mutex> lock(mutex_);
    closing_ = true;
    Progress progress;
    std::vector<std::shared_ptr<Collective>> all;
    for (auto& [key, c] : active_) all.push_back(c);
    for (auto& c : all) {
      fail(c,
           std::make_exception_ptr(Error(
               str_cat(c->label(), " was still in flight on rank ", config_.rank, " when its Peer was destroyed"))),
           WireError::other, false, progress);
    }
    for (auto& [id, r] : requests_) {
      if (!r->finished && !r->running) {
        r->finished = true;
        r->work->complete(std::make_exception_ptr(Error("the Peer was destroyed while a request was pending")));
      }
    }
    run(lock, progress);
  }
  if (gate_) gate_->wake_holder();
  watchdog_wake_.notify_all();
  for (auto* c : readers_) c->close();
  // A thread still driving the connections (its collective failed above; their sockets are shut) leaves first.
  if (gate_) gate_->close();
  readers_.clear();
  streams_.clear();
  extra_streams_.clear();
  connections_.clear();
  if (watchdog_.joinable()) watchdog_.join();
}

Topology Engine::topology() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return topology_;
}

std::shared_ptr<const Plan> Engine::plan_for(const collective::PlanSpec& spec) {
  PlanKey key{int(spec.kind),     int(spec.topology), spec.recursive_doubling,
              spec.root,          spec.count,         spec.block,
              spec.segment_elems, spec.members,       spec.slices};
  std::lock_guard<std::mutex> lock(plans_mutex_);
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second;
  if (plans_.size() >= 4096) plans_.clear();  // bound the cache; plans are cheap to rebuild
  auto plan = std::make_shared<const Plan>(collective::build_plan(spec));
  plans_.emplace(std::move(key), plan);
  return plan;
}

void Engine::validate(const Request& request, int size) const {
  const std::size_t k = request.send_count;
  auto bad = [&](const std::string& what) {
    return ConfigError(str_cat(kind_name(request.kind), " '", request.name, "' on rank ", config_.rank, ": ", what));
  };
  switch (request.kind) {
    case CollectiveKind::allreduce:
      if (request.recv_count != k) {
        throw bad(str_cat("send has ", k, " elements but recv has ", request.recv_count, "; they must be equal"));
      }
      break;
    case CollectiveKind::broadcast:
    case CollectiveKind::gather:
      if (request.root < 0 || request.root >= config_.size) {
        throw bad(str_cat("root ", request.root, " is not a rank of 0..", config_.size - 1));
      }
      if (request.kind == CollectiveKind::gather && config_.rank == request.root &&
          request.recv_count != k * std::size_t(size)) {
        throw bad(str_cat("recv on the root has ", request.recv_count,
                          " elements; it must hold size() * send.size() = ", k * std::size_t(size)));
      }
      break;
    case CollectiveKind::allgather:
      if (request.recv_count != k * std::size_t(size)) {
        throw bad(str_cat("recv has ", request.recv_count, " elements; it must hold size() * send.size() = ", size,
                          " * ", k, " = ", k * std::size_t(size)));
      }
      break;
    case CollectiveKind::reduce_scatter:
      if (k != request.recv_count * std::size_t(size)) {
        throw bad(str_cat("send has ", k, " elements; it must hold size() * recv.size() = ", size, " * ",
                          request.recv_count, " = ", request.recv_count * std::size_t(size)));
      }
      break;
    case CollectiveKind::barrier:
    case CollectiveKind::consensus:
      break;
  }
}

ShmRequest Engine::shm_request(const Request& request) {
  ShmRequest r;
  r.kind = request.kind;
  r.dtype = request.dtype;
  r.op = request.op;
  r.root = request.root;  // every rank is on this host: its index here is its rank
  r.signature_root = request.root;
  r.send = request.send;
  r.recv = request.recv;
  r.agreed = request.agreed;
  // The buffer's elements: the allgather's receive buffer, the others' input (a consensus's value bytes).
  r.count = request.kind == CollectiveKind::allgather ? request.recv_count : request.send_count;
  // A consensus compares values of any length (through their digests); a barrier has no size.
  r.signature_count = request.kind == CollectiveKind::consensus ? 64
                      : request.kind == CollectiveKind::barrier ? 1
                                                                : r.count;
  return r;
}

// With a timeline (aikido-run --timeline), every collective becomes a span from its post to its completion, with
// when the engine had it under way (plan chosen, input taken, first messages out) among its details.
Work Engine::post(const Request& request) {
  Timeline* timeline = Timeline::get();
  if (timeline == nullptr) return post_collective(request, nullptr);
  const auto posted = Clock::now();
  const char* algorithm = nullptr;
  Work work = post_collective(request, &algorithm);
  const auto started = Clock::now();
  const std::size_t bytes = request.send_count * dtype_size(request.dtype);
  std::string args = str_cat("\"kind\":\"", kind_name(request.kind), "\",\"bytes\":", bytes, ",\"algorithm\":\"",
                             algorithm != nullptr ? algorithm : topology_name(topology()),
                             "\",\"posted_us\":", std::int64_t(Timeline::unix_us(posted)),
                             ",\"started_us\":", std::int64_t(Timeline::unix_us(started)),
                             ",\"cluster_version\":", config_.cluster_version);
  work.on_complete([timeline, posted, name = std::string(request.name), args = std::move(args)](std::exception_ptr e) {
    const auto finished = Clock::now();
    timeline->async_span(
        "collectives", "collective", name, posted, finished,
        str_cat(args, ",\"finished_us\":", std::int64_t(Timeline::unix_us(finished)), e ? ",\"failed\":true" : ""));
  });
  return work;
}

Work Engine::post_collective(const Request& request, const char** algorithm) {
  if (request.name.empty()) {
    throw ConfigError(str_cat(kind_name(request.kind), ": the collective needs a non-empty name"));
  }
  if (request.name.size() > transport::kMaxNameBytes) {
    throw ConfigError(str_cat(kind_name(request.kind), " '", request.name.substr(0, 64), "...': the name has ",
                              request.name.size(), " bytes; the limit is ", transport::kMaxNameBytes));
  }
  validate(request, config_.size);
  if (shm_ && shm_covers_cluster_ && ShmCollectives::handles(request.kind)) {
    auto work = shm_->post(shm_request(request), request.name);
    std::lock_guard<std::mutex> lock(mutex_);
    if (work) {
      ++counts_.shared_memory;
      if (algorithm != nullptr) *algorithm = "shared-memory";
      return *work;
    }
    ++counts_.shared_memory_table_full;  // and on the message path, counted there
  }
  collective::TopologyChoice choice = resolve_topology(topology(), request);
  if (algorithm != nullptr) *algorithm = topology_name(choice.topology);
  if (hierarchy_ && choice.topology == Topology::hierarchical && HierarchicalCollective::handles(request.kind)) {
    return post_hierarchical(request);
  }
  MessageRoute route;
  route.topology = choice.topology;
  route.members = std::move(choice.members);
  return post_messages(request, std::string(request.name), route);
}

Work Engine::post_messages(const Request& request, const std::string& name, const MessageRoute& route) {
  const int rank = config_.rank;
  // The ranks taking part (`route.members`, or all), and this rank's index among them.
  const int size = route.members.empty() ? config_.size : int(route.members.size());
  int index = rank;
  if (!route.members.empty()) {
    index = int(std::find(route.members.begin(), route.members.end(), rank) - route.members.begin());
    AIKIDO_ENFORCE(index < size, "rank ", rank, " posts '", name, "' among ranks it is not one of");
  }
  auto takes_part = [&](int r) {
    return route.members.empty() ? r >= 0 && r < config_.size
                                 : std::find(route.members.begin(), route.members.end(), r) != route.members.end();
  };
  if (!route.slices) validate(request, size);
  if ((request.kind == CollectiveKind::broadcast || request.kind == CollectiveKind::gather) &&
      !takes_part(request.root)) {
    throw ConfigError(str_cat(kind_name(request.kind), " '", name, "' on rank ", rank, ": root ", request.root,
                              " does not take part"));
  }
  auto c = std::make_shared<Collective>();
  c->name = name;
  c->kind = request.kind;
  c->dtype = request.dtype;
  c->op = request.op;
  c->root = request.root;
  c->element_bytes = dtype_size(request.dtype);
  c->recv = request.recv;
  c->recv_count = request.recv_count;
  c->agreed = request.agreed;
  c->world = size;
  c->rank = rank;
  c->index = index;
  c->members = route.members;
  c->slices = route.slices;
  c->count = request.send_count;
  const std::size_t esize = c->element_bytes;

  collective::PlanSpec spec;
  spec.kind = request.kind;
  spec.rank = rank;
  spec.size = config_.size;
  spec.root = request.root;
  spec.members = route.members;
  spec.slices = route.slices;
  spec.segment_elems = std::max<std::size_t>(1, segment_bytes_for(route.members) / esize);
  spec.host_of_rank = cluster_.host_of_rank;

  const std::size_t k = request.send_count;
  switch (request.kind) {
    case CollectiveKind::allreduce:
      c->buffer = static_cast<std::byte*>(request.recv);
      if (k > 0 && request.send != request.recv) c->input = static_cast<const std::byte*>(request.send);
      spec.count = k;
      break;
    case CollectiveKind::broadcast:
      c->buffer = static_cast<std::byte*>(request.recv);
      spec.count = k;
      break;
    case CollectiveKind::allgather:
      c->buffer = static_cast<std::byte*>(request.recv);
      if (route.slices) {
        const std::size_t at = collective::block_offset(request.recv_count, size, index);
        AIKIDO_ENFORCE(k == collective::block_count(request.recv_count, size, index), "allgather '", name,
                       "': a slice of ", k, " elements");
        if (k > 0 && request.send != c->buffer + at * esize)
          std::memmove(c->buffer + at * esize, request.send, k * esize);
        spec.count = request.recv_count;
      } else {
        if (k > 0) std::memmove(c->buffer + std::size_t(index) * k * esize, request.send, k * esize);
        spec.count = k * std::size_t(size);
        spec.block = k;
      }
      break;
    case CollectiveKind::reduce_scatter:
      if (route.slices) {
        AIKIDO_ENFORCE(k == request.recv_count, "reduce_scatter '", name, "' over slices: ", k, " and ",
                       request.recv_count, " elements");
        c->buffer = static_cast<std::byte*>(request.recv);
        if (k > 0 && request.send != request.recv) std::memmove(c->buffer, request.send, k * esize);
        spec.count = k;
      } else {
        c->workspace = pool_.acquire(k * esize);
        c->buffer = c->workspace.data();
        if (k > 0) std::memcpy(c->buffer, request.send, k * esize);
        spec.count = k;
        spec.block = request.recv_count;
      }
      break;
    case CollectiveKind::gather:
      if (rank == request.root) {
        c->buffer = static_cast<std::byte*>(request.recv);
        if (k > 0) std::memmove(c->buffer + std::size_t(index) * k * esize, request.send, k * esize);
        spec.count = k * std::size_t(size);
      } else {
        c->buffer = static_cast<std::byte*>(const_cast<void*>(request.send));  // only read: non-roots only send
        spec.count = k;
      }
      spec.block = k;
      break;
    case CollectiveKind::barrier:
      c->workspace = pool_.acquire(1);
      c->buffer = c->workspace.data();
      c->buffer[0] = std::byte{1};
      c->dtype = DType::u8;
      c->op = ReduceOp::max;
      c->element_bytes = 1;
      c->count = 1;
      spec.kind = CollectiveKind::allreduce;
      spec.count = 1;
      spec.segment_elems = 1;
      break;
    case CollectiveKind::consensus: {
      // Element-wise max of (digest, 255 - digest): all ranks agree iff max(digest) == min(digest) everywhere.
      const Digest d = sha256(request.send, k);
      c->workspace = pool_.acquire(64);
      c->buffer = c->workspace.data();
      for (std::size_t i = 0; i < 32; ++i) {
        c->buffer[i] = std::byte(d[i]);
        c->buffer[32 + i] = std::byte(255 - d[i]);
      }
      c->dtype = DType::u8;
      c->op = ReduceOp::max;
      c->element_bytes = 1;
      c->count = 64;
      spec.kind = CollectiveKind::allreduce;
      spec.count = 64;
      spec.segment_elems = 64;
      break;
    }
  }
  c->buffer_bytes = spec.count * c->element_bytes;
  c->signature_count = route.signature_count.value_or(c->count);
  c->signature_root = route.signature_root.value_or(c->root);

  std::unique_lock<std::mutex> lock(mutex_);
  if (closing_) throw Error("the Peer is closing");
  // The ring's 2(n-1) hops suit large buffers; a small allreduce takes fewer hops (the choice depends only on what
  // every rank posts, so all ranks make it alike): the tree's 2 log2(n), and on two ranks recursive doubling's one
  // exchange of the whole buffer. Measured over TCP: with 4 ranks 4 KiB 2.5x and 64 KiB 2x faster on the tree than
  // on the ring, 1 MiB about equal; with 2 ranks 4 KiB (11.8 us against 20) and 64 KiB (about 35 us against 44)
  // faster with recursive doubling than on the ring. With 4 ranks on 2 cores recursive doubling was slower than the
  // tree (4 KiB: 165 us against 80; all four ranks exchange at once), so it is not used past two ranks. On two
  // ranks it also wins up to 1 MiB, where the ring's second half waits for its first (TCP, medians of 3 runs:
  // 128 KiB 61 us against 92, 512 KiB 149 against 165, 1 MiB 234 against 247), and loses from 2 MiB (433 against
  // 395: the whole buffer is reduced on both ranks).
  Topology topology = route.topology.value_or(topology_);
  if (topology == Topology::automatic) topology = Topology::ring;  // post() resolves it; a route always names one
  const bool ring_allreduce = topology == Topology::ring && spec.kind == CollectiveKind::allreduce;
  const bool small_ring = ring_allreduce && c->buffer_bytes <= kSmallAllreduceBytes;
  spec.recursive_doubling = ring_allreduce && size == 2 && c->buffer_bytes <= kRecursiveDoublingBytes;
  c->topology = small_ring && size > 2 ? Topology::tree : topology;
  spec.topology = c->topology;
  std::uint64_t& posted = posted_count_[name];
  // Only the previous occurrence of a name can still be in flight.
  if (posted > 0 && active_.count(CollectiveKey{name, posted - 1})) {
    throw ConfigError(str_cat(kind_name(request.kind), " '", name, "' was posted again on rank ", rank,
                              " while its occurrence ", posted - 1,
                              " is still in flight; wait for it first or use another name"));
  }
  c->seq = posted++;
  if (!route.phase) ++counts_.sockets;
  const std::string lost = lost_summary();
  if (!lost.empty()) {
    // A survivor that has not seen the loss yet may have posted this collective and need it only through this rank:
    // it hears of the failure from here, as from every rank that fails a collective.
    const std::string text =
        str_cat(c->label(), " cannot run on rank ", rank, " at cluster version ", config_.cluster_version, ": ", lost);
    if (bury(CollectiveKey{name, c->seq}, text, WireError::lost)) {
      send_control_to_all(FrameType::abort, name, c->seq, std::int32_t(WireError::lost), text, -1, 0, &c->members);
    }
    auto work = std::make_shared<WorkState>();
    work->done = true;
    work->error = std::make_exception_ptr(PeerLostError(text));
    return Work(work);
  }
  lock.unlock();
  c->plan = plan_for(spec);
  if (c->input) take_input(*c);
  lock.lock();

  const Plan& plan = *c->plan;
  c->waiting = plan.dependency_count;
  c->state.assign(plan.ops.size(), OpState::waiting);
  c->remaining = plan.ops.size();
  c->running_by_peer.assign(std::size_t(config_.size), 0);
  c->ready_from.assign(std::size_t(config_.size), false);
  // Ranks that do not take part count as having posted it (stall reports ask only those that do).
  c->stall_posted.assign(std::size_t(config_.size), -1);
  for (int p = 0; p < config_.size; ++p) {
    if (!takes_part(p)) c->stall_posted[std::size_t(p)] = 1;
  }
  c->work = std::make_shared<WorkState>();
  set_drive(*c->work, c->buffer_bytes);
  if (route.phase) {
    c->work->cancel = [this, weak = std::weak_ptr<Collective>(c)](std::exception_ptr error) {
      auto self = weak.lock();
      if (!self) return;
      std::unique_lock<std::mutex> lock(mutex_);
      Progress progress;
      fail(self, error, wire_error_of(error), true, progress);
      run(lock, progress);
    };
  }
  c->start = Clock::now();
  c->deadline = c->start + config_.timeout;
  Work work(c->work);

  Progress progress;
  active_.emplace(CollectiveKey{name, c->seq}, c);
  auto tomb = tombstones_.find(CollectiveKey{name, c->seq});
  if (tomb != tombstones_.end()) {
    fail(c, error_for(WireError(tomb->second.kind), tomb->second.error), WireError(tomb->second.kind), false, progress);
    run(lock, progress);
    return work;
  }
  // A `ready` lets large segments go out and tells the sender that this rank posted the same collective. In a small
  // allreduce every segment is eager, so between two ranks that exchange data both ways the data frames carry all
  // of it: skipping those `ready` frames halves the frames of a small allreduce (measured over TCP with 4 ranks on
  // 2 cores: 4 KiB about 1.3x faster). A mismatch still shows: a rank that posted something else (another kind, or
  // a size past the eager limit) still sends its `ready`, and the signatures are compared on it.
  c->ready_in_data.assign(std::size_t(config_.size), false);
  for (int source : plan.ready_in_data) c->ready_in_data[std::size_t(source)] = true;
  const bool small = spec.kind == CollectiveKind::allreduce && c->buffer_bytes <= kEagerBytes;
  for (int source : plan.ready_to) {
    if (small && std::find(plan.targets.begin(), plan.targets.end(), source) != plan.targets.end()) {
      c->ready_in_data[std::size_t(source)] = true;
    } else {
      send_ready(*c, source);
    }
  }
  for (int target : plan.ready_from) {
    auto it = early_ready_.find(MessageKey{name, c->seq, 0, target});
    if (it != early_ready_.end()) {
      const FrameHeader header = it->second;
      early_ready_.erase(it);
      on_ready(c, header, progress);
    }
  }
  for (std::uint32_t i = 0; i < plan.ops.size() && !c->failed; ++i) {
    if (c->waiting[i] == 0) arm(c, i, progress);
  }
  for (int p = 0; p < config_.size && !c->failed; ++p) {
    if (departed_[std::size_t(p)] && needs_peer(*c, p)) {
      fail(c,
           std::make_exception_ptr(PeerLostError(str_cat(c->label(), " cannot run on rank ", rank,
                                                         " at cluster version ", config_.cluster_version, ": ",
                                                         lost_[std::size_t(p)], " and this collective needs it"))),
           WireError::lost, true, progress);
    }
  }
  maybe_finish(c, progress);
  run(lock, progress);
  return work;
}

void Engine::arm(const std::shared_ptr<Collective>& c, std::uint32_t i, Progress& progress) {
  if (c->failed) return;
  const Op& op = c->plan->ops[i];
  if (op.kind == OpKind::send) {
    if (op.count * c->element_bytes > kEagerBytes && !c->ready_from[std::size_t(op.peer)]) {
      c->deferred.push_back(i);
      c->state[i] = OpState::armed;
      return;
    }
    issue_send(c, i, progress);
    return;
  }
  MessageKey key{c->name, c->seq, op.tag, op.peer};
  auto m = mailbox_.find(key);
  if (m == mailbox_.end()) {
    c->state[i] = OpState::armed;
    armed_.emplace(std::move(key), ArmedRecv{c, i});
    return;
  }
  Early early = std::move(m->second);
  mailbox_.erase(m);
  mailbox_bytes_ -= early.header.payload_bytes;
  mailbox_space_.notify_all();
  if (!accept_frame(c, early.header, progress)) return;
  c->state[i] = OpState::running;
  ++c->running;
  progress.copies.push_back({c, i, std::move(early)});
}

void Engine::issue_send(const std::shared_ptr<Collective>& c, std::uint32_t i, Progress& progress) {
  const Op& op = c->plan->ops[i];
  transport::OutgoingFrame frame;
  frame.header = signed_header(*c, FrameType::data);
  frame.header.tag = op.tag;
  frame.header.payload_bytes = op.count * c->element_bytes;
  frame.name = c->name;
  frame.payload = source_of(*c, op) + op.offset * c->element_bytes;
  frame.keep_alive = c;
  const int peer = op.peer;
  frame.start = [this, c, i, peer] {
    std::lock_guard<std::mutex> lock(mutex_);
    if (c->failed) return false;
    c->state[i] = OpState::running;
    ++c->running;
    ++c->running_by_peer[std::size_t(peer)];
    return true;
  };
  frame.done = [this, c, i, peer](bool written) {
    std::unique_lock<std::mutex> lock(mutex_);
    --c->running;
    --c->running_by_peer[std::size_t(peer)];
    Progress progress;
    if (c->failed) {
      maybe_finish(c, progress);
    } else if (!written && lost_[std::size_t(peer)].empty()) {
      // The connection broke and its end is not handled yet (on_lost always follows): the send counts as not sent,
      // so that on_lost fails the collective with the cause (a goodbye or a crash) and tells the others.
      c->state[i] = OpState::armed;
    } else if (!written) {
      fail(c,
           std::make_exception_ptr(PeerLostError(
               str_cat(c->label(), " failed on rank ", config_.rank, " at cluster version ", config_.cluster_version,
                       ": could not send to rank ", peer, ": ", lost_[std::size_t(peer)]))),
           WireError::lost, true, progress);
    } else {
      complete_op(c, i, progress);
    }
    run(lock, progress);
  };
  c->state[i] = OpState::armed;
  progress.sends.emplace_back(stream_for(peer, frame.header.payload_bytes), std::move(frame));  // sent by run()
}

transport::Connection* Engine::stream_for(int peer, std::uint64_t bytes) {
  const auto& streams = streams_[std::size_t(peer)];
  // Small segments keep to the first stream (no reordering to wait for); large ones take turns on all of them.
  if (streams.size() < 2 || bytes <= kEagerBytes) return streams.front();
  const std::size_t i = next_stream_[std::size_t(peer)]++ % streams.size();
  if (i > 0) ++counts_.segments_on_extra_streams;
  return streams[i];
}

void Engine::send_ready(const Collective& c, int peer) {
  auto& connection = connections_[std::size_t(peer)];
  if (!connection) return;
  transport::OutgoingFrame frame;
  frame.header = signed_header(c, FrameType::ready);
  frame.name = c.name;
  connection->send(std::move(frame));
}

void Engine::on_ready(const std::shared_ptr<Collective>& c, const FrameHeader& header, Progress& progress) {
  if (c->failed || !accept_frame(c, header, progress)) return;
  if (c->ready_from[std::size_t(header.source)]) return;
  c->ready_from[std::size_t(header.source)] = true;
  ++c->ready_count;
  std::vector<std::uint32_t> keep;
  for (std::uint32_t i : c->deferred) {
    if (c->plan->ops[i].peer == header.source) {
      issue_send(c, i, progress);
    } else {
      keep.push_back(i);
    }
  }
  c->deferred.swap(keep);
  maybe_finish(c, progress);
}

bool Engine::needs_peer(const Collective& c, int peer) const {
  for (std::uint32_t i = 0; i < c.plan->ops.size(); ++i) {
    const Op& op = c.plan->ops[i];
    if (op.peer != peer || c.state[i] == OpState::done) continue;
    // A send being written finishes on its own (its write fails if the peer is really gone); a receive being
    // copied, or whose frame waits in the mailbox, has its data already.
    if (c.state[i] == OpState::running) continue;
    if (op.kind != OpKind::send && mailbox_.count(MessageKey{c.name, c.seq, op.tag, peer})) continue;
    return true;
  }
  // Past the loop every receive from `peer` has its data; where that data stands for the peer's `ready`
  // (ready_in_data), the peer posted the collective even if no frame of it has been matched yet (a frame that waits
  // in the mailbox is checked when its receive is armed).
  const auto& confirmers = c.plan->ready_from;
  return std::find(confirmers.begin(), confirmers.end(), peer) != confirmers.end() &&
         !c.ready_from[std::size_t(peer)] && !c.ready_in_data[std::size_t(peer)];
}

void Engine::complete_op(const std::shared_ptr<Collective>& c, std::uint32_t i, Progress& progress) {
  c->state[i] = OpState::done;
  --c->remaining;
  for (std::uint32_t d : c->plan->dependents[i]) {
    if (--c->waiting[d] == 0) arm(c, d, progress);
  }
  maybe_finish(c, progress);
}

void Engine::maybe_finish(const std::shared_ptr<Collective>& c, Progress& progress) {
  if (c->finished || c->running > 0) return;
  if (!c->failed && (c->remaining > 0 || c->ready_count < c->plan->ready_from.size())) return;
  c->finished = true;
  progress.finished.push_back(c);  // before the erase: `c` may refer to the map's own element
  active_.erase(CollectiveKey{c->name, c->seq});
}

bool Engine::accept_frame(const std::shared_ptr<Collective>& c, const FrameHeader& h, Progress& progress) {
  const bool same = h.kind == std::uint8_t(c->kind) && h.dtype == std::uint8_t(c->dtype) &&
                    h.op == std::uint8_t(c->op) && h.topology == std::uint8_t(c->topology) &&
                    h.root == c->signature_root && h.count == c->signature_count;
  if (same) {
    const auto source = std::size_t(h.source);
    if (h.type == FrameType::data && c->ready_in_data[source] && !c->ready_from[source]) {
      c->ready_from[source] = true;  // the data frame stands for the `ready` this peer did not send
      ++c->ready_count;
    }
    return true;
  }
  auto describe = [](int rank, std::uint8_t kind, std::uint8_t dtype, std::uint8_t op, std::uint8_t topology, int root,
                     std::uint64_t count) {
    return str_cat("rank ", rank, " posted ", kind_name(CollectiveKind(kind)), " of ", count, " ",
                   dtype_name(DType(dtype)), " elements, op ", reduce_op_name(ReduceOp(op)), ", root ", root, ", ",
                   topology_name(Topology(topology)), " topology");
  };
  const std::string text = str_cat("ranks posted '", c->name, "' (seq ", c->seq, ", cluster version ",
                                   config_.cluster_version, ") differently: ",
                                   describe(c->rank, std::uint8_t(c->kind), std::uint8_t(c->dtype), std::uint8_t(c->op),
                                            std::uint8_t(c->topology), c->signature_root, c->signature_count),
                                   "; ", describe(h.source, h.kind, h.dtype, h.op, h.topology, h.root, h.count),
                                   ". Every rank must post the same name with the same size, type, operation and root");
  fail(c, std::make_exception_ptr(MismatchError(text)), WireError::mismatch, true, progress);
  return false;
}

void Engine::send_control(int peer, FrameType type, const std::string& name, std::uint64_t seq, std::int32_t root,
                          std::string payload, std::uint64_t tag) {
  auto& connection = connections_[std::size_t(peer)];
  if (!connection) return;
  transport::OutgoingFrame frame;
  frame.header.type = type;
  frame.header.seq = seq;
  frame.header.root = root;
  frame.header.tag = tag;
  frame.name = name;
  if (!payload.empty()) {
    auto text = std::make_shared<std::string>(std::move(payload));
    frame.header.payload_bytes = text->size();
    frame.payload = text->data();
    frame.keep_alive = text;
  }
  connection->send(std::move(frame));
}

void Engine::run(std::unique_lock<std::mutex>& lock, Progress& progress) {
  while (!progress.copies.empty() || !progress.sends.empty()) {
    auto copies = std::move(progress.copies);
    progress.copies.clear();
    auto sends = std::move(progress.sends);
    progress.sends.clear();
    lock.unlock();
    for (auto& [connection, frame] : sends) connection->send(std::move(frame));
    for (auto& copy : copies) {
      Collective& c = *copy.collective;
      const Op& op = c.plan->ops[copy.op];
      std::byte* dst = c.buffer + op.offset * c.element_bytes;
      if (op.count == 0) {
        // an empty segment carries nothing
      } else if (op.kind == OpKind::recv_copy) {
        std::memcpy(dst, copy.early.data.data(), op.count * c.element_bytes);
      } else {
        reduce_arrived(c, op, 0, copy.early.data.data(), op.count);
      }
      copy.early.data = PooledBuffer();
    }
    lock.lock();
    for (auto& copy : copies) {
      --copy.collective->running;
      if (copy.collective->failed) {
        maybe_finish(copy.collective, progress);
      } else {
        complete_op(copy.collective, copy.op, progress);
      }
    }
  }
  auto finished = std::move(progress.finished);
  progress.finished.clear();
  lock.unlock();
  for (auto& c : finished) finish_collective(*c);
  if (!finished.empty()) {
    idle_.notify_all();
    if (gate_) gate_->wake_holder();  // it may wait for one of these, asleep in poll()
  }
}

void Engine::finish_collective(Collective& c) {
  if (!c.failed) {
    try {
      switch (c.kind) {
        case CollectiveKind::allreduce:
          if (c.op == ReduceOp::mean) divide_by_count(c.dtype, c.buffer, c.count, c.world);
          break;
        case CollectiveKind::reduce_scatter: {
          if (c.slices) {  // in place: the own slice is where it belongs
            const std::size_t at = collective::block_offset(c.recv_count, c.world, c.index);
            const std::size_t n = collective::block_count(c.recv_count, c.world, c.index);
            if (c.op == ReduceOp::mean) divide_by_count(c.dtype, c.buffer + at * c.element_bytes, n, c.world);
            break;
          }
          const std::size_t k = c.recv_count;
          std::byte* own = c.buffer + std::size_t(c.index) * k * c.element_bytes;
          if (k > 0) std::memcpy(c.recv, own, k * c.element_bytes);
          if (c.op == ReduceOp::mean) divide_by_count(c.dtype, c.recv, k, c.world);
          break;
        }
        case CollectiveKind::consensus: {
          bool agreed = true;
          for (std::size_t i = 0; i < 32; ++i) {
            if (std::uint8_t(c.buffer[i]) != std::uint8_t(255 - std::uint8_t(c.buffer[32 + i]))) agreed = false;
          }
          if (c.agreed) *c.agreed = agreed;
          break;
        }
        default:
          break;
      }
    } catch (...) {
      c.error = std::current_exception();
    }
  }
  c.workspace = PooledBuffer();
  c.work->complete(c.error);
}

void Engine::on_frame(transport::Connection& connection, const FrameHeader& header, const std::string& name) {
  if (header.cluster_version != config_.cluster_version) {
    throw ProtocolError(str_cat("rank ", header.source, " sent a frame of cluster version ", header.cluster_version,
                                "; this rank is at version ", config_.cluster_version));
  }
  switch (header.type) {
    case FrameType::data:
      return receive_data(connection, header, name);
    case FrameType::ready: {
      if (header.payload_bytes != 0) throw ProtocolError("ready frame with a payload");
      std::unique_lock<std::mutex> lock(mutex_);
      if (tombstones_.count(CollectiveKey{name, header.seq})) return;
      auto it = active_.find(CollectiveKey{name, header.seq});
      if (it == active_.end()) {
        early_ready_.emplace(MessageKey{name, header.seq, 0, header.source}, header);
        return;
      }
      Progress progress;
      auto c = it->second;
      on_ready(c, header, progress);
      run(lock, progress);
      return;
    }
    case FrameType::abort: {
      const std::string text = read_text(connection, header.payload_bytes);
      std::unique_lock<std::mutex> lock(mutex_);
      Progress progress;
      // A rank that learns of a failure passes it on to the others before anything else it sends them, its
      // goodbye included: a rank that hears the goodbye first would otherwise report a lost peer instead of the
      // failure (the first teller's abort travels on another connection and may come later).
      bool news = false;
      std::vector<int> members;  // of the collective, when this rank posted it; else every rank is told
      auto it = active_.find(CollectiveKey{name, header.seq});
      if (it != active_.end()) {
        auto c = it->second;
        news = !c->failed;
        members = c->members;
        fail(c, error_for(WireError(header.root), text), WireError(header.root), false, progress);
      } else {
        news = bury(CollectiveKey{name, header.seq}, text, WireError(header.root));
      }
      if (news) send_control_to_all(FrameType::abort, name, header.seq, header.root, text, header.source, 0, &members);
      run(lock, progress);
      return;
    }
    case FrameType::stall_query:
      if (header.payload_bytes != 0) throw ProtocolError("stall query with a payload");
      return answer_stall_query(header, name);
    case FrameType::stall_reply:
      return receive_stall_reply(connection, header, name);
    case FrameType::p2p_request:
      return receive_p2p_request(connection, header, name);
    case FrameType::p2p_reply:
      return receive_p2p_reply(connection, header);
    case FrameType::goodbye:
      return;  // handled by the connection
  }
}

std::string Engine::read_text(transport::Connection& connection, std::uint64_t bytes) {
  if (bytes > kMaxErrorText) {
    throw ProtocolError(
        str_cat("rank ", connection.peer(), " sent a ", bytes, "-byte error text; the cap is ", kMaxErrorText));
  }
  std::string text(bytes, '\0');
  if (bytes > 0) connection.read_payload(text.data(), bytes);
  return text;
}

void Engine::receive_data(transport::Connection& connection, const FrameHeader& header, const std::string& name) {
  const int source = header.source;
  const std::uint64_t bytes = header.payload_bytes;
  MessageKey key{name, header.seq, header.tag, source};
  std::unique_lock<std::mutex> lock(mutex_);
  Progress progress;
  if (tombstones_.count(CollectiveKey{name, header.seq})) {
    lock.unlock();
    connection.discard_payload(bytes);
    return;
  }
  auto armed = armed_.find(key);
  if (armed != armed_.end()) {
    auto c = armed->second.collective;
    const std::uint32_t i = armed->second.op;
    armed_.erase(armed);
    if (!accept_frame(c, header, progress)) {
      run(lock, progress);
      connection.discard_payload(bytes);
      return;
    }
    const Op& op = c->plan->ops[i];
    if (bytes != op.count * c->element_bytes) {
      throw ProtocolError(str_cat("rank ", source, " sent ", bytes, " bytes for a segment of ", c->label(),
                                  " where this rank expects ", op.count * c->element_bytes));
    }
    c->state[i] = OpState::running;
    ++c->running;
    ++c->running_by_peer[std::size_t(source)];
    lock.unlock();
    std::byte* dst = c->buffer + op.offset * c->element_bytes;
    try {
      if (op.kind == OpKind::recv_copy) {
        connection.read_payload(dst, bytes);
      } else {
        thread_local std::vector<std::byte> scratch(kScratchBytes);
        const std::size_t step = kScratchBytes / c->element_bytes;
        for (std::size_t done = 0; done < op.count; done += step) {
          const std::size_t n = std::min(step, op.count - done);
          connection.read_payload(scratch.data(), n * c->element_bytes);
          reduce_arrived(*c, op, done, scratch.data(), n);
        }
      }
    } catch (...) {
      lock.lock();
      --c->running;
      --c->running_by_peer[std::size_t(source)];
      maybe_finish(c, progress);  // the connection's loss fails it, or it failed already
      run(lock, progress);
      throw;
    }
    lock.lock();
    --c->running;
    --c->running_by_peer[std::size_t(source)];
    if (c->failed) {
      maybe_finish(c, progress);
    } else {
      complete_op(c, i, progress);
    }
    run(lock, progress);
    return;
  }

  // Not armed yet: keep it in the mailbox.
  auto active = active_.find(CollectiveKey{name, header.seq});
  if (active != active_.end()) {
    auto c = active->second;
    if (!accept_frame(c, header, progress)) {
      run(lock, progress);
      connection.discard_payload(bytes);
      return;
    }
    if (bytes > c->buffer_bytes) {
      throw ProtocolError(str_cat("rank ", source, " sent a ", bytes, "-byte segment of ", c->label(),
                                  " whose whole buffer is ", c->buffer_bytes, " bytes"));
    }
    check_segment_expected(*c, source, header.tag);
  } else if (bytes > kEagerBytes) {
    throw ProtocolError(str_cat("rank ", source, " sent a ", bytes, "-byte segment of '", name, "' (seq ", header.seq,
                                ") before this rank posted it; segments over ", kEagerBytes,
                                " bytes must wait for the receiver"));
  }
  const auto deadline = Clock::now() + config_.timeout;
  while (mailbox_bytes_ + bytes > kMailboxCap && !closing_) {
    // A thread driving the connections must not keep the other connections unread while it waits here.
    if (gate_) gate_->release(true);
    if (mailbox_space_.wait_until(lock, deadline) == std::cv_status::timeout) {
      throw TimeoutError(str_cat("rank ", config_.rank, ": more than ", kMailboxCap,
                                 " bytes of early segments waited for collectives that were not posted within ",
                                 seconds(config_.timeout)));
    }
  }
  mailbox_bytes_ += bytes;
  lock.unlock();
  Early early{header, pool_.acquire(bytes)};
  try {
    if (bytes > 0) connection.read_payload(early.data.data(), bytes);
  } catch (...) {
    lock.lock();
    mailbox_bytes_ -= bytes;
    throw;
  }
  lock.lock();
  if (tombstones_.count(CollectiveKey{name, header.seq})) {
    mailbox_bytes_ -= bytes;
    mailbox_space_.notify_all();
    return;
  }
  armed = armed_.find(key);
  if (armed != armed_.end()) {
    auto c = armed->second.collective;
    const std::uint32_t i = armed->second.op;
    armed_.erase(armed);
    mailbox_bytes_ -= bytes;
    mailbox_space_.notify_all();
    if (accept_frame(c, header, progress)) {
      if (bytes != c->plan->ops[i].count * c->element_bytes) {
        throw ProtocolError(str_cat("rank ", source, " sent ", bytes, " bytes for a segment of ", c->label(),
                                    " where this rank expects ", c->plan->ops[i].count * c->element_bytes));
      }
      c->state[i] = OpState::running;
      ++c->running;
      progress.copies.push_back({c, i, std::move(early)});
    }
    run(lock, progress);
    return;
  }
  mailbox_.emplace(std::move(key), std::move(early));
}

// A segment that arrives before its receive is armed must be one the plan has `source` send to this rank, and not
// one received already: anything else would wait in the mailbox forever, or be taken for a later segment.
void Engine::check_segment_expected(const Collective& c, int source, std::uint64_t tag) const {
  bool received = false;
  for (std::size_t i = 0; i < c.plan->ops.size(); ++i) {
    const Op& op = c.plan->ops[i];
    if (op.kind == OpKind::send || op.peer != source || op.tag != tag) continue;
    if (c.state[i] == OpState::waiting) return;
    received = true;
  }
  if (received) throw ProtocolError(str_cat("rank ", source, " sent segment ", tag, " of ", c.label(), " twice"));
  throw ProtocolError(str_cat("rank ", source, " sent segment ", tag, " of ", c.label(),
                              ", which is not one that rank sends to rank ", config_.rank, " in this collective"));
}

void Engine::drain() {
  const auto deadline = Clock::now() + config_.timeout;
  if (shm_ && !shm_->drain(deadline)) {
    throw TimeoutError(
        str_cat("rank ", config_.rank, ": collectives still in flight after ", seconds(config_.timeout)));
  }
  std::unique_lock<std::mutex> lock(mutex_);
  if (!idle_.wait_until(lock, deadline, [&] { return active_.empty(); })) {
    throw TimeoutError(
        str_cat("rank ", config_.rank, ": collectives still in flight after ", seconds(config_.timeout)));
  }
}

std::vector<int> Engine::lost_ranks() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<int> ranks;
  for (int p = 0; p < config_.size; ++p) {
    if (!lost_[std::size_t(p)].empty()) ranks.push_back(p);
  }
  return ranks;
}

std::uint64_t Engine::bytes_sent() const {
  std::uint64_t bytes = 0;
  for (const auto& c : connections_) {
    if (c) bytes += c->bytes_written();
  }
  return bytes;
}

PathCounts Engine::path_counts() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return counts_;
}

void Engine::count_host_phase(bool shared_memory) {
  std::lock_guard<std::mutex> lock(mutex_);
  ++(shared_memory ? counts_.host_phases_shared_memory : counts_.host_phases_sockets);
}

void Engine::set_link_matrix(const LinkMatrix& links) {
  if (links.size != config_.size || links.latency_seconds.size() != std::size_t(links.size) * std::size_t(links.size) ||
      links.bandwidth_bytes_per_second.size() != links.latency_seconds.size()) {
    throw ConfigError(str_cat("set_link_matrix on rank ", config_.rank, ": a matrix of ", links.size, " ranks (",
                              links.latency_seconds.size(), " latencies, ", links.bandwidth_bytes_per_second.size(),
                              " bandwidths) for a cluster of ", config_.size, "; it needs size * size entries"));
  }
  drain();
  // Every rank must plan with the same links: the choices made from them must agree.
  std::string bytes;
  auto put = [&](double v) { bytes.append(reinterpret_cast<const char*>(&v), sizeof v); };
  for (double v : links.latency_seconds) put(v);
  for (double v : links.bandwidth_bytes_per_second) put(v);
  bool agreed = false;
  Request r{CollectiveKind::consensus, DType::u8, ReduceOp::max, 0, bytes.data(), nullptr, bytes.size(), 0,
            "aikido/set_link_matrix",  &agreed};
  post(r).wait();
  if (!agreed) {
    throw MismatchError(str_cat("set_link_matrix: ranks installed different link matrices (rank ", config_.rank,
                                "); gather every rank's measurements first (LinkMonitor::matrix does)"));
  }
  std::lock_guard<std::mutex> lock(links_mutex_);
  links_ = collective::LinkModel(links, cluster_.host_of_rank);
}

LinkMatrix Engine::link_matrix() const {
  std::lock_guard<std::mutex> lock(links_mutex_);
  return links_.measured();
}

void Engine::set_topology(Topology topology) {
  drain();
  const std::byte value[1] = {std::byte(topology)};
  bool agreed = false;
  Request r{CollectiveKind::consensus, DType::u8, ReduceOp::max, 0, value, nullptr, 1, 0,
            "aikido/set_topology",     &agreed};
  post(r).wait();
  if (!agreed) {
    throw MismatchError(str_cat("set_topology: ranks asked for different topologies (rank ", config_.rank,
                                " asked for ", topology_name(topology), "); every rank must switch to the same one"));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  topology_ = topology;
}

}  // namespace aikido::detail
