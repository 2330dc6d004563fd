#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <map>
#include <tuple>

#include "base/error.hpp"
#include "collective/algorithms.hpp"

namespace aikido::collective {
namespace {

TEST(Blocks, EvenSplitCoversEverything) {
  for (std::size_t count : {0, 1, 5, 7, 100}) {
    for (int parts : {1, 2, 3, 8}) {
      std::size_t next = 0;
      for (int b = 0; b < parts; ++b) {
        EXPECT_EQ(block_offset(count, parts, b), next);
        next += block_count(count, parts, b);
      }
      EXPECT_EQ(next, count);
    }
  }
}

TEST(PlanBuilder, InfersDependencies) {
  PlanBuilder b;
  b.send(1, make_tag(1, 0, 0), 0, 10);         // 0: reads [0,10)
  b.recv_reduce(2, make_tag(1, 0, 0), 0, 10);  // 1: writes [0,10): after 0
  b.send(1, make_tag(1, 0, 10), 10, 10);       // 2: independent
  b.send(3, make_tag(2, 0, 0), 5, 5);          // 3: reads [5,10): after 1
  const Plan p = b.finish();
  EXPECT_EQ(p.dependency_count, (std::vector<std::uint32_t>{0, 1, 0, 1}));
  EXPECT_EQ(p.dependents[0], (std::vector<std::uint32_t>{1}));
  EXPECT_EQ(p.dependents[1], (std::vector<std::uint32_t>{3}));
  EXPECT_EQ(p.sources, (std::vector<int>{2}));
}

// An op that touches only elements no earlier op wrote reads the input (a send) or combines the input with what
// arrives (a reduction); written regions are merged; an op over a region written in part marks the plan mixed.
TEST(PlanBuilder, MarksOpsThatReadTheInput) {
  PlanBuilder b;
  b.send(1, make_tag(1, 0, 0), 0, 10);          // reads [0,10), never written: from the input
  b.recv_reduce(2, make_tag(1, 0, 0), 0, 10);   // first write of [0,10): input + incoming
  b.send(1, make_tag(2, 0, 0), 0, 10);          // [0,10) written: from the buffer
  b.recv_copy(1, make_tag(2, 0, 10), 10, 5);    // [10,15): overwrites, reads nothing
  b.recv_reduce(1, make_tag(2, 0, 20), 20, 0);  // empty: touches nothing
  b.send(3, make_tag(3, 0, 30), 30, 5);         // [30,35): from the input
  Plan p = b.finish();
  std::vector<bool> from_input;
  for (const Op& op : p.ops) from_input.push_back(op.from_input);
  EXPECT_EQ(from_input, (std::vector<bool>{true, true, false, true, false, true}));
  EXPECT_EQ(p.written, (std::vector<std::pair<std::size_t, std::size_t>>{{0, 15}}));
  EXPECT_FALSE(p.mixed_input);

  PlanBuilder m;
  m.recv_copy(1, make_tag(1, 0, 0), 0, 4);
  m.recv_copy(1, make_tag(1, 0, 8), 8, 4);
  m.send(2, make_tag(2, 0, 0), 2, 8);  // [2,10): [2,4) and [8,10) written, [4,8) not
  p = m.finish();
  EXPECT_TRUE(p.mixed_input);
  EXPECT_EQ(p.written, (std::vector<std::pair<std::size_t, std::size_t>>{{0, 4}, {8, 12}}));
}

// Every message a rank's plan sends must be received exactly once by its target's plan, with the same size.
class PlanMatching : public ::testing::TestWithParam<std::tuple<CollectiveKind, Topology, int>> {};

TEST_P(PlanMatching, SendsMeetReceives) {
  const auto [kind, topology, size] = GetParam();
  for (std::size_t per_rank : {0, 1, 3, 17}) {
    for (std::size_t segment : {1, 4, 1000}) {
      for (int root : {0, size - 1}) {
        using Key = std::tuple<int, int, std::uint64_t>;  // from, to, tag
        std::map<Key, std::size_t> sent, received;
        for (int rank = 0; rank < size; ++rank) {
          PlanSpec spec;
          spec.kind = kind;
          spec.topology = topology;
          spec.rank = rank;
          spec.size = size;
          spec.root = kind == CollectiveKind::broadcast || kind == CollectiveKind::gather ? root : 0;
          spec.block = per_rank;
          spec.count =
              kind == CollectiveKind::allreduce || kind == CollectiveKind::broadcast
                  ? per_rank * 3 + 1
                  : (kind == CollectiveKind::gather && rank != spec.root ? per_rank : per_rank * std::size_t(size));
          spec.segment_elems = segment;
          for (int r = 0; r < size; ++r) spec.host_of_rank.push_back(r / 3);
          const Plan plan = build_plan(spec);
          // An out-of-place allreduce reads its send buffer in place (Engine) only for plans that are not mixed.
          if (kind == CollectiveKind::allreduce) {
            EXPECT_FALSE(plan.mixed_input);
          }
          for (const Op& op : plan.ops) {
            ASSERT_LE(op.offset + op.count, spec.count);
            ASSERT_NE(op.peer, rank);
            auto& map = op.kind == OpKind::send ? sent : received;
            const Key key = op.kind == OpKind::send ? Key{rank, op.peer, op.tag} : Key{op.peer, rank, op.tag};
            ASSERT_EQ(map.count(key), 0u) << "duplicate message tag";
            map[key] = op.count;
          }
        }
        EXPECT_EQ(sent, received) << "per_rank " << per_rank << " segment " << segment;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllKinds, PlanMatching,
                         ::testing::Combine(::testing::Values(CollectiveKind::allreduce, CollectiveKind::broadcast,
                                                              CollectiveKind::allgather, CollectiveKind::reduce_scatter,
                                                              CollectiveKind::gather),
                                            ::testing::Values(Topology::ring, Topology::tree, Topology::star,
                                                              Topology::hierarchical, Topology::multi_ring),
                                            ::testing::Values(1, 2, 3, 5, 8)));

// A plan among some ranks (the phases of hierarchical collectives): messages stay among them, member i's block is at
// i * block, and every send meets its receive; with `slices`, member i's block is its even share of the count.
TEST(GroupPlans, MessagesStayAmongTheMembers) {
  const std::vector<int> members = {5, 1, 3};
  for (CollectiveKind kind : {CollectiveKind::allreduce, CollectiveKind::broadcast, CollectiveKind::allgather,
                              CollectiveKind::reduce_scatter}) {
    for (Topology topology : {Topology::ring, Topology::tree, Topology::star, Topology::multi_ring}) {
      for (bool slices : {false, true}) {
        if (slices && kind != CollectiveKind::allgather && kind != CollectiveKind::reduce_scatter) continue;
        std::map<std::tuple<int, int, std::uint64_t>, std::size_t> sent, received;
        for (int rank : members) {
          PlanSpec spec;
          spec.kind = kind;
          spec.topology = topology;
          spec.rank = rank;
          spec.size = 6;
          spec.members = members;
          spec.root = kind == CollectiveKind::broadcast ? 3 : 0;
          spec.block = 7;
          spec.slices = slices;
          spec.count = slices ? 20 : (kind == CollectiveKind::allreduce || kind == CollectiveKind::broadcast ? 20 : 21);
          spec.segment_elems = 4;
          const Plan plan = build_plan(spec);
          for (const Op& op : plan.ops) {
            ASSERT_NE(std::find(members.begin(), members.end(), op.peer), members.end())
                << "rank " << rank << " talks to " << op.peer << " on " << topology_name(topology);
            ASSERT_LE(op.offset + op.count, spec.count);
            auto& map = op.kind == OpKind::send ? sent : received;
            map[op.kind == OpKind::send ? std::make_tuple(rank, op.peer, op.tag)
                                        : std::make_tuple(op.peer, rank, op.tag)] = op.count;
          }
          if (kind == CollectiveKind::broadcast) {
            for (int p : plan.ready_from) ASSERT_NE(std::find(members.begin(), members.end(), p), members.end());
          }
        }
        EXPECT_EQ(sent, received) << topology_name(topology) << " slices " << slices;
      }
    }
  }
  PlanSpec outside;
  outside.rank = 0;
  outside.size = 6;
  outside.members = members;
  outside.count = 4;
  EXPECT_THROW(build_plan(outside), Error);
}

// multi_ring: two rings in opposite directions, each over half the buffer; a rank sends to both neighbours.
TEST(MultiRing, BothNeighboursCarryHalfTheBuffer) {
  PlanSpec spec;
  spec.topology = Topology::multi_ring;
  spec.rank = 2;
  spec.size = 5;
  spec.count = 1000;
  spec.segment_elems = 1000;
  const Plan plan = build_plan(spec);
  std::map<int, std::size_t> sent;
  for (const Op& op : plan.ops) {
    if (op.kind == OpKind::send) sent[op.peer] += op.count;
  }
  EXPECT_EQ(sent.size(), 2u);
  EXPECT_EQ(sent[3], sent[1]);  // 2 (n - 1) / n of each half: 800 elements to each neighbour
  EXPECT_EQ(sent[3], 800u);
}

// Recursive doubling: at step s each rank exchanges every segment with the rank whose index differs in bit s, and
// what it receives is reduced into the segment it sent (so the send must finish first).
TEST(RecursiveDoubling, PartnersExchangeTheWholeBufferInLog2Steps) {
  for (int size : {1, 2, 4, 8}) {
    std::map<std::tuple<int, int, std::uint64_t>, std::size_t> sent, received;
    for (int rank = 0; rank < size; ++rank) {
      PlanSpec spec;
      spec.rank = rank;
      spec.size = size;
      spec.count = 10;
      spec.segment_elems = 4;  // segments of 4, 4 and 2
      spec.recursive_doubling = true;
      const Plan plan = build_plan(spec);
      ASSERT_EQ(plan.ops.size(), std::size_t(size == 1 ? 0 : 6 * std::countr_zero(unsigned(size))));
      for (std::size_t i = 0; i < plan.ops.size(); ++i) {
        const Op& op = plan.ops[i];
        const int step = int((op.tag >> 40) & 0xffff);
        EXPECT_EQ(op.peer, rank ^ (1 << step));
        if (op.kind == OpKind::send) {
          sent[{rank, op.peer, op.tag}] = op.count;
        } else {
          ASSERT_EQ(op.kind, OpKind::recv_reduce);
          received[{op.peer, rank, op.tag}] = op.count;
          EXPECT_GE(plan.dependency_count[i], 1u) << "a receive must wait for the send of the same segment";
        }
      }
    }
    EXPECT_EQ(sent, received) << size << " ranks";
  }
  PlanSpec three;
  three.size = 3;
  three.count = 4;
  three.recursive_doubling = true;
  EXPECT_THROW(build_plan(three), Error);
}

}  // namespace
}  // namespace aikido::collective
