#include <aikido/peer.hpp>
#include <aikido/types.hpp>
#include <initializer_list>
#include <string>

#include "base/error.hpp"

namespace aikido {

float16::float16(float value) {
  std::uint32_t x;
  std::memcpy(&x, &value, sizeof x);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf or nan
    bits = std::uint16_t(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
    return;
  }
  if (abs >= 0x477ff000u) {  // rounds to >= 65520: overflow to inf
    bits = std::uint16_t(sign | 0x7c00u);
    return;
  }
  if (abs < 0x38800000u) {    // subnormal half (or zero): round to nearest even on the 2^-24 grid
    if (abs < 0x33000000u) {  // below half of the smallest subnormal
      bits = std::uint16_t(sign);
      return;
    }
    const std::uint32_t exponent = abs >> 23;
    const std::uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126u - exponent;  // value = mantissa * 2^(exponent-150); grid step 2^-24
    std::uint32_t half = mantissa >> shift;
    const std::uint32_t rest = mantissa & ((1u << shift) - 1u);
    const std::uint32_t halfway = 1u << (shift - 1u);
    if (rest > halfway || (rest == halfway && (half & 1u))) ++half;
    bits = std::uint16_t(sign | half);
    return;
  }
  // Normal: rebias the exponent and round the mantissa to 10 bits, nearest even.
  std::uint32_t h = ((abs - 0x38000000u) >> 13);
  const std::uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  bits = std::uint16_t(sign | h);
}

float16::operator float() const {
  const std::uint32_t sign = std::uint32_t(bits & 0x8000u) << 16;
  const std::uint32_t exponent = (bits >> 10) & 0x1fu;
  std::uint32_t mantissa = bits & 0x3ffu;
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

bfloat16::bfloat16(float value) {
  std::uint32_t x;
  std::memcpy(&x, &value, sizeof x);
  if ((x & 0x7fffffffu) > 0x7f800000u) {  // nan stays a quiet nan
    bits = std::uint16_t((x >> 16) | 0x40u);
    return;
  }
  x += 0x7fffu + ((x >> 16) & 1u);
  bits = std::uint16_t(x >> 16);
}

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return 4;
    case DType::f64:
      return 8;
    case DType::f16:
      return 2;
    case DType::bf16:
      return 2;
    case DType::i32:
      return 4;
    case DType::i64:
      return 8;
    case DType::u8:
      return 1;
  }
  throw ProtocolError(detail::str_cat("unknown element type code ", int(dtype)));
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return "f32";
    case DType::f64:
      return "f64";
    case DType::f16:
      return "f16";
    case DType::bf16:
      return "bf16";
    case DType::i32:
      return "i32";
    case DType::i64:
      return "i64";
    case DType::u8:
      return "u8";
  }
  return "unknown";
}

namespace {

// The value of `values` whose name is `name`; otherwise a ConfigError that lists the accepted names.
template <class E>
E parse_name(std::string_view name, std::initializer_list<E> values, const char* (*name_of)(E), const char* what) {
  std::string accepted;
  for (E value : values) {
    if (name == name_of(value)) return value;
    accepted += (accepted.empty() ? "" : ", ") + std::string(name_of(value));
  }
  throw ConfigError(detail::str_cat("unknown ", what, " '", name, "'; use one of ", accepted));
}

}  // namespace

DType parse_dtype(std::string_view name) {
  return parse_name(name, {DType::f32, DType::f64, DType::f16, DType::bf16, DType::i32, DType::i64, DType::u8},
                    dtype_name, "element type");
}

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum:
      return "sum";
    case ReduceOp::min:
      return "min";
    case ReduceOp::max:
      return "max";
    case ReduceOp::prod:
      return "prod";
    case ReduceOp::mean:
      return "mean";
  }
  return "unknown";
}

const char* topology_name(Topology topology) {
  switch (topology) {
    case Topology::ring:
      return "ring";
    case Topology::tree:
      return "tree";
    case Topology::star:
      return "star";
    case Topology::hierarchical:
      return "hierarchical";
  }
  return "unknown";
}

Topology parse_topology(std::string_view name) {
  return parse_name(name, {Topology::ring, Topology::tree, Topology::star, Topology::hierarchical}, topology_name,
                    "topology");
}

const char* transport_name(TransportKind kind) {
  switch (kind) {
    case TransportKind::automatic:
      return "auto";
    case TransportKind::tcp:
      return "tcp";
    case TransportKind::unix_socket:
      return "unix";
  }
  return "unknown";
}

TransportKind parse_transport(std::string_view name) {
  return parse_name(name, {TransportKind::automatic, TransportKind::tcp, TransportKind::unix_socket}, transport_name,
                    "transport");
}

}  // namespace aikido
