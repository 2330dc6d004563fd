#include "runtime/buffer_pool.hpp"

#include <bit>

namespace aikido::detail {

PooledBuffer& PooledBuffer::operator=(PooledBuffer&& other) noexcept {
  if (this != &other) {
    if (pool_ && data_) pool_->release(std::move(data_), capacity_);
    pool_ = other.pool_;
    data_ = std::move(other.data_);
    capacity_ = other.capacity_;
    other.pool_ = nullptr;
    other.capacity_ = 0;
  }
  return *this;
}

PooledBuffer::~PooledBuffer() {
  if (pool_ && data_) pool_->release(std::move(data_), capacity_);
}

PooledBuffer BufferPool::acquire(std::size_t bytes) {
  const std::size_t capacity = std::bit_ceil(std::max<std::size_t>(bytes, 4096));
  PooledBuffer buffer;
  buffer.pool_ = this;
  buffer.capacity_ = capacity;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(capacity);
    if (it != free_.end() && !it->second.empty()) {
      buffer.data_ = std::move(it->second.back());
      it->second.pop_back();
      cached_ -= capacity;
      return buffer;
    }
  }
  buffer.data_.reset(new std::byte[capacity]);
  return buffer;
}

void BufferPool::release(std::unique_ptr<std::byte[]> data, std::size_t capacity) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (cached_ + capacity > max_cached_) return;  // `data` is freed
  cached_ += capacity;
  free_[capacity].push_back(std::move(data));
}

}  // namespace aikido::detail
