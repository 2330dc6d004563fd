// MetricsPublisher (include/aikido/metrics.hpp): a worker's metrics to the store, off the training thread.
#include <aikido/errors.hpp>
#include <aikido/metrics.hpp>
#include <aikido/store.hpp>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "base/env.hpp"
#include "base/launcher_env.hpp"
#include "base/log.hpp"
#include "base/thread.hpp"

namespace aikido {

std::string metrics_key_prometheus(const std::string& job_id, int rank) {
  return job_id + "/metrics/prometheus/" + std::to_string(rank);
}

std::string metrics_key_json(const std::string& job_id, int rank) {
  return job_id + "/metrics/json/" + std::to_string(rank);
}

struct MetricsPublisher::State {
  std::shared_ptr<Store> store;
  std::string job_id;
  int rank = 0;
  std::chrono::milliseconds interval{1000};
  std::mutex mutex;
  std::condition_variable wake;
  TrainingMetrics latest;
  bool fresh = false;        // latest not yet published
  std::vector<int> retired;  // ranks this worker published under before set_rank(): their keys are emptied
  bool stopping = false;
  std::thread thread;

  void publish(const TrainingMetrics& m, int as_rank, const std::vector<int>& emptied) {
    try {
      for (int old : emptied) {
        store->set(metrics_key_prometheus(job_id, old), "");
        store->set(metrics_key_json(job_id, old), "");
      }
      store->set(metrics_key_prometheus(job_id, as_rank), to_prometheus(m, as_rank));
      store->set(metrics_key_json(job_id, as_rank), to_json(m, as_rank));
    } catch (const std::exception& e) {
      log::warn("metrics: cannot publish to the store: ", e.what());
    }
  }

  void loop() {
    std::unique_lock<std::mutex> lock(mutex);
    while (true) {
      wake.wait_for(lock, interval, [&] { return stopping; });
      if (fresh) {
        const TrainingMetrics copy = latest;
        const int now_rank = rank;
        std::vector<int> old;
        old.swap(retired);
        fresh = false;
        lock.unlock();
        publish(copy, now_rank, old);
        lock.lock();
      }
      if (stopping) return;
    }
  }
};

std::unique_ptr<MetricsPublisher> MetricsPublisher::from_env(int rank) {
  if (!env::get(env::kMetricsInterval)) return nullptr;
  // The job's store: etcd in a job across hosts (AIKIDO_STORE), else the one aikido-run serves.
  std::string url;
  if (auto store_url = env::get(env::kStore)) {
    url = *store_url;
  } else if (auto address = env::get(env::kStoreAddr)) {
    url = "tcp://" + *address;
  } else {
    return nullptr;
  }
  const auto interval = env::get_seconds(env::kMetricsInterval, std::chrono::milliseconds(1000));
  auto store = connect_store(url, env::job_secret(env::process_lookup()),
                             env::get_seconds(env::kTimeout, env::kDefaultTimeout), TlsOptions::from_env());
  return std::make_unique<MetricsPublisher>(std::move(store), env::get(env::kJobId).value_or("aikido"), rank, interval);
}

MetricsPublisher::MetricsPublisher(std::shared_ptr<Store> store, std::string job_id, int rank,
                                   std::chrono::milliseconds interval)
    : state_(std::make_unique<State>()) {
  if (!store) throw ConfigError("MetricsPublisher: no store");
  state_->store = std::move(store);
  state_->job_id = std::move(job_id);
  state_->rank = rank;
  state_->interval = interval;
  state_->thread = std::thread([s = state_.get()] { s->loop(); });
  detail::name_thread(state_->thread, "aikido-metrics");
}

MetricsPublisher::~MetricsPublisher() {
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->stopping = true;
  }
  state_->wake.notify_all();
  state_->thread.join();
}

void MetricsPublisher::set_rank(int rank) {
  std::lock_guard<std::mutex> lock(state_->mutex);
  if (rank == state_->rank) return;
  state_->retired.push_back(state_->rank);
  state_->rank = rank;
}

void MetricsPublisher::update(const TrainingMetrics& metrics) {
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->latest = metrics;
  state_->fresh = true;
}

}  // namespace aikido
