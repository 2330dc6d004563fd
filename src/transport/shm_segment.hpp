// Shared memory between the processes of one host: a segment (an anonymous memfd mapped by every local rank) and
// the doorbells ranks sleep on when there is nothing to do.
//
// The segment has no name in the file system: its creator keeps the memfd open while the others open it through
// /proc/<pid>/fd/<fd> (same user only) and map it; once all have mapped it the creator closes the descriptor, so
// the memory goes away with the last process that maps it, even after a crash.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

namespace aikido::transport {

/// A shared mapping; unmapped on destruction. Move-only.
class SharedSegment {
 public:
  SharedSegment() = default;
  SharedSegment(SharedSegment&& other) noexcept;
  SharedSegment& operator=(SharedSegment&& other) noexcept;
  SharedSegment(const SharedSegment&) = delete;
  SharedSegment& operator=(const SharedSegment&) = delete;
  ~SharedSegment();

  /// Creates a zero-filled segment of `bytes` (pages are allocated on first touch). Throws Error on failure.
  static SharedSegment create(const std::string& label, std::size_t bytes);
  /// Maps the segment that process `pid` holds open as descriptor `fd`; throws Error unless it has `bytes`.
  static SharedSegment open(int pid, int fd, std::size_t bytes);

  std::byte* data() const { return data_; }
  std::size_t size() const { return size_; }
  /// The descriptor of a created segment (-1 once closed or for an opened one): what other ranks open.
  int fd() const { return fd_; }
  /// Closes the descriptor; the mapping stays valid.
  void close_fd();

 private:
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  int fd_ = -1;
};

/// One rank's doorbell in shared memory: others ring it after changing something the rank may wait for.
/// Waiting spins first (cheap when the other side answers within microseconds) and then sleeps in the kernel
/// (futex), so that ranks sharing a core do not burn it.
struct alignas(64) Doorbell {
  std::atomic<std::uint32_t> rings{0};
  std::atomic<std::uint32_t> sleepers{0};

  /// Counts a change and wakes sleeping threads, if any (a system call only then).
  void ring();
  /// Sleeps until `rings` differs from `seen` or `timeout` passes (or spuriously). `seen` is a value of `rings`
  /// read before checking the condition waited for.
  void sleep(std::uint32_t seen, std::chrono::microseconds timeout);
};
static_assert(std::atomic<std::uint32_t>::is_always_lock_free && std::atomic<std::uint64_t>::is_always_lock_free);

/// A pause instruction for spin loops.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

}  // namespace aikido::transport
