// The engine's record of one collective in flight, shared by its source files (engine.cpp: posting, running and
// finishing collectives; engine_failures.cpp: failures, lost peers and the watchdog). Internal to src/runtime/engine*.
#pragma once

#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "runtime/engine.hpp"

namespace aikido::detail {

enum class OpState : std::uint8_t { waiting, armed, running, done };

/// "allreduce", "broadcast", ...: for messages.
const char* kind_name(CollectiveKind kind);

struct Collective {
  std::string name;
  std::uint64_t seq = 0;
  CollectiveKind kind{};
  DType dtype{};
  ReduceOp op{};
  Topology topology{};
  int root = 0;
  std::uint64_t count = 0;            // elements each rank contributes
  std::uint64_t signature_count = 0;  // what the signature says (MessageRoute::signature_count)
  int signature_root = 0;             // and MessageRoute::signature_root
  std::size_t element_bytes = 0;
  std::byte* buffer = nullptr;
  std::size_t buffer_bytes = 0;
  // An out-of-place allreduce reads its send buffer in place: ops marked `from_input` read the region from here
  // instead of `buffer` (see collective/plan.hpp). Null when the input was copied into the buffer.
  const std::byte* input = nullptr;
  PooledBuffer workspace;
  std::shared_ptr<const collective::Plan> plan;
  std::vector<std::uint32_t> waiting;
  std::vector<OpState> state;
  std::size_t remaining = 0;
  int running = 0;
  std::vector<int> running_by_peer;
  std::vector<bool> ready_from;
  std::size_t ready_count = 0;
  // A small allreduce (every segment eager) with a peer it both sends to and receives from sends that peer no
  // `ready`: the peer's first data frame, signed like a `ready`, stands for it (see post()).
  std::vector<bool> ready_in_data;
  std::vector<std::uint32_t> deferred;
  bool failed = false;
  bool finished = false;
  std::exception_ptr error;
  std::shared_ptr<WorkState> work;
  Clock::time_point start;
  Clock::time_point deadline;
  bool stall_queried = false;           // at half the timeout
  bool stall_reported = false;          // once every rank answered, or at three quarters of the timeout
  std::vector<int> stall_posted;        // -1 unknown, 0 not posted, 1 posted
  std::vector<std::string> waiting_in;  // per rank, once it answered the stall query (Engine::waiting_in)
  // Finishing touches.
  void* recv = nullptr;
  std::size_t recv_count = 0;
  bool* agreed = nullptr;
  int world = 1;             // ranks taking part
  int rank = 0;              // this rank
  int index = 0;             // this rank's index among those taking part
  std::vector<int> members;  // those taking part (MessageRoute::members); empty: every rank
  bool slices = false;       // MessageRoute::slices

  std::string label() const { return str_cat(kind_name(kind), " '", name, "' (seq ", seq, ")"); }
};

}  // namespace aikido::detail
