#include "runtime/shm_collectives.hpp"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>

#include "base/crypto.hpp"
#include "base/env.hpp"
#include "base/error.hpp"
#include "base/log.hpp"
#include "base/reduce.hpp"
#include "base/thread.hpp"
#include "collective/algorithms.hpp"

namespace aikido::detail {

using transport::Doorbell;

namespace {

constexpr std::uint64_t kMagic = 0x4d48534f44494b41ull;  // "AKIDOSHM"
constexpr std::uint32_t kLayoutVersion = 2;
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
  std::uint64_t count;              // elements of the buffer
  std::uint64_t signature_count;    // ShmRequest::signature_count
  std::int32_t root;
  std::int32_t signature_root;  // ShmRequest::signature_root
  std::uint32_t abandon_text;   // a rank that gave up: bytes of its error's text in its inline area
  std::uint8_t kind;
  std::uint8_t dtype;
  std::uint8_t op;
  std::uint8_t abandon_kind;  // and its transport::WireError
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
    case CollectiveKind::reduce_scatter:
      return "reduce_scatter";
    case CollectiveKind::allgather:
      return "allgather";
    case CollectiveKind::broadcast:
      return "broadcast";
    case CollectiveKind::barrier:
      return "barrier";
    case CollectiveKind::consensus:
      return "consensus";
    default:
      return "collective";
  }
}

// Rank q's slice of `count` elements among `n` ranks.
struct Slice {
  std::size_t offset;
  std::size_t count;
};
Slice slice_of(std::size_t count, int n, int q) {
  return {collective::block_offset(count, n, q), collective::block_count(count, n, q)};
}

}  // namespace

/// One rank's part of one posted collective. A single allocation per call: the Work handle shares `state` through an
/// aliasing pointer that keeps the whole ShmOp alive.
struct ShmOp {
  const std::string* name = nullptr;  // the key in entry_of_name_, which is never erased
  CollectiveKind kind{};
  DType dtype{};
  ReduceOp op{};
  int root = 0;
  std::uint64_t signature_count = 0;
  int signature_root = 0;
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
  std::size_t share_elems = 0;  // the most of one slice a piece holds
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

ShmCollectives::ShmCollectives(transport::SharedSegment segment, int rank, int size, std::vector<int> members,
                               std::uint64_t cluster_version, std::chrono::milliseconds timeout)
    : segment_(std::move(segment)),
      layout_(ShmLayout::for_ranks(size)),
      rank_(rank),
      size_(size),
      members_(std::move(members)),
      cluster_version_(cluster_version),
      timeout_(timeout),
      spin_(kSpin),
      pause_(size > env::local_cpus() ? std::chrono::microseconds(0) : kPause),
      posted_(kShmEntries, 0),
      busy_(kShmEntries, false) {
  check(segment_, size);
  AIKIDO_ENFORCE(int(members_.size()) == size, "shared memory for ", size, " ranks with ", members_.size(), " members");
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
        fail(*op, std::make_exception_ptr(Error(str_cat(op->label(), " was still in flight on rank ", members_[rank_],
                                                        " when its Peer was destroyed"))));
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
        throw PeerLostError(str_cat("rank ", members_[rank_],
                                    ": a rank began to record a collective name in shared memory and ",
                                    "did not finish within ", seconds(timeout_)));
      }
      std::this_thread::yield();
    }
    if (r.hash == h && r.length == name.size() && std::memcmp(r.name, name.data(), name.size()) == 0) found = e;
  }
  return *entry_of_name_.emplace(std::string(name), found).first;
}

namespace {

// The op a request describes (without its entry): kind, signature and buffers.
std::shared_ptr<ShmOp> make_op(const ShmRequest& request, int rank, int size, std::size_t inline_bytes) {
  auto op = std::make_shared<ShmOp>();
  op->kind = request.kind;
  op->dtype = request.dtype;
  op->op = request.op;
  op->root = request.root;
  op->count = request.count;
  op->send = static_cast<const std::byte*>(request.send);
  op->recv = static_cast<std::byte*>(request.recv);
  switch (request.kind) {
    case CollectiveKind::allreduce:
    case CollectiveKind::reduce_scatter:
    case CollectiveKind::allgather:
      break;
    case CollectiveKind::broadcast:
      op->op = ReduceOp::sum;
      op->send = op->recv;
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
      const Digest d = sha256(request.send, request.count);
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
  op->signature_count = request.signature_count;
  op->signature_root = request.signature_root;
  op->element_bytes = dtype_size(op->dtype);
  // The most one rank puts in its inline area: every rank decides alike (it depends on the signature only).
  std::size_t contributed = op->count * op->element_bytes;
  if (op->kind == CollectiveKind::allgather) contributed = slice_of(op->count, size, 0).count * op->element_bytes;
  op->large = contributed > inline_bytes;
  (void)rank;
  return op;
}

}  // namespace

bool ShmCollectives::arrive(ShmOp& op, std::string_view name, std::uint64_t flags, transport::WireError kind,
                            const std::string& text) {
  const auto& [recorded_name, entry] = entry_for(name);
  if (entry < 0) return false;
  op.name = &recorded_name;
  op.entry = entry;
  if (busy_[std::size_t(entry)]) {
    throw ConfigError(str_cat(kind_label(op.kind), " '", name, "' was posted again on rank ", members_[rank_],
                              " while its occurrence ", posted_[std::size_t(entry)] - 1,
                              " is still in flight; wait for it first or use another name"));
  }
  op.occurrence = posted_[std::size_t(entry)]++;
  op.half = int(op.occurrence & 1);
  const View v{segment_.data(), layout_};
  Arrival& a = v.arrival(entry, op.half, rank_);
  const std::uint64_t value = op.occurrence + 1;
  // The data of a small collective goes in with the arrival (one synchronisation in all); a rank that gives up
  // leaves its error there instead.
  a.abandon_text = 0;
  a.abandon_kind = std::uint8_t(kind);
  if (flags & kAbandoned) {
    a.word.exchange(value | kWriting, std::memory_order_acq_rel);
    a.abandon_text = std::uint32_t(std::min(text.size(), layout_.inline_bytes));
    std::memcpy(v.inline_area(entry, op.half, rank_), text.data(), a.abandon_text);
  }
  const bool with_data = !op.large && !(flags & kAbandoned);
  if (with_data) {
    // Seqlock writer: the data stores below cannot move above this read-modify-write.
    a.word.exchange(value | kWriting, std::memory_order_acq_rel);
    std::byte* area = v.inline_area(entry, op.half, rank_);
    const std::size_t esize = op.element_bytes;
    switch (op.kind) {
      case CollectiveKind::allgather: {
        const std::size_t n = slice_of(op.count, size_, rank_).count;
        if (n > 0) std::memcpy(area, op.send, n * esize);
        break;
      }
      case CollectiveKind::broadcast:
        if (rank_ == op.root && op.count > 0) std::memcpy(area, op.recv, op.count * esize);
        break;
      default:
        if (op.count > 0) std::memcpy(area, op.send, op.count * esize);
        break;
    }
  }
  a.count = op.count;
  a.signature_count = op.signature_count;
  a.root = op.root;
  a.signature_root = op.signature_root;
  a.kind = std::uint8_t(op.kind);
  a.dtype = std::uint8_t(op.dtype);
  a.op = std::uint8_t(op.op);
  a.word.store(value | flags, std::memory_order_seq_cst);
  return true;
}

std::optional<Work> ShmCollectives::post(const ShmRequest& request, std::string_view name) {
  auto op = make_op(request, rank_, size_, layout_.inline_bytes);
  if (request.kind == CollectiveKind::allreduce && request.count > 0 && !request.send) op->send = op->recv;
  if ((op->kind == CollectiveKind::broadcast) && (op->root < 0 || op->root >= size_)) {
    throw ConfigError(
        str_cat("broadcast '", name, "': root ", op->root, " is not one of the ", size_, " ranks of this host"));
  }

  std::vector<Finished> finished;
  std::unique_lock<std::mutex> lock(mutex_);
  if (closing_) throw Error("the Peer is closing");
  op->start = Clock::now();
  op->deadline = op->start + timeout_;
  if (!lost_.empty()) {
    // Claims the occurrence all the same, so that later occurrences still line up with the other ranks'.
    if (!arrive(*op, name, kAbandoned)) return std::nullopt;
    op->state.done = true;
    op->state.error = std::make_exception_ptr(PeerLostError(str_cat(
        op->label(), " cannot run on rank ", members_[rank_], " at cluster version ", cluster_version_, ": ", lost_)));
    ring_others();
    return Work(std::shared_ptr<WorkState>(op, &op->state));
  }
  if (!arrive(*op, name, 0)) return std::nullopt;
  Work work(std::shared_ptr<WorkState>(op, &op->state));
  busy_[std::size_t(op->entry)] = true;
  op->owner = weak_from_this();
  // Captures one pointer, which std::function stores without allocating; the state lives inside the ShmOp.
  op->state.drive = [raw = op.get()](WorkState& w, Clock::time_point until) {
    if (auto self = raw->owner.lock()) self->drive(w, until);
  };
  op->state.cancel = [raw = op.get()](std::exception_ptr error) {
    if (auto self = raw->owner.lock()) self->cancel(*raw, error);
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

bool ShmCollectives::abandon(const ShmRequest& request, std::string_view name, transport::WireError kind,
                             const std::string& text) {
  auto op = make_op(request, rank_, size_, layout_.inline_bytes);
  std::lock_guard<std::mutex> lock(mutex_);
  if (closing_) return true;
  if (!arrive(*op, name, kAbandoned, kind, text)) return false;
  ring_others();
  return true;
}

void ShmCollectives::cancel(ShmOp& op, std::exception_ptr error) {
  std::vector<Finished> finished;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (op.finished) return;
    fail(op, error);
    collect(finished);
  }
  complete(finished);
}

std::exception_ptr ShmCollectives::given_up(const ShmOp& op, int q, std::string_view when) const {
  const View v{segment_.data(), layout_};
  const std::uint64_t value = op.occurrence + 1;
  const std::uint64_t w = settled_word(op, q);
  const std::string prefix = str_cat(op.label(), " failed on rank ", members_[rank_], " at cluster version ",
                                     cluster_version_, ": rank ", members_[q], " gave it up");
  // Its error is there when it abandoned this occurrence, or a later one that took this half over (a rank that
  // fails a hierarchical collective abandons its remaining phases at once: the cause of them all).
  if (!(w & kAbandoned) || (w & kValueMask) < value) {
    return std::make_exception_ptr(
        PeerLostError(str_cat(prefix, when.empty() ? std::string_view(" (its own error names the cause)") : when)));
  }
  const Arrival& a = v.arrival(op.entry, op.half, q);
  const std::string text(reinterpret_cast<const char*>(v.inline_area(op.entry, op.half, q)),
                         std::min<std::size_t>(a.abandon_text, layout_.inline_bytes));
  const auto kind = transport::WireError(a.abandon_kind);
  return error_for(kind == transport::WireError::none ? transport::WireError::lost : kind,
                   text.empty() ? str_cat(prefix, " (its own error names the cause)") : str_cat(prefix, ": ", text));
}

// Rank q's arrival word for `op` (or for a later occurrence on the same half), once what it is writing there is
// written (an error or a small input: a short copy, then the word is published, so the wait is short and bounded).
std::uint64_t ShmCollectives::settled_word(const ShmOp& op, int q) const {
  const View v{segment_.data(), layout_};
  const std::uint64_t value = op.occurrence + 1;
  const std::atomic<std::uint64_t>& word = v.arrival(op.entry, op.half, q).word;
  std::uint64_t w = word.load(std::memory_order_acquire);
  for (int spins = 0; (w & kWriting) && (w & kValueMask) >= value && spins < 100000; ++spins) {
    std::this_thread::yield();
    w = word.load(std::memory_order_acquire);
  }
  return w;
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
      if ((w & kValueMask) > value) std::rethrow_exception(given_up(op, q));
      if (now >= op.deadline) {
        throw TimeoutError(str_cat(describe_wait(op), "; the timeout is ", seconds(timeout_), " (AIKIDO_TIMEOUT)"));
      }
      return false;
    }
    for (int q = 0; q < size_; ++q) {
      const Arrival& a = v.arrival(op.entry, op.half, q);
      if (a.count != op.count || a.signature_count != op.signature_count || a.kind != std::uint8_t(op.kind) ||
          a.dtype != std::uint8_t(op.dtype) || a.op != std::uint8_t(op.op) || a.root != op.root ||
          a.signature_root != op.signature_root) {
        auto describe = [&](int rank, std::uint8_t kind, std::uint8_t dtype, std::uint8_t rop, std::uint64_t count,
                            int root) {
          std::string text = str_cat("rank ", rank, " posted ", kind_label(CollectiveKind(kind)), " of ", count, " ",
                                     dtype_name(DType(dtype)), " elements, op ", reduce_op_name(ReduceOp(rop)));
          if (CollectiveKind(kind) == CollectiveKind::broadcast) text += str_cat(", root ", root);
          return text;
        };
        throw MismatchError(
            str_cat("ranks posted '", *op.name, "' (seq ", op.occurrence, ", cluster version ", cluster_version_,
                    ") differently: ",
                    describe(members_[rank_], std::uint8_t(op.kind), std::uint8_t(op.dtype), std::uint8_t(op.op),
                             op.signature_count, op.signature_root),
                    "; ", describe(members_[q], a.kind, a.dtype, a.op, a.signature_count, a.signature_root),
                    ". Every rank must post the same name with the same size, type, operation and root"));
      }
    }
    if (gave_up >= 0) std::rethrow_exception(given_up(op, gave_up));
    op.arrived = true;
    if (!op.large) {
      combine_small(op);
      read_fence();
      for (int q = 0; q < size_; ++q) {
        if (v.arrival(op.entry, op.half, q).word.load(std::memory_order_relaxed) != value) {
          std::rethrow_exception(given_up(op, q, " while its input was read"));
        }
      }
      finish(op);
      return true;
    }
  }
  for (int q = 0; q < size_; ++q) {
    // A rank that failed later (another chunk of the same collective saw a mismatch) left its error here: it
    // names the cause, and its kind (MismatchError, ...) reaches this rank too.
    if (v.arrival(op.entry, op.half, q).word.load(std::memory_order_acquire) != value) {
      std::rethrow_exception(given_up(op, q));
    }
  }
  if (now >= op.deadline) {
    throw TimeoutError(str_cat(describe_wait(op), "; the timeout is ", seconds(timeout_), " (AIKIDO_TIMEOUT)"));
  }
  return advance_large(op);
}

// Every rank arrived with its contribution in its inline area: combine them into this rank's output.
void ShmCollectives::combine_small(ShmOp& op) {
  const View v{segment_.data(), layout_};
  const std::size_t esize = op.element_bytes;
  auto area = [&](int q) { return v.inline_area(op.entry, op.half, q); };
  switch (op.kind) {
    case CollectiveKind::allgather:
      for (int q = 0; q < size_; ++q) {
        const Slice s = slice_of(op.count, size_, q);
        if (s.count > 0 && !(q == rank_ && op.recv + s.offset * esize == op.send)) {
          std::memcpy(op.recv + s.offset * esize, area(q), s.count * esize);
        }
      }
      return;
    case CollectiveKind::broadcast:
      if (rank_ != op.root && op.count > 0) std::memcpy(op.recv, area(op.root), op.count * esize);
      return;
    case CollectiveKind::reduce_scatter: {
      // This rank's slice of every rank's input, in rank order (the same order on every rank).
      const Slice s = slice_of(op.count, size_, rank_);
      if (s.count == 0) return;
      const std::size_t at = s.offset * esize;
      reduce_pair(op.dtype, op.op, op.recv, area(0) + at, area(1) + at, s.count);
      for (int q = 2; q < size_; ++q) reduce_into(op.dtype, op.op, op.recv, area(q) + at, s.count);
      return;
    }
    default:
      // The first two in one pass (a copy and a reduction would read and write the output twice). There are at
      // least two: a one-rank Peer has no segment.
      if (op.count == 0) return;
      reduce_pair(op.dtype, op.op, op.recv, area(0), area(1), op.count);
      for (int q = 2; q < size_; ++q) reduce_into(op.dtype, op.op, op.recv, area(q), op.count);
      return;
  }
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
  op.share_elems = std::max<std::size_t>(1, layout_.piece_bytes / op.element_bytes / std::size_t(size_));
  const std::size_t longest = slice_of(op.count, size_, 0).count;
  op.pieces = (longest + op.share_elems - 1) / op.share_elems;
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
  const CollectiveKind kind = op.kind;
  const bool reduces = kind == CollectiveKind::allreduce || kind == CollectiveKind::reduce_scatter;
  bool progressed = false;
  // Share q of piece j: its offset in the buffer (slice q's j-th sub-range), its length, and its place in a slot.
  struct Share {
    std::size_t offset, count, in_slot;
  };
  auto share = [&](int q, std::size_t j) {
    const Slice s = slice_of(op.count, n, q);
    const std::size_t first = std::min(s.count, j * op.share_elems);
    return Share{s.offset + first, std::min(op.share_elems, s.count - first), std::size_t(q) * op.share_elems * esize};
  };
  // The others' progress on piece j.
  auto others_reached = [&](std::size_t j, auto counter) {
    for (int q = 0; q < n; ++q) {
      if (q != me && (v.counters(op.bay, q).*counter).load(std::memory_order_acquire) < j + 1) return false;
    }
    return true;
  };
  for (;;) {
    bool moved = false;
    // Copy what the others need of piece j into this rank's slot, once every rank is done with piece j - 2.
    if (op.next_copy < op.pieces && op.next_copy < op.next_out + 2) {
      const std::size_t j = op.next_copy;
      bool free = true;
      for (int q = 0; q < n && free && j >= 2; ++q) {
        if (v.counters(op.bay, q).done.load(std::memory_order_acquire) + 1 < j) free = false;
      }
      if (free) {
        std::byte* slot = v.slot(op.bay, me, j);
        for (int q = 0; q < n; ++q) {
          const Share sh = share(q, j);
          if (sh.count == 0) continue;
          if (reduces && q != me) {
            std::memcpy(slot + sh.in_slot, op.send + sh.offset * esize, sh.count * esize);
          } else if (kind == CollectiveKind::allgather && q == me) {
            const std::size_t within = sh.offset - slice_of(op.count, n, me).offset;
            std::memcpy(slot + sh.in_slot, op.send + within * esize, sh.count * esize);
          } else if (kind == CollectiveKind::broadcast && me == op.root) {
            std::memcpy(slot + sh.in_slot, op.recv + sh.offset * esize, sh.count * esize);
          }
        }
        v.counters(op.bay, me).copied.store(j + 1, std::memory_order_release);
        ring_others();
        ++op.next_copy;
        moved = true;
      }
    }
    // Reduce this rank's share of piece j once every rank has copied it; allgather puts its own share in place.
    if (op.next_reduce < op.next_copy && (!reduces || others_reached(op.next_reduce, &BayCounters::copied))) {
      const std::size_t j = op.next_reduce;
      const Share own = share(me, j);
      if (own.count > 0 && reduces) {
        // reduce_scatter writes its slice to recv[0..), allreduce in place.
        const std::size_t out_at =
            kind == CollectiveKind::reduce_scatter ? own.offset - slice_of(op.count, n, me).offset : own.offset;
        std::byte* out = op.recv + out_at * esize;
        if (out != op.send + own.offset * esize) std::memcpy(out, op.send + own.offset * esize, own.count * esize);
        for (int q = 0; q < n; ++q) {
          if (q != me) reduce_into(op.dtype, op.op, out, v.slot(op.bay, q, j) + own.in_slot, own.count);
        }
        // A mean is finished here, while the share is in cache, so that every rank copies out finished values
        // (the same division, so the same bits, as a pass over the whole output at the end).
        if (op.op == ReduceOp::mean) divide_by_count(op.dtype, out, own.count, n);
        if (kind == CollectiveKind::allreduce) std::memcpy(v.slot(op.bay, me, j) + own.in_slot, out, own.count * esize);
      } else if (own.count > 0 && kind == CollectiveKind::allgather) {
        const std::size_t within = own.offset - slice_of(op.count, n, me).offset;
        std::byte* out = op.recv + own.offset * esize;
        if (out != op.send + within * esize) std::memcpy(out, op.send + within * esize, own.count * esize);
      }
      v.counters(op.bay, me).reduced.store(j + 1, std::memory_order_release);
      ring_others();
      ++op.next_reduce;
      moved = true;
    }
    // Copy the shares this rank lacks out of their owners' slots.
    if (op.next_out < op.next_reduce) {
      const std::size_t j = op.next_out;
      bool ready = true;
      if (kind == CollectiveKind::broadcast) {
        ready = me == op.root || v.counters(op.bay, op.root).reduced.load(std::memory_order_acquire) >= j + 1;
      } else if (kind != CollectiveKind::reduce_scatter) {
        ready = others_reached(j, &BayCounters::reduced);
      }
      if (ready) {
        for (int q = 0; q < n; ++q) {
          const Share sh = share(q, j);
          if (sh.count == 0) continue;
          const int owner = kind == CollectiveKind::broadcast ? op.root : q;
          const bool lacks =
              kind == CollectiveKind::broadcast ? me != op.root : kind != CollectiveKind::reduce_scatter && q != me;
          if (lacks) {
            std::memcpy(op.recv + sh.offset * esize, v.slot(op.bay, owner, j) + sh.in_slot, sh.count * esize);
          }
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
    if (op.op == ReduceOp::mean && !op.large) {
      if (op.kind == CollectiveKind::allreduce && op.count > 0) divide_by_count(op.dtype, op.recv, op.count, size_);
      const std::size_t mine = slice_of(op.count, size_, rank_).count;
      if (op.kind == CollectiveKind::reduce_scatter && mine > 0) divide_by_count(op.dtype, op.recv, mine, size_);
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
  // Tell the other ranks, which may be waiting for this rank or reading its inline area, and leave them the error
  // (they wait while the text is written; one that was reading this rank's input finds the arrival word changed).
  Arrival& a = v.arrival(op.entry, op.half, rank_);
  std::uint64_t expected = value;
  if (a.word.compare_exchange_strong(expected, value | kWriting, std::memory_order_seq_cst)) {
    const std::string text = error_text(error);
    a.abandon_kind = std::uint8_t(wire_error_of(error));
    a.abandon_text = std::uint32_t(std::min(text.size(), layout_.inline_bytes));
    std::memcpy(v.inline_area(op.entry, op.half, rank_), text.data(), a.abandon_text);
    a.word.store(value | kAbandoned, std::memory_order_seq_cst);
  }
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
  std::vector<int> not_posted, gave_up, behind;  // cluster ranks
  std::vector<int> not_posted_here;              // their indices here
  for (int q = 0; q < size_; ++q) {
    if (q == rank_) continue;
    const std::atomic<std::uint64_t>& word = v.arrival(op.entry, op.half, q).word;
    std::uint64_t w = word.load(std::memory_order_acquire);
    // A rank writing its arrival's data, or the error it gives up with, is done within microseconds unless its
    // thread is preempted: wait for that a little, for a report that says which it was.
    for (const auto until = Clock::now() + std::chrono::milliseconds(100);
         (w & kWriting) && (w & kValueMask) == value && Clock::now() < until;) {
      std::this_thread::yield();
      w = word.load(std::memory_order_acquire);
    }
    if ((w & kValueMask) < value) {
      not_posted.push_back(members_[q]);
      not_posted_here.push_back(q);
    } else if ((w & kAbandoned) && (w & kValueMask) == value) {
      gave_up.push_back(members_[q]);
    } else if (op.bay >= 0) {
      const BayCounters& c = v.counters(op.bay, q);
      if (c.done.load(std::memory_order_acquire) < op.next_out + 1 ||
          c.reduced.load(std::memory_order_acquire) < op.next_reduce + 1) {
        behind.push_back(members_[q]);
      }
    }
  }
  const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - op.start);
  std::string text = str_cat(op.label(), " on rank ", members_[rank_], " at cluster version ", cluster_version_,
                             " has waited ", seconds(waited), " (same-host shared memory)");
  if (!not_posted.empty()) {
    text += str_cat("; rank", not_posted.size() > 1 ? "s " : " ", rank_list(not_posted),
                    not_posted.size() > 1 ? " have" : " has", " not posted it");
    for (int q : not_posted_here) {
      if (!op.waiting_in.empty() && !op.waiting_in[std::size_t(q)].empty()) {
        text += str_cat("; rank ", members_[q], " ", op.waiting_in[std::size_t(q)]);
      }
    }
  } else if (op.arrived && op.bay < 0 && gave_up.empty()) {
    text += "; waiting for a free shared-memory bay";
  }
  if (!gave_up.empty()) text += str_cat("; rank", gave_up.size() > 1 ? "s " : " ", rank_list(gave_up), " gave it up");
  std::vector<int> silent;
  for (int q = 0; q < size_ && op.stall_queried; ++q) {
    if (q != rank_ && (op.waiting_in.empty() || op.waiting_in[std::size_t(q)].empty())) silent.push_back(members_[q]);
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
    // A rank of another host takes part in none of this segment's collectives (a phase of a hierarchical collective
    // that needs it runs over the connections, and fails there).
    const int here = int(std::find(members_.begin(), members_.end(), peer) - members_.begin());
    if (here == size_) return;
    if (lost_.empty()) lost_ = why;
    const View v{segment_.data(), layout_};
    for (auto& op : ops_) {
      // What the peer has put in shared memory stays there: a small collective it arrived at needs nothing more
      // from it, nor does a large one it left on purpose (having finished its part, or marked it abandoned).
      const bool arrived =
          v.arrival(op->entry, op->half, here).word.load(std::memory_order_acquire) == op->occurrence + 1;
      if (arrived && (!op->large || departed)) continue;
      fail(*op, std::make_exception_ptr(PeerLostError(str_cat(op->label(), " failed on rank ", members_[rank_],
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

void ShmCollectives::stall_reply(std::string_view name, std::uint64_t occurrence, int cluster_rank, bool posted,
                                 std::string waiting_in) {
  std::lock_guard<std::mutex> lock(mutex_);
  const int source = int(std::find(members_.begin(), members_.end(), cluster_rank) - members_.begin());
  if (source >= size_ || source == rank_) return;
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
