// Packing of small saved states (policies, the policy runner, samplers) into bytes and back, for
// ElasticSession::register_state. Native byte order: the bytes only travel between workers of one job.
#pragma once

#include <aikido/errors.hpp>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "base/error.hpp"

namespace aikido::detail {

class ByteWriter {
 public:
  template <class T>
  ByteWriter& put(const T& value) {
    static_assert(std::is_trivially_copyable_v<T>);
    const auto* b = reinterpret_cast<const std::byte*>(&value);
    bytes_.insert(bytes_.end(), b, b + sizeof(T));
    return *this;
  }
  /// A length (u64), then the bytes.
  ByteWriter& put_bytes(std::span<const std::byte> bytes) {
    put(std::uint64_t(bytes.size()));
    bytes_.insert(bytes_.end(), bytes.begin(), bytes.end());
    return *this;
  }
  ByteWriter& put_string(std::string_view text) {
    return put_bytes(std::as_bytes(std::span(text.data(), text.size())));
  }
  std::vector<std::byte> take() { return std::move(bytes_); }

 private:
  std::vector<std::byte> bytes_;
};

/// Reads what a ByteWriter wrote, in the same order; ProtocolError naming `owner` when the bytes run out or are left
/// over.
class ByteReader {
 public:
  ByteReader(std::span<const std::byte> bytes, std::string owner) : bytes_(bytes), owner_(std::move(owner)) {}
  template <class T>
  T get() {
    static_assert(std::is_trivially_copyable_v<T>);
    T value;
    std::memcpy(&value, take(sizeof(T)).data(), sizeof(T));
    return value;
  }
  std::span<const std::byte> get_bytes() { return take(get<std::uint64_t>()); }
  std::string get_string() {
    const auto bytes = get_bytes();
    return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  }
  /// Bytes not read yet.
  std::size_t remaining() const { return bytes_.size(); }
  /// Throws unless everything was read; `hint` is appended to the message.
  void finish(std::string_view hint = {}) const {
    if (!bytes_.empty()) throw ProtocolError(str_cat(owner_, ": saved state is too long", hint));
  }

 private:
  std::span<const std::byte> take(std::uint64_t size) {
    if (bytes_.size() < size) throw ProtocolError(str_cat(owner_, ": saved state is too short"));
    const auto taken = bytes_.first(std::size_t(size));
    bytes_ = bytes_.subspan(std::size_t(size));
    return taken;
  }

  std::span<const std::byte> bytes_;
  std::string owner_;
};

}  // namespace aikido::detail
