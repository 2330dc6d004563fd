// Element types, reduction operations and topologies.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>

namespace aikido {

/// IEEE 754 half precision, stored as its 16 bits. Arithmetic goes through float.
struct float16 {
  std::uint16_t bits = 0;
  float16() = default;
  explicit float16(float value);
  explicit operator float() const;
  static float16 from_bits(std::uint16_t b) {
    float16 h;
    h.bits = b;
    return h;
  }
  friend bool operator==(float16 a, float16 b) { return a.bits == b.bits; }
};

/// bfloat16 (the upper 16 bits of a float32), rounded to nearest even on conversion.
struct bfloat16 {
  std::uint16_t bits = 0;
  bfloat16() = default;
  explicit bfloat16(float value);
  explicit operator float() const {
    std::uint32_t u = std::uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static bfloat16 from_bits(std::uint16_t b) {
    bfloat16 h;
    h.bits = b;
    return h;
  }
  friend bool operator==(bfloat16 a, bfloat16 b) { return a.bits == b.bits; }
};

/// Element types a collective can carry.
enum class DType : std::uint8_t { f32, f64, f16, bf16, i32, i64, u8 };

std::size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);       // "f32", "f64", "f16", "bf16", "i32", "i64", "u8"
DType parse_dtype(std::string_view name);  // throws ConfigError naming the accepted values

template <class T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr DType value = DType::f32;
};
template <>
struct DTypeOf<double> {
  static constexpr DType value = DType::f64;
};
template <>
struct DTypeOf<float16> {
  static constexpr DType value = DType::f16;
};
template <>
struct DTypeOf<bfloat16> {
  static constexpr DType value = DType::bf16;
};
template <>
struct DTypeOf<std::int32_t> {
  static constexpr DType value = DType::i32;
};
template <>
struct DTypeOf<std::int64_t> {
  static constexpr DType value = DType::i64;
};
template <>
struct DTypeOf<std::uint8_t> {
  static constexpr DType value = DType::u8;
};
template <class T>
inline constexpr DType dtype_of = DTypeOf<std::remove_cv_t<T>>::value;

/// Reduction applied element-wise. `mean` is a sum divided by the number of ranks (integer division for integers).
/// Integer sums wrap modulo 2^bits (two's complement), never overflow into undefined behaviour.
enum class ReduceOp : std::uint8_t { sum, min, max, prod, mean };
const char* reduce_op_name(ReduceOp op);

/// Communication graph used by the collectives (names: "ring", "tree", "star", "hierarchical", "multi-ring",
/// "auto").
/// - ring: bandwidth-optimal for large buffers (over sockets an allreduce of at most 64 KiB runs on the tree).
/// - tree: binary tree, log-depth latency.
/// - star: everything through rank 0.
/// - hierarchical: by host. With the same number of ranks on every host and several of them: inside each host
///   through shared memory (reduce-scatter among the host's ranks), across hosts over TCP with every rank of a host
///   owning a slice of the buffer (so all of them drive the links between hosts at once), then inside each host
///   again (allgather); large buffers go in chunks whose phases overlap. Otherwise reduce inside each host, ring
///   across one leader per host, broadcast inside each host, all over the connections.
/// - multi_ring: two rings in opposite directions, each over half the buffer (every rank sends to both neighbours
///   at once, over two connections).
/// - automatic: chosen per collective from the measured links (latency and bandwidth between every pair of ranks,
///   Peer::set_link_matrix) and the buffer size, among ring, tree, hierarchical and multi_ring; see README,
///   "Topologies".
enum class Topology : std::uint8_t { ring, tree, star, hierarchical, multi_ring, automatic };
const char* topology_name(Topology topology);
/// Accepts the names above ("auto" for automatic; "multi_ring" too). Throws ConfigError naming the accepted values.
Topology parse_topology(std::string_view name);

}  // namespace aikido
