// Gradient codecs on plain float32 buffers (include/aikido/compression.hpp says what each one does). They encode and
// decode; the caller moves the encoded bytes (an allreduce of 16-bit values, a gather of int8 blocks or of top-k
// pairs). PowerSGD needs matrix products and lives with the LibTorch integration (src/torch).
#pragma once

#include <aikido/compression.hpp>
#include <aikido/types.hpp>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace aikido::compress {

/// float32 -> IEEE half or bfloat16 (round to nearest even), and back.
void encode_fp16(std::span<const float> in, std::span<float16> out);
void decode_fp16(std::span<const float16> in, std::span<float> out);
void encode_bf16(std::span<const float> in, std::span<bfloat16> out);
void decode_bf16(std::span<const bfloat16> in, std::span<float> out);

/// int8 with a scale per block of Compression::kInt8Block values. Encoded layout (bytes): the blocks' scales
/// (float32 each, the largest magnitude of the block divided by 127), then one signed byte per value
/// (round(value / scale), in -127..127).
std::size_t int8_encoded_bytes(std::size_t count);
void encode_int8(std::span<const float> in, std::span<std::uint8_t> out);
/// out[i] += decoded value i.
void decode_int8_add(std::span<const std::uint8_t> in, std::span<float> out);

/// Number of values top-k sends for `count` values: round(fraction * count), at least 1 (0 for an empty buffer).
std::size_t topk_count(std::size_t count, double fraction);

/// Top-k sparsification with error feedback for one buffer of `count` values. encode() adds the residual (what
/// earlier steps did not send) to the values, sends the k largest magnitudes as (index, value) pairs, and keeps the
/// rest as the new residual. Not thread safe.
class TopK {
 public:
  TopK(std::size_t count, double fraction);
  std::size_t count() const { return residual_.size(); }
  std::size_t k() const { return k_; }
  /// Pairs as int32: index, then the float32 value's bits; `packed` holds 2 k entries.
  void encode(std::span<const float> values, std::span<std::int32_t> packed);
  /// out[index] += value for every pair. An index outside `out` (pairs from a buffer of another size) is an Error
  /// naming it.
  static void decode_add(std::span<const std::int32_t> packed, std::span<float> out);
  /// Forgets the residual (a cluster change: it belonged to the old averages).
  void reset();
  std::span<const float> residual() const { return residual_; }

 private:
  std::size_t k_;
  std::vector<float> residual_;
  std::vector<std::uint32_t> order_;  // scratch: indices being partitioned
};

}  // namespace aikido::compress
