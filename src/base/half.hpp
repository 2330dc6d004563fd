// IEEE half and bfloat16 conversions, inline so that the reduction kernels' loops do not call out per element.
#pragma once

#include <cstdint>
#include <cstring>

namespace aikido::detail {

/// Rounds to nearest even; overflow gives infinity, NaN stays NaN.
inline std::uint16_t float_to_half_bits(float value) {
  std::uint32_t x;
  std::memcpy(&x, &value, sizeof x);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf or nan
    return std::uint16_t(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  }
  if (abs >= 0x477ff000u) {  // rounds to >= 65520: overflow to inf
    return std::uint16_t(sign | 0x7c00u);
  }
  if (abs < 0x38800000u) {    // subnormal half (or zero): round to nearest even on the 2^-24 grid
    if (abs < 0x33000000u) {  // below half of the smallest subnormal
      return std::uint16_t(sign);
    }
    const std::uint32_t exponent = abs >> 23;
    const std::uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126u - exponent;  // value = mantissa * 2^(exponent-150); grid step 2^-24
    std::uint32_t half = mantissa >> shift;
    const std::uint32_t rest = mantissa & ((1u << shift) - 1u);
    const std::uint32_t halfway = 1u << (shift - 1u);
    if (rest > halfway || (rest == halfway && (half & 1u))) ++half;
    return std::uint16_t(sign | half);
  }
  // Normal: rebias the exponent and round the mantissa to 10 bits, nearest even.
  std::uint32_t h = ((abs - 0x38000000u) >> 13);
  const std::uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return std::uint16_t(sign | h);
}

inline float half_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  std::uint32_t mantissa = h & 0x3ffu;
  std::uint32_t x;
  if (exponent == 0x1f) {
    x = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    x = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    x = sign;
  } else {  // subnormal: normalise
    std::uint32_t e = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --e;
    }
    x = sign | (e << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}

/// Rounds to nearest even; NaN stays a quiet NaN.
inline std::uint16_t float_to_bfloat16_bits(float value) {
  std::uint32_t x;
  std::memcpy(&x, &value, sizeof x);
  // Branch-free so that conversion loops vectorise.
  const std::uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  const std::uint32_t quiet_nan = (x >> 16) | 0x40u;
  return std::uint16_t((x & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

inline float bfloat16_bits_to_float(std::uint16_t b) {
  const std::uint32_t u = std::uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace aikido::detail
