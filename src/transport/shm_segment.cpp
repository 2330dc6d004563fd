#include "transport/shm_segment.hpp"

#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <ctime>

#include "base/error.hpp"

namespace aikido::transport {

using detail::str_cat;

SharedSegment::SharedSegment(SharedSegment&& other) noexcept : data_(other.data_), size_(other.size_), fd_(other.fd_) {
  other.data_ = nullptr;
  other.size_ = 0;
  other.fd_ = -1;
}

SharedSegment& SharedSegment::operator=(SharedSegment&& other) noexcept {
  if (this != &other) {
    this->~SharedSegment();
    data_ = other.data_;
    size_ = other.size_;
    fd_ = other.fd_;
    other.data_ = nullptr;
    other.size_ = 0;
    other.fd_ = -1;
  }
  return *this;
}

SharedSegment::~SharedSegment() {
  if (data_) ::munmap(data_, size_);
  close_fd();
  data_ = nullptr;
  size_ = 0;
}

void SharedSegment::close_fd() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

namespace {

std::byte* map_shared(int fd, std::size_t bytes) {
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) detail::throw_system(str_cat("mmap of a ", bytes, "-byte shared segment"));
  return static_cast<std::byte*>(p);
}

}  // namespace

SharedSegment SharedSegment::create(const std::string& label, std::size_t bytes) {
  SharedSegment s;
  s.fd_ = ::memfd_create(label.c_str(), MFD_CLOEXEC);
  if (s.fd_ < 0) detail::throw_system("memfd_create for the same-host shared segment");
  if (::ftruncate(s.fd_, off_t(bytes)) != 0)
    detail::throw_system(str_cat("ftruncate of the shared segment to ", bytes));
  s.data_ = map_shared(s.fd_, bytes);
  s.size_ = bytes;
  return s;
}

SharedSegment SharedSegment::open(int pid, int fd, std::size_t bytes) {
  const std::string path = str_cat("/proc/", pid, "/fd/", fd);
  const int mine = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (mine < 0) detail::throw_system("open " + path);
  SharedSegment s;
  s.fd_ = mine;
  struct stat st {};
  if (::fstat(mine, &st) != 0) detail::throw_system("fstat " + path);
  if (std::size_t(st.st_size) != bytes) {
    throw Error(str_cat(path, " has ", st.st_size, " bytes where the shared segment has ", bytes));
  }
  s.data_ = map_shared(mine, bytes);
  s.size_ = bytes;
  s.close_fd();
  return s;
}

void Doorbell::ring() {
  rings.fetch_add(1, std::memory_order_seq_cst);
  if (sleepers.load(std::memory_order_seq_cst) != 0) {
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&rings), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
  }
}

void Doorbell::sleep(std::uint32_t seen, std::chrono::microseconds timeout) {
  if (timeout.count() <= 0) return;
  sleepers.fetch_add(1, std::memory_order_seq_cst);
  // A ring between reading `seen` and here changed `rings`: the kernel then returns at once (EAGAIN).
  if (rings.load(std::memory_order_seq_cst) == seen) {
    timespec ts;
    ts.tv_sec = time_t(timeout.count() / 1'000'000);
    ts.tv_nsec = long(timeout.count() % 1'000'000) * 1000;
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&rings), FUTEX_WAIT, seen, &ts, nullptr, 0);
  }
  sleepers.fetch_sub(1, std::memory_order_seq_cst);
}

}  // namespace aikido::transport
