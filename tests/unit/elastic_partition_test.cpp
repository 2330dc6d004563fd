// A worker that is cut off from the others closes no connection: when a newer cluster version removes it after a
// failure, the survivors' collectives that wait for it fail at once (ElasticSession drops the removed peers) instead
// of waiting out the collective timeout, and the survivors recover into the newer version.
#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
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

INSTANTIATE_TEST_SUITE_P(Transports, ElasticPartitionTest,
                         ::testing::Values(TransportKind::automatic, TransportKind::tcp, TransportKind::unix_socket),
                         [](const auto& info) { return std::string(transport_name(info.param)); });

}  // namespace
}  // namespace aikido
