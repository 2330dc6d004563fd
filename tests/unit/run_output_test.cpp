// aikido-run's line relay (tools/aikido-run/output.cpp): labels, --log-dir copies, --ranks-filter, progress lines
// updated in place on a terminal.
#include <gtest/gtest.h>
#include <unistd.h>

#include <string>

#include "output.hpp"

namespace aikido::run {
namespace {

// A pipe whose read end collects what the prefixer wrote.
struct Sink {
  int fds[2];
  Sink() { EXPECT_EQ(::pipe(fds), 0); }
  ~Sink() {
    ::close(fds[0]);
    if (fds[1] >= 0) ::close(fds[1]);
  }
  std::string take() {
    ::close(fds[1]);
    fds[1] = -1;
    std::string text;
    char buffer[4096];
    for (ssize_t n; (n = ::read(fds[0], buffer, sizeof buffer)) > 0;) text.append(buffer, std::size_t(n));
    return text;
  }
};

TEST(RunOutputTest, LabelsLinesAndCopiesThemUnlabelledToTheLog) {
  Sink console, log;
  LinePrefixer prefixer("2", console.fds[1]);
  prefixer.set_log(log.fds[1]);
  prefixer.feed("one\ntw", 6);
  prefixer.feed("o\nthree", 7);
  prefixer.finish();
  EXPECT_EQ(console.take(), "[2] one\n[2] two\n[2] three\n");
  EXPECT_EQ(log.take(), "one\ntwo\nthree\n");
}

TEST(RunOutputTest, AFilteredRankReachesOnlyTheLog) {
  Sink console, log;
  LinePrefixer prefixer("1", console.fds[1]);
  prefixer.set_log(log.fds[1]);
  prefixer.set_console(false);
  prefixer.feed("hidden\n", 7);
  prefixer.set_console(true);
  prefixer.feed("shown\n", 6);
  EXPECT_EQ(console.take(), "[1] shown\n");
  EXPECT_EQ(log.take(), "hidden\nshown\n");
}

TEST(RunOutputTest, ProgressLinesAreUpdatedInPlaceOnATerminalAndNeverLogged) {
  Sink console, log;
  LinePrefixer prefixer("0", console.fds[1]);
  prefixer.set_log(log.fds[1]);
  prefixer.set_in_place(true);
  const std::string text = "step 1\rstep 2\rdone\r\nnext\n";
  prefixer.feed(text.data(), text.size());
  EXPECT_EQ(console.take(), "\r[0] step 1\x1b[K\r[0] step 2\x1b[K\r\x1b[K[0] done\n[0] next\n");
  EXPECT_EQ(log.take(), "done\nnext\n");
}

TEST(RunOutputTest, WithoutATerminalCarriageReturnsStayInTheLine) {
  Sink console;
  LinePrefixer prefixer("0", console.fds[1]);
  const std::string text = "a\rb\n";
  prefixer.feed(text.data(), text.size());
  EXPECT_EQ(console.take(), "[0] a\rb\n");
}

}  // namespace
}  // namespace aikido::run
