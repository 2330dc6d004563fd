#include "base/crypto.hpp"

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <algorithm>
#include <climits>

#include "base/error.hpp"

namespace aikido::detail {
namespace {

[[noreturn]] void throw_openssl(const char* what) {
  char text[256] = "no OpenSSL error queued";
  if (const unsigned long code = ERR_get_error(); code != 0) ERR_error_string_n(code, text, sizeof text);
  ERR_clear_error();
  throw Error(str_cat(what, " failed in OpenSSL's libcrypto: ", text,
                      "; check the OpenSSL installation (libssl3) and its configuration (OPENSSL_CONF)"));
}

}  // namespace

Digest sha256(const void* data, std::size_t size) {
  Digest out{};
  unsigned int length = 0;
  if (EVP_Digest(data, size, out.data(), &length, EVP_sha256(), nullptr) != 1 || length != out.size()) {
    throw_openssl("SHA-256");
  }
  return out;
}

Digest hmac_sha256(std::span<const std::uint8_t> key, std::span<const std::uint8_t> message) {
  if (key.size() > std::size_t(INT_MAX)) throw Error("HMAC-SHA256: a key of more than 2 GiB is not supported");
  Digest out{};
  unsigned int length = 0;
  // HMAC() with a null key pointer would mean "no key"; an empty key is a valid (if weak) key, so pass a valid pointer.
  static const std::uint8_t kEmpty = 0;
  if (HMAC(EVP_sha256(), key.empty() ? &kEmpty : key.data(), int(key.size()), message.data(), message.size(),
           out.data(), &length) == nullptr ||
      length != out.size()) {
    throw_openssl("HMAC-SHA256");
  }
  return out;
}

bool digest_equal(const Digest& a, const Digest& b) { return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0; }

bool bytes_equal(std::span<const std::uint8_t> a, std::span<const std::uint8_t> b) {
  if (a.size() != b.size()) return false;
  return a.empty() || CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

std::string to_hex(std::span<const std::uint8_t> bytes) {
  static const char* const kDigits = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (std::uint8_t b : bytes) {
    out += kDigits[b >> 4];
    out += kDigits[b & 15];
  }
  return out;
}

void random_bytes(void* out, std::size_t size) {
  auto* p = static_cast<unsigned char*>(out);
  while (size > 0) {
    const int n = int(std::min<std::size_t>(size, 1 << 20));
    if (RAND_bytes(p, n) != 1) throw_openssl("random bytes (RAND_bytes)");
    p += n;
    size -= std::size_t(n);
  }
}

}  // namespace aikido::detail
