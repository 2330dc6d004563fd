// Test harness: runs `size` ranks as threads of this process, each with its own Peer.
#pragma once

#include <gtest/gtest.h>

#include <aikido/aikido.hpp>
#include <atomic>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace aikido::test {

inline PeerConfig base_config() {
  PeerConfig c;
  c.secret = "test-secret";
  c.timeout = std::chrono::milliseconds(20'000);
  return c;
}

/// Runs fn(peer) on `size` ranks concurrently; `configure(rank, config)` may adjust each rank's configuration.
/// Rethrows the first exception any rank threw.
inline void run_cluster(int size, const PeerConfig& base, const std::function<void(Peer&)>& fn,
                        const std::function<void(int, PeerConfig&)>& configure = {}) {
  static std::atomic<int> job{0};
  auto store = make_memory_store();
  const std::string job_id = "test" + std::to_string(job++);
  std::vector<std::thread> threads;
  std::mutex mutex;
  std::exception_ptr first;
  for (int r = 0; r < size; ++r) {
    threads.emplace_back([&, r] {
      try {
        PeerConfig config = base;
        config.rank = r;
        config.size = size;
        config.store = store;
        config.job_id = job_id;
        if (configure) configure(r, config);
        Peer peer = Peer::create(config);
        fn(peer);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex);
        if (!first) first = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  if (first) std::rethrow_exception(first);
}

}  // namespace aikido::test
