// Cryptographic primitives, all from OpenSSL's libcrypto: SHA-256 (consensus digests), HMAC-SHA256 (the connection
// handshake, launcher tokens), a constant-time digest comparison and random bytes. Nothing here is hand-written: the
// handshake's security rests on a vetted implementation.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace aikido::detail {

using Digest = std::array<std::uint8_t, 32>;

/// SHA-256 of `size` bytes at `data`. Thread-safe.
Digest sha256(const void* data, std::size_t size);
/// HMAC-SHA256 (RFC 2104) of `message` under `key`. Thread-safe.
Digest hmac_sha256(std::span<const std::uint8_t> key, std::span<const std::uint8_t> message);
/// Constant-time comparison (CRYPTO_memcmp): the time taken does not depend on where the digests differ.
bool digest_equal(const Digest& a, const Digest& b);
/// Constant-time comparison of two byte strings of the same length; false when the lengths differ.
bool bytes_equal(std::span<const std::uint8_t> a, std::span<const std::uint8_t> b);
std::string to_hex(std::span<const std::uint8_t> bytes);
/// Fills `out` from OpenSSL's CSPRNG (seeded by the kernel). Throws Error when the generator fails.
void random_bytes(void* out, std::size_t size);

}  // namespace aikido::detail
