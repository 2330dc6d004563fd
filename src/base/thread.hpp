// Names for the library's threads, as `top -H`, `perf` and debuggers show them.
#pragma once

#include <pthread.h>

#include <string>
#include <thread>

namespace aikido::detail {

/// Names `thread` (Linux keeps the first 15 characters); called by the creating thread, so the name is set by the
/// time the constructor returns. The library's names start with "aikido-".
inline void name_thread(std::thread& thread, const std::string& name) {
  ::pthread_setname_np(thread.native_handle(), name.substr(0, 15).c_str());
}

}  // namespace aikido::detail
