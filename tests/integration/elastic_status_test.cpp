// What aikido-run reads of an ElasticSession in the store, in process: the session's status key exists before its
// rendezvous address (aikido-run takes an address without a status key for a plain Peer), also when its heartbeat
// thread is slow to start, and says "joining" until the worker has joined. Store wrappers record the order of writes
// and hold the heartbeat back; the sessions are threads.
#include <gtest/gtest.h>

#include <aikido/aikido.hpp>
#include <aikido/elastic.hpp>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "runtime/peer_env.hpp"

namespace aikido {
namespace {

// Passes everything to a store and records the keys of set() in order.
class RecordingStore : public Store {
 public:
  explicit RecordingStore(std::shared_ptr<Store> inner) : inner_(std::move(inner)) {}
  void set(const std::string& key, const std::string& value) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      writes_.push_back(key + "=" + value);
    }
    inner_->set(key, value);
  }
  std::optional<std::string> get(const std::string& key) override { return inner_->get(key); }
  std::string wait(const std::string& key, std::chrono::milliseconds timeout) override {
    return inner_->wait(key, timeout);
  }
  std::optional<std::string> compare_and_set(const std::string& key, const std::optional<std::string>& expected,
                                             const std::string& desired) override {
    return inner_->compare_and_set(key, expected, desired);
  }
  std::vector<std::string> writes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return writes_;
  }

 private:
  std::shared_ptr<Store> inner_;
  std::mutex mutex_;
  std::vector<std::string> writes_;
};

// The status store of one worker: holds back the heartbeat thread's writes (those from any thread but the one that
// opens the session) until the worker's rendezvous address is in the store, so that only a write made while the
// session opens can come before the address.
class HeldHeartbeatStore : public Store {
 public:
  HeldHeartbeatStore(std::shared_ptr<Store> inner, std::string address_key)
      : inner_(std::move(inner)), address_key_(std::move(address_key)), opener_(std::this_thread::get_id()) {}
  void set(const std::string& key, const std::string& value) override {
    if (std::this_thread::get_id() != opener_) {
      try {
        inner_->wait(address_key_, std::chrono::seconds(5));
      } catch (const TimeoutError&) {
      }
    }
    inner_->set(key, value);
  }
  std::optional<std::string> get(const std::string& key) override { return inner_->get(key); }
  std::string wait(const std::string& key, std::chrono::milliseconds timeout) override {
    return inner_->wait(key, timeout);
  }
  std::optional<std::string> compare_and_set(const std::string& key, const std::optional<std::string>& expected,
                                             const std::string& desired) override {
    return inner_->compare_and_set(key, expected, desired);
  }

 private:
  std::shared_ptr<Store> inner_;
  std::string address_key_;
  std::thread::id opener_;
};

// Index of the first write whose "key=value" starts with `prefix`; -1 when none.
long first_write(const std::vector<std::string>& writes, const std::string& prefix) {
  for (std::size_t i = 0; i < writes.size(); ++i) {
    if (writes[i].rfind(prefix, 0) == 0) return long(i);
  }
  return -1;
}

TEST(ElasticStatus, TheStatusKeyComesBeforeTheRendezvousAddressAndSaysJoining) {
  constexpr int kWorkers = 3;
  const std::string job = "status-order";
  auto store = std::make_shared<RecordingStore>(make_memory_store());
  auto membership = make_membership_store(store, job);
  ClusterSpec v0;
  v0.min_size = 1;
  v0.max_size = kWorkers;
  for (int i = 0; i < kWorkers; ++i) v0.workers.push_back({std::uint64_t(i), "h"});
  v0.next_id = kWorkers;
  ASSERT_TRUE(membership->propose(v0));

  std::vector<std::thread> threads;
  std::vector<std::string> errors(kWorkers);
  for (int id = 0; id < kWorkers; ++id) {
    threads.emplace_back([&, id] {
      try {
        ElasticConfig c;
        c.peer.secret = "test-secret";
        c.peer.job_id = job;
        c.peer.timeout = std::chrono::milliseconds(20'000);
        c.peer.store = store;
        c.membership = membership;
        c.status_store = std::make_shared<HeldHeartbeatStore>(store, detail::endpoint_key(job, 0, id));
        c.worker_id = std::uint64_t(id);
        ElasticSession session(c);
        std::int64_t step = 0;
        session.register_value("step", step);
        session.sync(step);
      } catch (const std::exception& e) {
        errors[std::size_t(id)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& e : errors) EXPECT_EQ(e, "");

  const auto writes = store->writes();
  for (int id = 0; id < kWorkers; ++id) {
    const std::string status = worker_status_key(job, std::uint64_t(id)) + "=";
    const long first_status = first_write(writes, status);
    const long address = first_write(writes, detail::endpoint_key(job, 0, v0.rank_of(std::uint64_t(id))) + "=");
    ASSERT_GE(first_status, 0) << "worker " << id << " never published its status";
    ASSERT_GE(address, 0) << "worker " << id << " never published its address";
    EXPECT_LT(first_status, address) << "worker " << id << ": its address came before its status key";
    EXPECT_EQ(writes[std::size_t(first_status)].rfind(status + "state=joining version=0 ", 0), 0u)
        << writes[std::size_t(first_status)];
  }
}

}  // namespace
}  // namespace aikido
