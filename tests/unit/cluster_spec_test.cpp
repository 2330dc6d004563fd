// ClusterSpec changes of jobs that span hosts: each host's workers stay contiguous, hosts in the order they joined.
#include <gtest/gtest.h>

#include <aikido/cluster_spec.hpp>
#include <aikido/errors.hpp>
#include <string>

namespace aikido {
namespace {

std::string layout(const ClusterSpec& s) {
  std::string out;
  for (const auto& w : s.workers) out += (out.empty() ? "" : " ") + w.host + ":" + std::to_string(w.id);
  return out;
}

ClusterSpec two_hosts() {
  ClusterSpec s;
  s.min_size = 1;
  s.max_size = 8;
  s = s.with_workers_on("a", 2, "initial");
  s = s.with_workers_on("b", 2, "initial");
  s.version = 0;
  return s;
}

TEST(ClusterSpecHosts, NewWorkersGoAfterTheirHostsLastWorker) {
  ClusterSpec s = two_hosts();
  EXPECT_EQ(layout(s), "a:0 a:1 b:2 b:3");
  EXPECT_EQ(s.hosts(), (std::vector<std::string>{"a", "b"}));
  ClusterSpec replaced = s.without({1}, "lost").with_workers_on("a", 1, "restart");
  EXPECT_EQ(layout(replaced), "a:0 a:4 b:2 b:3");
  EXPECT_EQ(replaced.version, 2u);
  ClusterSpec third = s.with_workers_on("c", 2, "host joined");
  EXPECT_EQ(layout(third), "a:0 a:1 b:2 b:3 c:4 c:5");
  EXPECT_EQ(third.reason, "host joined");
  EXPECT_EQ(third.workers_on("c"), 2);
}

TEST(ClusterSpecHosts, WithoutHostRemovesAllItsWorkers) {
  ClusterSpec s = two_hosts().with_workers_on("c", 1, "joined");
  ClusterSpec next = s.without_host("b", "host lost");
  EXPECT_EQ(layout(next), "a:0 a:1 c:4");
  EXPECT_EQ(next.version, s.version + 1);
  EXPECT_EQ(next.reason, "host lost");
  EXPECT_EQ(next.workers_on("b"), 0);
  EXPECT_THROW(two_hosts().without_host("a", "x").without_host("b", "x").validate(), ConfigError);
}

TEST(ClusterSpecHosts, WithSizeFillsTheEmptiestHostAndShrinksTheFullest) {
  ClusterSpec s = two_hosts().without({3}, "lost");  // a:2, b:1
  ClusterSpec grown = s.with_size(5);
  EXPECT_EQ(layout(grown), "a:0 a:1 a:5 b:2 b:4");  // b gets the first, then a (a tie goes to the earlier host)
  EXPECT_EQ(grown.workers_on("a"), 3);
  EXPECT_EQ(grown.version, s.version + 1);
  // Shrinking keeps a worker on every host while it can (a resize down must not leave the whole job on one host,
  // which may be the one cut off), taking from the fullest host, the later on a tie, its highest rank.
  EXPECT_EQ(layout(two_hosts().with_size(3)), "a:0 a:1 b:2");
  EXPECT_EQ(layout(two_hosts().with_size(2)), "a:0 b:2");
  EXPECT_EQ(layout(two_hosts().with_size(1)), "a:0");
  EXPECT_EQ(layout(grown.with_size(3)), "a:0 a:1 b:2");
  EXPECT_EQ(layout(two_hosts().with_workers_on("c", 1, "joined").with_size(3)), "a:0 b:2 c:4");
  EXPECT_THROW(two_hosts().with_size(9), ConfigError);
  EXPECT_EQ(two_hosts().with_size(6).version, 1u);
}

}  // namespace
}  // namespace aikido

namespace aikido {
namespace {

TEST(ClusterSpecRequestedBy, TravelsWithItsVersionAndNotIntoTheNext) {
  ClusterSpec s = two_hosts();
  ClusterSpec grown = s.with_size(5);
  grown.requested_by = "policy adaptive-batch";
  const ClusterSpec decoded = ClusterSpec::decode(grown.encode());
  EXPECT_EQ(decoded.requested_by, "policy adaptive-batch");
  EXPECT_EQ(decoded.reason, "resize");
  EXPECT_EQ(decoded.with_size(4).requested_by, "");  // a later version says who asked for it
  EXPECT_EQ(ClusterSpec::decode(s.encode()).requested_by, "");
  grown.requested_by = "two\nlines";
  EXPECT_THROW(grown.validate(), ConfigError);
}

}  // namespace
}  // namespace aikido
