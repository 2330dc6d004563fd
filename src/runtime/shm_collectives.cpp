#include "runtime/shm_collectives.hpp"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>

#include "base/env.hpp"
#include "base/error.hpp"
#include "base/log.hpp"
#include "base/reduce.hpp"
#include "base/crypto.hpp"
#include "base/thread.hpp"
#include "collective/algorithms.hpp"

namespace aikido::detail {

using transport::Doorbell;

namespace {

constexpr std::uint64_t kMagic = 0x4d48534f44494b41ull;  // "AKIDOSHM"
constexpr std::uint32_t kLayoutVersion = 1;
constexpr std::size_t kNameBytes = 1024;  // transport::kMaxNameBytes
constexpr std::size_t kLine = 64;
constexpr std::size_t kPage = 4096;

// Arrival words: occurrence + 1 in the low bits; a rank that gave up sets kAbandoned, one writing its inline
// area sets kWriting.
constexpr std::uint64_t kAbandoned = std::uint64_t(1) << 63;
constexpr std::uint64_t kWriting = std::uint64_t(1) << 62;
constexpr std::uint64_t kValueMask = kWriting - 1;

// A waiting thread first spins with pause instructions for kPause (a handoff between cores takes about 1 us; none
// when there are more ranks than cores), then yields the core between looks until kSpin (another rank sharing the
// core runs then; with nothing else to run the yield returns at once), then sleeps on its doorbell (futex).
constexpr std::chrono::microseconds kPause{20};
constexpr std::chrono::microseconds kSpin{1'000};
// How long a thread of this rank sleeps at most before it looks at deadlines again.
constexpr std::chrono::microseconds kMaxSleep{20'000};
// After it last had work, the progress thread looks for more every kPollEvery for kPollFor, then sleeps until a
// post wakes it.
constexpr std::chrono::microseconds kPollEvery{1'000};
constexpr std::chrono::milliseconds kPollFor{200};

std::size_t round_up(std::size_t n, std::size_t to) { return (n + to - 1) / to * to; }

struct alignas(kLine) SegmentHeader {
  std::uint64_t magic;
  std::uint32_t version;
  std::uint32_t ranks;
  std::uint64_t total;
  std::uint64_t inline_bytes;
  std::uint64_t piece_bytes;
};

struct alignas(kLine) NameRecord {
  std::atomic<std::uint32_t> state;  // 0 free, 1 being written, 2 ready
  std::uint32_t length;
  std::uint64_t hash;
  char name[kNameBytes];
};

struct alignas(kLine) Arrival {
  std::atomic<std::uint64_t> word;  // occurrence + 1 | flags
  std::uint64_t count;
  std::uint8_t kind;
  std::uint8_t dtype;
  std::uint8_t op;
};

struct alignas(kLine) BayWord {
  std::atomic<std::uint64_t> value;  // (occurrence + 1) << 8 | bay; 0: none yet
};

struct alignas(kLine) BayCounters {  // one rank's progress in the bay, counted in pieces
  std::atomic<std::uint64_t> copied;
  std::atomic<std::uint64_t> reduced;
  std::atomic<std::uint64_t> done;
  std::atomic<std::uint64_t> left;  // the owner token once the rank no longer touches the bay
};

struct alignas(kLine) BayOwner {
  std::atomic<std::uint64_t> token;  // 0: free
};

// A seqlock reader's fence: the loads before it (inline data) complete before the loads after it (the arrival
// words, checked again). x86 does not reorder loads with loads, so keeping the compiler from doing it is enough.
inline void read_fence() {
#if defined(__x86_64__)
  asm volatile("" ::: "memory");
#else
  std::atomic_thread_fence(std::memory_order_acquire);
#endif
}

std::uint64_t hash_name(std::string_view name) {
  std::uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : name) h = (h ^ c) * 1099511628211ull;
  return h;
}

// Entry half: [BayWord][Arrival x ranks]; then inline areas [half][rank].
std::size_t half_header_bytes(int ranks) { return sizeof(BayWord) + std::size_t(ranks) * sizeof(Arrival); }

const char* kind_label(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::allreduce:
      return "allreduce";
    case CollectiveKind::barrier:
      return "barrier";
    case CollectiveKind::consensus:
      return "consensus";
    default:
      return "collective";
  }
}

}  // namespace

/// One rank's part of one posted collective. A single allocation per call: the Work handle shares `state` through an
/// aliasing pointer that keeps the whole ShmOp alive.
struct ShmOp {
  const std::string* name = nullptr;  // the key in entry_of_name_, which is never erased
  CollectiveKind kind{};
  DType dtype{};
  ReduceOp op{};
  int entry = 0;
  std::uint64_t occurrence = 0;
  int half = 0;
  std::size_t count = 0;
  std::size_t element_bytes = 0;
  const std::byte* send = nullptr;
  std::byte* recv = nullptr;
  bool* agreed = nullptr;
  alignas(16) std::byte local[64] = {};  // input and output of barrier and consensus
  bool large = false;
  bool arrived = false;  // all ranks arrived with the same signature
  // Large collectives.
  int bay = -1;
  std::uint64_t token = 0;
  std::size_t piece_elems = 0;
  std::size_t pieces = 0;
  std::size_t next_copy = 0, next_reduce = 0, next_out = 0;
  bool finished = false;
  std::exception_ptr error;
  WorkState state;
  std::weak_ptr<ShmCollectives> owner;  // for state.drive, which may run after the Peer is gone
  std::chrono::steady_clock::time_point start, deadline;
  bool stall_queried = false;           // at half the timeout
  bool stall_reported = false;          // once every rank answered, or at three quarters of the timeout
  std::vector<std::string> waiting_in;  // per rank, once it answered the stall query: what it is waiting in

  std::string label() const { return str_cat(kind_label(kind), " '", *name, "' (seq ", occurrence, ")"); }
};

ShmLayout ShmLayout::for_ranks(int ranks) {
  ShmLayout l;
  l.ranks = ranks;
  const std::size_t n = std::size_t(ranks);
  l.inline_bytes = std::clamp<std::size_t>((std::size_t(256) << 10) / n / kPage * kPage, kPage, std::size_t(64) << 10);
  l.piece_bytes = std::size_t(512) << 10;
  std::size_t at = round_up(sizeof(SegmentHeader), kPage);
  l.bells = at;
  at = round_up(at + n * sizeof(Doorbell), kPage);
  l.names = at;
  at = round_up(at + kShmEntries * sizeof(NameRecord), kPage);
  l.entries = at;
  l.entry_bytes = round_up(2 * half_header_bytes(ranks), kPage) + 2 * n * l.inline_bytes;
  at += kShmEntries * l.entry_bytes;
  l.bays = at;
  l.bay_bytes = round_up(sizeof(BayOwner) + n * sizeof(BayCounters), kPage) + 2 * n * l.piece_bytes;
  at += kShmBays * l.bay_bytes;
  l.total = at;
  return l;
}

// Views of the segment.
namespace {

struct View {
  std::byte* base;
  const ShmLayout& l;

  Doorbell& bell(int rank) const { return reinterpret_cast<Doorbell*>(base + l.bells)[rank]; }
  NameRecord& record(int entry) const { return reinterpret_cast<NameRecord*>(base + l.names)[entry]; }
  std::byte* half(int entry, int half) const {
    return base + l.entries + std::size_t(entry) * l.entry_bytes + std::size_t(half) * half_header_bytes(l.ranks);
  }
  BayWord& bay_word(int entry, int h) const { return *reinterpret_cast<BayWord*>(half(entry, h)); }
  Arrival& arrival(int entry, int h, int rank) const {
    return reinterpret_cast<Arrival*>(half(entry, h) + sizeof(BayWord))[rank];
  }
  std::byte* inline_area(int entry, int h, int rank) const {
    return base + l.entries + std::size_t(entry) * l.entry_bytes + round_up(2 * half_header_bytes(l.ranks), kPage) +
           (std::size_t(h) * std::size_t(l.ranks) + std::size_t(rank)) * l.inline_bytes;
  }
  std::byte* bay(int b) const { return base + l.bays + std::size_t(b) * l.bay_bytes; }
  BayOwner& owner(int b) const { return *reinterpret_cast<BayOwner*>(bay(b)); }
  BayCounters& counters(int b, int rank) const {
    return reinterpret_cast<BayCounters*>(bay(b) + sizeof(BayOwner))[rank];
  }
  std::byte* slot(int b, int rank, std::size_t piece) const {
    return bay(b) + round_up(sizeof(BayOwner) + std::size_t(l.ranks) * sizeof(BayCounters), kPage) +
           (std::size_t(rank) * 2 + piece % 2) * l.piece_bytes;
  }
};

}  // namespace

void ShmCollectives::format(transport::SharedSegment& segment, int ranks) {
  const ShmLayout l = ShmLayout::for_ranks(ranks);
  AIKIDO_ENFORCE(segment.size() == l.total, "shared segment of ", segment.size(), " bytes; the layout needs ", l.total);
  auto* h = reinterpret_cast<SegmentHeader*>(segment.data());
  h->version = kLayoutVersion;
  h->ranks = std::uint32_t(ranks);
  h->total = l.total;
  h->inline_bytes = l.inline_bytes;
  h->piece_bytes = l.piece_bytes;
  h->magic = kMagic;  // the others map the segment only after the store announced it
}

void ShmCollectives::check(const transport::SharedSegment& segment, int ranks) {
  const ShmLayout l = ShmLayout::for_ranks(ranks);
  const auto* h = reinterpret_cast<const SegmentHeader*>(segment.data());
  if (segment.size() != l.total || h->magic != kMagic || h->version != kLayoutVersion ||
      h->ranks != std::uint32_t(ranks) || h->total != l.total || h->inline_bytes != l.inline_bytes ||
      h->piece_bytes != l.piece_bytes) {
    throw Error(str_cat("the shared segment does not have the layout of this library version for ", ranks, " ranks"));
  }
}

ShmCollectives::ShmCollectives(transport::SharedSegment segment, int rank, int size, std::uint64_t cluster_version,
                               std::chrono::milliseconds timeout)
    : segment_(std::move(segment)),
      layout_(ShmLayout::for_ranks(size)),
      rank_(rank),
      size_(size),
      cluster_version_(cluster_version),
      timeout_(timeout),
      spin_(kSpin),
      pause_(size > env::local_cpus() ? std::chrono::microseconds(0) : kPause),
      posted_(kShmEntries, 0),
      busy_(kShmEntries, false) {
  check(segment_, size);
  progress_ = std::thread([this] { progress_loop(); });
  name_thread(progress_, "aikido-shm");
}

ShmCollectives::~ShmCollectives() { close(); }

void ShmCollectives::close() {
  std::vector<Finished> finished;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!closing_) {
      closing_ = true;
      for (auto& op : ops_) {
        fail(*op, std::make_exception_ptr(Error(
                      str_cat(op->label(), " was still in flight on rank ", rank_, " when its Peer was destroyed"))));
      }
      collect(finished);
    }
  }
  complete(finished);
  wake_progress_.notify_all();
  View{segment_.data(), layout_}.bell(rank_).ring();
  if (progress_.joinable() && progress_.get_id() != std::this_thread::get_id()) progress_.join();
}

void ShmCollectives::ring_others() {
  const View v{segment_.data(), layout_};
  for (int q = 0; q < size_; ++q) {
    if (q != rank_) v.bell(q).ring();
  }
}

const std::pair<const std::string, int>& ShmCollectives::entry_for(std::string_view name) {
  auto cached = entry_of_name_.find(name);
  if (cached != entry_of_name_.end()) return *cached;
  const View v{segment_.data(), layout_};
  const std::uint64_t h = hash_name(name);
  int found = -1;
  for (std::uint32_t i = 0; i < kShmEntries && found < 0; ++i) {
    const int e = int((h + i) % kShmEntries);
    NameRecord& r = v.record(e);
    std::uint32_t state = r.state.load(std::memory_order_acquire);
    if (state == 0) {
      if (r.state.compare_exchange_strong(state, 1, std::memory_order_acq_rel)) {
        r.hash = h;
        r.length = std::uint32_t(name.size());
        std::memcpy(r.name, name.data(), name.size());
        r.state.store(2, std::memory_order_release);
        found = e;
        break;
      }
    }
    // Another rank is writing this record: it takes nanoseconds, unless that rank died right now.
    const auto give_up = Clock::now() + timeout_;
    while ((state = r.state.load(std::memory_order_acquire)) == 1) {
      if (Clock::now() > give_up) {
        throw PeerLostError(str_cat("rank ", rank_, ": a rank began to record a collective name in shared memory and ",
                                    "did not finish within ", seconds(timeout_)));
      }
      std::this_thread::yield();
    }
    if (r.hash == h && r.length == name.size() && std::memcmp(r.name, name.data(), name.size()) == 0) found = e;
  }
  return *entry_of_name_.emplace(std::string(name), found).first;
}

std::optional<Work> ShmCollectives::post(const Request& request, std::string_view name) {
  auto op = std::make_shared<ShmOp>();
  op->kind = request.kind;
  op->dtype = request.dtype;
  op->op = request.op;
  switch (request.kind) {
    case CollectiveKind::allreduce:
      if (request.recv_count != request.send_count) {
        throw ConfigError(str_cat("allreduce '", name, "' on rank ", rank_, ": send has ", request.send_count,
                                  " elements but recv has ", request.recv_count, "; they must be equal"));
      }
      op->count = request.send_count;
      op->send = static_cast<const std::byte*>(request.send);
      op->recv = static_cast<std::byte*>(request.recv);
      break;
    case CollectiveKind::barrier:
      op->dtype = DType::u8;
      op->op = ReduceOp::max;
      op->count = 1;
      op->local[0] = std::byte{1};
      op->send = op->recv = op->local;
      break;
    case CollectiveKind::consensus: {
      // Element-wise max of (digest, 255 - digest): all ranks agree iff max(digest) == min(digest) everywhere.
      const Digest d = sha256(request.send, request.send_count);
      for (std::size_t i = 0; i < 32; ++i) {
        op->local[i] = std::byte(d[i]);
        op->local[32 + i] = std::byte(255 - d[i]);
      }
      op->dtype = DType::u8;
      op->op = ReduceOp::max;
      op->count = 64;
      op->send = op->recv = op->local;
      op->agreed = request.agreed;
      break;
    }
    default:
      throw Error(str_cat("the same-host path does not run ", kind_label(request.kind)));
  }
  op->element_bytes = dtype_size(op->dtype);
  const std::size_t bytes = op->count * op->element_bytes;
  op->large = bytes > layout_.inline_bytes;

  std::vector<Finished> finished;
  std::unique_lock<std::mutex> lock(mutex_);
  if (closing_) throw Error("the Peer is closing");
  const auto& [recorded_name, entry] = entry_for(name);
  if (entry < 0) {
    ++table_full_posts_;
    return std::nullopt;
  }
  ++posts_;
  op->name = &recorded_name;
  op->entry = entry;
  if (busy_[std::size_t(entry)]) {
    throw ConfigError(str_cat(kind_label(request.kind), " '", name, "' was posted again on rank ", rank_,
                              " while its occurrence ", posted_[std::size_t(entry)] - 1,
                              " is still in flight; wait for it first or use another name"));
  }
  op->occurrence = posted_[std::size_t(entry)]++;
  op->half = int(op->occurrence & 1);
  op->start = Clock::now();
  op->deadline = op->start + timeout_;
  Work work(std::shared_ptr<WorkState>(op, &op->state));
  if (!lost_.empty()) {
    op->state.done = true;
    op->state.error = std::make_exception_ptr(PeerLostError(
        str_cat(op->label(), " cannot run on rank ", rank_, " at cluster version ", cluster_version_, ": ", lost_)));
    return work;
  }

  // Arrive: the signature, and for small inputs the data too (one synchronisation in all).
  const View v{segment_.data(), layout_};
  Arrival& a = v.arrival(entry, op->half, rank_);
  const std::uint64_t value = op->occurrence + 1;
  if (!op->large) {
    // Seqlock writer: the data stores below cannot move above this read-modify-write.
    a.word.exchange(value | kWriting, std::memory_order_acq_rel);
    if (bytes > 0) std::memcpy(v.inline_area(entry, op->half, rank_), op->send, bytes);
  }
  a.count = op->count;
  a.kind = std::uint8_t(op->kind);
  a.dtype = std::uint8_t(op->dtype);
  a.op = std::uint8_t(op->op);
  a.word.store(value, std::memory_order_seq_cst);
  busy_[std::size_t(entry)] = true;
  op->owner = weak_from_this();
  // Captures one pointer, which std::function stores without allocating; the state lives inside the ShmOp.
  op->state.drive = [raw = op.get()](WorkState& w, Clock::time_point until) {
    if (auto self = raw->owner.lock()) self->drive(w, until);
  };
  ops_.push_back(op);
  ring_others();
  // The last rank to arrive finishes a small collective right here.
  advance_all(finished, op->start);
  // Waking the progress thread costs a system call and a core: do it only when it sleeps deeply. While
  // collectives keep coming it polls instead, and a blocking collective is driven by its waiting thread anyway.
  const bool wake = !ops_.empty() && drivers_ == 0 && progress_asleep_;
  if (wake) progress_asleep_ = false;
  lock.unlock();
  complete(finished);
  if (wake) wake_progress_.notify_one();
  return work;
}

bool ShmCollectives::advance_all(std::vector<Finished>& finished, Clock::time_point now) {
  bool progressed = false;
  for (auto& op : ops_) {
    if (op->finished) continue;
    try {
      progressed |= advance(*op, now);
    } catch (...) {
      fail(*op, std::current_exception());
      progressed = true;
    }
  }
  collect(finished);
  return progressed;
}

void ShmCollectives::collect(std::vector<Finished>& finished) {
  bool any = false;
  for (auto& op : ops_) {
    if (!op->finished) continue;
    busy_[std::size_t(op->entry)] = false;
    finished.push_back({std::shared_ptr<WorkState>(op, &op->state), op->error});
    any = true;
  }
  if (!any) return;
  std::erase_if(ops_, [](const std::shared_ptr<ShmOp>& op) { return op->finished; });
  if (ops_.empty()) idle_.notify_all();
}

void ShmCollectives::complete(std::vector<Finished>& finished) {
  if (finished.empty()) return;
  for (auto& f : finished) f.work->complete(f.error);
  finished.clear();
  // Another thread of this rank may be waiting for one of these on the doorbell.
  View{segment_.data(), layout_}.bell(rank_).ring();
}

bool ShmCollectives::advance(ShmOp& op, Clock::time_point now) {
  const View v{segment_.data(), layout_};
  const std::uint64_t value = op.occurrence + 1;
  if (!op.arrived) {
    int gave_up = -1;
    for (int q = 0; q < size_; ++q) {
      const std::uint64_t w = v.arrival(op.entry, op.half, q).word.load(std::memory_order_acquire);
      if (w == value) continue;
      if (w == (value | kAbandoned)) {  // it arrived (its signature counts) and then failed
        gave_up = q;
        continue;
      }
      if ((w & kValueMask) > value) {
        throw PeerLostError(str_cat(op.label(), " failed on rank ", rank_, " at cluster version ", cluster_version_,
                                    ": rank ", q, " gave it up (its own error names the cause)"));
      }
      if (now >= op.deadline) {
        throw TimeoutError(str_cat(describe_wait(op), "; the timeout is ", seconds(timeout_), " (AIKIDO_TIMEOUT)"));
      }
      return false;
    }
    for (int q = 0; q < size_; ++q) {
      const Arrival& a = v.arrival(op.entry, op.half, q);
      if (a.count != op.count || a.kind != std::uint8_t(op.kind) || a.dtype != std::uint8_t(op.dtype) ||
          a.op != std::uint8_t(op.op)) {
        auto describe = [](int rank, std::uint8_t kind, std::uint8_t dtype, std::uint8_t rop, std::uint64_t count) {
          return str_cat("rank ", rank, " posted ", kind_label(CollectiveKind(kind)), " of ", count, " ",
                         dtype_name(DType(dtype)), " elements, op ", reduce_op_name(ReduceOp(rop)));
        };
        throw MismatchError(
            str_cat("ranks posted '", *op.name, "' (seq ", op.occurrence, ", cluster version ", cluster_version_,
                    ") differently: ",
                    describe(rank_, std::uint8_t(op.kind), std::uint8_t(op.dtype), std::uint8_t(op.op), op.count), "; ",
                    describe(q, a.kind, a.dtype, a.op, a.count),
                    ". Every rank must post the same name with the same size, type, operation and root"));
      }
    }
    if (gave_up >= 0) {
      throw PeerLostError(str_cat(op.label(), " failed on rank ", rank_, " at cluster version ", cluster_version_,
                                  ": rank ", gave_up, " gave it up (its own error names the cause)"));
    }
    op.arrived = true;
    if (!op.large) {
      const std::size_t bytes = op.count * op.element_bytes;
      if (bytes > 0) {
        // The first two in one pass (a copy and a reduction would read and write the output twice). There are at
        // least two: a one-rank Peer has no segment.
        reduce_pair(op.dtype, op.op, op.recv, v.inline_area(op.entry, op.half, 0), v.inline_area(op.entry, op.half, 1),
                    op.count);
        for (int q = 2; q < size_; ++q) {
          reduce_into(op.dtype, op.op, op.recv, v.inline_area(op.entry, op.half, q), op.count);
        }
      }
      read_fence();
      for (int q = 0; q < size_; ++q) {
        if (v.arrival(op.entry, op.half, q).word.load(std::memory_order_relaxed) != value) {
          throw PeerLostError(str_cat(op.label(), " failed on rank ", rank_, " at cluster version ", cluster_version_,
                                      ": rank ", q, " gave it up while its input was read"));
        }
      }
      finish(op);
      return true;
    }
  }
  for (int q = 0; q < size_; ++q) {
    if (v.arrival(op.entry, op.half, q).word.load(std::memory_order_acquire) != value) {
      throw PeerLostError(str_cat(op.label(), " failed on rank ", rank_, " at cluster version ", cluster_version_,
                                  ": rank ", q, " gave it up (its own error names the cause)"));
    }
  }
  if (now >= op.deadline) {
    throw TimeoutError(str_cat(describe_wait(op), "; the timeout is ", seconds(timeout_), " (AIKIDO_TIMEOUT)"));
  }
  return advance_large(op);
}

bool ShmCollectives::join_bay(ShmOp& op) {
  const View v{segment_.data(), layout_};
  const std::uint64_t value = op.occurrence + 1;
  BayWord& word = v.bay_word(op.entry, op.half);
  std::uint64_t seen = word.value.load(std::memory_order_acquire);
  const std::uint64_t token = (std::uint64_t(op.entry + 1) << 44) | (value & ((std::uint64_t(1) << 44) - 1));
  if ((seen >> 8) != value) {
    int claimed = -1;
    for (int b = 0; b < int(kShmBays) && claimed < 0; ++b) {
      std::uint64_t free = 0;
      if (v.owner(b).token.compare_exchange_strong(free, token, std::memory_order_acq_rel)) claimed = b;
    }
    if (claimed < 0) return false;  // every bay is busy: the one released next rings the doorbells
    for (int q = 0; q < size_; ++q) {
      BayCounters& c = v.counters(claimed, q);
      c.copied.store(0, std::memory_order_relaxed);
      c.reduced.store(0, std::memory_order_relaxed);
      c.done.store(0, std::memory_order_relaxed);
      c.left.store(0, std::memory_order_relaxed);
    }
    if (word.value.compare_exchange_strong(seen, (value << 8) | std::uint64_t(claimed), std::memory_order_seq_cst)) {
      seen = (value << 8) | std::uint64_t(claimed);
      // A rank that gave up before it could see this bay will never leave it: leave it on its behalf.
      for (int q = 0; q < size_; ++q) {
        const std::uint64_t w = v.arrival(op.entry, op.half, q).word.load(std::memory_order_seq_cst);
        if ((w & kAbandoned) && (w & kValueMask) == value) leave_bay(claimed, q, token);
      }
    } else {
      v.owner(claimed).token.store(0, std::memory_order_release);  // another rank assigned one first
      ring_others();
      if ((seen >> 8) != value) return false;
    }
  }
  op.bay = int(seen & 0xff);
  op.token = token;
  op.piece_elems = layout_.piece_bytes / op.element_bytes;
  op.pieces = (op.count + op.piece_elems - 1) / op.piece_elems;
  ring_others();
  return true;
}

void ShmCollectives::leave_bay(int bay, int rank, std::uint64_t token) {
  const View v{segment_.data(), layout_};
  v.counters(bay, rank).left.store(token, std::memory_order_seq_cst);
  for (int q = 0; q < size_; ++q) {
    if (v.counters(bay, q).left.load(std::memory_order_seq_cst) != token) return;
  }
  std::uint64_t expected = token;
  if (v.owner(bay).token.compare_exchange_strong(expected, 0, std::memory_order_acq_rel)) ring_others();
}

bool ShmCollectives::advance_large(ShmOp& op) {
  if (op.bay < 0 && !join_bay(op)) return false;
  const View v{segment_.data(), layout_};
  const int n = size_, me = rank_;
  const std::size_t esize = op.element_bytes;
  bool progressed = false;
  auto piece_range = [&](std::size_t j) {
    const std::size_t first = j * op.piece_elems;
    return std::make_pair(first, std::min(op.piece_elems, op.count - first));
  };
  for (;;) {
    bool moved = false;
    // Copy the other ranks' shares of piece j into this rank's slot, once every rank is done with piece j - 2.
    if (op.next_copy < op.pieces && op.next_copy < op.next_out + 2) {
      const std::size_t j = op.next_copy;
      bool free = true;
      for (int q = 0; q < n && free && j >= 2; ++q) {
        if (v.counters(op.bay, q).done.load(std::memory_order_acquire) + 1 < j) free = false;
      }
      if (free) {
        const auto [first, len] = piece_range(j);
        const std::size_t own_at = collective::block_offset(len, n, me), own_len = collective::block_count(len, n, me);
        std::byte* slot = v.slot(op.bay, me, j);
        const std::byte* in = op.send + first * esize;
        if (own_at > 0) std::memcpy(slot, in, own_at * esize);
        const std::size_t tail = own_at + own_len;
        if (tail < len) std::memcpy(slot + tail * esize, in + tail * esize, (len - tail) * esize);
        v.counters(op.bay, me).copied.store(j + 1, std::memory_order_release);
        ring_others();
        ++op.next_copy;
        moved = true;
      }
    }
    // Reduce this rank's share of piece j once every rank has copied it.
    if (op.next_reduce < op.next_copy) {
      const std::size_t j = op.next_reduce;
      bool ready = true;
      for (int q = 0; q < n && ready; ++q) {
        if (q != me && v.counters(op.bay, q).copied.load(std::memory_order_acquire) < j + 1) ready = false;
      }
      if (ready) {
        const auto [first, len] = piece_range(j);
        const std::size_t own_at = collective::block_offset(len, n, me), own_len = collective::block_count(len, n, me);
        if (own_len > 0) {
          std::byte* out = op.recv + (first + own_at) * esize;
          if (op.recv != op.send) std::memcpy(out, op.send + (first + own_at) * esize, own_len * esize);
          for (int q = 0; q < n; ++q) {
            if (q != me) reduce_into(op.dtype, op.op, out, v.slot(op.bay, q, j) + own_at * esize, own_len);
          }
          // A mean is finished here, while the share is in cache, so that every rank copies out finished values
          // (the same division, so the same bits, as a pass over the whole output at the end).
          if (op.op == ReduceOp::mean) divide_by_count(op.dtype, out, own_len, n);
          std::memcpy(v.slot(op.bay, me, j) + own_at * esize, out, own_len * esize);
        }
        v.counters(op.bay, me).reduced.store(j + 1, std::memory_order_release);
        ring_others();
        ++op.next_reduce;
        moved = true;
      }
    }
    // Copy the other shares of the result of piece j out of their owners' slots.
    if (op.next_out < op.next_reduce) {
      const std::size_t j = op.next_out;
      bool ready = true;
      for (int q = 0; q < n && ready; ++q) {
        if (q != me && v.counters(op.bay, q).reduced.load(std::memory_order_acquire) < j + 1) ready = false;
      }
      if (ready) {
        const auto [first, len] = piece_range(j);
        for (int q = 0; q < n; ++q) {
          const std::size_t at = collective::block_offset(len, n, q), c = collective::block_count(len, n, q);
          if (q != me && c > 0)
            std::memcpy(op.recv + (first + at) * esize, v.slot(op.bay, q, j) + at * esize, c * esize);
        }
        v.counters(op.bay, me).done.store(j + 1, std::memory_order_release);
        ring_others();
        ++op.next_out;
        moved = true;
      }
    }
    if (!moved) break;
    progressed = true;
  }
  if (op.next_out == op.pieces) {
    leave_bay(op.bay, me, op.token);
    op.bay = -1;
    finish(op);
    return true;
  }
  return progressed;
}

void ShmCollectives::finish(ShmOp& op) {
  try {
    if (op.kind == CollectiveKind::allreduce && op.op == ReduceOp::mean && op.count > 0 && !op.large) {
      divide_by_count(op.dtype, op.recv, op.count, size_);
    }
    if (op.kind == CollectiveKind::consensus && op.agreed) {
      bool agreed = true;
      for (std::size_t i = 0; i < 32; ++i) {
        if (std::uint8_t(op.local[i]) != std::uint8_t(255 - std::uint8_t(op.local[32 + i]))) agreed = false;
      }
      *op.agreed = agreed;
    }
  } catch (...) {
    op.error = std::current_exception();
  }
  op.finished = true;
}

void ShmCollectives::fail(ShmOp& op, std::exception_ptr error) {
  if (op.finished) return;
  const View v{segment_.data(), layout_};
  const std::uint64_t value = op.occurrence + 1;
  // Tell the other ranks, which may be waiting for this rank or reading its inline area.
  std::uint64_t expected = value;
  v.arrival(op.entry, op.half, rank_)
      .word.compare_exchange_strong(expected, value | kAbandoned, std::memory_order_seq_cst);
  if (op.large) {
    if (op.bay >= 0) {
      leave_bay(op.bay, rank_, op.token);
    } else {
      // A bay may have been assigned without this rank seeing it yet (join_bay checks the other way round).
      const std::uint64_t w = v.bay_word(op.entry, op.half).value.load(std::memory_order_seq_cst);
      if ((w >> 8) == value) {
        const std::uint64_t token = (std::uint64_t(op.entry + 1) << 44) | (value & ((std::uint64_t(1) << 44) - 1));
        leave_bay(int(w & 0xff), rank_, token);
      }
    }
    op.bay = -1;
  }
  ring_others();
  op.error = error;
  op.finished = true;
}

std::string ShmCollectives::describe_wait(const ShmOp& op) const {
  const View v{segment_.data(), layout_};
  const std::uint64_t value = op.occurrence + 1;
  std::vector<int> not_posted, behind;
  for (int q = 0; q < size_; ++q) {
    if (q == rank_) continue;
    const std::uint64_t w = v.arrival(op.entry, op.half, q).word.load(std::memory_order_acquire);
    if ((w & kValueMask) < value || (w & kWriting)) {
      not_posted.push_back(q);
    } else if (op.bay >= 0) {
      const BayCounters& c = v.counters(op.bay, q);
      if (c.done.load(std::memory_order_acquire) < op.next_out + 1 ||
          c.reduced.load(std::memory_order_acquire) < op.next_reduce + 1) {
        behind.push_back(q);
      }
    }
  }
  const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - op.start);
  std::string text = str_cat(op.label(), " on rank ", rank_, " at cluster version ", cluster_version_, " has waited ",
                             seconds(waited), " (same-host shared memory)");
  if (!not_posted.empty()) {
    text += str_cat("; rank", not_posted.size() > 1 ? "s " : " ", rank_list(not_posted),
                    not_posted.size() > 1 ? " have" : " has", " not posted it");
    for (int q : not_posted) {
      if (!op.waiting_in.empty() && !op.waiting_in[std::size_t(q)].empty()) {
        text += str_cat("; rank ", q, " ", op.waiting_in[std::size_t(q)]);
      }
    }
  } else if (op.arrived && op.bay < 0) {
    text += "; waiting for a free shared-memory bay";
  }
  std::vector<int> silent;
  for (int q = 0; q < size_ && op.stall_queried; ++q) {
    if (q != rank_ && (op.waiting_in.empty() || op.waiting_in[std::size_t(q)].empty())) silent.push_back(q);
  }
  if (!silent.empty()) text += silent_ranks(silent);
  if (!behind.empty()) text += str_cat("; waiting for data from rank(s) ", rank_list(behind));
  return text;
}

void ShmCollectives::peer_lost(int peer, const std::string& why, bool departed) {
  std::vector<Finished> finished;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closing_) return;
    if (lost_.empty()) lost_ = why;
    const View v{segment_.data(), layout_};
    for (auto& op : ops_) {
      // What the peer has put in shared memory stays there: a small collective it arrived at needs nothing more
      // from it, nor does a large one it left on purpose (having finished its part, or marked it abandoned).
      const bool arrived =
          v.arrival(op->entry, op->half, peer).word.load(std::memory_order_acquire) == op->occurrence + 1;
      if (arrived && (!op->large || departed)) continue;
      fail(*op, std::make_exception_ptr(PeerLostError(str_cat(op->label(), " failed on rank ", rank_,
                                                              " at cluster version ", cluster_version_, ": ", why))));
    }
    collect(finished);
  }
  complete(finished);
}

std::vector<ShmCollectives::Stalled> ShmCollectives::watch(Clock::time_point now) {
  std::vector<Stalled> out;
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& op : ops_) {
    if (op->finished) continue;
    if (!op->stall_queried && now >= op->start + timeout_ / 2) {
      op->stall_queried = true;
      out.push_back({*op->name, op->occurrence});
    } else if (op->stall_queried && !op->stall_reported && now >= op->start + timeout_ * 3 / 4) {
      op->stall_reported = true;  // some rank has not answered: report what is known
      log::warn("stall report: ", describe_wait(*op));
    }
  }
  return out;
}

bool ShmCollectives::posted(std::string_view name, std::uint64_t occurrence) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = entry_of_name_.find(name);  // never entry_for: asking must not claim a record
  return it != entry_of_name_.end() && it->second >= 0 && posted_[std::size_t(it->second)] > occurrence;
}

void ShmCollectives::stall_reply(std::string_view name, std::uint64_t occurrence, int source, bool posted,
                                 std::string waiting_in) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (source < 0 || source >= size_ || source == rank_) return;
  for (auto& op : ops_) {
    if (op->finished || op->occurrence != occurrence || *op->name != name) continue;
    op->waiting_in.resize(std::size_t(size_));
    // An answer that says nothing still counts as one (the rank posted it and waits in it).
    op->waiting_in[std::size_t(source)] = waiting_in.empty() ? (posted ? "posted it" : "answered") : waiting_in;
    for (int q = 0; q < size_; ++q) {
      if (q != rank_ && op->waiting_in[std::size_t(q)].empty()) return;
    }
    if (!op->stall_reported) log::warn("stall report: ", describe_wait(*op));
    op->stall_reported = true;
    return;
  }
}

void ShmCollectives::in_flight(std::vector<InFlight>& out) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& op : ops_) {
    if (!op->finished) out.push_back({op->start, op->label(), op->state.waited.load(std::memory_order_relaxed)});
  }
}

std::pair<std::uint64_t, std::uint64_t> ShmCollectives::post_counts() {
  std::lock_guard<std::mutex> lock(mutex_);
  return {posts_, table_full_posts_};
}

bool ShmCollectives::drain(Clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mutex_);
  return idle_.wait_until(lock, deadline, [&] { return ops_.empty(); });
}

void ShmCollectives::drive(WorkState& work, Clock::time_point until) {
  Doorbell& bell = View{segment_.data(), layout_}.bell(rank_);
  auto done = [&] {
    std::lock_guard<std::mutex> lock(work.mutex);
    return work.done;
  };
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ++drivers_;
  }
  std::vector<Finished> finished;
  while (!done()) {
    const std::uint32_t seen = bell.rings.load(std::memory_order_seq_cst);
    bool progressed = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (closing_) break;
      progressed = advance_all(finished, Clock::now());
    }
    if (progressed) {
      complete(finished);
      continue;
    }
    auto now = Clock::now();
    if (now >= until) break;
    // Nothing to do until another rank rings: spin on the doorbell for a moment, then sleep on it.
    const auto spin_until = now + spin_, pause_until = now + pause_;
    for (auto t = now; bell.rings.load(std::memory_order_acquire) == seen && t < spin_until; t = Clock::now()) {
      if (t >= pause_until) {
        sched_yield();
      } else {
        transport::cpu_relax();  // about 30 ns here: look often, a handoff is about 1 us
      }
    }
    now = Clock::now();
    if (bell.rings.load(std::memory_order_acquire) == seen && now < until) {
      const auto left = std::chrono::duration_cast<std::chrono::microseconds>(until - now);
      bell.sleep(seen, std::min(kMaxSleep, left));
    }
  }
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    wake = --drivers_ == 0 && !ops_.empty();
  }
  if (wake) wake_progress_.notify_one();
}

void ShmCollectives::progress_loop() {
  Doorbell& bell = View{segment_.data(), layout_}.bell(rank_);
  std::vector<Finished> finished;
  std::unique_lock<std::mutex> lock(mutex_);
  auto last_busy = Clock::now();
  for (;;) {
    auto needed = [&] { return closing_ || (!ops_.empty() && drivers_ == 0); };
    while (!needed()) {
      if (Clock::now() - last_busy < kPollFor) {
        wake_progress_.wait_for(lock, kPollEvery);
      } else {
        progress_asleep_ = true;
        wake_progress_.wait(lock, [&] { return needed() || !progress_asleep_; });
        progress_asleep_ = false;
      }
    }
    if (closing_) return;
    last_busy = Clock::now();
    const std::uint32_t seen = bell.rings.load(std::memory_order_seq_cst);
    const bool progressed = advance_all(finished, Clock::now());
    lock.unlock();
    complete(finished);
    if (!progressed) bell.sleep(seen, kMaxSleep);
    lock.lock();
  }
}

}  // namespace aikido::detail
