// A worker that is cut off from the others closes no connection: when a newer cluster version removes it after a
// failure, the survivors' collectives that wait for it fail at once (ElasticSession drops the removed peers) instead
// of waiting out the collective timeout, and the survivors recover into the newer version.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <string>
#include <vector>

#include "thread_job.hpp"

namespace aikido {
namespace {

using namespace std::chrono_literals;

// The membership as a worker on the far side of a cut link sees it: it never hears of a newer version.
class CutOffMembership final : public MembershipStore {
 public:
  explicit CutOffMembership(std::shared_ptr<MembershipStore> inner) : inner_(std::move(inner)) {}
  std::optional<ClusterSpec> latest() override { return inner_->latest(); }
  std::optional<ClusterSpec> get(std::uint64_t v) override { return inner_->get(v); }
  bool propose(const ClusterSpec& next) override { return inner_->propose(next); }
  std::optional<ClusterSpec> watch(std::uint64_t, std::chrono::milliseconds timeout) override {
    std::this_thread::sleep_for(std::min(timeout, std::chrono::milliseconds(50)));
    return std::nullopt;
  }

 private:
  std::shared_ptr<MembershipStore> inner_;
};

class ElasticPartitionTest : public ::testing::TestWithParam<TransportKind> {};

TEST_P(ElasticPartitionTest, SurvivorsStopWaitingForAWorkerThatANewerVersionRemoved) {
  std::mutex mutex;
  std::condition_variable changed;
  bool cut = false, released = false;
  std::vector<std::string> errors;
  std::vector<std::int64_t> final_steps;
  test::ThreadJob* job_ptr = nullptr;
  test::ThreadJob job(
      3, 3,
      [&](ElasticSession& session) {
        std::int64_t step = 0;
        std::vector<float> x(4096);
        session.register_value("step", step);
        while (step < 30) {
          if (session.sync(step) == SyncResult::removed) return;
          if (session.worker_id() == 2 && step == 5) {
            // Cut off: it neither posts nor closes anything until the test ends.
            std::unique_lock<std::mutex> lock(mutex);
            cut = true;
            changed.notify_all();
            changed.wait(lock, [&] { return released; });
            return;
          }
          try {
            std::fill(x.begin(), x.end(), 1.0f);
            session.peer().allreduce(std::span<float>(x), ReduceOp::sum, "grad");
            ++step;
            session.commit();
          } catch (const PeerLostError& e) {
            {
              std::lock_guard<std::mutex> lock(mutex);
              errors.push_back(e.what());
            }
            if (session.recover() == SyncResult::removed) return;
          }
        }
        std::lock_guard<std::mutex> lock(mutex);
        final_steps.push_back(step);
        if (final_steps.size() == 2) {
          released = true;
          changed.notify_all();
        }
      },
      [&](ElasticConfig& c) {
        c.peer.transport = GetParam();
        c.peer.timeout = 60s;  // far beyond the test's patience: only the drop ends the wait
        if (c.worker_id == 2) c.watch_membership = std::make_shared<CutOffMembership>(c.membership);
      });
  job_ptr = &job;
  std::thread launcher([&] {
    std::unique_lock<std::mutex> lock(mutex);
    changed.wait(lock, [&] { return cut; });
    lock.unlock();
    const auto latest = job_ptr->membership()->latest();
    EXPECT_TRUE(job_ptr->membership()->propose(latest->without({2}, "host h2 lost")));
  });
  job.run();
  launcher.join();
  ASSERT_EQ(final_steps, (std::vector<std::int64_t>{30, 30}));
  ASSERT_FALSE(errors.empty());
  for (const auto& e : errors) {
    EXPECT_NE(e.find("cluster version 1 (host h2 lost) removed worker 2"), std::string::npos) << e;
  }
}

// The membership store goes away (etcd down for longer than the timeout): once `away` is set, every call fails as the
// etcd client fails when no endpoint answers.
class AwayMembership final : public MembershipStore {
 public:
  AwayMembership(std::shared_ptr<MembershipStore> inner, std::atomic<bool>& away)
      : inner_(std::move(inner)), away_(away) {}
  std::optional<ClusterSpec> latest() override { return check(), inner_->latest(); }
  std::optional<ClusterSpec> get(std::uint64_t v) override { return check(), inner_->get(v); }
  bool propose(const ClusterSpec& next) override { return check(), inner_->propose(next); }
  std::optional<ClusterSpec> watch(std::uint64_t after, std::chrono::milliseconds timeout) override {
    check();
    return inner_->watch(after, timeout);
  }

 private:
  void check() const {
    if (away_) throw TimeoutError("etcd at 198.18.0.1:2379 did not answer for 2 s");
  }
  std::shared_ptr<MembershipStore> inner_;
  std::atomic<bool>& away_;
};

// A worker is lost while the store is away: the survivors cannot agree on a new cluster, and say so; the first of
// them writes what was committed to the checkpoint file, so that nothing committed is lost.
TEST(ElasticStoreAway, ARecoveryWithoutTheStoreKeepsTheLastCommitInTheCheckpoint) {
  std::atomic<bool> away{false};
  const std::string checkpoint = ::testing::TempDir() + "aikido-away-" + std::to_string(::getpid()) + ".ck";
  std::mutex mutex;
  std::vector<std::string> errors;
  test::ThreadJob job(
      3, 3,
      [&](ElasticSession& session) {
        std::int64_t step = 0;
        std::vector<float> x(64);
        session.register_value("step", step);
        while (step < 1000) {
          if (session.sync(step) == SyncResult::removed) return;
          if (step == 12) {
            away = true;
            if (session.worker_id() == 2) return;  // leaves: the others' next allreduce fails
          }
          try {
            session.peer().allreduce(std::span<float>(x), ReduceOp::sum, "grad");
            ++step;
            if (step % 4 == 0) session.commit();
          } catch (const PeerLostError&) {
            try {
              session.recover();
            } catch (const TimeoutError& e) {
              std::lock_guard<std::mutex> lock(mutex);
              errors.push_back(e.what());
              return;
            }
          }
        }
      },
      [&](ElasticConfig& c) {
        c.membership = std::make_shared<AwayMembership>(c.membership, away);
        c.checkpoint_path = checkpoint;
        c.recovery_timeout = 2s;
      });
  job.run();
  ASSERT_EQ(errors.size(), 2u);
  int wrote = 0;
  for (const auto& e : errors) {
    EXPECT_NE(e.find("did not answer"), std::string::npos) << e;
    if (e.find("wrote the last commit (step 12) to " + checkpoint) != std::string::npos) ++wrote;
  }
  // The first survivor writes; the second may too, when it sees the first leave (after its own TimeoutError)
  // before it gives up itself. Each write is whole: the file is renamed into place.
  EXPECT_GE(wrote, 1) << "a survivor writes the checkpoint";
  EXPECT_EQ(::access(checkpoint.c_str(), R_OK), 0);
  std::remove(checkpoint.c_str());
}

INSTANTIATE_TEST_SUITE_P(Transports, ElasticPartitionTest,
                         ::testing::Values(TransportKind::automatic, TransportKind::tcp, TransportKind::unix_socket),
                         [](const auto& info) { return std::string(transport_name(info.param)); });

}  // namespace
}  // namespace aikido
