// Engine: failures of collectives, lost peers, and the watchdog that times out stalled collectives and describes
// what they wait for (engine.hpp lists the files of the engine).
#include <algorithm>

#include "base/error.hpp"
#include "base/log.hpp"
#include "runtime/engine.hpp"
#include "runtime/engine_collective.hpp"

namespace aikido::detail {

using collective::Op;
using collective::OpKind;
using transport::FrameType;
using transport::WireError;

namespace {

/// Failed collectives remembered (by name and occurrence) so that their late frames are dropped and late posts fail.
constexpr std::size_t kMaxTombstones = 4096;

}  // namespace

std::string Engine::lost_summary() const {
  std::string out;
  for (std::size_t p = 0; p < lost_.size(); ++p) {
    if (lost_[p].empty() || departed_[p]) continue;
    if (!out.empty()) out += "; ";
    out += lost_[p];
  }
  return out;
}

void Engine::fail(const std::shared_ptr<Collective>& c, std::exception_ptr error, WireError kind, bool tell_peers,
                  Progress& progress) {
  if (c->finished) return;
  if (c->failed) {  // the first error stands; a transfer that ended with this one may let the collective finish
    maybe_finish(c, progress);
    return;
  }
  c->failed = true;
  c->error = error;
  for (std::uint32_t i = 0; i < c->plan->ops.size(); ++i) {
    const Op& op = c->plan->ops[i];
    if (op.kind == OpKind::send || c->state[i] == OpState::done || c->state[i] == OpState::running) continue;
    MessageKey key{c->name, c->seq, op.tag, op.peer};
    armed_.erase(key);
    auto m = mailbox_.find(key);
    if (m != mailbox_.end()) {
      mailbox_bytes_ -= m->second.header.payload_bytes;
      mailbox_.erase(m);
      mailbox_space_.notify_all();
    }
  }
  c->deferred.clear();
  std::string text;
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    text = e.what();
  }
  bury(CollectiveKey{c->name, c->seq}, text, kind);
  if (tell_peers) send_control_to_all(FrameType::abort, c->name, c->seq, std::int32_t(kind), text, -1, 0, &c->members);
  if (kind == WireError::timeout || kind == WireError::other) abandon_transfers(*c);
  maybe_finish(c, progress);
}

bool Engine::bury(const CollectiveKey& key, const std::string& error, WireError kind) {
  if (!tombstones_.emplace(key, Tombstone{error, std::uint8_t(kind)}).second) return false;
  tombstone_order_.push_back(key);
  while (tombstone_order_.size() > kMaxTombstones) {
    tombstones_.erase(tombstone_order_.front());
    tombstone_order_.pop_front();
  }
  return true;
}

void Engine::abandon_transfers(const Collective& c) {
  // A transfer stuck in the middle of a frame cannot be abandoned without breaking the stream, so the connection
  // goes: its peer is then lost for later collectives too.
  for (int p = 0; p < config_.size; ++p) {
    if (c.running_by_peer[std::size_t(p)] > 0) {
      for (auto* stream : streams_[std::size_t(p)]) stream->shutdown();
    }
  }
}

void Engine::send_control_to_all(FrameType type, const std::string& name, std::uint64_t seq, std::int32_t root,
                                 const std::string& payload, int except, std::uint64_t tag,
                                 const std::vector<int>* members) {
  if (closing_) return;  // the goodbye is the last frame; this rank's failures are its own now
  auto send = [&](int p) {
    if (p != config_.rank && p != except && lost_[std::size_t(p)].empty()) {
      send_control(p, type, name, seq, root, payload, tag);
    }
  };
  if (members && !members->empty()) {
    for (int p : *members) send(p);
  } else {
    for (int p = 0; p < config_.size; ++p) send(p);
  }
}

void Engine::drop_peer(int p, const std::string& why) {
  if (p < 0 || p >= config_.size || p == config_.rank || !connections_[std::size_t(p)]) return;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closing_ || !lost_[std::size_t(p)].empty()) return;
    drop_reason_[std::size_t(p)] = why;
  }
  // The receive threads see the streams end and fail what needs the rank (on_lost), naming `why`.
  for (auto* stream : streams_[std::size_t(p)]) stream->shutdown();
}

void Engine::on_lost(transport::Connection& connection, const std::string& reason, bool goodbye, bool broke_protocol) {
  const int p = connection.peer();
  std::unique_lock<std::mutex> lock(mutex_);
  if (closing_ || !lost_[std::size_t(p)].empty()) return;
  const auto& streams = streams_[std::size_t(p)];
  // A rank that closes its session says goodbye on every stream after what it sent there: frames it sent on the
  // other streams may still be on their way until those say it too.
  if (goodbye && ++ended_streams_[std::size_t(p)] < int(streams.size())) return;
  if (!goodbye) {
    for (auto* stream : streams) {
      if (stream != &connection) stream->shutdown();
    }
  }
  const std::string& cause = drop_reason_[std::size_t(p)].empty() ? reason : drop_reason_[std::size_t(p)];
  // A peer that broke the protocol is cut off like a lost one, but what waits on it learns why (ProtocolError): it
  // is a bug or an attack, not a crash that recovery should paper over.
  broke_protocol = broke_protocol && drop_reason_[std::size_t(p)].empty();
  lost_[std::size_t(p)] = goodbye          ? str_cat("rank ", p, " closed its session")
                          : broke_protocol ? str_cat("rank ", p, " broke the protocol and was cut off (", cause, ")")
                                           : str_cat("rank ", p, " is lost (", cause, ")");
  departed_[std::size_t(p)] = goodbye;
  if (!goodbye) log::warn("rank ", config_.rank, ": ", lost_[std::size_t(p)]);
  Progress progress;
  std::vector<std::shared_ptr<Collective>> all;
  for (auto& [key, c] : active_) {
    if (needs_peer(*c, p)) all.push_back(c);
  }
  for (auto& c : all) {
    const std::string text = str_cat(c->label(), " failed on rank ", config_.rank, " at cluster version ",
                                     config_.cluster_version, ": ", lost_[std::size_t(p)]);
    fail(c,
         broke_protocol ? std::make_exception_ptr(ProtocolError(text)) : std::make_exception_ptr(PeerLostError(text)),
         WireError::lost, true, progress);
  }
  std::vector<std::shared_ptr<PendingRequest>> failed;
  for (auto& [id, r] : requests_) {
    if (r->target == p && !r->finished && !r->running) failed.push_back(r);
  }
  for (auto& r : failed) {
    r->finished = true;
    requests_.erase(r->id);
  }
  const std::string why = lost_[std::size_t(p)];
  run(lock, progress);
  if (shm_) shm_->peer_lost(p, why, goodbye);
  for (auto& r : failed) {
    const std::string text = str_cat("request of '", r->name, "' from rank ", p, " failed: ", why);
    r->work->complete(broke_protocol ? std::make_exception_ptr(ProtocolError(text))
                                     : std::make_exception_ptr(PeerLostError(text)));
  }
  if (!failed.empty() && gate_) gate_->wake_holder();
}

std::string Engine::describe_wait(const Collective& c) const {
  std::vector<int> data_from, not_posted, ready_from, silent;
  for (std::uint32_t i = 0; i < c.plan->ops.size(); ++i) {
    const Op& op = c.plan->ops[i];
    if (c.state[i] == OpState::done) continue;
    auto add = [](std::vector<int>& v, int p) {
      if (std::find(v.begin(), v.end(), p) == v.end()) v.push_back(p);
    };
    if (op.kind != OpKind::send) add(data_from, op.peer);
  }
  for (int p : c.plan->ready_from) {
    if (!c.ready_from[std::size_t(p)]) ready_from.push_back(p);
  }
  for (int p = 0; p < config_.size; ++p) {
    if (c.stall_posted[std::size_t(p)] == 0) not_posted.push_back(p);
    if (c.stall_queried && p != config_.rank && lost_[std::size_t(p)].empty() && c.stall_posted[std::size_t(p)] < 0) {
      silent.push_back(p);
    }
  }
  std::sort(data_from.begin(), data_from.end());
  std::sort(ready_from.begin(), ready_from.end());
  const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - c.start);
  std::string text = str_cat(c.label(), " on rank ", config_.rank, " at cluster version ", config_.cluster_version,
                             " has waited ", seconds(waited));
  if (!not_posted.empty()) {
    text += str_cat("; rank", not_posted.size() > 1 ? "s " : " ", rank_list(not_posted),
                    not_posted.size() > 1 ? " have" : " has", " not posted it");
    for (int p : not_posted) {
      if (!c.waiting_in.empty() && !c.waiting_in[std::size_t(p)].empty()) {
        text += str_cat("; rank ", p, " ", c.waiting_in[std::size_t(p)]);
      }
    }
  }
  if (!silent.empty()) text += silent_ranks(silent);
  if (!data_from.empty()) text += str_cat("; waiting for data from rank(s) ", rank_list(data_from));
  if (!ready_from.empty()) text += str_cat("; waiting for rank(s) ", rank_list(ready_from), " to post it");
  return text;
}

void Engine::answer_stall_query(const transport::FrameHeader& header, const std::string& name) {
  bool posted = false;
  if (header.tag == kStallSharedMemoryPath) {
    posted = shm_ && shm_->posted(name, header.seq);
  } else {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = posted_count_.find(name);
    posted = it != posted_count_.end() && it->second > header.seq;
  }
  const std::string doing = waiting_in();
  std::lock_guard<std::mutex> lock(mutex_);
  send_control(header.source, FrameType::stall_reply, name, header.seq, posted ? 1 : 0, doing, header.tag);
}

void Engine::receive_stall_reply(transport::Connection& connection, const transport::FrameHeader& header,
                                 const std::string& name) {
  std::string doing = read_text(connection, header.payload_bytes);
  const bool posted = header.root != 0;
  if (header.tag == kStallSharedMemoryPath) {
    if (shm_) shm_->stall_reply(name, header.seq, header.source, posted, std::move(doing));
    return;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = active_.find(CollectiveKey{name, header.seq});
  if (it == active_.end()) return;
  Collective& c = *it->second;
  c.stall_posted[std::size_t(header.source)] = posted ? 1 : 0;
  c.waiting_in.resize(std::size_t(config_.size));
  c.waiting_in[std::size_t(header.source)] = std::move(doing);
  for (int p = 0; p < config_.size; ++p) {
    if (p != config_.rank && lost_[std::size_t(p)].empty() && c.stall_posted[std::size_t(p)] < 0) return;
  }
  if (c.stall_reported) return;
  c.stall_reported = true;
  log::warn("stall report: ", describe_wait(c));
}

std::string Engine::waiting_in() const {
  std::vector<InFlight> all;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& [key, c] : active_) {
      if (!c->failed) all.push_back({c->start, c->label(), c->work->waited.load(std::memory_order_relaxed)});
    }
  }
  if (shm_) shm_->in_flight(all);
  if (all.empty()) return "is in no collective";
  std::sort(all.begin(), all.end(), [](const InFlight& a, const InFlight& b) { return a.start < b.start; });
  std::vector<const InFlight*> waited;
  for (const auto& f : all) {
    if (f.waited) waited.push_back(&f);
  }
  auto more = [](std::size_t n) { return n > 1 ? str_cat(" and ", n - 1, " more") : std::string(); };
  if (!waited.empty()) return str_cat("is waiting in ", waited.front()->label, more(waited.size()));
  return str_cat("is waiting in no collective (", all.front().label, more(all.size()), " in flight)");
}

void Engine::watchdog_loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (!closing_) {
    watchdog_wake_.wait_for(lock, std::chrono::milliseconds(50));
    if (closing_) break;
    const auto now = Clock::now();
    Progress progress;
    std::vector<std::shared_ptr<Collective>> all;
    for (auto& [key, c] : active_) all.push_back(c);
    for (auto& c : all) {
      if (c->failed) {
        // Failed, but a transfer with a healthy peer is still running: bound that too.
        if (now >= c->deadline) abandon_transfers(*c);
        continue;
      }
      if (now >= c->deadline) {
        // Told to every rank: those waiting for this one's data stop too, and one that posts it later fails at once
        // with this description of the stall rather than waiting out a timeout of its own.
        fail(c,
             std::make_exception_ptr(TimeoutError(
                 str_cat(describe_wait(*c), "; the timeout is ", seconds(config_.timeout), " (AIKIDO_TIMEOUT)"))),
             WireError::timeout, true, progress);
      } else if (!c->stall_queried && now >= c->start + config_.timeout / 2) {
        c->stall_queried = true;
        send_control_to_all(FrameType::stall_query, c->name, c->seq, 0, {}, -1, kStallMessagePath, &c->members);
      } else if (c->stall_queried && !c->stall_reported && now >= c->start + config_.timeout * 3 / 4) {
        c->stall_reported = true;  // some rank has not answered: report what is known
        log::warn("stall report: ", describe_wait(*c));
      }
    }
    if (shm_) {
      for (const auto& s : shm_->watch(now)) {
        send_control_to_all(FrameType::stall_query, s.name, s.occurrence, 0, {}, -1, kStallSharedMemoryPath,
                            &shm_members_);
      }
    }
    std::vector<std::shared_ptr<PendingRequest>> expired;
    for (auto& [id, r] : requests_) {
      if (!r->finished && now >= r->deadline) {
        if (r->running) {
          for (auto* stream : streams_[std::size_t(r->target)]) stream->shutdown();
        } else {
          expired.push_back(r);
        }
      }
    }
    for (auto& r : expired) {
      r->finished = true;
      requests_.erase(r->id);
    }
    run(lock, progress);
    for (auto& r : expired) {
      r->work->complete(std::make_exception_ptr(TimeoutError(str_cat(
          "request of '", r->name, "' from rank ", r->target, " got no answer within ", seconds(config_.timeout)))));
    }
    if (!expired.empty() && gate_) gate_->wake_holder();
    lock.lock();
  }
}

}  // namespace aikido::detail
