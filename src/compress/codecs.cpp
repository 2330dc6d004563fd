#include "compress/codecs.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "base/error.hpp"
#include "base/half.hpp"

namespace aikido::compress {

using detail::str_cat;

void encode_fp16(std::span<const float> in, std::span<float16> out) {
  AIKIDO_ENFORCE(in.size() == out.size(), "encode_fp16: sizes differ");
  for (std::size_t i = 0; i < in.size(); ++i) out[i].bits = detail::float_to_half_bits(in[i]);
}

void decode_fp16(std::span<const float16> in, std::span<float> out) {
  AIKIDO_ENFORCE(in.size() == out.size(), "decode_fp16: sizes differ");
  for (std::size_t i = 0; i < in.size(); ++i) out[i] = detail::half_bits_to_float(in[i].bits);
}

void encode_bf16(std::span<const float> in, std::span<bfloat16> out) {
  AIKIDO_ENFORCE(in.size() == out.size(), "encode_bf16: sizes differ");
  for (std::size_t i = 0; i < in.size(); ++i) out[i].bits = detail::float_to_bfloat16_bits(in[i]);
}

void decode_bf16(std::span<const bfloat16> in, std::span<float> out) {
  AIKIDO_ENFORCE(in.size() == out.size(), "decode_bf16: sizes differ");
  for (std::size_t i = 0; i < in.size(); ++i) out[i] = detail::bfloat16_bits_to_float(in[i].bits);
}

namespace {
constexpr std::size_t kBlock = static_cast<std::size_t>(Compression::kInt8Block);
std::size_t blocks_of(std::size_t count) { return (count + kBlock - 1) / kBlock; }
}  // namespace

std::size_t int8_encoded_bytes(std::size_t count) { return blocks_of(count) * sizeof(float) + count; }

void encode_int8(std::span<const float> in, std::span<std::uint8_t> out) {
  AIKIDO_ENFORCE(out.size() == int8_encoded_bytes(in.size()), "encode_int8: the output has the wrong size");
  const std::size_t blocks = blocks_of(in.size());
  std::uint8_t* codes = out.data() + blocks * sizeof(float);
  for (std::size_t b = 0; b < blocks; ++b) {
    const std::size_t begin = b * kBlock, end = std::min(in.size(), begin + kBlock);
    float largest = 0;
    for (std::size_t i = begin; i < end; ++i) largest = std::max(largest, std::fabs(in[i]));
    // A non-finite value would poison the whole block's scale: it is sent as the largest code instead.
    if (!std::isfinite(largest)) largest = 0;
    const float scale = largest / 127.0f;
    std::memcpy(out.data() + b * sizeof(float), &scale, sizeof scale);
    const float inverse = scale > 0 ? 1.0f / scale : 0.0f;
    for (std::size_t i = begin; i < end; ++i) {
      const float q = std::clamp(std::nearbyint(in[i] * inverse), -127.0f, 127.0f);
      codes[i] = static_cast<std::uint8_t>(static_cast<std::int8_t>(std::isnan(q) ? 0.0f : q));
    }
  }
}

void decode_int8_add(std::span<const std::uint8_t> in, std::span<float> out) {
  AIKIDO_ENFORCE(in.size() == int8_encoded_bytes(out.size()), "decode_int8_add: the input has the wrong size");
  const std::size_t blocks = blocks_of(out.size());
  const std::uint8_t* codes = in.data() + blocks * sizeof(float);
  for (std::size_t b = 0; b < blocks; ++b) {
    float scale;
    std::memcpy(&scale, in.data() + b * sizeof(float), sizeof scale);
    const std::size_t begin = b * kBlock, end = std::min(out.size(), begin + kBlock);
    for (std::size_t i = begin; i < end; ++i) out[i] += scale * static_cast<float>(static_cast<std::int8_t>(codes[i]));
  }
}

std::size_t topk_count(std::size_t count, double fraction) {
  if (count == 0) return 0;
  const auto k = static_cast<std::size_t>(std::llround(fraction * static_cast<double>(count)));
  return std::clamp<std::size_t>(k, 1, count);
}

TopK::TopK(std::size_t count, double fraction) : k_(topk_count(count, fraction)), residual_(count, 0.0f) {
  if (!(fraction > 0 && fraction <= 1)) {
    throw ConfigError(str_cat("top-k compression: the fraction ", fraction, " must be in (0, 1]"));
  }
  AIKIDO_ENFORCE(count <= std::size_t(INT32_MAX), "top-k compression: buffers of at most 2^31 - 1 values");
}

void TopK::encode(std::span<const float> values, std::span<std::int32_t> packed) {
  AIKIDO_ENFORCE(values.size() == residual_.size() && packed.size() == 2 * k_, "TopK::encode: sizes differ");
  float* acc = residual_.data();
  for (std::size_t i = 0; i < values.size(); ++i) acc[i] += values[i];
  order_.resize(residual_.size());
  std::iota(order_.begin(), order_.end(), 0u);
  // Average linear time; only which k are largest matters, not their order.
  std::nth_element(order_.begin(), order_.begin() + static_cast<std::ptrdiff_t>(k_ - 1), order_.end(),
                   [acc](std::uint32_t a, std::uint32_t b) { return std::fabs(acc[a]) > std::fabs(acc[b]); });
  for (std::size_t j = 0; j < k_; ++j) {
    const std::uint32_t i = order_[j];
    std::int32_t bits;
    std::memcpy(&bits, &acc[i], sizeof bits);
    packed[2 * j] = static_cast<std::int32_t>(i);
    packed[2 * j + 1] = bits;
    acc[i] = 0;  // sent: what stays is the residual
  }
}

void TopK::decode_add(std::span<const std::int32_t> packed, std::span<float> out) {
  AIKIDO_ENFORCE(packed.size() % 2 == 0, "TopK::decode_add: pairs expected");
  for (std::size_t j = 0; j < packed.size(); j += 2) {
    const std::int32_t index = packed[j];
    if (index < 0 || static_cast<std::size_t>(index) >= out.size()) {
      throw Error(str_cat("top-k decode: index ", index, " outside a buffer of ", out.size(),
                          " values (workers compress buffers of different sizes?)"));
    }
    float value;
    std::memcpy(&value, &packed[j + 1], sizeof value);
    out[static_cast<std::size_t>(index)] += value;
  }
}

void TopK::reset() { std::fill(residual_.begin(), residual_.end(), 0.0f); }

}  // namespace aikido::compress
