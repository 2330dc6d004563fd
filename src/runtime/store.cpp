#include <aikido/errors.hpp>
#include <aikido/store.hpp>
#include <condition_variable>
#include <map>
#include <mutex>

#include "base/error.hpp"

namespace aikido {
namespace {

class MemoryStore final : public Store {
 public:
  void set(const std::string& key, const std::string& value) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      values_[key] = value;
    }
    changed_.notify_all();
  }

  std::optional<std::string> get(const std::string& key) override {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = values_.find(key);
    if (it == values_.end()) return std::nullopt;
    return it->second;
  }

  std::string wait(const std::string& key, std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!changed_.wait_for(lock, timeout, [&] { return values_.count(key) > 0; })) {
      throw TimeoutError(detail::str_cat("store key '", key, "' did not appear within ", timeout.count(), " ms"));
    }
    return values_[key];
  }

  std::optional<std::string> compare_and_set(const std::string& key, const std::optional<std::string>& expected,
                                             const std::string& desired) override {
    std::optional<std::string> result;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = values_.find(key);
      const bool present = it != values_.end();
      if (present != expected.has_value() || (present && it->second != *expected)) {
        return present ? std::optional<std::string>(it->second) : std::nullopt;
      }
      values_[key] = desired;
      result = desired;
    }
    changed_.notify_all();
    return result;
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::map<std::string, std::string> values_;
};

}  // namespace

std::shared_ptr<Store> make_memory_store() { return std::make_shared<MemoryStore>(); }

}  // namespace aikido
