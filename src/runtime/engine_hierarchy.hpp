// A hierarchical collective in flight: its phases inside and across hosts (engine_hierarchy.cpp describes them).
// Internal to src/runtime/engine*.
#pragma once

#include <aikido/peer.hpp>
#include <aikido/work.hpp>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "runtime/buffer_pool.hpp"
#include "runtime/engine.hpp"
#include "runtime/shm_collectives.hpp"
#include "runtime/work_state.hpp"
#include "transport/frame.hpp"

namespace aikido::detail {

/// How one hierarchical collective is cut into phases; the same on every rank (it depends on what was posted and on
/// the agreed link model).
struct HierarchyPlan {
  /// An allreduce of at most this many bytes runs in two phases (inside, then across with every group carrying
  /// all of it) rather than three over slices.
  std::size_t small_bytes = 0;
  /// Bytes of a chunk of a large allreduce or broadcast.
  std::size_t chunk_bytes = std::size_t(4) << 20;
  /// Topology of the phases across hosts, and of inside-host phases that run over the connections.
  Topology across_topology = Topology::ring;
  Topology inside_topology = Topology::ring;
};

class HierarchicalCollective : public std::enable_shared_from_this<HierarchicalCollective> {
 public:
  /// Every kind but gather.
  static bool handles(CollectiveKind kind);
  /// `request` as posted (validated); `seq` counts the posts of its name on this rank. The engine must have a host
  /// layout.
  HierarchicalCollective(Engine& engine, const Request& request, std::uint64_t seq, const HierarchyPlan& plan);
  /// Posts the first phases; the returned Work completes once every phase has ended.
  Work start();

 private:
  /// One phase. Inside a host the buffers follow ShmRequest, with `recv` the whole buffer of `count` elements (a
  /// reduce-scatter leaves this rank's slice in it, an allgather takes this rank's slice from it) and `root` an
  /// index among the host's ranks; across hosts they follow Request, among this rank's group.
  struct Step {
    bool inside = false;
    CollectiveKind kind{};
    const void* send = nullptr;
    void* recv = nullptr;
    std::size_t count = 0;                       // inside
    std::size_t send_count = 0, recv_count = 0;  // across
    int root = 0;
    bool* agreed = nullptr;
    /// Runs once the phase succeeded, before the next one starts (a mean's division of a slice).
    std::function<void()> after;
  };
  struct Chunk {
    std::vector<Step> steps;
    std::size_t next = 0;  // the next step to post
    int lane = 0;
  };

  void build();
  Step inside(CollectiveKind kind, const void* input, void* buffer, std::size_t count) const;
  Step across_allreduce(void* buffer, std::size_t count) const;
  std::string inside_name(int lane) const;
  std::string across_name(int lane) const;
  std::string label() const;
  ShmRequest shm_request(const Step& step) const;
  Work post_step(const Step& step, int lane);
  void abandon_step(const Step& step, int lane, transport::WireError kind, const std::string& text);
  void advance(int lane);
  void phase_done(int lane, std::size_t chunk, const Step& step, std::exception_ptr error);
  /// The first failure fails the collective: phases in flight are cancelled, those not posted yet abandoned.
  void fail(std::exception_ptr error, std::size_t chunk, const Step& step);
  /// `error` of a phase as the collective reports it (named after the collective, saying where it happened).
  std::exception_ptr describe_failure(std::exception_ptr error, std::size_t chunk, const Step& step) const;
  void finish();
  void drive(WorkState& work, Clock::time_point until);

  Engine& engine_;
  const HostLayout& layout_;
  Request request_;   // its name points into name_
  std::string name_;  // the collective's
  std::string base_;  // what phase names are made from
  const std::uint64_t seq_;
  const HierarchyPlan plan_;
  const std::size_t esize_;
  const ReduceOp phase_op_;  // a mean is a sum in every phase, divided once at the end
  std::uint64_t signature_ = 0;
  std::shared_ptr<WorkState> work_;
  PooledBuffer workspace_;  // reduce_scatter and allgather: the blocks by group
  // Consensus: whether this host's ranks agreed, what its group offers across hosts, and the answer.
  bool host_agreed_ = false;
  std::string host_value_;
  bool agreed_ = false;

  std::mutex mutex_;
  std::vector<Chunk> chunks_;
  int lanes_ = 1;
  std::vector<std::size_t> lane_next_;  // per lane: its current chunk
  int lanes_done_ = 0;
  std::map<int, Work> lane_work_;  // the phase in flight on each lane
  std::exception_ptr error_;       // the first failure, as the collective reports it
};

}  // namespace aikido::detail
