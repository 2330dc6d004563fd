// The peer-to-peer model store: save() keeps a named buffer on this rank, request() fetches one from any rank.
#include <cstring>

#include "base/error.hpp"
#include "runtime/engine.hpp"

namespace aikido::detail {

using transport::FrameHeader;
using transport::FrameType;

void Engine::save(std::string_view name, DType dtype, const void* data, std::size_t count) {
  if (name.empty() || name.size() > transport::kMaxNameBytes) {
    throw ConfigError(str_cat("save: the name must have 1 to ", transport::kMaxNameBytes, " bytes"));
  }
  const std::size_t bytes = count * dtype_size(dtype);
  auto copy = std::make_shared<std::vector<std::byte>>(bytes);
  if (bytes > 0) std::memcpy(copy->data(), data, bytes);
  std::lock_guard<std::mutex> lock(mutex_);
  saved_[std::string(name)] = Saved{dtype, count, std::move(copy)};
}

Work Engine::request(int target, std::string_view name, DType dtype, void* out, std::size_t count) {
  if (target < 0 || target >= config_.size) {
    throw ConfigError(str_cat("request '", name, "': target rank ", target, " is not a rank of 0..", config_.size - 1));
  }
  auto work = std::make_shared<WorkState>();
  std::unique_lock<std::mutex> lock(mutex_);
  if (target == config_.rank) {
    auto it = saved_.find(std::string(name));
    std::exception_ptr error;
    if (it == saved_.end()) {
      error = std::make_exception_ptr(
          ConfigError(str_cat("request: rank ", target, " has saved nothing named '", name, "'")));
    } else if (it->second.dtype != dtype || it->second.count != count) {
      error = std::make_exception_ptr(ConfigError(
          str_cat("request '", name, "': rank ", target, " saved ", it->second.count, " ", dtype_name(it->second.dtype),
                  " elements; the request asked for ", count, " ", dtype_name(dtype))));
    } else if (count > 0) {
      std::memcpy(out, it->second.bytes->data(), it->second.bytes->size());
    }
    lock.unlock();
    work->complete(error);
    return Work(work);
  }
  if (!lost_[std::size_t(target)].empty()) {
    const std::string why = lost_[std::size_t(target)];
    lock.unlock();
    work->complete(std::make_exception_ptr(PeerLostError(str_cat("request of '", name, "' failed: ", why))));
    return Work(work);
  }
  auto r = std::make_shared<PendingRequest>();
  r->id = next_request_++;
  r->target = target;
  r->name = std::string(name);
  r->dtype = dtype;
  r->count = count;
  r->out = out;
  r->deadline = Clock::now() + config_.timeout;
  r->work = work;
  set_drive(*work, count * dtype_size(dtype));
  requests_.emplace(r->id, r);
  transport::OutgoingFrame frame;
  frame.header.type = FrameType::p2p_request;
  frame.header.seq = r->id;
  frame.header.dtype = std::uint8_t(dtype);
  frame.header.count = count;
  frame.name = r->name;
  connections_[std::size_t(target)]->send(std::move(frame));
  return Work(work);
}

void Engine::receive_p2p_request(transport::Connection& connection, const FrameHeader& header,
                                 const std::string& name) {
  if (header.payload_bytes != 0) throw ProtocolError("p2p request with a payload");
  transport::OutgoingFrame frame;
  frame.header.type = FrameType::p2p_reply;
  frame.header.seq = header.seq;
  frame.name = name;
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = saved_.find(name);
  std::string error;
  if (it == saved_.end()) {
    error = str_cat("request: rank ", config_.rank, " has saved nothing named '", name, "'");
  } else if (it->second.dtype != DType(header.dtype) || it->second.count != header.count) {
    error = str_cat("request '", name, "': rank ", config_.rank, " saved ", it->second.count, " ",
                    dtype_name(it->second.dtype), " elements; the request asked for ", header.count, " ",
                    dtype_name(DType(header.dtype)));
  }
  if (error.empty()) {
    frame.header.root = 0;
    frame.header.payload_bytes = it->second.bytes->size();
    frame.payload = it->second.bytes->data();
    frame.keep_alive = it->second.bytes;
  } else {
    auto text = std::make_shared<std::string>(std::move(error));
    frame.header.root = 1;
    frame.header.payload_bytes = text->size();
    frame.payload = text->data();
    frame.keep_alive = text;
  }
  connection.send(std::move(frame));
}

void Engine::receive_p2p_reply(transport::Connection& connection, const FrameHeader& header) {
  std::unique_lock<std::mutex> lock(mutex_);
  auto it = requests_.find(header.seq);
  if (it == requests_.end() || it->second->finished) {
    lock.unlock();
    connection.discard_payload(header.payload_bytes);
    return;
  }
  auto r = it->second;
  if (header.root != 0) {
    lock.unlock();
    const std::string text = read_text(connection, header.payload_bytes);
    lock.lock();
    r->finished = true;
    requests_.erase(r->id);
    lock.unlock();
    r->work->complete(std::make_exception_ptr(ConfigError(text)));
    return;
  }
  const std::size_t bytes = r->count * dtype_size(r->dtype);
  if (header.payload_bytes != bytes) {
    throw ProtocolError(str_cat("rank ", header.source, " answered request '", r->name, "' with ", header.payload_bytes,
                                " bytes; ", bytes, " were asked for"));
  }
  r->running = true;
  lock.unlock();
  std::exception_ptr error;
  try {
    if (bytes > 0) connection.read_payload(r->out, bytes);
  } catch (...) {
    error = std::make_exception_ptr(PeerLostError(str_cat("request of '", r->name, "' from rank ", header.source,
                                                          " failed: the connection broke during the reply")));
  }
  lock.lock();
  r->running = false;
  r->finished = true;
  requests_.erase(r->id);
  lock.unlock();
  r->work->complete(error);
  if (error) throw PeerLostError("connection broke during a reply");
}

}  // namespace aikido::detail
