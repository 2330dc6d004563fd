// Host lists and hostfiles of jobs started from one host, and the command lines that start remote launchers.
#include "launch/hostfile.hpp"

#include <gtest/gtest.h>

#include <aikido/errors.hpp>

namespace aikido::launch {
namespace {

TEST(HostList, ParsesHostsAndSlots) {
  EXPECT_EQ(parse_host_list("h1:2,h2:4"), (std::vector<HostSlots>{{"h1", 2}, {"h2", 4}}));
  EXPECT_EQ(parse_host_list("node-a"), (std::vector<HostSlots>{{"node-a", 1}}));
  EXPECT_EQ(parse_host_list("10.0.0.1:2, 10.0.0.2:2"), (std::vector<HostSlots>{{"10.0.0.1", 2}, {"10.0.0.2", 2}}));
  for (const char* bad : {"", "h1:", "h1:0", "h1:x", ":2", "h1:2,,h2:2", "h1:2,h1:3", "a b:2"}) {
    try {
      parse_host_list(bad);
      ADD_FAILURE() << "'" << bad << "' was accepted";
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("-H"), std::string::npos) << e.what();
    }
  }
}

TEST(Hostfile, ParsesSlotsCommentsAndBlankLines) {
  const auto hosts = parse_hostfile("# cluster\nnode1 slots=2\n\n  node2:3  # fast one\nnode3\n", "F");
  EXPECT_EQ(hosts, (std::vector<HostSlots>{{"node1", 2}, {"node2", 3}, {"node3", 1}}));
  try {
    parse_hostfile("node1 slots=2\nnode2 cpus=3\n", "F");
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("hostfile F line 2"), std::string::npos) << e.what();
  }
  EXPECT_THROW(parse_hostfile("# nothing\n", "F"), ConfigError);
  EXPECT_THROW(parse_hostfile("a slots=1\na slots=2\n", "F"), ConfigError);
  EXPECT_THROW(read_hostfile("/nonexistent/hostfile"), ConfigError);
}

TEST(Hostfile, WorkersFillHostsInOrder) {
  const std::vector<HostSlots> hosts = {{"a", 2}, {"b", 2}, {"c", 2}};
  EXPECT_EQ(place_workers(hosts, 3), (std::vector<HostSlots>{{"a", 2}, {"b", 1}}));
  EXPECT_EQ(place_workers(hosts, 6), hosts);
  EXPECT_THROW(place_workers(hosts, 7), ConfigError);
}

TEST(LaunchCommand, QuotesEveryWordForTheRemoteShell) {
  EXPECT_EQ(shell_quote("plain-word_1.2/x=y"), "plain-word_1.2/x=y");
  EXPECT_EQ(shell_quote("two words"), "'two words'");
  EXPECT_EQ(shell_quote("it's"), "'it'\\''s'");
  EXPECT_EQ(shell_quote(""), "''");
  EXPECT_EQ(launch_argv("", "h1", "/work dir", {"aikido-run", "--job-id", "j 1"}),
            (std::vector<std::string>{"ssh", "h1", "cd '/work dir' && exec aikido-run --job-id 'j 1'"}));
  EXPECT_EQ(launch_argv("ssh -p 2222 -o BatchMode=yes", "h2", "", {"x"}),
            (std::vector<std::string>{"ssh", "-p", "2222", "-o", "BatchMode=yes", "h2", "x"}));
}

}  // namespace
}  // namespace aikido::launch
