// Test harness: an elastic job whose workers are threads of this process; the test plays the launcher.
#pragma once

#include <aikido/aikido.hpp>
#include <atomic>
#include <chrono>
#include <exception>
#include <functional>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "cluster.hpp"

namespace aikido::test {

inline ClusterSpec spec_of(int n, int min = 1, int max = 8) {
  ClusterSpec s;
  s.min_size = min;
  s.max_size = max;
  for (int i = 0; i < n; ++i) s.workers.push_back({std::uint64_t(i), "h"});
  s.next_id = std::uint64_t(n);
  return s;
}

// A job of worker threads: the test plays the launcher, starting a thread for every worker a new version adds.
class ThreadJob {
 public:
  using Body = std::function<void(ElasticSession&)>;

  /// `configure` adjusts every worker's configuration (transport, timeouts) before its session starts.
  ThreadJob(int n, int max, Body body, std::function<void(ElasticConfig&)> configure = {})
      : body_(std::move(body)), configure_(std::move(configure)) {
    static std::atomic<int> counter{0};
    job_id_ = "elastic" + std::to_string(counter++);
    membership_ = make_membership_store(store_, job_id_);
    ClusterSpec v0 = spec_of(n, 1, max);
    EXPECT_TRUE(membership_->propose(v0));
    for (const auto& w : v0.workers) start(w.id);
  }

  // Follows the membership until every worker thread has finished; rethrows the first worker error.
  void run() {
    std::uint64_t version = 0;
    for (;;) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (running_ == 0) break;
      }
      if (auto spec = membership_->watch(version, std::chrono::milliseconds(20))) {
        version = spec->version;
        for (const auto& w : spec->workers) start(w.id);
      }
    }
    for (auto& t : threads_) t.join();
    if (error_) std::rethrow_exception(error_);
  }

  std::shared_ptr<MembershipStore> membership() { return membership_; }
  std::shared_ptr<Store> store() { return store_; }
  const std::string& job_id() const { return job_id_; }
  /// Worker `id` is never started: a process that fails to come up.
  void never_start(std::uint64_t id) {
    std::lock_guard<std::mutex> lock(mutex_);
    started_.insert(id);
  }

 private:
  void start(std::uint64_t id) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!started_.insert(id).second) return;
    ++running_;
    threads_.emplace_back([this, id] {
      try {
        ElasticConfig c;
        c.peer = test::base_config();
        c.peer.store = store_;
        c.peer.job_id = job_id_;
        c.membership = membership_;
        c.worker_id = id;
        if (configure_) configure_(c);
        ElasticSession session(c);
        body_(session);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(mutex_);
      --running_;
    });
  }

  Body body_;
  std::function<void(ElasticConfig&)> configure_;
  std::shared_ptr<Store> store_ = make_memory_store();
  std::string job_id_;
  std::shared_ptr<MembershipStore> membership_;
  std::mutex mutex_;
  std::set<std::uint64_t> started_;
  std::vector<std::thread> threads_;
  int running_ = 0;
  std::exception_ptr error_;
};

}  // namespace aikido::test
