// SHA-256 and HMAC-SHA256 (FIPS 180-4, RFC 2104), used by the connection handshake and by consensus.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace aikido::detail {

using Digest = std::array<std::uint8_t, 32>;

class Sha256 {
 public:
  Sha256();
  void update(const void* data, std::size_t size);
  Digest finish();

 private:
  void block(const std::uint8_t* p);
  std::uint32_t h_[8];
  std::uint8_t buffer_[64];
  std::size_t buffered_ = 0;
  std::uint64_t total_ = 0;
};

Digest sha256(const void* data, std::size_t size);
Digest hmac_sha256(std::span<const std::uint8_t> key, std::span<const std::uint8_t> message);
/// Constant-time comparison.
bool digest_equal(const Digest& a, const Digest& b);
std::string to_hex(std::span<const std::uint8_t> bytes);
/// Fills `out` from the kernel's random source.
void random_bytes(void* out, std::size_t size);

}  // namespace aikido::detail
