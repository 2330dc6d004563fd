// Secure aggregation with pairwise masks (include/aikido/privacy.hpp). OpenSSL provides the key agreement (X25519),
// the key derivation (HKDF-SHA256) and the mask generator (ChaCha20 key stream).
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>

#include <aikido/errors.hpp>
#include <aikido/privacy.hpp>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <memory>

#include "base/error.hpp"

namespace aikido {

using detail::str_cat;

std::size_t encode_fixed_point(std::span<const float> in, double scale, std::span<std::int32_t> out) {
  AIKIDO_ENFORCE(in.size() == out.size(), "encode_fixed_point: sizes differ");
  if (!(scale > 0) || !std::isfinite(scale)) {
    throw ConfigError(str_cat("fixed point: the scale ", scale, " must be positive and finite"));
  }
  constexpr double kLimit = 2147483647.0;
  std::size_t saturated = 0;
  for (std::size_t i = 0; i < in.size(); ++i) {
    const double v = std::nearbyint(static_cast<double>(in[i]) * scale);
    if (std::isnan(v)) {
      out[i] = 0;
    } else if (v > kLimit || v < -kLimit) {
      out[i] = v > 0 ? INT32_MAX : -INT32_MAX;
      ++saturated;
    } else {
      out[i] = static_cast<std::int32_t>(v);
    }
  }
  return saturated;
}

void decode_fixed_point(std::span<const std::int32_t> in, double scale, std::span<float> out) {
  AIKIDO_ENFORCE(in.size() == out.size(), "decode_fixed_point: sizes differ");
  const double inverse = 1.0 / scale;
  for (std::size_t i = 0; i < in.size(); ++i) out[i] = static_cast<float>(static_cast<double>(in[i]) * inverse);
}

namespace {

[[noreturn]] void throw_openssl(const char* what) {
  char text[256] = "no details";
  if (const unsigned long code = ERR_get_error()) ERR_error_string_n(code, text, sizeof text);
  throw Error(str_cat("secure aggregation: OpenSSL ", what, " failed: ", text));
}

struct PkeyFree {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
struct PkeyCtxFree {
  void operator()(EVP_PKEY_CTX* p) const { EVP_PKEY_CTX_free(p); }
};
struct CipherCtxFree {
  void operator()(EVP_CIPHER_CTX* p) const { EVP_CIPHER_CTX_free(p); }
};
struct KdfCtxFree {
  void operator()(EVP_KDF_CTX* p) const { EVP_KDF_CTX_free(p); }
};
using Pkey = std::unique_ptr<EVP_PKEY, PkeyFree>;

constexpr std::size_t kKeyBytes = 32;
using Key = std::array<unsigned char, kKeyBytes>;

// HKDF-SHA256 of the X25519 secret, bound to the pair (low rank first), the cluster version and the job's purpose,
// so that the same key pair can never yield the same masks in two contexts.
Key derive_pair_key(const unsigned char* shared, std::size_t shared_bytes, int low, int high, std::uint64_t version) {
  EVP_KDF* kdf = EVP_KDF_fetch(nullptr, "HKDF", nullptr);
  if (kdf == nullptr) throw_openssl("HKDF fetch");
  std::unique_ptr<EVP_KDF_CTX, KdfCtxFree> ctx(EVP_KDF_CTX_new(kdf));
  EVP_KDF_free(kdf);
  if (!ctx) throw_openssl("HKDF context");
  const std::string info = str_cat("aikido secure aggregation v1 pair ", low, "-", high, " version ", version);
  static const char kSalt[] = "aikido-secagg";
  char digest[] = "SHA256";
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, const_cast<unsigned char*>(shared), shared_bytes),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, const_cast<char*>(kSalt), sizeof kSalt - 1),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, const_cast<char*>(info.data()), info.size()),
      OSSL_PARAM_construct_end()};
  Key key;
  if (EVP_KDF_derive(ctx.get(), key.data(), key.size(), params) != 1) throw_openssl("HKDF derive");
  return key;
}

// Adds (sign +1) or subtracts (-1) the pair's mask of `round` to `values`, modulo 2^32: the ChaCha20 key stream of
// the pair key, with the round as nonce, read as 32-bit words.
void apply_mask(const Key& key, std::uint64_t round, int sign, std::span<std::int32_t> values,
                std::vector<std::uint32_t>& scratch) {
  std::unique_ptr<EVP_CIPHER_CTX, CipherCtxFree> ctx(EVP_CIPHER_CTX_new());
  if (!ctx) throw_openssl("cipher context");
  // OpenSSL's ChaCha20 IV: a 32-bit block counter, then the 96-bit nonce (here the round).
  unsigned char iv[16] = {};
  std::memcpy(iv + 4, &round, sizeof round);
  if (EVP_EncryptInit_ex(ctx.get(), EVP_chacha20(), nullptr, key.data(), iv) != 1) throw_openssl("ChaCha20 init");
  scratch.assign(values.size(), 0u);
  auto* bytes = reinterpret_cast<unsigned char*>(scratch.data());
  const std::size_t total = scratch.size() * sizeof(std::uint32_t);
  for (std::size_t done = 0; done < total;) {
    const int chunk = static_cast<int>(std::min<std::size_t>(total - done, std::size_t(1) << 30));
    int written = 0;
    if (EVP_EncryptUpdate(ctx.get(), bytes + done, &written, bytes + done, chunk) != 1) throw_openssl("ChaCha20");
    done += static_cast<std::size_t>(written);
  }
  for (std::size_t i = 0; i < values.size(); ++i) {
    const std::uint32_t v = static_cast<std::uint32_t>(values[i]);
    values[i] = static_cast<std::int32_t>(sign > 0 ? v + scratch[i] : v - scratch[i]);
  }
}

}  // namespace

struct SecureAggregator::State {
  Peer& peer;
  bool keyed = false;
  std::uint64_t version = 0;
  int rank = -1, size = 0;
  std::vector<Key> pair_keys;  // by other rank; own slot unused
  std::uint64_t round = 0;
  std::uint64_t exchanges = 0;
  std::vector<std::uint32_t> scratch;

  explicit State(Peer& p) : peer(p) {}

  void key_exchange_if_due() {
    if (keyed && version == peer.cluster_version() && rank == peer.rank() && size == peer.size()) return;
    Pkey own(EVP_PKEY_Q_keygen(nullptr, nullptr, "X25519"));
    if (!own) throw_openssl("X25519 key generation");
    std::array<unsigned char, kKeyBytes> mine{};
    std::size_t length = mine.size();
    if (EVP_PKEY_get_raw_public_key(own.get(), mine.data(), &length) != 1 || length != mine.size()) {
      throw_openssl("X25519 public key");
    }
    std::vector<std::uint8_t> all(kKeyBytes * static_cast<std::size_t>(peer.size()));
    peer.allgather(std::span<const std::uint8_t>(mine.data(), mine.size()), std::span<std::uint8_t>(all),
                   "aikido.secagg/public-keys");
    pair_keys.assign(static_cast<std::size_t>(peer.size()), Key{});
    for (int other = 0; other < peer.size(); ++other) {
      if (other == peer.rank()) continue;
      Pkey theirs(EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, nullptr, all.data() + kKeyBytes * other, kKeyBytes));
      if (!theirs) throw_openssl(str_cat("X25519 public key of rank ", other).c_str());
      std::unique_ptr<EVP_PKEY_CTX, PkeyCtxFree> ctx(EVP_PKEY_CTX_new(own.get(), nullptr));
      if (!ctx || EVP_PKEY_derive_init(ctx.get()) != 1 || EVP_PKEY_derive_set_peer(ctx.get(), theirs.get()) != 1) {
        throw_openssl("X25519 derive setup");
      }
      std::array<unsigned char, 64> shared{};
      std::size_t shared_bytes = shared.size();
      if (EVP_PKEY_derive(ctx.get(), shared.data(), &shared_bytes) != 1) throw_openssl("X25519 derive");
      pair_keys[static_cast<std::size_t>(other)] =
          derive_pair_key(shared.data(), shared_bytes, std::min(other, peer.rank()), std::max(other, peer.rank()),
                          peer.cluster_version());
      OPENSSL_cleanse(shared.data(), shared.size());
    }
    keyed = true;
    version = peer.cluster_version();
    rank = peer.rank();
    size = peer.size();
    round = 0;
    ++exchanges;
  }

  void mask(std::span<std::int32_t> values) {
    key_exchange_if_due();
    for (int other = 0; other < size; ++other) {
      if (other == rank) continue;
      apply_mask(pair_keys[static_cast<std::size_t>(other)], round, other > rank ? +1 : -1, values, scratch);
    }
    ++round;
  }
};

SecureAggregator::SecureAggregator(Peer& peer) : state_(std::make_unique<State>(peer)) {}

SecureAggregator::~SecureAggregator() {
  for (auto& key : state_->pair_keys) OPENSSL_cleanse(key.data(), key.size());
}

void SecureAggregator::mask(std::span<std::int32_t> values) { state_->mask(values); }

void SecureAggregator::sum(std::span<std::int32_t> values, std::string_view name) {
  if (state_->peer.size() == 1) return;
  state_->mask(values);
  state_->peer.allreduce(values, ReduceOp::sum, name);
}

std::uint64_t SecureAggregator::round() const { return state_->round; }
std::uint64_t SecureAggregator::key_exchanges() const { return state_->exchanges; }

}  // namespace aikido
